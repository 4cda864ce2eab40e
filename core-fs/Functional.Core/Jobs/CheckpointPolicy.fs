namespace Functional.Training

open System
open System.IO
open Functional.Checkpoint

/// Early stopping as HF's EarlyStoppingCallback with early_stopping_threshold 0: Counter counts the
/// evaluations in a row that did not improve the best metric; training stops once it reaches Patience.
type EarlyStopping =
    { /// How many non-improving evaluations in a row stop training (at least 1).
      Patience: int
      /// Non-improving evaluations since the last improvement.
      Counter: int }

/// Creating and advancing an EarlyStopping state.
[<RequireQualifiedAccess>]
module EarlyStopping =

    /// A fresh state (Counter 0). Raises ArgumentOutOfRangeException when patience is below 1.
    let create (patience: int) : EarlyStopping =
        if patience < 1 then
            raise (ArgumentOutOfRangeException("patience", patience, "early stopping patience must be at least 1"))
        { Patience = patience; Counter = 0 }

    /// The state after one evaluation: improved (Rotation.isBetter of its metric against the best before
    /// it) resets Counter to 0, anything else adds 1. Unlike HF, whose first evaluation always resets
    /// (its best_metric is still None then), a first evaluation whose metric is NaN counts as not improving.
    let observe (improved: bool) (state: EarlyStopping) : EarlyStopping =
        if improved then { state with Counter = 0 } else { state with Counter = state.Counter + 1 }

    /// Whether training should stop: Patience evaluations in a row did not improve.
    let shouldStop (state: EarlyStopping) : bool = state.Counter >= state.Patience

/// What the checkpoint policy needs to know of a run, as plain data (from TrainOptions, the plan and the
/// process's place in a multi-process run).
type PolicySettings =
    { /// When to evaluate (HF's eval_strategy).
      EvalStrategy: IntervalStrategy
      /// Evaluate every EvalSteps optimizer steps (with EvalStrategy Steps).
      EvalSteps: int
      /// When to save checkpoints (HF's save_strategy).
      SaveStrategy: IntervalStrategy
      /// Save every SaveSteps optimizer steps (with SaveStrategy Steps).
      SaveSteps: int
      /// Checkpoints to keep at most (HF's save_total_limit); None keeps all.
      SaveTotalLimit: int option
      /// Non-improving scheduled evaluations in a row that stop training; 0 turns early stopping off.
      Patience: int
      /// Whether a larger metric is better.
      GreaterIsBetter: bool
      /// The planned optimizer steps: the last one always ends the run normally.
      TotalSteps: int
      /// Whether the run has an evaluation set.
      HasEvalSet: bool
      /// True for the one process that writes files (checkpoints, logs, final/): rank 0.
      IsMainProcess: bool
      /// The full path of the output folder, where checkpoint-N folders go.
      OutputFolder: string }

/// What the policy remembers between steps.
type PolicyState =
    { /// The best metric among saved checkpoints and that checkpoint's folder.
      Best: (float * string) option
      /// Non-improving scheduled evaluations in a row.
      EarlyStoppingCounter: int
      /// The best metric of the scheduled evaluations so far (early stopping's reference).
      EarlyStoppingBest: float option
      /// The step and metric of the latest evaluation.
      LastEval: (int * float) option }

/// One finished optimizer step, as the policy sees it.
type StepFacts =
    { /// The optimizer step just finished (1-based).
      Step: int
      /// Whether it ended an epoch.
      EpochEnded: bool
      /// Whether cancellation was requested.
      Cancelled: bool
      /// The metric of the evaluation made at this step (see CheckpointPolicy.shouldEvaluate), if any.
      Metric: float option }

/// What to do after a step.
type PolicyDecision =
    { /// A checkpoint of this step is made (by the main process; see Write).
      Checkpoint: bool
      /// This process writes the checkpoint's files.
      Write: bool
      /// Cancellation ends the run before its last step: a checkpoint is saved, final/ is not written.
      Interrupted: bool
      /// Early stopping ends the run before its last step.
      StopEarly: bool }

/// The evaluate, save, best, rotate and early-stop decisions of a run, as HF's Trainer makes them, as pure
/// functions of plain data. The job evaluates, writes and deletes what these return.
[<RequireQualifiedAccess>]
module CheckpointPolicy =

    /// Nothing remembered yet: no best checkpoint, no evaluation.
    let start: PolicyState = { Best = None; EarlyStoppingCounter = 0; EarlyStoppingBest = None; LastEval = None }

    let private due (strategy: IntervalStrategy) (every: int) (step: int) (epochEnded: bool) =
        match strategy with
        | IntervalStrategy.Steps -> step % every = 0
        | IntervalStrategy.Epoch -> epochEnded
        | IntervalStrategy.No -> false

    /// The folder of step's checkpoint.
    let checkpointPath (settings: PolicySettings) (step: int) : string =
        Path.Combine(settings.OutputFolder, sprintf "checkpoint-%d" step)

    /// Whether to evaluate after step: when the evaluation strategy says so, and after the last step, when
    /// there is an evaluation set.
    let shouldEvaluate (settings: PolicySettings) (step: int) (epochEnded: bool) : bool =
        settings.HasEvalSet
        && (due settings.EvalStrategy settings.EvalSteps step epochEnded || step = settings.TotalSteps)

    /// The decision after a step and the state after it. A scheduled evaluation (not the closing one after
    /// the last step) counts for early stopping; a checkpoint is made when the save strategy says so or
    /// when cancellation ends the run early, once per step; a checkpoint whose step was evaluated becomes the
    /// best when its metric beats the best one strictly. The last step never stops early or is
    /// interrupted: the run ends normally and writes its final state.
    let decide (settings: PolicySettings) (state: PolicyState) (facts: StepFacts) : PolicyDecision * PolicyState =
        let last = facts.Step >= settings.TotalSteps
        let scheduled = due settings.EvalStrategy settings.EvalSteps facts.Step facts.EpochEnded
        let state = match facts.Metric with Some m -> { state with LastEval = Some(facts.Step, m) } | None -> state
        let state =
            match facts.Metric with
            | Some value when scheduled && settings.Patience > 0 ->
                let improved = Rotation.isBetter settings.GreaterIsBetter value state.EarlyStoppingBest
                let counter = (EarlyStopping.observe improved { Patience = settings.Patience; Counter = state.EarlyStoppingCounter }).Counter
                { state with
                    EarlyStoppingCounter = counter
                    EarlyStoppingBest = if improved then Some value else state.EarlyStoppingBest }
            | _ -> state
        let interrupted = facts.Cancelled && not last
        let checkpoint = due settings.SaveStrategy settings.SaveSteps facts.Step facts.EpochEnded || interrupted
        let state =
            match state.LastEval with
            | Some(at, value) when checkpoint && at = facts.Step
                                   && Rotation.isBetter settings.GreaterIsBetter value (state.Best |> Option.map fst) ->
                { state with Best = Some(value, checkpointPath settings facts.Step) }
            | _ -> state
        let stopEarly =
            settings.Patience > 0 && not last
            && EarlyStopping.shouldStop { Patience = settings.Patience; Counter = state.EarlyStoppingCounter }
        { Checkpoint = checkpoint; Write = checkpoint && settings.IsMainProcess; Interrupted = interrupted; StopEarly = stopEarly },
        state

    /// The checkpoint folders to delete after a save (HF's rotation, Rotation.toDelete), given the
    /// checkpoints in the output folder as (step, path): the best one (matched by full path) is kept. Only
    /// the main process deletes.
    let toRotate (settings: PolicySettings) (state: PolicyState) (existing: (int * string) list) : string list =
        if not settings.IsMainProcess then []
        else
            let bestStep =
                state.Best
                |> Option.bind (fun (_, p) -> existing |> List.tryFind (fun (_, q) -> Path.GetFullPath q = p) |> Option.map fst)
            [ for victim in Rotation.toDelete (List.map fst existing) bestStep settings.SaveTotalLimit ->
                  existing |> List.find (fun (s, _) -> s = victim) |> snd ]
