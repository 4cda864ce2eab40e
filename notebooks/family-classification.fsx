(**
# Sentiment classification with BLOOM, batch size 1 and gradient accumulation

Sebastian Raschka's blog post on gradient accumulation fine-tunes BLOOM (`bigscience/bloom-560m`) to
classify the sentiment of movie reviews on a single GPU. Where a batch of 16 does not fit in memory, it
trains with batch size 1 and adds up the gradients of 16 micro-batches before each optimizer step, which
gives the update of a batch of 16.

This notebook does the same thing at a size that runs in about a minute on 2 cores:

- a small BLOOM model (ALiBi attention, no position embedding), built by the library with HF's
  `BloomForSequenceClassification` head (`score` on the last token that is not padding);
- the embedded sentiment reviews (`"the film was not dull"` -> positive; negation included);
- a per-device batch size of 1 with 16 accumulation steps, checked against a batch of 16;
- accuracy on held-out reviews before and after training, and a confusion matrix.

The blog post starts from pretrained BLOOM weights. Here the backbone starts from random weights, so all
it knows comes from this run.
*)
#load "references.fsx"

open System
open System.IO
open System.Text.Json
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Text
open Functional.Training
open References

let output = Repository.output "family-classification"
let folder (name: string) = Directory.CreateDirectory(Path.Combine(output, name)).FullName

(**
## Data and tokenizer

`EmbeddedClassification.samples` draws short reviews from a seed: a subject, "was" or "was not", and a
positive or negative word. Negation flips the label, so the model has to read the whole sentence and
cannot decide on the last word alone. The held-out reviews come from another seed. Both sets are written
as JSON Lines with `text` and `label`. A byte-level BPE tokenizer with 64 merges, learned from the
training texts, turns most words into single tokens.
*)
let train = EmbeddedClassification.samples 42 3000
let heldOut = EmbeddedClassification.samples 43 200

let writeJsonLines (path: string) (rows: (string * string)[]) =
    rows
    |> Array.map (fun (text, label) -> JsonSerializer.Serialize(dict [ "text", text; "label", label ]))
    |> fun lines -> File.WriteAllLines(path, lines)
    path

let trainPath = writeJsonLines (Path.Combine(output, "train.jsonl")) train
let evalPath = writeJsonLines (Path.Combine(output, "eval.jsonl")) heldOut

let tokenizerFolder = folder "tokenizer"
BpeTraining.trainToFolder (Array.map fst train) 64 tokenizerFolder
let tokenizer = Tokenizers.fromFolder tokenizerFolder

let share (rows: (string * string)[]) (keep: string * string -> bool) = 100.0 * float (rows |> Array.filter keep |> Array.length) / float rows.Length
printfn "%d training reviews (%.0f%% positive, %.0f%% negated), %d held out" train.Length
    (share train (fun (_, l) -> l = "positive")) (share train (fun (t, _) -> t.Contains " not ")) heldOut.Length
for text, label in train |> Array.truncate 4 do
    printfn "  %-26s -> %s" text label
printfn "vocabulary: %d tokens; \"%s\" -> %A" tokenizer.VocabSize (fst heldOut[0]) (tokenizer.Encode(fst heldOut[0]))

(**
## A small BLOOM

The config uses BLOOM's own field names (`n_layer`, `n_head`, `hidden_size`; see `docs/bloom.md`):
2 layers of width 64 and 4 heads with ALiBi slopes, tied embeddings, and no dropout, so that the two
runs below can be compared exactly. The tokenizer's one special token (the last id) serves as the
padding id: the classifier pools the last token that is not padding, and batches of more than one review
need padding. The fine-tuning job gets it as the task's `PadTokenId` (the CLI's `--pad-token-id`) and
writes it to the classifier's config.json. The model is saved as a `BloomForCausalLM` folder, the kind of checkpoint the blog post starts
from. The fine-tuning job puts a new `score` head on its backbone.
*)
let padId = tokenizer.VocabSize - 1

let bloomConfig =
    sprintf
        """{"model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": %d, "hidden_size": 64,
            "n_layer": 2, "n_head": 4, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": true, "seq_length": 32}"""
        tokenizer.VocabSize
    |> ModelConfig.parse "small BLOOM"

let initial = folder "initial"
let untrained = CausalLm.create bloomConfig 42L
HfModelFolder.save initial untrained None (List.ofArray (Directory.GetFiles tokenizerFolder))

let parameterCount = CausalLm.parameterSpec untrained |> List.sumBy (fun (_, shape) -> Array.fold (*) 1L shape)
printfn "BLOOM: %d parameters; the first tensors:" parameterCount
for name, shape in CausalLm.parameterSpec untrained |> List.truncate 4 do
    printfn "  %-50s %A" name shape

(**
## The fine-tuning job

`TrainingTask.SequenceClassification` makes the job a classifier's: labels from the training file
(`negative`, `positive`, sorted as HF's `run_glue` does), cross-entropy on the pooled logits, and
accuracy and macro-F1 in every evaluation. The optimizer is AdamW (learning rate 2e-3, cosine schedule
with 5% warmup). `batch` and `accumulation` are the two settings the blog post is about.
*)
let job (name: string) (batch: int) (accumulation: int) (steps: int) (evaluate: bool) =
    { FineTune.request initial trainPath (folder name) with
        OverwriteOutputDir = true
        Options =
            { TrainOptions.defaults with
                PerDeviceTrainBatchSize = batch
                GradientAccumulationSteps = accumulation
                LearningRate = 2e-3
                WeightDecay = 0.01
                LrSchedulerType = SchedulerKind.Cosine
                WarmupRatio = 0.05
                MaxSteps = steps
                MaxSeqLen = 16
                LoggingSteps = 1
                PerDeviceEvalBatchSize = 100
                SaveStrategy = IntervalStrategy.No
                ReportToTensorBoard = false }
        Data = { FineTune.defaultData with EvalDataPath = (if evaluate then Some evalPath else None) }
        Task = TrainingTask.SequenceClassification { TextField = "text"; LabelField = "label"; NumLabels = None; PadTokenId = Some(int64 padId) } }

(**
## Batch size 1 with 16 accumulation steps is the job of batch size 16

The trainer adds up the loss of a whole accumulation window and divides it by the number of examples in
the window, not by the number in each micro-batch. So 16 micro-batches of one review give the gradient of
one batch of 16 reviews. In the batch of 16, the padding after a short review does not change the
hidden state of its last real token, the one the head pools (attention is causal), so the logits match
too. The two settings train 8 optimizer steps here from the same start, on the same
shuffled reviews:
*)
let stepLosses (request: FineTuneRequest) =
    let losses = ResizeArray<float>()
    let result = FineTune.run request (fun log -> losses.Add log.Loss)
    result, losses.ToArray()

let accumulated, accumulatedLosses = stepLosses (job "batch-1-x-16" 1 16 8 false)
let oneBatch, oneBatchLosses = stepLosses (job "batch-16" 16 1 8 false)

let weightsOf (result: FineTuneOutcome) = Safetensors.load (Path.Combine(result.FinalModelPath, "model.safetensors"))

let weightDifference =
    let a, b = weightsOf accumulated, weightsOf oneBatch
    a |> Map.toSeq |> Seq.map (fun (name, t) -> (t - b[name]).abs().max().item<float32> () |> float) |> Seq.max

printfn "step  loss (batch 1 x 16)  loss (batch 16)"
for step in 0 .. accumulatedLosses.Length - 1 do
    printfn "%4d  %19.6f  %15.6f" (step + 1) accumulatedLosses[step] oneBatchLosses[step]
printfn "max |loss difference| over %d steps: %.2e" accumulatedLosses.Length
    (Array.map2 (fun (a: float) b -> abs (a - b)) accumulatedLosses oneBatchLosses |> Array.max)
printfn "max |weight difference| after them:  %.2e" weightDifference

(**
## Training

The real run keeps batch size 1 with 16 accumulation steps: 200 optimizer steps, that is 3,200 reviews,
a little over one epoch. The held-out reviews are evaluated before the first step and after the last.
*)
let result =
    FineTune.run (job "train" 1 16 200 true) (fun log ->
        if log.Step % 25 = 0 then printfn "  step %3d/%d  loss %.4f  lr %.2e" log.Step log.TotalSteps log.Loss log.LearningRate)

let accuracyOf (figures: EvalFigures option) =
    figures |> Option.bind (fun f -> f.Eval.Metrics |> List.tryFind (fun (name, _) -> name = "accuracy")) |> Option.map snd |> Option.defaultValue nan

printfn "%d steps in %.1f s, final loss %.4f" result.Steps result.TrainRuntime result.FinalLoss
printfn "held-out accuracy: %.1f%% before training, %.1f%% after" (100.0 * accuracyOf result.Before) (100.0 * accuracyOf result.After)

(**
## The trained classifier

`final/` is a Hugging Face `BloomForSequenceClassification` folder: the backbone under `transformer.`,
the head as `score.weight`, and `id2label` and `pad_token_id` in config.json. Loading it gives the
classifier back. For the model before training, `HfModelFolder.loadClassifier` puts the job's head on the
initial BLOOM folder; with the job's seed it draws the same `score` the job started from.
*)
let trained = HfModelFolder.load result.FinalModelPath 42L
let head = (SequenceClassification.tryHead trained).Value
let before = HfModelFolder.loadClassifier initial head 42L
let labels = head.Labels

let config = JsonDocument.Parse(File.ReadAllText(Path.Combine(result.FinalModelPath, "config.json"))).RootElement
for key in [ "architectures"; "id2label"; "pad_token_id" ] do
    printfn "%-14s %s" key (config.GetProperty(key).GetRawText().Replace("\n", "").Replace("  ", ""))
printfn "%-14s %A" "score.weight" (weightsOf result).["score.weight"].shape

(**
## Predictions

A prediction is the argmax of the logits for the tokenized review (HF's `tokenizer(text)`, encoded as
the job did it), one review at a time. The counts go into a confusion matrix: rows are the true labels,
columns the predicted ones. Accuracy from these predictions matches the job's own evaluation above.
*)
let predict (model: CausalLm) (text: string) =
    use _ = torch.no_grad ()
    use ids = torch.tensor(TaskData.encode tokenizer 16 text, dtype = torch.int64).unsqueeze 0L
    use logits = model.Module.forward ids
    int (logits.argmax(-1L).item<int64> ())

let truth = heldOut |> Array.map (fun (_, label) -> Array.IndexOf(labels, label))

let confusion (model: CausalLm) =
    model.Module.eval () |> ignore
    let predicted = heldOut |> Array.map (fst >> predict model)
    let matrix = Array2D.zeroCreate<int> labels.Length labels.Length
    Array.iter2 (fun t p -> matrix[t, p] <- matrix[t, p] + 1) truth predicted
    predicted, matrix

let accuracyOfMatrix (matrix: int[,]) =
    float (List.sum [ for i in 0 .. labels.Length - 1 -> matrix[i, i] ]) / float truth.Length

let show (name: string) (matrix: int[,]) =
    printfn "%s: accuracy %.1f%%" name (100.0 * accuracyOfMatrix matrix)
    printfn "  %-16s%s" "true \\ predicted" (String.Join("", labels |> Array.map (fun l -> l.PadLeft 10)))
    for t in 0 .. labels.Length - 1 do
        printfn "  %-16s%s" labels[t] (String.Join("", [ for p in 0 .. labels.Length - 1 -> (string matrix[t, p]).PadLeft 10 ]))

let _, beforeMatrix = confusion before
let predicted, afterMatrix = confusion trained
show "before training" beforeMatrix
show "after training" afterMatrix

let wrong = Seq.zip heldOut predicted |> Seq.filter (fun ((_, label), p) -> labels[p] <> label) |> Array.ofSeq
printfn "%d held-out reviews misclassified after training" wrong.Length
for (text, label), p in wrong |> Array.truncate 5 do
    printfn "  %-26s is %s, predicted %s" text label labels[p]

(**
## Confusion matrices

The same counts as a chart made with ScottPlot, before and after training side by side: true labels
down the side, predictions along the bottom, each cell shaded by its share of its row.
*)
let chartPath = Path.Combine(output, "confusion-matrix.png")
let chart = new ScottPlot.Plot()
let n = labels.Length

/// Draws a confusion matrix with its left edge at x0, row 0 at the top.
let drawMatrix (x0: float) (title: string) (matrix: int[,]) =
    for t in 0 .. n - 1 do
        let rowTotal = List.sum [ for p in 0 .. n - 1 -> matrix[t, p] ] |> max 1
        for p in 0 .. n - 1 do
            let x, y = x0 + float p, float (n - 1 - t)
            let share = float matrix[t, p] / float rowTotal
            let cell = chart.Add.Rectangle(x, x + 1.0, y, y + 1.0)
            cell.FillStyle.Color <- ScottPlot.Colors.SteelBlue.WithAlpha(0.1 + 0.9 * share)
            cell.LineStyle.Color <- ScottPlot.Colors.White
            cell.LineStyle.Width <- 2.0f
            let count = chart.Add.Text(string matrix[t, p], x + 0.5, y + 0.5)
            count.LabelFontSize <- 26.0f
            count.LabelBold <- true
            count.LabelAlignment <- ScottPlot.Alignment.MiddleCenter
            count.LabelFontColor <- (if share > 0.6 then ScottPlot.Colors.White else ScottPlot.Colors.Black)
    let caption = chart.Add.Text(sprintf "%s (accuracy %.1f%%)" title (100.0 * accuracyOfMatrix matrix), x0 + float n / 2.0, float n + 0.05)
    caption.LabelFontSize <- 16.0f
    caption.LabelAlignment <- ScottPlot.Alignment.LowerCenter

let gap = 0.6
drawMatrix 0.0 "before training" beforeMatrix
drawMatrix (float n + gap) "after training" afterMatrix

chart.Axes.Bottom.SetTicks([| for x0 in [ 0.0; float n + gap ] do for p in 0 .. n - 1 -> x0 + float p + 0.5 |], Array.append labels labels)
chart.Axes.Left.SetTicks([| for t in 0 .. n - 1 -> float (n - 1 - t) + 0.5 |], labels)
chart.Axes.SetLimits(-0.05, 2.0 * float n + gap + 0.05, -0.05, float n + 0.4)
chart.Grid.IsVisible <- false
chart.XLabel "predicted label"
chart.YLabel "true label"
chart.Title(sprintf "BLOOM sentiment classifier, %d held-out reviews" truth.Length)
chart.SavePng(chartPath, 900, 480) |> ignore
printfn "chart saved to %s" chartPath
