namespace Functional.Data

open System
open System.IO
open System.Text
open System.Text.Json
open Functional

/// One sample inside a row packed with isolated attention (PackingAttention.Isolated): its tokens are
/// Length consecutive tokens of the row, positions restart at 0 at its first token and it attends only
/// to itself.
[<Struct>]
type PackedSegment =
    { /// The sample's tokens in the row (after truncation to max-seq-len).
      Length: int
      /// The sample's leading tokens the loss ignores (its prompt under completion-only training; 0
      /// otherwise).
      PromptLength: int }

/// Rows of token ids, as PromptDataset makes them from a data file. Line numbers are kept so later
/// checks (e.g. ids outside the vocabulary) can name the line.
[<NoComparison>]
type TokenizedDataset =
    { /// The file the rows were read from.
      Path: string
      /// Token ids of each row, in file order.
      Rows: int64[][]
      /// The 1-based line number (or JSON array index + 1) of each row in Path.
      Lines: int[]
      /// Leading tokens of each row that the loss ignores (the prompt when training on the
      /// completion only; 0 when every token is trained on). For a row packed in isolation: the first
      /// segment's prompt length (Segments says the rest).
      PromptLengths: int[]
      /// Under isolated packing, per row the samples packed into it, in order, their lengths summing to
      /// the row's length: positions restart and attention stays within each (see Batching.collate).
      /// Empty (no entry at all) when no row is packed in isolation: unpacked rows, or rows packed with
      /// cross attention (one sequence each).
      Segments: PackedSegment[][]
      /// Per row, per token, whether the loss predicts it (assistant-only training: the tokens of the
      /// assistant turns); PromptLengths is then 0. Empty (no entry at all) when PromptLengths decide.
      TrainMasks: bool[][] }

/// Checks and rearrangements of tokenized data.
[<RequireQualifiedAccess>]
module TokenizedDataset =

    /// Unpacked rows of one sample each, every token trained on: lines 1, 2, ... (synthetic and in-memory
    /// data: benchmarks, notebooks).
    let ofRows (path: string) (rows: int64[][]) : TokenizedDataset =
        { Path = path
          Rows = rows
          Lines = Array.init rows.Length (fun i -> i + 1)
          PromptLengths = Array.zeroCreate rows.Length
          Segments = [||]
          TrainMasks = [||] }

    /// Whether the rows are packed in isolation (Segments holds one entry per row).
    let isPackedInIsolation (dataset: TokenizedDataset) : bool = dataset.Segments.Length > 0

    /// Packs the rows of an unpacked dataset (each one sample, cut to maxSeqLen) into rows of at most
    /// maxSeqLen tokens without splitting a sample, by best-fit decreasing (TRL's "bfd" packing): the
    /// samples, longest first (ties in row order), each go into the open row with the least room that
    /// still fits them, or start a new row. Each packed row keeps its samples' lengths and prompt
    /// lengths in Segments (and their train masks, concatenated, when they have them), so collation
    /// restarts positions, masks attention to each sample and masks the labels each unpacked row would
    /// have masked. A row's line is its first sample's line; empty
    /// rows are left out. Raises ArgumentException for a dataset already packed or maxSeqLen < 1.
    let packIsolated (maxSeqLen: int) (dataset: TokenizedDataset) : TokenizedDataset =
        if maxSeqLen < 1 then invalidArg (nameof maxSeqLen) (sprintf "max-seq-len must be at least 1, got %d" maxSeqLen)
        if isPackedInIsolation dataset then invalidArg (nameof dataset) "the rows are already packed"
        let lengthOf i = min dataset.Rows[i].Length maxSeqLen
        let order =
            Array.init dataset.Rows.Length id
            |> Array.filter (fun i -> lengthOf i > 0)
            |> Array.sortWith (fun a b -> match compare (lengthOf b) (lengthOf a) with 0 -> compare a b | c -> c)
        let members = ResizeArray<ResizeArray<int>>()
        // Open rows by (room left, row index): the least room that fits is the first entry >= (length, 0).
        let openRows = Collections.Generic.SortedSet<struct (int * int)>()
        for i in order do
            let length = lengthOf i
            let fits = openRows.GetViewBetween(struct (length, 0), struct (maxSeqLen, Int32.MaxValue))
            let struct (room, row) = fits.Min
            let row =
                if room >= length then
                    openRows.Remove(struct (room, row)) |> ignore
                    row
                else
                    members.Add(ResizeArray())
                    members.Count - 1
            members[row].Add i
            let left = (if room >= length then room else maxSeqLen) - length
            if left > 0 then openRows.Add(struct (left, row)) |> ignore
        let rows = members.ToArray() |> Array.map (fun m -> m.ToArray())
        { Path = dataset.Path
          Rows = rows |> Array.map (Array.collect (fun i -> dataset.Rows[i][.. lengthOf i - 1]))
          Lines = rows |> Array.map (fun m -> dataset.Lines[m[0]])
          PromptLengths = rows |> Array.map (fun m -> min dataset.PromptLengths[m[0]] (lengthOf m[0]))
          Segments =
            rows
            |> Array.map (Array.map (fun i -> { Length = lengthOf i; PromptLength = min dataset.PromptLengths[i] (lengthOf i) }))
          TrainMasks =
            if dataset.TrainMasks.Length = 0 then [||]
            else rows |> Array.map (Array.collect (fun i -> dataset.TrainMasks[i][.. lengthOf i - 1])) }

    /// Raises InvalidInputException naming the line of the first token id >= vocabSize.
    let checkVocabulary (vocabSize: int) (dataset: TokenizedDataset) =
        dataset.Rows
        |> Array.iteri (fun r row ->
            match Array.tryFindIndex (fun id -> id >= int64 vocabSize) row with
            | Some i ->
                InvalidInput.fail dataset.Path (sprintf "%d: input_ids[%d]" dataset.Lines[r] i)
                    (sprintf "token id %d is outside the model's vocabulary (vocab_size %d)" row[i] vocabSize)
            | None -> ())
