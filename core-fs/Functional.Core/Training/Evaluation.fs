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
      /// What the loss was averaged over: the predicted tokens for causal language modelling.
      Tokens: int64 }

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
                        let batch = Batching.collate maxSeqLen padId dataset indices
                        use sum = objective.LossSum model batch
                        lossSum + float (sum.item<float32> ()), tokens + objective.Count batch)
                    (0.0, 0L)
            let loss = if tokens = 0L then nan else lossSum / float tokens
            { Loss = loss; Perplexity = exp loss; Tokens = tokens }
        finally
            if wasTraining then model.Module.train ()

    /// Evaluates the causal language-modelling loss (evaluateWith Objective.causalLm).
    let evaluate (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) (padId: int64) : EvalResult =
        evaluateWith Objective.causalLm model dataset batchSize maxSeqLen padId
