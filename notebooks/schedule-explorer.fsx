(**
# Schedules and gradient accumulation

Two pieces of the trainer are plain functions that are easy to look at on their own:

- the learning-rate schedules, with Hugging Face's formulas (`transformers/optimization.py`);
- gradient accumulation, whose accumulated gradient must equal the gradient of one big batch.
*)
#load "references.fsx"

open System
open System.Globalization
open System.IO
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open References

let output = Repository.output "schedule-explorer"

(**
## Every schedule over 100 steps

`Schedule.create` builds a schedule as HF's `get_scheduler` does: the base learning rate, the warmup
and total optimizer steps, and the schedule's own options (HF's `lr_scheduler_kwargs`). A schedule is a
function from the optimizer step (from 0) to the learning rate. Here: base rate 1e-3, 10 warmup steps,
2 cycles for the restarts, a floor of 10% for `cosine_with_min_lr` and `cosine_warmup_with_min_lr`,
30 decay steps for `warmup_stable_decay`.
*)
let totalSteps = 100
let warmupSteps = 10
let baseLr = 1e-3

/// Each schedule's own options: a schedule refuses the ones it does not take, as HF's do.
let optionsFor (kind: SchedulerKind) =
    match kind with
    | SchedulerKind.CosineWithRestarts -> { ScheduleOptions.Defaults with NumCycles = Some 2.0 }
    | SchedulerKind.CosineWithMinLr
    | SchedulerKind.CosineWarmupWithMinLr -> { ScheduleOptions.Defaults with MinLr = Some(MinLearningRate.RatioOfBase 0.1) }
    | SchedulerKind.WarmupStableDecay -> { ScheduleOptions.Defaults with NumDecaySteps = Some 30 }
    | _ -> ScheduleOptions.Defaults

// reduce_lr_on_plateau follows the evaluations, not the step, so it has no curve here.
let schedules =
    Schedule.names
    |> List.filter (fun name -> name <> "reduce_lr_on_plateau")
    |> List.map (fun name ->
        let kind = Schedule.parseOption "--lr-scheduler-type" name
        name, Schedule.create kind baseLr warmupSteps totalSteps (optionsFor kind))

let steps = [| 0 .. totalSteps |]
let shownSteps = [ 0; 5; 10; 30; 50; 70; 90; 100 ]
let cell (text: string) = text.PadLeft 10

printfn "%-22s%s" "step" (String.Join("", [ for k in shownSteps -> cell (string k) ]))
for name, schedule in schedules do
    printfn "%-22s%s" name (String.Join("", [ for k in shownSteps -> cell ((schedule k).ToString("0.00e+0", CultureInfo.InvariantCulture)) ]))

(**
Plotted with ScottPlot, one line per schedule:
*)
let chartPath = Path.Combine(output, "schedules.png")
let chart = new ScottPlot.Plot()

for name, schedule in schedules do
    let line = chart.Add.Scatter(Array.map float steps, Array.map schedule steps)
    line.LegendText <- name
    line.MarkerSize <- 0.0f
    line.LineWidth <- 2.0f

chart.Title(sprintf "Learning-rate schedules: %d steps, %d warmup steps" totalSteps warmupSteps)
chart.XLabel "optimizer step"
chart.YLabel "learning rate"
chart.ShowLegend(ScottPlot.Edge.Right) |> ignore
chart.SavePng(chartPath, 1000, 500) |> ignore
printfn "chart saved to %s" chartPath

(**
## Gradient accumulation equals one big batch

The loss of an optimizer step is the sum of the token losses of its whole accumulation window divided by
the window's predicted tokens. `Accumulation` keeps that bookkeeping as a pure state machine: before a
window, `beginWindow` receives the window's token count; each micro-batch backpropagates its summed loss
times `Accumulation.lossScale windowTokens`; `observe` reports the step at the window's last micro-batch.

Six rows of very unequal lengths (3 to 40 tokens) go through the golden LLaMA, once as one batch and once
as three micro-batches of two rows accumulated, and the gradients are compared.
*)
let model = HfModelFolder.load (Path.Combine(Repository.golden "llama-cosine", "model")) 0L
model.Module.eval () |> ignore

let random = Random 7
let lengths = [| 40; 3; 25; 6; 12; 33 |]
let rows = lengths |> Array.map (fun n -> Array.init n (fun _ -> int64 (random.Next 96)))
let dataset = { Path = "six rows"; Rows = rows; Lines = [| 1 .. rows.Length |]; PromptLengths = Array.zeroCreate rows.Length; Segments = [||]; TrainMasks = [||] }
let collate (indices: int[]) = Batching.collate 64 0L dataset indices

/// The gradient of every parameter after running backward, flattened into one vector.
let gradientOf (backward: unit -> unit) =
    model.Module.zero_grad ()
    backward ()
    torch.cat([| for p in model.Module.parameters () -> p.grad.flatten () |], 0L)

let logitsOf (batch: MicroBatch) = model.Module.forward batch.InputIds

(**
One big batch: the summed token loss over the mean's denominator, all predicted tokens.
*)
let whole = collate [| 0 .. 5 |]

let bigBatch =
    gradientOf (fun () -> (Loss.causalLmSum (logitsOf whole) whole.Labels / float whole.PredictedTokens).backward ())

printfn "one batch: %d rows, %d predicted tokens" rows.Length whole.PredictedTokens

(**
Three micro-batches of two rows, accumulated by the state machine: the window's tokens are counted
first, each micro-batch's summed loss is scaled by 1 / window tokens.
*)
let plan = Accumulation.plan 3 3
let microBatches = [ [| 0; 1 |]; [| 2; 3 |]; [| 4; 5 |] ] |> List.map collate
let windowTokens = microBatches |> List.sumBy (fun b -> b.PredictedTokens)

let mutable report = None

let accumulated =
    gradientOf (fun () ->
        microBatches
        |> List.fold
            (fun state batch ->
                let lossSum = Loss.causalLmSum (logitsOf batch) batch.Labels
                (lossSum * Accumulation.lossScale windowTokens).backward ()
                match Accumulation.observe plan state (lossSum.item<float32> () |> float) with
                | next, AccumulationEvent.Step step ->
                    report <- Some step
                    next
                | next, AccumulationEvent.Accumulating -> next)
            (Accumulation.beginWindow plan Accumulation.start windowTokens)
        |> ignore)

for batch in microBatches do
    printfn "micro-batch: %d predicted tokens" batch.PredictedTokens

let maxDifference (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32> () |> float

printfn "token-weighted accumulation vs one batch: max |difference| = %.2e (gradient max %.2e)" (maxDifference accumulated bigBatch) (bigBatch.abs().max().item<float32> ())
printfn "window loss: %.6f reported by observe, %.6f for the one batch" report.Value.Loss
    ((Loss.causalLmSum (logitsOf whole) whole.Labels).item<float32> () / float32 whole.PredictedTokens)

(**
For contrast, averaging each micro-batch's own mean loss (what a plain `loss / accumulation_steps` does)
weights the short rows' tokens more, and the gradient differs by far more than float noise:
*)
let naive =
    gradientOf (fun () ->
        for batch in microBatches do
            (Loss.causalLmSum (logitsOf batch) batch.Labels / float batch.PredictedTokens / 3.0).backward ())

printfn "mean of micro-batch means vs one batch:       max |difference| = %.2e" (maxDifference naive bigBatch)
