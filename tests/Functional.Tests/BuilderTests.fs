/// The C# facade's fluent builder (Trainer.CreateBuilder ... Build, Fit, FitAsync), its QuickStart sample and
/// the C#-shaped surface of the facade assembly.
module Functional.Tests.BuilderTests

open System
open System.Diagnostics
open System.IO
open System.Reflection
open System.Threading
open Expecto
open Functional
open Functional.Tests.TestUtil

let private golden = goldenDir "llama-cosine"
let private model = Path.Combine(golden, "model")
let private data = Path.Combine(golden, "data.jsonl")

/// The golden LLaMA job of the QuickStart sample: 2 x 2 rows per step, cosine with 2 warmup steps, 10 steps.
let private goldenJob (output: string) =
    Trainer.CreateBuilder()
        .UseModel(model)
        .UseData(data, fun o -> o.MaxSequenceLength <- 32; o.UseCache <- false)
        .UseOutput(output)
        .UseAdamW(3e-3, fun o -> o.WeightDecay <- 0.1)
        .UseCosineSchedule(warmupSteps = 2)
        .UseBatchSize(2)
        .AccumulateGradients(2)
        .TrainForSteps(10)

/// Settings that pass Build (no file is read by Build).
let private complete () =
    Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out")

/// Build throws InvalidInputException with this origin (the builder call), location (its argument or option)
/// and a message containing each fragment.
let private rejects name (builder: unit -> TrainerBuilder) (origin: string) (location: string) (fragments: string list) =
    test name {
        let e = Expect.throwsC (fun () -> builder().Build() |> ignore) id
        match e with
        | :? InvalidInputException as e ->
            Expect.equal e.Origin origin "the origin names the builder call"
            Expect.equal e.Location location "the location names the argument or option"
            for fragment in fragments do
                Expect.stringContains e.Message fragment "the message says what is wrong"
        | other -> failtestf "expected InvalidInputException, got %O" other
    }

let private invalidUse =
    testList "invalid use" [
        rejects "a missing model names UseModel"
            (fun () -> Trainer.CreateBuilder().UseData("data.jsonl").UseOutput("out")) "UseModel" "" [ "is required" ]
        rejects "missing data names UseData"
            (fun () -> Trainer.CreateBuilder().UseModel("model").UseOutput("out")) "UseData" "" [ "is required" ]
        rejects "a missing output names UseOutput"
            (fun () -> Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl")) "UseOutput" "" [ "is required" ]
        rejects "accumulation 0 names AccumulateGradients and the command-line flag"
            (fun () -> complete().AccumulateGradients(0)) "AccumulateGradients" "steps"
            [ "at least 1, got 0"; "--gradient-accumulation-steps" ]
        rejects "a negative AdamW learning rate names UseAdamW's learningRate"
            (fun () -> complete().UseAdamW(-0.1)) "UseAdamW" "learningRate" [ ">= 0" ]
        rejects "a negative SGD learning rate names UseSgd's learningRate"
            (fun () -> complete().UseSgd(-0.1)) "UseSgd" "learningRate" [ ">= 0" ]
        rejects "an AdamW beta2 of 1 names the options property"
            (fun () -> complete().UseAdamW(1e-3, fun o -> o.Beta2 <- 1.0)) "UseAdamW" "Beta2" [ "[0, 1)" ]
        rejects "Nesterov without momentum names UseSgd's Nesterov"
            (fun () -> complete().UseSgd(0.1, fun o -> o.Nesterov <- true)) "UseSgd" "Nesterov" [ "momentum" ]
        rejects "LoRA options with rank 0 name UseLora's rank"
            (fun () -> complete().UseLora(0, fun o -> o.OnlyOptimizeLora <- true)) "UseLora" "rank" [ "at least 1" ]
        rejects "UseLora with UseLoraAdapter names UseLoraAdapter"
            (fun () -> complete().UseLora(4).UseLoraAdapter("adapter")) "UseLoraAdapter" "" [ "UseLora" ]
        rejects "an unknown schedule name names UseSchedule's Name"
            (fun () -> complete().UseSchedule(fun o -> o.Name <- "cosine_wave")) "UseSchedule" "Name" [ "cosine_wave" ]
        rejects "a bad scheduler parameter names the Kwargs key"
            (fun () -> complete().UseSchedule(fun o -> o.Name <- "cosine_with_restarts"; o.Kwargs <- """{"num_cycles": "two"}"""))
            "UseSchedule" "Kwargs.num_cycles" [ "expected a number" ]
        rejects "a negative warmup names the schedule method's warmupSteps"
            (fun () -> complete().UseCosineSchedule(-1)) "UseCosineSchedule" "warmupSteps" [ ">= 0" ]
        rejects "TrainForSteps(0) names TrainForSteps"
            (fun () -> complete().TrainForSteps(0)) "TrainForSteps" "steps" [ "at least 1" ]
        rejects "TrainForSteps(-1) is refused (epochs come from TrainForEpochs)"
            (fun () -> complete().TrainForSteps(-1)) "TrainForSteps" "steps" [ "TrainForEpochs" ]
        rejects "an unknown evaluation strategy names UseEvaluation's Strategy"
            (fun () -> complete().UseEvaluation(5, fun o -> o.Strategy <- "sometimes")) "UseEvaluation" "Strategy" [ "sometimes" ]
        rejects "load-best-at-end without evaluations names UseCheckpoints"
            (fun () -> complete().UseCheckpoints(5, fun o -> o.LoadBestModelAtEnd <- true))
            "UseCheckpoints" "LoadBestModelAtEnd" [ "--eval-strategy" ]
        rejects "bf16 with fp16 names UseFp16"
            (fun () -> complete().UseBf16().UseFp16()) "UseFp16" "" [ "cannot be combined" ]
        rejects "a bad loss-scale window names the options property"
            (fun () -> complete().UseFp16(fun o -> o.Window <- 0)) "UseFp16" "Window" [ "--loss-scale-window" ]
        rejects "an unknown train-on names UseData's TrainOn"
            (fun () -> complete().UseData("data.jsonl", fun o -> o.TrainOn <- "answers")) "UseData" "TrainOn" [ "answers" ]
        rejects "a max sequence length of 1 names UseData's MaxSequenceLength"
            (fun () -> complete().UseData("data.jsonl", fun o -> o.MaxSequenceLength <- 1)) "UseData" "MaxSequenceLength" [ "at least 2" ]
        test "Build twice on one builder throws InvalidOperationException naming Build" {
            let builder = complete()
            builder.Build() |> ignore
            let e = Expect.throwsC (fun () -> builder.Build() |> ignore) id
            Expect.equal (e.GetType()) typeof<InvalidOperationException> "InvalidOperationException"
            Expect.stringContains e.Message "Build" "names Build"
        }
        test "a failed Build can be fixed and built" {
            let builder = Trainer.CreateBuilder().UseData("data.jsonl").UseOutput("out")
            Expect.throwsT<InvalidInputException> (fun () -> builder.Build() |> ignore) "no model yet"
            Expect.equal (builder.UseModel("model").Build().ModelPath) "model" "built after the fix"
        }
        test "null arguments throw ArgumentNullException at the call" {
            Expect.throwsT<ArgumentNullException> (fun () -> Trainer.CreateBuilder().UseModel(null) |> ignore) "UseModel(null)"
            Expect.throwsT<ArgumentNullException> (fun () -> Trainer.CreateBuilder().UseAdamW(1e-3, null) |> ignore) "configure null"
        }
        test "warmup longer than the run is found by Fit and names the schedule call, before anything is written" {
            use output = new TempFolder()
            let plan = (goldenJob (output.File "run")).UseCosineSchedule(warmupSteps = 20).Build()
            let e = Expect.throwsC (fun () -> plan.Fit() |> ignore) id
            match e with
            | :? InvalidInputException as e ->
                Expect.equal e.Origin "UseCosineSchedule" "names the schedule call"
                Expect.equal e.Location "warmupSteps" "names its argument"
                Expect.stringContains e.Message "longer than the run" "says what is wrong"
            | other -> failtestf "expected InvalidInputException, got %O" other
            Expect.isFalse (Directory.Exists(output.File "run")) "nothing written"
        }
        test "a file error from Fit keeps naming the file" {
            use output = new TempFolder()
            let missing = output.File "missing.jsonl"
            let plan = (goldenJob (output.File "run")).UseData(missing).Build()
            let e = Expect.throwsC (fun () -> plan.Fit() |> ignore) id
            match e with
            | :? InvalidInputException as e -> Expect.equal e.Origin missing "the origin is the file"
            | other -> failtestf "expected InvalidInputException, got %O" other
        }
    ]

let private plans =
    testList "plan" [
        test "a valid plan exposes its settings, frozen at Build" {
            let builder = goldenJob "out"
            let plan = builder.Build()
            builder.UseAdamW(0.5).AccumulateGradients(7) |> ignore
            Expect.equal plan.ModelPath model "model"
            Expect.equal plan.DataPath data "data"
            Expect.equal plan.OutputPath "out" "output"
            Expect.equal plan.Optimizer OptimizerType.AdamW "optimizer"
            Expect.equal plan.LearningRate 3e-3 "learning rate"
            Expect.equal plan.ScheduleName "cosine" "schedule"
            Expect.equal plan.WarmupSteps 2 "warmup"
            Expect.equal plan.GradientAccumulationSteps 2 "accumulation, not changed by later builder calls"
            Expect.equal plan.PerDeviceTrainBatchSize 2 "batch size"
            Expect.equal plan.MaxSteps 10 "steps"
            let options = plan.ToFineTuneOptions()
            Expect.equal options.WeightDecay 0.1 "weight decay reaches the options"
            Expect.equal options.MaxSeqLen 32 "max sequence length reaches the options"
            Expect.isFalse options.UseDataCache "cache off"
            options.LearningRate <- 1.0
            Expect.equal plan.LearningRate 3e-3 "changing the copy leaves the plan as it is"
        }
        test "the options classes map onto the command line's settings" {
            let options =
                complete()
                    .UseSgd(0.1, fun o -> o.Momentum <- 0.9; o.Nesterov <- true; o.WeightDecay <- 0.01)
                    .UseSchedule(fun o -> o.Name <- "cosine_with_restarts"; o.WarmupRatio <- 0.1; o.Kwargs <- """{"num_cycles": 2}""")
                    .UseEvalData("eval.jsonl")
                    .UseEvaluation(4, fun o -> o.BatchSize <- 3; o.ExactMatchSamples <- 5)
                    .UseCheckpoints(4, fun o -> o.TotalLimit <- Nullable 2; o.LoadBestModelAtEnd <- true; o.EarlyStoppingPatience <- 3)
                    .UseLora(8, fun o -> o.Alpha <- 16.0; o.TargetModules <- ResizeArray [ "q_proj"; " v_proj " ]; o.OnlyOptimizeLora <- true)
                    .UseFp16(fun o -> o.InitialScalePower <- 8)
                    .UseGradientCheckpointing()
                    .TrainForEpochs(1.5)
                    .UseLogging(2)
                    .UseSeed(7L)
                    .ResumeFrom("latest")
                    .Build()
                    .ToFineTuneOptions()
            Expect.equal options.Optimizer OptimizerType.Sgd "SGD"
            Expect.equal (options.Momentum, options.Nesterov, options.WeightDecay) (0.9, true, 0.01) "SGD options"
            Expect.equal (options.LrSchedulerType, options.WarmupRatio, options.LrSchedulerKwargs) ("cosine_with_restarts", 0.1, """{"num_cycles": 2}""") "schedule"
            Expect.equal (options.EvalDataPath, options.EvalSteps, options.PerDeviceEvalBatchSize, options.ExactMatchSamples) ("eval.jsonl", 4, 3, 5) "evaluation"
            Expect.equal (options.SaveSteps, options.SaveTotalLimit, options.LoadBestModelAtEnd, options.EarlyStoppingPatience) (4, Nullable 2, true, 3) "checkpoints"
            Expect.equal (options.LoraDim, options.LoraAlpha, options.LoraTargetModules, options.OnlyOptimizeLora) (8, 16.0, "q_proj,v_proj", true) "LoRA"
            Expect.equal (options.Fp16, options.InitialScalePower, options.GradientCheckpointing) (true, 8, true) "precision and recompute"
            Expect.equal (options.NumTrainEpochs, options.MaxSteps, options.LoggingSteps, options.Seed) (1.5, -1, 2, 7L) "length, logging, seed"
            Expect.equal options.ResumeFromCheckpoint "latest" "resume"
        }
        test "UseConstantSchedule picks constant or constant_with_warmup" {
            Expect.equal (complete().UseConstantSchedule().Build().ScheduleName) "constant" "no warmup"
            Expect.equal (complete().UseConstantSchedule(3).Build().ScheduleName) "constant_with_warmup" "warmup"
        }
    ]

let private fitting =
    testList "fit" [
        test "Fit trains the golden LLaMA for 10 steps, writes metrics.jsonl and reports each step's loss, lr, grad norm and tokens/s" {
            use output = new TempFolder()
            let reports = Collections.Concurrent.ConcurrentQueue<TrainingProgress>()
            let result = (goldenJob (output.File "run")).OnProgress(fun p -> reports.Enqueue p).Build().Fit()
            Expect.equal result.Steps 10 "10 steps"
            Expect.isFalse result.Interrupted "not interrupted"
            Expect.isTrue (File.Exists(Path.Combine(result.FinalModelPath, "model.safetensors"))) "final/ saved"
            let lines = readJsonLines result.MetricsPath |> Array.filter (fun l -> l.TryGetProperty("grad_norm") |> fst)
            Expect.equal lines.Length 10 "one metrics line per step"
            let reports = reports.ToArray()
            Expect.equal (reports |> Array.map (fun p -> p.Step)) [| 1 .. 10 |] "the callback saw every step"
            for p, line in Array.zip reports lines do
                Expect.equal p.TotalSteps 10 "total steps"
                Expect.floatClose Accuracy.high p.Loss (line.GetProperty("loss").GetDouble()) "loss as in metrics.jsonl"
                Expect.floatClose Accuracy.high p.LearningRate (line.GetProperty("lr").GetDouble()) "lr as in metrics.jsonl"
                Expect.floatClose Accuracy.high p.GradNorm (line.GetProperty("grad_norm").GetDouble()) "grad norm as in metrics.jsonl"
                Expect.isGreaterThan p.TokensPerSecond 0.0 "tokens per second"
            Expect.isLessThan result.FinalLoss reports[0].Loss "the loss went down"
        }
        test "FitAsync cancelled from the progress callback finishes the step, saves a checkpoint and returns Interrupted" {
            use output = new TempFolder()
            use cancellation = new CancellationTokenSource()
            let plan = (goldenJob (output.File "run")).OnProgress(fun p -> if p.Step = 3 then cancellation.Cancel()).Build()
            let result = plan.FitAsync(cancellation.Token).Result
            Expect.isTrue result.Interrupted "interrupted"
            Expect.equal result.Steps 3 "stopped after the step that cancelled"
            Expect.equal (result.Checkpoints |> Seq.map Path.GetFileName |> List.ofSeq) [ "checkpoint-3" ] "saved checkpoint-3"
            Expect.isTrue (Directory.Exists(Seq.last result.Checkpoints)) "the checkpoint exists"
            Expect.isFalse (Directory.Exists(output.File "run/final")) "final/ not written"
        }
        test "finding 1: the QuickStart sample trains through the builder, built by the test project itself (the README's test command alone works on a fresh clone)" {
            let dll = Path.Combine(ScriptTests.repositoryRoot (), "samples", "QuickStart", "bin", "Release", "net10.0", "QuickStart.dll")
            Expect.isTrue (File.Exists dll) (sprintf "%s exists (the test project builds the sample: see its ProjectReference)" dll)
            use output = new TempFolder()
            let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
            for a in [ dll; golden; output.File "run" ] do
                info.ArgumentList.Add a
            use p = Process.Start info
            let stdout = p.StandardOutput.ReadToEndAsync()
            let stderr = p.StandardError.ReadToEndAsync()
            p.WaitForExit()
            Expect.equal p.ExitCode 0 (sprintf "exit code (stdout: %s, stderr: %s)" stdout.Result stderr.Result)
            Expect.stringContains stdout.Result "step 10/10" "ten steps reported by the callback"
            Expect.stringContains stdout.Result "after 10 steps" "the result printed"
            Expect.equal (readJsonLines (output.File "run/metrics.jsonl") |> Array.filter (fun l -> l.TryGetProperty("grad_norm") |> fst) |> Array.length) 10 "metrics of ten steps"
            Expect.isTrue (File.Exists(output.File "run/final/model.safetensors")) "the model saved"
        }
    ]

/// Types a C# caller should never meet in a signature: F# types (FSharp.Core, the F# core) and tuples.
/// Core interfaces a C# caller implements itself (the facade exposes them): their own members are checked
/// to be C#-shaped instead.
let private implementable: Type list = [ typeof<Functional.Distributed.ICommunicator> ]

let rec private fSharpShaped (t: Type) =
    if t.HasElementType then fSharpShaped (t.GetElementType())
    else
        let definition = if t.IsGenericType then t.GetGenericTypeDefinition() else t
        let assembly = definition.Assembly.GetName().Name
        assembly = "FSharp.Core"
        || (assembly = "Functional.Core" && not (List.contains definition implementable))
        || (definition.FullName <> null && (definition.FullName.StartsWith "System.Tuple`" || definition.FullName.StartsWith "System.ValueTuple`"))
        || (t.IsGenericType && t.GetGenericArguments() |> Array.exists fSharpShaped)

/// Every type in the public signatures of a public type's public members.
let private signatureTypes (t: Type) =
    let flags = BindingFlags.Public ||| BindingFlags.Instance ||| BindingFlags.Static ||| BindingFlags.DeclaredOnly
    let parameters (m: MethodBase) = m.GetParameters() |> Array.map (fun p -> sprintf "%s(%s)" m.Name p.Name, p.ParameterType)
    [| for m in t.GetMethods flags do
           yield! parameters m
           yield sprintf "%s returns" m.Name, m.ReturnType
       for c in t.GetConstructors flags do yield! parameters c
       for p in t.GetProperties flags do yield p.Name, p.PropertyType
       for f in t.GetFields flags do yield f.Name, f.FieldType
       for e in t.GetEvents flags do yield e.Name, e.EventHandlerType
       if not (isNull t.BaseType) then yield "base type", t.BaseType
       for i in t.GetInterfaces() do yield "interface", i |]

let private surface =
    testList "C# surface" [
        test "the F#-shape detector flags FSharpOption, FSharpList, FSharpFunc, tuples and core records" {
            for t in [ typeof<int option>; typeof<int list>; typeof<int -> int>; typeof<Tuple<int, int>>; typeof<struct (int * int)>
                       typeof<Functional.Training.StepLog>; typeof<Action<int option>>; typeof<(int * int)[]> ] do
                Expect.isTrue (fSharpShaped t) (sprintf "%s is flagged" t.Name)
            for t in [ typeof<int>; typeof<string>; typeof<Action<TrainingProgress>>; typeof<Collections.Generic.IList<string>> ] do
                Expect.isFalse (fSharpShaped t) (sprintf "%s is not flagged" t.Name)
        }
        test "no public member of the C# facade exposes FSharpOption, FSharpList, FSharpFunc, a tuple or an F# core type" {
            let offenders =
                [ for t in typeof<TrainerBuilder>.Assembly.GetExportedTypes() do
                      for name, used in signatureTypes t do
                          if fSharpShaped used then yield sprintf "%s.%s: %s" t.Name name used.FullName ]
            Expect.isEmpty offenders "C#-shaped signatures only"
        }
        test "the core interfaces C# callers implement (ICommunicator) have C#-shaped members" {
            let offenders =
                [ for t in implementable do
                      for name, used in signatureTypes t do
                          if fSharpShaped used then yield sprintf "%s.%s: %s" t.Name name used.FullName ]
            Expect.isEmpty offenders "C#-shaped signatures only"
        }
    ]

[<Tests>]
let tests = testList "builder" [ invalidUse; plans; fitting; surface ]
