namespace Functional

open System

/// How an epoch's micro-batches group into accumulation windows: windows of AccumulationSteps
/// consecutive micro-batches, [0, k-1], [k, 2k-1], ..., the last one of an epoch possibly shorter.
/// Each window ends in one optimizer update.
type AccumulationPlan =
    {
        /// Micro-batches in one epoch (n >= 1).
        MicroBatchesPerEpoch: int
        /// Micro-batches per optimizer update (k >= 1).
        AccumulationSteps: int
    }

/// Where training stands, as plain numbers a checkpoint can store (Optax MultiSteps-like).
type AccumulationState =
    {
        /// The epoch in progress, from 0.
        Epoch: int
        /// The index within the epoch of the next micro-batch to observe.
        MicroBatchInEpoch: int
        /// Micro-batches already observed in the current window.
        MicroStep: int
        /// Completed optimizer updates. Before an update it is the update's 0-based index, the step at
        /// which the learning-rate schedule is read; after it, the 1-based step that logs report.
        OptimizerStep: int
        /// Whether beginWindow has set the current window's token count.
        WindowOpen: bool
        /// Predicted tokens of the whole current window (set by beginWindow).
        WindowTokens: int64
        /// Sum of the summed token losses observed so far in the current window.
        WindowLossSum: float
    }

/// What an optimizer update ends: the report of one accumulation window.
type StepReport =
    {
        /// The 0-based index of this update: the step at which to read the learning-rate schedule.
        UpdateIndex: int
        /// Completed updates including this one (UpdateIndex + 1): the step logs report.
        OptimizerStep: int
        /// The epoch the window belongs to, from 0.
        Epoch: int
        /// Micro-batches in the window (AccumulationSteps, or fewer for an epoch's last window).
        MicroBatches: int
        /// Predicted tokens in the window.
        Tokens: int64
        /// The window's token-mean loss: the sum of its token losses / Tokens (NaN when Tokens is 0).
        Loss: float
    }

/// What observing a micro-batch led to.
[<RequireQualifiedAccess>]
type AccumulationEvent =
    /// The window continues: no update yet.
    | Accumulating
    /// The window is complete: run the optimizer update now (with the accumulated gradient).
    | Step of StepReport

/// Gradient accumulation with token-weighted normalization over a whole window, as a pure state machine.
///
/// Before a window the trainer looks ahead at its micro-batches (currentWindow), counts their predicted
/// tokens (Loss.predictedTokens) and calls beginWindow. For each micro-batch it backpropagates
/// Loss.causalLmSum * lossScale(windowTokens) and calls observe with the unscaled sum. The accumulated
/// gradient is then the gradient of (sum of all token losses in the window) / (window tokens): the mean
/// one big batch of the same rows would give, whatever the micro-batches' lengths. An epoch's last
/// window may be partial; it is normalized by its own tokens.
[<RequireQualifiedAccess>]
module Accumulation =

    let private argument (name: string) (problem: string) : 'T = raise (ArgumentException(problem, name))

    /// A plan of microBatchesPerEpoch (>= 1) micro-batches per epoch and accumulationSteps (>= 1) per update.
    let plan (microBatchesPerEpoch: int) (accumulationSteps: int) : AccumulationPlan =
        if microBatchesPerEpoch < 1 then
            argument "microBatchesPerEpoch" (sprintf "microBatchesPerEpoch must be >= 1, got %d." microBatchesPerEpoch)
        if accumulationSteps < 1 then
            argument "accumulationSteps" (sprintf "accumulationSteps must be >= 1, got %d." accumulationSteps)
        { MicroBatchesPerEpoch = microBatchesPerEpoch; AccumulationSteps = accumulationSteps }

    /// Optimizer updates per epoch: ceil(n / k).
    let stepsPerEpoch (plan: AccumulationPlan) : int =
        (plan.MicroBatchesPerEpoch + plan.AccumulationSteps - 1) / plan.AccumulationSteps

    /// Optimizer updates in a run of epochs (>= 0): epochs * ceil(n / k), the schedule's total steps.
    let totalSteps (plan: AccumulationPlan) (epochs: int) : int =
        if epochs < 0 then argument "epochs" (sprintf "epochs must be >= 0, got %d." epochs)
        epochs * stepsPerEpoch plan

    /// The number of micro-batches in the window that starts at micro-batch microBatchInEpoch (a
    /// multiple of k below n): k, or what is left of the epoch.
    let windowSize (plan: AccumulationPlan) (microBatchInEpoch: int) : int =
        if microBatchInEpoch < 0
           || microBatchInEpoch >= plan.MicroBatchesPerEpoch
           || microBatchInEpoch % plan.AccumulationSteps <> 0 then
            argument "microBatchInEpoch"
                (sprintf "No window of %A starts at micro-batch %d." plan microBatchInEpoch)
        min plan.AccumulationSteps (plan.MicroBatchesPerEpoch - microBatchInEpoch)

    /// The state before the first micro-batch of the first epoch.
    let start: AccumulationState =
        { Epoch = 0
          MicroBatchInEpoch = 0
          MicroStep = 0
          OptimizerStep = 0
          WindowOpen = false
          WindowTokens = 0L
          WindowLossSum = 0.0 }

    /// The current window (the one in progress, or the next one if none is open) as (index within the
    /// epoch of its first micro-batch, its number of micro-batches): the micro-batches to look ahead at.
    let currentWindow (plan: AccumulationPlan) (state: AccumulationState) : int * int =
        let first = state.MicroBatchInEpoch - state.MicroStep
        first, windowSize plan first

    /// Opens the next window with the predicted tokens of all its micro-batches (>= 0). The state must
    /// be between windows (InvalidOperationException otherwise).
    let beginWindow (plan: AccumulationPlan) (state: AccumulationState) (windowTokens: int64) : AccumulationState =
        if windowTokens < 0L then argument "windowTokens" (sprintf "windowTokens must be >= 0, got %d." windowTokens)
        if state.WindowOpen || state.MicroStep <> 0 then
            raise (InvalidOperationException "beginWindow: the current window has not ended.")
        // Raises when the state does not fit the plan (a window must start at a multiple of k below n).
        currentWindow plan state |> ignore
        { state with WindowOpen = true; WindowTokens = windowTokens; WindowLossSum = 0.0 }

    /// The factor for each micro-batch's summed loss before backward: 1 / windowTokens. A window without
    /// predicted tokens has every loss sum 0; its factor is 0, so it adds no gradient (and no NaN).
    let lossScale (windowTokens: int64) : float =
        if windowTokens < 0L then argument "windowTokens" (sprintf "windowTokens must be >= 0, got %d." windowTokens)
        if windowTokens = 0L then 0.0 else 1.0 / float windowTokens

    /// Records a micro-batch of the open window by its summed token loss (Loss.causalLmSum, unscaled).
    /// On the window's last micro-batch it reports Step: the caller runs the optimizer update then, and
    /// the returned state counts it, closes the window and moves to the next epoch after its last
    /// micro-batch. The reported loss is the window's loss sum / its tokens (NaN for 0 tokens: the mean
    /// over nothing; trainers reject such data before training). InvalidOperationException without an
    /// open window.
    let observe (plan: AccumulationPlan) (state: AccumulationState) (lossSum: float) : AccumulationState * AccumulationEvent =
        if not state.WindowOpen then
            raise (InvalidOperationException "observe: no window is open; call beginWindow first.")
        let first, size = currentWindow plan state
        let windowLossSum = state.WindowLossSum + lossSum
        let next = state.MicroBatchInEpoch + 1
        if state.MicroStep + 1 < size then
            { state with MicroBatchInEpoch = next; MicroStep = state.MicroStep + 1; WindowLossSum = windowLossSum },
            AccumulationEvent.Accumulating
        else
            let report =
                { UpdateIndex = state.OptimizerStep
                  OptimizerStep = state.OptimizerStep + 1
                  Epoch = state.Epoch
                  MicroBatches = size
                  Tokens = state.WindowTokens
                  Loss = if state.WindowTokens = 0L then nan else windowLossSum / float state.WindowTokens }
            let epochEnds = first + size = plan.MicroBatchesPerEpoch
            { Epoch = if epochEnds then state.Epoch + 1 else state.Epoch
              MicroBatchInEpoch = if epochEnds then 0 else next
              MicroStep = 0
              OptimizerStep = state.OptimizerStep + 1
              WindowOpen = false
              WindowTokens = 0L
              WindowLossSum = 0.0 },
            AccumulationEvent.Step report
