namespace Functional.Training

open TorchSharp
open Functional
open Functional.Data
open Functional.Models

/// What training minimizes and evaluation measures, per micro-batch, as a sum and a count, so that
/// losses are weighted exactly across micro-batches, accumulation windows and processes: the mean loss
/// is (sum of LossSum) / (sum of Count) over whatever is averaged.
[<NoEquality; NoComparison>]
type Objective =
    { /// The summed loss of a micro-batch under the model (forward included): a 0-dim fp32 tensor that
      /// carries the graph to the model's parameters (outside no_grad), 0 when nothing is predicted.
      LossSum: CausalLm -> MicroBatch -> torch.Tensor
      /// What LossSum sums over in the micro-batch (predicted tokens, examples), counted without running
      /// the model: the trainer counts a whole window before its first forward.
      Count: MicroBatch -> int64 }

/// The objectives the trainer and evaluation run.
[<RequireQualifiedAccess>]
module Objective =

    /// Causal language modelling: the next-token cross-entropy summed over the predicted tokens
    /// (Loss.causalLmSum of the model's logits), counted as MicroBatch.PredictedTokens.
    let causalLm: Objective =
        { LossSum =
            fun model batch ->
                use logits = model.Module.forward batch.InputIds // (B, T, V)
                Loss.causalLmSum logits batch.Labels
          Count = fun batch -> batch.PredictedTokens }
