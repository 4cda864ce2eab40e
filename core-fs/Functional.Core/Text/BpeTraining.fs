namespace Functional.Text

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Encodings.Web
open System.Text.Json
open System.Text.RegularExpressions
open Functional

/// A byte-level BPE vocabulary as BpeTraining learns it.
type BpeVocabulary =
    { /// Token strings in id order, written with GPT-2's byte-to-unicode characters
      /// (Tokenizers.byteLevelAlphabet): the 256 byte symbols (id = byte value), the merged tokens in the
      /// order learned, and last BpeTraining.endOfText.
      Tokens: string list
      /// The merges in the order learned (the order an encoder applies them).
      Merges: (string * string) list }

/// A small, deterministic byte-level BPE trainer (GPT-2 style), for models trained from scratch.
/// Texts are split with GPT-2's pre-tokenization pattern, each piece becomes its UTF-8 bytes, and the
/// most frequent adjacent pair of symbols (counted over all pieces) is merged, again and again. Ties go
/// to the pair with the smaller left id, then the smaller right id, so the same texts always give the
/// same vocabulary. The result is written as HF's GPT-2 tokenizer files, which Tokenizers.fromFolder
/// (and HF's GPT2Tokenizer) load.
[<RequireQualifiedAccess>]
module BpeTraining =

    /// The one special token of a trained vocabulary, used as bos, eos, pad and unk (its id is the last).
    let endOfText = "<|endoftext|>"

    /// Learns up to `merges` merges from the texts (fewer when every piece is a single token). Raises
    /// InvalidInputException (origin "merges") for a negative number of merges.
    let train (texts: string seq) (merges: int) : BpeVocabulary =
        if merges < 0 then InvalidInput.setting "merges" (sprintf "expected a number of merges >= 0, found %d" merges)
        let pattern = Regex(Tokenizers.gpt2Pattern)
        let pieceCounts = Dictionary<string, int64>(StringComparer.Ordinal)
        for text in texts do
            for m in pattern.Matches text do
                pieceCounts[m.Value] <- (match pieceCounts.TryGetValue m.Value with
                                         | true, count -> count
                                         | _ -> 0L) + 1L
        // Each distinct piece as a list of symbol ids, starting from its bytes, in ordinal order.
        let pieces =
            pieceCounts
            |> Seq.sortWith (fun a b -> String.CompareOrdinal(a.Key, b.Key))
            |> Seq.map (fun kv -> ResizeArray(Encoding.UTF8.GetBytes kv.Key |> Array.map int), kv.Value)
            |> Array.ofSeq
        let symbols = ResizeArray(Tokenizers.byteLevelAlphabet |> Array.map string)
        let ids = Dictionary<string, int>(StringComparer.Ordinal)
        symbols |> Seq.iteri (fun id symbol -> ids[symbol] <- id)
        let learned = ResizeArray<string * string>()
        let mutable exhausted = false
        while learned.Count < merges && not exhausted do
            let pairCounts = Dictionary<struct (int * int), int64>()
            for symbolIds, count in pieces do
                for i in 0 .. symbolIds.Count - 2 do
                    let pair = struct (symbolIds[i], symbolIds[i + 1])
                    pairCounts[pair] <- (match pairCounts.TryGetValue pair with
                                         | true, c -> c
                                         | _ -> 0L) + count
            if pairCounts.Count = 0 then
                exhausted <- true
            else
                let better (KeyValue(struct (l1, r1), c1)) (KeyValue(struct (l2, r2), c2)) =
                    c1 > c2 || (c1 = c2 && (l1 < l2 || (l1 = l2 && r1 < r2)))
                let (KeyValue(struct (left, right), _)) =
                    pairCounts |> Seq.reduce (fun best candidate -> if better candidate best then candidate else best)
                let merged = symbols[left] + symbols[right]
                let mergedId =
                    match ids.TryGetValue merged with
                    | true, id -> id
                    | _ ->
                        symbols.Add merged
                        ids[merged] <- symbols.Count - 1
                        symbols.Count - 1
                learned.Add((symbols[left], symbols[right]))
                for symbolIds, _ in pieces do
                    let mutable i = 0
                    while i < symbolIds.Count - 1 do
                        if symbolIds[i] = left && symbolIds[i + 1] = right then
                            symbolIds[i] <- mergedId
                            symbolIds.RemoveAt(i + 1)
                        i <- i + 1
        { Tokens = List.ofSeq symbols @ [ endOfText ]
          Merges = List.ofSeq learned }

    let private writeJson (path: string) (write: Utf8JsonWriter -> unit) =
        use stream = File.Create path
        let options = JsonWriterOptions(Indented = true, NewLine = "\n", Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping)
        (use writer = new Utf8JsonWriter(stream, options)
         write writer)
        stream.WriteByte(byte '\n')

    let private writeSpecialTokens (writer: Utf8JsonWriter) =
        for key in [ "bos_token"; "eos_token"; "pad_token"; "unk_token" ] do
            writer.WriteString(key, endOfText)

    /// Writes a vocabulary as HF's GPT-2 tokenizer files into a folder (created if missing; files of the
    /// same names are replaced): vocab.json, merges.txt, tokenizer_config.json (GPT2Tokenizer, with
    /// endOfText as bos, eos, pad and unk, and in added_tokens_decoder) and special_tokens_map.json.
    let save (vocabulary: BpeVocabulary) (folder: string) : unit =
        Directory.CreateDirectory folder |> ignore
        let endOfTextId = vocabulary.Tokens.Length - 1
        writeJson (Path.Combine(folder, "vocab.json")) (fun w ->
            w.WriteStartObject()
            vocabulary.Tokens |> List.iteri (fun id token -> w.WriteNumber(token, id))
            w.WriteEndObject())
        let mergeLines = vocabulary.Merges |> List.map (fun (left, right) -> left + " " + right)
        File.WriteAllText(Path.Combine(folder, "merges.txt"), String.Join("\n", "#version: 0.2" :: mergeLines) + "\n")
        writeJson (Path.Combine(folder, "tokenizer_config.json")) (fun w ->
            w.WriteStartObject()
            w.WriteBoolean("add_prefix_space", false)
            w.WriteStartObject "added_tokens_decoder"
            w.WriteStartObject(string endOfTextId)
            w.WriteString("content", endOfText)
            for key in [ "lstrip"; "normalized"; "rstrip"; "single_word" ] do
                w.WriteBoolean(key, false)
            w.WriteBoolean("special", true)
            w.WriteEndObject()
            w.WriteEndObject()
            writeSpecialTokens w
            w.WriteBoolean("clean_up_tokenization_spaces", false)
            w.WriteString("tokenizer_class", "GPT2Tokenizer")
            w.WriteEndObject())
        writeJson (Path.Combine(folder, "special_tokens_map.json")) (fun w ->
            w.WriteStartObject()
            writeSpecialTokens w
            w.WriteEndObject())

    /// Learns `merges` merges from the texts (see train) and writes the tokenizer files into the folder
    /// (see save); Tokenizers.fromFolder loads the result.
    let trainToFolder (texts: string seq) (merges: int) (folder: string) : unit = save (train texts merges) folder
