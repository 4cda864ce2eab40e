namespace Functional;

/// <summary>
/// New LoRA adapters, for <see cref="TrainerBuilder.UseLora(int, Action{LoraOptions})"/>: each adapted projection adds
/// (alpha / rank) x A^T B^T (PEFT's LoRA; DeepSpeed-Chat's lora_dim and lora_module_name). With neither
/// <see cref="TargetModules"/> nor <see cref="ModuleName"/> the model family's default projections are adapted.
/// </summary>
public sealed class LoraOptions
{
    /// <summary>The adapter's output is scaled by Alpha / rank (--lora-alpha).</summary>
    /// <value>Default: 8 (as PEFT).</value>
    public double Alpha { get; set; } = 8;

    /// <summary>Dropout on the adapter's input (--lora-dropout).</summary>
    /// <value>Default: 0.</value>
    public double Dropout { get; set; }

    /// <summary>Adapt the projections with these names, e.g. ["q_proj", "v_proj"] (PEFT's target_modules;
    /// --lora-target-modules).</summary>
    /// <value>Default: empty.</value>
    public IList<string> TargetModules { get; set; } = new List<string>();

    /// <summary>Adapt every projection whose full name contains this text, e.g. "layers." (DeepSpeed-Chat's
    /// lora_module_name; --lora-module-name).</summary>
    /// <value>Default: null.</value>
    public string? ModuleName { get; set; }

    /// <summary>Freeze the base model: only the adapters train, and only they are saved (--only-optimize-lora).</summary>
    /// <value>Default: false.</value>
    public bool OnlyOptimizeLora { get; set; }

    /// <summary>The adapters' own peak learning rate (--lora-learning-rate).</summary>
    /// <value>Default: null (the optimizer's learning rate).</value>
    public double? LearningRate { get; set; }
}
