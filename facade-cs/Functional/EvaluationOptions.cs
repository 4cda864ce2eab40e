namespace Functional;

/// <summary>
/// When and how the evaluation set is scored, for
/// <see cref="TrainerBuilder.UseEvaluation(int, Action{EvaluationOptions})"/>. The evaluation set is the file of
/// <see cref="TrainerBuilder.UseEvalData(string)"/> or the rows held out by <see cref="DataOptions.EvalSplitRatio"/>.
/// </summary>
public sealed class EvaluationOptions
{
    /// <summary>When to evaluate during the run: "no", "steps" or "epoch" (--eval-strategy). With an evaluation
    /// set the run is always evaluated before its first and after its last step.</summary>
    /// <value>Default: null, meaning "steps" when the builder's everySteps is above 0, else "no".</value>
    public string? Strategy { get; set; }

    /// <summary>Rows per evaluation micro-batch (--per-device-eval-batch-size).</summary>
    /// <value>Default: 8.</value>
    public int BatchSize { get; set; } = 8;

    /// <summary>Evaluation samples whose greedy answers are scored by exact match before and after training
    /// (--exact-match-samples).</summary>
    /// <value>Default: 0 (no scoring).</value>
    public int ExactMatchSamples { get; set; }
}
