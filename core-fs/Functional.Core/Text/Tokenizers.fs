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

/// Tokenizers from Hugging Face model folders and tiktoken encoding names: tokenizer.json by our own
/// implementation of HF's pipeline (HfTokenizerJson), the other files by Microsoft.ML.Tokenizers
/// (BpeTokenizer, LlamaTokenizer, TiktokenTokenizer).
///
/// A model folder is read the way HF's fast tokenizers read it: `tokenizer.json` first (a BPE model,
/// byte-level or SentencePiece-style; its TemplateProcessing's special tokens give bos and eos when no
/// config names them), then `vocab.json` + `merges.txt` (GPT-2 byte-level BPE), then
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
/// EncodeJoined tokenizes prompt + answer as one string and counts the prompt's tokens: from the
/// tokenizer's character offsets, or for tokenizer.json the longest run of leading tokens whose decoded
/// text is no longer than the prompt. The tokenizer's own bos/eos rule (AddsBos, AddsEos) is HF's:
/// `tokenizer_config.json`'s `add_bos_token` / `add_eos_token` when present, else the special tokens
/// around `$A` in `tokenizer.json`'s TemplateProcessing post-processor, else bos for a
/// `tokenizer.model` (HF's LlamaTokenizer default) and nothing for byte-level BPE and tiktoken.
/// Decode leaves out special tokens (added tokens marked special, the bos/eos/pad/unk tokens and
/// `additional_special_tokens`), as HF's `decode(ids, skip_special_tokens=True)`, and cleans up the spaces
/// before punctuation and contractions as HF does unless `tokenizer_config.json` sets
/// `clean_up_tokenization_spaces` to false (HF's default is true).
///
/// tokenizer.json (a BPE model, byte-level or SentencePiece-style) is run by our own implementation of HF's
/// pipeline (HfTokenizerJson): added tokens (special or not, lstrip/rstrip/single_word/normalized),
/// normalizer and pre-tokenizer sequences (NFC/NFD/NFKC/NFKD, Lowercase, Strip, StripAccents, Prepend,
/// Replace; Split with every behavior and invert, ByteLevel, Metaspace, Digits, Punctuation, Whitespace,
/// WhitespaceSplit), BPE with ignore_merges, byte fallback and unk, merges taken by rank and left to right
/// among equals (HF's order; Microsoft.ML.Tokenizers' SentencePiece BPE takes equal scores right to left),
/// and the decoders (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip). Patterns see characters
/// outside the BMP as one character of their category, as HF's regex engine does. A component it does not
/// implement is refused at load, naming it. Microsoft.ML.Tokenizers still reads vocab.json + merges.txt,
/// tokenizer.model and the tiktoken encodings.
[<RequireQualifiedAccess>]
module Tokenizers =

    /// GPT-2's pre-tokenization pattern: contractions, letters, digits and other symbols, each with an
    /// optional leading space, and runs of whitespace.
    let gpt2Pattern = HfTokenizerJson.gpt2Pattern

    /// GPT-2's byte-to-unicode table (`bytes_to_unicode` in openai/gpt-2's encoder.py): the character
    /// that stands for each byte in a byte-level vocabulary. Printable Latin-1 bytes stand for
    /// themselves; the others map in order to U+0100 and up (the space byte 0x20 becomes 'Ġ').
    let byteLevelAlphabet: char[] = HfTokenizerJson.byteLevelAlphabet

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

    let private field = HfTokenizerJson.field
    let private stringField = HfTokenizerJson.stringField
    let private boolField = HfTokenizerJson.boolField

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

    /// A SentencePiece BPE from tokenizer.model (a serialized ModelProto).
    let private fromSentencePiece (path: string) (added: AddedToken list) : Loaded =
        let openModel () = File.OpenRead path :> Stream
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
          Template = None
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

    /// tokenizer.json's TemplateProcessing post-processor and the items of its "single" template.
    let private templateItems (root: JsonElement) =
        componentsOf root "post_processor"
        |> List.tryPick (fun c ->
            match typeOf c, field c "single" with
            | "TemplateProcessing", Some single when single.ValueKind = JsonValueKind.Array && single.GetArrayLength() > 0 ->
                Some(c, single.EnumerateArray() |> Array.ofSeq)
            | _ -> None)

    /// Whether the "single" template puts a special token before and after `$A`: (adds bos, adds eos); None
    /// without a TemplateProcessing post-processor.
    let private templateOf (root: JsonElement) =
        templateItems root
        |> Option.map (fun (_, items) ->
            let isSpecial (item: JsonElement) = (field item "SpecialToken").IsSome
            isSpecial items[0], isSpecial items[items.Length - 1])

    /// The ids of the special tokens the "single" template puts before and after `$A` (resolved through the
    /// post-processor's "special_tokens"): (bos, eos).
    let private templateTokensOf (root: JsonElement) =
        match templateItems root with
        | None -> None, None
        | Some(processor, items) ->
            let idOf (item: JsonElement) =
                field item "SpecialToken"
                |> Option.bind (fun t -> stringField t "id")
                |> Option.bind (fun name -> field processor "special_tokens" |> Option.bind (fun tokens -> field tokens name))
                |> Option.bind (fun token -> field token "ids")
                |> Option.bind (fun ids -> if ids.ValueKind = JsonValueKind.Array && ids.GetArrayLength() > 0 then integer ids[0] else None)
                |> Option.map int
            idOf items[0], idOf items[items.Length - 1]

    /// Reads tokenizer.json: Ok with the tokenizer when it holds a BPE model (byte-level or SentencePiece-style,
    /// run by HfTokenizerJson as HF's tokenizers library runs it); Error with the reason when it holds another
    /// kind of model (a tokenizer.model next to it may then be used instead).
    let private fromTokenizerJson (path: string) (configAdded: AddedToken list) : Result<Loaded, string * string> =
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
        if modelType <> "BPE" then
            Error("model.type", sprintf "a %s model is not supported; %s" (if modelType = "" then "untyped" else modelType) expectedFiles)
        else
            let vocabulary = vocabularyOf ()
            let extra =
                [ for t in configAdded ->
                      { HfAddedToken.Content = t.Content; Id = t.Id; Special = t.Special; SingleWord = false; LStrip = false; RStrip = false; Normalized = not t.Special } ]
            let hf = HfTokenizerJson.load path root vocabulary (mergesOf ()) extra
            let specialIds = hf.Added |> List.filter (fun t -> t.Special) |> List.map (fun t -> t.Id)
            let special = HashSet<int>(specialIds)
            let decodeKept (ids: int[]) = ids |> Array.filter (special.Contains >> not) |> hf.Decode
            Ok
                { Encode = fun text -> hf.Encode text :> IReadOnlyList<int>
                  EncodeJoined =
                    fun prompt answer ->
                        // The prompt's tokens: the longest run of leading tokens whose text is no longer than the
                        // prompt (a token across the boundary belongs to the answer).
                        let ids = hf.Encode(prompt + answer)
                        let fits k = (decodeKept ids[0 .. k - 1]).Length <= prompt.Length
                        let mutable low, high = 0, ids.Length
                        while low < high do
                            let middle = (low + high + 1) / 2
                            if fits middle then low <- middle else high <- middle - 1
                        ids, low
                  Template = templateOf root
                  AddsBosByDefault = not byteLevel
                  Decode = hf.Decode
                  Lookup = hf.Lookup
                  SpecialIds = specialIds
                  ModelBos = fst (templateTokensOf root)
                  ModelEos = snd (templateTokensOf root)
                  VocabSize = hf.VocabSize
                  Files = [ path ] }

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
                match fromTokenizerJson (file "tokenizer.json") configAdded with
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
          Decode =
            // HF's decode cleans up spaces before punctuation unless the config turns it off (default on).
            let cleanUp = configRule "clean_up_tokenization_spaces" |> Option.defaultValue true
            let decode = makeDecode folder loaded.VocabSize specialIds loaded.Decode
            if cleanUp then decode >> HfTokenizerJson.cleanUpTokenization else decode }

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
