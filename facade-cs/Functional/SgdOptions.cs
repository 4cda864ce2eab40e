namespace Functional;

/// <summary>
/// SGD's settings besides the learning rate, for <see cref="TrainerBuilder.UseSgd(double, Action{SgdOptions})"/>;
/// the update is torch.optim.SGD's.
/// </summary>
public sealed class SgdOptions
{
    /// <summary>The momentum factor (--momentum).</summary>
    /// <value>Default: 0 (plain SGD).</value>
    public double Momentum { get; set; }

    /// <summary>Nesterov momentum; needs <see cref="Momentum"/> above 0 (--nesterov).</summary>
    /// <value>Default: false.</value>
    public bool Nesterov { get; set; }

    /// <summary>Dampening of the momentum buffer after its first update, as torch.optim.SGD's dampening
    /// (--dampening); Nesterov needs 0.</summary>
    /// <value>Default: 0.</value>
    public double Dampening { get; set; }

    /// <summary>Weight decay, coupled (L2) as torch.optim.SGD, never applied to biases and normalization weights
    /// (--weight-decay).</summary>
    /// <value>Default: 0.</value>
    public double WeightDecay { get; set; }
}
