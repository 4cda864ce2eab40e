(**
# F# quick start: fine-tune a small LLaMA

This notebook fine-tunes the tiny LLaMA checkpoint of `tests/golden/llama-cosine` (2 layers, width 32,
made with PyTorch) on its pre-tokenized sample data for a few dozen optimizer steps, then plots the loss
and the learning rate with ScottPlot.

Build the library first: `dotnet build core-fs/Functional.Core -c Release`. The same code runs as a
script: `dotnet fsi notebooks/fsharp-quick-start.fsx`.
*)
#load "references.fsx"

open System
open System.IO
open Functional
open Functional.Training
open References

(**
## The job

A fine-tuning job is a record: where the model, the data and the output are, and the hyperparameters
(`TrainOptions`, Hugging Face's `TrainingArguments` names and defaults). Micro-batches of 2 rows are
accumulated in pairs; the learning rate warms up for 4 steps and then follows a cosine.
*)
let sample = Repository.golden "llama-cosine"

let options =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 2
        LearningRate = 3e-3
        LrSchedulerType = SchedulerKind.Cosine
        NumWarmupSteps = 4
        MaxSteps = 30
        MaxSeqLen = 32 }

let request =
    { FineTune.request (Path.Combine(sample, "model")) (Path.Combine(sample, "data.jsonl")) (Repository.output "fsharp-quick-start") with
        OverwriteOutputDir = true
        Options = options
        // loss.png: the chart drawn with ScottPlot when the run ends.
        Plot = Functional.Reporting.MetricsPlot.drawer }

(**
## Train

`FineTune.run` validates everything before it writes anything, trains, and writes `metrics.jsonl`,
a TensorBoard event file, `loss.png` and `final/` (a Hugging Face model folder). Each optimizer step is
reported to the callback: here every step's log is kept, and every fifth one printed.
*)
let steps = ResizeArray<StepLog>()

let result =
    FineTune.run request (fun log ->
        steps.Add log
        if log.Step % 5 = 0 then
            printfn "step %2d/%d  loss %.4f  lr %.2e  grad_norm %.3f" log.Step log.TotalSteps log.Loss log.LearningRate log.GradNorm)

(**
## Plot loss and learning rate

One ScottPlot chart: the loss per optimizer step on the left axis, the learning rate (linear warmup,
then cosine decay) on the right axis.
*)
let chartPath = Path.Combine(request.OutputPath, "quick-start.png")

let stepNumbers = [| for s in steps -> float s.Step |]
let chart = new ScottPlot.Plot()
let loss = chart.Add.Scatter(stepNumbers, [| for s in steps -> s.Loss |])
loss.LegendText <- "training loss"
let rate = chart.Add.Scatter(stepNumbers, [| for s in steps -> s.LearningRate |])
rate.LegendText <- "learning rate"
rate.Axes.YAxis <- chart.Axes.Right
chart.Title "Fine-tuning the golden LLaMA"
chart.XLabel "optimizer step"
chart.YLabel "loss"
chart.Axes.Right.Label.Text <- "learning rate"
chart.ShowLegend() |> ignore
chart.SavePng(chartPath, 900, 500) |> ignore
printfn "chart saved to %s" chartPath

(**
## Summary
*)
printfn "%d steps in %.1f s: loss %.4f -> %.4f" result.Steps result.Seconds steps[0].Loss result.FinalLoss
printfn "metrics:     %s" result.MetricsPath
printfn "final model: %s (%s)" result.FinalModelPath (String.Join(", ", Directory.GetFiles result.FinalModelPath |> Array.map Path.GetFileName |> Array.sort))
