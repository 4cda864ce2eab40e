namespace Functional;

/// <summary>
/// AdamW's settings besides the learning rate, for <see cref="TrainerBuilder.UseAdamW(double, Action{AdamWOptions})"/>;
/// the update is torch.optim.AdamW's (decoupled weight decay, epsilon added after bias correction).
/// </summary>
public sealed class AdamWOptions
{
    /// <summary>The decay rate of the first moment (--adam-beta1).</summary>
    /// <value>Default: 0.9.</value>
    public double Beta1 { get; set; } = 0.9;

    /// <summary>The decay rate of the second moment (--adam-beta2).</summary>
    /// <value>Default: 0.999.</value>
    public double Beta2 { get; set; } = 0.999;

    /// <summary>Added to the denominator for numerical stability (--adam-epsilon).</summary>
    /// <value>Default: 1e-8.</value>
    public double Epsilon { get; set; } = 1e-8;

    /// <summary>Decoupled weight decay, never applied to biases and normalization weights (--weight-decay).</summary>
    /// <value>Default: 0.</value>
    public double WeightDecay { get; set; }

    /// <summary>AMSGrad: the denominator uses the running maximum of the second moment, as torch.optim.AdamW's
    /// amsgrad (--amsgrad).</summary>
    /// <value>Default: false.</value>
    public bool Amsgrad { get; set; }

    /// <summary>Maximize the objective instead of minimizing it, as torch.optim.AdamW's maximize (--maximize).</summary>
    /// <value>Default: false.</value>
    public bool Maximize { get; set; }
}
