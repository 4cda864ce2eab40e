namespace Functional.Text

open System
open System.Collections.Concurrent
open System.Collections.Generic
open System.Globalization
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open Functional

/// A token the tokenizer files add to the model's vocabulary, with HF's matching flags.
type internal HfAddedToken =
    { Content: string
      Id: int
      Special: bool
      SingleWord: bool
      LStrip: bool
      RStrip: bool
      Normalized: bool }

/// A BPE tokenizer.json run as Hugging Face's tokenizers library runs it (our own implementation, not
/// Microsoft.ML.Tokenizers): added tokens split out first (leftmost-longest, with lstrip / rstrip /
/// single_word, non-normalized ones on the raw text, normalized ones after normalization), then the
/// normalizers, the pre-tokenizers, the BPE model (ignore_merges, byte fallback, unk and fuse_unk, merges
/// by rank with ties taken left to right, as HF's merge queue does) and, for decoding, the decoders.
/// Every component type is read by name; one that is not implemented is refused at load, naming it.
[<RequireQualifiedAccess>]
module internal HfTokenizerJson =

    // ---- JSON helpers ----

    /// The value of an object's property; None when it is absent or null.
    let field (element: JsonElement) (name: string) =
        if element.ValueKind <> JsonValueKind.Object then None
        else
            match element.TryGetProperty name with
            | true, value when value.ValueKind <> JsonValueKind.Null -> Some value
            | _ -> None

    /// A string property; None when absent or of another kind.
    let stringField element name =
        match field element name with
        | Some v when v.ValueKind = JsonValueKind.String -> Some(v.GetString())
        | _ -> None

    /// A boolean property, or defaultValue when absent or of another kind.
    let boolField element name defaultValue =
        match field element name with
        | Some v when v.ValueKind = JsonValueKind.True -> true
        | Some v when v.ValueKind = JsonValueKind.False -> false
        | _ -> defaultValue

    let private intField element name defaultValue =
        match field element name with
        | Some v when v.ValueKind = JsonValueKind.Number -> v.GetInt32()
        | _ -> defaultValue

    let private typeOf (element: JsonElement) = stringField element "type" |> Option.defaultValue ""

    let private listField element name =
        match field element name with
        | Some list when list.ValueKind = JsonValueKind.Array -> List.ofSeq (list.EnumerateArray())
        | _ -> []

    // ---- Regular expressions over code points ----

    /// A BMP character of each general category that no real pattern names on its own, standing in for the
    /// characters outside the BMP while a pattern runs: .NET matches UTF-16 code units, so `\p{L}` misses a
    /// letter written as a surrogate pair; HF's regex engine matches code points.
    let private representative (category: UnicodeCategory) : char =
        match category with
        | UnicodeCategory.UppercaseLetter -> '\u13A0'
        | UnicodeCategory.LowercaseLetter -> '\uAB70'
        | UnicodeCategory.TitlecaseLetter -> '\u01C5'
        | UnicodeCategory.ModifierLetter -> '\uA015'
        | UnicodeCategory.OtherLetter -> '\uA000'
        | UnicodeCategory.NonSpacingMark -> '\u0F71'
        | UnicodeCategory.SpacingCombiningMark -> '\u0F7F'
        | UnicodeCategory.EnclosingMark -> '\u20DD'
        | UnicodeCategory.DecimalDigitNumber -> '\u07C0'
        | UnicodeCategory.LetterNumber -> '\u2160'
        | UnicodeCategory.OtherNumber -> '\u2460'
        | UnicodeCategory.MathSymbol -> '\u2A00'
        | UnicodeCategory.CurrencySymbol -> '\u20A0'
        | UnicodeCategory.ModifierSymbol -> '\uA700'
        | UnicodeCategory.OtherSymbol -> '\u2600'
        | UnicodeCategory.ConnectorPunctuation -> '\u2040'
        | UnicodeCategory.DashPunctuation -> '\u2E3A'
        | UnicodeCategory.OpenPunctuation -> '\u2E28'
        | UnicodeCategory.ClosePunctuation -> '\u2E29'
        | UnicodeCategory.InitialQuotePunctuation -> '\u2E02'
        | UnicodeCategory.FinalQuotePunctuation -> '\u2E03'
        | UnicodeCategory.OtherPunctuation -> '\u2E2E'
        | UnicodeCategory.Format -> '\u2060'
        | _ -> '\uE000'

    /// The matches (start, end) of pattern in text, in text's UTF-16 positions, with every code point
    /// outside the BMP seen by the pattern as one character of its general category.
    let private findMatches (pattern: Regex) (text: string) : (int * int) list =
        let hasSurrogates = text |> Seq.exists Char.IsSurrogate
        if not hasSurrogates then
            [ for m in pattern.Matches text -> m.Index, m.Index + m.Length ]
        else
            let view = StringBuilder(text.Length)
            let origin = ResizeArray<int>(text.Length + 1)
            let mutable i = 0
            while i < text.Length do
                origin.Add i
                if Char.IsHighSurrogate text[i] && i + 1 < text.Length && Char.IsLowSurrogate text[i + 1] then
                    view.Append(representative (CharUnicodeInfo.GetUnicodeCategory(Char.ConvertToUtf32(text[i], text[i + 1])))) |> ignore
                    i <- i + 2
                else
                    view.Append text[i] |> ignore
                    i <- i + 1
            origin.Add text.Length
            [ for m in pattern.Matches(view.ToString()) -> origin[m.Index], origin[m.Index + m.Length] ]

    // ---- Splitting (HF's SplitDelimiterBehavior) ----

    /// text cut at matches into pieces by HF's behaviour: Removed, Isolated, MergedWithPrevious,
    /// MergedWithNext or Contiguous; invert makes the gaps the delimiters. Empty pieces are dropped.
    let private splitBy (matches: string -> (int * int) list) (behavior: string) (invert: bool) (text: string) : string list =
        let marks =
            let result = ResizeArray<int * int * bool>()
            let mutable previous = 0
            for start, finish in matches text do
                if finish > start then
                    if start > previous then result.Add((previous, start, false))
                    result.Add((start, finish, true))
                    previous <- finish
            if previous < text.Length then result.Add((previous, text.Length, false))
            [ for s, e, m in result -> s, e, (if invert then not m else m) ]
        let merged =
            match behavior with
            | "Removed" -> marks |> List.filter (fun (_, _, m) -> not m) |> List.map (fun (s, e, _) -> s, e)
            | "Isolated" -> marks |> List.map (fun (s, e, _) -> s, e)
            | "MergedWithPrevious" ->
                let acc = ResizeArray<int * int>()
                let mutable previousMatch = false
                for s, e, m in marks do
                    if m && not previousMatch && acc.Count > 0 then
                        let ps, _ = acc[acc.Count - 1]
                        acc[acc.Count - 1] <- (ps, e)
                    else acc.Add((s, e))
                    previousMatch <- m
                List.ofSeq acc
            | "MergedWithNext" ->
                let acc = ResizeArray<int * int>()
                let mutable previousMatch = false
                for s, e, m in List.rev marks do
                    if m && not previousMatch && acc.Count > 0 then
                        let _, pe = acc[acc.Count - 1]
                        acc[acc.Count - 1] <- (s, pe)
                    else acc.Add((s, e))
                    previousMatch <- m
                acc |> Seq.rev |> List.ofSeq
            | "Contiguous" ->
                let acc = ResizeArray<int * int>()
                let mutable previousMatch = None
                for s, e, m in marks do
                    match previousMatch with
                    | Some p when p = m && acc.Count > 0 ->
                        let ps, _ = acc[acc.Count - 1]
                        acc[acc.Count - 1] <- (ps, e)
                    | _ -> acc.Add((s, e))
                    previousMatch <- Some m
                List.ofSeq acc
            | other -> invalidArg (nameof behavior) (sprintf "unknown split behavior %s" other)
        merged |> List.filter (fun (s, e) -> e > s) |> List.map (fun (s, e) -> text.Substring(s, e - s))

    /// The matches of a predicate on code points, as runs of one code point each.
    let private charMatches (predicate: string -> int -> bool) (text: string) =
        [ let mutable i = 0
          while i < text.Length do
              let width = if Char.IsSurrogatePair(text, i) then 2 else 1
              if predicate text i then yield i, i + width
              i <- i + width ]

    /// Rust's char::is_numeric (general categories Nd, Nl, No).
    let private isNumeric (text: string) (i: int) =
        match CharUnicodeInfo.GetUnicodeCategory(text, i) with
        | UnicodeCategory.DecimalDigitNumber
        | UnicodeCategory.LetterNumber
        | UnicodeCategory.OtherNumber -> true
        | _ -> false

    /// HF's is_punc: ASCII punctuation or a Unicode punctuation category.
    let private isPunctuation (text: string) (i: int) =
        let c = text[i]
        (c < '\u0080' && Char.IsPunctuation c || Char.IsSymbol c && c < '\u0080')
        || (match CharUnicodeInfo.GetUnicodeCategory(text, i) with
            | UnicodeCategory.ConnectorPunctuation
            | UnicodeCategory.DashPunctuation
            | UnicodeCategory.OpenPunctuation
            | UnicodeCategory.ClosePunctuation
            | UnicodeCategory.InitialQuotePunctuation
            | UnicodeCategory.FinalQuotePunctuation
            | UnicodeCategory.OtherPunctuation -> true
            | _ -> false)

    // ---- Byte level ----

    /// GPT-2's byte-to-unicode table (the character that stands for each byte in a byte-level vocabulary).
    let byteLevelAlphabet: char[] =
        let printable b = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)
        [| 0..255 |]
        |> Array.mapFold (fun next b -> if printable b then char b, next else char next, next + 1) 256
        |> fst

    let private byteOfChar =
        let table = Dictionary<char, byte>()
        byteLevelAlphabet |> Array.iteri (fun b c -> table[c] <- byte b)
        table

    let private toByteLevel (text: string) =
        let bytes = Encoding.UTF8.GetBytes text
        String(bytes |> Array.map (fun b -> byteLevelAlphabet[int b]))

    /// GPT-2's pre-tokenization pattern (ByteLevel's use_regex).
    let gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

    let private gpt2Regex = lazy (Regex(gpt2Pattern, RegexOptions.Compiled))

    // ---- Components ----

    /// A piece of text between added tokens on its way to the model: its text and whether it starts the
    /// input (Metaspace's prepend_scheme "first").
    type private Piece = { Text: string; First: bool }

    let private refuse (path: string) (location: string) (what: string) : 'T =
        InvalidInput.fail path location (sprintf "%s is not supported (a tokenizer this library cannot reproduce exactly is refused rather than approximated)" what)

    let private regexOf (path: string) (location: string) (pattern: JsonElement) : Regex =
        match stringField pattern "Regex", stringField pattern "String" with
        | Some source, _ ->
            try
                Regex(source, RegexOptions.Compiled)
            with :? ArgumentException as e ->
                InvalidInput.fail path location (sprintf "the pattern is not a .NET regular expression (%s)" e.Message)
        | None, Some literal -> Regex(Regex.Escape literal, RegexOptions.Compiled)
        | None, None -> InvalidInput.fail path location "expected a pattern {\"Regex\": ...} or {\"String\": ...}"

    let rec private normalizerOf (path: string) (location: string) (element: JsonElement) : string -> string =
        match typeOf element with
        | "Sequence" ->
            let parts = listField element "normalizers" |> List.mapi (fun i n -> normalizerOf path (sprintf "%s.normalizers[%d]" location i) n)
            fun text -> parts |> List.fold (fun t f -> f t) text
        | "NFC" -> fun t -> t.Normalize NormalizationForm.FormC
        | "NFD" -> fun t -> t.Normalize NormalizationForm.FormD
        | "NFKC" -> fun t -> t.Normalize NormalizationForm.FormKC
        | "NFKD" -> fun t -> t.Normalize NormalizationForm.FormKD
        | "Lowercase" -> fun t -> t.ToLowerInvariant()
        | "Strip" ->
            let left, right = boolField element "strip_left" true, boolField element "strip_right" true
            fun t ->
                let t = if left then t.TrimStart() else t
                if right then t.TrimEnd() else t
        | "StripAccents" ->
            fun t ->
                t.Normalize(NormalizationForm.FormD)
                |> String.filter (fun c -> CharUnicodeInfo.GetUnicodeCategory c <> UnicodeCategory.NonSpacingMark)
        | "Prepend" ->
            let prefix = stringField element "prepend" |> Option.defaultValue ""
            fun t -> if t.Length = 0 then t else prefix + t
        | "Replace" ->
            let content = stringField element "content" |> Option.defaultValue ""
            match field element "pattern" with
            | Some pattern ->
                match stringField pattern "String" with
                | Some literal -> fun t -> if literal = "" then t else t.Replace(literal, content)
                | None ->
                    let regex = regexOf path (location + ".pattern") pattern
                    fun t -> regex.Replace(t, content.Replace("$", "$$"))
            | None -> InvalidInput.fail path (location + ".pattern") "expected the pattern to replace"
        | other -> refuse path location (sprintf "the normalizer %s" (if other = "" then "(untyped)" else other))

    /// A Metaspace's replacement and prepend scheme (always, first or never; older files say
    /// add_prefix_space).
    let private metaspaceOf (element: JsonElement) =
        let replacement = stringField element "replacement" |> Option.defaultValue "▁"
        let scheme =
            match stringField element "prepend_scheme" with
            | Some scheme -> scheme
            | None -> if boolField element "add_prefix_space" true then "always" else "never"
        replacement, scheme

    let rec private preTokenizerOf (path: string) (location: string) (element: JsonElement) : Piece list -> Piece list =
        let each (split: Piece -> string list) =
            fun (pieces: Piece list) ->
                pieces
                |> List.collect (fun piece -> split piece |> List.mapi (fun i text -> { Text = text; First = piece.First && i = 0 }))
        match typeOf element with
        | "Sequence" ->
            let parts = listField element "pretokenizers" |> List.mapi (fun i p -> preTokenizerOf path (sprintf "%s.pretokenizers[%d]" location i) p)
            fun pieces -> parts |> List.fold (fun ps f -> f ps) pieces
        | "Split" ->
            let regex =
                match field element "pattern" with
                | Some pattern -> regexOf path (location + ".pattern") pattern
                | None -> InvalidInput.fail path (location + ".pattern") "expected the pattern to split on"
            let behavior = stringField element "behavior" |> Option.defaultValue "Isolated"
            if not (List.contains behavior [ "Removed"; "Isolated"; "MergedWithPrevious"; "MergedWithNext"; "Contiguous" ]) then
                refuse path (location + ".behavior") (sprintf "the split behavior %s" behavior)
            let invert = boolField element "invert" false
            each (fun p -> splitBy (findMatches regex) behavior invert p.Text)
        | "ByteLevel" ->
            let addPrefixSpace = boolField element "add_prefix_space" false
            let useRegex = boolField element "use_regex" true
            fun pieces ->
                pieces
                |> List.collect (fun piece ->
                    let text = if addPrefixSpace && not (piece.Text.StartsWith " ") then " " + piece.Text else piece.Text
                    let parts = if useRegex then splitBy (findMatches gpt2Regex.Value) "Isolated" false text else [ text ]
                    parts |> List.mapi (fun i t -> { Text = toByteLevel t; First = piece.First && i = 0 }))
        | "Metaspace" ->
            let replacement, scheme = metaspaceOf element
            let split = boolField element "split" true
            let splitter = Regex(Regex.Escape replacement, RegexOptions.Compiled)
            fun pieces ->
                pieces
                |> List.collect (fun piece ->
                    let text = piece.Text.Replace(" ", replacement)
                    let text =
                        match scheme with
                        | "always" when not (text.StartsWith replacement) -> replacement + text
                        | "first" when piece.First && not (text.StartsWith replacement) -> replacement + text
                        | _ -> text
                    let parts = if split then splitBy (findMatches splitter) "MergedWithNext" false text else [ text ]
                    parts |> List.mapi (fun i t -> { Text = t; First = piece.First && i = 0 }))
        | "Digits" ->
            let behavior = if boolField element "individual_digits" false then "Isolated" else "Contiguous"
            each (fun p -> splitBy (charMatches isNumeric) behavior false p.Text)
        | "Punctuation" ->
            let behavior = stringField element "behavior" |> Option.defaultValue "Isolated"
            each (fun p -> splitBy (charMatches isPunctuation) behavior false p.Text)
        | "Whitespace" ->
            let regex = Regex(@"\w+|[^\w\s]+", RegexOptions.Compiled)
            each (fun p -> splitBy (findMatches regex) "Removed" true p.Text)
        | "WhitespaceSplit" ->
            each (fun p -> splitBy (charMatches (fun t i -> Char.IsWhiteSpace(t, i))) "Removed" false p.Text)
        | other -> refuse path location (sprintf "the pre-tokenizer %s" (if other = "" then "(untyped)" else other))

    /// A decoder: HF's decode_chain over the tokens (added is whether a token is an added token).
    let rec private decoderOf (path: string) (location: string) (element: JsonElement) : (string * bool) list -> (string * bool) list =
        match typeOf element with
        | "Sequence" ->
            let parts = listField element "decoders" |> List.mapi (fun i d -> decoderOf path (sprintf "%s.decoders[%d]" location i) d)
            fun tokens -> parts |> List.fold (fun ts f -> f ts) tokens
        | "ByteLevel" ->
            // Added tokens are kept as they are written; runs of other tokens become their bytes, read as UTF-8.
            fun tokens ->
                let result = ResizeArray<string * bool>()
                let bytes = ResizeArray<byte>()
                let flush () =
                    if bytes.Count > 0 then
                        result.Add((Encoding.UTF8.GetString(bytes.ToArray()), false))
                        bytes.Clear()
                for token, added in tokens do
                    if added then
                        flush ()
                        result.Add((token, true))
                    else
                        for c in token do
                            match byteOfChar.TryGetValue c with
                            | true, b -> bytes.Add b
                            | _ -> bytes.AddRange(Encoding.UTF8.GetBytes(string c))
                flush ()
                List.ofSeq result
        | "Metaspace" ->
            let replacement, scheme = metaspaceOf element
            fun tokens ->
                tokens
                |> List.mapi (fun i (token, added) ->
                    let text = token.Replace(replacement, " ")
                    (if i = 0 && scheme <> "never" && text.StartsWith " " then text.Substring 1 else text), added)
        | "Replace" ->
            let content = stringField element "content" |> Option.defaultValue ""
            match field element "pattern" |> Option.bind (fun p -> stringField p "String") with
            | Some literal -> fun tokens -> tokens |> List.map (fun (t, a) -> (if literal = "" then t else t.Replace(literal, content)), a)
            | None ->
                let regex =
                    match field element "pattern" with
                    | Some pattern -> regexOf path (location + ".pattern") pattern
                    | None -> InvalidInput.fail path (location + ".pattern") "expected the pattern to replace"
                fun tokens -> tokens |> List.map (fun (t, a) -> regex.Replace(t, content.Replace("$", "$$")), a)
        | "ByteFallback" ->
            fun tokens ->
                let result = ResizeArray<string * bool>()
                let bytes = ResizeArray<byte>()
                let flush () =
                    if bytes.Count > 0 then
                        let array = bytes.ToArray()
                        let strict = UTF8Encoding(false, true)
                        let text =
                            try strict.GetString array
                            with :? DecoderFallbackException -> String.replicate array.Length "\uFFFD"
                        result.Add((text, false))
                        bytes.Clear()
                let isByte (t: string) = t.Length = 6 && t.StartsWith "<0x" && t.EndsWith ">"
                for token, added in tokens do
                    match (if isByte token then Byte.TryParse(token.Substring(3, 2), NumberStyles.HexNumber, CultureInfo.InvariantCulture) else (false, 0uy)) with
                    | true, b -> bytes.Add b
                    | _ ->
                        flush ()
                        result.Add((token, added))
                flush ()
                List.ofSeq result
        | "Fuse" -> fun tokens -> [ String.Join("", tokens |> List.map fst), false ]
        | "Strip" ->
            let content = (stringField element "content" |> Option.defaultValue " ")
            let start, stop = intField element "start" 0, intField element "stop" 0
            fun tokens ->
                tokens
                |> List.map (fun (token, added) ->
                    let mutable t = token
                    let mutable n = 0
                    while n < start && t.StartsWith content do
                        t <- t.Substring content.Length
                        n <- n + 1
                    n <- 0
                    while n < stop && t.EndsWith content do
                        t <- t.Substring(0, t.Length - content.Length)
                        n <- n + 1
                    t, added)
        | other -> refuse path location (sprintf "the decoder %s" (if other = "" then "(untyped)" else other))

    /// HF's clean_up_tokenization: spaces before punctuation and English contractions removed.
    let cleanUpTokenization (text: string) =
        text.Replace(" .", ".").Replace(" ?", "?").Replace(" !", "!").Replace(" ,", ",").Replace(" ' ", "'")
            .Replace(" n't", "n't").Replace(" 'm", "'m").Replace(" 's", "'s").Replace(" 've", "'ve").Replace(" 're", "'re")

    // ---- The BPE model ----

    /// The BPE model of tokenizer.json: a word (one pre-token) to ids.
    type private Bpe =
        { Vocabulary: Dictionary<string, int>
          /// (left id, right id) to (rank, merged id).
          Merges: Dictionary<struct (int * int), struct (int * int)>
          IgnoreMerges: bool
          ByteFallback: bool
          Unknown: int option
          FuseUnknown: bool
          Cache: ConcurrentDictionary<string, int[]> }

    let private bpeWord (bpe: Bpe) (word: string) : int[] =
        match bpe.Cache.TryGetValue word with
        | true, ids -> ids
        | _ ->
            let ids =
                match (if bpe.IgnoreMerges then bpe.Vocabulary.TryGetValue word else (false, 0)) with
                | true, id -> [| id |]
                | _ ->
                    let symbols = ResizeArray<int>()
                    let mutable lastUnknown = false
                    let mutable i = 0
                    while i < word.Length do
                        let width = if Char.IsSurrogatePair(word, i) then 2 else 1
                        let c = word.Substring(i, width)
                        match bpe.Vocabulary.TryGetValue c with
                        | true, id ->
                            symbols.Add id
                            lastUnknown <- false
                        | _ ->
                            let bytes = Encoding.UTF8.GetBytes c |> Array.map (fun b -> sprintf "<0x%02X>" b)
                            if bpe.ByteFallback && bytes |> Array.forall bpe.Vocabulary.ContainsKey then
                                for b in bytes do symbols.Add bpe.Vocabulary[b]
                                lastUnknown <- false
                            else
                                match bpe.Unknown with
                                | Some unk ->
                                    if not (bpe.FuseUnknown && lastUnknown) then symbols.Add unk
                                    lastUnknown <- true
                                | None -> ()
                        i <- i + width
                    // Merge the adjacent pair of lowest rank, the leftmost among equals, until none merges.
                    let mutable merging = true
                    while merging && symbols.Count > 1 do
                        let mutable best = -1
                        let mutable bestRank = Int32.MaxValue
                        let mutable bestId = 0
                        for k in 0 .. symbols.Count - 2 do
                            match bpe.Merges.TryGetValue(struct (symbols[k], symbols[k + 1])) with
                            | true, struct (rank, id) when rank < bestRank ->
                                best <- k
                                bestRank <- rank
                                bestId <- id
                            | _ -> ()
                        if best < 0 then merging <- false
                        else
                            symbols[best] <- bestId
                            symbols.RemoveAt(best + 1)
                    symbols.ToArray()
            if bpe.Cache.Count < 200000 then bpe.Cache[word] <- ids
            ids

    // ---- The tokenizer ----

    /// A loaded tokenizer.json.
    [<NoEquality; NoComparison>]
    type Loaded =
        { /// The ids of text, no special tokens added.
          Encode: string -> int[]
          /// The text of ids, as HF's decode (skip_special_tokens is the caller's: it passes the ids to keep).
          Decode: int[] -> string
          /// A token string (added tokens first, then the vocabulary) to its id.
          Lookup: string -> int option
          /// The added tokens.
          Added: HfAddedToken list
          /// One past the largest id.
          VocabSize: int }

    /// The added tokens of tokenizer.json's `added_tokens` (HF's flags; absent ones false, normalized
    /// true unless the token is special).
    let addedTokensOf (path: string) (root: JsonElement) : HfAddedToken list =
        [ for i, entry in List.indexed (listField root "added_tokens") do
              let location = sprintf "added_tokens[%d]" i
              match stringField entry "content", field entry "id" with
              | Some content, Some id when id.ValueKind = JsonValueKind.Number && id.GetInt64() >= 0L && id.GetInt64() <= int64 Int32.MaxValue ->
                  let special = boolField entry "special" false
                  { Content = content
                    Id = int (id.GetInt64())
                    Special = special
                    SingleWord = boolField entry "single_word" false
                    LStrip = boolField entry "lstrip" false
                    RStrip = boolField entry "rstrip" false
                    Normalized = boolField entry "normalized" (not special) }
              | _ -> InvalidInput.fail path location "expected an object with \"id\" (an integer) and \"content\" (a string)" ]

    /// Splits text around the added tokens (leftmost, longest first): Choice1Of2 text between them,
    /// Choice2Of2 the id of an added token (lstrip / rstrip take the whitespace beside it along).
    let private splitAdded (tokens: HfAddedToken list) : string -> Choice<string, int> list =
        let ordered = tokens |> List.sortByDescending (fun t -> t.Content.Length)
        let pattern = Regex(String.Join("|", ordered |> List.map (fun t -> Regex.Escape t.Content)), RegexOptions.Compiled)
        let byContent = dict [ for t in tokens -> t.Content, t ]
        fun text ->
            if tokens.IsEmpty || text.Length = 0 then [ Choice1Of2 text ]
            else
                let isWord (i: int) = i >= 0 && i < text.Length && (Char.IsLetterOrDigit text[i] || text[i] = '_')
                let result = ResizeArray<Choice<string, int>>()
                let mutable previous = 0
                let mutable m = pattern.Match(text)
                while m.Success do
                    let token = byContent[m.Value]
                    let accepted = not token.SingleWord || (not (isWord (m.Index - 1)) && not (isWord (m.Index + m.Length)))
                    if accepted && m.Index >= previous then
                        let mutable start = m.Index
                        let mutable finish = m.Index + m.Length
                        if token.LStrip then
                            while start > previous && Char.IsWhiteSpace text[start - 1] do start <- start - 1
                        if token.RStrip then
                            while finish < text.Length && Char.IsWhiteSpace text[finish] do finish <- finish + 1
                        if start > previous then result.Add(Choice1Of2(text.Substring(previous, start - previous)))
                        result.Add(Choice2Of2 token.Id)
                        previous <- finish
                    m <- if accepted then pattern.Match(text, max previous (m.Index + 1)) else pattern.Match(text, m.Index + 1)
                if previous < text.Length then result.Add(Choice1Of2(text.Substring previous))
                List.ofSeq result

    /// Reads a BPE tokenizer.json (root) with extra added tokens (tokenizer_config.json's, by content).
    /// Raises InvalidInputException naming path and the component it cannot reproduce.
    let load (path: string) (root: JsonElement) (vocabulary: Dictionary<string, int>) (merges: string list) (extraAdded: HfAddedToken list) : Loaded =
        let model = field root "model" |> Option.defaultWith (fun () -> InvalidInput.fail path "model" "expected the tokenizer model object")
        for name in [ "continuing_subword_prefix"; "end_of_word_suffix" ] do
            match stringField model name with
            | Some value when value <> "" -> refuse path ("model." + name) (sprintf "BPE's %s" name)
            | _ -> ()
        match field model "dropout" with
        | Some d when d.ValueKind = JsonValueKind.Number && d.GetDouble() > 0.0 -> refuse path "model.dropout" "BPE dropout"
        | _ -> ()
        let added =
            let own = addedTokensOf path root
            own @ (extraAdded |> List.filter (fun t -> own |> List.forall (fun o -> o.Content <> t.Content)))
        let idToToken = Dictionary<int, string>()
        for KeyValue(token, id) in vocabulary do idToToken[id] <- token
        for t in added do idToToken[t.Id] <- t.Content
        let addedIds = HashSet<int>(added |> List.map (fun t -> t.Id))
        let mergeTable = Dictionary<struct (int * int), struct (int * int)>()
        merges
        |> List.iteri (fun rank merge ->
            let space = merge.IndexOf ' '
            let left, right = merge.Substring(0, space), merge.Substring(space + 1)
            match vocabulary.TryGetValue left, vocabulary.TryGetValue right, vocabulary.TryGetValue(left + right) with
            | (true, l), (true, r), (true, m) ->
                if not (mergeTable.ContainsKey(struct (l, r))) then mergeTable[struct (l, r)] <- struct (rank, m)
            | _ -> InvalidInput.fail path (sprintf "model.merges[%d]" rank) (sprintf "the merge \"%s\" names tokens that are not in the vocabulary" merge))
        let bpe =
            { Vocabulary = vocabulary
              Merges = mergeTable
              IgnoreMerges = boolField model "ignore_merges" false
              ByteFallback = boolField model "byte_fallback" false
              Unknown = stringField model "unk_token" |> Option.bind (fun u -> match vocabulary.TryGetValue u with | true, id -> Some id | _ -> None)
              FuseUnknown = boolField model "fuse_unk" false
              Cache = ConcurrentDictionary<string, int[]>() }
        let normalize = match field root "normalizer" with Some n -> normalizerOf path "normalizer" n | None -> id
        let preTokenize = match field root "pre_tokenizer" with Some p -> preTokenizerOf path "pre_tokenizer" p | None -> id
        let decode = match field root "decoder" with Some d -> decoderOf path "decoder" d | None -> (fun tokens -> [ String.Join(" ", tokens |> List.map fst), false ])
        let raw = splitAdded (added |> List.filter (fun t -> not t.Normalized))
        let normalized = splitAdded (added |> List.filter (fun t -> t.Normalized))
        let encodeText (text: string) (first: bool) : int[] =
            let pieces = preTokenize [ { Text = text; First = first } ]
            pieces |> List.toArray |> Array.collect (fun p -> bpeWord bpe p.Text)
        let encode (text: string) : int[] =
            let ids = ResizeArray<int>()
            let mutable atStart = true
            for part in raw text do
                match part with
                | Choice2Of2 id ->
                    ids.Add id
                    atStart <- false
                | Choice1Of2 segment ->
                    let normalizedSegment = normalize segment
                    for inner in normalized normalizedSegment do
                        match inner with
                        | Choice2Of2 id -> ids.Add id
                        | Choice1Of2 piece -> ids.AddRange(encodeText piece atStart)
                        atStart <- false
            ids.ToArray()
        let decodeIds (ids: int[]) : string =
            let tokens = [ for id in ids -> (match idToToken.TryGetValue id with | true, t -> t | _ -> ""), addedIds.Contains id ]
            String.Join("", decode tokens |> List.map fst)
        { Encode = encode
          Decode = decodeIds
          Lookup =
            fun token ->
                match added |> List.tryFind (fun t -> t.Content = token) with
                | Some t -> Some t.Id
                | None ->
                    match vocabulary.TryGetValue token with
                    | true, id -> Some id
                    | _ -> None
          Added = added
          VocabSize = (Seq.append vocabulary.Values (added |> Seq.map (fun t -> t.Id)) |> Seq.fold max -1) + 1 }
