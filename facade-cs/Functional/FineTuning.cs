using Functional.Training;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;

[assembly: System.Runtime.CompilerServices.InternalsVisibleTo("Functional.Cli")]
// The embedded demo runs a core job and reports it with the facade's types (Events, ToResult).
[assembly: System.Runtime.CompilerServices.InternalsVisibleTo("Functional.Demo")]
// The facade's C# tests check the request a plan keeps (TrainingPlan.Request).
[assembly: System.Runtime.CompilerServices.InternalsVisibleTo("Functional.Facade.Tests")]

namespace Functional;

/// <summary>What a fine-tuning run reports after each logged optimizer step.</summary>
/// <param name="Step">The optimizer step just taken, from 1.</param>
/// <param name="TotalSteps">The optimizer steps of the whole run.</param>
/// <param name="Epoch">Fractional epoch reached (HF's "epoch").</param>
/// <param name="Loss">The step's token-weighted mean loss over its accumulation window.</param>
/// <param name="LearningRate">The learning rate the step used.</param>
/// <param name="GradNorm">The global gradient norm before clipping.</param>
/// <param name="TokensPerSecond">Real (non-padding) tokens per second since this process started training.</param>
/// <param name="StartStep">The step this process started from: 0, or the step of the checkpoint it resumed from
/// (Step - StartStep steps were trained by this process).</param>
public readonly record struct TrainingProgress(
    int Step, int TotalSteps, double Epoch, double Loss, double LearningRate, double GradNorm, double TokensPerSecond,
    int StartStep = 0)
{
    /// <summary>The intra-op threads the step ran with; with the default thread setting it follows the cores that
    /// other programs leave free. 0 when not known.</summary>
    public int Threads { get; init; }

    /// <summary>The most threads the run may use: the fixed count, or the cores when the count adapts. 0 when not
    /// known.</summary>
    public int MaxThreads { get; init; }
}

/// <summary>An evaluation during a fine-tuning run.</summary>
/// <param name="Step">The optimizer step it follows (0: before training).</param>
/// <param name="Loss">Token-weighted evaluation loss.</param>
/// <param name="Perplexity">exp(Loss).</param>
/// <param name="ExactMatch">Fraction of scored samples answered exactly, in the evaluation before training when
/// scoring was asked for, else null (the result's <see cref="FineTuneResult.After"/> holds the closing score).</param>
public readonly record struct EvaluationProgress(int Step, double Loss, double Perplexity, double? ExactMatch)
{
    /// <summary>A task's own figures by name as metrics.jsonl writes them without eval_ (sequence classification:
    /// accuracy, macro_f1; reward model: accuracy, mean_margin); empty for causal language modelling, where
    /// perplexity applies instead.</summary>
    public IReadOnlyList<KeyValuePair<string, double>> Metrics { get; init; } = [];
}

/// <summary>Evaluation figures at one point of a run.</summary>
/// <param name="Loss">Token-weighted evaluation loss.</param>
/// <param name="Perplexity">exp(Loss).</param>
/// <param name="ExactMatch">Fraction of scored samples answered exactly, when scoring was asked for.</param>
public sealed record EvaluationFigures(double Loss, double Perplexity, double? ExactMatch)
{
    /// <summary>A task's own figures by name (see <see cref="EvaluationProgress.Metrics"/>).</summary>
    public IReadOnlyList<KeyValuePair<string, double>> Metrics { get; init; } = [];
}

/// <summary>The outcome of a finished run.</summary>
/// <param name="Steps">Optimizer steps of the run done, counting those before a resume (HF's global_step).</param>
/// <param name="FinalLoss">Loss of the last step.</param>
/// <param name="MetricsPath">The metrics.jsonl written.</param>
/// <param name="FinalModelPath">The HF model folder of the trained weights.</param>
/// <param name="PlotPath">The loss and learning-rate plot (PNG).</param>
/// <param name="Before">Evaluation before training, when there is an evaluation set.</param>
/// <param name="After">Evaluation after training, when there is an evaluation set.</param>
/// <param name="SkippedRows">Rows skipped as bad.</param>
/// <param name="TrainRuntime">Seconds in the training loop.</param>
/// <param name="Checkpoints">The checkpoint folders left in the output folder, oldest first.</param>
/// <param name="BestCheckpoint">The best checkpoint by the metric, if any.</param>
/// <param name="ResumedFrom">The checkpoint the run resumed from, if any.</param>
/// <param name="StoppedEarly">Early stopping ended the run.</param>
/// <param name="Interrupted">Cancellation ended the run after saving a checkpoint (final/ not written).</param>
/// <param name="Seconds">Wall-clock duration of the run.</param>
/// <param name="StartStep">The step this process started from: 0, or the step of the checkpoint it resumed from.</param>
/// <param name="TrainLoss">The mean of the per-step losses of the whole run, steps before a resume included (HF's
/// train_loss); NaN when no step was trained.</param>
public sealed record FineTuneResult(
    int Steps, double FinalLoss, string MetricsPath, string FinalModelPath, string PlotPath,
    EvaluationFigures? Before, EvaluationFigures? After, int SkippedRows, double TrainRuntime,
    IReadOnlyList<string> Checkpoints, string? BestCheckpoint, string? ResumedFrom, bool StoppedEarly, bool Interrupted,
    double Seconds, int StartStep, double TrainLoss);

/// <summary>Runs fine-tuning jobs described by <see cref="FineTuneOptions"/>.</summary>
public static class FineTuning
{
    /// <summary>
    /// Validates the options, the model folder and the data before anything is written, then trains and saves.
    /// Bad input raises <see cref="InvalidInputException"/> naming the option, file and line.
    /// </summary>
    /// <param name="options">What to train and how.</param>
    /// <param name="onProgress">Called after each logged optimizer step; may be null.</param>
    public static FineTuneResult Run(FineTuneOptions options, Action<TrainingProgress>? onProgress = null) =>
        Run(options, CancellationToken.None, onProgress);

    /// <summary>
    /// As <see cref="Run(FineTuneOptions, Action{TrainingProgress})"/>; cancelling the token finishes the current
    /// optimizer step, saves a checkpoint and returns a result with <see cref="FineTuneResult.Interrupted"/> set.
    /// </summary>
    /// <param name="options">What to train and how.</param>
    /// <param name="cancellation">Stops the run after the current step, with a checkpoint.</param>
    /// <param name="onProgress">Called after each logged optimizer step; may be null.</param>
    public static FineTuneResult Run(FineTuneOptions options, CancellationToken cancellation, Action<TrainingProgress>? onProgress = null) =>
        Run(options, cancellation, onProgress, null, null);

    /// <summary>
    /// As <see cref="Run(FineTuneOptions, CancellationToken, Action{TrainingProgress})"/>, also hearing every evaluation
    /// and the run's messages (which checkpoint a resume starts from, which newer ones it skipped and why).
    /// </summary>
    /// <param name="options">What to train and how.</param>
    /// <param name="cancellation">Stops the run after the current step, with a checkpoint.</param>
    /// <param name="onProgress">Called after each logged optimizer step; may be null.</param>
    /// <param name="onEvaluation">Called after each evaluation (before training, during it, at the last step); may be null.</param>
    /// <param name="onMessage">Called with each message line; may be null.</param>
    public static FineTuneResult Run(
        FineTuneOptions options, CancellationToken cancellation, Action<TrainingProgress>? onProgress,
        Action<EvaluationProgress>? onEvaluation, Action<string>? onMessage) =>
        Run(ToRequest(options), cancellation, onProgress, onEvaluation, onMessage);

    /// <summary>Runs a request made (and checked) by <see cref="ToRequest"/>.</summary>
    internal static FineTuneResult Run(
        FineTuneRequest request, CancellationToken cancellation, Action<TrainingProgress>? onProgress,
        Action<EvaluationProgress>? onEvaluation, Action<string>? onMessage) =>
        ToResult(FineTune.runObserved(request, cancellation, Events(onProgress, onEvaluation, onMessage)));

    /// <summary>The core's events for the facade's callbacks (null ones hear nothing).</summary>
    internal static FineTuneEvents Events(
        Action<TrainingProgress>? onProgress, Action<EvaluationProgress>? onEvaluation, Action<string>? onMessage) => new(
        onStep: FuncConvert.FromAction<StepLog>(log => onProgress?.Invoke(ToProgress(log))),
        onEvaluation: FuncConvert.FromAction<int, EvalFigures>((step, figures) => onEvaluation?.Invoke(new EvaluationProgress(
            step, figures.Eval.Loss, figures.Eval.Perplexity,
            FSharpOption<double>.get_IsNone(figures.ExactMatch) ? null : figures.ExactMatch.Value)
        {
            Metrics = MetricsOf(figures.Eval),
        })),
        onMessage: FuncConvert.FromAction<string>(line => onMessage?.Invoke(line)));

    /// <summary>
    /// The core's job description of the options, with every setting checked (the core's
    /// TrainOptions.validate and the facade's own rules). No file is read: adapter folders are read by the run.
    /// Raises <see cref="InvalidInputException"/> naming the command-line option.
    /// </summary>
    /// <param name="options">What to train and how.</param>
    /// <param name="prefixTokensGiven">The number of prefix tokens was given explicitly (the command line's
    /// --num-prefix-tokens), so it needs prefix tuning even when it equals the default.</param>
    internal static FineTuneRequest ToRequest(FineTuneOptions options, bool prefixTokensGiven = false)
    {
        ArgumentNullException.ThrowIfNull(options);
        var request = new FineTuneRequest(
            modelPath: Required(options.ModelPath, "--model"),
            dataPath: Required(options.DataPath, "--data"),
            outputPath: Required(options.OutputPath, "--output"),
            publishedOutputPath: FSharpOption<string>.None,
            overwriteOutputDir: options.OverwriteOutputDir,
            options: ToCore(options),
            data: ToData(options),
            resumeFromCheckpoint: Optional(options.ResumeFromCheckpoint),
            lora: ToLora(options),
            prefix: ToPrefix(options, prefixTokensGiven),
            gradientCheckpointing: options.GradientCheckpointing,
            modelHandling: ToModelHandling(options),
            task: ToTask(options),
            distributed: new DistributedSettings(options.ZeroStage, new Functional.Distributed.CollectiveBuckets(options.ReduceBucketSize, options.AllgatherBucketSize), Optional(options.Communicator), options.LogEachRank, options.TensorParallelDegree, options.PipelineParallelDegree),
            plot: Reporting.MetricsPlot.drawer);
        Functional.Distributed.ZeroStage.validate(options.ZeroStage);
        Functional.Distributed.CollectiveBucketsModule.validate(request.Distributed.Buckets);
        TrainOptionsModule.validate(request.Options);
        return request;
    }

    /// <summary>Dropout, vocabulary resize and shard size, checked.</summary>
    private static ModelSettings ToModelHandling(FineTuneOptions o)
    {
        if (o.ResizeTokenEmbeddingsToMultipleOf < 0)
        {
            throw new InvalidInputException("--resize-token-embeddings-to-multiple-of", "", $"must be >= 0 (0: resize only for added tokens), got {o.ResizeTokenEmbeddingsToMultipleOf}");
        }
        return new ModelSettings(
            disableDropout: o.DisableDropout,
            resizeTokenEmbeddingsToMultipleOf: o.ResizeTokenEmbeddingsToMultipleOf,
            maxShardSize: Checkpoint.WeightsFormatModule.parseSize("max_shard_size", o.MaxShardSize ?? "5GB"));
    }

    /// <summary>The facade's view of a training step.</summary>
    internal static TrainingProgress ToProgress(StepLog log) => new(
        log.Step, log.TotalSteps, log.Epoch, log.Loss, log.LearningRate, log.GradNorm, log.TokensPerSecond, log.StartStep)
    {
        Threads = log.Threads,
        MaxThreads = log.MaxThreads,
    };

    /// <summary>The facade's view of a finished run.</summary>
    internal static FineTuneResult ToResult(FineTuneOutcome r) => new(
        r.Steps, r.FinalLoss, r.MetricsPath, r.FinalModelPath, r.PlotPath,
        Figures(r.Before), Figures(r.After), r.SkippedRows, r.TrainRuntime,
        r.Checkpoints.ToList(), OptionalValue(r.BestCheckpoint), OptionalValue(r.ResumedFrom), r.StoppedEarly, r.Interrupted,
        r.Seconds, r.StartStep, r.TrainLoss);

    private static string? OptionalValue(FSharpOption<string> value) =>
        FSharpOption<string>.get_IsNone(value) ? null : value.Value;

    private static EvaluationFigures? Figures(FSharpOption<EvalFigures> figures) =>
        FSharpOption<EvalFigures>.get_IsNone(figures)
            ? null
            : new EvaluationFigures(
                figures.Value.Eval.Loss,
                figures.Value.Eval.Perplexity,
                FSharpOption<double>.get_IsNone(figures.Value.ExactMatch) ? null : figures.Value.ExactMatch.Value)
            {
                Metrics = MetricsOf(figures.Value.Eval),
            };

    private static IReadOnlyList<KeyValuePair<string, double>> MetricsOf(EvalResult eval) =>
        eval.Metrics.Select(m => new KeyValuePair<string, double>(m.Item1, m.Item2)).ToList();

    private static FSharpOption<T> Optional<T>(T? value) where T : class =>
        value is null ? FSharpOption<T>.None : FSharpOption<T>.Some(value);

    private static FSharpOption<LoraSettings> ToLora(FineTuneOptions o)
    {
        if (o.LoraDim == 0 && o.LoraAdapter is null)
        {
            var stray = o.OnlyOptimizeLora ? "--only-optimize-lora"
                : o.LoraLearningRate is not null ? "--lora-learning-rate"
                : o.LoraModuleName is not null ? "--lora-module-name"
                : o.LoraTargetModules is not null ? "--lora-target-modules"
                : null;
            return stray is null
                ? FSharpOption<LoraSettings>.None
                : throw new InvalidInputException(stray, "", "needs LoRA: --lora-dim > 0 or --lora-adapter PATH");
        }
        if (o.LoraDim < 0)
        {
            throw new InvalidInputException("--lora-dim", "", $"must be >= 0 (0: no LoRA), got {o.LoraDim}");
        }
        var targets = (o.LoraTargetModules ?? "").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        // With an adapter folder the run reads rank, alpha, dropout and targets from its adapter_config.json
        // (the core ignores Config then), so Build reads no file.
        return FSharpOption<LoraSettings>.Some(new LoraSettings(
            config: new Peft.LoraConfig(
                r: o.LoraDim, alpha: o.LoraAlpha, dropout: o.LoraDropout, targetModules: ListModule.OfSeq(targets),
                moduleNameSubstring: Optional(o.LoraModuleName)),
            onlyOptimizeLora: o.OnlyOptimizeLora,
            learningRate: o.LoraLearningRate is { } lr ? FSharpOption<double>.Some(lr) : FSharpOption<double>.None,
            adapterPath: Optional(o.LoraAdapter)));
    }

    private static FSharpOption<PrefixSettings> ToPrefix(FineTuneOptions o, bool tokensGiven)
    {
        var defaultTokens = Peft.PrefixTuning.DefaultNumVirtualTokens;
        if (!o.PrefixTuning && o.PrefixAdapter is null)
        {
            return o.NumPrefixTokens == defaultTokens && !tokensGiven
                ? FSharpOption<PrefixSettings>.None
                : throw new InvalidInputException("--num-prefix-tokens", "", "needs --prefix-tuning (or --prefix-adapter PATH)");
        }
        // A prefix adapter brings its own size: 0 asks the run to read it from the adapter folder (so Build
        // reads no file); a different explicit --num-prefix-tokens is refused by the core.
        var tokens = o.PrefixAdapter is not null && o.NumPrefixTokens == defaultTokens ? 0 : o.NumPrefixTokens;
        return FSharpOption<PrefixSettings>.Some(new PrefixSettings(numPrefixTokens: tokens, adapterPath: Optional(o.PrefixAdapter)));
    }

    internal static TrainingTask ToTask(FineTuneOptions o)
    {
        var pad = o.PadTokenId is long p ? FSharpOption<long>.Some(p) : FSharpOption<long>.None;
        if (o.PadTokenId is < 0)
        {
            throw new InvalidInputException("--pad-token-id", "", $"must be a token id >= 0, got {o.PadTokenId}");
        }
        switch (o.Task.Trim().ToLowerInvariant())
        {
            case "causal-lm":
                var stray = o.LabelField is not null ? "--label-field"
                    : o.ChosenField is not null ? "--chosen-field"
                    : o.RejectedField is not null ? "--rejected-field"
                    : o.NumLabels is not null ? "--num-labels"
                    : o.PadTokenId is not null ? "--pad-token-id"
                    : null;
                return stray is null
                    ? TrainingTask.CausalLm
                    : throw new InvalidInputException(stray, "", "needs --task sequence-classification or reward-model");
            case "sequence-classification":
                if (o.NumLabels is < 1)
                {
                    throw new InvalidInputException("--num-labels", "", $"must be >= 1, got {o.NumLabels}");
                }
                return TrainingTask.NewSequenceClassification(new ClassificationTask(
                    textField: o.TextField ?? "text",
                    labelField: o.LabelField ?? "label",
                    numLabels: o.NumLabels is int n ? FSharpOption<int>.Some(n) : FSharpOption<int>.None,
                    padTokenId: pad));
            case "reward-model":
                if (o.NumLabels is not null and not 1)
                {
                    throw new InvalidInputException("--num-labels", "", "a reward model has one label");
                }
                return TrainingTask.NewRewardModel(new RewardTask(
                    promptField: o.PromptField ?? "prompt",
                    chosenField: o.ChosenField ?? "chosen",
                    rejectedField: o.RejectedField ?? "rejected",
                    padTokenId: pad));
            default:
                throw new InvalidInputException("--task", "", $"expected causal-lm, sequence-classification or reward-model, got '{o.Task}'");
        }
    }

    internal static DataSettings ToData(FineTuneOptions o)
    {
        var trainOn = Data.PromptDataset.parseTrainOn(o.TrainOn);
        var defaults = Data.PromptDataset.defaults;
        var prompt = new Data.PromptDataOptions(
            format: Data.PromptDataset.parseFormat(o.DataFormat),
            fields: new Data.FieldMap(prompt: Optional(o.PromptField), answer: Optional(o.AnswerField), text: Optional(o.TextField)),
            maxSeqLen: defaults.MaxSeqLen,
            trainOn: trainOn,
            packing: o.Packing,
            packingAttention: Data.PromptDataset.parsePackingAttention(o.PackingAttention),
            addBos: o.AddBos is bool addBos ? FSharpOption<bool>.Some(addBos) : FSharpOption<bool>.None,
            skipBadRows: o.SkipBadRows,
            dataSplit: Optional(o.DataSplit),
            evalSplitRatio: o.EvalSplitRatio,
            seed: defaults.Seed,
            chatTemplateFile: Optional(o.ChatTemplate));
        if (o.ExactMatchSamples < 0)
        {
            throw new InvalidInputException("--exact-match-samples", "", $"must be >= 0, got {o.ExactMatchSamples}");
        }
        return new DataSettings(
            evalDataPath: Optional(o.EvalDataPath),
            prompt: prompt,
            tokenizerName: Optional(o.Tokenizer),
            cachePath: o.UseDataCache ? FSharpOption<string>.Some(FineTune.defaultCachePath()) : FSharpOption<string>.None,
            exactMatchSamples: o.ExactMatchSamples,
            exactMatchMaxNewTokens: FineTune.defaultData.ExactMatchMaxNewTokens);
    }

    private static string Required(string value, string option) =>
        string.IsNullOrWhiteSpace(value) ? throw new InvalidInputException(option, "", "is required") : value;

    private static TrainOptions ToCore(FineTuneOptions o)
    {
        var kind = Schedule.parseName(o.LrSchedulerType);
        if (FSharpOption<SchedulerKind>.get_IsNone(kind))
        {
            throw new InvalidInputException("--lr-scheduler-type", "", Schedule.unknownNameProblem(o.LrSchedulerType));
        }
        var scheduleOptions = o.LrSchedulerKwargs is null
            ? ScheduleOptions.Defaults
            : SchedulerKwargs.parse("--lr-scheduler-kwargs", o.LrSchedulerKwargs);
        var options = TrainOptionsModule.create(
            perDeviceTrainBatchSize: o.PerDeviceTrainBatchSize,
            gradientAccumulationSteps: o.GradientAccumulationSteps,
            learningRate: o.LearningRate,
            weightDecay: o.WeightDecay,
            adamBeta1: o.AdamBeta1,
            adamBeta2: o.AdamBeta2,
            adamEpsilon: o.AdamEpsilon,
            optimizer: o.Optimizer switch
            {
                OptimizerType.Sgd => OptimizerKind.Sgd,
                OptimizerType.Adafactor => OptimizerKind.Adafactor,
                OptimizerType.Lion => OptimizerKind.Lion,
                OptimizerType.RmsProp => OptimizerKind.RmsProp,
                _ => OptimizerKind.AdamW,
            },
            momentum: o.Momentum,
            nesterov: o.Nesterov,
            lrSchedulerType: kind.Value,
            lrSchedulerOptions: scheduleOptions,
            numWarmupSteps: o.NumWarmupSteps,
            warmupRatio: o.WarmupRatio,
            numTrainEpochs: o.NumTrainEpochs,
            maxSteps: o.MaxSteps,
            maxGradNorm: o.MaxGradNorm,
            maxSeqLen: o.MaxSeqLen,
            seed: o.Seed,
            shuffle: !o.NoShuffle,
            loggingSteps: o.LoggingSteps,
            threads: o.Threads,
            evalSteps: o.EvalSteps,
            perDeviceEvalBatchSize: o.PerDeviceEvalBatchSize,
            evalStrategy: o.EvalStrategy is null ? FSharpOption<IntervalStrategy>.None : FSharpOption<IntervalStrategy>.Some(TrainOptionsModule.parseStrategy("--eval-strategy", o.EvalStrategy)),
            saveStrategy: TrainOptionsModule.parseStrategy("--save-strategy", o.SaveStrategy),
            saveSteps: o.SaveSteps,
            saveTotalLimit: o.SaveTotalLimit,
            metricForBestModel: o.MetricForBestModel,
            greaterIsBetter: o.GreaterIsBetter,
            loadBestModelAtEnd: o.LoadBestModelAtEnd,
            earlyStoppingPatience: o.EarlyStoppingPatience,
            precision: TrainOptionsModule.precision(o.Bf16, o.Fp16, new Optim.LossScalerConfig(
                lossScale: o.LossScale, initialScalePower: o.InitialScalePower, lossScaleWindow: o.LossScaleWindow,
                hysteresis: o.Hysteresis, consecutiveHysteresis: Optim.LossScaler.defaults.ConsecutiveHysteresis,
                minLossScale: o.MinLossScale)),
            loggingStrategy: TrainOptionsModule.parseStrategy("--logging-strategy", o.LoggingStrategy),
            reportToTensorBoard: o.ReportToTensorBoard,
            loggingDir: o.LoggingDir,
            lossChunkSize: o.LossChunkSize,
            dampening: o.Dampening,
            amsgrad: o.Amsgrad,
            maximize: o.Maximize,
            rmsPropAlpha: o.RmsPropAlpha,
            rmsPropEpsilon: o.RmsPropEpsilon,
            rmsPropCentered: o.RmsPropCentered,
            adafactorClipThreshold: o.AdafactorClipThreshold,
            adafactorDecayRate: o.AdafactorDecayRate,
            adafactorScaleParameter: o.AdafactorScaleParameter);
        return o.OptimArgs is null ? options : OptimizerArgs.apply("{optim_args}", o.OptimArgs, options);
    }
}
