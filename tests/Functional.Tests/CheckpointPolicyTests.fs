/// The checkpoint policy as a pure function: a whole run is simulated by folding CheckpointPolicy.decide
/// over its steps, with random strategies, metrics and cancellation.
module Functional.Tests.CheckpointPolicyTests

open Expecto
open FsCheck
open FsCheck.FSharp
open Functional.Training

/// A simulated run: settings, the metric each evaluation gives (cycled), the step cancellation arrives
/// at (if any), the steps per epoch.
type private Run =
    { Settings: PolicySettings
      Metrics: float list
      CancelAt: int option
      StepsPerEpoch: int }

let private strategy = Gen.elements [ IntervalStrategy.No; IntervalStrategy.Steps; IntervalStrategy.Epoch ]

let private runs =
    gen {
        let! total = Gen.choose (1, 40)
        let! evalStrategy = strategy
        let! evalSteps = Gen.choose (1, 6)
        let! saveStrategy = strategy
        let! saveSteps = Gen.choose (1, 6)
        let! limit = Gen.frequency [ 1, Gen.constant None; 4, Gen.choose (1, 4) |> Gen.map Some ]
        let! patience = Gen.choose (0, 4)
        let! greater = Gen.elements [ true; false ]
        let! hasEval = Gen.frequency [ 1, Gen.constant false; 4, Gen.constant true ]
        let! metrics = Gen.choose (0, 6) |> Gen.map float |> Gen.nonEmptyListOf
        let! cancelAt = Gen.frequency [ 3, Gen.constant None; 1, Gen.choose (1, total) |> Gen.map Some ]
        let! stepsPerEpoch = Gen.choose (1, 8)
        return
            { Settings =
                { EvalStrategy = evalStrategy; EvalSteps = evalSteps; SaveStrategy = saveStrategy; SaveSteps = saveSteps
                  SaveTotalLimit = limit; Patience = patience; GreaterIsBetter = greater; TotalSteps = total
                  HasEvalSet = hasEval; IsMainProcess = true; OutputFolder = "/out" }
              Metrics = metrics
              CancelAt = cancelAt
              StepsPerEpoch = stepsPerEpoch }
    }
    |> Arb.fromGen

/// What one simulated step did.
type private Trace =
    { Step: int
      Evaluated: float option
      Scheduled: bool
      Decision: PolicyDecision
      State: PolicyState
      Kept: int list
      Deleted: string list }

/// Runs the policy as the job does: evaluate when asked, decide, save and rotate; stops where it says.
let private simulate (run: Run) : Trace list =
    let s = run.Settings
    let rec go step evaluations state kept acc =
        if step > s.TotalSteps then List.rev acc
        else
            let epochEnded = step % run.StepsPerEpoch = 0
            let metric =
                if CheckpointPolicy.shouldEvaluate s step epochEnded then Some run.Metrics[evaluations % run.Metrics.Length]
                else None
            let facts = { Step = step; EpochEnded = epochEnded; Cancelled = run.CancelAt |> Option.exists (fun c -> step >= c); Metric = metric }
            let decision, next = CheckpointPolicy.decide s state facts
            let kept = if decision.Write then kept @ [ step ] else kept
            let existing = [ for k in kept -> k, CheckpointPolicy.checkpointPath s k ]
            let deleted = if decision.Write then CheckpointPolicy.toRotate s next existing else []
            let kept = kept |> List.filter (fun k -> not (List.contains (CheckpointPolicy.checkpointPath s k) deleted))
            let scheduled =
                match s.EvalStrategy with
                | IntervalStrategy.Steps -> step % s.EvalSteps = 0
                | IntervalStrategy.Epoch -> epochEnded
                | IntervalStrategy.No -> false
            let trace = { Step = step; Evaluated = metric; Scheduled = scheduled && s.HasEvalSet; Decision = decision; State = next; Kept = kept; Deleted = deleted }
            let evaluations = if metric.IsSome then evaluations + 1 else evaluations
            if decision.Interrupted || decision.StopEarly then List.rev (trace :: acc)
            else go (step + 1) evaluations next kept (trace :: acc)
    go 1 0 CheckpointPolicy.start [] []

let private config = { FsCheckConfig.defaultConfig with maxTest = 500 }

let private properties =
    testList "properties" [
        testPropertyWithConfig config "a checkpoint is saved at most once per step, and exactly when the save strategy or an interruption asks"
        <| Prop.forAll runs (fun run ->
            let traces = simulate run
            let saved = traces |> List.filter (fun t -> t.Decision.Write) |> List.map (fun t -> t.Step)
            List.distinct saved = saved
            && traces |> List.forall (fun t ->
                let strategy =
                    match run.Settings.SaveStrategy with
                    | IntervalStrategy.Steps -> t.Step % run.Settings.SaveSteps = 0
                    | IntervalStrategy.Epoch -> t.Step % run.StepsPerEpoch = 0
                    | IntervalStrategy.No -> false
                t.Decision.Write = (strategy || t.Decision.Interrupted)))

        testPropertyWithConfig config "the best checkpoint is never rotated away"
        <| Prop.forAll runs (fun run ->
            simulate run
            |> List.forall (fun t ->
                match t.State.Best with
                | Some(_, path) -> not (List.contains path t.Deleted)
                | None -> true))

        testPropertyWithConfig config "the best checkpoint holds the best metric of the saved, evaluated steps"
        <| Prop.forAll runs (fun run ->
            let traces = simulate run
            let candidates = [ for t in traces do if t.Decision.Write then match t.Evaluated with Some m -> yield m | None -> () ]
            match (List.last traces).State.Best, candidates with
            | None, [] -> true
            | Some(value, _), _ :: _ -> value = (if run.Settings.GreaterIsBetter then List.max candidates else List.min candidates)
            | _ -> false)

        testPropertyWithConfig config "early stopping ends the run after exactly patience non-improving scheduled evaluations in a row"
        <| Prop.forAll runs (fun run ->
            let s = run.Settings
            let traces = simulate run
            // The counter as HF's callback keeps it, recomputed from the scheduled evaluations.
            let counters =
                traces
                |> List.scan
                    (fun (counter, best) t ->
                        match t.Evaluated with
                        | Some m when t.Scheduled && s.Patience > 0 ->
                            if Functional.Checkpoint.Rotation.isBetter s.GreaterIsBetter m best then 0, Some m else counter + 1, best
                        | _ -> counter, best)
                    (0, None)
                |> List.tail
                |> List.map fst
            List.zip traces counters
            |> List.forall (fun (t, counter) ->
                t.Decision.StopEarly = (s.Patience > 0 && counter >= s.Patience && t.Step < s.TotalSteps)))

        testPropertyWithConfig config "the last step always ends the run normally: never interrupted, never stopped early"
        <| Prop.forAll runs (fun run ->
            let traces = simulate run
            let last = List.last traces
            // The simulation ends at the last step or where the policy stopped the run: never both.
            (last.Step = run.Settings.TotalSteps) = not (last.Decision.Interrupted || last.Decision.StopEarly))

        testPropertyWithConfig config "a process that is not the main one writes and deletes nothing but decides the same"
        <| Prop.forAll runs (fun run ->
            let main = simulate run
            let other = simulate { run with Settings = { run.Settings with IsMainProcess = false } }
            other |> List.forall (fun t -> not t.Decision.Write && t.Deleted.IsEmpty)
            && List.map (fun t -> t.Decision.Checkpoint, t.Decision.StopEarly, t.Decision.Interrupted) main
               = List.map (fun t -> t.Decision.Checkpoint, t.Decision.StopEarly, t.Decision.Interrupted) other)
    ]

let private examples =
    testList "examples" [
        test "losses 1.0, 0.9, 0.95, 0.9 evaluated every step with patience 2 stop at step 4" {
            let settings =
                { EvalStrategy = IntervalStrategy.Steps; EvalSteps = 1; SaveStrategy = IntervalStrategy.No; SaveSteps = 1
                  SaveTotalLimit = None; Patience = 2; GreaterIsBetter = false; TotalSteps = 10; HasEvalSet = true
                  IsMainProcess = true; OutputFolder = "/out" }
            let stops =
                [ 1.0; 0.9; 0.95; 0.9; 0.85 ]
                |> List.indexed
                |> List.scan (fun (_, state) (i, loss) ->
                    let d, s = CheckpointPolicy.decide settings state { Step = i + 1; EpochEnded = false; Cancelled = false; Metric = Some loss }
                    Some d.StopEarly, s) (None, CheckpointPolicy.start)
                |> List.choose fst
            Expect.equal stops [ false; false; false; true; false ] "stops after the fourth evaluation"
        }
        test "a cancelled last step is no interruption, a cancelled earlier step saves once" {
            let settings =
                { EvalStrategy = IntervalStrategy.No; EvalSteps = 1; SaveStrategy = IntervalStrategy.Steps; SaveSteps = 2
                  SaveTotalLimit = None; Patience = 0; GreaterIsBetter = false; TotalSteps = 4; HasEvalSet = false
                  IsMainProcess = true; OutputFolder = "/out" }
            let decide step = fst (CheckpointPolicy.decide settings CheckpointPolicy.start { Step = step; EpochEnded = false; Cancelled = true; Metric = None })
            Expect.isFalse (decide 4).Interrupted "the last step completes"
            Expect.isTrue (decide 2).Interrupted "an earlier one is interrupted"
            Expect.isTrue (decide 2).Write "and saves (once, though the strategy also asks)"
        }
    ]

[<Tests>]
let tests = testList "checkpoint policy" [ properties; examples ]
