/// bf16 and fp16 mixed-precision training: fp32 master weights, a low-precision compute copy, and
/// fp16's dynamic loss scaling with skipped updates.
module Functional.Tests.MixedPrecisionTests

open System
open System.IO
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Optim
open Functional.Training
open Functional.Tests.TestUtil

let private golden family = goldenDir (family + "-cosine")

/// 13 rows in micro-batches of 2, windows of 3: 3 optimizer steps per epoch.
let private small =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 3
        MaxSeqLen = 32
        LearningRate = 1e-3
        Shuffle = false }

type private Run =
    { Plan: TrainingPlan
      Result: TrainResult
      Logs: StepLog list
      Model: Models.CausalLm }

/// Trains the golden model of a family with the options, every step logged.
let private train (family: string) (options: TrainOptions) (afterStep: StepContext -> unit) =
    let model = HfModelFolder.load (Path.Combine(golden family, "model")) 1L
    let data = loadTokenized (Path.Combine(golden family, "data.jsonl"))
    let logs = ResizeArray<StepLog>()
    let plan = Trainer.plan options data.Rows.Length
    let result =
        Trainer.train plan model data None
            { OnLog = logs.Add
              AfterStep = fun context -> afterStep context; StepDecision.Continue }
    { Plan = plan; Result = result; Logs = List.ofSeq logs; Model = model }

let private ignoreStep (_: StepContext) = ()

/// fp16 that overflows at first: the scale starts at 2^40 and halves at every overflow (hysteresis 1),
/// and doubles after every 4 clean updates.
let private overflowing =
    { LossScaler.defaults with InitialScalePower = 40; Hysteresis = 1; LossScaleWindow = 4 }

let private expectInvalid (origin: string) (fragments: string list) (f: unit -> unit) =
    try
        f ()
        failtest "expected an InvalidInputException"
    with :? InvalidInputException as e ->
        Expect.equal e.Origin origin "the error names the option"
        for fragment in fragments do
            Expect.stringContains e.Problem fragment "the problem says why"

let private bf16 =
    testList "bf16" [
        for family in [ "llama"; "gpt2" ] do
            torchTest (sprintf "%s: bf16 training follows the fp32 loss curve within 2%% over 20 steps" family) (fun () ->
                let options = { small with MaxSteps = 20; LrSchedulerType = SchedulerKind.Cosine; NumWarmupSteps = 2 }
                let fp32 = train family options ignoreStep
                let mixed = train family { options with Precision = Precision.Bf16 } ignoreStep
                Expect.equal mixed.Logs.Length 20 "every step logged"
                for a, b in List.zip fp32.Logs mixed.Logs do
                    let relative = abs (a.Loss - b.Loss) / a.Loss
                    Expect.isLessThan relative 0.02 (sprintf "step %d: fp32 loss %g, bf16 loss %g" a.Step a.Loss b.Loss)
                    Expect.equal b.LearningRate a.LearningRate "same learning rates"
                    Expect.isFalse b.UpdateSkipped "bf16 never skips"
                    Expect.isNone b.LossScale "bf16 has no loss scale"
                Expect.isLessThan (List.last mixed.Logs).Loss (mixed.Logs.Head.Loss - 0.1) "bf16 training learns")
        torchTest "master weights, gradients and the model's parameters stay fp32; the compute copy is bf16" (fun () ->
            let mutable checkedCopy = false
            let run =
                train "llama" { small with MaxSteps = 2; Precision = Precision.Bf16 } (fun context ->
                    for struct (name, p) in context.ComputeModel.Module.named_parameters () do
                        Expect.equal p.dtype torch.bfloat16 (sprintf "compute copy's %s" name)
                    // The copy holds the master weights rounded to bf16 after every update.
                    use master = context.Parameters.Values.to_type torch.bfloat16
                    for struct (name, p) in context.ComputeModel.Module.named_parameters () do
                        use expected = FlatParameters.sliceOf context.Parameters master name
                        Expect.isTrue (p.detach().Equals expected) (sprintf "%s is the rounded master weight" name)
                    checkedCopy <- true)
            Expect.isTrue checkedCopy "the hook saw the compute copy"
            Expect.equal run.Result.Parameters.Values.dtype torch.float32 "master values fp32"
            Expect.equal run.Result.Parameters.Grads.dtype torch.float32 "master gradients fp32"
            for struct (name, p) in run.Model.Module.named_parameters () do
                Expect.equal p.dtype torch.float32 (sprintf "%s stays fp32" name))
        torchTest "bf16 updates move the master weights by fp32-sized steps, not bf16-rounded ones" (fun () ->
            // A learning rate so small that bf16 weights could not move (the step is far below half a
            // bf16 ulp of the weights): the fp32 master still changes.
            let model = HfModelFolder.load (Path.Combine(golden "llama", "model")) 1L
            let before = [ for struct (_, p) in model.Module.named_parameters () -> p.detach().clone() ]
            let data = loadTokenized (Path.Combine(golden "llama", "data.jsonl"))
            let options = { small with MaxSteps = 1; LearningRate = 1e-6; LrSchedulerType = SchedulerKind.Constant; Precision = Precision.Bf16 }
            Trainer.train (Trainer.plan options data.Rows.Length) model data None
                { OnLog = ignore; AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            let after = [ for struct (_, p) in model.Module.named_parameters () -> p.detach() ]
            let changed = List.map2 (fun (a: torch.Tensor) (b: torch.Tensor) -> not (a.Equals b)) before after
            Expect.isTrue (List.forall id changed) "every master tensor moved"
            for a in before @ after do a.Dispose())
        torchTest "many bf16 steps keep the live tensor count flat" (fun () ->
            let options = { small with GradientAccumulationSteps = 2; MaxSteps = 80; Precision = Precision.Bf16 }
            let live = Array.zeroCreate<int64> 81
            let model = HfModelFolder.load (Path.Combine(golden "llama", "model")) 1L
            let data = loadTokenized (Path.Combine(golden "llama", "data.jsonl"))
            Trainer.train (Trainer.plan options data.Rows.Length) model data None
                { OnLog = fun log -> live[log.Step] <- DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
                  AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            // Windows repeat every 4 steps (7 micro-batches per epoch in windows of 2, 2, 2, 1).
            let after = [| for step in 8 .. 4 .. 80 -> live[step] |] |> Array.distinct
            Expect.equal after [| live[8] |] (sprintf "live tensors every 4th step from 8 to 80 equal step 8's (%d)" live[8]))
        torchTest "mixed precision refuses to train a subset of the parameters (LoRA), naming the flag" (fun () ->
            let model = HfModelFolder.load (Path.Combine(golden "llama", "model")) 1L
            let data = loadTokenized (Path.Combine(golden "llama", "data.jsonl"))
            let subset = model.Module.named_parameters () |> Seq.take 2
            for precision, flag in [ Precision.Bf16, "--bf16"; Precision.Fp16 LossScaler.defaults, "--fp16" ] do
                let options = { small with MaxSteps = 1; Precision = precision }
                expectInvalid flag [ "LoRA is not supported with " + flag ] (fun () ->
                    Trainer.trainParameters (Trainer.plan options data.Rows.Length) model subset (fun _ -> options.LearningRate) data None
                        { OnLog = ignore; AfterStep = fun _ -> StepDecision.Continue }
                    |> ignore))
    ]

let private fp16 =
    testList "fp16" [
        torchTest "an overflow skips the update, the scale backs off and recovers, and training goes on" (fun () ->
            let mutable firstStepWeightsKept = false
            let initial = HfModelFolder.load (Path.Combine(golden "llama", "model")) 1L
            let run =
                train "llama" { small with MaxSteps = 45; LrSchedulerType = SchedulerKind.Linear; NumWarmupSteps = 3; Precision = Precision.Fp16 overflowing }
                    (fun context ->
                        if context.Log.Step = 1 then
                            for struct (name, p) in initial.Module.named_parameters () do
                                use current = FlatParameters.slice context.Parameters name
                                Expect.isTrue (current.Equals p) (sprintf "%s unchanged by the skipped update" name)
                            firstStepWeightsKept <- true)
            let logs = run.Logs
            Expect.isTrue firstStepWeightsKept "the first step was checked"
            Expect.equal logs.Length 45 "every window is a step of the run"
            Expect.equal logs.Head.LossScale (Some(2.0 ** 40.0)) "the first window uses 2^initial_scale_power"
            Expect.isTrue logs.Head.UpdateSkipped "2^40 overflows fp16"
            Expect.isTrue (Double.IsNaN logs.Head.GradNorm) "a skipped update has no gradient norm"
            let skipped = logs |> List.filter (fun l -> l.UpdateSkipped)
            let applied = logs |> List.filter (fun l -> not l.UpdateSkipped)
            Expect.isGreaterThan applied.Length 10 "updates run once the scale fits"
            Expect.equal (List.last logs).SkippedSteps skipped.Length "SkippedSteps counts the skipped updates"
            // Every overflow halves the scale (hysteresis 1): the next window uses half.
            for a, b in List.pairwise logs do
                if a.UpdateSkipped then Expect.equal b.LossScale (Option.map (fun s -> s / 2.0) a.LossScale) (sprintf "step %d halves the scale" b.Step)
            let grew = logs |> List.pairwise |> List.exists (fun (a, b) -> b.LossScale > a.LossScale)
            Expect.isTrue grew "the scale grows back after clean windows"
            // The schedule advances only with applied updates: they use lr(0), lr(1), ... in order, and a
            // skipped step reports the rate the next update will use.
            Expect.equal (applied |> List.map (fun l -> l.LearningRate)) [ for k in 0 .. applied.Length - 1 -> run.Plan.Schedule k ] "applied updates follow the schedule from its start"
            for l in skipped do
                let updatesBefore = l.Step - l.SkippedSteps
                Expect.equal l.LearningRate (run.Plan.Schedule updatesBefore) (sprintf "skipped step %d reports the next update's rate" l.Step)
            let adamSteps =
                Transform.stateTensors run.Result.OptimizerState
                |> List.pick (fun (name, t) -> if name.EndsWith "adam.step" then Some(t.item<int64> ()) else None)
            Expect.equal adamSteps (int64 applied.Length) "the optimizer counted only the applied updates"
            Expect.isTrue (logs |> List.forall (fun l -> Double.IsFinite l.Loss)) "every loss is finite"
            Expect.isLessThan (List.last logs).Loss (applied.Head.Loss - 0.1) "training goes on and learns")
        torchTest "fp16 with a scale that fits follows the fp32 loss curve" (fun () ->
            let options = { small with MaxSteps = 12 }
            let fp32 = train "llama" options ignoreStep
            let mixed = train "llama" { options with Precision = Precision.Fp16 { LossScaler.defaults with InitialScalePower = 8 } } ignoreStep
            for a, b in List.zip fp32.Logs mixed.Logs do
                Expect.isFalse b.UpdateSkipped (sprintf "step %d applied" b.Step)
                Expect.isLessThan (abs (a.Loss - b.Loss) / a.Loss) 0.01 (sprintf "step %d: fp32 loss %g, fp16 loss %g" a.Step a.Loss b.Loss))
        torchTest "an overflow at the minimum loss scale ends the run naming --fp16" (fun () ->
            let config = { overflowing with MinLossScale = 2.0 ** 39.0 }
            expectInvalid "--fp16" [ "minimum loss scale" ] (fun () ->
                train "llama" { small with MaxSteps = 5; Precision = Precision.Fp16 config } ignoreStep |> ignore))
        torchTest "a resumed run continues from the stored loss scale" (fun () ->
            let mutable stored = None
            train "llama" { small with MaxSteps = 3; Precision = Precision.Fp16 overflowing } (fun context ->
                if context.Log.Step = 3 then
                    stored <-
                        Some
                            { Accumulation = context.Accumulation
                              OptimizerState =
                                [ for name, t in Transform.stateTensors context.OptimizerState -> name, t.clone().DetachFromDisposeScope() ]
                              RandomState = torch.get_rng_state().DetachFromDisposeScope()
                              LossScale = context.LossScale })
            |> ignore
            let point = stored.Value
            Expect.equal point.LossScale.Value.Scale (2.0 ** 37.0) "three overflows halved 2^40 three times"
            let model = HfModelFolder.load (Path.Combine(golden "llama", "model")) 1L
            let data = loadTokenized (Path.Combine(golden "llama", "data.jsonl"))
            let options = { small with MaxSteps = 4; Precision = Precision.Fp16 overflowing }
            let logs = ResizeArray<StepLog>()
            Trainer.train (Trainer.plan options data.Rows.Length) model data (Some point)
                { OnLog = logs.Add; AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            Expect.equal logs.Count 1 "one step left"
            Expect.equal logs[0].Step 4 "the fourth step"
            Expect.equal logs[0].LossScale (Some(2.0 ** 37.0)) "it uses the stored scale"
            Expect.equal logs[0].SkippedSteps 4 "the three skipped steps before the resume count")
    ]

let private options =
    testList "options" [
        test "fp32 is the default precision" {
            Expect.equal TrainOptions.defaults.Precision Precision.Fp32 "default"
        }
        test "the precision flags: --bf16, --fp16, neither, and both refused naming --fp16" {
            Expect.equal (TrainOptions.precision true false LossScaler.defaults) Precision.Bf16 "--bf16"
            Expect.equal (TrainOptions.precision false true LossScaler.defaults) (Precision.Fp16 LossScaler.defaults) "--fp16"
            Expect.equal (TrainOptions.precision false false LossScaler.defaults) Precision.Fp32 "neither"
            expectInvalid "--fp16" [ "--bf16" ] (fun () -> TrainOptions.precision true true LossScaler.defaults |> ignore)
        }
        test "bad loss scaler settings are refused naming their option" {
            let bad = { LossScaler.defaults with InitialScalePower = 200 }
            expectInvalid "--initial-scale-power" [ "200" ] (fun () -> TrainOptions.validate { small with Precision = Precision.Fp16 bad })
            expectInvalid "--initial-scale-power" [ "200" ] (fun () -> TrainOptions.precision false true bad |> ignore)
            expectInvalid "--hysteresis" [] (fun () -> TrainOptions.validate { small with Precision = Precision.Fp16 { LossScaler.defaults with Hysteresis = 0 } })
        }
    ]

[<Tests>]
let tests = testList "mixed precision" [ bf16; fp16; options ]
