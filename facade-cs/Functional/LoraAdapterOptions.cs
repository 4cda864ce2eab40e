namespace Functional;

/// <summary>
/// How an existing PEFT adapter trains on, for
/// <see cref="TrainerBuilder.UseLoraAdapter(string, Action{LoraAdapterOptions})"/>. Its rank, alpha, dropout and
/// targets come from the adapter folder's adapter_config.json.
/// </summary>
public sealed class LoraAdapterOptions
{
    /// <summary>Freeze the base model: only the adapters train, and only they are saved (--only-optimize-lora).</summary>
    /// <value>Default: false.</value>
    public bool OnlyOptimizeLora { get; set; }

    /// <summary>The adapters' own peak learning rate (--lora-learning-rate).</summary>
    /// <value>Default: null (the optimizer's learning rate).</value>
    public double? LearningRate { get; set; }
}
