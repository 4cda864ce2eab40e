using Functional.Training;

namespace Functional;

/// <summary>
/// Describes a fine-tuning run step by step, as the <c>functional train</c> command does with options; every
/// method returns the builder. Each feature has a short overload and one taking an <c>Action</c> on its options
/// class, whose properties document their defaults. A later call of the same method replaces the earlier one
/// (UseAdamW and UseSgd replace each other, as do the schedule methods and TrainForSteps / TrainForEpochs).
/// Nothing is checked until <see cref="Build"/>, which validates every setting and returns an immutable
/// <see cref="TrainingPlan"/>. Settings not made keep the command line's defaults (AdamW at 5e-5, linear
/// schedule, batch size 8, 3 epochs, clipping at 1.0, a checkpoint every 500 steps, seed 42).
/// </summary>
public sealed class TrainerBuilder
{
    private readonly FineTuneOptions settings = new();
    private readonly OptionNames names;
    private Action<TrainingProgress>? onProgress;
    private Action<EvaluationProgress>? onEvaluation;
    private Action<string>? onMessage;
    private int? loraRank;
    private bool loraAdapter;
    private bool trainsForSteps;
    private bool prefixTokensGiven;
    private bool built;

    /// <summary>A builder whose errors name builder calls, or (commandLine true, for the `functional train` command)
    /// the command line's options.</summary>
    internal TrainerBuilder(bool commandLine)
    {
        names = new OptionNames(commandLine);
    }

    /// <summary>The Hugging Face model folder to fine-tune: config.json + model.safetensors (or a sharded index),
    /// GPT-2, LLaMA, Qwen2, Qwen3, Mistral, OPT or BLOOM; its tokenizer files are used for text data (--model). Required.</summary>
    /// <param name="folder">The model folder.</param>
    public TrainerBuilder UseModel(string folder)
    {
        settings.ModelPath = NotNull(folder);
        return this;
    }

    /// <summary>A tiktoken encoding, "cl100k_base" or "o200k_base", instead of the model folder's tokenizer
    /// (--tokenizer).</summary>
    /// <param name="encoding">The encoding's name.</param>
    public TrainerBuilder UseTokenizer(string encoding)
    {
        settings.Tokenizer = NotNull(encoding);
        return this;
    }

    /// <summary>The training data, JSON or JSON Lines, read with <see cref="DataOptions"/>' defaults (--data). Required.</summary>
    /// <param name="file">DeepSpeed-Chat prompt/chosen, phoenix, Alpaca, plain-text or pre-tokenized input_ids rows.</param>
    public TrainerBuilder UseData(string file) => UseData(file, _ => { });

    /// <summary>The training data and how it becomes token rows (--data and the data options). Required.</summary>
    /// <param name="file">DeepSpeed-Chat prompt/chosen, phoenix, Alpaca, plain-text or pre-tokenized input_ids rows.</param>
    /// <param name="configure">Sets format, fields, train-on, packing, bos, split, max sequence length, cache.</param>
    public TrainerBuilder UseData(string file, Action<DataOptions> configure)
    {
        var o = Configure(configure);
        settings.DataPath = NotNull(file);
        settings.DataFormat = o.Format;
        settings.PromptField = o.PromptField;
        settings.AnswerField = o.AnswerField;
        settings.TextField = o.TextField;
        settings.TrainOn = o.TrainOn;
        settings.ChatTemplate = o.ChatTemplate;
        settings.Packing = o.Packing;
        settings.PackingAttention = o.PackingAttention;
        settings.AddBos = o.AddBos;
        settings.SkipBadRows = o.SkipBadRows;
        settings.DataSplit = o.DataSplit;
        settings.EvalSplitRatio = o.EvalSplitRatio;
        settings.MaxSeqLen = o.MaxSequenceLength;
        settings.NoShuffle = !o.Shuffle;
        settings.UseDataCache = o.UseCache;
        return this;
    }

    /// <summary>A separate evaluation file in the training data's format (--eval-data); the run is evaluated before
    /// its first and after its last step, and as <see cref="UseEvaluation(int, Action{EvaluationOptions})"/> says.</summary>
    /// <param name="file">The evaluation rows.</param>
    public TrainerBuilder UseEvalData(string file)
    {
        settings.EvalDataPath = NotNull(file);
        return this;
    }

    /// <summary>Evaluates every <paramref name="everySteps"/> optimizer steps (--eval-steps); needs an evaluation set.</summary>
    /// <param name="everySteps">Optimizer steps between evaluations; 0 evaluates only at the end.</param>
    public TrainerBuilder UseEvaluation(int everySteps) => UseEvaluation(everySteps, _ => { });

    /// <summary>Evaluation during the run: interval, strategy, batch size and exact-match scoring.</summary>
    /// <param name="everySteps">Optimizer steps between evaluations with the "steps" strategy (--eval-steps).</param>
    /// <param name="configure">Sets strategy, batch size and exact-match samples.</param>
    public TrainerBuilder UseEvaluation(int everySteps, Action<EvaluationOptions> configure)
    {
        var o = Configure(configure);
        settings.EvalSteps = everySteps;
        settings.EvalStrategy = o.Strategy;
        settings.PerDeviceEvalBatchSize = o.BatchSize;
        settings.ExactMatchSamples = o.ExactMatchSamples;
        return this;
    }

    /// <summary>The output folder: metrics.jsonl, TensorBoard events, loss.png, checkpoints and final/ (--output). Required.</summary>
    /// <param name="folder">The folder; it must be empty or absent unless <paramref name="overwrite"/> is true.</param>
    /// <param name="overwrite">Write into a folder that is not empty (--overwrite-output-dir).</param>
    public TrainerBuilder UseOutput(string folder, bool overwrite = false)
    {
        settings.OutputPath = NotNull(folder);
        settings.OverwriteOutputDir = overwrite;
        return this;
    }

    /// <summary>torch.optim.AdamW with <see cref="AdamWOptions"/>' defaults (the default optimizer).</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate; default 5e-5).</param>
    public TrainerBuilder UseAdamW(double learningRate) => UseAdamW(learningRate, _ => { });

    /// <summary>torch.optim.AdamW (--optimizer adamw).</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate; default 5e-5).</param>
    /// <param name="configure">Sets betas, epsilon and weight decay.</param>
    public TrainerBuilder UseAdamW(double learningRate, Action<AdamWOptions> configure)
    {
        var o = Configure(configure);
        var sgd = new SgdOptions();
        settings.Optimizer = OptimizerType.AdamW;
        settings.LearningRate = learningRate;
        settings.AdamBeta1 = o.Beta1;
        settings.AdamBeta2 = o.Beta2;
        settings.AdamEpsilon = o.Epsilon;
        settings.WeightDecay = o.WeightDecay;
        settings.Momentum = sgd.Momentum;
        settings.Nesterov = sgd.Nesterov;
        settings.Dampening = sgd.Dampening;
        settings.Amsgrad = o.Amsgrad;
        settings.Maximize = o.Maximize;
        names.Set("--learning-rate", nameof(UseAdamW), nameof(learningRate));
        names.Set("--weight-decay", nameof(UseAdamW), nameof(AdamWOptions.WeightDecay));
        return this;
    }

    /// <summary>torch.optim.SGD without momentum or weight decay.</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate).</param>
    public TrainerBuilder UseSgd(double learningRate) => UseSgd(learningRate, _ => { });

    /// <summary>torch.optim.SGD (--optimizer sgd).</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate).</param>
    /// <param name="configure">Sets momentum, Nesterov and weight decay.</param>
    public TrainerBuilder UseSgd(double learningRate, Action<SgdOptions> configure)
    {
        var o = Configure(configure);
        var adam = new AdamWOptions();
        settings.Optimizer = OptimizerType.Sgd;
        settings.LearningRate = learningRate;
        settings.Momentum = o.Momentum;
        settings.Nesterov = o.Nesterov;
        settings.Dampening = o.Dampening;
        settings.Amsgrad = adam.Amsgrad;
        settings.Maximize = adam.Maximize;
        settings.WeightDecay = o.WeightDecay;
        settings.AdamBeta1 = adam.Beta1;
        settings.AdamBeta2 = adam.Beta2;
        settings.AdamEpsilon = adam.Epsilon;
        names.Set("--learning-rate", nameof(UseSgd), nameof(learningRate));
        names.Set("--weight-decay", nameof(UseSgd), nameof(SgdOptions.WeightDecay));
        return this;
    }

    /// <summary>The optimizer settings other than the kind and the learning rate, back to their defaults.</summary>
    private void ResetOptimizerSettings(OptimizerType kind, double learningRate, double weightDecay)
    {
        var adam = new AdamWOptions();
        var sgd = new SgdOptions();
        settings.Optimizer = kind;
        settings.LearningRate = learningRate;
        settings.WeightDecay = weightDecay;
        settings.AdamBeta1 = adam.Beta1;
        settings.AdamBeta2 = adam.Beta2;
        settings.AdamEpsilon = adam.Epsilon;
        settings.Amsgrad = adam.Amsgrad;
        settings.Maximize = adam.Maximize;
        settings.Momentum = sgd.Momentum;
        settings.Nesterov = sgd.Nesterov;
        settings.Dampening = sgd.Dampening;
        var defaults = new FineTuneOptions();
        settings.RmsPropAlpha = defaults.RmsPropAlpha;
        settings.RmsPropEpsilon = defaults.RmsPropEpsilon;
        settings.RmsPropCentered = defaults.RmsPropCentered;
        settings.AdafactorClipThreshold = defaults.AdafactorClipThreshold;
        settings.AdafactorDecayRate = defaults.AdafactorDecayRate;
        settings.AdafactorScaleParameter = defaults.AdafactorScaleParameter;
    }

    /// <summary>Lion (HF's optim="lion_32bit"): p = p (1 - lr wd) - lr sign(b1 m + (1 - b1) g), then
    /// m = b2 m + (1 - b2) g (--optim lion_32bit).</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate).</param>
    /// <param name="beta1">The interpolation factor of the update (--adam-beta1, as HF Trainer passes it).</param>
    /// <param name="beta2">The decay rate of the momentum (--adam-beta2; Lion's published default 0.99, HF
    /// Trainer's adam_beta2 default 0.999).</param>
    /// <param name="weightDecay">Decoupled weight decay, never applied to biases and normalization weights (--weight-decay).</param>
    public TrainerBuilder UseLion(double learningRate, double beta1 = 0.9, double beta2 = 0.99, double weightDecay = 0.0)
    {
        ResetOptimizerSettings(OptimizerType.Lion, learningRate, weightDecay);
        settings.AdamBeta1 = beta1;
        settings.AdamBeta2 = beta2;
        names.Set("--learning-rate", nameof(UseLion), nameof(learningRate));
        names.Set("--weight-decay", nameof(UseLion), nameof(weightDecay));
        names.Set("--adam-beta1", nameof(UseLion), nameof(beta1));
        names.Set("--adam-beta2", nameof(UseLion), nameof(beta2));
        return this;
    }

    /// <summary>transformers' Adafactor as HF Trainer's optim="adafactor" makes it: factored second moments for
    /// parameters of two or more dimensions, no first moment, update clipping at RMS 1, the scheduled learning rate
    /// (--optim adafactor).</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate).</param>
    /// <param name="weightDecay">Decoupled weight decay, never applied to biases and normalization weights (--weight-decay).</param>
    /// <param name="clipThreshold">The update's RMS is capped at this (transformers' clip_threshold; --optim-args clip_threshold=).</param>
    /// <param name="decayRate">beta2 at step t is 1 - t^decayRate (transformers' decay_rate; --optim-args decay_rate=).</param>
    /// <param name="scaleParameter">Scale each step by max(1e-3, RMS(p)) (transformers' scale_parameter, off in HF Trainer;
    /// --optim-args scale_parameter=).</param>
    public TrainerBuilder UseAdafactor(double learningRate, double weightDecay = 0.0, double clipThreshold = 1.0, double decayRate = -0.8, bool scaleParameter = false)
    {
        ResetOptimizerSettings(OptimizerType.Adafactor, learningRate, weightDecay);
        settings.AdafactorClipThreshold = clipThreshold;
        settings.AdafactorDecayRate = decayRate;
        settings.AdafactorScaleParameter = scaleParameter;
        names.Set("--learning-rate", nameof(UseAdafactor), nameof(learningRate));
        names.Set("--weight-decay", nameof(UseAdafactor), nameof(weightDecay));
        return this;
    }

    /// <summary>torch.optim.RMSprop, by default with torch's alpha 0.99, eps 1e-8, not centered (--optim rmsprop).</summary>
    /// <param name="learningRate">The peak learning rate (--learning-rate).</param>
    /// <param name="momentum">The momentum factor (--momentum).</param>
    /// <param name="weightDecay">Weight decay, coupled (L2) as torch.optim.RMSprop, never applied to biases and
    /// normalization weights (--weight-decay).</param>
    /// <param name="alpha">The square average's smoothing constant (torch's alpha; --optim-args alpha=).</param>
    /// <param name="epsilon">Added to the root of the square average (torch's eps; --optim-args eps=).</param>
    /// <param name="centered">Divide by the centered second moment (torch's centered; --optim-args centered=).</param>
    public TrainerBuilder UseRmsProp(double learningRate, double momentum = 0.0, double weightDecay = 0.0, double alpha = 0.99, double epsilon = 1e-8, bool centered = false)
    {
        ResetOptimizerSettings(OptimizerType.RmsProp, learningRate, weightDecay);
        settings.Momentum = momentum;
        settings.RmsPropAlpha = alpha;
        settings.RmsPropEpsilon = epsilon;
        settings.RmsPropCentered = centered;
        names.Set("--learning-rate", nameof(UseRmsProp), nameof(learningRate));
        names.Set("--weight-decay", nameof(UseRmsProp), nameof(weightDecay));
        names.Set("--momentum", nameof(UseRmsProp), nameof(momentum));
        return this;
    }

    /// <summary>HF's optim_args (--optim-args): constructor keywords of the chosen optimizer as "key=value,key=value",
    /// applied over what the Use* optimizer call set: adamw amsgrad, maximize; sgd dampening, nesterov; rmsprop alpha,
    /// eps, centered; adafactor clip_threshold, decay_rate, scale_parameter. An unknown key, or one its own setting
    /// sets (lr, weight_decay, betas, momentum), is refused when the trainer is built.</summary>
    /// <param name="optimArgs">The pairs, e.g. "alpha=0.9,centered=True"; null or blank: none.</param>
    public TrainerBuilder UseOptimizerArgs(string? optimArgs)
    {
        settings.OptimArgs = string.IsNullOrWhiteSpace(optimArgs) ? null : optimArgs;
        return this;
    }

    /// <summary>Linear warmup, then linear decay to 0 (HF's get_linear_schedule_with_warmup; the default).</summary>
    /// <param name="warmupSteps">Optimizer steps of linear warmup from 0 (--num-warmup-steps).</param>
    public TrainerBuilder UseLinearSchedule(int warmupSteps = 0) => UseNamedSchedule(nameof(UseLinearSchedule), "linear", warmupSteps);

    /// <summary>Linear warmup, then half a cosine down to 0 (HF's get_cosine_schedule_with_warmup).</summary>
    /// <param name="warmupSteps">Optimizer steps of linear warmup from 0 (--num-warmup-steps).</param>
    public TrainerBuilder UseCosineSchedule(int warmupSteps = 0) => UseNamedSchedule(nameof(UseCosineSchedule), "cosine", warmupSteps);

    /// <summary>A constant learning rate, after a linear warmup when <paramref name="warmupSteps"/> is not 0
    /// (HF's constant and constant_with_warmup).</summary>
    /// <param name="warmupSteps">Optimizer steps of linear warmup from 0 (--num-warmup-steps).</param>
    public TrainerBuilder UseConstantSchedule(int warmupSteps = 0) =>
        UseNamedSchedule(nameof(UseConstantSchedule), warmupSteps == 0 ? "constant" : "constant_with_warmup", warmupSteps);

    /// <summary>Any of Hugging Face's schedules by name, with warmup in steps or as a ratio and the schedule's
    /// parameters (--lr-scheduler-type, --num-warmup-steps, --warmup-ratio, --lr-scheduler-kwargs).</summary>
    /// <param name="configure">Sets name, warmup and parameters.</param>
    public TrainerBuilder UseSchedule(Action<LearningRateScheduleOptions> configure)
    {
        var o = Configure(configure);
        settings.LrSchedulerType = o.Name;
        settings.NumWarmupSteps = o.WarmupSteps;
        settings.WarmupRatio = o.WarmupRatio;
        settings.LrSchedulerKwargs = o.Kwargs;
        names.Set("--lr-scheduler-type", nameof(UseSchedule), nameof(LearningRateScheduleOptions.Name));
        names.Set("--num-warmup-steps", nameof(UseSchedule), nameof(LearningRateScheduleOptions.WarmupSteps));
        return this;
    }

    /// <summary>Micro-batches per optimizer step; the step's loss is token-weighted over the whole window
    /// (--gradient-accumulation-steps; default 1).</summary>
    /// <param name="steps">Micro-batches per optimizer step, at least 1.</param>
    public TrainerBuilder AccumulateGradients(int steps)
    {
        settings.GradientAccumulationSteps = steps;
        return this;
    }

    /// <summary>Clips gradients to this global norm before each update, as torch's clip_grad_norm_
    /// (--max-grad-norm; default 1.0).</summary>
    /// <param name="maxNorm">The largest global gradient norm; 0 turns clipping off.</param>
    public TrainerBuilder ClipGradients(double maxNorm)
    {
        settings.MaxGradNorm = maxNorm;
        return this;
    }

    /// <summary>Rows per micro-batch (--per-device-train-batch-size; default 8).</summary>
    /// <param name="perDevice">Rows per micro-batch, at least 1.</param>
    public TrainerBuilder UseBatchSize(int perDevice)
    {
        settings.PerDeviceTrainBatchSize = perDevice;
        return this;
    }

    /// <summary>Trains for this many optimizer steps; the data restarts after each epoch (--max-steps).</summary>
    /// <param name="steps">Optimizer steps, at least 1.</param>
    public TrainerBuilder TrainForSteps(int steps)
    {
        settings.MaxSteps = steps;
        trainsForSteps = true;
        return this;
    }

    /// <summary>Trains for this many epochs, which may be fractional (--num-train-epochs; the default is 3).</summary>
    /// <param name="epochs">Epochs, above 0.</param>
    public TrainerBuilder TrainForEpochs(double epochs)
    {
        settings.NumTrainEpochs = epochs;
        settings.MaxSteps = -1;
        trainsForSteps = false;
        return this;
    }

    /// <summary>Seeds weight initialization, dropout and shuffling: the same seed gives the same run (--seed; default 42).</summary>
    /// <param name="seed">The seed.</param>
    public TrainerBuilder UseSeed(long seed)
    {
        settings.Seed = seed;
        return this;
    }

    /// <summary>Intra-op threads of the CPU backend (--threads; default 0: the cores other programs leave free,
    /// re-checked every 2 s, or OMP_NUM_THREADS when it is set).</summary>
    /// <param name="threads">Threads; 0 adapts to the machine's load. A fixed count repeats runs bit for bit.</param>
    public TrainerBuilder UseThreads(int threads)
    {
        settings.Threads = threads;
        return this;
    }

    /// <summary>Writes a metrics.jsonl line (and reports progress) every this many optimizer steps, and at the last
    /// (--logging-steps; default 1).</summary>
    /// <param name="everySteps">Optimizer steps between logged steps, at least 1.</param>
    /// <param name="strategy">HF's logging_strategy (--logging-strategy): "steps" (default: every
    /// <paramref name="everySteps"/>), "epoch" (each epoch's end) or "no" (only the last step).</param>
    public TrainerBuilder UseLogging(int everySteps, string strategy = "steps")
    {
        settings.LoggingSteps = everySteps;
        settings.LoggingStrategy = strategy;
        return this;
    }

    /// <summary>Whether and where TensorBoard events are written (HF's report_to and logging_dir: --report-to,
    /// --logging-dir; default: on, in the output folder).</summary>
    /// <param name="enabled">False writes no event file (report_to "none").</param>
    /// <param name="folder">The event file's folder; null: the output folder.</param>
    public TrainerBuilder UseTensorBoard(bool enabled = true, string? folder = null)
    {
        settings.ReportToTensorBoard = enabled;
        settings.LoggingDir = folder;
        return this;
    }

    /// <summary>bf16 forward and backward with fp32 master weights and optimizer (--bf16). Excludes UseFp16.</summary>
    public TrainerBuilder UseBf16()
    {
        settings.Bf16 = true;
        return this;
    }

    /// <summary>fp16 forward and backward with fp32 master weights and DeepSpeed's dynamic loss scaling (--fp16).
    /// Excludes UseBf16.</summary>
    public TrainerBuilder UseFp16() => UseFp16(_ => { });

    /// <summary>fp16 forward and backward with fp32 master weights and DeepSpeed's loss scaling (--fp16 and the
    /// loss-scale options). Excludes UseBf16.</summary>
    /// <param name="configure">Sets a static scale or the dynamic scaler's settings.</param>
    public TrainerBuilder UseFp16(Action<LossScaleOptions> configure)
    {
        var o = Configure(configure);
        settings.Fp16 = true;
        settings.LossScale = o.StaticScale;
        settings.InitialScalePower = o.InitialScalePower;
        settings.LossScaleWindow = o.Window;
        settings.Hysteresis = o.Hysteresis;
        settings.MinLossScale = o.MinScale;
        return this;
    }

    /// <summary>What the model learns (--task): "causal-lm" (the default), "sequence-classification" (HF's
    /// *ForSequenceClassification on rows of a text and a label) or "reward-model" (a one-label classifier on
    /// prompt/chosen/rejected rows, loss -log sigmoid(r_chosen - r_rejected)).</summary>
    /// <param name="task">The task's name.</param>
    public TrainerBuilder UseTask(string task) => UseTask(task, _ => { });

    /// <summary>What the model learns, with its fields and head (--task and the task options).</summary>
    /// <param name="task">"causal-lm", "sequence-classification" or "reward-model".</param>
    /// <param name="configure">Sets the label, chosen and rejected fields, num_labels and the pad id.</param>
    public TrainerBuilder UseTask(string task, Action<TaskOptions> configure)
    {
        var o = Configure(configure);
        settings.Task = NotNull(task);
        settings.LabelField = o.LabelField;
        settings.ChosenField = o.ChosenField;
        settings.RejectedField = o.RejectedField;
        settings.NumLabels = o.NumLabels;
        settings.PadTokenId = o.PadTokenId;
        return this;
    }

    /// <summary>Recomputes each transformer block in backward instead of keeping its activations: far less memory,
    /// the same gradients, more time (--gradient-checkpointing).</summary>
    public TrainerBuilder UseGradientCheckpointing()
    {
        settings.GradientCheckpointing = true;
        return this;
    }

    /// <summary>Computes the causal-LM loss and its gradient from the final hidden states in chunks of this many
    /// predicted positions, so that the batch x positions x vocabulary logits never exist (--loss-chunk-size): the same
    /// loss and gradients, far less memory for a large vocabulary, one extra LM-head matmul per chunk in backward.
    /// 0 (the default) computes the full logits.</summary>
    /// <param name="positions">Positions per chunk (at least 1; 0 turns chunking off).</param>
    public TrainerBuilder UseLossChunkSize(int positions)
    {
        settings.LossChunkSize = positions;
        return this;
    }

    /// <summary>Builds the model with every dropout probability at 0; the saved config.json holds 0 too
    /// (--disable-dropout, DeepSpeed-Chat's disable_dropout).</summary>
    public TrainerBuilder DisableDropout()
    {
        settings.DisableDropout = true;
        return this;
    }

    /// <summary>Resizes the token embeddings (and an untied LM head) to multiple * ceil(len(tokenizer) / multiple), as HF's
    /// resize_token_embeddings with pad_to_multiple_of; new rows from HF's mean-resizing rule
    /// (--resize-token-embeddings-to-multiple-of).</summary>
    /// <param name="multiple">The multiple, e.g. 8 (DeepSpeed-Chat).</param>
    public TrainerBuilder ResizeTokenEmbeddingsToMultipleOf(int multiple)
    {
        settings.ResizeTokenEmbeddingsToMultipleOf = multiple;
        return this;
    }

    /// <summary>Runs over the processes of the launcher (<c>mpirun -np N functional train ...</c>, or a C# program
    /// started so), each training on its share of every batch, with the ZeRO stage of the options
    /// (<c>.UseDistributed(d => d.ZeroStage = 2)</c>; --zero-stage). Process 0 writes the output, logs and
    /// reports. Without a launcher this is one process and every stage computes the same.</summary>
    /// <param name="configure">Sets the ZeRO stage and, optionally, the communicator.</param>
    public TrainerBuilder UseDistributed(Action<DistributedOptions> configure)
    {
        var o = Configure(configure);
        settings.ZeroStage = o.ZeroStage;
        settings.ReduceBucketSize = o.ReduceBucketSize;
        settings.AllgatherBucketSize = o.AllgatherBucketSize;
        settings.LogEachRank = o.LogEachRank;
        settings.TensorParallelDegree = o.TensorParallelDegree;
        settings.PipelineParallelDegree = o.PipelineParallelDegree;
        settings.Communicator = o.Communicator;
        return this;
    }

    /// <summary>Splits final/'s weights into shards of at most this size, as HF's save_pretrained max_shard_size
    /// ("5GB" = 5e9 bytes, "2GiB", "500MB"; --max-shard-size).</summary>
    /// <param name="size">The size in HF's spelling.</param>
    public TrainerBuilder UseMaxShardSize(string size)
    {
        settings.MaxShardSize = NotNull(size);
        return this;
    }

    /// <summary>Trains new LoRA adapters of this rank with <see cref="LoraOptions"/>' defaults (--lora-dim).
    /// Excludes UseLoraAdapter.</summary>
    /// <param name="rank">The adapters' rank, at least 1.</param>
    public TrainerBuilder UseLora(int rank) => UseLora(rank, _ => { });

    /// <summary>Trains new LoRA adapters (--lora-dim and the LoRA options); the run writes them in PEFT's format.
    /// Excludes UseLoraAdapter.</summary>
    /// <param name="rank">The adapters' rank, at least 1.</param>
    /// <param name="configure">Sets alpha, dropout, the projections to adapt, only-optimize-LoRA and the adapters'
    /// learning rate.</param>
    public TrainerBuilder UseLora(int rank, Action<LoraOptions> configure)
    {
        var o = Configure(configure);
        var targets = (o.TargetModules ?? []).Where(t => !string.IsNullOrWhiteSpace(t)).Select(t => t.Trim()).ToList();
        settings.LoraDim = rank;
        settings.LoraAlpha = o.Alpha;
        settings.LoraDropout = o.Dropout;
        settings.LoraTargetModules = targets.Count == 0 ? null : string.Join(",", targets);
        settings.LoraModuleName = o.ModuleName;
        settings.OnlyOptimizeLora = o.OnlyOptimizeLora;
        settings.LoraLearningRate = o.LearningRate;
        loraRank = rank;
        names.Set("--only-optimize-lora", nameof(UseLora), nameof(LoraOptions.OnlyOptimizeLora));
        names.Set("--lora-learning-rate", nameof(UseLora), nameof(LoraOptions.LearningRate));
        return this;
    }

    /// <summary>Trains on from an existing PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
    /// its config and values (--lora-adapter). Excludes UseLora.</summary>
    /// <param name="folder">The adapter folder.</param>
    public TrainerBuilder UseLoraAdapter(string folder) => UseLoraAdapter(folder, _ => { });

    /// <summary>Trains on from an existing PEFT adapter folder (--lora-adapter, --only-optimize-lora,
    /// --lora-learning-rate). Excludes UseLora.</summary>
    /// <param name="folder">The adapter folder.</param>
    /// <param name="configure">Sets only-optimize-LoRA and the adapters' learning rate.</param>
    public TrainerBuilder UseLoraAdapter(string folder, Action<LoraAdapterOptions> configure)
    {
        var o = Configure(configure);
        settings.LoraAdapter = NotNull(folder);
        settings.OnlyOptimizeLora = o.OnlyOptimizeLora;
        settings.LoraLearningRate = o.LearningRate;
        loraAdapter = true;
        names.Set("--only-optimize-lora", nameof(UseLoraAdapter), nameof(LoraAdapterOptions.OnlyOptimizeLora));
        names.Set("--lora-learning-rate", nameof(UseLoraAdapter), nameof(LoraAdapterOptions.LearningRate));
        return this;
    }

    /// <summary>Prefix tuning (PaddleNLP's --prefix_tuning, PEFT's PREFIX_TUNING): every layer's attention sees
    /// <paramref name="numPrefixTokens"/> learned keys and values before the tokens; the base model stays frozen and the
    /// run writes a PEFT prefix adapter (--prefix-tuning --num-prefix-tokens). Excludes LoRA, bf16/fp16 and gradient
    /// checkpointing.</summary>
    /// <param name="numPrefixTokens">Learned prefix positions per layer, at least 1 (the command line's default: 128).</param>
    public TrainerBuilder UsePrefixTuning(int numPrefixTokens)
    {
        settings.PrefixTuning = true;
        settings.NumPrefixTokens = numPrefixTokens;
        return this;
    }

    /// <summary>The number of prefix tokens as the command line's --num-prefix-tokens gives it: without prefix
    /// tuning (or a prefix adapter) <see cref="Build"/> refuses it, even at the default.</summary>
    /// <param name="numPrefixTokens">Learned prefix positions per layer.</param>
    internal TrainerBuilder UsePrefixTokenCount(int numPrefixTokens)
    {
        settings.NumPrefixTokens = numPrefixTokens;
        prefixTokensGiven = true;
        return this;
    }

    /// <summary>Prefix tuning that trains on from an existing PEFT prefix adapter folder (adapter_config.json +
    /// adapter_model.safetensors), with its number of prefix tokens (--prefix-adapter).</summary>
    /// <param name="folder">The adapter folder.</param>
    public TrainerBuilder UsePrefixAdapter(string folder)
    {
        settings.PrefixTuning = true;
        settings.PrefixAdapter = NotNull(folder);
        return this;
    }

    /// <summary>Saves a checkpoint every <paramref name="everySteps"/> optimizer steps (--save-steps; by default
    /// every 500).</summary>
    /// <param name="everySteps">Optimizer steps between checkpoints, at least 1.</param>
    public TrainerBuilder UseCheckpoints(int everySteps) => UseCheckpoints(everySteps, _ => { });

    /// <summary>Checkpoints, the best model and early stopping (--save-steps and the checkpoint options).</summary>
    /// <param name="everySteps">Optimizer steps between checkpoints with the "steps" strategy, at least 1.</param>
    /// <param name="configure">Sets strategy, total limit, metric, greater-is-better, load-best-at-end and
    /// early-stopping patience.</param>
    public TrainerBuilder UseCheckpoints(int everySteps, Action<CheckpointOptions> configure)
    {
        var o = Configure(configure);
        settings.SaveSteps = everySteps;
        settings.SaveStrategy = o.Strategy;
        settings.SaveTotalLimit = o.TotalLimit;
        settings.MetricForBestModel = o.Metric;
        settings.GreaterIsBetter = o.GreaterIsBetter;
        settings.LoadBestModelAtEnd = o.LoadBestModelAtEnd;
        settings.EarlyStoppingPatience = o.EarlyStoppingPatience;
        return this;
    }

    /// <summary>Resumes from a checkpoint: weights, optimizer, schedule, random state and data position, so the run
    /// continues as if it never stopped (--resume-from-checkpoint).</summary>
    /// <param name="checkpointOrLatest">A checkpoint folder, or "latest" for the newest complete one in the output folder.</param>
    public TrainerBuilder ResumeFrom(string checkpointOrLatest)
    {
        settings.ResumeFromCheckpoint = NotNull(checkpointOrLatest);
        return this;
    }

    /// <summary>Called after each logged optimizer step (see <see cref="UseLogging"/>) on the training thread;
    /// several calls add several callbacks.</summary>
    /// <param name="callback">Receives step, total steps, epoch, loss, learning rate, gradient norm and tokens per second.</param>
    public TrainerBuilder OnProgress(Action<TrainingProgress> callback)
    {
        ArgumentNullException.ThrowIfNull(callback);
        onProgress += callback;
        return this;
    }

    /// <summary>Called after each evaluation (before training, every evaluation during it, the one at the last step)
    /// on the training thread; several calls add several callbacks.</summary>
    /// <param name="callback">Receives the step, evaluation loss, perplexity and exact match (before training, when
    /// scored).</param>
    public TrainerBuilder OnEvaluation(Action<EvaluationProgress> callback)
    {
        ArgumentNullException.ThrowIfNull(callback);
        onEvaluation += callback;
        return this;
    }

    /// <summary>Called with each line the run has for its user, e.g. "resuming from OUTPUT/checkpoint-400 (step 400
    /// of 1000)" or "skipped checkpoint-500: ..." (a newer checkpoint that did not verify); several calls add several
    /// callbacks.</summary>
    /// <param name="callback">Receives one line of text.</param>
    public TrainerBuilder OnMessage(Action<string> callback)
    {
        ArgumentNullException.ThrowIfNull(callback);
        onMessage += callback;
        return this;
    }

    /// <summary>
    /// Validates every setting and returns the plan, a snapshot that later builder calls do not change. Settings are
    /// checked here and turned into the core's job description once, which the plan keeps; no file is read. The
    /// model folder, data, adapter and checkpoint files are checked by <see cref="TrainingPlan.Fit()"/> before it
    /// writes anything. Throws <see cref="InvalidInputException"/> whose <see cref="InvalidInputException.Origin"/>
    /// is the builder method (e.g. "UseModel", "AccumulateGradients") and whose
    /// <see cref="InvalidInputException.Location"/> is its argument or options property, and
    /// <see cref="InvalidOperationException"/> when this builder has already built a plan.
    /// </summary>
    public TrainingPlan Build()
    {
        if (built)
        {
            throw new InvalidOperationException(
                "Build: this builder has already built a plan; call Trainer.CreateBuilder() for another one");
        }
        if (!names.CommandLine)
        {
            CheckBuilderRules();
        }
        FineTuneRequest request;
        try
        {
            request = FineTuning.ToRequest(settings, prefixTokensGiven);
        }
        catch (InvalidInputException e) when (names.Renames(e))
        {
            throw names.Rename(e);
        }
        built = true;
        return new TrainingPlan(request, settings.Clone(), onProgress, onEvaluation, onMessage, names.Copy());
    }

    /// <summary>The rules of the builder's own calls, checked before the settings they produce. The command line
    /// skips them: its options map onto the settings directly, and the shared validation names them.</summary>
    private void CheckBuilderRules()
    {
        if (loraRank is { } rank && rank < 1)
        {
            throw new InvalidInputException(nameof(UseLora), "rank",
                $"must be at least 1 (leave UseLora out to train without LoRA), got {rank} (command line: --lora-dim)");
        }
        if (loraRank is not null && loraAdapter)
        {
            throw new InvalidInputException(nameof(UseLoraAdapter), "",
                "cannot be combined with UseLora: the adapter folder's adapter_config.json sets rank, alpha, dropout and targets");
        }
        if (trainsForSteps && settings.MaxSteps < 1)
        {
            throw new InvalidInputException(nameof(TrainForSteps), "steps",
                $"must be at least 1 (TrainForEpochs trains for a number of epochs), got {settings.MaxSteps} (command line: --max-steps)");
        }
    }

    private TrainerBuilder UseNamedSchedule(string method, string name, int warmupSteps)
    {
        settings.LrSchedulerType = name;
        settings.NumWarmupSteps = warmupSteps;
        settings.WarmupRatio = 0;
        settings.LrSchedulerKwargs = null;
        names.Set("--lr-scheduler-type", method, "");
        names.Set("--num-warmup-steps", method, nameof(warmupSteps));
        return this;
    }

    private static T Configure<T>(Action<T> configure) where T : new()
    {
        ArgumentNullException.ThrowIfNull(configure);
        var options = new T();
        configure(options);
        return options;
    }

    private static string NotNull(string value, [System.Runtime.CompilerServices.CallerArgumentExpression(nameof(value))] string? name = null)
    {
        ArgumentNullException.ThrowIfNull(value, name);
        return value;
    }
}
