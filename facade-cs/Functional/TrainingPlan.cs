using Functional.Training;

namespace Functional;

/// <summary>
/// A validated, immutable description of a fine-tuning run, made by <see cref="TrainerBuilder.Build"/>. Its settings
/// are read-only; <see cref="Fit()"/> and <see cref="FitAsync"/> run it. A plan can be run more than once (each run
/// needs an empty output folder unless the plan overwrites or resumes).
/// </summary>
public sealed class TrainingPlan
{
    private readonly FineTuneRequest request;
    private readonly FineTuneOptions settings;
    private readonly Action<TrainingProgress>? onProgress;
    private readonly Action<EvaluationProgress>? onEvaluation;
    private readonly Action<string>? onMessage;
    private readonly OptionNames names;

    /// <summary>A plan that runs the request made by <see cref="TrainerBuilder.Build"/>; settings is a copy of the
    /// builder's settings, for the plan's properties and <see cref="ToFineTuneOptions"/>.</summary>
    internal TrainingPlan(
        FineTuneRequest request, FineTuneOptions settings, Action<TrainingProgress>? onProgress,
        Action<EvaluationProgress>? onEvaluation, Action<string>? onMessage, OptionNames names)
    {
        this.request = request;
        this.settings = settings;
        this.onProgress = onProgress;
        this.onEvaluation = onEvaluation;
        this.onMessage = onMessage;
        this.names = names;
    }

    /// <summary>The model folder.</summary>
    public string ModelPath => settings.ModelPath;

    /// <summary>The training data file.</summary>
    public string DataPath => settings.DataPath;

    /// <summary>The evaluation data file, or null.</summary>
    public string? EvalDataPath => settings.EvalDataPath;

    /// <summary>The output folder.</summary>
    public string OutputPath => settings.OutputPath;

    /// <summary>AdamW or SGD.</summary>
    public OptimizerType Optimizer => settings.Optimizer;

    /// <summary>The peak learning rate.</summary>
    public double LearningRate => settings.LearningRate;

    /// <summary>Hugging Face's name of the learning-rate schedule, e.g. "cosine".</summary>
    public string ScheduleName => settings.LrSchedulerType;

    /// <summary>Warmup optimizer steps (0 when warmup is a ratio or absent).</summary>
    public int WarmupSteps => settings.NumWarmupSteps;

    /// <summary>Micro-batches per optimizer step.</summary>
    public int GradientAccumulationSteps => settings.GradientAccumulationSteps;

    /// <summary>Rows per micro-batch.</summary>
    public int PerDeviceTrainBatchSize => settings.PerDeviceTrainBatchSize;

    /// <summary>Optimizer steps of the run, or -1 when <see cref="NumTrainEpochs"/> decides.</summary>
    public int MaxSteps => settings.MaxSteps;

    /// <summary>Epochs of the run when <see cref="MaxSteps"/> is -1.</summary>
    public double NumTrainEpochs => settings.NumTrainEpochs;

    /// <summary>The gradient clipping norm (0: no clipping).</summary>
    public double MaxGradNorm => settings.MaxGradNorm;

    /// <summary>The LoRA rank of new adapters (0: none).</summary>
    public int LoraRank => settings.LoraDim;

    /// <summary>Every setting as the command line's options; a fresh copy on each call, so changing it leaves the
    /// plan as it is (it can be run with <see cref="FineTuning.Run(FineTuneOptions, CancellationToken, Action{TrainingProgress})"/>).</summary>
    public FineTuneOptions ToFineTuneOptions() => settings.Clone();

    /// <summary>The core's job description the plan runs, made once by <see cref="TrainerBuilder.Build"/>.</summary>
    internal FineTuneRequest Request => request;

    /// <summary>
    /// Runs the plan on this thread: checks the model folder, data and checkpoint (nothing is written before), then
    /// trains, calling the progress callbacks after each logged step (and the evaluation and message callbacks as
    /// they happen), and saves final/. Bad files raise
    /// <see cref="InvalidInputException"/> naming the file and line; settings that only the data can check (such as
    /// warmup longer than the run) name the builder call, as <see cref="TrainerBuilder.Build"/> does.
    /// </summary>
    public FineTuneResult Fit() => Fit(CancellationToken.None);

    /// <summary>As <see cref="Fit()"/>; cancelling the token finishes the current optimizer step, saves a checkpoint
    /// and returns a result with <see cref="FineTuneResult.Interrupted"/> set (final/ is not written).</summary>
    /// <param name="cancellationToken">Stops the run after the current step, with a checkpoint.</param>
    public FineTuneResult Fit(CancellationToken cancellationToken)
    {
        Runtime.TorchRuntime.ensure();
        try
        {
            return FineTuning.Run(request, cancellationToken, onProgress, onEvaluation, onMessage);
        }
        catch (InvalidInputException e) when (names.Renames(e))
        {
            throw names.Rename(e);
        }
    }

    /// <summary>As <see cref="Fit(CancellationToken)"/>, on a dedicated thread (a training step keeps to one thread).
    /// Cancelling the token finishes the current optimizer step, saves a checkpoint and completes the task with
    /// <see cref="FineTuneResult.Interrupted"/> set; the task is never cancelled.</summary>
    /// <param name="cancellationToken">Stops the run after the current step, with a checkpoint.</param>
    public Task<FineTuneResult> FitAsync(CancellationToken cancellationToken = default) =>
        Task.Factory.StartNew(
            () => Fit(cancellationToken), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
}
