namespace Functional.Training

open System
open TorchSharp
open Functional
open Functional.Data
open Functional.Models

/// An evaluation over a held-out dataset.
[<NoComparison>]
type EvalResult =
    { /// Count-weighted mean loss: the objective's loss summed over the set / its count (the predicted
      /// tokens for causal language modelling).
      Loss: float
      /// exp(Loss).
      Perplexity: float
      /// What the loss was averaged over: the predicted tokens for causal language modelling, the
      /// examples or pairs of a classification or reward task.
      Tokens: int64
      /// A task's own figures, named as metrics.jsonl writes them without eval_ (see EvalRecord.Metrics);
      /// empty for causal language modelling.
      Metrics: (string * float) list }

/// Classification figures with scikit-learn's semantics.
[<RequireQualifiedAccess>]
module ClassificationMetrics =

    /// The fraction of predictions equal to the truth (NaN for no examples).
    let accuracy (truth: int[]) (predicted: int[]) : float =
        if truth.Length = 0 then nan
        else float (Array.fold2 (fun n t p -> if t = p then n + 1 else n) 0 truth predicted) / float truth.Length

    /// sklearn's f1_score(average="macro"): the mean F1 over the labels present in truth or predictions;
    /// a label whose precision and recall are both 0 (or undefined) has F1 0.
    let macroF1 (truth: int[]) (predicted: int[]) : float =
        let labels = Array.append truth predicted |> Array.distinct
        if labels.Length = 0 then nan
        else
            labels
            |> Array.averageBy (fun label ->
                let mutable tp, fp, fn = 0, 0, 0
                for i in 0 .. truth.Length - 1 do
                    match truth[i] = label, predicted[i] = label with
                    | true, true -> tp <- tp + 1
                    | false, true -> fp <- fp + 1
                    | true, false -> fn <- fn + 1
                    | false, false -> ()
                // F1 = 2 tp / (2 tp + fp + fn); 0 when there is nothing to count.
                if tp = 0 then 0.0 else 2.0 * float tp / float (2 * tp + fp + fn))

/// Evaluation loss and perplexity, weighted by tokens exactly as training's loss is.
[<RequireQualifiedAccess>]
module Evaluation =

    /// Evaluates the model under objective on every row of dataset in micro-batches of batchSize rows
    /// (truncated to maxSeqLen, padded with padId), without gradients and in eval mode (dropout off); the
    /// model's previous mode is restored. Each micro-batch runs in its own dispose scope.
    let evaluateWith (objective: Objective) (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) (padId: int64) : EvalResult =
        Functional.Runtime.TorchRuntime.ensure ()
        let wasTraining = model.Module.training
        model.Module.eval ()
        try
            use _ = torch.no_grad ()
            let lossSum, tokens =
                Batching.microBatches batchSize (Sampler.sequential dataset.Rows.Length)
                |> Array.fold
                    (fun (lossSum, tokens) indices ->
                        use _ = torch.NewDisposeScope()
                        let batch = objective.Collate maxSeqLen padId dataset indices
                        use sum = objective.LossSum model batch
                        lossSum + float (sum.item<float32> ()), tokens + objective.Count batch)
                    (0.0, 0L)
            let loss = if tokens = 0L then nan else lossSum / float tokens
            { Loss = loss; Perplexity = exp loss; Tokens = tokens; Metrics = [] }
        finally
            if wasTraining then model.Module.train ()

    /// Evaluates the causal language-modelling loss (evaluateWith Objective.causalLm).
    let evaluate (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) (padId: int64) : EvalResult =
        evaluateWith Objective.causalLm model dataset batchSize maxSeqLen padId

    /// Runs f on every micro-batch of dataset (objective's collation, batchSize rows, cut to maxSeqLen)
    /// without gradients and in eval mode, restoring the model's mode; each micro-batch in its own
    /// dispose scope.
    let private eachBatch (objective: Objective) (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) (f: MicroBatch -> unit) =
        Functional.Runtime.TorchRuntime.ensure ()
        let wasTraining = model.Module.training
        model.Module.eval ()
        try
            use _ = torch.no_grad ()
            for indices in Batching.microBatches batchSize (Sampler.sequential dataset.Rows.Length) do
                use _ = torch.NewDisposeScope()
                use batch = objective.Collate maxSeqLen 0L dataset indices
                f batch
        finally
            if wasTraining then model.Module.train ()

    /// Evaluates a sequence classifier under objective (Objective.sequenceClassification) on every row:
    /// the example-weighted mean loss and, for a single-label head, Metrics accuracy and macro_f1
    /// (ClassificationMetrics, predictions the argmax of the logits). Perplexity is exp(loss).
    let evaluateClassification (objective: Objective) (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) : EvalResult =
        let head = (SequenceClassification.tryHead model) |> Option.defaultWith (fun () -> invalidArg (nameof model) "not a sequence classifier")
        let mutable lossSum, count = 0.0, 0L
        let truth, predicted = ResizeArray<int>(), ResizeArray<int>()
        eachBatch objective model dataset batchSize maxSeqLen (fun batch ->
            use logits = model.Module.forward batch.InputIds
            use sum = Objective.classificationLossSum head logits batch.Labels
            lossSum <- lossSum + float (sum.item<float32> ())
            count <- count + objective.Count batch
            if head.ProblemType = ProblemType.SingleLabel then
                use best = logits.argmax(-1L)
                truth.AddRange(batch.Labels.data<int64>() |> Seq.map int)
                predicted.AddRange(best.data<int64>() |> Seq.map int))
        let loss = if count = 0L then nan else lossSum / float count
        let metrics =
            if head.ProblemType = ProblemType.SingleLabel then
                let t, p = truth.ToArray(), predicted.ToArray()
                [ "accuracy", ClassificationMetrics.accuracy t p; "macro_f1", ClassificationMetrics.macroF1 t p ]
            else []
        { Loss = loss; Perplexity = exp loss; Tokens = count; Metrics = metrics }

    /// Evaluates a reward model (Objective.reward) on every pair: the pair-weighted mean loss, Metrics
    /// accuracy (the fraction of pairs whose chosen text scores higher than the rejected one) and
    /// mean_margin (the mean of r_chosen - r_rejected). Perplexity is exp(loss).
    let evaluateReward (objective: Objective) (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) : EvalResult =
        let mutable lossSum, count, wins, margin = 0.0, 0L, 0, 0.0
        eachBatch objective model dataset batchSize maxSeqLen (fun batch ->
            let chosen, rejected = Objective.rewards model batch
            use chosen = chosen
            use rejected = rejected
            use difference = chosen - rejected
            use loss = torch.nn.functional.logsigmoid(difference).sum().neg()
            lossSum <- lossSum + float (loss.item<float32> ())
            count <- count + objective.Count batch
            for d in difference.data<float32>() do
                if d > 0.0f then wins <- wins + 1
                margin <- margin + float d)
        let loss = if count = 0L then nan else lossSum / float count
        { Loss = loss
          Perplexity = exp loss
          Tokens = count
          Metrics = [ "accuracy", (if count = 0L then nan else float wins / float count); "mean_margin", (if count = 0L then nan else margin / float count) ] }
