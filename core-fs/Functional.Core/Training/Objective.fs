namespace Functional.Training

open System
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
      Count: MicroBatch -> int64
      /// Makes the micro-batch of the dataset's rows at indices, rows cut to maxSeqLen (arguments:
      /// maxSeqLen, the trainer's padding id, dataset, indices). Causal language modelling is
      /// Batching.collate; a task with targets of its own pads with its model's pad id and puts its
      /// targets in MicroBatch.Labels.
      Collate: int -> int64 -> TokenizedDataset -> int[] -> MicroBatch }

/// The objectives the trainer and evaluation run.
[<RequireQualifiedAccess>]
module Objective =

    /// The causal LM's logits of a micro-batch (B, T, V): the plain forward, or for rows packed in
    /// isolation (MicroBatch.Packed) the packed forward (CausalLm.forwardPacked).
    let causalLmLogits (model: CausalLm) (batch: MicroBatch) : torch.Tensor =
        match batch.Packed with
        | Some packed -> CausalLm.forwardPacked model batch.InputIds packed.PositionIds packed.SegmentIds
        | None -> model.Module.forward batch.InputIds

    /// Causal language modelling: the next-token cross-entropy summed over the predicted tokens
    /// (Loss.causalLmSum of the model's logits, causalLmLogits), counted as MicroBatch.PredictedTokens.
    /// A micro-batch packed in isolation gives the sum and count of its samples as separate rows.
    let causalLm: Objective =
        { LossSum =
            fun model batch ->
                use logits = causalLmLogits model batch // (B, T, V)
                Loss.causalLmSum logits batch.Labels
          Count = fun batch -> batch.PredictedTokens
          Collate = Batching.collate }

    /// Causal language modelling with the chunked loss (ChunkedLoss.causalLmSum): the model's final hidden
    /// states (CausalLmHead.HiddenStates) and its head weight give the loss chunkSize predicted positions at
    /// a time, so the B x T x V logits never exist, in the forward or the backward; the loss and gradients
    /// equal causalLm's to float rounding, the count is the same. The model must be a CausalLmHead (every
    /// family's causal LM, also its mixed-precision compute copy and with LoRA hooks on other projections):
    /// another module (a prefix-tuned model) raises InvalidInputException naming {loss_chunk_size}. Raises
    /// ArgumentException for chunkSize < 1.
    let causalLmChunked (chunkSize: int) : Objective =
        if chunkSize < 1 then
            raise (ArgumentOutOfRangeException(nameof chunkSize, chunkSize, "the chunk size must be at least 1 position"))
        { causalLm with
            LossSum =
                fun model batch ->
                    match box model.Module with
                    | :? CausalLmHead as head ->
                        use hidden =
                            match batch.Packed with
                            | Some packed -> head.HiddenStatesPacked(batch.InputIds, packed.PositionIds, packed.SegmentIds) // (B, T, C)
                            | None -> head.HiddenStates batch.InputIds // (B, T, C)
                        ChunkedLoss.causalLmSum chunkSize hidden head.HeadWeight batch.Labels
                    | _ ->
                        InvalidInput.setting "loss_chunk_size"
                            (sprintf "needs a causal LM whose head multiplies the final hidden states (%s is not one): set it to 0" (model.Module.GetName())) }

    /// The causal language-modelling objective of a run's LossChunkSize (TrainOptions): causalLm for 0
    /// (the full logits), causalLmChunked lossChunkSize otherwise.
    let causalLmWith (lossChunkSize: int) : Objective =
        if lossChunkSize = 0 then causalLm else causalLmChunked lossChunkSize

    /// Right-pads rows (each cut to maxSeqLen) with padId into (rows, longest) ids.
    let private padRows (maxSeqLen: int) (padId: int64) (rows: int64[][]) =
        let lengths = rows |> Array.map (fun r -> min r.Length maxSeqLen)
        let width = max 1 (Array.max lengths)
        let ids = Array.create (rows.Length * width) padId
        rows |> Array.iteri (fun r row -> Array.blit row 0 ids (r * width) lengths[r])
        torch.tensor(ids, ReadOnlySpan<int64>([| int64 rows.Length; int64 width |])), lengths |> Array.sumBy int64

    let private headOf (model: CausalLm) =
        match SequenceClassification.tryHead model with
        | Some head -> head
        | None -> invalidArg (nameof model) "the objective needs a sequence classifier (SequenceClassification.create)"

    /// The summed classification loss of logits (B, num_labels) against labels: cross-entropy over
    /// int64 class ids (B) for a single-label head, squared error against float targets (B) for a
    /// regression head (HF's losses with reduction sum). fp32.
    let classificationLossSum (head: ClassificationHead) (logits: torch.Tensor) (labels: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let logits = logits.to_type torch.float32
        let loss =
            match head.ProblemType with
            | ProblemType.SingleLabel -> torch.nn.functional.cross_entropy(logits, labels, reduction = torch.nn.Reduction.Sum)
            | ProblemType.Regression ->
                torch.nn.functional.mse_loss(logits.squeeze(-1L), labels.to_type torch.float32, reduction = torch.nn.Reduction.Sum)
        scope.MoveToOuter loss

    /// Sequence classification (HF's *ForSequenceClassification loss): the per-example loss
    /// (classificationLossSum) summed over the micro-batch, counted in examples. targetsOf gives the
    /// target of every row of a dataset (class ids as floats, or regression targets); rows are
    /// right-padded with the head's pad_token_id (0 when it has none, which the model allows only for
    /// one row per micro-batch).
    let sequenceClassification (head: ClassificationHead) (targetsOf: TokenizedDataset -> float[]) : Objective =
        { LossSum =
            fun model batch ->
                use logits = model.Module.forward batch.InputIds // (B, L)
                classificationLossSum (headOf model) logits batch.Labels
          Count = fun batch -> batch.PredictedTokens
          Collate =
            fun maxSeqLen _ dataset indices ->
                let targets = targetsOf dataset
                let ids, tokens = padRows maxSeqLen (defaultArg head.PadTokenId 0L) (indices |> Array.map (fun i -> dataset.Rows[i]))
                let values = indices |> Array.map (fun i -> targets[i])
                let labels =
                    match head.ProblemType with
                    | ProblemType.SingleLabel -> torch.tensor(values |> Array.map int64)
                    | ProblemType.Regression -> torch.tensor(values |> Array.map float32)
                { InputIds = ids; Labels = labels; PredictedTokens = int64 indices.Length; Tokens = tokens; Packed = None } }

    /// The pair rows of a reward dataset: row i holds chosen ++ rejected, PromptLengths[i] the chosen
    /// length (RewardData). Returns the chosen and the rejected token ids.
    let splitPair (dataset: TokenizedDataset) (i: int) : int64[] * int64[] =
        let row, split = dataset.Rows[i], dataset.PromptLengths[i]
        row[.. split - 1], row[split ..]

    /// The rewards of a reward micro-batch: the model's scores (2B, 1) of the chosen rows (the first B)
    /// and of the rejected rows (the last B), each (B).
    let rewards (model: CausalLm) (batch: MicroBatch) : torch.Tensor * torch.Tensor =
        use scores = model.Module.forward batch.InputIds // (2B, 1)
        let B = scores.shape[0] / 2L
        use flat = scores.to_type(torch.float32).squeeze(-1L)
        flat.narrow(0L, 0L, B), flat.narrow(0L, B, B)

    /// Reward modelling (TRL's RewardTrainer, InstructGPT's pairwise loss): -log sigmoid(r_chosen -
    /// r_rejected) summed over the pairs of the micro-batch, counted in pairs; r is the score (one label)
    /// at each text's pooled position. Rows are RewardData pairs; a micro-batch holds the B chosen texts,
    /// then the B rejected ones, right-padded with the head's pad_token_id.
    let reward (head: ClassificationHead) : Objective =
        { LossSum =
            fun model batch ->
                use scope = torch.NewDisposeScope()
                let chosen, rejected = rewards model batch
                let loss = torch.nn.functional.logsigmoid(chosen - rejected).sum().neg()
                scope.MoveToOuter loss
          Count = fun batch -> batch.PredictedTokens
          Collate =
            fun maxSeqLen _ dataset indices ->
                let pairs = indices |> Array.map (splitPair dataset)
                let rows = Array.append (Array.map fst pairs) (Array.map snd pairs)
                let ids, tokens = padRows maxSeqLen (defaultArg head.PadTokenId 0L) rows
                { InputIds = ids; Labels = torch.zeros([| int64 indices.Length |], dtype = torch.int64); PredictedTokens = int64 indices.Length; Tokens = tokens; Packed = None } }
