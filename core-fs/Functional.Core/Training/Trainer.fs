namespace Functional.Training

open System
open System.Diagnostics
open TorchSharp
open Functional
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Optim
open Functional.Runtime

/// What the trainer reports after a logged optimizer step.
[<NoComparison>]
type StepLog =
    { /// The optimizer step just taken, from 1.
      Step: int
      /// The optimizer steps of the whole run.
      TotalSteps: int
      /// The step this process started from: 0, or the step of the checkpoint it resumed from. Step -
      /// StartStep steps were trained by this process (what its speed and time left are measured on).
      StartStep: int
      /// Fractional epoch reached: completed micro-batches / micro-batches per epoch (HF's "epoch").
      Epoch: float
      /// The window's token-weighted mean loss.
      Loss: float
      /// The learning rate this update used; for a skipped update (fp16 overflow), the rate the next
      /// update will use (the schedule did not advance).
      LearningRate: float
      /// The global gradient norm before clipping (NaN for a skipped update: the gradients overflowed).
      GradNorm: float
      /// Predicted tokens in the window.
      PredictedTokens: int64
      /// This process's own token-weighted mean loss over its rows of the window: its loss sum / RankTokens
      /// (NaN when it predicted no token). With one process it equals Loss; over N processes the sum of
      /// RankLoss * RankTokens over the processes / PredictedTokens is Loss (--log-each-rank writes it).
      RankLoss: float
      /// Predicted tokens of this process's rows of the window (their sum over the processes is PredictedTokens).
      RankTokens: int64
      /// Real tokens processed per second since training started in this process.
      TokensPerSecond: float
      /// Seconds since training started.
      ElapsedSeconds: float
      /// With --fp16: the loss scale this window's losses were multiplied by (before the scaler's
      /// update for this step); None otherwise.
      LossScale: float option
      /// Whether this step's optimizer update was skipped because its fp16 gradients overflowed.
      UpdateSkipped: bool
      /// Skipped updates so far in the run, this one included, counting those before a resume.
      SkippedSteps: int
      /// The intra-op threads this step ran with (see Functional.Runtime.ThreadBudget).
      Threads: int
      /// The most threads the run may use: the fixed count, or libtorch's default when the count adapts to
      /// the machine's load (the count it starts with).
      MaxThreads: int }

/// The phases of a training step that a PhaseClock tells apart.
type TrainingPhase =
    /// The forward pass and the loss of every micro-batch.
    | Forward = 0
    /// The backward pass of every micro-batch (and, under mixed precision, moving its gradients to the
    /// fp32 master).
    | Backward = 1
    /// Clipping, the optimizer update, refreshing a mixed-precision compute copy, zeroing the gradients.
    | Optimizer = 2
    /// Everything else: collation, loss read-back, logging, the hooks, releasing the step's tensors.
    | Other = 3
    /// The collectives between the processes of a data-parallel run: the window's token count, the
    /// gradients' all-reduce or reduce-scatter, the parameters' all-gather (ZeRO), the logged loss.
    | Communication = 4

/// Wall-clock time per phase of the training steps, for benchmarks (`functional bench train`): give one
/// to the trainer through LoopPlan.PhaseClock. Each Mark charges the time since the previous Mark (or
/// Reset) to a phase, so the phases add up to the wall-clock time since Reset.
[<Sealed>]
type PhaseClock() =
    let ticks = Array.zeroCreate<int64> 5
    let mutable last = Stopwatch.GetTimestamp()

    /// Charges the time since the previous mark (or Reset) to phase.
    member _.Mark(phase: TrainingPhase) =
        let now = Stopwatch.GetTimestamp()
        ticks[int phase] <- ticks[int phase] + (now - last)
        last <- now

    /// Moves seconds already charged to one phase to another (time a phase spent waiting for collectives
    /// inside it, e.g. ZeRO stage 3's gathers during forward and backward, is communication).
    member _.Move(from: TrainingPhase, target: TrainingPhase, seconds: float) =
        let moved = min ticks[int from] (int64 (seconds * float Stopwatch.Frequency))
        ticks[int from] <- ticks[int from] - moved
        ticks[int target] <- ticks[int target] + moved

    /// Forgets every phase's time and starts counting from now.
    member _.Reset() =
        Array.fill ticks 0 ticks.Length 0L
        last <- Stopwatch.GetTimestamp()

    /// The seconds charged to phase since Reset.
    member _.Seconds(phase: TrainingPhase) : float = float ticks[int phase] / float Stopwatch.Frequency

/// A run's shape, computed from the options and the dataset size before training starts.
[<NoComparison; NoEquality>]
type LoopPlan =
    { /// The validated options.
      Options: TrainOptions
      /// Micro-batches per epoch and per optimizer step.
      Accumulation: AccumulationPlan
      /// Optimizer steps of the run.
      TotalSteps: int
      /// Warmup steps of the schedule.
      WarmupSteps: int
      /// The learning rate of update k (from 0).
      Schedule: int -> float
      /// With reduce_lr_on_plateau: the schedule's state, which Schedule reads and each evaluation during
      /// the run steps (with the metric of metric_for_best_model); None for the other schedules.
      Plateau: PlateauSchedule option
      /// When set, the trainer charges the time of every step's phases to it (benchmarks); None (what
      /// plan gives) costs nothing.
      PhaseClock: PhaseClock option }

/// What a finished training loop leaves.
[<NoComparison; NoEquality>]
type TrainResult =
    { /// The flat parameter and gradient buffers the model's parameters alias.
      Parameters: FlatParameters
      /// The optimizer state at the end (of OptimizerShard's elements of the flat buffers).
      OptimizerState: ITransformState
      /// The elements of the flat buffers this process's optimizer state covers: all of them, or under
      /// ZeRO stage 1 or 2 its block (Sharding.block).
      OptimizerShard: ShardRange
      /// The bytes of parameters this process kept between steps: the flat values (stages 0 to 2), or its
      /// blocks of them (stage 3; a unit is whole only while it runs). Parameters that did not train are not counted.
      ParameterBytes: int64
      /// The bytes of gradients this process kept: the flat gradient buffer backward writes (stages 0 to 2),
      /// plus the reduced block at stage 2, or its blocks (stage 3).
      GradientBytes: int64
      /// The last step's loss (NaN when a resumed run had no step left).
      FinalLoss: float
      /// Optimizer steps completed, counting those before a resume.
      Steps: int
      /// Whether a hook stopped the run before the planned steps.
      Stopped: bool }

/// Where a resumed run starts: everything a checkpoint stores besides the model's weights (which
/// the caller has already loaded into the model).
[<NoComparison; NoEquality>]
type ResumePoint =
    { /// The accumulation state after the checkpoint's optimizer step (a window boundary): epoch,
      /// micro-batch within the epoch and optimizer step. The data order is recomputed from (seed,
      /// epoch), so no row before this position is read again.
      Accumulation: AccumulationState
      /// The optimizer state tensors by their stable names (Transform.stateTensors).
      OptimizerState: (string * torch.Tensor) list
      /// torch's global random state (dropout), as torch.get_rng_state gives it.
      RandomState: torch.Tensor
      /// The fp16 loss scaler's state after the checkpoint's step (StepContext.LossScale); None starts
      /// the scaler afresh (LossScaler.init), and is what runs without --fp16 store.
      LossScale: LossScalerState option }

/// What the trainer tells the caller after every optimizer step.
[<NoComparison; NoEquality>]
type StepContext =
    { /// The step's figures (also passed to OnLog when the step is logged).
      Log: StepLog
      /// Whether this step was logged (by the LoggingStrategy: every LoggingSteps or each epoch's end; and the last).
      Logged: bool
      /// The accumulation state after the step: a checkpoint's data position.
      Accumulation: AccumulationState
      /// Whether this step ended an epoch.
      EpochEnded: bool
      /// Input tokens this process has trained on, padding included: the elements of every micro-batch's
      /// input_ids so far (HF's num_input_tokens_seen counts them so).
      InputTokensSeen: int64
      /// The flat parameters (the model's parameters alias them).
      Parameters: FlatParameters
      /// The optimizer state after the step (of OptimizerShard's elements of the flat buffers).
      OptimizerState: ITransformState
      /// The elements of Parameters this process's optimizer state covers: all of them, or under ZeRO
      /// stage 1 or 2 its block (a checkpoint stores each process's block).
      OptimizerShard: ShardRange
      /// Under ZeRO stage 3, the parameter fragments this process's optimizer state holds (its blocks of
      /// the layers); None when the state covers OptimizerShard of Parameters.
      OptimizerFragments: StateFragment list option
      /// Makes the model's parameters whole until the result is disposed: under ZeRO stage 3 they exist only
      /// while used, so a hook that evaluates or saves the model gathers them first (every process at the
      /// same step); a no-op otherwise.
      GatherParameters: unit -> IDisposable
      /// The processes of the run.
      Communicator: ICommunicator
      /// With --fp16: the loss scaler's state after this step's update (store it in checkpoints);
      /// None otherwise.
      LossScale: LossScalerState option
      /// The model forward and backward run on: the bf16/fp16 compute copy under mixed precision
      /// (refreshed from Parameters after every update; evaluate with it to measure what training
      /// sees), else the trained model itself. Valid during the hook only.
      ComputeModel: CausalLm }

/// What the caller decides after a step.
[<RequireQualifiedAccess>]
type StepDecision =
    /// Go on with the next step (if any).
    | Continue
    /// Stop now (early stopping, interruption); the run ends after this step.
    | Stop

/// The trainer's calls back to its caller.
[<NoComparison; NoEquality>]
type TrainHooks =
    { /// After every logged step.
      OnLog: StepLog -> unit
      /// After every optimizer step: evaluate, save, decide whether to stop.
      AfterStep: StepContext -> StepDecision }

/// What a training run is given besides where it starts (ResumePoint) and its hooks: TrainingLoop.run's
/// environment. TrainingLoop.setup makes the usual one; change fields with `{ run with ... }`.
[<NoComparison; NoEquality>]
type TrainRun =
    { /// The run's shape (TrainingLoop.plan; TrainingLoop.planFor for several processes).
      Plan: LoopPlan
      /// The model to train (fp32).
      Model: CausalLm
      /// Under --bf16/--fp16, what to attach to the low-precision compute copy of Model (e.g.
      /// an adapter's AttachToCompute (Peft.Adapter) for LoRA adapters); MixedPrecision.attachNothing when nothing is
      /// attached. Not used in fp32.
      Attach: CausalLm -> ComputeAttachment
      /// The parameters that train (all of Model's, or e.g. only LoRA adapters: the others stay frozen),
      /// by name, in the order of the flat buffers.
      Parameters: seq<struct (string * TorchSharp.Modules.Parameter)>
      /// Each trained parameter's peak learning rate by name: the options' LearningRate for all but
      /// parameter groups with their own rate (the schedule scales them alike).
      LearningRate: string -> float
      /// The training rows.
      Dataset: TokenizedDataset
      /// What the step minimizes (Objective.causalLm, or Objective.causalLmWith the options' LossChunkSize).
      Objective: Objective
      /// The processes of the run (Communicator.singleProcess): the step all-reduces the window's count,
      /// the gradients and the logged loss through it, and reads only its rank's rows.
      Communicator: ICommunicator
      /// DeepSpeed's ZeRO stage (0, what setup gives: every process holds all the state): 1 keeps only
      /// this process's block of the optimizer state (Sharding.block over the flat buffer), 2 also
      /// reduce-scatters the gradients into that block instead of all-reducing them. Both then update the
      /// block and all-gather the parameters. 3 also shards the parameters (ZeroThree): each layer's are
      /// gathered for its forward and for its recomputation in backward, then freed, and its gradients are
      /// reduce-scattered per micro-batch.
      ZeroStage: int
      /// The bucket sizes of the gradient reductions and parameter gathers (CollectiveBuckets.defaults:
      /// DeepSpeed's 5e8 elements each).
      Buckets: CollectiveBuckets
      /// Model parallelism within each process's copy of the model (None, what setup gives: the model is
      /// whole). Communicator is then the data-parallel group.
      ModelParallel: ModelParallelHooks option }

/// What a run whose model is split over several processes (tensor parallelism, Distributed.
/// TensorParallelLlama; pipeline parallelism, PipelineTraining) adds to the step.
and [<NoComparison; NoEquality>] ModelParallelHooks =
    { /// After the window's gradients are reduced over the data-parallel group, before clipping: sums
      /// the gradients that are partial on each process of the model's group (Qwen3's q/k norms under
      /// tensor parallelism, a tied embedding's two uses under pipeline parallelism).
      ReduceGradients: unit -> unit
      /// The squared gradient norm of the whole model from this process's squared norm (the clip norm
      /// of the split model).
      NormReduction: NormReduction
      /// Runs the forwards and backwards of a window's micro-batches itself (pipeline parallelism: this
      /// process's stage of each, in its stage's schedule), each micro-batch's loss sum multiplied by the
      /// given scale before its backward; returns every micro-batch's loss sum, the same on every process
      /// of the model's group. None: the trainer runs each micro-batch's forward and backward itself.
      RunWindow: (MicroBatch list -> float -> float list) option }

/// The rows of one epoch as micro-batches of row indices, in the order this process visits them.
[<NoComparison; NoEquality>]
type EpochOrder =
    { /// The epoch, from 0.
      Epoch: int
      /// The epoch's micro-batches (Sampler.distributed, then Batching.microBatches).
      MicroBatches: int[][] }

/// How a step's gradients reach the optimizer and its update reaches every process (ZeRO stages 0 to 2).
[<NoComparison; NoEquality>]
type GradientSync =
    { /// The ZeRO stage.
      Stage: int
      /// The elements of the flat buffers this process's optimizer updates: all of them at stage 0.
      Shard: ShardRange
      /// What the optimizer steps on: the flat buffers themselves at stage 0, else views of this process's
      /// block of the values and of the reduced gradients.
      OptimizerFlat: FlatParameters
      /// Stage 2: this process's block of the reduce-scattered gradient (Sharding.blockLength elements).
      ReducedGrads: torch.Tensor option
      /// Stage 3: the sharded parameters.
      Zero3: ZeroThree option
      /// The bucket sizes of the collectives over the flat buffers.
      Buckets: CollectiveBuckets }

    /// Whether the optimizer updates a block and the parameters are all-gathered after it.
    member this.Sharded = this.Stage > 0

/// Everything a training step reads and does not change: built once per run by TrainingLoop.run.
[<NoComparison; NoEquality>]
type StepEnv =
    { /// The run's shape.
      Plan: LoopPlan
      /// The training rows.
      Dataset: TokenizedDataset
      /// The length rows are truncated to (TrainOptions.sequenceLength).
      MaxSeqLen: int
      /// What the step minimizes.
      Objective: Objective
      /// The processes of the run.
      Communicator: ICommunicator
      /// The fp32 flat parameters and gradients the trained parameters alias (under ZeRO stage 3, this
      /// process's blocks: ZeroThree.ShardFlat).
      Flat: FlatParameters
      /// Under --bf16/--fp16, the low-precision compute copy; None in fp32.
      Compute: ComputeCopy option
      /// The model forward and backward run on: the compute copy's, else the trained model.
      ComputeModel: CausalLm
      /// The optimizer over Sync.OptimizerFlat.
      Optimizer: FlatOptimizer
      /// How gradients and updates travel between the processes (ZeRO).
      Sync: GradientSync
      /// Under --fp16, the loss scaler's settings; None otherwise.
      LossScaler: LossScalerConfig option
      /// Started when training started in this process (StepLog.ElapsedSeconds, TokensPerSecond).
      Clock: Stopwatch
      /// After the window's gradients are reduced (ModelParallelHooks.ReduceGradients; nothing for a whole
      /// model).
      AfterGradientReduction: unit -> unit
      /// Pipeline parallelism's window (ModelParallelHooks.RunWindow); None: micro-batch by micro-batch.
      RunWindow: (MicroBatch list -> float -> float list) option
      /// The step this process started from (StepLog.StartStep).
      StartStep: int
      /// The updates applied before this process started (the weights are checked after its first one).
      UpdatesAtStart: int }

/// Where training stands between two optimizer steps: everything the step changes, as one value.
/// A run starts from Trainer's initial state (fresh, or a resume point's) and folds the step over it.
/// The optimizer state's buffers are updated in place (Transform: a state must not be read after it
/// was passed on), so a TrainState must not be used again once a step was taken from it.
[<NoComparison; NoEquality>]
type TrainState =
    { /// The data position and window bookkeeping (a checkpoint's position).
      Accumulation: AccumulationState
      /// The optimizer's state.
      OptimizerState: ITransformState
      /// Under --fp16, the loss scaler's state; None otherwise.
      LossScale: LossScalerState option
      /// Optimizer updates applied, counting those before a resume.
      Updates: int
      /// Steps whose update was skipped (fp16 overflow), counting those before a resume.
      Skipped: int
      /// Real tokens this process has trained on.
      TokensSeen: int64
      /// Input tokens this process has trained on, padding included (StepContext.InputTokensSeen).
      InputTokensSeen: int64
      /// The intra-op threads the next step runs with.
      Threads: ThreadBudget
      /// The last step's loss (NaN before the first).
      LastLoss: float
      /// The current epoch's micro-batches (recomputed from (seed, epoch) when the epoch changes).
      Order: EpochOrder }

/// The training loop: a fold of optimizer steps over accumulation windows of micro-batches.
[<RequireQualifiedAccess>]
module TrainingLoop =

    /// TrainingLoop.optimizer with the clip norm reduced by reduction: Transform.localNorm when the
    /// optimizer sees the whole gradient, the sum over the processes when it sees a block of it (ZeRO).
    /// slots are the parameters' places in the flat buffers the optimizer steps (Transform.slotsOf),
    /// which Adafactor's factored moments need; None when the optimizer sees blocks of parameters
    /// (ZeRO), where Adafactor is refused.
    let optimizerWith
        (reduction: NormReduction)
        (options: TrainOptions)
        (schedule: int -> float)
        (decayMask: torch.Tensor)
        (learningRateRatios: torch.Tensor option)
        (slots: Transform.ParameterSlot list option)
        : FlatOptimizer =
        let chained optimizer =
            Optimizer.unfused (Optimizer.trainerChain reduction options.MaxGradNorm optimizer learningRateRatios)
        match options.Optimizer with
        | OptimizerKind.AdamW ->
            Optimizer.fusedAdamW
                { Schedule = schedule
                  Beta1 = options.AdamBeta1
                  Beta2 = options.AdamBeta2
                  Epsilon = options.AdamEpsilon
                  WeightDecay = options.WeightDecay
                  DecayMask = decayMask
                  MaxGradNorm = options.MaxGradNorm
                  NormReduction = reduction
                  Factors = learningRateRatios
                  Amsgrad = options.Amsgrad
                  Maximize = options.Maximize }
        | OptimizerKind.Sgd ->
            chained (Optimizer.sgdWith schedule options.Momentum options.Dampening options.Nesterov options.WeightDecay decayMask)
        | OptimizerKind.Lion ->
            chained (Optimizer.lion schedule options.AdamBeta1 options.AdamBeta2 options.WeightDecay decayMask)
        | OptimizerKind.RmsProp ->
            chained (Optimizer.rmsprop schedule options.RmsPropAlpha options.RmsPropEpsilon options.Momentum options.RmsPropCentered options.WeightDecay decayMask)
        | OptimizerKind.Adafactor ->
            match slots with
            | Some slots ->
                let settings =
                    { Transform.adafactorDefaults with
                        RelativeStep = false
                        ScaleParameter = options.AdafactorScaleParameter
                        ClipThreshold = options.AdafactorClipThreshold
                        DecayRate = options.AdafactorDecayRate
                        WeightDecay = options.WeightDecay }
                chained (Optimizer.adafactor schedule slots settings decayMask)
            | None ->
                InvalidInput.failSetting "{optim}"
                    "adafactor keeps factored statistics of whole parameters and cannot run on ZeRO's blocks of them"

    /// The optimizer for the options: clipping (or only measuring the norm), the optimizer on the
    /// schedule, and, when some parameters have their own learning rate, the per-parameter ratio, as
    /// chain [clipByGlobalNorm; adamW, sgd, lion, rmsprop or adafactor; scaleByFactors]. AdamW steps
    /// through the fused kernel (Optimizer.fusedAdamW, the chain with amsgrad), the others through the
    /// chain. slots: as optimizerWith.
    let optimizer
        (options: TrainOptions)
        (schedule: int -> float)
        (decayMask: torch.Tensor)
        (learningRateRatios: torch.Tensor option)
        (slots: Transform.ParameterSlot list option)
        : FlatOptimizer =
        optimizerWith Transform.localNorm options schedule decayMask learningRateRatios slots

    /// The micro-batches of one epoch in the order this process visits them: its rank's share of the
    /// epoch's order (Sampler.distributed; with one process, the whole order: file order, or shuffled
    /// by (seed, epoch)).
    let private epochOrder (options: TrainOptions) (communicator: ICommunicator) (rowCount: int) (epoch: int) : EpochOrder =
        let order = Sampler.distributed communicator.Rank communicator.Size options.Shuffle options.Seed epoch rowCount
        { Epoch = epoch; MicroBatches = Batching.microBatches options.PerDeviceTrainBatchSize order }

    /// Plans a run over rowCount rows: micro-batches per epoch, accumulation windows, total steps,
    /// warmup and schedule. Pure; raises InvalidInputException for options that cannot make a run
    /// (e.g. a warmup longer than the run), so callers can check everything before writing anything.
    let plan (options: TrainOptions) (rowCount: int) : LoopPlan =
        TrainOptions.validate options
        let microBatchesPerEpoch = (rowCount + options.PerDeviceTrainBatchSize - 1) / options.PerDeviceTrainBatchSize
        let accumulation = Accumulation.plan microBatchesPerEpoch options.GradientAccumulationSteps
        let totalSteps = TrainOptions.totalSteps options (Accumulation.stepsPerEpoch accumulation)
        let warmup = TrainOptions.warmupSteps options totalSteps
        let schedule, plateau =
            try
                match options.LrSchedulerType with
                | SchedulerKind.ReduceLrOnPlateau ->
                    let plateau = PlateauSchedule(Schedule.plateauOptions options.LrSchedulerOptions, options.LearningRate)
                    plateau.Rate, Some plateau
                | kind -> Schedule.create kind options.LearningRate warmup totalSteps options.LrSchedulerOptions, None
            with :? ArgumentException as e -> InvalidInput.setting "lr_scheduler_kwargs" e.Message
        { Options = options
          Accumulation = accumulation
          TotalSteps = totalSteps
          WarmupSteps = warmup
          Schedule = schedule
          Plateau = plateau
          PhaseClock = None }

    /// Plans a run of worldSize processes over rowCount rows: plan over the rows each process trains
    /// on, ceil(rowCount / worldSize) (Sampler.distributed). planFor 1 is plan.
    let planFor (worldSize: int) (options: TrainOptions) (rowCount: int) : LoopPlan =
        if worldSize < 1 then invalidArg (nameof worldSize) (sprintf "the world size must be at least 1, got %d" worldSize)
        plan options ((rowCount + worldSize - 1) / worldSize)

    /// The padding id of training and evaluation batches. Padding is right-aligned and labelled -100,
    /// and attention is causal, so no real token sees it: any id gives the same result.
    [<Literal>]
    let PadId = 0L

    /// Raises the InvalidInputException of a run whose figures stopped being finite at step: origin
    /// "step N", the problem what was non-finite, and what to change.
    let private diverged (options: TrainOptions) (step: int) (what: string) : 'T =
        InvalidInput.fail (sprintf "step %d" step) ""
            (sprintf "%s: training diverged (or the data or weights are damaged), so the run stops and writes no final model; checkpoints saved before stay. Lower {learning_rate} (%g now), keep {max_grad_norm} on, or check the model's weights"
                what options.LearningRate)

    /// Refuses to go on (or save) with parameters that hold NaN or infinite values: raises the
    /// InvalidInputException of a diverged run (origin "step N", as after a non-finite loss) unless
    /// every value of flat is finite (FlatParameters.allFinite, one reduction). Callers run it before
    /// saving a checkpoint or a final model, so no non-finite weights are ever written.
    let ensureFinite (options: TrainOptions) (step: int) (flat: FlatParameters) : unit =
        if not (FlatParameters.allFinite flat) then
            diverged options step "the weights hold NaN or infinite values after the update"


    /// The usual run of model on dataset as planned: every parameter of model trains at the options'
    /// learning rate, nothing is attached to a compute copy, the objective is causal language modelling
    /// (chunked when the options' LossChunkSize > 0, Objective.causalLmWith) and the run has one process. Change fields with `{ TrainingLoop.setup plan model dataset with ... }`.
    let setup (plan: LoopPlan) (model: CausalLm) (dataset: TokenizedDataset) : TrainRun =
        { Plan = plan
          Model = model
          Attach = MixedPrecision.attachNothing
          Parameters = model.Module.named_parameters ()
          LearningRate = fun _ -> plan.Options.LearningRate
          Dataset = dataset
          Objective = Objective.causalLmWith plan.Options.LossChunkSize
          Communicator = Communicator.singleProcess
          ZeroStage = 0
          Buckets = CollectiveBuckets.defaults
          ModelParallel = None }

    /// What the micro-batches of a window have left so far: the accumulation state, the window's
    /// report (after its last micro-batch), and this process's loss sum and token counts.
    [<NoComparison; NoEquality>]
    type private WindowProgress =
        { Accumulation: AccumulationState
          Report: StepReport option
          LossSum: float
          Tokens: int64
          InputTokens: int64 }

    let private mark (env: StepEnv) (phase: TrainingPhase) = env.Plan.PhaseClock |> Option.iter (fun c -> c.Mark phase)

    /// Forward and backward of one micro-batch of the window (its loss multiplied by scale), its
    /// gradients moved to the fp32 master under mixed precision, and its loss observed.
    let rec private microBatch (env: StepEnv) (scale: float) (progress: WindowProgress) (index: int, batch: MicroBatch) : WindowProgress =
        mark env TrainingPhase.Other
        env.Sync.Zero3 |> Option.iter (fun z -> z.BeginMicroBatch())
        use lossSum = env.Objective.LossSum env.ComputeModel batch
        mark env TrainingPhase.Forward
        let collectives (phase: TrainingPhase) =
            match env.Sync.Zero3, env.Plan.PhaseClock with
            | Some z, Some clock -> clock.Move(phase, TrainingPhase.Communication, z.TakeCollectiveSeconds())
            | _ -> ()
        collectives TrainingPhase.Forward
        use scaled = lossSum * scale
        scaled.backward ()
        env.Sync.Zero3 |> Option.iter (fun z -> z.EndMicroBatch())
        // The window's first micro-batch overwrites the master gradients; later ones add to them.
        // (Stage 3 reduced the compute copy's gradients into the master's blocks unit by unit.)
        if env.Sync.Zero3.IsNone then
            env.Compute |> Option.iter (fun c -> MixedPrecision.accumulateGradients c env.Flat (index = 0))
        mark env TrainingPhase.Backward
        collectives TrainingPhase.Backward
        observed env progress batch (lossSum.item<float32> () |> float)

    /// The window's progress after a micro-batch whose loss sum was loss.
    and private observed (env: StepEnv) (progress: WindowProgress) (batch: MicroBatch) (loss: float) : WindowProgress =
        let accumulation, event = Accumulation.observe env.Plan.Accumulation progress.Accumulation loss
        { Accumulation = accumulation
          Report =
            match event with
            | AccumulationEvent.Step report -> Some report
            | AccumulationEvent.Accumulating -> progress.Report
          LossSum = progress.LossSum + loss
          Tokens = progress.Tokens + batch.Tokens
          InputTokens = progress.InputTokens + batch.InputIds.numel () }

    /// After the window's gradients are in: under --fp16 the loss scaler's verdict (skip on overflow,
    /// else unscale), then the optimizer update, and the gradients zeroed. Returns whether the update
    /// ran, the optimizer state and the loss scaler state after it.
    let private update (env: StepEnv) (state: TrainState) (step: int) : bool * ITransformState * LossScalerState option =
        let grads = env.Sync.OptimizerFlat.Grads
        let applied, lossScale =
            match env.LossScaler, state.LossScale with
            | Some config, Some scaler ->
                // Each process sees its block of the gradient under ZeRO: all must skip together.
                let overflow =
                    let local = LossScaler.hasOverflow grads
                    if env.Sync.Sharded then Communicator.sumInt64 env.Communicator (if local then 1L else 0L) > 0L else local
                let decision = LossScaler.decide config scaler overflow
                if decision.Change = OverflowAtMinimum then
                    InvalidInput.setting "fp16"
                        (sprintf "the gradients overflowed at the minimum loss scale %g in step %d: fp16 cannot hold them (lower {min_loss_scale}, or train with {bf16})"
                            scaler.Scale step)
                if decision.ApplyUpdate then LossScaler.unscale scaler.Scale grads
                decision.ApplyUpdate, Some decision.Next
            | _ -> true, state.LossScale
        mark env TrainingPhase.Other
        let computeValues = env.Compute |> Option.map (fun c -> c.Values)
        let optimizerState =
            if not applied then state.OptimizerState
            elif not env.Sync.Sharded then env.Optimizer.Step env.Flat state.OptimizerState computeValues
            elif env.Sync.Zero3.IsSome then
                // Stage 3: the parameters are gathered from the blocks when they are next used.
                env.Optimizer.Step env.Sync.OptimizerFlat state.OptimizerState None
            else
                // ZeRO: this process updates its block, then every process gathers all blocks (and refreshes
                // its whole compute copy from them).
                let next = env.Optimizer.Step env.Sync.OptimizerFlat state.OptimizerState None
                mark env TrainingPhase.Optimizer
                Sharding.allGather env.Communicator env.Sync.Buckets.Allgather env.Sync.OptimizerFlat.Values env.Flat.Values
                mark env TrainingPhase.Communication
                computeValues |> Option.iter (fun copy -> (use _ = torch.no_grad () in copy.copy_ env.Flat.Values |> ignore))
                next
        // With a compute copy, the window's first micro-batch overwrites the master gradients
        // (MixedPrecision.accumulateGradients): only fp32 training and stage 3 accumulate into them.
        if env.Compute.IsNone || env.Sync.Zero3.IsSome then FlatParameters.zeroGrads env.Flat
        mark env TrainingPhase.Optimizer
        applied, optimizerState, lossScale

    /// Refuses a diverged update (before the hooks see it): a non-finite loss of a window with
    /// predicted tokens or gradient norm, or non-finite weights after this process's first update.
    let private checkFinite (env: StepEnv) (next: TrainState) (step: int) (tokens: int64) : unit =
        let options = env.Plan.Options
        // A window without predicted tokens has a NaN mean loss by definition, and no gradient.
        if tokens > 0L && not (Double.IsFinite next.LastLoss) then diverged options step (sprintf "the loss is %g" next.LastLoss)
        let gradNorm = Transform.lastGradNorm next.OptimizerState
        if not (Double.IsFinite gradNorm) then diverged options step (sprintf "the gradient norm is %g" gradNorm)
        if next.Updates = env.UpdatesAtStart + 1 then ensureFinite options step env.Flat

    /// The figures of the step from state to next that ended the window of report.
    let private stepLog (env: StepEnv) (state: TrainState) (next: TrainState) (report: StepReport) (rankLossSum: float, rankTokens: int64) : StepLog =
        let applied = next.Updates > state.Updates
        let seconds = env.Clock.Elapsed.TotalSeconds
        { Step = report.OptimizerStep
          TotalSteps = env.Plan.TotalSteps
          StartStep = env.StartStep
          Epoch = float next.Accumulation.Epoch + float next.Accumulation.MicroBatchInEpoch / float env.Plan.Accumulation.MicroBatchesPerEpoch
          Loss = next.LastLoss
          LearningRate = env.Plan.Schedule state.Updates
          GradNorm = if applied then Transform.lastGradNorm next.OptimizerState else nan
          PredictedTokens = report.Tokens
          RankLoss = if rankTokens = 0L then nan else rankLossSum / float rankTokens
          RankTokens = rankTokens
          TokensPerSecond = float next.TokensSeen / max seconds 1e-9
          ElapsedSeconds = seconds
          LossScale = state.LossScale |> Option.map (fun s -> s.Scale)
          UpdateSkipped = not applied
          SkippedSteps = next.Skipped
          Threads = next.Threads.Threads
          MaxThreads = next.Threads.Maximum }

    /// One optimizer step: collates the next accumulation window, runs forward and backward over its
    /// micro-batches with each loss scaled by 1 / (the window's count over all processes), all-reduces
    /// the gradients and the loss, and applies (or, on an fp16 overflow, skips) the update. Call it
    /// inside a dispose scope (TrainingLoop.run gives each step its own); the state given must not be used again.
    let step (env: StepEnv) (state: TrainState) : TrainState * StepLog =
        let plan = env.Plan.Accumulation
        let order =
            if state.Order.Epoch = state.Accumulation.Epoch then state.Order
            else epochOrder env.Plan.Options env.Communicator env.Dataset.Rows.Length state.Accumulation.Epoch
        let first, size = Accumulation.currentWindow plan state.Accumulation
        let window = [ for i in first .. first + size - 1 -> env.Objective.Collate env.MaxSeqLen PadId env.Dataset order.MicroBatches[i] ]
        // Every process normalizes by the count of the whole window, over all processes.
        let localTokens = window |> List.sumBy env.Objective.Count
        mark env TrainingPhase.Other
        let windowTokens = Communicator.sumInt64 env.Communicator localTokens
        mark env TrainingPhase.Communication
        let scale = Accumulation.lossScale windowTokens * (state.LossScale |> Option.map (fun s -> s.Scale) |> Option.defaultValue 1.0)
        let start =
            { Accumulation = Accumulation.beginWindow plan state.Accumulation windowTokens
              Report = None
              LossSum = 0.0
              Tokens = 0L
              InputTokens = 0L }
        let progress =
            match env.RunWindow with
            | Some runWindow ->
                // Pipeline parallelism: the stages run the window together; every stage gets each loss.
                mark env TrainingPhase.Other
                let losses = runWindow window scale
                mark env TrainingPhase.Forward
                List.fold2 (observed env) start window losses
            | None -> window |> List.indexed |> List.fold (microBatch env scale) start
        let report = progress.Report |> Option.defaultWith (fun () -> invalidOp "an accumulation window ended without an optimizer step")
        // Each process's gradients are of its loss sum / the global count: their sum is the window's gradient.
        mark env TrainingPhase.Other
        match env.Sync.ReducedGrads, env.Sync.Zero3 with
        | Some block, _ -> Sharding.reduceScatter env.Communicator env.Sync.Buckets.Reduce env.Flat.Grads block
        // Stage 3 reduce-scattered every unit's gradients as its backward finished.
        | None, Some _ -> ()
        | None, None -> Sharding.allReduce env.Communicator env.Sync.Buckets.Reduce env.Flat.Grads
        env.AfterGradientReduction ()
        let lossSum = Communicator.sumFloat env.Communicator progress.LossSum
        mark env TrainingPhase.Communication
        let applied, optimizerState, lossScale = update env state report.OptimizerStep
        let next =
            { state with
                Accumulation = progress.Accumulation
                OptimizerState = optimizerState
                LossScale = lossScale
                Updates = if applied then state.Updates + 1 else state.Updates
                Skipped = if applied then state.Skipped else state.Skipped + 1
                TokensSeen = state.TokensSeen + progress.Tokens
                InputTokensSeen = state.InputTokensSeen + progress.InputTokens
                LastLoss = if report.Tokens = 0L then nan else lossSum / float report.Tokens
                Order = order }
        if applied then checkFinite env next report.OptimizerStep report.Tokens
        next, stepLog env state next report (progress.LossSum, localTokens)

    /// One step and the hooks after it in one dispose scope, which releases every tensor the step and
    /// the hooks made and did not keep. Returns the next state and whether a hook stopped the run.
    let private stepWithHooks (env: StepEnv) (hooks: TrainHooks) (state: TrainState) : TrainState * bool =
        use _ = torch.NewDisposeScope()
        let next, log = step env state
        let options = env.Plan.Options
        let epochEnded = next.Accumulation.Epoch > state.Accumulation.Epoch
        let logged =
            log.Step = env.Plan.TotalSteps
            || match options.LoggingStrategy with
               | IntervalStrategy.Steps -> log.Step % options.LoggingSteps = 0
               | IntervalStrategy.Epoch -> epochEnded
               | IntervalStrategy.No -> false
        if logged then hooks.OnLog log
        let decision =
            hooks.AfterStep
                { Log = log
                  Logged = logged
                  Accumulation = next.Accumulation
                  EpochEnded = epochEnded
                  InputTokensSeen = next.InputTokensSeen
                  Parameters = env.Flat
                  OptimizerState = next.OptimizerState
                  OptimizerShard = env.Sync.Shard
                  OptimizerFragments = env.Sync.Zero3 |> Option.map (fun z -> z.Fragments)
                  GatherParameters =
                    fun () ->
                        match env.Sync.Zero3 with
                        | Some z -> z.GatherAll()
                        | None -> { new IDisposable with member _.Dispose() = () }
                  Communicator = env.Communicator
                  LossScale = next.LossScale
                  ComputeModel = env.ComputeModel }
        { next with Threads = ThreadBudget.adjust next.Threads },
        decision = StepDecision.Stop && next.Accumulation.OptimizerStep < env.Plan.TotalSteps

    /// The fold of steps from state until the planned steps are done or a hook stops the run.
    let rec private loop (env: StepEnv) (hooks: TrainHooks) (state: TrainState) : TrainState * bool =
        if state.Accumulation.OptimizerStep >= env.Plan.TotalSteps then state, false
        else
            match stepWithHooks env hooks state with
            | next, true -> next, true
            | next, false -> loop env hooks next

    /// The state a run starts from: the optimizer's fresh state and the start of the data, or a resume
    /// point's optimizer state, data position, random state and loss scale.
    let private initialState
        (run: TrainRun)
        (optimizer: FlatOptimizer)
        (wholeLength: int64)
        (sync: GradientSync)
        (scaler: LossScalerConfig option)
        (threads: ThreadBudget)
        (resume: ResumePoint option)
        : TrainState =
        let fresh = optimizer.Transform.Init sync.OptimizerFlat.Values
        let freshScale = scaler |> Option.map LossScaler.init
        let optimizerState, accumulation, lossScale =
            match resume with
            | Some point ->
                // A checkpoint holds the whole buffers, whatever the processes and stage that saved it (a
                // universal checkpoint): this process takes its block of them.
                let entries =
                    [ for name, tensor in point.OptimizerState ->
                          if sync.Sharded && tensor.dim () = 1L && tensor.numel () = wholeLength then
                              match sync.Zero3 with
                              | Some z -> name, z.Select tensor
                              | None -> name, Sharding.view tensor sync.Shard
                          else name, tensor ]
                let loaded = Transform.loadStateTensors entries fresh
                torch.set_rng_state point.RandomState
                loaded, point.Accumulation, (if scaler.IsSome then Option.orElse freshScale point.LossScale else freshScale)
            | None -> fresh, Accumulation.start, freshScale
        let updates = Optimizer.appliedUpdates optimizerState
        { Accumulation = accumulation
          OptimizerState = optimizerState
          LossScale = lossScale
          Updates = updates
          Skipped = accumulation.OptimizerStep - updates
          TokensSeen = 0L
          InputTokensSeen = 0L
          Threads = threads
          LastLoss = nan
          Order = epochOrder run.Plan.Options run.Communicator run.Dataset.Rows.Length accumulation.Epoch }

    /// The flat learning-rate ratios of the trained parameters to the options' rate, or None when
    /// every parameter trains at that rate.
    let private learningRateRatios (options: TrainOptions) (learningRate: string -> float) (flat: FlatParameters) : torch.Tensor option =
        // A peak rate of 0 trains nothing: every group's rate equals it (ratio 1), or the ratio is
        // undefined and the run is refused (0/0 used to turn every weight into NaN).
        let ratio name =
            let rate = learningRate name
            if rate = options.LearningRate then 1.0
            elif options.LearningRate = 0.0 then
                InvalidInput.setting "learning_rate"
                    (sprintf "must be > 0 when parameter '%s' has its own learning rate %g: the schedule scales each rate by its ratio to {learning_rate}" name rate)
            else rate / options.LearningRate
        if flat.Names |> List.forall (fun name -> ratio name = 1.0) then None
        else
            let factors = torch.ones_like flat.Values
            use _ = torch.no_grad ()
            for name in flat.Names do
                use slice = FlatParameters.sliceOf flat factors name
                slice.fill_(ratio name) |> ignore
            Some factors

    /// The gradient path of a ZeRO stage over flat: stage 0 steps the optimizer on flat itself; stages 1
    /// and 2 on this process's block (Sharding.block) of the values and gradients, stage 2 with a block
    /// buffer the gradients are reduce-scattered into.
    let private gradientSync (communicator: ICommunicator) (stage: int) (buckets: CollectiveBuckets) (flat: FlatParameters) (zero3: ZeroThree option) : GradientSync =
        ZeroStage.validate stage
        match zero3 with
        | Some z ->
            { Stage = 3; Shard = Sharding.whole (z.ShardFlat.Values.numel ()); OptimizerFlat = z.ShardFlat; ReducedGrads = None; Zero3 = Some z; Buckets = buckets }
        | None ->
        if stage = 0 then { Stage = 0; Shard = Sharding.whole (flat.Values.numel ()); OptimizerFlat = flat; ReducedGrads = None; Zero3 = None; Buckets = buckets }
        else
            let total = flat.Values.numel ()
            let shard = Sharding.block total communicator.Size communicator.Rank
            let reduced =
                if stage = 2 then Some(torch.zeros([| Sharding.blockLength total communicator.Size |], dtype = flat.Grads.dtype, device = flat.Grads.device).DetachFromDisposeScope())
                else None
            let grads =
                match reduced with
                | Some block -> block.narrow(0L, 0L, shard.Count)
                | None -> Sharding.view flat.Grads shard
            { Stage = stage
              Shard = shard
              OptimizerFlat = { flat with Values = (Sharding.view flat.Values shard).DetachFromDisposeScope(); Grads = grads.DetachFromDisposeScope() }
              ReducedGrads = reduced
              Zero3 = None
              Buckets = buckets }

    let private disposeSync (sync: GradientSync) =
        if sync.Sharded && sync.Zero3.IsNone then
            sync.OptimizerFlat.Dispose()
            sync.ReducedGrads |> Option.iter (fun t -> t.Dispose())

    /// Trains run.Parameters of run.Model on run.Dataset as planned, from the start or from a resume
    /// point, as a fold of TrainingLoop.step over TrainState. After every optimizer step it calls hooks.OnLog
    /// (logged steps: by the LoggingStrategy, and the last) and hooks.AfterStep, which may stop the run.
    /// Each optimizer step runs in its own dispose scope, with its hooks, so live tensors stay flat over
    /// the run. The model is in train mode during the call and in eval mode after it. The trained
    /// parameters end up aliasing the returned flat buffer.
    ///
    /// Several processes (run.Communicator of size > 1, a plan from TrainingLoop.planFor): each process reads
    /// its rank's rows (Sampler.distributed); the window's count, the gradients (one all-reduce of the flat
    /// buffer) and the logged loss are summed over the processes, so every process applies the same update.
    ///
    /// Mixed precision (options.Precision Bf16 or Fp16): the given parameters are the fp32 master
    /// weights; forward and backward run on a low-precision compute copy of model plus what run.Attach
    /// attaches to it (MixedPrecision.createWith: e.g. an adapter's AttachToCompute (Peft.Adapter) for LoRA adapters, whose
    /// parameters are not the model's), whose gradients are added in fp32 to the master gradients after
    /// every micro-batch; clipping and the optimizer run on the fp32 master, and the trained parameters
    /// of the copy are refreshed from it after every update. Parameters that do not train (a frozen base)
    /// are rounded into the copy once. A trained parameter the copy has no counterpart of raises
    /// InvalidInputException naming --bf16/--fp16. With fp32, Attach is not used. Under ZeRO stage 3 the
    /// copy's trained parameters are gathered unit by unit from the fp32 blocks (rounded once) and their
    /// gradients reduce-scattered in fp32 into the blocks (ZeroThree.create).
    ///
    /// fp16 (DeepSpeed's dynamic loss scaling, LossScaler): each micro-batch's loss is multiplied by
    /// the current scale before backward; after the window, when the gradients hold inf or NaN the
    /// update is skipped: no optimizer step, so neither the optimizer's count nor the learning-rate
    /// schedule advances (DeepSpeed's semantics), the gradients are zeroed and the scale backs off (per
    /// the hysteresis); otherwise the gradients are unscaled and the update runs. A skipped window still
    /// counts as a step of the run (Step, TotalSteps, checkpoints and logs advance, as HF's global step
    /// and DeepSpeed's global_steps do): its data is consumed, and the run ends after TotalSteps windows
    /// whatever was skipped. An overflow at the minimum loss scale ends the run with
    /// InvalidInputException naming --fp16 (as DeepSpeed raises).
    ///
    /// Non-finite figures stop the run with InvalidInputException (origin "step N", before the hooks see
    /// the step, so nothing of it is logged or saved): a NaN or infinite loss (of a window with predicted
    /// tokens) or gradient norm of an applied update, and NaN or infinite weights after this call's first update (ensureFinite). An
    /// fp16 overflow the loss scaler skips is not an error.
    ///
    /// Rows are truncated to TrainOptions.sequenceLength (MaxSeqLen, or 0 for the model's context less
    /// the prefix; a MaxSeqLen above the context raises InvalidInputException naming --max-seq-len).
    let run (run: TrainRun) (resume: ResumePoint option) (hooks: TrainHooks) : TrainResult =
        let plan, model, options = run.Plan, run.Model, run.Plan.Options
        TorchRuntime.ensure ()
        // The plan's epoch must be this process's share of the rows (TrainingLoop.planFor).
        let size = run.Communicator.Size
        let rowsPerProcess = (run.Dataset.Rows.Length + size - 1) / size
        let microBatches = (rowsPerProcess + options.PerDeviceTrainBatchSize - 1) / options.PerDeviceTrainBatchSize
        if microBatches <> plan.Accumulation.MicroBatchesPerEpoch then
            invalidArg (nameof run)
                (sprintf "the plan has %d micro-batches per epoch, but %d rows shared by %d processes make %d: plan with TrainingLoop.planFor %d over the dataset's rows"
                    plan.Accumulation.MicroBatchesPerEpoch run.Dataset.Rows.Length size microBatches size)
        let threads = ThreadBudget.create options.Threads
        let maxSeqLen = TrainOptions.sequenceLength options model.Config (CausalLm.prefixLength model)
        torch.manual_seed options.Seed |> ignore
        model.Module.train ()
        ZeroStage.validate run.ZeroStage
        CollectiveBuckets.validate run.Buckets
        let parameters = [ for struct (name, p) in run.Parameters -> name, p ]
        let whole = FlatParameters.create [ for name, p in parameters -> struct (name, p) ]
        let wholeLength = whole.Values.numel ()
        let computeCell = ref (MixedPrecision.createWith options.Precision model run.Attach whole)
        use _ = { new IDisposable with member _.Dispose() = computeCell.Value |> Option.iter (fun c -> c.Dispose()) }
        // Stage 3 keeps only this process's blocks (and frees the whole buffers): the step works on them.
        // Under mixed precision the compute copy's trained parameters are gathered unit by unit too, so its
        // whole buffers go.
        let zero3 =
            if run.ZeroStage = 3 then
                let computeParameters = computeCell.Value |> Option.map (fun c -> c.DType, Map c.Trained)
                Some(ZeroThree.create run.Communicator run.Buckets model whole parameters computeParameters)
            else None
        use _ = { new IDisposable with member _.Dispose() = zero3 |> Option.iter (fun z -> z.Dispose()) }
        if zero3.IsSome then computeCell.Value <- computeCell.Value |> Option.map MixedPrecision.withoutFlatBuffers
        let compute = computeCell.Value
        let flat = zero3 |> Option.map (fun z -> z.ShardFlat) |> Option.defaultValue whole
        let decayMask =
            // Without weight decay the mask is never read: a one-element view spares a buffer the size
            // of the weights.
            if options.WeightDecay = 0.0 then FlatParameters.uniform flat 1.0f
            else FlatParameters.mask flat (fun name -> not (model.NoWeightDecay.Contains name))
        let sync = gradientSync run.Communicator run.ZeroStage run.Buckets flat zero3
        use _ = { new IDisposable with member _.Dispose() = disposeSync sync }
        // Stages 1 and 2 narrow the whole buffers' masks to the block; stage 3's are laid out as its blocks.
        let narrow (t: torch.Tensor) = if sync.Sharded && zero3.IsNone then Sharding.view t sync.Shard else t
        let reduction =
            match run.ModelParallel with
            | Some hooks when not sync.Sharded -> hooks.NormReduction
            | Some _ -> invalidArg (nameof run) "model parallelism with ZeRO stages above 0 is not supported yet"
            | None -> if sync.Sharded then (fun squared -> Communicator.sumFloat run.Communicator squared) else Transform.localNorm
        let ratios = learningRateRatios options run.LearningRate flat |> Option.map narrow
        let slots = if sync.Sharded || zero3.IsSome then None else Some(Transform.slotsOf flat)
        let optimizer = optimizerWith reduction options plan.Schedule (narrow decayMask) ratios slots
        let backbone = zero3 |> Option.bind (fun _ -> ZeroThree.backbone (compute |> Option.map (fun c -> c.Model) |> Option.defaultValue model))
        backbone |> Option.iter (fun b -> b.LayerExecution <- zero3 |> Option.map (fun z -> z.LayerExecution))
        use _ = { new IDisposable with member _.Dispose() = backbone |> Option.iter (fun b -> b.LayerExecution <- None) }
        let scaler =
            match options.Precision with
            | Precision.Fp16 config -> Some config
            | Precision.Fp32
            | Precision.Bf16 -> None
        let state = initialState run optimizer wholeLength sync scaler threads resume
        let env =
            { Plan = plan
              Dataset = run.Dataset
              MaxSeqLen = maxSeqLen
              Objective = run.Objective
              Communicator = run.Communicator
              Flat = flat
              Compute = compute
              ComputeModel = compute |> Option.map (fun c -> c.Model) |> Option.defaultValue model
              Optimizer = optimizer
              Sync = sync
              LossScaler = scaler
              AfterGradientReduction = run.ModelParallel |> Option.map (fun p -> p.ReduceGradients) |> Option.defaultValue ignore
              RunWindow = run.ModelParallel |> Option.bind (fun p -> p.RunWindow)
              Clock = Stopwatch.StartNew()
              StartStep = state.Accumulation.OptimizerStep
              UpdatesAtStart = state.Updates }
        let final, stopped = loop env hooks state
        model.Module.eval ()
        let bytes (t: torch.Tensor) = t.numel () * int64 t.ElementSize
        let parameterBytes = bytes flat.Values
        let gradientBytes = bytes flat.Grads + (sync.ReducedGrads |> Option.map bytes |> Option.defaultValue 0L)
        { ParameterBytes = parameterBytes
          GradientBytes = gradientBytes
          Parameters =
            match zero3 with
            | Some z -> z.Finish parameters
            | None -> flat
          OptimizerState = final.OptimizerState
          OptimizerShard = sync.Shard
          FinalLoss = final.LastLoss
          Steps = final.Accumulation.OptimizerStep
          Stopped = stopped }

    /// run with nothing attached to the compute copy (MixedPrecision.attachNothing): the parameters are
    /// model's own (all of them, or a subset, the others frozen), each at its peak learning rate
    /// learningRate(name).
    let trainParameters
        (plan: LoopPlan)
        (model: CausalLm)
        (parameters: seq<struct (string * TorchSharp.Modules.Parameter)>)
        (learningRate: string -> float)
        (dataset: TokenizedDataset)
        (resume: ResumePoint option)
        (hooks: TrainHooks)
        : TrainResult =
        run { setup plan model dataset with Parameters = parameters; LearningRate = learningRate } resume hooks

    /// Trains every parameter of model: run (TrainingLoop.setup plan model dataset).
    let train (plan: LoopPlan) (model: CausalLm) (dataset: TokenizedDataset) (resume: ResumePoint option) (hooks: TrainHooks) : TrainResult =
        run (setup plan model dataset) resume hooks
