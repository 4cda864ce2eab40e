/// bf16 and fp16 mixed-precision training: fp32 master weights, a low-precision compute copy, and
/// fp16's dynamic loss scaling with skipped updates.
module Functional.Tests.MixedPrecisionTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Optim
open Functional.Runtime
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
    { Plan: LoopPlan
      Result: TrainResult
      Logs: StepLog list
      Model: Models.CausalLm }

/// Trains the golden model of a family with the options, every step logged.
let private train (family: string) (options: TrainOptions) (afterStep: StepContext -> unit) =
    let model = HfModelFolder.load (Path.Combine(golden family, "model")) 1L
    let data = loadTokenized (Path.Combine(golden family, "data.jsonl"))
    let logs = ResizeArray<StepLog>()
    let plan = TrainingLoop.plan options data.Rows.Length
    let result =
        TrainingLoop.train plan model data None
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
    with :? InvalidInputException as (TestUtil.CommandLine e) ->
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
            TrainingLoop.train (TrainingLoop.plan options data.Rows.Length) model data None
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
            TrainingLoop.train (TrainingLoop.plan options data.Rows.Length) model data None
                { OnLog = fun log -> live[log.Step] <- DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
                  AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            // Windows repeat every 4 steps (7 micro-batches per epoch in windows of 2, 2, 2, 1).
            let after = [| for step in 8 .. 4 .. 80 -> live[step] |] |> Array.distinct
            Expect.equal after [| live[8] |] (sprintf "live tensors every 4th step from 8 to 80 equal step 8's (%d)" live[8]))
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
            TrainingLoop.train (TrainingLoop.plan options data.Rows.Length) model data (Some point)
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

// ---------------------------------------------------------------- LoRA

/// Fresh LoRA adapters (rank 4, alpha 8, seed 3) on the query and value projections of the golden model
/// of a family: the model and its adapters. No adapter dropout: it draws from the global generator, which
/// tests running in parallel share (the command-line test below trains with dropout in its own process).
let private withAdapters (family: string) =
    let model = HfModelFolder.load (Path.Combine(golden family, "model")) 1L
    let targets = if family = "gpt2" then [ "c_attn" ] else [ "q_proj"; "v_proj" ]
    model, Peft.Lora.wrap { R = 4; Alpha = 8.0; Dropout = 0.0; TargetModules = targets; ModuleNameSubstring = None } model 3L

/// The golden model of a family with fresh adapters (withAdapters), trained with the options (only the
/// adapters, or the base too), every step logged.
let private trainLora (family: string) (options: TrainOptions) (onlyLora: bool) (afterStep: StepContext -> unit) =
    let model, adapters = withAdapters family
    let data = loadTokenized (Path.Combine(golden family, "data.jsonl"))
    if onlyLora then Peft.Lora.freezeBase model
    let trainable =
        [ if not onlyLora then
              for struct (name, p) in model.Module.named_parameters () -> struct (name, p)
          for name, p in Peft.Lora.parameters adapters -> struct (name, p) ]
    let logs = ResizeArray<StepLog>()
    let plan = TrainingLoop.plan options data.Rows.Length
    let result =
        TrainingLoop.run
            { TrainingLoop.setup plan model data with
                Attach = (Peft.Lora.asAdapter adapters model onlyLora None options.LearningRate).AttachToCompute
                Parameters = trainable }
            None
            { OnLog = logs.Add
              AfterStep = fun context -> afterStep context; StepDecision.Continue }
    { Plan = plan; Result = result; Logs = List.ofSeq logs; Model = model }, adapters

/// `functional train` arguments for the golden LLaMA with LoRA (dropout 0.1) on q_proj and v_proj under
/// --bf16: 6 shuffled steps, a checkpoint every 3.
let private bf16LoraArgs (output: string) (extra: string list) =
    let dir = golden "llama"
    [ "train"; "--model"; Path.Combine(dir, "model"); "--data"; Path.Combine(dir, "data.jsonl"); "--output"; output
      "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; "6"; "--save-steps"; "3"
      "--max-seq-len"; "32"; "--learning-rate"; "3e-3"; "--lr-scheduler-type"; "cosine"; "--seed"; "7"
      "--bf16"; "--lora-dim"; "4"; "--lora-dropout"; "0.1"; "--lora-target-modules"; "q_proj,v_proj" ]
    @ extra

let private lora =
    testList "LoRA" [
        for family in [ "llama"; "gpt2" ] do
            torchTest (sprintf "%s: bf16 + LoRA with only the adapters trained keeps the base bit-identical and follows the fp32 LoRA losses within 0.1%%" family) (fun () ->
                let options = { small with MaxSteps = 20; LearningRate = 1e-2; LrSchedulerType = SchedulerKind.Cosine; NumWarmupSteps = 2 }
                let fp32, fp32Adapters = trainLora family options true ignoreStep
                let mutable checkedCopy = false
                let mixed, adapters =
                    trainLora family { options with Precision = Precision.Bf16 } true (fun context ->
                        if context.Log.Step = 1 then
                            // The frozen base of the compute copy: the fp32 weights rounded once, no gradient.
                            let original = HfModelFolder.load (Path.Combine(golden family, "model")) 1L
                            let reference = dict [ for struct (name, p) in original.Module.named_parameters () -> name, p ]
                            for struct (name, p) in context.ComputeModel.Module.named_parameters () do
                                Expect.equal p.dtype torch.bfloat16 (sprintf "compute copy's %s" name)
                                Expect.isFalse p.requires_grad (sprintf "the copy's frozen %s needs no gradient" name)
                                use rounded = reference[name].to_type torch.bfloat16
                                Expect.isTrue (p.detach().Equals rounded) (sprintf "%s is the rounded fp32 weight" name)
                            original.Module.Dispose()
                            checkedCopy <- true)
                Expect.isTrue checkedCopy "the hook saw the compute copy"
                let original = HfModelFolder.load (Path.Combine(golden family, "model")) 1L
                let trained = dict [ for struct (name, p) in mixed.Model.Module.named_parameters () -> name, p ]
                for struct (name, p) in original.Module.named_parameters () do
                    Expect.isTrue (trained[name].Equals p) (sprintf "base %s bit-identical after training" name)
                let _, initial = withAdapters family
                for (name, p), (_, p0) in List.zip (Peft.Lora.parameters adapters) (Peft.Lora.parameters initial) do
                    Expect.equal p.dtype torch.float32 (sprintf "master %s stays fp32" name)
                    Expect.isFalse (p.Equals p0) (sprintf "adapter %s trained" name)
                // Measured: at most 6e-5 relative over the 20 steps (both families). The golden models are
                // near-uniform (logits close to 0), so bf16's rounding of the frozen base and of the adapter
                // path moves the loss far less than bf16's 2^-8 unit roundoff. 1e-3 leaves a wide margin and
                // still catches adapters that do not reach the compute copy: training lowers the loss by ~0.8%.
                for a, b in List.zip fp32.Logs mixed.Logs do
                    Expect.equal b.LearningRate a.LearningRate "same learning rates"
                    let relative = abs (a.Loss - b.Loss) / a.Loss
                    Expect.isLessThan relative 1e-3 (sprintf "step %d: fp32 loss %g, bf16 loss %g" a.Step a.Loss b.Loss)
                Expect.isLessThan (List.last mixed.Logs).Loss (mixed.Logs.Head.Loss - 0.02) "bf16 LoRA learns"
                for a in [ adapters; fp32Adapters; initial ] do (a :> IDisposable).Dispose())
        torchTest "bf16 + LoRA with the base trained too: both move, and the compute copy holds every master value rounded" (fun () ->
            let options = { small with MaxSteps = 6 }
            let mutable checkedCopy = false
            let run, adapters =
                trainLora "llama" { options with Precision = Precision.Bf16 } false (fun context ->
                    use master = context.Parameters.Values.to_type torch.bfloat16
                    for struct (name, p) in context.ComputeModel.Module.named_parameters () do
                        use expected = FlatParameters.sliceOf context.Parameters master name
                        Expect.isTrue (p.detach().Equals expected) (sprintf "%s is the rounded master weight" name)
                    checkedCopy <- true)
            Expect.isTrue checkedCopy "the hook saw the compute copy"
            let names = run.Result.Parameters.Names
            Expect.isTrue (names |> List.exists (fun n -> n.Contains "lora_A")) "adapters are in the master"
            Expect.isTrue (names |> List.exists (fun n -> n = "model.norm.weight")) "the base is in the master"
            let original = HfModelFolder.load (Path.Combine(golden "llama", "model")) 1L
            let trained = dict [ for struct (name, p) in run.Model.Module.named_parameters () -> name, p ]
            for struct (name, p) in original.Module.named_parameters () do
                Expect.isFalse (trained[name].Equals p) (sprintf "base %s trained" name)
            for name, p in Peft.Lora.parameters adapters do
                if name.Contains "lora_B" then
                    use zero = torch.zeros_like p
                    Expect.isFalse (p.Equals zero) (sprintf "adapter %s trained" name)
            Expect.isLessThan (List.last run.Logs).Loss run.Logs.Head.Loss "the loss falls"
            (adapters :> IDisposable).Dispose())
        torchTest "fp16 + LoRA: an overflowing window skips the update, keeps the adapters and does not advance the schedule" (fun () ->
            let _, initial = withAdapters "llama"
            let mutable keptAtFirstStep = false
            let config = { overflowing with InitialScalePower = 24 }
            let run, adapters =
                trainLora "llama" { small with MaxSteps = 12; LrSchedulerType = SchedulerKind.Linear; NumWarmupSteps = 2; Precision = Precision.Fp16 config } true
                    (fun context ->
                        if context.Log.Step = 1 then
                            for name, value in Peft.Lora.parameters initial do
                                use current = FlatParameters.slice context.Parameters name
                                Expect.isTrue (current.Equals value) (sprintf "%s unchanged by the skipped update" name)
                            keptAtFirstStep <- true)
            Expect.isTrue keptAtFirstStep "the first step was checked"
            let logs = run.Logs
            Expect.isTrue logs.Head.UpdateSkipped "2^24 overflows fp16"
            let skipped = logs |> List.filter (fun l -> l.UpdateSkipped)
            let applied = logs |> List.filter (fun l -> not l.UpdateSkipped)
            Expect.isGreaterThan applied.Length 0 "updates run once the scale fits"
            Expect.equal (applied |> List.map (fun l -> l.LearningRate)) [ for k in 0 .. applied.Length - 1 -> run.Plan.Schedule k ] "applied updates follow the schedule from its start"
            for l in skipped do
                Expect.equal l.LearningRate (run.Plan.Schedule(l.Step - l.SkippedSteps)) (sprintf "skipped step %d reports the next update's rate" l.Step)
            let adamSteps =
                Transform.stateTensors run.Result.OptimizerState
                |> List.pick (fun (name, t) -> if name.EndsWith "adam.step" then Some(t.item<int64> ()) else None)
            Expect.equal adamSteps (int64 applied.Length) "the optimizer counted only the applied updates"
            for a in [ adapters; initial ] do (a :> IDisposable).Dispose())
        test "the command line trains LoRA adapters under --bf16, checkpoints them in fp32 and resumes exactly" {
            TorchRuntime.ensure ()
            use folder = new TempFolder()
            let only = [ "--only-optimize-lora"; "--lora-learning-rate"; "1e-2" ]
            let full = folder.File "full"
            let run = runCli (bf16LoraArgs full only)
            Expect.equal run.ExitCode 0 (sprintf "exit code (stderr: %s)" run.Stderr)
            let adapterFile (output: string) = Path.Combine(output, "final", Peft.Lora.WeightsFileName)
            Expect.isTrue (File.Exists(Path.Combine(full, "final", Peft.Lora.ConfigFileName))) "adapter_config.json in final/"
            for file in [ adapterFile full; Path.Combine(full, "checkpoint-3", Peft.Lora.WeightsFileName) ] do
                let saved = Safetensors.load file
                Expect.isNonEmpty saved "adapter tensors saved"
                for KeyValue(name, t) in saved do
                    Expect.equal t.dtype torch.float32 (sprintf "%s saved in fp32" name)
                    t.Dispose()
            let metrics (output: string) =
                let lines = File.ReadAllLines(Path.Combine(output, "metrics.jsonl"))
                lines[.. lines.Length - 2]
            let losses = [ for l in metrics full -> JsonDocument.Parse(l).RootElement.GetProperty("loss").GetDouble() ]
            Expect.equal losses.Length 6 "one line per step"
            Expect.isTrue (losses |> List.forall Double.IsFinite) "finite losses"
            let resumed = folder.File "resumed"
            copyFolder full resumed
            for name in [ "checkpoint-6"; "final" ] do Directory.Delete(Path.Combine(resumed, name), true)
            let again = runCli (bf16LoraArgs resumed (only @ [ "--resume-from-checkpoint"; "latest" ]))
            Expect.equal again.ExitCode 0 (sprintf "resume exit code (stderr: %s)" again.Stderr)
            Expect.equal (File.ReadAllBytes(adapterFile resumed)) (File.ReadAllBytes(adapterFile full)) "the resumed adapter is identical"
            Expect.equal (metrics resumed) (metrics full) "the step metrics are identical"
        }
        test "the command line trains the base and LoRA adapters together under --bf16" {
            use folder = new TempFolder()
            let output = folder.File "out"
            let run = runCli (bf16LoraArgs output [])
            Expect.equal run.ExitCode 0 (sprintf "exit code (stderr: %s)" run.Stderr)
            for file in [ Peft.Lora.ConfigFileName; Peft.Lora.WeightsFileName; "model.safetensors" ] do
                Expect.isTrue (File.Exists(Path.Combine(output, "final", file))) (file + " in final/")
            let before = Safetensors.load (Path.Combine(golden "llama", "model", "model.safetensors"))
            let after = Safetensors.load (Path.Combine(output, "final", "model.safetensors"))
            for KeyValue(name, t) in before do
                Expect.equal after[name].dtype torch.float32 (sprintf "%s saved in fp32" name)
                Expect.isFalse (t.Equals after[name]) (sprintf "base %s trained" name)
        }
    ]

// ---------------------------------------------------------------- what stays fp32

/// A GPT-2 or LLaMA without transformer blocks (embeddings, final norm, head), with random norm weights,
/// converted to bf16: the path autocast keeps in fp32 without anything else in the way.
let private blocklessBf16 (family: string) =
    let config =
        match family with
        | "gpt2" ->
            Models.Gpt2
                { VocabSize = 23; NPositions = 16; NEmbd = 16; NLayer = 0; NHead = 2; NInner = 32
                  ActivationFunction = Models.Activation.GeluNew; ResidPdrop = 0.0; EmbdPdrop = 0.0; AttnPdrop = 0.0
                  LayerNormEpsilon = 1e-5; InitializerRange = 0.5; ScaleAttnWeights = true; TieWordEmbeddings = true }
        | _ -> Models.Llama { tinyLlama with NumHiddenLayers = 0; VocabSize = 23; InitializerRange = 0.5 }
    let lm = Models.CausalLm.create config 5L
    use generator = new torch.Generator(11UL)
    do
        use _ = torch.no_grad ()
        for struct (name, p) in lm.Module.named_parameters () do
            if name.Contains "norm" || name.Contains "ln_f" then p.normal_(1.0, 0.5, generator) |> ignore
    lm.Module.``to`` torch.bfloat16 |> ignore
    lm.Module.eval ()
    lm

let private autocast =
    testList "autocast" [
        torchTest "RMSNorm on an fp32 stream with bf16 weights scales in fp32 and rounds once" (fun () ->
            use norm = new Models.RmsNorm(8L, 1e-6)
            use generator = new torch.Generator(3UL)
            do
                use _ = torch.no_grad ()
                norm.Weight.normal_(1.0, 0.5, generator) |> ignore
            norm.``to`` torch.bfloat16 |> ignore
            use x = torch.randn([| 3L; 8L |], generator = generator) * 3.0
            use y = norm.forward x
            Expect.equal y.dtype torch.bfloat16 "the output feeds a bf16 projection"
            use variance = x.square().mean([| -1L |], keepdim = true)
            use normed = x * torch.rsqrt(variance + 1e-6)
            use weight = norm.Weight.to_type torch.float32
            use scaled = normed * weight
            use expected = scaled.to_type torch.bfloat16
            Expect.isTrue (y.Equals expected) "the fp32 result rounded once to bf16")
        torchTest "LayerNorm on an fp32 stream with bf16 weights normalizes in fp32 and rounds once" (fun () ->
            use norm = torch.nn.LayerNorm(8L, 1e-5)
            use generator = new torch.Generator(4UL)
            do
                use _ = torch.no_grad ()
                norm.weight.normal_(1.0, 0.5, generator) |> ignore
                norm.bias.normal_(0.0, 0.5, generator) |> ignore
            norm.``to`` torch.bfloat16 |> ignore
            use x = torch.randn([| 3L; 8L |], generator = generator) * 3.0
            use y = Models.Autocast.layerNorm norm x
            use w = norm.weight.to_type torch.float32
            use b = norm.bias.to_type torch.float32
            use exact = torch.nn.functional.layer_norm(x, [| 8L |], w, b, 1e-5)
            use expected = exact.to_type torch.bfloat16
            Expect.equal y.dtype torch.bfloat16 "the output feeds a bf16 projection"
            Expect.isTrue (y.Equals expected) "the fp32 result rounded once to bf16"
            use plain = torch.randn([| 3L; 8L |], generator = generator)
            use fp32Norm = torch.nn.LayerNorm(8L, 1e-5)
            use viaHelper = Models.Autocast.layerNorm fp32Norm plain
            use direct = fp32Norm.forward plain
            Expect.isTrue (viaHelper.Equals direct) "an fp32 model's norm is the plain LayerNorm")
        torchTest "bf16 attention: scores from a bf16 matmul (as autocast), scaled, masked and softmaxed in fp32, weights rounded to bf16" (fun () ->
            use generator = new torch.Generator(6UL)
            let draw () = (torch.randn([| 2L; 3L; 5L; 8L |], generator = generator) * 4.0).to_type torch.bfloat16 // (B, nh, T, hs)
            use q = draw ()
            use k = draw ()
            use v = draw ()
            use y = Models.CausalAttention.apply q k v { Dropout = 0.0; Bias = Models.NoBias }
            use expected =
                use scope = torch.NewDisposeScope()
                let scores = torch.matmul(q, k.transpose(-2L, -1L)).to_type(torch.float32) * (1.0 / Math.Sqrt 8.0)
                let future = torch.ones([| 5L; 5L |], dtype = torch.ScalarType.Bool).triu(1L)
                let weights = scores.masked_fill(future, Double.NegativeInfinity).softmax(-1L).to_type torch.bfloat16
                scope.MoveToOuter(torch.matmul(weights, v))
            Expect.equal y.dtype torch.bfloat16 "bf16 output"
            Expect.isTrue (y.Equals expected) "bf16 score matmul, fp32 scale and softmax, bf16 weights times v")
        torchTest "bf16 rotary embedding rotates in fp32 and rounds once" (fun () ->
            use generator = new torch.Generator(8UL)
            use x32 = torch.randn([| 1L; 2L; 6L; 8L |], generator = generator) * 3.0 // (B, nh, T, hd)
            use x = x32.to_type torch.bfloat16
            use inverse = Models.Rotary.inverseFrequencies 8 10000.0
            use positions = torch.arange(6L, dtype = torch.int64)
            let cos, sin = Models.Rotary.cosSin inverse positions
            use cos = cos
            use sin = sin
            use y = Models.Rotary.apply x cos sin
            use exact =
                use up = x.to_type torch.float32
                use rotated = Models.Rotary.rotateHalf up
                up * cos + rotated * sin
            use expected = exact.to_type torch.bfloat16
            Expect.equal y.dtype torch.bfloat16 "bf16 output"
            Expect.isTrue (y.Equals expected) "the fp32 rotation rounded once")
        for family in [ "gpt2"; "llama" ] do
            torchTest (sprintf "%s in bf16: the embeddings enter an fp32 residual stream and the final norm runs in fp32, as under autocast" family) (fun () ->
                let lm = blocklessBf16 family
                use ids = torch.tensor([| 1L; 5L; 7L; 22L; 3L; 3L; 0L; 9L |]).view(2L, 4L)
                use logits = lm.Module.forward ids
                let parameters = dict [ for struct (name, p) in lm.Module.named_parameters () -> name, p.detach().to_type torch.float32 ]
                use expected =
                    use scope = torch.NewDisposeScope()
                    let positions = torch.arange(4L, dtype = torch.int64)
                    let hidden =
                        if family = "gpt2" then
                            let stream = parameters["transformer.wte.weight"].index_select(0L, ids.view(-1L)).view(2L, 4L, 16L) + parameters["transformer.wpe.weight"].index_select(0L, positions)
                            torch.nn.functional.layer_norm(stream, [| 16L |], parameters["transformer.ln_f.weight"], parameters["transformer.ln_f.bias"], 1e-5)
                        else
                            let stream = parameters["model.embed_tokens.weight"].index_select(0L, ids.view(-1L)).view(2L, 4L, 16L)
                            let variance = stream.square().mean([| -1L |], keepdim = true)
                            stream * torch.rsqrt(variance + 1e-6) * parameters["model.norm.weight"]
                    let head = if family = "gpt2" then parameters["transformer.wte.weight"] else parameters["lm_head.weight"]
                    let result = torch.nn.functional.linear(hidden.to_type torch.bfloat16, head.to_type torch.bfloat16)
                    scope.MoveToOuter result
                Expect.equal logits.dtype torch.bfloat16 "bf16 logits (the loss upcasts them)"
                Expect.isTrue (logits.Equals expected) "logits of the fp32 stream and norm, rounded once before the head"
                for KeyValue(_, t) in parameters do t.Dispose()
                lm.Module.Dispose())
    ]

[<Tests>]
let tests = testList "mixed precision" [ bf16; fp16; lora; autocast; options ]
