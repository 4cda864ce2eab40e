namespace Functional.Data

open System
open System.Globalization
open System.IO
open System.Text
open System.Text.Json
open Functional
open Functional.Text

/// The shape of the objects in a prompt data file.
[<RequireQualifiedAccess>]
type DataFormat =
    /// Told from the keys of the file's first object (see PromptDataset.load).
    | Auto
    /// DeepSpeed-Chat: "prompt" and "chosen" strings ("rejected", if present, is ignored: it is for
    /// reward-model training). Sample = prompt + chosen, as get_prompt_and_chosen concatenates them.
    | DeepSpeedChat
    /// phoenix-sft (LLM Zoo): "from_human" (the prompt) and "from_gpt" (the answer), strings or
    /// equally long arrays of turns.
    | Phoenix
    /// Stanford Alpaca: "instruction", optional "input", "output", with Alpaca's prompt template.
    | Alpaca
    /// A "text" string: no prompt, every token is trained on.
    | Text
    /// An "input_ids" array of token ids, used as they are (no bos or eos added).
    | PreTokenized
    /// Conversations: "messages" (role/content objects: system, user, assistant, tool) or ShareGPT's
    /// "conversations" (from/value), rendered with the model's chat template.
    | Conversation

/// Which fields hold the prompt and answer when a file has none of the known shapes (CLI:
/// --prompt-field, --answer-field, --text-field). Text alone, or Answer with an optional Prompt.
type FieldMap =
    { /// The field holding the prompt (tokens the loss may ignore).
      Prompt: string option
      /// The field holding the answer.
      Answer: string option
      /// The field holding a whole text (no prompt).
      Text: string option }

/// Which tokens of a sample the loss is computed on.
[<RequireQualifiedAccess>]
type TrainOn =
    /// Prompt and answer, as DeepSpeed-Chat's step 1 does (labels = input_ids).
    | All
    /// The answer (and end-of-text) only: the prompt's tokens get label -100.
    | Completion
    /// Conversations: the assistant turns only, each with the end-of-turn text the chat template writes
    /// after it (so the model learns to stop); every other token gets label -100.
    | Assistant

/// What a packed row's tokens attend to (CLI: --packing-attention).
[<RequireQualifiedAccess>]
type PackingAttention =
    /// The samples are concatenated, each ending in eos, and the stream is cut into rows of exactly
    /// max-seq-len tokens: a sample may be split across rows, positions run on through the row and each
    /// token attends to every earlier token of the row, other samples included (the packing of
    /// DeepSpeed-Chat and of HF's group_texts). Every token is trained on.
    | Cross
    /// Whole samples (each cut to max-seq-len) are packed into rows of at most max-seq-len tokens
    /// (TokenizedDataset.packIsolated): positions restart at every sample, each sample attends only to
    /// itself (a block-diagonal causal mask) and no label is predicted across a boundary, so a packed
    /// micro-batch gives the loss and gradients of the same samples unpacked. Completion-only training
    /// keeps each sample's prompt masked.
    | Isolated

/// How a prompt data file becomes token rows.
type PromptDataOptions =
    { /// The objects' shape; Auto (default) tells it from the first object's keys.
      Format: DataFormat
      /// Custom field names; when any is set, Format must be Auto and the fields decide the shape.
      Fields: FieldMap
      /// Rows are cut to this many tokens, keeping the beginning (default 512, as --max-seq-len).
      MaxSeqLen: int
      /// Which tokens are trained on (default All).
      TrainOn: TrainOn
      /// Pack several samples into each row of up to MaxSeqLen tokens, as PackingAttention says
      /// (default false: one sample per row).
      Packing: bool
      /// How packed rows attend (default Isolated); only read when Packing is on.
      PackingAttention: PackingAttention
      /// Whether every sample starts with the tokenizer's bos token (CLI: --add-bos / --no-add-bos).
      /// None (default): the tokenizer's own rule (TextTokenizer.AddsBos: LLaMA's adds bos, GPT-2's and
      /// tiktoken's do not); Some true needs a tokenizer with a bos token.
      AddBos: bool option
      /// Skip (and count) rows that cannot be used instead of failing (default false).
      SkipBadRows: bool
      /// DeepSpeed-Chat's --data_split, e.g. "2,4,4": this phase (supervised fine-tuning, step 1)
      /// takes the first share of a seeded shuffle of the rows (default None: every row, file order).
      DataSplit: string option
      /// The fraction of rows held out for evaluation when no evaluation file is given, in [0, 1)
      /// (default 0: none).
      EvalSplitRatio: float
      /// Seeds the data-split shuffle and the evaluation hold-out (default 42, as --seed).
      Seed: int64
      /// A Jinja file that renders conversation rows instead of the model's own chat template
      /// (--chat-template; default None: the tokenizer folder's chat_template.jinja or
      /// tokenizer_config.json's chat_template).
      ChatTemplateFile: string option }

/// One prompt/answer pair as read from a data file, before tokenization. Every text shape parses
/// into these records; a text-only sample has Prompt = "".
type Sample =
    { /// Text whose tokens the loss ignores under TrainOn.Completion.
      Prompt: string
      /// The answer: what the model learns to produce after the prompt.
      Answer: string
      /// The 1-based line in a JSON Lines file, or the element index + 1 in a JSON array.
      Line: int }

/// A loaded dataset and the number of rows skipped because they could not be used.
[<NoComparison>]
type Loaded =
    { /// Token rows ready for the trainer.
      Dataset: TokenizedDataset
      /// Rows skipped under SkipBadRows (0 otherwise).
      Skipped: int }

/// Training rows and, when asked for, evaluation rows with their text.
[<NoComparison>]
type TrainAndEval =
    { /// Rows to train on.
      Train: TokenizedDataset
      /// Rows to evaluate on (from the evaluation file or held out by EvalSplitRatio).
      Eval: TokenizedDataset option
      /// The evaluation set's samples as text (to score generated answers by exact match); empty for
      /// pre-tokenized data.
      EvalSamples: Sample[]
      /// Rows skipped under SkipBadRows, in both sets together.
      Skipped: int }

/// Reading prompt/answer data (DeepSpeed-Chat, phoenix-sft, Alpaca, plain text, pre-tokenized or
/// custom fields; JSON or JSON Lines) into token rows, with DeepSpeed-Chat's data split.
[<RequireQualifiedAccess>]
module PromptDataset =

    /// The Alpaca prompt for an instruction with an input, exactly as Stanford Alpaca's train.py
    /// ("{instruction}" and "{input}" replaced).
    [<Literal>]
    let AlpacaPromptWithInput =
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

    /// The Alpaca prompt for an instruction whose input is missing, null or "".
    [<Literal>]
    let AlpacaPromptNoInput =
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"

    /// The separator between the turns of a multi-turn phoenix sample (see load).
    [<Literal>]
    let TurnSeparator = "\n"

    /// No custom fields.
    let noFields : FieldMap = { Prompt = None; Answer = None; Text = None }

    /// The defaults: Auto format, max-seq-len 512, train on all tokens, no packing (isolated attention
    /// when it is turned on), bos by the tokenizer's rule, fail on bad rows, no data split, no evaluation hold-out, seed 42.
    let defaults : PromptDataOptions =
        { Format = DataFormat.Auto
          Fields = noFields
          MaxSeqLen = 512
          TrainOn = TrainOn.All
          Packing = false
          PackingAttention = PackingAttention.Isolated
          AddBos = None
          SkipBadRows = false
          DataSplit = None
          EvalSplitRatio = 0.0
          Seed = 42L
          ChatTemplateFile = None }

    /// Parses a --data-format value: auto, deepspeed-chat, phoenix, alpaca, text, input-ids
    /// (case-insensitive; "_" and "-" alike).
    let parseFormat (value: string) : DataFormat =
        match value.Trim().ToLowerInvariant().Replace('_', '-') with
        | "auto" -> DataFormat.Auto
        | "deepspeed-chat" | "dschat" | "prompt-chosen" -> DataFormat.DeepSpeedChat
        | "phoenix" | "phoenix-sft" -> DataFormat.Phoenix
        | "alpaca" -> DataFormat.Alpaca
        | "text" -> DataFormat.Text
        | "input-ids" | "pre-tokenized" | "tokens" -> DataFormat.PreTokenized
        | "conversation" | "conversations" | "messages" | "sharegpt" | "chat" -> DataFormat.Conversation
        | _ ->
            InvalidInput.setting "data_format"
                (sprintf "expected auto, deepspeed-chat, phoenix, alpaca, text, input-ids or conversation, found \"%s\"" value)

    /// Parses a --train-on value: all, completion or assistant (case-insensitive).
    let parseTrainOn (value: string) : TrainOn =
        match value.Trim().ToLowerInvariant() with
        | "all" -> TrainOn.All
        | "completion" | "completion-only" | "completion_only" -> TrainOn.Completion
        | "assistant" | "assistant-only" | "assistant_only" -> TrainOn.Assistant
        | _ -> InvalidInput.setting "train_on" (sprintf "expected all, completion or assistant, found \"%s\"" value)

    /// Parses a --packing-attention value: cross or isolated (case-insensitive); raises
    /// InvalidInputException naming packing_attention and the allowed values otherwise.
    let parsePackingAttention (value: string) : PackingAttention =
        match (if isNull value then "" else value.Trim().ToLowerInvariant()) with
        | "cross" -> PackingAttention.Cross
        | "isolated" -> PackingAttention.Isolated
        | _ -> InvalidInput.setting "packing_attention" (sprintf "expected cross or isolated, found \"%s\"" value)

    /// The --packing-attention spelling of a mode: "cross" or "isolated".
    let packingAttentionName (mode: PackingAttention) : string =
        match mode with
        | PackingAttention.Cross -> "cross"
        | PackingAttention.Isolated -> "isolated"

    // ---------------------------------------------------------------- data split (DeepSpeed-Chat)

    /// The shares of a --data-split value such as "2,4,4", normalized to sum to 1.
    let private splitShares (dataSplit: string) =
        let parts = dataSplit.Split(',')
        let shares =
            parts
            |> Array.map (fun p ->
                match Double.TryParse(p.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture) with
                | true, v when v >= 0.0 && Double.IsFinite v -> v
                | _ ->
                    InvalidInput.setting "data_split"
                        (sprintf "expected comma-separated non-negative numbers such as \"2,4,4\", found \"%s\"" dataSplit))
        let sum = Array.sum shares
        if sum <= 0.0 then InvalidInput.setting "data_split" (sprintf "the shares must not all be 0, found \"%s\"" dataSplit)
        shares |> Array.map (fun s -> s / sum)

    /// The boundaries of the splits of dataSize rows, as DeepSpeed-Chat's get_raw_dataset_split_index:
    /// b[0] = 0, b[i+1] = b[i] + round(share[i] * dataSize) (round half to even, as Python's round),
    /// then every boundary after the first is shifted by the same amount so that the last one is
    /// exactly dataSize. Split i is rows b[i] .. b[i+1]-1 of the shuffled order.
    let splitBoundaries (dataSplit: string) (dataSize: int) : int[] =
        let shares = splitShares dataSplit
        let boundaries = Array.zeroCreate (shares.Length + 1)
        for i in 0 .. shares.Length - 1 do
            boundaries[i + 1] <- boundaries[i] + int (Math.Round(shares[i] * float dataSize, MidpointRounding.ToEven))
        let diff = boundaries[shares.Length] - dataSize
        for i in 1 .. shares.Length do
            boundaries[i] <- boundaries[i] - diff
        boundaries

    /// The row indices the first phase (supervised fine-tuning) takes from dataSize rows: the first
    /// split of a shuffled order. DeepSpeed-Chat shuffles with numpy's RandomState(seed); we shuffle
    /// with Sampler.shuffled seed 0 (the same indices for the same seed, though not numpy's). The
    /// indices keep the shuffled order, as DeepSpeed-Chat's Subset does.
    let splitIndices (dataSplit: string) (seed: int64) (dataSize: int) : int[] =
        let boundaries = splitBoundaries dataSplit dataSize
        let order = Sampler.shuffled seed 0 dataSize
        order[boundaries[0] .. boundaries[1] - 1]

    /// The row indices DeepSpeed-Chat's phase (0: supervised fine-tuning, 1: reward model, 2: RLHF)
    /// takes from dataSize rows: split phase of the same shuffled order as splitIndices. A split with
    /// fewer shares than the phase needs raises InvalidInputException naming data_split.
    let phaseIndices (dataSplit: string) (phase: int) (seed: int64) (dataSize: int) : int[] =
        let boundaries = splitBoundaries dataSplit dataSize
        if phase + 1 >= boundaries.Length then
            InvalidInput.setting "data_split"
                (sprintf "phase %d takes share %d of \"%s\", which has %d" (phase + 1) (phase + 1) dataSplit (boundaries.Length - 1))
        let order = Sampler.shuffled seed 0 dataSize
        order[boundaries[phase] .. boundaries[phase + 1] - 1]

    // ---------------------------------------------------------------- reading records

    type private Record =
        | TextRecord of Sample
        | IdsRecord of line: int * ids: int64[]
        | ConversationRecord of line: int * conversation: Conversation

    /// One object of the file: its Line, where an error message points (Location) and its JSON
    /// (Error when it is not JSON).
    type private RawRecord =
        { Line: int
          Location: string
          Json: Result<JsonElement, string> }

    let private strictUtf8 = UTF8Encoding(false, true)

    let private kindName (kind: JsonValueKind) =
        match kind with
        | JsonValueKind.Object -> "object"
        | JsonValueKind.Array -> "array"
        | JsonValueKind.String -> "string"
        | JsonValueKind.Number -> "number"
        | JsonValueKind.True | JsonValueKind.False -> "boolean"
        | JsonValueKind.Null -> "null"
        | _ -> "value"

    let private lineOfOffset (bytes: byte[]) (offset: int64) =
        let mutable line = 1
        for i in 0 .. int (min offset (int64 bytes.Length)) - 1 do
            if bytes[i] = 10uy then line <- line + 1
        line

    let private decode (path: string) (bytes: byte[]) =
        try strictUtf8.GetString bytes
        with :? DecoderFallbackException as e ->
            let line = if e.Index >= 0 then lineOfOffset bytes (int64 e.Index) else 0
            InvalidInput.fail path (string line) "the file is not valid UTF-8"

    /// The 1-based line on which each top-level element of a JSON array starts.
    let private elementLines (bytes: byte[]) (bodyStart: int) =
        let lines = ResizeArray()
        let mutable reader = Utf8JsonReader(ReadOnlySpan(bytes, bodyStart, bytes.Length - bodyStart))
        let mutable line = 1
        let mutable counted = 0L
        while reader.Read() do
            let isElementStart =
                reader.CurrentDepth = 1
                && reader.TokenType <> JsonTokenType.EndObject
                && reader.TokenType <> JsonTokenType.EndArray
                && reader.TokenType <> JsonTokenType.PropertyName
            if isElementStart then
                let offset = reader.TokenStartIndex
                for i in counted .. offset - 1L do
                    if bytes[bodyStart + int i] = 10uy then line <- line + 1
                counted <- offset
                lines.Add line
        lines.ToArray()

    /// Every object of a JSON array file or JSON Lines file (told by the first non-blank character).
    let private readRaw (path: string) : RawRecord[] =
        InvalidInput.requireFile path "the data file does not exist" "a data file (JSON or JSON Lines)"
        let bytes = File.ReadAllBytes path
        let text = decode path bytes
        let bodyStart, text = if text.StartsWith '\uFEFF' then 3, text.Substring 1 else 0, text
        if text.TrimStart().StartsWith '[' then
            let root =
                match JsonInput.tryParseBytes (ReadOnlyMemory(bytes, bodyStart, bytes.Length - bodyStart)) with
                | Ok root -> root
                | Error e -> InvalidInput.fail path (if e.Line > 0L then string e.Line else "") (sprintf "not valid JSON (%s)" e.Reason)
            let lines = elementLines bytes bodyStart
            root.EnumerateArray()
            |> Seq.mapi (fun i element ->
                { Line = i + 1
                  Location = sprintf "element %d (line %d)" (i + 1) lines[i]
                  Json = Ok(element.Clone()) })
            |> Seq.toArray
        else
            text.Split('\n')
            |> Array.mapi (fun i line -> i + 1, line.TrimEnd('\r'))
            |> Array.filter (fun (_, line) -> not (String.IsNullOrWhiteSpace line))
            |> Array.map (fun (n, line) ->
                let json = JsonInput.tryParse line |> Result.mapError (fun e -> sprintf "not valid JSON (%s)" e.Reason)
                { Line = n; Location = string n; Json = json })

    // ---------------------------------------------------------------- shapes

    /// How the objects of one file become records.
    type private Shape =
        | Fields of name: string * prompt: string option * answer: string
        | HumanGpt
        | Instruction
        | Ids
        | Conversations

    let private shapeName shape =
        match shape with
        | Fields(name, _, _) -> name
        | HumanGpt -> "phoenix-sft (\"from_human\", \"from_gpt\")"
        | Instruction -> "Alpaca (\"instruction\", \"input\", \"output\")"
        | Ids -> "pre-tokenized (\"input_ids\")"
        | Conversations -> "conversation (\"messages\" or \"conversations\")"

    let private deepSpeedChat = Fields("DeepSpeed-Chat (\"prompt\", \"chosen\")", Some "prompt", "chosen")
    let private plainText = Fields("text (\"text\")", None, "text")

    let private shapeOfFormat (format: DataFormat) =
        match format with
        | DataFormat.DeepSpeedChat -> Some deepSpeedChat
        | DataFormat.Phoenix -> Some HumanGpt
        | DataFormat.Alpaca -> Some Instruction
        | DataFormat.Text -> Some plainText
        | DataFormat.PreTokenized -> Some Ids
        | DataFormat.Conversation -> Some Conversations
        | DataFormat.Auto -> None

    let private shapeOfFields (fields: FieldMap) =
        match fields.Text, fields.Prompt, fields.Answer with
        | None, None, None -> None
        | Some text, None, None -> Some(Fields(sprintf "custom (text \"%s\")" text, None, text))
        | None, prompt, Some answer ->
            let name =
                match prompt with
                | Some p -> sprintf "custom (prompt \"%s\", answer \"%s\")" p answer
                | None -> sprintf "custom (answer \"%s\")" answer
            Some(Fields(name, prompt, answer))
        | Some _, _, _ -> InvalidInput.setting "text_field" "a text field takes the whole sample; it cannot be combined with {prompt_field} or {answer_field}"
        | None, Some _, None -> InvalidInput.setting "prompt_field" "a prompt field needs an {answer_field} too"

    let private detectShape (path: string) (record: RawRecord) (element: JsonElement) =
        let keys = element.EnumerateObject() |> Seq.map (fun p -> p.Name) |> Set.ofSeq
        let has (names: string list) = names |> List.forall keys.Contains
        if has [ "input_ids" ] then Ids
        elif ChatTemplate.isConversation element then Conversations
        elif has [ "prompt"; "chosen" ] then deepSpeedChat
        elif has [ "from_human"; "from_gpt" ] then HumanGpt
        elif has [ "instruction"; "output" ] then Instruction
        elif has [ "text" ] then plainText
        else
            InvalidInput.fail path record.Location
                (sprintf "cannot tell the data's shape from the keys of the first object (%s); expected \"prompt\"/\"chosen\", \"from_human\"/\"from_gpt\", \"instruction\"/\"output\", \"text\", \"input_ids\" or \"messages\"/\"conversations\", or name the fields with {prompt_field}/{answer_field} or {text_field}"
                    (keys |> Seq.map (sprintf "\"%s\"") |> String.concat ", "))

    let private field (shape: Shape) (element: JsonElement) (name: string) : Result<JsonElement, string> =
        match element.TryGetProperty name with
        | true, value when value.ValueKind <> JsonValueKind.Null -> Ok value
        | true, _ -> Error(sprintf "\"%s\" is null (expected by the %s shape)" name (shapeName shape))
        | false, _ -> Error(sprintf "the object has no \"%s\" field (expected by the %s shape)" name (shapeName shape))

    let private asString (name: string) (value: JsonElement) =
        if value.ValueKind = JsonValueKind.String then Ok(value.GetString())
        else Error(sprintf "\"%s\" must be a string, found a JSON %s" name (kindName value.ValueKind))

    let private stringField shape element name = field shape element name |> Result.bind (asString name)

    let private turns (name: string) (value: JsonElement) =
        match value.ValueKind with
        | JsonValueKind.String -> Ok [| value.GetString() |]
        | JsonValueKind.Array ->
            let items = value.EnumerateArray() |> Seq.toArray
            match items |> Array.tryFindIndex (fun t -> t.ValueKind <> JsonValueKind.String) with
            | Some i -> Error(sprintf "\"%s\"[%d] must be a string, found a JSON %s" name i (kindName items[i].ValueKind))
            | None when items.Length = 0 -> Error(sprintf "\"%s\" is an empty array (expected at least one turn)" name)
            | None -> Ok(items |> Array.map (fun t -> t.GetString()))
        | kind -> Error(sprintf "\"%s\" must be a string or an array of strings, found a JSON %s" name (kindName kind))

    let private humanGpt (line: int) (element: JsonElement) =
        let human = field HumanGpt element "from_human" |> Result.bind (turns "from_human")
        let gpt = field HumanGpt element "from_gpt" |> Result.bind (turns "from_gpt")
        match human, gpt with
        | Error e, _ | _, Error e -> Error e
        | Ok h, Ok g when h.Length <> g.Length ->
            Error(sprintf "\"from_human\" has %d turns and \"from_gpt\" %d (expected as many answers as questions)" h.Length g.Length)
        | Ok h, Ok g ->
            let earlier = Array.init (h.Length - 1) (fun i -> [| h[i]; g[i] |]) |> Array.concat
            let prompt = String.Join(TurnSeparator, Array.append earlier [| h[h.Length - 1] |])
            Ok(TextRecord { Prompt = prompt; Answer = g[g.Length - 1]; Line = line })

    let private instruction (line: int) (element: JsonElement) =
        let input =
            match element.TryGetProperty "input" with
            | false, _ -> Ok ""
            | true, v when v.ValueKind = JsonValueKind.Null -> Ok ""
            | true, v -> asString "input" v
        match stringField Instruction element "instruction", input, stringField Instruction element "output" with
        | Error e, _, _ | _, Error e, _ | _, _, Error e -> Error e
        | Ok task, Ok input, Ok output ->
            let prompt =
                if input = "" then AlpacaPromptNoInput.Replace("{instruction}", task)
                else AlpacaPromptWithInput.Replace("{instruction}", task).Replace("{input}", input)
            Ok(TextRecord { Prompt = prompt; Answer = output; Line = line })

    let private tokenIds (line: int) (element: JsonElement) =
        match field Ids element "input_ids" with
        | Error e -> Error e
        | Ok ids when ids.ValueKind <> JsonValueKind.Array ->
            Error(sprintf "\"input_ids\" must be an array of token ids, found a JSON %s" (kindName ids.ValueKind))
        | Ok ids ->
            let items = ids.EnumerateArray() |> Seq.toArray
            let valid (id: JsonElement) =
                id.ValueKind = JsonValueKind.Number && (match id.TryGetInt64() with | true, v -> v >= 0L | _ -> false)
            match items |> Array.tryFindIndex (valid >> not) with
            | Some i -> Error(sprintf "input_ids[%d]: expected a non-negative integer token id, found %s" i (items[i].GetRawText()))
            | None -> Ok(IdsRecord(line, items |> Array.map (fun id -> id.GetInt64())))

    let private toRecord (shape: Shape) (raw: RawRecord) : Result<Record, string> =
        match raw.Json with
        | Error e -> Error e
        | Ok element when element.ValueKind <> JsonValueKind.Object ->
            Error(sprintf "expected a JSON object (%s shape), found a JSON %s" (shapeName shape) (kindName element.ValueKind))
        | Ok element ->
            match shape with
            | Fields(_, prompt, answer) ->
                let promptText =
                    match prompt with
                    | Some name -> stringField shape element name
                    | None -> Ok ""
                match promptText, stringField shape element answer with
                | Error e, _ | _, Error e -> Error e
                | Ok p, Ok a -> Ok(TextRecord { Prompt = p; Answer = a; Line = raw.Line })
            | HumanGpt -> humanGpt raw.Line element
            | Instruction -> instruction raw.Line element
            | Ids -> tokenIds raw.Line element
            | Conversations -> ChatTemplate.parseConversation element |> Result.map (fun c -> ConversationRecord(raw.Line, c))

    let private validateOptions (options: PromptDataOptions) =
        if options.MaxSeqLen < 1 then
            InvalidInput.setting "max_seq_len" (sprintf "must be at least 1, found %d" options.MaxSeqLen)
        if not (options.EvalSplitRatio >= 0.0 && options.EvalSplitRatio < 1.0) then
            InvalidInput.setting "eval_split_ratio" (sprintf "must be in [0, 1), found %g" options.EvalSplitRatio)
        if options.Packing && options.PackingAttention = PackingAttention.Cross && options.TrainOn <> TrainOn.All then
            InvalidInput.setting "packing"
                "rows packed with {packing_attention} cross train on every token; completion-only and assistant-only training need {packing_attention} isolated"
        match shapeOfFields options.Fields, options.Format with
        | Some _, format when format <> DataFormat.Auto ->
            InvalidInput.setting "data_format" "custom fields ({prompt_field}, {answer_field}, {text_field}) decide the shape; leave the format at auto"
        | _ -> ()
        options.DataSplit |> Option.iter (splitShares >> ignore)

    /// The records of a file, each Ok or Error (location, problem), in file order; raises for an empty
    /// file, a broken JSON array, undecodable bytes, an undetectable shape, and (without SkipBadRows)
    /// the first bad record.
    let private readRecords (path: string) (options: PromptDataOptions) : (string * Result<Record, string>)[] =
        let raw = readRaw path
        if raw.Length = 0 then InvalidInput.fail path "" "the file holds no samples (expected a JSON array of objects or one JSON object per line)"
        let shape =
            match shapeOfFields options.Fields |> Option.orElse (shapeOfFormat options.Format) with
            | Some shape -> Some shape
            | None ->
                raw
                |> Array.tryPick (fun r ->
                    match r.Json with
                    | Ok element when element.ValueKind = JsonValueKind.Object -> Some(detectShape path r element)
                    | _ -> None)
        let records =
            match shape with
            | Some shape -> raw |> Array.map (fun r -> r.Location, toRecord shape r)
            | None -> raw |> Array.map (fun r -> r.Location, Error(match r.Json with Error e -> e | Ok e -> sprintf "expected a JSON object, found a JSON %s" (kindName e.ValueKind)))
        if not options.SkipBadRows then
            records |> Array.iter (fun (location, record) -> match record with Error e -> InvalidInput.fail path location e | Ok _ -> ())
        records

    /// The records this phase uses (DataSplit's first share), the good ones and how many were bad.
    let private usable (options: PromptDataOptions) (records: (string * Result<Record, string>)[]) =
        let selected =
            match options.DataSplit with
            | Some split -> splitIndices split options.Seed records.Length |> Array.map (fun i -> records[i])
            | None -> records
        let good = selected |> Array.choose (fun (location, r) -> match r with Ok record -> Some(location, record) | Error _ -> None)
        good, selected.Length - good.Length

    /// Reads a file's samples as text (no tokenizer involved), after the data split; bad rows raise
    /// InvalidInputException naming file and line, or are left out under SkipBadRows. Pre-tokenized
    /// files have no text and raise.
    let readSamples (path: string) (options: PromptDataOptions) : Sample[] =
        validateOptions options
        let good, _ = readRecords path options |> usable options
        good
        |> Array.map (fun (location, record) ->
            match record with
            | TextRecord sample -> sample
            | IdsRecord _ -> InvalidInput.fail path location "the file holds token ids (\"input_ids\"), not text samples"
            | ConversationRecord _ -> InvalidInput.fail path location "the file holds conversations, not prompt/answer samples")

    // ---------------------------------------------------------------- tokenization

    /// The ids and train mask of a conversation: the chat template's text encoded with no special tokens
    /// added (the template writes them; bos is put first only when --add-bos asks for it and the
    /// template did not), the assistant turns masked in under TrainOn.Assistant. Error: the problem.
    let private encodeConversation (options: PromptDataOptions) (tokenizer: TextTokenizer) (template: Lazy<ChatTemplate>) (conversation: Conversation) =
        let bos (ids: int64[]) (mask: bool[]) =
            match options.AddBos, tokenizer.Special.Bos with
            | Some true, Some b when ids.Length = 0 || ids[0] <> b -> Array.append [| b |] ids, Array.append [| false |] mask
            | Some true, None -> InvalidInput.setting "add_bos" (sprintf "the tokenizer %s has no bos token" tokenizer.Name)
            | _ -> ids, mask
        try
            match options.TrainOn with
            | TrainOn.Assistant ->
                match ChatTemplate.renderWithAssistantSpans template.Value conversation with
                | Error e -> Error e
                | Ok rendered when rendered.AssistantSpans.Length = 0 ->
                    Error "the conversation has no assistant turn to train on (--train-on assistant)"
                | Ok rendered -> Ok(ChatTemplate.tokenizeWithAssistantMask tokenizer rendered ||> bos)
            | TrainOn.Completion ->
                Error "completion-only training takes prompt/answer rows; for conversations use --train-on assistant (or all)"
            | TrainOn.All ->
                let ids = tokenizer.Encode(ChatTemplate.render template.Value conversation false)
                Ok(bos ids (Array.create ids.Length true))
        with :? JinjaException as e -> Error(sprintf "the chat template cannot render this conversation: %s" e.Message)

    /// A record's ids (before truncation), its prompt length (bos and the tokens lying in the prompt)
    /// and, for a conversation trained on its assistant turns, its train mask. Error: a conversation the
    /// template refuses (or, with no assistant turn, cannot train on).
    let private encode (options: PromptDataOptions) (tokenizer: TextTokenizer) (template: Lazy<ChatTemplate>) (record: Record) : Result<int64[] * int * bool[] option, string> =
        match record with
        | IdsRecord(_, ids) when options.TrainOn = TrainOn.Assistant ->
            Error "assistant-only training (--train-on assistant) takes conversation rows (\"messages\" or \"conversations\"), not token ids"
        | TextRecord _ when options.TrainOn = TrainOn.Assistant ->
            Error "assistant-only training (--train-on assistant) takes conversation rows (\"messages\" or \"conversations\"); for prompt/answer rows use --train-on completion"
        | IdsRecord(_, ids) -> Ok(ids, 0, None)
        | ConversationRecord(_, conversation) ->
            encodeConversation options tokenizer template conversation
            |> Result.map (fun (ids, mask) -> ids, 0, (if options.TrainOn = TrainOn.Assistant then Some mask else None))
        | TextRecord sample ->
            let joined = tokenizer.EncodeJoined sample.Prompt sample.Answer
            let bos = TextTokenizer.leadingBos options.AddBos tokenizer
            let eos =
                match tokenizer.Special.Eos with
                | Some eos -> eos
                | None -> InvalidInput.fail tokenizer.Name "" "the tokenizer has no end-of-text (eos) token; text samples need one to mark where they end"
            let text = Array.append bos joined.Ids
            let ids = if text.Length > 0 && text[text.Length - 1] = eos then text else Array.append text [| eos |]
            Ok(ids, bos.Length + joined.PromptTokens, None)

    let private lineOf (record: Record) =
        match record with
        | TextRecord s -> s.Line
        | IdsRecord(line, _) -> line
        | ConversationRecord(line, _) -> line

    /// One row per record, truncated to MaxSeqLen; rows with nothing to train on are bad.
    let private tokenizeRows (path: string) (options: PromptDataOptions) (tokenizer: TextTokenizer) (template: Lazy<ChatTemplate>) (records: (string * Record)[]) =
        let rows = ResizeArray()
        let lines = ResizeArray()
        let prompts = ResizeArray()
        let masks = ResizeArray()
        let kept = ResizeArray()
        let mutable skipped = 0
        let bad location problem =
            if not options.SkipBadRows then InvalidInput.fail path location problem
            skipped <- skipped + 1
        let cut (a: 'T[]) = if a.Length > options.MaxSeqLen then a[.. options.MaxSeqLen - 1] else a
        for location, record in records do
            match encode options tokenizer template record with
            | Error problem -> bad location problem
            | Ok(ids, promptLength, mask) ->
                let row = cut ids
                let promptLength = if options.TrainOn = TrainOn.Completion then promptLength else 0
                let isText = match record with IdsRecord _ -> false | TextRecord _ | ConversationRecord _ -> true
                match mask with
                | Some mask when Batching.predictedTokensMasked options.MaxSeqLen mask = 0L ->
                    if Array.contains true mask && row.Length < ids.Length then
                        bad location (sprintf "nothing left to train on: the assistant turns start after max-seq-len (%d tokens; the conversation has %d) (raise {max_seq_len} or use {skip_bad_rows})" options.MaxSeqLen ids.Length)
                    else bad location "nothing to train on: the assistant turns have no tokens"
                | None when isText && Batching.predictedTokens options.MaxSeqLen promptLength row = 0L ->
                    if promptLength >= options.MaxSeqLen then
                        bad location (sprintf "nothing left to train on: the prompt has %d tokens and max-seq-len is %d (raise {max_seq_len}, shorten the prompt or use {skip_bad_rows})" promptLength options.MaxSeqLen)
                    else bad location (sprintf "nothing to train on: the sample has %d tokens (at least 2 are needed to predict one)" row.Length)
                | _ ->
                    rows.Add row
                    lines.Add(lineOf record)
                    prompts.Add promptLength
                    mask |> Option.iter (cut >> masks.Add)
                    kept.Add record
        { Path = path
          Rows = rows.ToArray()
          Lines = lines.ToArray()
          PromptLengths = prompts.ToArray()
          Segments = [||]
          TrainMasks = if options.TrainOn = TrainOn.Assistant then masks.ToArray() else [||] },
        kept.ToArray(),
        skipped

    /// Concatenates every record's ids, each followed by eos (added to a pre-tokenized row unless it
    /// already ends with one), and cuts the stream into rows of MaxSeqLen tokens; a row's line is the
    /// line of the sample it starts in.
    let private packRows (path: string) (options: PromptDataOptions) (tokenizer: TextTokenizer) (template: Lazy<ChatTemplate>) (records: (string * Record)[]) =
        let eos =
            match tokenizer.Special.Eos with
            | Some eos -> eos
            | None -> InvalidInput.fail tokenizer.Name "" "the tokenizer has no end-of-text (eos) token; packing separates samples with it"
        let stream = ResizeArray<int64>()
        let starts = ResizeArray<int>()
        for location, record in records do
            let ids =
                match encode options tokenizer template record with
                | Ok(ids, _, _) -> ids
                | Error problem -> InvalidInput.fail path location problem
            let ids = if ids.Length > 0 && ids[ids.Length - 1] = eos then ids else Array.append ids [| eos |]
            let line = lineOf record
            for id in ids do
                stream.Add id
                starts.Add line
        let all = stream.ToArray()
        let rows = all |> Array.chunkBySize options.MaxSeqLen
        { Path = path
          Rows = rows
          Lines = Array.init rows.Length (fun r -> starts[r * options.MaxSeqLen])
          PromptLengths = Array.zeroCreate rows.Length
          Segments = [||]
          TrainMasks = [||] },
        records |> Array.map snd

    let private tokenize path options tokenizer template records =
        match options.Packing, options.PackingAttention with
        | true, PackingAttention.Cross ->
            let dataset, kept = packRows path options tokenizer template records
            dataset, kept, 0
        | true, PackingAttention.Isolated ->
            let dataset, kept, skipped = tokenizeRows path options tokenizer template records
            TokenizedDataset.packIsolated options.MaxSeqLen dataset, kept, skipped
        | false, _ -> tokenizeRows path options tokenizer template records

    let private textSamples (records: Record[]) =
        records |> Array.choose (fun r -> match r with TextRecord s -> Some s | IdsRecord _ | ConversationRecord _ -> None)

    let private nonEmpty (path: string) (skipped: int) (dataset: TokenizedDataset) =
        if dataset.Rows.Length = 0 then
            InvalidInput.fail path "" (sprintf "no usable rows are left (%d skipped)" skipped)
        dataset

    /// Reads the training file and the evaluation data, and tokenizes both:
    /// - the file is a JSON array of objects or JSON Lines (told by its first non-blank character);
    ///   the shape comes from options.Fields, options.Format, or the first object's keys, in this
    ///   order: "input_ids" (pre-tokenized), "prompt"+"chosen" (DeepSpeed-Chat), "from_human"+
    ///   "from_gpt" (phoenix-sft), "instruction"+"output" (Alpaca), "text";
    /// - phoenix-sft turn arrays [h1..hk], [g1..gk]: prompt = h1, g1, ..., hk joined by "\n"
    ///   (TurnSeparator), answer = gk; Alpaca prompts are AlpacaPromptWithInput / AlpacaPromptNoInput;
    /// - a sample's text is prompt + answer, one string tokenized once (as DeepSpeed-Chat's
    ///   prompt + chosen and Alpaca's source + target), so its ids are HF's ids of that text: [bos when
    ///   AddBos says so, by default the tokenizer's rule] + EncodeJoined(prompt, answer) + [eos] (the
    ///   eos is not doubled when the text already ends with it), cut to MaxSeqLen;
    /// - Packing with PackingAttention.Cross: the samples' ids, each ending in eos, concatenated and cut
    ///   into rows of MaxSeqLen; with PackingAttention.Isolated: the rows above (bad rows skipped or
    ///   raised alike) packed whole by TokenizedDataset.packIsolated, each keeping its prompt length;
    /// - TrainOn.Completion: PromptLength = bos + the tokens whose characters all lie in the prompt
    ///   (from the tokenizer's offsets); a token spanning the boundary is trained on, since it holds the
    ///   answer's first characters; a row whose prompt leaves nothing to train on is bad;
    /// - DataSplit: the first share of the shuffled rows (splitIndices), applied to the evaluation
    ///   file too, as DeepSpeed-Chat splits its train and eval data alike;
    /// - without an evaluation file, EvalSplitRatio r > 0 holds out round(r * n) rows (at least 1,
    ///   leaving at least 1): the first positions of Sampler.shuffled Seed 1 n; both sets keep order.
    /// Bad rows (not JSON, missing fields, wrong types, nothing to train on) raise
    /// InvalidInputException naming file and line, or are skipped and counted under SkipBadRows;
    /// invalid UTF-8, an empty file, a broken JSON array and bad options always raise.
    let loadTrainAndEval (trainPath: string) (evalPath: string option) (options: PromptDataOptions) (tokenizer: TextTokenizer) : TrainAndEval =
        validateOptions options
        if evalPath.IsSome && options.EvalSplitRatio > 0.0 then
            InvalidInput.setting "eval_split_ratio" "an evaluation file is given; holding out training rows as well is ambiguous"
        let trainRecords, trainBad = readRecords trainPath options |> usable options
        let evalSource =
            match evalPath with
            | Some path ->
                let records, bad = readRecords path options |> usable options
                Some(path, records), trainRecords, bad
            | None when options.EvalSplitRatio > 0.0 ->
                let n = trainRecords.Length
                if n < 2 then
                    InvalidInput.setting "eval_split_ratio" (sprintf "holding out evaluation rows needs at least 2 usable rows, found %d" n)
                let count = int (Math.Round(options.EvalSplitRatio * float n)) |> max 1 |> min (n - 1)
                let held = Array.zeroCreate n
                Sampler.shuffled options.Seed 1 n |> Array.take count |> Array.iter (fun i -> held[i] <- true)
                let pick want = trainRecords |> Array.indexed |> Array.filter (fun (i, _) -> held[i] = want) |> Array.map snd
                Some(trainPath, pick true), pick false, 0
            | None -> None, trainRecords, 0
        let evalPart, trainPart, evalBad = evalSource
        // Conversation rows are rendered with the tokenizer folder's chat template (or ChatTemplateFile),
        // loaded when the first one is met.
        let template = lazy (ChatTemplate.load tokenizer.Name options.ChatTemplateFile)
        let train, _, trainSkipped = tokenize trainPath options tokenizer template trainPart
        let eval, evalSamples, evalSkipped =
            match evalPart with
            | Some(path, records) ->
                let dataset, kept, skipped = tokenize path options tokenizer template records
                Some(nonEmpty path (evalBad + skipped) dataset), textSamples kept, skipped
            | None -> None, [||], 0
        { Train = nonEmpty trainPath (trainBad + trainSkipped) train
          Eval = eval
          EvalSamples = evalSamples
          Skipped = trainBad + trainSkipped + evalBad + evalSkipped }

    /// Reads and tokenizes one file as loadTrainAndEval does without an evaluation file: rows that
    /// EvalSplitRatio holds out are left out of Dataset.
    let load (path: string) (options: PromptDataOptions) (tokenizer: TextTokenizer) : Loaded =
        let loaded = loadTrainAndEval path None options tokenizer
        { Dataset = loaded.Train; Skipped = loaded.Skipped }
