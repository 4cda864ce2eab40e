namespace Functional;

/// <summary>Where a setting is made in a <see cref="TrainerBuilder"/>: the method and its argument or options property.</summary>
/// <param name="Method">The builder method, e.g. "AccumulateGradients".</param>
/// <param name="Field">The argument or options property, e.g. "steps" or "Beta2"; empty for the method itself.</param>
internal readonly record struct BuilderOption(string Method, string Field);

/// <summary>
/// Renames the command-line options that the shared validation (the core's TrainOptions.validate, FineTuning and the
/// training run) reports into the builder calls that set them, so one set of rules serves both the command line and
/// the builder. A builder method records which option it set (the learning rate comes from UseAdamW or UseSgd);
/// options no call has set are named after the method that sets them.
/// </summary>
internal sealed class OptionNames
{
    private static readonly Dictionary<string, BuilderOption> Defaults = new()
    {
        ["--model"] = new("UseModel", ""),
        ["--data"] = new("UseData", ""),
        ["--output"] = new("UseOutput", ""),
        ["--overwrite-output-dir"] = new("UseOutput", "overwrite"),
        ["--eval-data"] = new("UseEvalData", ""),
        ["--tokenizer"] = new("UseTokenizer", ""),
        ["--data-format"] = new("UseData", nameof(DataOptions.Format)),
        ["--prompt-field"] = new("UseData", nameof(DataOptions.PromptField)),
        ["--answer-field"] = new("UseData", nameof(DataOptions.AnswerField)),
        ["--text-field"] = new("UseData", nameof(DataOptions.TextField)),
        ["--train-on"] = new("UseData", nameof(DataOptions.TrainOn)),
        ["--chat-template"] = new("UseData", nameof(DataOptions.ChatTemplate)),
        ["--packing"] = new("UseData", nameof(DataOptions.Packing)),
        ["--packing-attention"] = new("UseData", nameof(DataOptions.PackingAttention)),
        ["--add-bos"] = new("UseData", nameof(DataOptions.AddBos)),
        ["--no-add-bos"] = new("UseData", nameof(DataOptions.AddBos)),
        ["--skip-bad-rows"] = new("UseData", nameof(DataOptions.SkipBadRows)),
        ["--data-split"] = new("UseData", nameof(DataOptions.DataSplit)),
        ["--eval-split-ratio"] = new("UseData", nameof(DataOptions.EvalSplitRatio)),
        ["--max-seq-len"] = new("UseData", nameof(DataOptions.MaxSequenceLength)),
        ["--no-shuffle"] = new("UseData", nameof(DataOptions.Shuffle)),
        ["--no-data-cache"] = new("UseData", nameof(DataOptions.UseCache)),
        ["--eval-steps"] = new("UseEvaluation", "everySteps"),
        ["--eval-strategy"] = new("UseEvaluation", nameof(EvaluationOptions.Strategy)),
        ["--per-device-eval-batch-size"] = new("UseEvaluation", nameof(EvaluationOptions.BatchSize)),
        ["--exact-match-samples"] = new("UseEvaluation", nameof(EvaluationOptions.ExactMatchSamples)),
        ["--learning-rate"] = new("UseAdamW", "learningRate"),
        ["--weight-decay"] = new("UseAdamW", nameof(AdamWOptions.WeightDecay)),
        ["--adam-beta1"] = new("UseAdamW", nameof(AdamWOptions.Beta1)),
        ["--adam-beta2"] = new("UseAdamW", nameof(AdamWOptions.Beta2)),
        ["--adam-epsilon"] = new("UseAdamW", nameof(AdamWOptions.Epsilon)),
        ["--momentum"] = new("UseSgd", nameof(SgdOptions.Momentum)),
        ["--nesterov"] = new("UseSgd", nameof(SgdOptions.Nesterov)),
        ["--dampening"] = new("UseSgd", nameof(SgdOptions.Dampening)),
        ["--amsgrad"] = new("UseAdamW", nameof(AdamWOptions.Amsgrad)),
        ["--maximize"] = new("UseAdamW", nameof(AdamWOptions.Maximize)),
        ["--optim-args"] = new("UseOptimizerArgs", "optimArgs"),
        ["--tensor-parallel-degree"] = new("UseDistributed", nameof(DistributedOptions.TensorParallelDegree)),
        ["--pipeline-parallel-degree"] = new("UseDistributed", nameof(DistributedOptions.PipelineParallelDegree)),
        ["--lr-scheduler-type"] = new("UseSchedule", nameof(LearningRateScheduleOptions.Name)),
        ["--lr-scheduler-kwargs"] = new("UseSchedule", nameof(LearningRateScheduleOptions.Kwargs)),
        ["--num-warmup-steps"] = new("UseSchedule", nameof(LearningRateScheduleOptions.WarmupSteps)),
        ["--warmup-ratio"] = new("UseSchedule", nameof(LearningRateScheduleOptions.WarmupRatio)),
        ["--gradient-accumulation-steps"] = new("AccumulateGradients", "steps"),
        ["--max-grad-norm"] = new("ClipGradients", "maxNorm"),
        ["--per-device-train-batch-size"] = new("UseBatchSize", "perDevice"),
        ["--max-steps"] = new("TrainForSteps", "steps"),
        ["--num-train-epochs"] = new("TrainForEpochs", "epochs"),
        ["--seed"] = new("UseSeed", ""),
        ["--threads"] = new("UseThreads", ""),
        ["--logging-steps"] = new("UseLogging", "everySteps"),
        ["--logging-strategy"] = new("UseLogging", "strategy"),
        ["--logging-dir"] = new("UseTensorBoard", "folder"),
        ["--bf16"] = new("UseBf16", ""),
        ["--fp16"] = new("UseFp16", ""),
        ["--loss-scale"] = new("UseFp16", nameof(LossScaleOptions.StaticScale)),
        ["--initial-scale-power"] = new("UseFp16", nameof(LossScaleOptions.InitialScalePower)),
        ["--loss-scale-window"] = new("UseFp16", nameof(LossScaleOptions.Window)),
        ["--hysteresis"] = new("UseFp16", nameof(LossScaleOptions.Hysteresis)),
        ["--min-loss-scale"] = new("UseFp16", nameof(LossScaleOptions.MinScale)),
        ["--gradient-checkpointing"] = new("UseGradientCheckpointing", ""),
        ["--loss-chunk-size"] = new("UseLossChunkSize", "positions"),
        ["--disable-dropout"] = new("DisableDropout", ""),
        ["--resize-token-embeddings-to-multiple-of"] = new("ResizeTokenEmbeddingsToMultipleOf", "multiple"),
        ["--max-shard-size"] = new("UseMaxShardSize", "size"),
        ["--lora-dim"] = new("UseLora", "rank"),
        ["--lora-alpha"] = new("UseLora", nameof(LoraOptions.Alpha)),
        ["--lora-dropout"] = new("UseLora", nameof(LoraOptions.Dropout)),
        ["--lora-module-name"] = new("UseLora", nameof(LoraOptions.ModuleName)),
        ["--lora-target-modules"] = new("UseLora", nameof(LoraOptions.TargetModules)),
        ["--only-optimize-lora"] = new("UseLora", nameof(LoraOptions.OnlyOptimizeLora)),
        ["--lora-learning-rate"] = new("UseLora", nameof(LoraOptions.LearningRate)),
        ["--lora-adapter"] = new("UseLoraAdapter", "folder"),
        ["--prefix-tuning"] = new("UsePrefixTuning", ""),
        ["--num-prefix-tokens"] = new("UsePrefixTuning", "numPrefixTokens"),
        ["--prefix-adapter"] = new("UsePrefixAdapter", "folder"),
        ["--save-strategy"] = new("UseCheckpoints", nameof(CheckpointOptions.Strategy)),
        ["--save-steps"] = new("UseCheckpoints", "everySteps"),
        ["--save-total-limit"] = new("UseCheckpoints", nameof(CheckpointOptions.TotalLimit)),
        ["--metric-for-best-model"] = new("UseCheckpoints", nameof(CheckpointOptions.Metric)),
        ["--greater-is-better"] = new("UseCheckpoints", nameof(CheckpointOptions.GreaterIsBetter)),
        ["--load-best-model-at-end"] = new("UseCheckpoints", nameof(CheckpointOptions.LoadBestModelAtEnd)),
        ["--early-stopping-patience"] = new("UseCheckpoints", nameof(CheckpointOptions.EarlyStoppingPatience)),
        ["--resume-from-checkpoint"] = new("ResumeFrom", ""),
        ["--task"] = new("UseTask", "task"),
        ["--label-field"] = new("UseTask", nameof(TaskOptions.LabelField)),
        ["--chosen-field"] = new("UseTask", nameof(TaskOptions.ChosenField)),
        ["--rejected-field"] = new("UseTask", nameof(TaskOptions.RejectedField)),
        ["--num-labels"] = new("UseTask", nameof(TaskOptions.NumLabels)),
        ["--pad-token-id"] = new("UseTask", nameof(TaskOptions.PadTokenId)),
    };

    private readonly Dictionary<string, BuilderOption> names;

    /// <summary>Names after the builder (commandLine false) or keeps the command line's option names (true).</summary>
    public OptionNames(bool commandLine)
    {
        CommandLine = commandLine;
        names = new Dictionary<string, BuilderOption>(Defaults);
    }

    private OptionNames(bool commandLine, Dictionary<string, BuilderOption> names)
    {
        CommandLine = commandLine;
        this.names = new Dictionary<string, BuilderOption>(names);
    }

    /// <summary>True: errors keep the command line's option names (the `functional train` command).</summary>
    public bool CommandLine { get; }

    /// <summary>Records that the command-line option is set by this builder method's argument or property.</summary>
    public void Set(string option, string method, string field) => names[option] = new BuilderOption(method, field);

    /// <summary>An independent copy, for a plan that must not change when its builder does.</summary>
    public OptionNames Copy() => new(CommandLine, names);

    /// <summary>Whether <see cref="Rename"/> gives another exception for this one.</summary>
    public bool Renames(InvalidInputException error) =>
        (!CommandLine && names.ContainsKey(FlagOf(error))) || error.Render(CommandLineFlags.Of).Message != error.Message;

    /// <summary>The command-line option the error's origin is: the flag of its setting, else the origin itself.</summary>
    private static string FlagOf(InvalidInputException error) =>
        error.Setting is { } setting ? CommandLineFlags.Of(setting) : error.Origin;

    /// <summary>
    /// The error with the builder's names: origin = the method, location = its argument or options property
    /// (followed by the error's own location, e.g. a JSON key), and the command-line option added to the problem.
    /// Errors about files, and every error in command-line mode, come back with the settings they mention named by
    /// their command-line options.
    /// </summary>
    public InvalidInputException Rename(InvalidInputException error)
    {
        var flag = FlagOf(error);
        error = error.Render(CommandLineFlags.Of);
        if (CommandLine || !names.ContainsKey(flag))
        {
            return error;
        }
        var option = names[flag];
        var location = (option.Field, error.Location) switch
        {
            ("", var own) => own,
            (var field, "") => field,
            (var field, var own) => $"{field}.{own}",
        };
        return new InvalidInputException(option.Method, location, $"{error.Problem} (command line: {error.Origin})");
    }
}
