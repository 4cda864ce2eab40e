namespace Functional

open System
open TorchSharp
open Functional.Runtime

/// The causal language-modelling loss as Hugging Face computes it (ForCausalLMLoss), split into a
/// summed loss and an exact count of the predicted tokens, so that gradient accumulation can normalize
/// by the tokens of a whole accumulation window instead of averaging per-micro-batch means.
[<RequireQualifiedAccess>]
module Loss =

    /// The label that marks a position without a prediction target (padding, prompt tokens).
    [<Literal>]
    let IgnoreIndex = -100L

    let private checkShapes (logits: torch.Tensor) (labels: torch.Tensor) =
        if logits.dim () <> 3L then
            raise (ArgumentException(sprintf "logits must be (B, T, V), got shape %A." logits.shape, "logits"))
        if labels.dim () <> 2L then
            raise (ArgumentException(sprintf "labels must be (B, T), got shape %A." labels.shape, "labels"))
        if labels.dtype <> torch.ScalarType.Int64 then
            raise (ArgumentException(sprintf "labels must be int64, got %A." labels.dtype, "labels"))
        if logits.shape[0] <> labels.shape[0] || logits.shape[1] <> labels.shape[1] then
            raise (
                ArgumentException(
                    sprintf "logits %A and labels %A disagree on (B, T)." logits.shape labels.shape,
                    "labels"
                )
            )

    /// The target of every position of labels (B, T) int64, flattened to (B*T): labels shifted one
    /// position left with -100 after the last (HF's ForCausalLMLoss shift), so position t of row b is
    /// predicted against labels[b, t + 1] and the last position of every row against nothing.
    let shiftedTargets (labels: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let batch, time = labels.shape[0], labels.shape[1]
        let shifted = max 0L (time - 1L)
        let ignored = torch.full(batch, time - shifted, IgnoreIndex, dtype = torch.int64, device = labels.device)
        scope.MoveToOuter(torch.cat([| labels.narrow(1L, 1L, shifted); ignored |], 1L).reshape(batch * time))

    /// The summed next-token cross-entropy of a batch: logits (B, T, V) at position t predict
    /// labels (B, T) at t + 1 (logits[:, :-1] against labels[:, 1:], computed as HF does by shifting the
    /// labels instead of copying the logits); positions whose label is -100 are skipped. Computed in fp32 whatever the logits' dtype (they are upcast, as HF's loss does) with
    /// cross_entropy(reduction sum, ignore_index -100). Returns a fresh 0-dim fp32 tensor that carries the
    /// graph to the logits; it is 0 when no position has a target. Divide it by the predicted tokens of
    /// the whole accumulation window (Accumulation.lossScale) for HF's token-mean loss.
    let causalLmSum (logits: torch.Tensor) (labels: torch.Tensor) : torch.Tensor =
        TorchRuntime.ensure ()
        checkShapes logits labels
        use scope = torch.NewDisposeScope()
        let batch, time, vocab = logits.shape[0], logits.shape[1], logits.shape[2]
        // As HF's ForCausalLMLoss: the labels move one position left, with -100 after the last, so
        // the logits stay whole (a view, not a copy of B*T*V values) and their last position is ignored.
        let rows = logits.reshape(batch * time, vocab) // (B*T, V)
        let predictions = if rows.dtype = torch.ScalarType.Float32 then rows else rows.to_type torch.ScalarType.Float32
        let targets = (shiftedTargets labels).``to``(predictions.device) // (B*T)
        let sum =
            torch.nn.functional.cross_entropy(
                predictions,
                targets,
                ignore_index = IgnoreIndex,
                reduction = torch.nn.Reduction.Sum
            )
        sum.MoveToOuterDisposeScope()

    /// The number of positions causalLmSum predicts: labels[:, 1:] != -100, counted exactly after the
    /// shift. (HF's Trainer has counted num_items_in_batch as labels != -100 before the shift, one too many
    /// for every row whose first label is a target, which its collators make the usual case.) A row with
    /// one real token contributes 0.
    let predictedTokens (labels: torch.Tensor) : int64 =
        TorchRuntime.ensure ()
        if labels.dim () <> 2L then
            raise (ArgumentException(sprintf "labels must be (B, T), got shape %A." labels.shape, "labels"))
        use scope = torch.NewDisposeScope()
        let time = labels.shape[1]
        if time < 2L then 0L
        else labels.narrow(1L, 1L, time - 1L).ne(torch.tensor IgnoreIndex).sum().item<int64> ()
