namespace Functional.Training

open System
open TorchSharp
open Functional
open Functional.Data
open Functional.Models

/// An evaluation over a held-out dataset.
[<NoComparison>]
type EvalResult =
    { /// Token-weighted mean loss: all token losses summed over the set / predicted tokens.
      Loss: float
      /// exp(Loss).
      Perplexity: float
      /// Predicted tokens evaluated.
      Tokens: int64 }

/// Evaluation loss and perplexity, weighted by tokens exactly as training's loss is.
[<RequireQualifiedAccess>]
module Evaluation =

    /// Evaluates the model on every row of dataset in micro-batches of batchSize rows (truncated to
    /// maxSeqLen, padded with padId), without gradients and in eval mode (dropout off); the model's
    /// previous mode is restored. Each micro-batch runs in its own dispose scope.
    let evaluate (model: CausalLm) (dataset: TokenizedDataset) (batchSize: int) (maxSeqLen: int) (padId: int64) : EvalResult =
        Functional.Runtime.TorchRuntime.ensure ()
        let wasTraining = model.Module.training
        model.Module.eval ()
        try
            use _ = torch.no_grad ()
            let mutable lossSum = 0.0
            let mutable tokens = 0L
            for indices in Batching.microBatches batchSize (Sampler.sequential dataset.Rows.Length) do
                use _ = torch.NewDisposeScope()
                let batch = Batching.collate maxSeqLen padId dataset indices
                use logits = model.Module.forward batch.InputIds // (B, T, V)
                use sum = Loss.causalLmSum logits batch.Labels
                lossSum <- lossSum + float (sum.item<float32> ())
                tokens <- tokens + batch.PredictedTokens
            let loss = if tokens = 0L then nan else lossSum / float tokens
            { Loss = loss; Perplexity = exp loss; Tokens = tokens }
        finally
            if wasTraining then model.Module.train ()
