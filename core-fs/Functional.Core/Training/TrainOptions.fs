namespace Functional.Training

open System
open Functional
open Functional.Optim

/// The optimizer of a run (`--optim`, HF TrainingArguments.optim; see OptimizerKind.parse).
[<RequireQualifiedAccess>]
type OptimizerKind =
    /// torch.optim.AdamW: decoupled weight decay (HF Trainer's default, "adamw_torch"), optionally
    /// with AMSGrad and maximize.
    | AdamW
    /// torch.optim.SGD with optional momentum, dampening and Nesterov; its weight decay is coupled (L2).
    | Sgd
    /// transformers' Adafactor as HF Trainer's optim="adafactor" makes it: factored second moments,
    /// no first moment, the scheduled learning rate (relative_step and scale_parameter off).
    | Adafactor
    /// Lion (HF's "lion_32bit"): sign updates with decoupled weight decay, betas from adam_beta1/2.
    | Lion
    /// torch.optim.RMSprop with its defaults (alpha 0.99, eps 1e-8, not centered), momentum from
    /// --momentum, coupled weight decay (HF's "rmsprop").
    | RmsProp

/// The optimizer names `--optim` accepts (HF TrainingArguments.optim's, for the optimizers here).
[<RequireQualifiedAccess>]
module OptimizerKind =

    /// Every accepted name and its optimizer, in the order listed to users.
    let names: (string * OptimizerKind) list =
        [ "adamw_torch", OptimizerKind.AdamW
          "adamw_torch_fused", OptimizerKind.AdamW
          "adamw_hf", OptimizerKind.AdamW
          "adamw", OptimizerKind.AdamW
          "sgd", OptimizerKind.Sgd
          "adafactor", OptimizerKind.Adafactor
          "lion_32bit", OptimizerKind.Lion
          "lion", OptimizerKind.Lion
          "rmsprop", OptimizerKind.RmsProp ]

    /// The optimizer of an HF optim name (case and surrounding blanks ignored), or None.
    let tryParse (name: string) : OptimizerKind option =
        if isNull name then None
        else
            let key = name.Trim().ToLowerInvariant()
            names |> List.tryFind (fun (n, _) -> n = key) |> Option.map snd

    /// The optimizer of an HF optim name; an unknown name raises InvalidInputException naming the
    /// option and listing the supported names.
    let parse (option: string) (name: string) : OptimizerKind =
        match tryParse name with
        | Some kind -> kind
        | None ->
            InvalidInput.failSetting option
                (sprintf "expected one of %s, got '%s'" (String.Join(", ", names |> List.map fst)) name)

/// When something happens during a run (HF's IntervalStrategy: "no", "steps", "epoch").
[<RequireQualifiedAccess>]
type IntervalStrategy =
    /// Never (during the run).
    | No
    /// Every N optimizer steps.
    | Steps
    /// At the end of every epoch.
    | Epoch

/// The numeric precision of training (`--bf16`, `--fp16`). Mixed precision keeps fp32 master weights
/// and runs the optimizer on them; forward and backward run on a low-precision compute copy of the model
/// (see MixedPrecision).
[<RequireQualifiedAccess>]
type Precision =
    /// fp32 everywhere (default).
    | Fp32
    /// bf16 forward and backward, fp32 master weights, gradients and optimizer (`--bf16`). bf16 has
    /// fp32's exponent range, so no loss scaling is needed.
    | Bf16
    /// fp16 forward and backward with DeepSpeed's loss scaling, fp32 master weights, gradients and
    /// optimizer (`--fp16`, with --loss-scale, --initial-scale-power, --loss-scale-window,
    /// --hysteresis and --min-loss-scale). An update whose gradients overflow is skipped.
    | Fp16 of LossScalerConfig

/// Hyperparameters of a fine-tuning run, named after HF TrainingArguments / DeepSpeed-Chat options.
/// `TrainOptions.defaults` holds HF's defaults; `TrainOptions.validate` checks every field.
[<NoComparison>]
type TrainOptions =
    { /// Rows per micro-batch (default 8, HF's per_device_train_batch_size).
      PerDeviceTrainBatchSize: int
      /// Micro-batches per optimizer step (default 1).
      GradientAccumulationSteps: int
      /// Peak learning rate (default 5e-5).
      LearningRate: float
      /// Weight decay; skipped for biases and normalization weights (default 0).
      WeightDecay: float
      /// Adam's beta1 (default 0.9).
      AdamBeta1: float
      /// Adam's beta2 (default 0.999).
      AdamBeta2: float
      /// Adam's epsilon, added after bias correction as torch.optim.AdamW does (default 1e-8).
      AdamEpsilon: float
      /// The optimizer: AdamW (default), SGD, Adafactor, Lion or RMSprop (`--optim`, OptimizerKind.parse).
      Optimizer: OptimizerKind
      /// SGD and RMSprop momentum (default 0).
      Momentum: float
      /// SGD Nesterov momentum (default false).
      Nesterov: bool
      /// SGD dampening of the momentum buffer after its first update (default 0, torch's).
      Dampening: float
      /// AdamW's AMSGrad variant (default false, torch's amsgrad).
      Amsgrad: bool
      /// AdamW maximizes the objective (default false, torch's maximize).
      Maximize: bool
      /// RMSprop's smoothing constant alpha (default 0.99, torch's; `--optim-args alpha=`).
      RmsPropAlpha: float
      /// RMSprop's epsilon, added to the root of the running square average (default 1e-8, torch's;
      /// `--optim-args eps=`).
      RmsPropEpsilon: float
      /// Centered RMSprop: the square average less the squared gradient average (default false, torch's;
      /// `--optim-args centered=`).
      RmsPropCentered: bool
      /// Adafactor's update clipping: the update's RMS is capped at this (default 1.0, transformers';
      /// `--optim-args clip_threshold=`).
      AdafactorClipThreshold: float
      /// Adafactor's second-moment decay exponent: beta2 at step t is 1 - t^decay_rate (default -0.8,
      /// transformers'; `--optim-args decay_rate=`).
      AdafactorDecayRate: float
      /// Adafactor scales each step by max(eps2, RMS(p)) (default false, as HF Trainer makes it;
      /// `--optim-args scale_parameter=`).
      AdafactorScaleParameter: bool
      /// The learning-rate schedule (default linear, as HF).
      LrSchedulerType: SchedulerKind
      /// Schedule-specific parameters (HF's lr_scheduler_kwargs).
      LrSchedulerOptions: ScheduleOptions
      /// Warmup steps; wins over WarmupRatio when > 0 (default 0).
      NumWarmupSteps: int
      /// Warmup as a fraction of the total steps, rounded up (default 0).
      WarmupRatio: float
      /// Epochs when MaxSteps is not set; may be fractional (default 3).
      NumTrainEpochs: float
      /// Total optimizer steps; -1 (default) means NumTrainEpochs decides. Data restarts after each epoch.
      MaxSteps: int
      /// Global gradient-norm clipping threshold; 0 turns clipping off (default 1.0).
      MaxGradNorm: float
      /// Rows are truncated to this many tokens; 0 (default) uses the model's context (config.json's
      /// n_positions or max_position_embeddings, less a prefix's virtual tokens), see
      /// TrainOptions.sequenceLength. A value above the context is refused.
      MaxSeqLen: int
      /// Seeds weight initialization, dropout and shuffling (default 42).
      Seed: int64
      /// Shuffle rows each epoch from (seed, epoch); false keeps file order (default true).
      Shuffle: bool
      /// Write metrics every this many optimizer steps; the last step is always written (default 1).
      LoggingSteps: int
      /// Intra-op threads; 0 (the default) adapts to the machine's load: the cores other processes leave
      /// free, re-checked every 2 s, or OMP_NUM_THREADS when it is set (Functional.Runtime.ThreadBudget).
      Threads: int
      /// Evaluate every this many optimizer steps when there is an evaluation set; 0 evaluates only at
      /// the end (default 0).
      EvalSteps: int
      /// Rows per evaluation micro-batch (default 8, HF's per_device_eval_batch_size).
      PerDeviceEvalBatchSize: int
      /// When to evaluate during the run; None: "steps" when EvalSteps > 0, else "no". With an evaluation
      /// set the run is also evaluated after its last step.
      EvalStrategy: IntervalStrategy option
      /// When to save checkpoints (default steps, as HF).
      SaveStrategy: IntervalStrategy
      /// Save every this many optimizer steps with the steps strategy (default 500, as HF).
      SaveSteps: int
      /// Keep at most this many checkpoints, deleting the oldest; the best one is never deleted
      /// (default None: keep all).
      SaveTotalLimit: int option
      /// The metric that picks the best checkpoint (default "eval_loss"; "eval_" is prepended when missing).
      MetricForBestModel: string
      /// Whether a greater metric is better; None: false for metrics ending in "loss", true otherwise (HF).
      GreaterIsBetter: bool option
      /// After training, load the best checkpoint's weights before saving final/ (default false).
      LoadBestModelAtEnd: bool
      /// Stop after this many evaluations without improvement of the metric; 0 turns it off (default 0).
      EarlyStoppingPatience: int
      /// fp32 (default), bf16 or fp16 mixed precision.
      Precision: Precision
      /// When steps are logged (HF's logging_strategy): every LoggingSteps (default), at the end of each
      /// epoch, or no (only the last step, which the run's summary needs). The last step is always logged.
      LoggingStrategy: IntervalStrategy
      /// Write TensorBoard events (HF's report_to "tensorboard"; default true).
      ReportToTensorBoard: bool
      /// The folder of the TensorBoard event file (HF's logging_dir); None: the output folder (default).
      LoggingDir: string option
      /// Compute the causal-LM loss and its gradient from the final hidden states in chunks of this many
      /// predicted positions (ChunkedLoss.causalLmSum), so that no B x T x V logits exist in training or
      /// evaluation; the same loss and gradients. 0 (default): the model's full logits, then the loss.
      LossChunkSize: int }

/// Defaults and validation of TrainOptions.
[<RequireQualifiedAccess>]
module TrainOptions =

    /// HF TrainingArguments' defaults (rows as long as the model's context, logging every step).
    let defaults =
        { PerDeviceTrainBatchSize = 8
          GradientAccumulationSteps = 1
          LearningRate = 5e-5
          WeightDecay = 0.0
          AdamBeta1 = 0.9
          AdamBeta2 = 0.999
          AdamEpsilon = 1e-8
          Optimizer = OptimizerKind.AdamW
          Momentum = 0.0
          Nesterov = false
          Dampening = 0.0
          Amsgrad = false
          Maximize = false
          RmsPropAlpha = 0.99
          RmsPropEpsilon = 1e-8
          RmsPropCentered = false
          AdafactorClipThreshold = 1.0
          AdafactorDecayRate = -0.8
          AdafactorScaleParameter = false
          LrSchedulerType = SchedulerKind.Linear
          LrSchedulerOptions = ScheduleOptions.Defaults
          NumWarmupSteps = 0
          WarmupRatio = 0.0
          NumTrainEpochs = 3.0
          MaxSteps = -1
          MaxGradNorm = 1.0
          MaxSeqLen = 0
          Seed = 42L
          Shuffle = true
          LoggingSteps = 1
          Threads = 0
          EvalSteps = 0
          PerDeviceEvalBatchSize = 8
          EvalStrategy = None
          SaveStrategy = IntervalStrategy.Steps
          SaveSteps = 500
          SaveTotalLimit = None
          MetricForBestModel = "eval_loss"
          GreaterIsBetter = None
          LoadBestModelAtEnd = false
          EarlyStoppingPatience = 0
          Precision = Precision.Fp32
          LoggingStrategy = IntervalStrategy.Steps
          ReportToTensorBoard = true
          LoggingDir = None
          LossChunkSize = 0 }

    /// TrainOptions from named values, for C# callers: they cannot copy-and-update an F# record, and a
    /// 36-argument constructor called positionally compiles even when two ints are swapped. Call it with
    /// named arguments. Settings that are optional take .NET shapes: a Nullable int or bool, or a null
    /// (or blank) string, means "not set". Nothing is checked here: validate does that once.
    let create
        (
            perDeviceTrainBatchSize: int,
            gradientAccumulationSteps: int,
            learningRate: float,
            weightDecay: float,
            adamBeta1: float,
            adamBeta2: float,
            adamEpsilon: float,
            optimizer: OptimizerKind,
            momentum: float,
            nesterov: bool,
            lrSchedulerType: SchedulerKind,
            lrSchedulerOptions: ScheduleOptions,
            numWarmupSteps: int,
            warmupRatio: float,
            numTrainEpochs: float,
            maxSteps: int,
            maxGradNorm: float,
            maxSeqLen: int,
            seed: int64,
            shuffle: bool,
            loggingSteps: int,
            threads: int,
            evalSteps: int,
            perDeviceEvalBatchSize: int,
            evalStrategy: IntervalStrategy option,
            saveStrategy: IntervalStrategy,
            saveSteps: int,
            saveTotalLimit: Nullable<int>,
            metricForBestModel: string,
            greaterIsBetter: Nullable<bool>,
            loadBestModelAtEnd: bool,
            earlyStoppingPatience: int,
            precision: Precision,
            loggingStrategy: IntervalStrategy,
            reportToTensorBoard: bool,
            loggingDir: string,
            lossChunkSize: int,
            dampening: float,
            amsgrad: bool,
            maximize: bool,
            rmsPropAlpha: float,
            rmsPropEpsilon: float,
            rmsPropCentered: bool,
            adafactorClipThreshold: float,
            adafactorDecayRate: float,
            adafactorScaleParameter: bool
        ) : TrainOptions =
        { PerDeviceTrainBatchSize = perDeviceTrainBatchSize
          GradientAccumulationSteps = gradientAccumulationSteps
          LearningRate = learningRate
          WeightDecay = weightDecay
          AdamBeta1 = adamBeta1
          AdamBeta2 = adamBeta2
          AdamEpsilon = adamEpsilon
          Optimizer = optimizer
          Momentum = momentum
          Nesterov = nesterov
          Dampening = dampening
          Amsgrad = amsgrad
          Maximize = maximize
          RmsPropAlpha = rmsPropAlpha
          RmsPropEpsilon = rmsPropEpsilon
          RmsPropCentered = rmsPropCentered
          AdafactorClipThreshold = adafactorClipThreshold
          AdafactorDecayRate = adafactorDecayRate
          AdafactorScaleParameter = adafactorScaleParameter
          LrSchedulerType = lrSchedulerType
          LrSchedulerOptions = lrSchedulerOptions
          NumWarmupSteps = numWarmupSteps
          WarmupRatio = warmupRatio
          NumTrainEpochs = numTrainEpochs
          MaxSteps = maxSteps
          MaxGradNorm = maxGradNorm
          MaxSeqLen = maxSeqLen
          Seed = seed
          Shuffle = shuffle
          LoggingSteps = loggingSteps
          Threads = threads
          EvalSteps = evalSteps
          PerDeviceEvalBatchSize = perDeviceEvalBatchSize
          EvalStrategy = evalStrategy
          SaveStrategy = saveStrategy
          SaveSteps = saveSteps
          SaveTotalLimit = Option.ofNullable saveTotalLimit
          MetricForBestModel = metricForBestModel
          GreaterIsBetter = Option.ofNullable greaterIsBetter
          LoadBestModelAtEnd = loadBestModelAtEnd
          EarlyStoppingPatience = earlyStoppingPatience
          Precision = precision
          LoggingStrategy = loggingStrategy
          ReportToTensorBoard = reportToTensorBoard
          LoggingDir = if String.IsNullOrWhiteSpace loggingDir then None else Some loggingDir
          LossChunkSize = lossChunkSize }

    /// The evaluation strategy in force: the given one, else steps when EvalSteps > 0, else no.
    let evalStrategy (o: TrainOptions) =
        match o.EvalStrategy with
        | Some strategy -> strategy
        | None -> if o.EvalSteps > 0 then IntervalStrategy.Steps else IntervalStrategy.No

    /// Parses "no", "steps" or "epoch" for the named option.
    let parseStrategy (option: string) (value: string) =
        match value.Trim().ToLowerInvariant() with
        | "no" -> IntervalStrategy.No
        | "steps" -> IntervalStrategy.Steps
        | "epoch" -> IntervalStrategy.Epoch
        | _ -> InvalidInput.failSetting option (sprintf "expected no, steps or epoch, got '%s'" value)

    let private check condition option (problem: unit -> string) =
        if not condition then InvalidInput.failSetting option (problem ())

    let private finite (x: float) = not (Double.IsNaN x || Double.IsInfinity x)

    /// Raises InvalidInputException naming the option (in its command-line spelling) of the first
    /// field out of range.
    let validate (o: TrainOptions) =
        check (o.PerDeviceTrainBatchSize >= 1) "{per_device_train_batch_size}" (fun () ->
            sprintf "must be at least 1, got %d" o.PerDeviceTrainBatchSize)
        check (o.GradientAccumulationSteps >= 1) "{gradient_accumulation_steps}" (fun () ->
            sprintf "must be at least 1, got %d" o.GradientAccumulationSteps)
        check (finite o.LearningRate && o.LearningRate >= 0.0) "{learning_rate}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" o.LearningRate)
        check (finite o.WeightDecay && o.WeightDecay >= 0.0) "{weight_decay}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" o.WeightDecay)
        check (o.AdamBeta1 >= 0.0 && o.AdamBeta1 < 1.0) "{adam_beta1}" (fun () ->
            sprintf "must lie in [0, 1), got %g" o.AdamBeta1)
        check (o.AdamBeta2 >= 0.0 && o.AdamBeta2 < 1.0) "{adam_beta2}" (fun () ->
            sprintf "must lie in [0, 1), got %g" o.AdamBeta2)
        check (finite o.AdamEpsilon && o.AdamEpsilon >= 0.0) "{adam_epsilon}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" o.AdamEpsilon)
        check (finite o.Momentum && o.Momentum >= 0.0) "{momentum}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" o.Momentum)
        check (not o.Nesterov || o.Momentum > 0.0) "{nesterov}" (fun () -> "needs {momentum} > 0 (as torch.optim.SGD)")
        check (finite o.Dampening) "{dampening}" (fun () -> sprintf "must be a finite number, got %g" o.Dampening)
        check (not o.Nesterov || o.Dampening = 0.0) "{nesterov}" (fun () -> "needs {dampening} 0 (as torch.optim.SGD)")
        check (o.Optimizer = OptimizerKind.Sgd || o.Dampening = 0.0) "{dampening}" (fun () -> "applies to the sgd optimizer only")
        check (o.Optimizer = OptimizerKind.AdamW || not o.Amsgrad) "{amsgrad}" (fun () -> "applies to the adamw optimizers only")
        check (o.Optimizer = OptimizerKind.AdamW || not o.Maximize) "{maximize}" (fun () -> "applies to the adamw optimizers only")
        let checkArg condition key (problem: unit -> string) =
            if not condition then InvalidInput.fail "{optim_args}" key (problem ())
        checkArg (o.RmsPropAlpha >= 0.0 && o.RmsPropAlpha <= 1.0) "alpha" (fun () -> sprintf "must lie in [0, 1], got %g" o.RmsPropAlpha)
        checkArg (finite o.RmsPropEpsilon && o.RmsPropEpsilon > 0.0) "eps" (fun () -> sprintf "must be a finite number > 0, got %g" o.RmsPropEpsilon)
        checkArg (finite o.AdafactorClipThreshold && o.AdafactorClipThreshold > 0.0) "clip_threshold" (fun () ->
            sprintf "must be a finite number > 0, got %g" o.AdafactorClipThreshold)
        checkArg (finite o.AdafactorDecayRate && o.AdafactorDecayRate < 0.0) "decay_rate" (fun () ->
            sprintf "must be a finite number < 0 (beta2 at step t is 1 - t^decay_rate), got %g" o.AdafactorDecayRate)
        let rmsPropVariant = o.RmsPropAlpha <> 0.99 || o.RmsPropEpsilon <> 1e-8 || o.RmsPropCentered
        check (o.Optimizer = OptimizerKind.RmsProp || not rmsPropVariant) "{optim_args}" (fun () ->
            "alpha, eps and centered apply to the rmsprop optimizer only")
        let adafactorVariant = o.AdafactorClipThreshold <> 1.0 || o.AdafactorDecayRate <> -0.8 || o.AdafactorScaleParameter
        check (o.Optimizer = OptimizerKind.Adafactor || not adafactorVariant) "{optim_args}" (fun () ->
            "clip_threshold, decay_rate and scale_parameter apply to the adafactor optimizer only")
        check (o.NumWarmupSteps >= 0) "{num_warmup_steps}" (fun () -> sprintf "must be >= 0, got %d" o.NumWarmupSteps)
        check (o.WarmupRatio >= 0.0 && o.WarmupRatio <= 1.0) "{warmup_ratio}" (fun () ->
            sprintf "must lie in [0, 1], got %g" o.WarmupRatio)
        check (finite o.NumTrainEpochs && o.NumTrainEpochs > 0.0) "{num_train_epochs}" (fun () ->
            sprintf "must be a finite number > 0, got %g" o.NumTrainEpochs)
        check (o.MaxSteps = -1 || o.MaxSteps >= 1) "{max_steps}" (fun () ->
            sprintf "must be at least 1 (or -1 to train for {num_train_epochs}), got %d" o.MaxSteps)
        check (finite o.MaxGradNorm && o.MaxGradNorm >= 0.0) "{max_grad_norm}" (fun () ->
            sprintf "must be a finite number >= 0 (0 turns clipping off), got %g" o.MaxGradNorm)
        check (o.MaxSeqLen = 0 || o.MaxSeqLen >= 2) "{max_seq_len}" (fun () ->
            sprintf "must be at least 2 (a row needs two tokens to predict one), or 0 for the model's context, got %d" o.MaxSeqLen)
        check (o.LoggingSteps >= 1) "{logging_steps}" (fun () -> sprintf "must be at least 1, got %d" o.LoggingSteps)
        check (o.Threads >= 0) "{threads}" (fun () -> sprintf "must be >= 0 (0 adapts to the cores left free by other work), got %d" o.Threads)
        check (o.EvalSteps >= 0) "{eval_steps}" (fun () -> sprintf "must be >= 0 (0 evaluates only at the end), got %d" o.EvalSteps)
        check (o.PerDeviceEvalBatchSize >= 1) "{per_device_eval_batch_size}" (fun () ->
            sprintf "must be at least 1, got %d" o.PerDeviceEvalBatchSize)
        check (o.SaveSteps >= 1) "{save_steps}" (fun () -> sprintf "must be at least 1, got %d" o.SaveSteps)
        check (o.SaveTotalLimit |> Option.forall (fun l -> l >= 1)) "{save_total_limit}" (fun () ->
            sprintf "must be at least 1, got %d" o.SaveTotalLimit.Value)
        check (o.EarlyStoppingPatience >= 0) "{early_stopping_patience}" (fun () ->
            sprintf "must be >= 0 (0 turns it off), got %d" o.EarlyStoppingPatience)
        let evalStrategy = evalStrategy o
        check (evalStrategy <> IntervalStrategy.Steps || o.EvalSteps >= 1) "{eval_steps}" (fun () ->
            "must be at least 1 with {eval_strategy} steps")
        check (not o.LoadBestModelAtEnd || (evalStrategy <> IntervalStrategy.No && evalStrategy = o.SaveStrategy)) "{load_best_model_at_end}" (fun () ->
            "needs {eval_strategy} and {save_strategy} to be the same (steps or epoch), as in HF Trainer")
        check (not o.LoadBestModelAtEnd || o.SaveStrategy <> IntervalStrategy.Steps || o.SaveSteps % o.EvalSteps = 0) "{save_steps}" (fun () ->
            sprintf "must be a multiple of {eval_steps} (%d) with {load_best_model_at_end}, so every checkpoint has a metric" o.EvalSteps)
        check (o.LrSchedulerType <> SchedulerKind.ReduceLrOnPlateau || evalStrategy <> IntervalStrategy.No) "{lr_scheduler_type}" (fun () ->
            "reduce_lr_on_plateau needs evaluations during the run ({eval_strategy} steps or epoch), as in HF Trainer")
        check (o.EarlyStoppingPatience = 0 || evalStrategy <> IntervalStrategy.No) "{early_stopping_patience}" (fun () ->
            "needs evaluations during the run ({eval_strategy} steps or epoch)")
        check (o.LossChunkSize >= 0) "{loss_chunk_size}" (fun () ->
            sprintf "must be >= 0 (positions per chunk of the loss; 0 computes the full logits), got %d" o.LossChunkSize)
        check (not (String.IsNullOrWhiteSpace o.MetricForBestModel)) "{metric_for_best_model}" (fun () -> "must name a metric such as eval_loss")
        match o.Precision with
        | Precision.Fp16 scaler -> LossScaler.validate scaler
        | Precision.Fp32
        | Precision.Bf16 -> ()

    /// The precision the command-line flags ask for: --bf16, --fp16 with the loss scaler's settings,
    /// or fp32 when neither is given. Raises InvalidInputException naming --fp16 when both are given,
    /// and naming the loss scaler's option when a setting is out of range.
    let precision (bf16: bool) (fp16: bool) (scaler: LossScalerConfig) : Precision =
        match bf16, fp16 with
        | true, true -> InvalidInput.setting "fp16" "cannot be combined with {bf16}: choose one compute precision"
        | true, false -> Precision.Bf16
        | false, true ->
            LossScaler.validate scaler
            Precision.Fp16 scaler
        | false, false -> Precision.Fp32

    /// The row length of a run on a model whose first prefixTokens positions a prefix takes (0 without
    /// prefix tuning): MaxSeqLen, or with 0 the positions the model's context leaves to the tokens. Raises
    /// InvalidInputException naming --max-seq-len when MaxSeqLen exceeds the context (GPT-2 has no
    /// position past n_positions; LLaMA was trained up to max_position_embeddings), and naming
    /// --num-prefix-tokens when the prefix leaves fewer than two positions. A prefix with an explicit
    /// MaxSeqLen is checked against the rows' real lengths by the caller.
    let sequenceLength (o: TrainOptions) (config: Functional.Models.ModelConfig) (prefixTokens: int) : int =
        let context = Functional.Models.ModelConfig.contextLength config
        let field = Functional.Models.ModelConfig.contextField config
        if o.MaxSeqLen > context then
            InvalidInput.setting "max_seq_len"
                (sprintf "%d exceeds the model's context: config.json has %s = %d (omit {max_seq_len} to use the model's context)"
                    o.MaxSeqLen field context)
        if o.MaxSeqLen > 0 then o.MaxSeqLen
        elif context - prefixTokens >= 2 then context - prefixTokens
        else
            InvalidInput.setting "num_prefix_tokens"
                (sprintf "%d prefix tokens leave %d of the model's %d positions (%s) to the rows; a row needs at least 2"
                    prefixTokens (max 0 (context - prefixTokens)) context field)

    /// Optimizer steps of the run: MaxSteps when set, else ceil(epochs * steps per epoch), as HF Trainer.
    let totalSteps (o: TrainOptions) (stepsPerEpoch: int) =
        if o.MaxSteps > 0 then o.MaxSteps
        else max 1 (int (Math.Ceiling(o.NumTrainEpochs * float stepsPerEpoch)))

    /// Reads HF v5's warmup_steps, which may be a ratio: a value in (0, 1) is a fraction of the run's
    /// optimizer steps (rounded up, as warmup_ratio), 0 or a whole number is a step count. Returns the
    /// (NumWarmupSteps, WarmupRatio) pair for a run that also got warmupRatio (the older warmup_ratio
    /// setting). Raises InvalidInputException naming num_warmup_steps for a negative, non-finite or
    /// fractional value above 1, or for a ratio given together with a warmup_ratio above 0.
    let warmupOfSteps (warmupSteps: float) (warmupRatio: float) : int * float =
        if not (Double.IsFinite warmupSteps) || warmupSteps < 0.0 then
            InvalidInput.setting "num_warmup_steps"
                (sprintf "must be >= 0 (optimizer steps, or a ratio of the run's steps below 1), got %g" warmupSteps)
        elif warmupSteps > 0.0 && warmupSteps < 1.0 then
            if warmupRatio > 0.0 then
                InvalidInput.setting "num_warmup_steps"
                    (sprintf "%g is a ratio of the run's steps (below 1), and {warmup_ratio} = %g is given too: set only one"
                        warmupSteps warmupRatio)
            (0, warmupSteps)
        elif warmupSteps <> Math.Floor warmupSteps || warmupSteps > float Int32.MaxValue then
            InvalidInput.setting "num_warmup_steps"
                (sprintf "must be a whole number of optimizer steps, or a ratio of the run's steps below 1, got %g" warmupSteps)
        else (int warmupSteps, warmupRatio)

    /// Warmup steps for a run of totalSteps; raises InvalidInputException when the warmup is longer than the run.
    let warmupSteps (o: TrainOptions) (totalSteps: int) =
        let warmup =
            Schedule.warmupSteps totalSteps (Some o.NumWarmupSteps) (Some o.WarmupRatio)
        if warmup > totalSteps then
            InvalidInput.failSetting (if o.NumWarmupSteps > 0 then "{num_warmup_steps}" else "{warmup_ratio}")
                (sprintf "%d warmup steps are longer than the run's %d optimizer steps" warmup totalSteps)
        warmup

/// Reading HF's `--lr_scheduler_kwargs` JSON object into ScheduleOptions.
[<RequireQualifiedAccess>]
module SchedulerKwargs =

    open System.Text.Json

    /// Parses e.g. {"num_cycles": 2, "min_lr_rate": 0.1} with HF's key names: num_cycles, lr_end, power,
    /// timescale, min_lr, min_lr_rate, num_decay_steps, num_stable_steps, warmup_type, decay_type,
    /// min_lr_ratio, warmup_lr_rate, and reduce_lr_on_plateau's mode, factor, patience, threshold,
    /// threshold_mode, cooldown, eps (its min_lr is min_lr). origin names the option for errors; min_lr together with min_lr_rate
    /// is refused naming both. Whether the chosen schedule takes each key is Schedule.checkKwargs' part.
    let parse (origin: string) (json: string) : ScheduleOptions =
        let root =
            match JsonInput.tryParse json with
            | Ok root -> root
            | Error e -> InvalidInput.failSetting origin (sprintf "not a JSON object (%s)" e.Message)
        if root.ValueKind <> JsonValueKind.Object then
            InvalidInput.failSetting origin "expected a JSON object such as {\"num_cycles\": 2}"
        let number (p: JsonProperty) =
            match p.Value.ValueKind with
            | JsonValueKind.Number -> p.Value.GetDouble()
            | _ -> InvalidInput.fail origin p.Name (sprintf "expected a number, found %s" (p.Value.GetRawText()))
        let integer (p: JsonProperty) =
            match p.Value.TryGetInt32() with
            | true, v when p.Value.ValueKind = JsonValueKind.Number -> v
            | _ -> InvalidInput.fail origin p.Name (sprintf "expected an integer, found %s" (p.Value.GetRawText()))
        let shape (p: JsonProperty) =
            match (if p.Value.ValueKind = JsonValueKind.String then Schedule.parseShape (p.Value.GetString()) else None) with
            | Some s -> s
            | None -> InvalidInput.fail origin p.Name (sprintf "expected \"linear\", \"cosine\" or \"1-sqrt\", found %s" (p.Value.GetRawText()))
        root.EnumerateObject()
        |> Seq.fold (fun (o: ScheduleOptions) p ->
            match p.Name with
            | "num_cycles" -> { o with NumCycles = Some(number p) }
            | "lr_end" -> { o with LrEnd = Some(number p) }
            | "power" -> { o with Power = Some(number p) }
            | "timescale" -> { o with Timescale = Some(integer p) }
            | "min_lr" | "min_lr_rate" when o.MinLr.IsSome ->
                InvalidInput.fail origin p.Name
                    "min_lr and min_lr_rate are both given: set only one of them (as HF requires)"
            | "min_lr" -> { o with MinLr = Some(MinLearningRate.Absolute(number p)) }
            | "min_lr_rate" -> { o with MinLr = Some(MinLearningRate.RatioOfBase(number p)) }
            | "warmup_lr_rate" -> { o with WarmupLrRate = Some(number p) }
            | "mode" ->
                match (if p.Value.ValueKind = JsonValueKind.String then p.Value.GetString() else "") with
                | "min" -> { o with Mode = Some PlateauMode.Min }
                | "max" -> { o with Mode = Some PlateauMode.Max }
                | _ -> InvalidInput.fail origin p.Name (sprintf "expected \"min\" or \"max\", found %s" (p.Value.GetRawText()))
            | "threshold_mode" ->
                match (if p.Value.ValueKind = JsonValueKind.String then p.Value.GetString() else "") with
                | "rel" -> { o with ThresholdMode = Some ThresholdMode.Relative }
                | "abs" -> { o with ThresholdMode = Some ThresholdMode.Absolute }
                | _ -> InvalidInput.fail origin p.Name (sprintf "expected \"rel\" or \"abs\", found %s" (p.Value.GetRawText()))
            | "factor" -> { o with Factor = Some(number p) }
            | "patience" -> { o with Patience = Some(integer p) }
            | "threshold" -> { o with Threshold = Some(number p) }
            | "cooldown" -> { o with Cooldown = Some(integer p) }
            | "eps" -> { o with Eps = Some(number p) }
            | "num_decay_steps" -> { o with NumDecaySteps = Some(integer p) }
            | "num_stable_steps" -> { o with NumStableSteps = Some(integer p) }
            | "warmup_type" -> { o with WarmupShape = Some(shape p) }
            | "decay_type" -> { o with DecayShape = Some(shape p) }
            | "min_lr_ratio" -> { o with MinLrRatio = Some(number p) }
            | other ->
                InvalidInput.fail origin other
                    "unknown key (expected num_cycles, lr_end, power, timescale, min_lr, min_lr_rate, num_decay_steps, num_stable_steps, warmup_type, decay_type, min_lr_ratio, warmup_lr_rate, mode, factor, patience, threshold, threshold_mode, cooldown or eps)")
            ScheduleOptions.Defaults

/// HF TrainingArguments' optim_args (`--optim-args "alpha=0.9,centered=True"`): keyword arguments of the
/// optimizer's constructor, as comma-separated key=value pairs (blanks ignored, as HF removes them), for
/// what no flag of its own sets. Each optimizer takes its constructor's names:
/// adamw: amsgrad, maximize; sgd: dampening, nesterov; rmsprop: alpha, eps, centered; adafactor:
/// clip_threshold, decay_rate, scale_parameter; lion: none. Booleans are read as Python's strtobool
/// (true/false, yes/no, on/off, 1/0, any case).
[<RequireQualifiedAccess>]
module OptimizerArgs =

    /// The keys each optimizer takes, in the order listed in messages.
    let accepted (kind: OptimizerKind) : string list =
        match kind with
        | OptimizerKind.AdamW -> [ "amsgrad"; "maximize" ]
        | OptimizerKind.Sgd -> [ "dampening"; "nesterov" ]
        | OptimizerKind.RmsProp -> [ "alpha"; "eps"; "centered" ]
        | OptimizerKind.Adafactor -> [ "clip_threshold"; "decay_rate"; "scale_parameter" ]
        | OptimizerKind.Lion -> []

    /// Constructor keywords that a flag of its own sets (HF Trainer passes them from TrainingArguments).
    let private ownFlags (kind: OptimizerKind) : (string * string) list =
        [ yield "lr", "{learning_rate}"
          yield "weight_decay", "{weight_decay}"
          match kind with
          | OptimizerKind.AdamW -> yield! [ "betas", "{adam_beta1} and {adam_beta2}"; "eps", "{adam_epsilon}" ]
          | OptimizerKind.Lion -> yield "betas", "{adam_beta1} and {adam_beta2}"
          | OptimizerKind.Sgd
          | OptimizerKind.RmsProp -> yield "momentum", "{momentum}"
          | OptimizerKind.Adafactor -> () ]

    /// Why a keyword of the reference constructor is not taken here, when it is one.
    let private unsupported (kind: OptimizerKind) (key: string) : string option =
        match kind, key with
        | OptimizerKind.Adafactor, ("relative_step" | "warmup_init") ->
            Some "is not taken: HF Trainer's adafactor runs on the scheduled --learning-rate (relative_step False); Adafactor's own relative step needs lr=None"
        | OptimizerKind.Adafactor, "beta1" -> Some "is not taken: this Adafactor keeps no first moment (transformers' beta1=None)"
        | OptimizerKind.Adafactor, "eps" -> Some "is not taken: transformers' eps is a pair (1e-30, 1e-3), which key=value pairs cannot hold"
        | OptimizerKind.AdamW, ("fused" | "foreach" | "capturable" | "differentiable") ->
            Some "is not taken: it chooses torch's kernel, not the update (ours is one fused pass on the flat buffer)"
        | _ -> None

    /// The pairs of an optim_args text, in order; an entry without '=' or a key given twice is refused.
    let parsePairs (origin: string) (text: string) : (string * string) list =
        if String.IsNullOrWhiteSpace text then []
        else
            let compact = String(text.ToCharArray() |> Array.filter (fun c -> not (Char.IsWhiteSpace c)))
            let pairs =
                compact.Split(',', StringSplitOptions.RemoveEmptyEntries)
                |> Array.map (fun entry ->
                    match entry.IndexOf '=' with
                    | i when i > 0 && i < entry.Length - 1 -> entry.Substring(0, i).ToLowerInvariant(), entry.Substring(i + 1)
                    | _ ->
                        InvalidInput.failSetting origin
                            (sprintf "expected key=value pairs separated by commas (HF's optim_args, e.g. \"alpha=0.9,centered=True\"), got '%s'" entry))
                |> Array.toList
            match pairs |> List.countBy fst |> List.tryFind (fun (_, n) -> n > 1) with
            | Some(key, _) -> InvalidInput.fail origin key "is given twice"
            | None -> pairs

    let private boolean (origin: string) (key: string) (value: string) =
        match value.ToLowerInvariant() with
        | "y" | "yes" | "t" | "true" | "on" | "1" -> true
        | "n" | "no" | "f" | "false" | "off" | "0" -> false
        | _ -> InvalidInput.fail origin key (sprintf "expected True or False, got '%s'" value)

    let private number (origin: string) (key: string) (value: string) =
        match Double.TryParse(value, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, x when Double.IsFinite x -> x
        | _ -> InvalidInput.fail origin key (sprintf "expected a finite number, got '%s'" value)

    /// options with the optim_args text applied for options.Optimizer. A key the optimizer does not take is
    /// refused, naming it and listing the keys it takes; so is a key a flag of its own sets (naming that
    /// flag), and a value that contradicts a flag given with another value (--amsgrad with amsgrad=False,
    /// --dampening 0.5 with dampening=0.3). origin names the option for errors ("{optim_args}").
    let apply (origin: string) (text: string) (options: TrainOptions) : TrainOptions =
        let kind = options.Optimizer
        let name = OptimizerKind.names |> List.find (fun (_, k) -> k = kind) |> fst
        let takes = accepted kind
        let agree (flag: string) (given: bool) (key: string) =
            if given then
                InvalidInput.fail origin key (sprintf "contradicts %s, which sets another value" flag)
        parsePairs origin text
        |> List.fold
            (fun (o: TrainOptions) (key, value) ->
                match ownFlags kind |> List.tryFind (fun (k, _) -> k = key) with
                | Some(_, flag) -> InvalidInput.fail origin key (sprintf "is set by %s, not by {optim_args}" flag)
                | None ->
                    match unsupported kind key with
                    | Some problem -> InvalidInput.fail origin key problem
                    | None ->
                        if not (List.contains key takes) then
                            InvalidInput.fail origin key
                                (if takes.IsEmpty then sprintf "the %s optimizer takes no {optim_args}" name
                                 else sprintf "unknown key for the %s optimizer (expected %s)" name (String.Join(", ", takes)))
                        match key with
                        | "amsgrad" ->
                            let v = boolean origin key value
                            agree "{amsgrad}" (o.Amsgrad && not v) key
                            { o with Amsgrad = v }
                        | "maximize" ->
                            let v = boolean origin key value
                            agree "{maximize}" (o.Maximize && not v) key
                            { o with Maximize = v }
                        | "dampening" ->
                            let v = number origin key value
                            agree "{dampening}" (o.Dampening <> 0.0 && o.Dampening <> v) key
                            { o with Dampening = v }
                        | "nesterov" ->
                            let v = boolean origin key value
                            agree "{nesterov}" (o.Nesterov && not v) key
                            { o with Nesterov = v }
                        | "alpha" -> { o with RmsPropAlpha = number origin key value }
                        | "eps" -> { o with RmsPropEpsilon = number origin key value }
                        | "centered" -> { o with RmsPropCentered = boolean origin key value }
                        | "clip_threshold" -> { o with AdafactorClipThreshold = number origin key value }
                        | "decay_rate" -> { o with AdafactorDecayRate = number origin key value }
                        | _ -> { o with AdafactorScaleParameter = boolean origin key value })
            options
