namespace Functional.Training

open System
open System.Diagnostics
open TorchSharp
open Functional
open Functional.Data
open Functional.Models
open Functional.Optim

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

/// Wall-clock time per phase of the training steps, for benchmarks (`functional bench train`): give one
/// to the trainer through LoopPlan.PhaseClock. Each Mark charges the time since the previous Mark (or
/// Reset) to a phase, so the phases add up to the wall-clock time since Reset.
[<Sealed>]
type PhaseClock() =
    let ticks = Array.zeroCreate<int64> 4
    let mutable last = Stopwatch.GetTimestamp()

    /// Charges the time since the previous mark (or Reset) to phase.
    member _.Mark(phase: TrainingPhase) =
        let now = Stopwatch.GetTimestamp()
        ticks[int phase] <- ticks[int phase] + (now - last)
        last <- now

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
      /// When set, the trainer charges the time of every step's phases to it (benchmarks); None (what
      /// plan gives) costs nothing.
      PhaseClock: PhaseClock option }

/// What a finished training loop leaves.
[<NoComparison; NoEquality>]
type TrainResult =
    { /// The flat parameter and gradient buffers the model's parameters alias.
      Parameters: FlatParameters
      /// The optimizer state at the end.
      OptimizerState: ITransformState
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
      /// The optimizer state after the step.
      OptimizerState: ITransformState
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

/// The training loop: a fold of optimizer steps over accumulation windows of micro-batches.
[<RequireQualifiedAccess>]
module TrainingLoop =

    /// The optimizer for the options: clipping (or only measuring the norm), AdamW or SGD on the
    /// schedule, and, when some parameters have their own learning rate, the per-parameter ratio, as
    /// chain [clipByGlobalNorm; adamW or sgd; scaleByFactors]. AdamW steps through the fused kernel
    /// (Optimizer.fusedAdamW), SGD through the chain.
    let optimizer (options: TrainOptions) (schedule: int -> float) (decayMask: torch.Tensor) (learningRateRatios: torch.Tensor option) : FlatOptimizer =
        match options.Optimizer with
        | OptimizerKind.AdamW ->
            Optimizer.fusedAdamW
                options.MaxGradNorm schedule options.AdamBeta1 options.AdamBeta2 options.AdamEpsilon options.WeightDecay decayMask learningRateRatios
        | OptimizerKind.Sgd ->
            let sgd = Optimizer.sgd schedule options.Momentum options.Nesterov options.WeightDecay decayMask
            Optimizer.unfused (Optimizer.trainerChain options.MaxGradNorm sgd learningRateRatios)

    /// The rows of one epoch in the order the sampler gives, split into micro-batches.
    let private epochMicroBatches (options: TrainOptions) (rowCount: int) (epoch: int) =
        let order =
            if options.Shuffle then Sampler.shuffled options.Seed epoch rowCount
            else Sampler.sequential rowCount
        Batching.microBatches options.PerDeviceTrainBatchSize order

    /// Plans a run over rowCount rows: micro-batches per epoch, accumulation windows, total steps,
    /// warmup and schedule. Pure; raises InvalidInputException for options that cannot make a run
    /// (e.g. a warmup longer than the run), so callers can check everything before writing anything.
    let plan (options: TrainOptions) (rowCount: int) : LoopPlan =
        TrainOptions.validate options
        let microBatchesPerEpoch = (rowCount + options.PerDeviceTrainBatchSize - 1) / options.PerDeviceTrainBatchSize
        let accumulation = Accumulation.plan microBatchesPerEpoch options.GradientAccumulationSteps
        let totalSteps = TrainOptions.totalSteps options (Accumulation.stepsPerEpoch accumulation)
        let warmup = TrainOptions.warmupSteps options totalSteps
        let schedule =
            try Schedule.create options.LrSchedulerType options.LearningRate warmup totalSteps options.LrSchedulerOptions
            with :? ArgumentException as e -> InvalidInput.option "--lr-scheduler-kwargs" e.Message
        { Options = options
          Accumulation = accumulation
          TotalSteps = totalSteps
          WarmupSteps = warmup
          Schedule = schedule
          PhaseClock = None }

    /// The updates an optimizer state has applied: the count of its learning-rate schedule
    /// ("learning_rate.count", which every optimizer chain here holds once).
    let private appliedUpdates (state: ITransformState) : int =
        let entries = Transform.stateTensors state
        try
            match entries |> List.tryFind (fun (name, _) -> name = "learning_rate.count" || name.EndsWith ".learning_rate.count") with
            | Some(_, count) ->
                use asInteger = count.to_type torch.int64
                int (asInteger.item<int64> ())
            | None -> invalidArg (nameof state) "the optimizer state has no learning-rate schedule count"
        finally
            for _, t in entries do t.Dispose()

    /// The padding id of training and evaluation batches. Padding is right-aligned and labelled -100,
    /// and attention is causal, so no real token sees it: any id gives the same result.
    [<Literal>]
    let PadId = 0L

    /// Raises the InvalidInputException of a run whose figures stopped being finite at step: origin
    /// "step N", the problem what was non-finite, and what to change.
    let private diverged (options: TrainOptions) (step: int) (what: string) : 'T =
        InvalidInput.fail (sprintf "step %d" step) ""
            (sprintf "%s: training diverged (or the data or weights are damaged), so the run stops and writes no final model; checkpoints saved before stay. Lower --learning-rate (%g now), keep --max-grad-norm on, or check the model's weights"
                what options.LearningRate)

    /// Refuses to go on (or save) with parameters that hold NaN or infinite values: raises the
    /// InvalidInputException of a diverged run (origin "step N", as after a non-finite loss) unless
    /// every value of flat is finite (FlatParameters.allFinite, one reduction). Callers run it before
    /// saving a checkpoint or a final model, so no non-finite weights are ever written.
    let ensureFinite (options: TrainOptions) (step: int) (flat: FlatParameters) : unit =
        if not (FlatParameters.allFinite flat) then
            diverged options step "the weights hold NaN or infinite values after the update"

    /// Trains the given parameters of model (all of them, or e.g. only LoRA adapters: the others stay
    /// frozen), each at its peak learning rate learningRate(name) (the options' LearningRate for all but
    /// parameter groups with their own rate; the schedule scales them alike), on the dataset's rows as
    /// planned, from the start or from a resume point. After every optimizer step it calls hooks.OnLog
    /// (logged steps: by the LoggingStrategy, and the last) and hooks.AfterStep, which may stop the run. Each
    /// optimizer step runs in its own dispose scope, so live tensors stay flat over the run. The
    /// model's parameters end up aliasing the returned flat buffer.
    ///
    /// Mixed precision (options.Precision Bf16 or Fp16): the given parameters are the fp32 master
    /// weights; forward and backward run on a low-precision compute copy of model plus what attach
    /// attaches to it (MixedPrecision.createWith: e.g. MixedPrecision.attachLora for LoRA adapters, whose
    /// parameters are not the model's), whose gradients are added in fp32 to the master gradients after
    /// every micro-batch; clipping and the optimizer run on the fp32 master, and the trained parameters
    /// of the copy are refreshed from it after every update. Parameters that do not train (a frozen base)
    /// are rounded into the copy once. A trained parameter the copy has no counterpart of raises
    /// InvalidInputException naming --bf16/--fp16. With fp32, attach is not used.
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
    let trainAttached
        (plan: LoopPlan)
        (model: CausalLm)
        (attach: CausalLm -> ComputeAttachment)
        (parameters: seq<struct (string * TorchSharp.Modules.Parameter)>)
        (learningRate: string -> float)
        (dataset: TokenizedDataset)
        (resume: ResumePoint option)
        (hooks: TrainHooks)
        : TrainResult =
        let options = plan.Options
        Functional.Runtime.TorchRuntime.ensure ()
        let mutable threads = Functional.Runtime.ThreadBudget.create options.Threads
        let maxSeqLen = TrainOptions.sequenceLength options model.Config (CausalLm.prefixLength model)
        let microBatchesPerEpoch = plan.Accumulation.MicroBatchesPerEpoch
        let totalSteps = plan.TotalSteps
        let schedule = plan.Schedule
        torch.manual_seed options.Seed |> ignore
        model.Module.train ()
        let flat = FlatParameters.create parameters
        let compute = MixedPrecision.createWith options.Precision model attach flat
        use _ = { new IDisposable with member _.Dispose() = compute |> Option.iter (fun c -> c.Dispose()) }
        let computeModel = compute |> Option.map (fun c -> c.Model) |> Option.defaultValue model
        let decayMask =
            // Without weight decay the mask is never read: a one-element view spares a buffer the size
            // of the weights.
            if options.WeightDecay = 0.0 then FlatParameters.uniform flat 1.0f
            else FlatParameters.mask flat (fun name -> not (model.NoWeightDecay.Contains name))
        let ratios =
            // A peak rate of 0 trains nothing: every group's rate equals it (ratio 1), or the ratio is
            // undefined and the run is refused (0/0 used to turn every weight into NaN).
            let ratio name =
                let rate = learningRate name
                if rate = options.LearningRate then 1.0
                elif options.LearningRate = 0.0 then
                    InvalidInput.option "--learning-rate"
                        (sprintf "must be > 0 when parameter '%s' has its own learning rate %g: the schedule scales each rate by its ratio to --learning-rate" name rate)
                else rate / options.LearningRate
            if flat.Names |> List.forall (fun name -> ratio name = 1.0) then None
            else
                let factors = torch.ones_like flat.Values
                use _ = torch.no_grad ()
                for name in flat.Names do
                    use slice = FlatParameters.sliceOf flat factors name
                    slice.fill_(ratio name) |> ignore
                Some factors
        let optimizer = optimizer options schedule decayMask ratios
        let mutable optimizerState = optimizer.Transform.Init flat.Values
        let mutable accumulation = Accumulation.start
        let scalerConfig =
            match options.Precision with
            | Precision.Fp16 config -> Some config
            | Precision.Fp32
            | Precision.Bf16 -> None
        let mutable lossScale = scalerConfig |> Option.map LossScaler.init
        let mutable updates = 0
        match resume with
        | Some point ->
            optimizerState <- Transform.loadStateTensors point.OptimizerState optimizerState
            accumulation <- point.Accumulation
            torch.set_rng_state point.RandomState
            updates <- appliedUpdates optimizerState
            match scalerConfig, point.LossScale with
            | Some _, Some state -> lossScale <- Some state
            | _ -> ()
        | None -> ()
        let updatesBefore = updates
        let mutable skippedSteps = accumulation.OptimizerStep - updates
        let startStep = accumulation.OptimizerStep
        let mutable epochBatches = epochMicroBatches options dataset.Rows.Length accumulation.Epoch
        let mark phase = plan.PhaseClock |> Option.iter (fun c -> c.Mark phase)
        let clock = Stopwatch.StartNew()
        let mutable tokensSeen = 0L
        let mutable inputTokensSeen = 0L
        let mutable lastLoss = nan
        let mutable stopped = false
        while accumulation.OptimizerStep < totalSteps && not stopped do
            use _ = torch.NewDisposeScope()
            if accumulation.MicroBatchInEpoch = 0 then
                epochBatches <- epochMicroBatches options dataset.Rows.Length accumulation.Epoch
            let first, size = Accumulation.currentWindow plan.Accumulation accumulation
            let window =
                [ for i in first .. first + size - 1 ->
                      Batching.collate maxSeqLen PadId dataset epochBatches[i] ]
            let windowTokens = window |> List.sumBy (fun b -> b.PredictedTokens)
            accumulation <- Accumulation.beginWindow plan.Accumulation accumulation windowTokens
            let windowScale = lossScale |> Option.map (fun s -> s.Scale)
            let scale = Accumulation.lossScale windowTokens * Option.defaultValue 1.0 windowScale
            let mutable report = None
            for index, batch in List.indexed window do
                mark TrainingPhase.Other
                use logits = computeModel.Module.forward batch.InputIds // (B, T, V)
                use lossSum = Loss.causalLmSum logits batch.Labels
                mark TrainingPhase.Forward
                use scaled = lossSum * scale
                scaled.backward ()
                // The window's first micro-batch overwrites the master gradients; later ones add to them.
                compute |> Option.iter (fun c -> MixedPrecision.accumulateGradients c flat (index = 0))
                mark TrainingPhase.Backward
                tokensSeen <- tokensSeen + batch.Tokens
                inputTokensSeen <- inputTokensSeen + batch.InputIds.numel ()
                let next, event = Accumulation.observe plan.Accumulation accumulation (lossSum.item<float32> () |> float)
                accumulation <- next
                match event with
                | AccumulationEvent.Step r -> report <- Some r
                | AccumulationEvent.Accumulating -> ()
            let r = report |> Option.defaultWith (fun () -> invalidOp "an accumulation window ended without an optimizer step")
            let apply =
                match scalerConfig, lossScale with
                | Some config, Some state ->
                    let decision = LossScaler.decide config state (LossScaler.hasOverflow flat.Grads)
                    if decision.Change = OverflowAtMinimum then
                        InvalidInput.option "--fp16"
                            (sprintf "the gradients overflowed at the minimum loss scale %g in step %d: fp16 cannot hold them (lower --min-loss-scale, or train with --bf16)"
                                state.Scale r.OptimizerStep)
                    if decision.ApplyUpdate then LossScaler.unscale state.Scale flat.Grads
                    lossScale <- Some decision.Next
                    decision.ApplyUpdate
                | _ -> true
            let learningRate = schedule updates
            mark TrainingPhase.Other
            if apply then
                optimizerState <- optimizer.Step flat optimizerState (compute |> Option.map (fun c -> c.Values))
                updates <- updates + 1
            else
                skippedSteps <- skippedSteps + 1
            // With a compute copy, the window's first micro-batch overwrites the master gradients
            // (MixedPrecision.accumulateGradients): only fp32 training accumulates into them.
            if compute.IsNone then FlatParameters.zeroGrads flat
            mark TrainingPhase.Optimizer
            if apply then
                // A window without predicted tokens has a NaN mean loss by definition, and no gradient.
                if r.Tokens > 0L && not (Double.IsFinite r.Loss) then diverged options r.OptimizerStep (sprintf "the loss is %g" r.Loss)
                let gradNorm = Transform.lastGradNorm optimizerState
                if not (Double.IsFinite gradNorm) then diverged options r.OptimizerStep (sprintf "the gradient norm is %g" gradNorm)
                if updates = updatesBefore + 1 then ensureFinite options r.OptimizerStep flat
            lastLoss <- r.Loss
            let seconds = clock.Elapsed.TotalSeconds
            let log =
                { Step = r.OptimizerStep
                  TotalSteps = totalSteps
                  StartStep = startStep
                  Epoch = float accumulation.Epoch + float accumulation.MicroBatchInEpoch / float microBatchesPerEpoch
                  Loss = r.Loss
                  LearningRate = learningRate
                  GradNorm = if apply then Transform.lastGradNorm optimizerState else nan
                  PredictedTokens = r.Tokens
                  TokensPerSecond = float tokensSeen / max seconds 1e-9
                  ElapsedSeconds = seconds
                  LossScale = windowScale
                  UpdateSkipped = not apply
                  SkippedSteps = skippedSteps
                  Threads = threads.Threads
                  MaxThreads = threads.Maximum }
            let epochEnded = accumulation.Epoch > r.Epoch
            let logged =
                r.OptimizerStep = totalSteps
                || match options.LoggingStrategy with
                   | IntervalStrategy.Steps -> r.OptimizerStep % options.LoggingSteps = 0
                   | IntervalStrategy.Epoch -> epochEnded
                   | IntervalStrategy.No -> false
            if logged then hooks.OnLog log
            let decision =
                hooks.AfterStep
                    { Log = log
                      Logged = logged
                      Accumulation = accumulation
                      EpochEnded = epochEnded
                      InputTokensSeen = inputTokensSeen
                      Parameters = flat
                      OptimizerState = optimizerState
                      LossScale = lossScale
                      ComputeModel = computeModel }
            stopped <- decision = StepDecision.Stop && accumulation.OptimizerStep < totalSteps
            threads <- Functional.Runtime.ThreadBudget.adjust threads
        model.Module.eval ()
        { Parameters = flat
          OptimizerState = optimizerState
          FinalLoss = lastLoss
          Steps = accumulation.OptimizerStep
          Stopped = stopped }

    /// trainAttached with nothing attached to the compute copy (MixedPrecision.attachNothing): the
    /// parameters are model's own (all of them, or a subset, the others frozen).
    let trainParameters
        (plan: LoopPlan)
        (model: CausalLm)
        (parameters: seq<struct (string * TorchSharp.Modules.Parameter)>)
        (learningRate: string -> float)
        (dataset: TokenizedDataset)
        (resume: ResumePoint option)
        (hooks: TrainHooks)
        : TrainResult =
        trainAttached plan model MixedPrecision.attachNothing parameters learningRate dataset resume hooks

    /// Trains every parameter of model: trainParameters with model.Module.named_parameters ().
    let train (plan: LoopPlan) (model: CausalLm) (dataset: TokenizedDataset) (resume: ResumePoint option) (hooks: TrainHooks) : TrainResult =
        trainParameters plan model (model.Module.named_parameters ()) (fun _ -> plan.Options.LearningRate) dataset resume hooks
