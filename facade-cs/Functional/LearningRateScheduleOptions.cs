namespace Functional;

/// <summary>
/// The learning-rate schedule, for <see cref="TrainerBuilder.UseSchedule(Action{LearningRateScheduleOptions})"/>:
/// any of Hugging Face's scheduler names with its parameters. The k-th update (k from 0) uses the peak
/// learning rate times the schedule's factor at k, as HF's get_scheduler.
/// </summary>
public sealed class LearningRateScheduleOptions
{
    /// <summary>HF's scheduler name: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    /// "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"
    /// or "reduce_lr_on_plateau" (stepped with the evaluation metric after each evaluation; needs an evaluation
    /// strategy) (--lr-scheduler-type).</summary>
    /// <value>Default: "linear".</value>
    public string Name { get; set; } = "linear";

    /// <summary>Warmup steps; wins over <see cref="WarmupRatio"/> when above 0 (--num-warmup-steps).</summary>
    /// <value>Default: 0.</value>
    public int WarmupSteps { get; set; }

    /// <summary>Warmup as a fraction of all optimizer steps, rounded up (--warmup-ratio).</summary>
    /// <value>Default: 0.</value>
    public double WarmupRatio { get; set; }

    /// <summary>The schedule's parameters as HF's lr_scheduler_kwargs JSON object, with HF's names, e.g.
    /// {"num_cycles": 2} or {"min_lr_rate": 0.1} (--lr-scheduler-kwargs). A key the schedule does not take, and
    /// min_lr together with min_lr_rate, are refused.</summary>
    /// <value>Default: null (HF's defaults for the schedule).</value>
    public string? Kwargs { get; set; }
}
