namespace Functional;

/// <summary>
/// Checkpoints, the best model and early stopping, for
/// <see cref="TrainerBuilder.UseCheckpoints(int, Action{CheckpointOptions})"/>, as Hugging Face Trainer's
/// save_strategy, save_total_limit, metric_for_best_model, greater_is_better, load_best_model_at_end and
/// EarlyStoppingCallback. Checkpoints are written to OUTPUT/checkpoint-N/ atomically.
/// </summary>
public sealed class CheckpointOptions
{
    /// <summary>When to save: "no", "steps" (every everySteps optimizer steps) or "epoch" (--save-strategy).</summary>
    /// <value>Default: "steps".</value>
    public string Strategy { get; set; } = "steps";

    /// <summary>Keep at most this many checkpoints, deleting the oldest; the best is never deleted (--save-total-limit).</summary>
    /// <value>Default: null (keep all).</value>
    public int? TotalLimit { get; set; }

    /// <summary>The metric that picks the best checkpoint: "eval_loss" or "eval_perplexity" (--metric-for-best-model).</summary>
    /// <value>Default: "eval_loss".</value>
    public string Metric { get; set; } = "eval_loss";

    /// <summary>Whether a greater metric is better (--greater-is-better).</summary>
    /// <value>Default: null (false for metrics ending in "loss", true otherwise, as HF).</value>
    public bool? GreaterIsBetter { get; set; }

    /// <summary>Load the best checkpoint's weights at the end, before saving final/; needs the evaluation and save
    /// strategies to be the same (--load-best-model-at-end).</summary>
    /// <value>Default: false.</value>
    public bool LoadBestModelAtEnd { get; set; }

    /// <summary>Stop after this many evaluations without improvement of <see cref="Metric"/> (--early-stopping-patience).</summary>
    /// <value>Default: 0 (no early stopping).</value>
    public int EarlyStoppingPatience { get; set; }
}
