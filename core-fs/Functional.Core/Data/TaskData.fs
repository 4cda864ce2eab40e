namespace Functional.Data

open System
open System.IO
open System.Text
open System.Text.Json
open Functional
open Functional.Text

/// A label as a data file holds it, before it is mapped to an id.
[<RequireQualifiedAccess>]
type RawLabel =
    /// A JSON string or a CSV value: a label name (or, in CSV, an id or a number written as text).
    | Text of string
    /// A JSON number: a label id, or a regression target.
    | Number of float

/// One row of a classification file: its text and label.
type LabeledRecord =
    { /// The 1-based line (JSON Lines, CSV) or element index + 1 (JSON array).
      Line: int
      /// The text to classify ("" for a pre-tokenized row).
      Text: string
      /// The row's token ids when the file gives them ("input_ids" instead of the text field).
      Ids: int64[] option
      /// The label as written.
      Label: RawLabel }

/// One row of a preference file (Dahoas/rm-static, DeepSpeed-Chat step 2): a prompt and two answers.
type PairRecord =
    { /// The 1-based line or element index + 1.
      Line: int
      /// The prompt both answers follow.
      Prompt: string
      /// The preferred answer.
      Chosen: string
      /// The other answer.
      Rejected: string
      /// The ids of prompt + chosen and prompt + rejected when the file gives them pre-tokenized (TRL's
      /// "input_ids_chosen" and "input_ids_rejected" instead of the text fields).
      Ids: (int64[] * int64[]) option }

/// Reading rows of named fields (JSON Lines, a JSON array of objects, or CSV with a header) for the
/// classification and reward tasks, and tokenizing their texts.
[<RequireQualifiedAccess>]
module TaskData =

    /// Splits CSV text (RFC 4180: comma-separated, double quotes around fields holding commas, quotes or
    /// line breaks, "" for a quote) into records, each with the 1-based line it starts on.
    let parseCsv (path: string) (text: string) : (int * string[])[] =
        let records = ResizeArray<int * string[]>()
        let fields = ResizeArray<string>()
        let field = StringBuilder()
        let mutable line, start, i, quoted, any = 1, 1, 0, false, false
        let endRecord () =
            fields.Add(field.ToString())
            field.Clear() |> ignore
            if any || fields.Count > 1 || fields[0] <> "" then records.Add((start, fields.ToArray()))
            fields.Clear()
            any <- false
        while i < text.Length do
            let c = text[i]
            if quoted then
                if c = '"' then
                    if i + 1 < text.Length && text[i + 1] = '"' then
                        field.Append '"' |> ignore
                        i <- i + 1
                    else quoted <- false
                else
                    if c = '\n' then line <- line + 1
                    field.Append c |> ignore
            else
                match c with
                | '"' -> quoted <- true; any <- true
                | ',' -> fields.Add(field.ToString()); field.Clear() |> ignore; any <- true
                | '\r' -> ()
                | '\n' ->
                    endRecord ()
                    line <- line + 1
                    start <- line
                | c -> field.Append c |> ignore; any <- true
            i <- i + 1
        if quoted then InvalidInput.fail path (string start) "a quoted CSV field is not closed"
        if field.Length > 0 || fields.Count > 0 || any then endRecord ()
        records.ToArray()

    /// The rows of a file as (line, field -> value) with values as JSON elements (CSV values as strings):
    /// a .csv file by its header row, else JSON Lines or a JSON array of objects.
    let private readObjects (path: string) : (int * (string -> JsonElement option))[] =
        InvalidInput.requireFile path "the data file does not exist" "a data file (JSON Lines, JSON or CSV)"
        let text =
            try File.ReadAllText(path, UTF8Encoding(false, true))
            with :? DecoderFallbackException -> InvalidInput.fail path "" "the file is not valid UTF-8"
        let text = text.TrimStart '\uFEFF'
        let ofObject (line: int) (element: JsonElement) =
            if element.ValueKind <> JsonValueKind.Object then InvalidInput.fail path (string line) "expected a JSON object"
            let element = element.Clone()
            line, (fun (name: string) ->
                match element.TryGetProperty name with
                | true, v when v.ValueKind <> JsonValueKind.Null -> Some v
                | _ -> None)
        if Path.GetExtension(path).Equals(".csv", StringComparison.OrdinalIgnoreCase) then
            let records = parseCsv path text
            if records.Length = 0 then InvalidInput.fail path "" "the CSV file is empty; expected a header row"
            let _, header = records[0]
            records[1..]
            |> Array.map (fun (line, values) ->
                if values.Length <> header.Length then
                    InvalidInput.fail path (string line) (sprintf "expected %d fields as in the header, found %d" header.Length values.Length)
                let row = Array.zip header values |> Map.ofArray
                line, (fun name -> row.TryFind name |> Option.map (fun v -> JsonSerializer.SerializeToElement v)))
        elif text.TrimStart().StartsWith '[' then
            match JsonInput.tryParse text with
            | Ok root -> [| for i, e in Seq.indexed (root.EnumerateArray()) -> ofObject (i + 1) e |]
            | Error e -> InvalidInput.fail path (if e.Line > 0L then string e.Line else "") (sprintf "not valid JSON (%s)" e.Reason)
        else
            text.Split('\n')
            |> Array.mapi (fun i l -> i + 1, l.TrimEnd '\r')
            |> Array.filter (fun (_, l) -> not (String.IsNullOrWhiteSpace l))
            |> Array.map (fun (line, l) ->
                match JsonInput.tryParse l with
                | Ok e -> ofObject line e
                | Error e -> InvalidInput.fail path (string line) (sprintf "not valid JSON (%s)" e.Reason))

    let private text (path: string) (line: int) (get: string -> JsonElement option) (name: string) =
        match get name with
        | Some v when v.ValueKind = JsonValueKind.String -> v.GetString()
        | Some v -> InvalidInput.fail path (sprintf "%d: %s" line name) (sprintf "expected a string, found %s" (v.ValueKind.ToString().ToLowerInvariant()))
        | None -> InvalidInput.fail path (sprintf "%d: %s" line name) "the field is missing"

    let private ids (path: string) (line: int) (get: string -> JsonElement option) (name: string) =
        match get name with
        | Some v when v.ValueKind = JsonValueKind.Array ->
            [| for e in v.EnumerateArray() do
                   match e.TryGetInt64() with
                   | true, id when e.ValueKind = JsonValueKind.Number && id >= 0L -> yield id
                   | _ -> InvalidInput.fail path (sprintf "%d: %s" line name) "expected an array of token ids (non-negative integers)" |]
        | Some _ -> InvalidInput.fail path (sprintf "%d: %s" line name) "expected an array of token ids"
        | None -> InvalidInput.fail path (sprintf "%d: %s" line name) "the field is missing"

    let private nonEmpty (path: string) (rows: 'T[]) =
        if rows.Length = 0 then InvalidInput.fail path "" "the file holds no rows"
        rows

    /// The rows of a classification file with their text (textField, a string) and label (labelField,
    /// a string or a number); a row with "input_ids" (an array of ids) and no text field is
    /// pre-tokenized. A missing field or a value of another kind raises InvalidInputException naming the
    /// file, the line and the field.
    let readLabeled (path: string) (textField: string) (labelField: string) : LabeledRecord[] =
        readObjects path
        |> Array.map (fun (line, get) ->
            let label =
                match get labelField with
                | Some v when v.ValueKind = JsonValueKind.String -> RawLabel.Text(v.GetString())
                | Some v when v.ValueKind = JsonValueKind.Number -> RawLabel.Number(v.GetDouble())
                | Some v -> InvalidInput.fail path (sprintf "%d: %s" line labelField) (sprintf "expected a label name or id, found %s" (v.ValueKind.ToString().ToLowerInvariant()))
                | None -> InvalidInput.fail path (sprintf "%d: %s" line labelField) "the field is missing"
            if (get textField).IsNone && (get "input_ids").IsSome then
                { Line = line; Text = ""; Ids = Some(ids path line get "input_ids"); Label = label }
            else
                { Line = line; Text = text path line get textField; Ids = None; Label = label })
        |> nonEmpty path

    /// The rows of a preference file (fields prompt, chosen and rejected by default, as Dahoas/rm-static;
    /// a row without the prompt field has an empty prompt, as Anthropic/hh-rlhf; a row with TRL's
    /// "input_ids_chosen" and "input_ids_rejected" and no chosen field is pre-tokenized). A missing chosen
    /// or rejected field raises InvalidInputException naming the file, the line and the field.
    let readPairs (path: string) (promptField: string) (chosenField: string) (rejectedField: string) : PairRecord[] =
        readObjects path
        |> Array.map (fun (line, get) ->
            if (get chosenField).IsNone && (get "input_ids_chosen").IsSome then
                { Line = line; Prompt = ""; Chosen = ""; Rejected = ""
                  Ids = Some(ids path line get "input_ids_chosen", ids path line get "input_ids_rejected") }
            else
                { Line = line
                  Prompt = (if (get promptField).IsNone then "" else text path line get promptField)
                  Chosen = text path line get chosenField
                  Rejected = text path line get rejectedField
                  Ids = None })
        |> nonEmpty path

    /// The ids of a text as HF's tokenizer(text) gives them: [bos by the tokenizer's rule] + ids + [eos
    /// when the tokenizer adds one], cut to maxSeqLen.
    let encode (tokenizer: TextTokenizer) (maxSeqLen: int) (text: string) : int64[] =
        let eos = if tokenizer.AddsEos then Option.toArray tokenizer.Special.Eos else [||]
        let ids = Array.concat [ TextTokenizer.leadingBos None tokenizer; tokenizer.Encode text; eos ]
        if ids.Length > maxSeqLen then ids[.. maxSeqLen - 1] else ids

    /// The classification rows of a file as a dataset (every token an input; PromptLengths 0).
    /// A text with no tokens raises InvalidInputException naming the line and field.
    let labeledDataset (path: string) (tokenizer: TextTokenizer) (maxSeqLen: int) (textField: string) (records: LabeledRecord[]) : TokenizedDataset =
        let cut (ids: int64[]) = if ids.Length > maxSeqLen then ids[.. maxSeqLen - 1] else ids
        let rows = records |> Array.map (fun r -> match r.Ids with Some ids -> cut ids | None -> encode tokenizer maxSeqLen r.Text)
        rows |> Array.iteri (fun i row -> if row.Length = 0 then InvalidInput.fail path (sprintf "%d: %s" records[i].Line textField) "the text has no tokens")
        { Path = path
          Rows = rows
          Lines = records |> Array.map (fun r -> r.Line)
          PromptLengths = Array.zeroCreate records.Length
          Segments = [||]
          TrainMasks = [||] }

    /// The preference rows of a file as a dataset of pairs: row i is the ids of prompt + chosen followed
    /// by those of prompt + rejected (each one string tokenized once, cut to maxSeqLen), PromptLengths[i]
    /// the length of the first (where the pair splits).
    /// A text with no tokens raises InvalidInputException naming the line.
    let pairDataset (path: string) (tokenizer: TextTokenizer) (maxSeqLen: int) (records: PairRecord[]) : TokenizedDataset =
        let cut (ids: int64[]) = if ids.Length > maxSeqLen then ids[.. maxSeqLen - 1] else ids
        let pairs =
            records
            |> Array.map (fun r ->
                match r.Ids with
                | Some(chosen, rejected) -> cut chosen, cut rejected
                | None -> encode tokenizer maxSeqLen (r.Prompt + r.Chosen), encode tokenizer maxSeqLen (r.Prompt + r.Rejected))
        pairs |> Array.iteri (fun i (c, r) -> if c.Length = 0 || r.Length = 0 then InvalidInput.fail path (string records[i].Line) "prompt + chosen or prompt + rejected has no tokens")
        { Path = path
          Rows = pairs |> Array.map (fun (c, r) -> Array.append c r)
          Lines = records |> Array.map (fun r -> r.Line)
          PromptLengths = pairs |> Array.map (fun (c, _) -> c.Length)
          Segments = [||]
          TrainMasks = [||] }
