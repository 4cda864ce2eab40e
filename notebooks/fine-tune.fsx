// Fine-tunes the small LLaMA checkpoint shipped in tests/golden on its sample data, from F#.
// Build the library first (dotnet build core-fs/Functional.Core -c Release), then:
//   dotnet fsi notebooks/fine-tune.fsx [output-folder]
#load "references.fsx"

open System.IO
open Functional
open Functional.Training

let sample = Path.Combine(__SOURCE_DIRECTORY__, "..", "tests", "golden", "llama-cosine")
let output =
    match fsi.CommandLineArgs |> Array.tail with
    | [| folder |] -> folder
    | _ -> Path.Combine(Path.GetTempPath(), "functional-fine-tune-fsx")

let options =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 2
        LearningRate = 3e-3
        LrSchedulerType = SchedulerKind.Cosine
        NumWarmupSteps = 2
        MaxSteps = 10
        MaxSeqLen = 32 }

let result =
    FineTune.run
        { ModelPath = Path.Combine(sample, "model")
          DataPath = Path.Combine(sample, "data.jsonl")
          OutputPath = output
          OverwriteOutputDir = true
          Options = options
          Data = FineTune.defaultData
          ResumeFromCheckpoint = None
          Lora = None
          GradientCheckpointing = false }
        (fun log -> printfn "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f" log.Step log.TotalSteps log.Loss log.LearningRate log.GradNorm)

printfn "final loss %.4f after %d steps; model in %s" result.FinalLoss result.Steps result.FinalModelPath
