namespace Functional.Text

open System
open System.Collections.Generic
open System.Globalization
open System.IO
open System.Security.Cryptography
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open Microsoft.ML.Tokenizers
open Functional

/// Tokenizers from Hugging Face model folders and tiktoken encoding names, built on
/// Microsoft.ML.Tokenizers (BpeTokenizer, LlamaTokenizer, TiktokenTokenizer).
///
/// A model folder is read the way HF's fast tokenizers read it: `tokenizer.json` first (a byte-level
/// BPE model, GPT-2 style), then `vocab.json` + `merges.txt` (GPT-2 byte-level BPE), then
/// `tokenizer.model` (LLaMA SentencePiece BPE). Special tokens are resolved per role (bos, eos, pad),
/// the first source that names one winning:
///   1. `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`: a token string or
///      `{"content": ...}`), then `special_tokens_map.json` (same keys); token strings are resolved with
///      the added tokens (`tokenizer.json`'s `added_tokens`, `tokenizer_config.json`'s
///      `added_tokens_decoder`) and then the vocabulary;
///   2. the SentencePiece model's own bos and eos ids (`tokenizer.model` only);
///   3. `generation_config.json` (`bos_token_id`, `eos_token_id`, `pad_token_id`; an int or a list,
///      whose first element is taken), then `config.json` (same keys).
/// A negative id means "none", as SentencePiece's -1. Pad falls back to eos, as in DeepSpeed-Chat.
/// Encode adds no special tokens (no bos); added tokens written in the text are kept whole, as HF does.
/// EncodeJoined tokenizes prompt + answer as one string and counts the prompt's tokens from the
/// tokenizer's character offsets. The tokenizer's own bos/eos rule (AddsBos, AddsEos) is HF's:
/// `tokenizer_config.json`'s `add_bos_token` / `add_eos_token` when present, else the special tokens
/// around `$A` in `tokenizer.json`'s TemplateProcessing post-processor, else bos for a
/// `tokenizer.model` (HF's LlamaTokenizer default) and nothing for byte-level BPE and tiktoken.
/// Decode leaves out special tokens (added tokens marked special, the bos/eos/pad/unk tokens and
/// `additional_special_tokens`), as HF's `decode(ids, skip_special_tokens=True)`.
///
/// tokenizer.json support covers byte-level BPE: GPT-2's pre-tokenization pattern, or the regex of a
/// `Split` pre-tokenizer (LLaMA-3, Qwen2 style), `add_prefix_space`, and no normalizer or NFC. A
/// SentencePiece-style tokenizer.json (LLaMA, Mistral: a BPE model without byte-level pre-tokenization,
/// `Prepend("▁")` + `Replace(" ", "▁")` normalizers or a Metaspace pre-tokenizer, byte fallback) is read
/// through the tokenizer.model beside it, or, without one, turned into the SentencePiece model it was
/// converted from (merge ranks as piece scores). BPE `ignore_merges` is not applied: words are always
/// built by merges.
[<RequireQualifiedAccess>]
module Tokenizers =

    /// GPT-2's pre-tokenization pattern: contractions, letters, digits and other symbols, each with an
    /// optional leading space, and runs of whitespace.
    let gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

    /// GPT-2's byte-to-unicode table (`bytes_to_unicode` in openai/gpt-2's encoder.py): the character
    /// that stands for each byte in a byte-level vocabulary. Printable Latin-1 bytes stand for
    /// themselves; the others map in order to U+0100 and up (the space byte 0x20 becomes 'Ġ').
    let byteLevelAlphabet: char[] =
        let printable b = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)
        [| 0..255 |]
        |> Array.mapFold (fun next b -> if printable b then char b, next else char next, next + 1) 256
        |> fst

    /// The encoding names fromEncoding knows.
    let knownEncodings = [ "cl100k_base"; "o200k_base" ]

    /// A token the tokenizer files add to the model's vocabulary.
    type private AddedToken = { Content: string; Id: int; Special: bool }

    /// What one tokenizer file gives, before the special tokens are resolved.
    [<NoEquality; NoComparison>]
    type private Loaded =
        { Encode: string -> IReadOnlyList<int>
          /// Prompt and answer to the ids of their concatenation and the number of prompt tokens.
          EncodeJoined: string -> string -> int[] * int
          /// The special tokens tokenizer.json's post-processor puts before and after the text (adds
          /// bos, adds eos); None without a TemplateProcessing post-processor.
          Template: (bool * bool) option
          /// Whether HF adds bos when the tokenizer files say nothing (LlamaTokenizer: yes).
          AddsBosByDefault: bool
          Decode: int[] -> string
          /// Token strings to ids, added tokens first.
          Lookup: string -> int option
          /// Ids the tokenizer file itself marks as special (added tokens marked special, SentencePiece
          /// control tokens).
          SpecialIds: int list
          /// The SentencePiece model's bos and eos.
          ModelBos: int option
          ModelEos: int option
          VocabSize: int
          /// The files that decide the ids, for the fingerprint.
          Files: string list }

    let private expectedFiles =
        "expected tokenizer.json (a byte-level BPE model), vocab.json + merges.txt (GPT-2 byte-level BPE) "
        + "or tokenizer.model (LLaMA SentencePiece)"

    let private readJson (path: string) : JsonElement =
        match JsonInput.tryParse (File.ReadAllText path) with
        | Ok root -> root
        | Error e -> InvalidInput.fail path "" (sprintf "not valid JSON (%s)" e.Message)

    let private readJsonObject (path: string) =
        let root = readJson path
        if root.ValueKind <> JsonValueKind.Object then InvalidInput.fail path "" "expected a JSON object"
        root

    /// The value of an object's property; None when it is absent or null.
    let private field (element: JsonElement) (name: string) =
        if element.ValueKind <> JsonValueKind.Object then None
        else
            match element.TryGetProperty name with
            | true, value when value.ValueKind <> JsonValueKind.Null -> Some value
            | _ -> None

    let private stringField element name =
        match field element name with
        | Some v when v.ValueKind = JsonValueKind.String -> Some(v.GetString())
        | _ -> None

    let private boolField element name defaultValue =
        match field element name with
        | Some v when v.ValueKind = JsonValueKind.True -> true
        | Some v when v.ValueKind = JsonValueKind.False -> false
        | _ -> defaultValue

    /// A JSON integer; None for any other value.
    let private integer (element: JsonElement) =
        match element.ValueKind with
        | JsonValueKind.Number ->
            match element.TryGetInt64() with
            | true, value -> Some value
            | _ -> None
        | _ -> None

    let private typeOf (element: JsonElement) = stringField element "type" |> Option.defaultValue ""

    /// A tokenizer.json component and, for a Sequence, the components inside it.
    let rec private components (element: JsonElement) : JsonElement list =
        let children =
            [ for key in [ "pretokenizers"; "decoders"; "normalizers"; "processors" ] do
                  match field element key with
                  | Some list when list.ValueKind = JsonValueKind.Array ->
                      for child in list.EnumerateArray() do
                          yield! components child
                  | _ -> () ]
        if element.ValueKind = JsonValueKind.Object then element :: children else []

    let private componentsOf root name =
        field root name |> Option.map components |> Option.defaultValue []

    /// Reads a JSON object of token strings to ids (vocab.json, tokenizer.json's model.vocab).
    let private readVocabulary (path: string) (location: string) (element: JsonElement) =
        if element.ValueKind <> JsonValueKind.Object then
            InvalidInput.fail path location "expected an object mapping token strings to ids"
        let vocabulary = Dictionary<string, int>(StringComparer.Ordinal)
        for entry in element.EnumerateObject() do
            match integer entry.Value with
            | Some id when id >= 0L && id <= int64 Int32.MaxValue -> vocabulary[entry.Name] <- int id
            | _ ->
                let where = if location = "" then entry.Name else location + "." + entry.Name
                InvalidInput.fail path where (sprintf "expected a non-negative integer id, found %s" (entry.Value.GetRawText()))
        vocabulary

    let private addedTokensOfConfig (path: string) (config: JsonElement) =
        match field config "added_tokens_decoder" with
        | None -> []
        | Some decoder when decoder.ValueKind = JsonValueKind.Object ->
            [ for entry in decoder.EnumerateObject() do
                  let location = "added_tokens_decoder." + entry.Name
                  let id =
                      match Int32.TryParse(entry.Name, NumberStyles.None, CultureInfo.InvariantCulture) with
                      | true, id -> id
                      | _ -> InvalidInput.fail path location "expected a token id as the key"
                  match stringField entry.Value "content" with
                  | Some content -> { Content = content; Id = id; Special = boolField entry.Value "special" false }
                  | None -> InvalidInput.fail path location "expected an object with a \"content\" string" ]
        | Some _ -> InvalidInput.fail path "added_tokens_decoder" "expected an object mapping ids to tokens"

    let private addedTokensOfTokenizerJson (path: string) (root: JsonElement) =
        match field root "added_tokens" with
        | None -> []
        | Some list when list.ValueKind = JsonValueKind.Array ->
            [ for i, entry in Seq.indexed (list.EnumerateArray()) do
                  let location = sprintf "added_tokens[%d]" i
                  match stringField entry "content", field entry "id" |> Option.bind integer with
                  | Some content, Some id when id >= 0L && id <= int64 Int32.MaxValue ->
                      { Content = content; Id = int id; Special = boolField entry "special" false }
                  | _ -> InvalidInput.fail path location "expected an object with \"id\" (an integer) and \"content\" (a string)" ]
        | Some _ -> InvalidInput.fail path "added_tokens" "expected a list of tokens"

    /// The length of the longest common prefix of a and b.
    let private commonPrefix (a: string) (b: string) =
        let n = min a.Length b.Length
        let mutable i = 0
        while i < n && a[i] = b[i] do
            i <- i + 1
        i

    /// The ids of tokens and how many leading ones end at or before boundary (offsets and boundary in
    /// the same text: the one the tokenizer encoded after its own normalization).
    let private splitAt (boundary: int) (tokens: IReadOnlyList<EncodedToken>) =
        let ids = tokens |> Seq.map (fun t -> t.Id) |> Array.ofSeq
        let inPrompt = tokens |> Seq.takeWhile (fun t -> t.Offset.End.Value <= boundary) |> Seq.length
        ids, inPrompt

    /// A byte-level BPE (GPT-2 style) from a vocabulary, merges ("left right") and added tokens.
    let private byteLevelBpe
        (origin: string)
        (vocabulary: Dictionary<string, int>)
        (merges: string list)
        (added: AddedToken list)
        (pattern: Regex)
        (addPrefixSpace: bool)
        (normalizeNfc: bool)
        (files: string list)
        : Loaded =
        let addedIds = Dictionary<string, int>(StringComparer.Ordinal)
        for token in added do
            vocabulary[token.Content] <- token.Id
            addedIds[token.Content] <- token.Id
        let specialTokens = if addedIds.Count = 0 then null else addedIds :> IReadOnlyDictionary<_, _>
        let options =
            BpeOptions(
                vocabulary,
                Merges = merges,
                ByteLevel = true,
                PreTokenizer = RegexPreTokenizer(pattern, specialTokens),
                SpecialTokens = specialTokens
            )
        let tokenizer =
            try
                BpeTokenizer.Create options
            with e ->
                InvalidInput.fail origin "" (sprintf "not a usable BPE vocabulary and merge list (%s)" e.Message)
        let prepare (text: string) =
            let text = if normalizeNfc then text.Normalize NormalizationForm.FormC else text
            if addPrefixSpace && text.Length > 0 && not (Char.IsWhiteSpace text[0]) then " " + text else text
        { Encode = fun text -> tokenizer.EncodeToIds(prepare text)
          EncodeJoined =
            fun prompt answer ->
                let text = prepare (prompt + answer)
                let mutable normalized = null
                tokenizer.EncodeToTokens(text, &normalized) |> splitAt (commonPrefix (prepare prompt) text)
          Template = None
          AddsBosByDefault = false
          Decode = fun ids -> tokenizer.Decode(ids, false)
          Lookup =
            fun token ->
                match addedIds.TryGetValue token with
                | true, id -> Some id
                | _ ->
                    match vocabulary.TryGetValue token with
                    | true, id -> Some id
                    | _ -> None
          SpecialIds = added |> List.filter (fun t -> t.Special) |> List.map (fun t -> t.Id)
          ModelBos = None
          ModelEos = None
          VocabSize = (vocabulary.Values |> Seq.fold max -1) + 1
          Files = files }

    let private readMerges (path: string) =
        File.ReadAllLines path
        |> Array.indexed
        |> Array.filter (fun (i, line) -> not (String.IsNullOrWhiteSpace line || (i = 0 && line.StartsWith "#version")))
        |> Array.map (fun (i, line) ->
            match line.TrimEnd('\r').Split(' ') with
            | [| left; right |] when left <> "" && right <> "" -> line.TrimEnd '\r'
            | _ ->
                let problem = sprintf "expected two tokens separated by one space, found \"%s\"" line
                InvalidInput.fail path (sprintf "line %d" (i + 1)) problem)
        |> List.ofArray

    let private fromVocabAndMerges (folder: string) (configAdded: AddedToken list) =
        let vocabPath = Path.Combine(folder, "vocab.json")
        let mergesPath = Path.Combine(folder, "merges.txt")
        let vocabulary = readVocabulary vocabPath "" (readJson vocabPath)
        let merges = readMerges mergesPath
        let pattern = Regex(gpt2Pattern, RegexOptions.Compiled)
        byteLevelBpe mergesPath vocabulary merges configAdded pattern false false [ vocabPath; mergesPath ]

    /// A SentencePiece BPE from a serialized ModelProto (tokenizer.model's content); path names it in
    /// errors and template is what tokenizer.json's post-processor adds, if it was read from there.
    let private sentencePieceOf (path: string) (openModel: unit -> Stream) (added: AddedToken list) template : Loaded =
        let addedIds = Dictionary<string, int>(StringComparer.Ordinal)
        for token in added do
            addedIds[token.Content] <- token.Id
        let tokenizer =
            try
                use stream = openModel ()
                LlamaTokenizer.Create(stream, false, false, (if addedIds.Count = 0 then null else addedIds))
            with e ->
                InvalidInput.fail path "" (sprintf "not a SentencePiece BPE model (%s)" e.Message)
        let valid id = if id >= 0 then Some id else None
        let vocabSize =
            Seq.append tokenizer.Vocabulary.Values addedIds.Values |> Seq.fold max -1 |> (+) 1
        { Encode = fun text -> tokenizer.EncodeToIds(text, false, false, true, true)
          EncodeJoined =
            fun prompt answer ->
                let text = prompt + answer
                let mutable normalized = null
                let tokens = tokenizer.EncodeToTokens(text, &normalized, false, false, true, true)
                let boundary =
                    match normalized, tokenizer.Normalizer with
                    | null, _ | _, null -> prompt.Length
                    | normalized, normalizer -> commonPrefix (normalizer.Normalize prompt) normalized
                splitAt boundary tokens
          Template = template
          AddsBosByDefault = true
          Decode = fun ids -> tokenizer.Decode(ids, false)
          Lookup =
            fun token ->
                match addedIds.TryGetValue token with
                | true, id -> Some id
                | _ ->
                    match tokenizer.Vocabulary.TryGetValue token with
                    | true, id -> Some id
                    | _ -> None
          SpecialIds =
            (added |> List.filter (fun t -> t.Special) |> List.map (fun t -> t.Id))
            @ ([ tokenizer.BeginningOfSentenceId; tokenizer.EndOfSentenceId; tokenizer.UnknownId ] |> List.choose valid)
          ModelBos = valid tokenizer.BeginningOfSentenceId
          ModelEos = valid tokenizer.EndOfSentenceId
          VocabSize = vocabSize
          Files = [ path ] }

    let private fromSentencePiece (path: string) (added: AddedToken list) : Loaded =
        sentencePieceOf path (fun () -> File.OpenRead path :> Stream) added None

    /// Protocol-buffer writing, for the SentencePiece ModelProto built from a tokenizer.json.
    module private Proto =
        let private varint (w: Stream) (value: uint64) =
            let mutable v = value
            while v >= 0x80UL do
                w.WriteByte(byte (v &&& 0x7FUL ||| 0x80UL))
                v <- v >>> 7
            w.WriteByte(byte v)

        let private tag (w: Stream) (field: int) (wire: int) = varint w (uint64 ((field <<< 3) ||| wire))

        let bytes (w: Stream) field (value: byte[]) =
            tag w field 2
            varint w (uint64 value.Length)
            w.Write(value, 0, value.Length)

        let text (w: Stream) field (value: string) = bytes w field (Encoding.UTF8.GetBytes value)

        /// An int32 or enum field (negative values as 10-byte varints, as protobuf writes them).
        let int32 (w: Stream) field (value: int) =
            tag w field 0
            varint w (uint64 (int64 value))

        let float32 (w: Stream) field (value: float32) =
            tag w field 5
            w.Write(BitConverter.GetBytes value, 0, 4)

        let message (build: Stream -> unit) =
            use stream = new MemoryStream()
            build stream
            stream.ToArray()

    /// The SentencePiece model a SentencePiece-style tokenizer.json was converted from (HF's
    /// LlamaConverter run backwards): every vocabulary entry becomes a piece, in id order, scored by
    /// minus the rank of the merge that makes it (pieces no merge makes rank after every merge), so
    /// merging by score is merging by rank; `<0xXX>` pieces are byte pieces under byte fallback, the
    /// unknown token is the unknown piece and added tokens marked special are control pieces.
    /// `Prepend("▁")` / Metaspace prepending is the dummy prefix, `Replace(" ", "▁")` / Metaspace the
    /// whitespace escaping. Raises InvalidInputException for any other normalizer or pre-tokenizer.
    let private sentencePieceModelOf
        (path: string)
        (root: JsonElement)
        (model: JsonElement)
        (vocabulary: Dictionary<string, int>)
        (merges: string list)
        (added: AddedToken list)
        : byte[] =
        let mutable dummyPrefix = false
        let mutable escapeWhitespace = false
        for c in componentsOf root "normalizer" do
            match typeOf c with
            | "Sequence" -> ()
            | "Prepend" when stringField c "prepend" = Some "▁" -> dummyPrefix <- true
            | "Replace" when
                (field c "pattern" |> Option.bind (fun p -> stringField p "String")) = Some " "
                && stringField c "content" = Some "▁"
                ->
                escapeWhitespace <- true
            | other ->
                InvalidInput.fail path "normalizer"
                    (sprintf "a SentencePiece-style model supports only Prepend(\"▁\") and Replace(\" \", \"▁\") normalizers, found %s" other)
        for c in componentsOf root "pre_tokenizer" do
            match typeOf c with
            | "Sequence" -> ()
            | "Metaspace" when (stringField c "replacement" |> Option.defaultValue "▁") = "▁" ->
                escapeWhitespace <- true
                let scheme = stringField c "prepend_scheme" |> Option.defaultValue (if boolField c "add_prefix_space" true then "always" else "never")
                if scheme <> "never" then dummyPrefix <- true
            | other ->
                InvalidInput.fail path "pre_tokenizer"
                    (sprintf "a SentencePiece-style model supports only a Metaspace pre-tokenizer, found %s" other)
        let byteFallback = boolField model "byte_fallback" false
        let size = (vocabulary.Values |> Seq.fold max -1) + 1
        let pieces = Array.create size null
        for entry in vocabulary do
            pieces[entry.Value] <- entry.Key
        match pieces |> Array.tryFindIndex isNull with
        | Some id -> InvalidInput.fail path "model.vocab" (sprintf "the ids must be 0 to %d without gaps; id %d is missing" (size - 1) id)
        | None -> ()
        let rank = Dictionary<string, int>(StringComparer.Ordinal)
        merges
        |> List.iteri (fun i merge ->
            let made = merge.Replace(" ", "")
            if not (rank.ContainsKey made) then rank[made] <- i)
        let unknown = stringField model "unk_token"
        let control = added |> List.filter (fun t -> t.Special) |> List.map (fun t -> t.Content) |> set
        let idOf token = match vocabulary.TryGetValue(token: string) with | true, id -> id | _ -> -1
        let isByte (piece: string) = byteFallback && piece.Length = 6 && piece.StartsWith "<0x" && piece.EndsWith ">"
        let normal, unknownKind, controlKind, byteKind = 1, 2, 3, 6
        Proto.message (fun m ->
            pieces
            |> Array.iteri (fun id piece ->
                let kind =
                    if Some piece = unknown then unknownKind
                    elif control.Contains piece then controlKind
                    elif isByte piece then byteKind
                    else normal
                let score =
                    match rank.TryGetValue piece with
                    | true, r -> -(float32 r)
                    | _ when kind = normal -> -(float32 (merges.Length + id))
                    | _ -> 0.0f
                Proto.bytes m 1 (Proto.message (fun p ->
                    Proto.text p 1 piece
                    Proto.float32 p 2 score
                    Proto.int32 p 3 kind)))
            // TrainerSpec: model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids.
            Proto.bytes m 2 (Proto.message (fun t ->
                Proto.int32 t 3 2
                Proto.int32 t 4 size
                Proto.int32 t 35 (if byteFallback then 1 else 0)
                Proto.int32 t 40 (unknown |> Option.map idOf |> Option.defaultValue -1)
                Proto.int32 t 41 (idOf "<s>")
                Proto.int32 t 42 (idOf "</s>")
                Proto.int32 t 43 -1))
            // NormalizerSpec: identity, dummy prefix, keep extra whitespace, whitespace escaping.
            Proto.bytes m 3 (Proto.message (fun n ->
                Proto.text n 1 "identity"
                Proto.int32 n 3 (if dummyPrefix then 1 else 0)
                Proto.int32 n 4 0
                Proto.int32 n 5 (if escapeWhitespace then 1 else 0))))

    /// The special tokens a TemplateProcessing post-processor puts before and after `$A` in its
    /// "single" template: (adds bos, adds eos); None without one.
    let private templateOf (root: JsonElement) =
        componentsOf root "post_processor"
        |> List.tryPick (fun c ->
            match typeOf c, field c "single" with
            | "TemplateProcessing", Some single when single.ValueKind = JsonValueKind.Array ->
                let items = single.EnumerateArray() |> Array.ofSeq
                let isSpecial (item: JsonElement) = (field item "SpecialToken").IsSome
                Some(items.Length > 0 && isSpecial items[0], items.Length > 0 && isSpecial items[items.Length - 1])
            | _ -> None)

    /// Reads tokenizer.json: Ok with the tokenizer when it holds a byte-level BPE, or a SentencePiece-style
    /// BPE and there is no tokenizer.model (hasModelFile false); Error with the reason when it holds
    /// another kind of model (a tokenizer.model next to it may then be used instead).
    let private fromTokenizerJson (path: string) (hasModelFile: bool) (configAdded: AddedToken list) : Result<Loaded, string * string> =
        let root = readJsonObject path
        let model =
            match field root "model" with
            | Some model when model.ValueKind = JsonValueKind.Object -> model
            | _ -> InvalidInput.fail path "model" "expected the tokenizer model object"
        let modelType = typeOf model
        let preTokenizers = componentsOf root "pre_tokenizer"
        let byteLevel =
            Seq.append preTokenizers (componentsOf root "decoder") |> Seq.exists (fun c -> typeOf c = "ByteLevel")
        let vocabularyOf () =
            match field model "vocab" with
            | Some vocab -> readVocabulary path "model.vocab" vocab
            | None -> InvalidInput.fail path "model.vocab" "expected the vocabulary object"
        let mergesOf () =
            match field model "merges" with
            | None -> []
            | Some list when list.ValueKind = JsonValueKind.Array ->
                [ for i, merge in Seq.indexed (list.EnumerateArray()) do
                      match merge.ValueKind with
                      | JsonValueKind.String -> merge.GetString()
                      | JsonValueKind.Array when
                          merge.GetArrayLength() = 2
                          && merge.EnumerateArray() |> Seq.forall (fun p -> p.ValueKind = JsonValueKind.String)
                          ->
                          merge[0].GetString() + " " + merge[1].GetString()
                      | _ -> InvalidInput.fail path (sprintf "model.merges[%d]" i) "expected \"left right\" or [\"left\", \"right\"]" ]
            | Some _ -> InvalidInput.fail path "model.merges" "expected a list of merges"
        let added () = addedTokensOfTokenizerJson path root @ configAdded |> List.distinctBy (fun t -> t.Content)
        if modelType <> "BPE" then
            Error("model.type", sprintf "a %s model is not supported; %s" (if modelType = "" then "untyped" else modelType) expectedFiles)
        elif not byteLevel && hasModelFile then
            Error("pre_tokenizer", "a SentencePiece-style model is read from the tokenizer.model beside it")
        elif not byteLevel then
            let vocabulary = vocabularyOf ()
            let added = added ()
            let proto = sentencePieceModelOf path root model vocabulary (mergesOf ()) added
            Ok(sentencePieceOf path (fun () -> new MemoryStream(proto) :> Stream) added (templateOf root))
        else
            let vocabulary = vocabularyOf ()
            let merges = mergesOf ()
            let splitPattern =
                preTokenizers
                |> List.tryPick (fun c ->
                    if typeOf c = "Split" then field c "pattern" |> Option.bind (fun p -> stringField p "Regex") else None)
            let pattern =
                let source = splitPattern |> Option.defaultValue gpt2Pattern
                try
                    Regex(source, RegexOptions.Compiled)
                with :? ArgumentException as e ->
                    InvalidInput.fail path "pre_tokenizer" (sprintf "the Split pattern is not a .NET regular expression (%s)" e.Message)
            let addPrefixSpace =
                preTokenizers |> List.exists (fun c -> typeOf c = "ByteLevel" && boolField c "add_prefix_space" false)
            let normalizers = componentsOf root "normalizer" |> List.map typeOf |> List.filter ((<>) "Sequence")
            let normalizeNfc =
                match normalizers with
                | [] -> false
                | [ "NFC" ] -> true
                | other -> InvalidInput.fail path "normalizer" (sprintf "only no normalizer or NFC is supported, found %s" (String.Join(", ", other)))
            let loaded = byteLevelBpe path vocabulary merges (added ()) pattern addPrefixSpace normalizeNfc [ path ]
            Ok { loaded with Template = templateOf root }

    let private fingerprintOf (files: string list) (extra: string) =
        use hash = IncrementalHash.CreateHash HashAlgorithmName.SHA256
        let add (bytes: byte[]) = hash.AppendData bytes
        for file in files do
            let bytes = File.ReadAllBytes file
            add (Encoding.UTF8.GetBytes(sprintf "%s %d\n" (Path.GetFileName file) bytes.Length))
            add bytes
        add (Encoding.UTF8.GetBytes extra)
        Convert.ToHexString(hash.GetHashAndReset()).ToLowerInvariant().Substring(0, 32)

    let private specialText (special: SpecialTokens) =
        let show = Option.map string >> Option.defaultValue "none"
        sprintf "bos=%s eos=%s pad=%s" (show special.Bos) (show special.Eos) (show special.Pad)

    let private makeDecode (name: string) (vocabSize: int) (specialIds: HashSet<int>) (decode: int[] -> string) =
        fun (ids: int64[]) ->
            for id in ids do
                if id < 0L || id >= int64 vocabSize then
                    InvalidInput.fail name "" (sprintf "token id %d is outside the vocabulary [0, %d)" id vocabSize)
            ids |> Array.map int |> Array.filter (specialIds.Contains >> not) |> decode

    /// Loads the tokenizer of a Hugging Face model or tokenizer folder (see the module's summary for the
    /// files read and the precedence of special tokens). Raises InvalidInputException naming the folder or
    /// file at fault and what is expected.
    let fromFolder (folder: string) : TextTokenizer =
        InvalidInput.requireFolder folder "the tokenizer folder does not exist" "a model or tokenizer folder (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)"
        let file name = Path.Combine(folder, name)
        let optionalJson name =
            let path = file name
            if File.Exists path then Some(path, readJsonObject path) else None
        let tokenizerConfig = optionalJson "tokenizer_config.json"
        let specialTokensMap = optionalJson "special_tokens_map.json"
        let configAdded =
            tokenizerConfig |> Option.map (fun (path, root) -> addedTokensOfConfig path root) |> Option.defaultValue []
        let sentencePiece () = fromSentencePiece (file "tokenizer.model") configAdded
        let loaded =
            if File.Exists(file "tokenizer.json") then
                match fromTokenizerJson (file "tokenizer.json") (File.Exists(file "tokenizer.model")) configAdded with
                | Ok loaded -> loaded
                | Error _ when File.Exists(file "tokenizer.model") -> sentencePiece ()
                | Error(location, problem) -> InvalidInput.fail (file "tokenizer.json") location problem
            elif File.Exists(file "vocab.json") && File.Exists(file "merges.txt") then fromVocabAndMerges folder configAdded
            elif File.Exists(file "tokenizer.model") then sentencePiece ()
            else InvalidInput.fail folder "" (sprintf "no tokenizer files found; %s" expectedFiles)

        let tokenSources = List.choose id [ tokenizerConfig; specialTokensMap ]
        let idSources = List.choose id [ optionalJson "generation_config.json"; optionalJson "config.json" ]
        let tokenString path key (value: JsonElement) =
            match value.ValueKind with
            | JsonValueKind.String -> value.GetString()
            | JsonValueKind.Object when (stringField value "content").IsSome -> (stringField value "content").Value
            | _ ->
                let problem = sprintf "expected a token string or {\"content\": ...}, found %s" (value.GetRawText())
                InvalidInput.fail path key problem
        let resolve path key token =
            match loaded.Lookup token with
            | Some id -> id
            | None -> InvalidInput.fail path key (sprintf "the token '%s' is not in the tokenizer's vocabulary" token)
        let tokenIds key =
            tokenSources
            |> List.collect (fun (path, root) ->
                match field root key with
                | Some list when list.ValueKind = JsonValueKind.Array ->
                    [ for i, value in Seq.indexed (list.EnumerateArray()) ->
                          let location = sprintf "%s[%d]" key i
                          resolve path location (tokenString path location value) ]
                | Some value -> [ resolve path key (tokenString path key value) ]
                | None -> [])
        let fromTokenFiles key =
            tokenSources
            |> List.tryPick (fun (path, root) ->
                field root key |> Option.map (fun value -> resolve path key (tokenString path key value)))
            |> Option.map int64
        let fromIdFiles key =
            let read path (value: JsonElement) =
                match integer value with
                | Some id when id < 0L -> None
                | Some id when id < int64 loaded.VocabSize -> Some id
                | _ ->
                    let problem =
                        sprintf "expected a token id below the vocabulary size %d, found %s" loaded.VocabSize (value.GetRawText())
                    InvalidInput.fail path key problem
            idSources
            |> List.tryPick (fun (path, root) ->
                match field root key with
                | Some list when list.ValueKind = JsonValueKind.Array ->
                    if list.GetArrayLength() = 0 then None else read path list[0]
                | Some value -> read path value
                | None -> None)
        let pick tokenKey (modelId: int option) idKey =
            fromTokenFiles tokenKey
            |> Option.orElseWith (fun () -> modelId |> Option.map int64)
            |> Option.orElseWith (fun () -> fromIdFiles idKey)
        let bos = pick "bos_token" loaded.ModelBos "bos_token_id"
        let eos = pick "eos_token" loaded.ModelEos "eos_token_id"
        let pad = pick "pad_token" None "pad_token_id" |> Option.orElse eos
        let special = { Bos = bos; Eos = eos; Pad = pad }
        let configRule key =
            tokenizerConfig
            |> Option.bind (fun (_, root) ->
                match field root key with
                | Some v when v.ValueKind = JsonValueKind.True -> Some true
                | Some v when v.ValueKind = JsonValueKind.False -> Some false
                | _ -> None)
        let addsBos =
            configRule "add_bos_token"
            |> Option.orElse (loaded.Template |> Option.map fst)
            |> Option.defaultValue loaded.AddsBosByDefault
        let addsEos = configRule "add_eos_token" |> Option.orElse (loaded.Template |> Option.map snd) |> Option.defaultValue false
        let specialIds =
            HashSet<int>(
                [ yield! loaded.SpecialIds
                  yield! [ bos; eos; pad ] |> List.choose id |> List.map int
                  yield! tokenIds "unk_token"
                  yield! tokenIds "additional_special_tokens" ]
            )
        let extraFiles = [ tokenizerConfig; specialTokensMap ] |> List.choose (Option.map fst)
        { Name = folder
          Fingerprint = fingerprintOf (loaded.Files @ extraFiles) (specialText special)
          VocabSize = loaded.VocabSize
          Special = special
          AddsBos = addsBos && bos.IsSome
          AddsEos = addsEos && eos.IsSome
          Encode = fun text -> loaded.Encode text |> Seq.map int64 |> Array.ofSeq
          EncodeJoined =
            fun prompt answer ->
                let ids, promptTokens = loaded.EncodeJoined prompt answer
                { Ids = Array.map int64 ids; PromptTokens = promptTokens }
          Decode = makeDecode folder loaded.VocabSize specialIds loaded.Decode }

    /// A tiktoken encoding by name: "cl100k_base" (GPT-3.5/GPT-4) or "o200k_base" (GPT-4o), from the
    /// Microsoft.ML.Tokenizers.Data packages. Eos (and pad) is <|endoftext|>; there is no bos. Raises
    /// InvalidInputException (the setting tokenizer as origin) for other names, listing the known ones.
    let fromEncoding (name: string) : TextTokenizer =
        let known = knownEncodings |> List.tryFind (fun k -> String.Equals(k, name, StringComparison.OrdinalIgnoreCase))
        match known with
        | None ->
            let known = String.Join(", ", knownEncodings)
            InvalidInput.fail "{tokenizer}" "" (sprintf "unknown encoding '%s'; known encodings: %s" name known)
        | Some encoding ->
            let tokenizer = TiktokenTokenizer.CreateForEncoding encoding
            let specialIds = HashSet<int>(tokenizer.SpecialTokens.Values)
            let vocabSize = (Seq.max tokenizer.SpecialTokens.Values) + 1
            let eos = Some(int64 tokenizer.SpecialTokens["<|endoftext|>"])
            let special = { Bos = None; Eos = eos; Pad = eos }
            { Name = encoding
              Fingerprint = fingerprintOf [] (sprintf "tiktoken %s %s" encoding (specialText special))
              VocabSize = vocabSize
              Special = special
              AddsBos = false
              AddsEos = false
              Encode = fun text -> tokenizer.EncodeToIds text |> Seq.map int64 |> Array.ofSeq
              EncodeJoined =
                fun prompt answer ->
                    let mutable normalized = null
                    let ids, promptTokens = tokenizer.EncodeToTokens(prompt + answer, &normalized) |> splitAt prompt.Length
                    { Ids = Array.map int64 ids; PromptTokens = promptTokens }
              Decode = makeDecode encoding vocabSize specialIds (fun ids -> tokenizer.Decode ids) }
