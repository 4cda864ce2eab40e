namespace Functional.Data

open System
open TorchSharp
open Functional

/// The order in which an epoch visits the rows of a dataset.
[<RequireQualifiedAccess>]
module Sampler =

    /// SplitMix64: a small, fully specified generator, so a shuffle depends only on (seed, epoch)
    /// and never on the .NET version.
    let private splitMix64 (state: uint64 byref) =
        state <- state + 0x9E3779B97F4A7C15UL
        let mutable z = state
        z <- (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
        z <- (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
        z ^^^ (z >>> 31)

    /// Rows in file order.
    let sequential (rowCount: int) : int[] = Array.init rowCount id

    /// A permutation of the rows drawn from (seed, epoch) alone: the same for the same seed and epoch,
    /// different across epochs (Fisher-Yates over SplitMix64).
    let shuffled (seed: int64) (epoch: int) (rowCount: int) : int[] =
        let order = Array.init rowCount id
        let mutable state = uint64 seed * 0x100000001B3UL + uint64 epoch * 0x9E3779B97F4A7C15UL
        for i in rowCount - 1 .. -1 .. 1 do
            let j = int (splitMix64 &state % uint64 (i + 1))
            let t = order[i]
            order[i] <- order[j]
            order[j] <- t
        order

    /// The rows one process of a data-parallel run visits in an epoch, as torch's DistributedSampler
    /// (drop_last=False): the epoch's order (shuffled seed epoch rowCount, or file order when shuffle
    /// is false) is padded to ceil(rowCount / worldSize) * worldSize entries by repeating it from its
    /// start, and rank takes entries rank, rank + worldSize, ... Every rank gets the same number of
    /// rows, ceil(rowCount / worldSize); together they cover every row, exactly once when rowCount is a
    /// multiple of worldSize.
    ///
    /// The position in the data is (epoch, micro-batch within the epoch), the plain numbers
    /// AccumulationState.Epoch and AccumulationState.MicroBatchInEpoch. A resumed run jumps there by
    /// recomputing the epoch's order from (seed, epoch) with this function and skipping the first
    /// MicroBatchInEpoch micro-batches of it: no row is read or tokenized to get there.
    let distributed (rank: int) (worldSize: int) (shuffle: bool) (seed: int64) (epoch: int) (rowCount: int) : int[] =
        if worldSize < 1 then invalidArg (nameof worldSize) (sprintf "the world size must be at least 1, got %d" worldSize)
        if rank < 0 || rank >= worldSize then
            invalidArg (nameof rank) (sprintf "the rank must be in [0, %d) for world size %d, got %d" worldSize worldSize rank)
        if rowCount < 0 then invalidArg (nameof rowCount) (sprintf "the row count must not be negative, got %d" rowCount)
        let order = if shuffle then shuffled seed epoch rowCount else sequential rowCount
        let perRank = (rowCount + worldSize - 1) / worldSize
        Array.init perRank (fun i -> order[(rank + i * worldSize) % rowCount])

/// What a micro-batch of rows packed in isolation adds to its ids: where each token's sample starts
/// over (positions) and which sample it belongs to (segments), so the model attends within samples.
[<NoEquality; NoComparison>]
type PackedInputs =
    { /// Position ids (B, T) int64: 0 at each sample's first token, counting up within the sample;
      /// padding counts from 0 again.
      PositionIds: torch.Tensor
      /// Segment ids (B, T) int64: k for the tokens of the row's k-th sample (from 0), -1 for padding. A
      /// token attends to the tokens at or before it with the same id (padding to padding only).
      SegmentIds: torch.Tensor }

/// One micro-batch: right-padded token ids and their labels.
[<NoEquality; NoComparison>]
type MicroBatch =
    { /// Token ids (B, T) int64, rows right-padded with the pad id.
      InputIds: torch.Tensor
      /// Labels (B, T) int64: the token ids, with -100 at padding positions (ignored by the loss). An
      /// objective with a collation of its own puts its targets here (sequence classification: (B)
      /// class ids or regression targets).
      Labels: torch.Tensor
      /// Positions the causal loss predicts: labels after the shift that are not -100.
      PredictedTokens: int64
      /// Real (non-padding) tokens in the micro-batch.
      Tokens: int64
      /// Rows packed in isolation: their positions and segments (the model's packed forward); None for
      /// rows that are one sequence each (the plain causal forward).
      Packed: PackedInputs option }
    interface IDisposable with
        member this.Dispose() =
            this.InputIds.Dispose()
            this.Labels.Dispose()
            this.Packed
            |> Option.iter (fun p ->
                p.PositionIds.Dispose()
                p.SegmentIds.Dispose())

/// Turning rows of token ids into padded micro-batches.
[<RequireQualifiedAccess>]
module Batching =

    /// Splits an epoch's row order into consecutive micro-batches of batchSize rows (the last may be smaller).
    let microBatches (batchSize: int) (order: int[]) : int[][] =
        if batchSize < 1 then invalidArg (nameof batchSize) "the batch size must be at least 1"
        Array.chunkBySize batchSize order

    /// Predicted tokens of a row after truncation to maxSeqLen: positions after the first whose token
    /// is not part of the prompt (the first promptLength tokens get label -100).
    let predictedTokens (maxSeqLen: int) (promptLength: int) (row: int64[]) : int64 =
        let length = min row.Length maxSeqLen
        int64 (max 0 (length - max 1 promptLength))

    /// Predicted tokens of a row with a train mask (TokenizedDataset.TrainMasks) after truncation to
    /// maxSeqLen: positions after the first whose token the mask keeps.
    let predictedTokensMasked (maxSeqLen: int) (mask: bool[]) : int64 =
        let length = min mask.Length maxSeqLen
        let mutable count = 0L
        for t in 1 .. length - 1 do
            if mask[t] then count <- count + 1L
        count

    /// Collates the dataset rows at indices: truncates each to its first maxSeqLen tokens, right-pads
    /// all to the longest with padId, and labels padding and prompt positions (or, for rows with a train
    /// mask, the positions it leaves out) with -100. Rows packed in isolation (TokenizedDataset.Segments)
    /// also label each sample's first token -100 (it must not be predicted from the previous sample's
    /// last, as HF's DataCollatorWithFlattening does) and each sample's prompt (or what its train mask
    /// leaves out), and carry PackedInputs: positions restarting at every sample and segment ids. So a
    /// packed row's summed loss and PredictedTokens equal those of its samples as separate rows.
    let collate (maxSeqLen: int) (padId: int64) (dataset: TokenizedDataset) (indices: int[]) : MicroBatch =
        let rows = indices |> Array.map (fun i -> dataset.Rows[i])
        let prompts = indices |> Array.map (fun i -> dataset.PromptLengths[i])
        let masks = if dataset.TrainMasks.Length = 0 then None else Some(indices |> Array.map (fun i -> dataset.TrainMasks[i]))
        let lengths = rows |> Array.map (fun r -> min r.Length maxSeqLen)
        let width = max 1 (Array.max lengths)
        let ids = Array.create (rows.Length * width) padId
        let labels = Array.create (rows.Length * width) Loss.IgnoreIndex
        let shape = ReadOnlySpan<int64>([| int64 rows.Length; int64 width |])
        rows |> Array.iteri (fun r row -> Array.blit row 0 ids (r * width) lengths[r])
        if TokenizedDataset.isPackedInIsolation dataset then
            let segments = indices |> Array.map (fun i -> dataset.Segments[i])
            let positions = Array.zeroCreate (rows.Length * width)
            let segmentIds = Array.create (rows.Length * width) -1L
            let mutable predicted = 0L
            for r in 0 .. rows.Length - 1 do
                let mutable start = 0
                for k in 0 .. segments[r].Length - 1 do
                    let s = segments[r][k]
                    let length = min s.Length (lengths[r] - start)
                    match masks with
                    | Some masks ->
                        for t in 1 .. length - 1 do
                            if masks[r][start + t] then
                                labels[r * width + start + t] <- rows[r][start + t]
                                predicted <- predicted + 1L
                    | None ->
                        let first = min (max 1 s.PromptLength) length
                        Array.blit rows[r] (start + first) labels (r * width + start + first) (length - first)
                        predicted <- predicted + int64 (length - first)
                    for t in 0 .. length - 1 do
                        positions[r * width + start + t] <- int64 t
                        segmentIds[r * width + start + t] <- int64 k
                    start <- start + length
                for t in start .. width - 1 do
                    positions[r * width + t] <- int64 (t - start)
            { InputIds = torch.tensor(ids, shape)
              Labels = torch.tensor(labels, shape)
              PredictedTokens = predicted
              Tokens = lengths |> Array.sumBy int64
              Packed = Some { PositionIds = torch.tensor(positions, shape); SegmentIds = torch.tensor(segmentIds, shape) } }
        else
            rows
            |> Array.iteri (fun r row ->
                match masks with
                | Some masks ->
                    for t in 0 .. lengths[r] - 1 do
                        if masks[r][t] then labels[r * width + t] <- row[t]
                | None ->
                    let first = min prompts[r] lengths[r]
                    Array.blit row first labels (r * width + first) (lengths[r] - first))
            { InputIds = torch.tensor(ids, shape)
              Labels = torch.tensor(labels, shape)
              PredictedTokens =
                match masks with
                | Some masks -> masks |> Array.sumBy (predictedTokensMasked maxSeqLen)
                | None -> Array.map2 (predictedTokens maxSeqLen) prompts rows |> Array.sum
              Tokens = lengths |> Array.sumBy int64
              Packed = None }
