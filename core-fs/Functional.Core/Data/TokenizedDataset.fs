namespace Functional.Data

open System
open System.IO
open System.Text
open System.Text.Json
open Functional

/// Rows of token ids read from a pre-tokenized JSON Lines file, one `{"input_ids": [...]}` per line.
/// Line numbers are kept so later checks (e.g. ids outside the vocabulary) can name the line.
[<NoComparison>]
type TokenizedDataset =
    { /// The file the rows were read from.
      Path: string
      /// Token ids of each row, in file order.
      Rows: int64[][]
      /// The 1-based line number (or JSON array index + 1) of each row in Path.
      Lines: int[]
      /// Leading tokens of each row that the loss ignores (the prompt when training on the
      /// completion only; 0 when every token is trained on).
      PromptLengths: int[] }

/// Reading pre-tokenized JSON Lines.
[<RequireQualifiedAccess>]
module TokenizedDataset =

    let private strictUtf8 = UTF8Encoding(false, true)

    let private parseRow (path: string) (lineNumber: int) (line: string) =
        let location = string lineNumber
        let document =
            try JsonDocument.Parse line
            with :? JsonException as e ->
                InvalidInput.fail path location (sprintf "not valid JSON (%s)" (e.Message.Split('.').[0]))
        use document = document
        let root = document.RootElement
        if root.ValueKind <> JsonValueKind.Object then
            InvalidInput.fail path location (sprintf "expected a JSON object with an \"input_ids\" array, found a JSON %s" (string root.ValueKind |> fun s -> s.ToLowerInvariant()))
        match root.TryGetProperty "input_ids" with
        | false, _ -> InvalidInput.fail path location "the object has no \"input_ids\" field (expected an array of token ids)"
        | true, ids when ids.ValueKind <> JsonValueKind.Array ->
            InvalidInput.fail path location (sprintf "\"input_ids\" must be an array of token ids, found a JSON %s" (string ids.ValueKind |> fun s -> s.ToLowerInvariant()))
        | true, ids ->
            [| for i, id in Seq.indexed (ids.EnumerateArray()) do
                   match id.ValueKind, id.TryGetInt64() with
                   | JsonValueKind.Number, (true, v) when v >= 0L -> v
                   | _ ->
                       InvalidInput.fail path (sprintf "%s: input_ids[%d]" location i)
                           (sprintf "expected a non-negative integer token id, found %s" (id.GetRawText())) |]

    /// Reads every non-blank line of a JSON Lines file. Raises InvalidInputException naming the file and
    /// line for a line that is not JSON, lacks "input_ids", holds something other than non-negative
    /// integers, is not valid UTF-8, or when the file holds no rows at all.
    let load (path: string) : TokenizedDataset =
        if not (File.Exists path) then InvalidInput.fail path "" "the data file does not exist"
        let bytes = File.ReadAllBytes path
        let text =
            try strictUtf8.GetString bytes
            with :? DecoderFallbackException as e ->
                let offset = e.Index
                let line = if offset >= 0 then 1 + (bytes |> Seq.take (min offset bytes.Length) |> Seq.filter ((=) 10uy) |> Seq.length) else 0
                InvalidInput.fail path (string line) "the file is not valid UTF-8"
        let rows, lines =
            text.Split('\n')
            |> Array.mapi (fun i line -> i + 1, line.TrimEnd('\r'))
            |> Array.filter (fun (_, line) -> not (String.IsNullOrWhiteSpace line))
            |> Array.map (fun (n, line) -> parseRow path n line, n)
            |> Array.unzip
        if rows.Length = 0 then InvalidInput.fail path "" "the dataset is empty (expected JSON Lines, one {\"input_ids\": [...]} per line)"
        { Path = path; Rows = rows; Lines = lines; PromptLengths = Array.zeroCreate rows.Length }

    /// Raises InvalidInputException naming the line of the first token id >= vocabSize.
    let checkVocabulary (vocabSize: int) (dataset: TokenizedDataset) =
        dataset.Rows
        |> Array.iteri (fun r row ->
            match Array.tryFindIndex (fun id -> id >= int64 vocabSize) row with
            | Some i ->
                InvalidInput.fail dataset.Path (sprintf "%d: input_ids[%d]" dataset.Lines[r] i)
                    (sprintf "token id %d is outside the model's vocabulary (vocab_size %d)" row[i] vocabSize)
            | None -> ())
