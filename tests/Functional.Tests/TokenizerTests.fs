/// Tokenizers from model folders and tiktoken encodings, the byte-level BPE trainer and `functional tokenize`.
module Functional.Tests.TokenizerTests

open System
open System.Diagnostics
open System.IO
open System.Text
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional
open Functional.Text
open Functional.Tests.TestUtil

let private config = { FsCheckConfig.defaultConfig with maxTest = 100 }

/// Strings of valid Unicode scalar values (no lone surrogates), mixing ASCII, Latin, CJK and emoji.
let private unicodeText =
    let codePoint =
        Gen.oneof
            [ Gen.choose (32, 126)
              Gen.choose (0, 0x7FF)
              Gen.choose (0x4E00, 0x9FFF)
              Gen.choose (0x1F300, 0x1FAFF)
              Gen.choose (0, 0x10FFFF) ]
        |> Gen.filter (fun c -> c < 0xD800 || c > 0xDFFF)
    Gen.listOf codePoint
    |> Gen.map (fun codePoints -> String.Join("", codePoints |> List.map Char.ConvertFromUtf32))
    |> Arb.fromGen

let private cl100k = lazy (Tokenizers.fromEncoding "cl100k_base")
let private o200k = lazy (Tokenizers.fromEncoding "o200k_base")

/// Expects f to raise InvalidInputException whose message contains every part.
let private rejects (f: unit -> 'T) (parts: string list) =
    let e =
        try
            f () |> ignore
            failtest "expected an InvalidInputException"
        with :? InvalidInputException as (TestUtil.CommandLine e) -> e
    for part in parts do
        Expect.stringContains e.Message part "the message names the input and the problem"

// ---- A tiny byte-level BPE, written as vocab.json + merges.txt or as tokenizer.json ----

/// The 256 byte symbols (id = byte value), the merges that build "ĠHuman" (ids 256..260) and
/// <|endoftext|> (261). So " Human: hi" is 260 (" Human"), 58 (":"), and " hi", which no merge
/// covers, as its bytes 32, 104, 105.
let private tinyMerges = [ "Ġ", "H"; "ĠH", "u"; "ĠHu", "m"; "ĠHum", "a"; "ĠHuma", "n" ]

let private tinyVocab (extra: string list) =
    [ yield! Tokenizers.byteLevelAlphabet |> Array.map string
      yield! tinyMerges |> List.map (fun (l, r) -> l + r)
      yield "<|endoftext|>"
      yield! extra ]
    |> List.mapi (fun id token -> token, id)

let private jsonString (s: string) = Json.JsonSerializer.Serialize s

let private vocabJson (vocab: (string * int) list) =
    "{" + String.Join(", ", vocab |> List.map (fun (t, id) -> sprintf "%s: %d" (jsonString t) id)) + "}"

let private writeVocabAndMerges (folder: string) (extra: string list) =
    File.WriteAllText(Path.Combine(folder, "vocab.json"), vocabJson (tinyVocab extra))
    let lines = tinyMerges |> List.map (fun (l, r) -> l + " " + r)
    File.WriteAllText(Path.Combine(folder, "merges.txt"), String.Join("\n", "#version: 0.2" :: lines) + "\n")

let private tokenizerJson (modelJson: string) =
    sprintf
        """{"version": "1.0",
  "added_tokens": [{"id": 261, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": %s}"""
        modelJson

let private writeTokenizerJson (folder: string) =
    let merges = tinyMerges |> List.map (fun (l, r) -> sprintf "[%s, %s]" (jsonString l) (jsonString r))
    let model =
        sprintf """{"type": "BPE", "dropout": null, "unk_token": null, "vocab": %s, "merges": [%s]}"""
            (vocabJson (tinyVocab [])) (String.Join(", ", merges))
    File.WriteAllText(Path.Combine(folder, "tokenizer.json"), tokenizerJson model)

let private humanIds = [| 260L; 58L; 32L; 104L; 105L |]

let private write (folder: TempFolder) name (text: string) = File.WriteAllText(folder.File name, text)

// ---- A tiny LLaMA-style SentencePiece model (ModelProto), protobuf encoded by hand ----

module private Proto =
    let varint (out: ResizeArray<byte>) (value: uint64) =
        let mutable v = value
        while v >= 0x80UL do
            out.Add(byte (v &&& 0x7FUL ||| 0x80UL))
            v <- v >>> 7
        out.Add(byte v)
    let key out field wireType = varint out (uint64 ((field <<< 3) ||| wireType))
    let int32 out field (value: int) = key out field 0; varint out (uint64 (int64 value))
    let bytes out field (value: byte[]) = key out field 2; varint out (uint64 value.Length); out.AddRange value
    let string out field (value: string) = bytes out field (Encoding.UTF8.GetBytes value)
    let float32 out field (value: float32) = key out field 5; out.AddRange(BitConverter.GetBytes value)
    let message (build: ResizeArray<byte> -> unit) =
        let out = ResizeArray<byte>()
        build out
        out.ToArray()

/// Ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte pieces <0x00>..<0xFF>, then the normal pieces below
/// from 259 on. SentencePiece BPE merges the adjacent pair whose concatenation is a piece with the
/// highest score, so "▁hello" goes ll, ▁h, ▁he, llo, ▁hello: one piece (263).
let private normalPieces =
    [ "ll", -1.0f; "▁h", -2.0f; "▁he", -3.0f; "llo", -4.0f; "▁hello", -5.0f; "▁", -6.0f
      "h", -7.0f; "e", -8.0f; "l", -9.0f; "o", -10.0f; "w", -11.0f; "r", -12.0f; "d", -13.0f ]

let private sentencePieceModel () =
    let piece (text: string) (score: float32) (kind: int) =
        Proto.message (fun p ->
            Proto.string p 1 text
            Proto.float32 p 2 score
            Proto.int32 p 3 kind)
    let normal, unknown, control, byteKind = 1, 2, 3, 6
    Proto.message (fun m ->
        Proto.bytes m 1 (piece "<unk>" 0.0f unknown)
        Proto.bytes m 1 (piece "<s>" 0.0f control)
        Proto.bytes m 1 (piece "</s>" 0.0f control)
        for b in 0..255 do
            Proto.bytes m 1 (piece (sprintf "<0x%02X>" b) 0.0f byteKind)
        for text, score in normalPieces do
            Proto.bytes m 1 (piece text score normal)
        // TrainerSpec: model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids.
        Proto.bytes m 2 (Proto.message (fun t ->
            Proto.int32 t 3 2
            Proto.int32 t 4 (3 + 256 + normalPieces.Length)
            Proto.int32 t 35 1
            Proto.int32 t 40 0
            Proto.int32 t 41 1
            Proto.int32 t 42 2
            Proto.int32 t 43 -1))
        // NormalizerSpec: identity, add_dummy_prefix, keep whitespace, escape whitespace as ▁.
        Proto.bytes m 3 (Proto.message (fun n ->
            Proto.string n 1 "identity"
            Proto.int32 n 3 1
            Proto.int32 n 4 0
            Proto.int32 n 5 1)))

// ---- `functional tokenize` as a process ----

/// Texts like the embedded task's: " Human: reverse: k d a q z Assistant: z q a d k".
let private taskTexts count seed =
    let random = Random(seed: int)
    [ for _ in 1..count ->
          let letters = [ for _ in 1 .. random.Next(3, 7) -> string (char (int 'a' + random.Next 26)) ]
          sprintf " Human: reverse: %s Assistant: %s" (String.Join(" ", letters)) (String.Join(" ", List.rev letters)) ]

let private tiktoken =
    testList "tiktoken" [
        // OpenAI cookbook "How to count tokens with tiktoken".
        test "cl100k_base encodes \"tiktoken is great!\" as the cookbook shows" {
            Expect.equal (cl100k.Value.Encode "tiktoken is great!") [| 83L; 1609L; 5963L; 374L; 2294L; 0L |] "ids"
        }
        // openai/tiktoken tests/test_simple_public.py.
        test "cl100k_base encodes \"hello world\" as tiktoken's own test" {
            Expect.equal (cl100k.Value.Encode "hello world") [| 15339L; 1917L |] "ids"
            Expect.equal (cl100k.Value.Decode [| 15339L; 1917L |]) "hello world" "text"
        }
        // Published gpt-4o (o200k_base) examples: a tokenization notebook and a tiktoken tutorial.
        test "o200k_base encodes published GPT-4o examples" {
            Expect.equal
                (o200k.Value.Encode "The quick brown fox jumps over the lazy dog.")
                [| 976L; 4853L; 19705L; 68347L; 65613L; 1072L; 290L; 29082L; 6446L; 13L |]
                "pangram"
            Expect.equal
                (o200k.Value.Encode "this is a test example, tutorialexample.com")
                [| 851L; 382L; 261L; 1746L; 4994L; 11L; 24000L; 18582L; 1136L |]
                "tutorial example"
        }
        test "vocabulary sizes and special tokens are tiktoken's (n_vocab; <|endoftext|> as eos and pad, no bos)" {
            Expect.equal cl100k.Value.VocabSize 100277 "cl100k_base n_vocab"
            Expect.equal o200k.Value.VocabSize 200019 "o200k_base n_vocab"
            Expect.equal cl100k.Value.Special { Bos = None; Eos = Some 100257L; Pad = Some 100257L } "cl100k_base"
            Expect.equal o200k.Value.Special { Bos = None; Eos = Some 199999L; Pad = Some 199999L } "o200k_base"
        }
        test "special tokens in the text stay whole and decoding leaves them out" {
            let ids = cl100k.Value.Encode "a<|endoftext|>b"
            Expect.equal ids [| 64L; 100257L; 65L |] "<|endoftext|> is one id"
            Expect.equal (cl100k.Value.Decode ids) "ab" "special token skipped"
        }
        testPropertyWithConfig config "cl100k_base: decode (encode s) = s for Unicode strings"
        <| Prop.forAll unicodeText (fun s -> cl100k.Value.Decode(cl100k.Value.Encode s) = s)
        testPropertyWithConfig config "o200k_base: decode (encode s) = s for Unicode strings"
        <| Prop.forAll unicodeText (fun s -> o200k.Value.Decode(o200k.Value.Encode s) = s)
        test "fingerprints tell encodings apart and are stable" {
            Expect.notEqual cl100k.Value.Fingerprint o200k.Value.Fingerprint "different encodings"
            Expect.equal (Tokenizers.fromEncoding "cl100k_base").Fingerprint cl100k.Value.Fingerprint "same encoding"
            Expect.isGreaterThanOrEqual cl100k.Value.Fingerprint.Length 16 "long enough"
        }
        test "an unknown encoding is rejected naming --tokenizer and the known encodings" {
            let e =
                try
                    Tokenizers.fromEncoding "p50k_base" |> ignore
                    failtest "expected an InvalidInputException"
                with :? InvalidInputException as (TestUtil.CommandLine e) -> e
            Expect.equal e.Origin "--tokenizer" "origin"
            Expect.stringContains e.Message "p50k_base" "names the input"
            Expect.stringContains e.Message "cl100k_base, o200k_base" "lists the known encodings"
        }
        test "ids outside the vocabulary are rejected" {
            rejects (fun () -> cl100k.Value.Decode [| 1L; 100277L |]) [ "cl100k_base"; "100277"; "outside the vocabulary" ]
        }
    ]

let private bpeFolders =
    testList "byte-level BPE folders" [
        test "the byte alphabet is GPT-2's bytes_to_unicode (0x00 'Ā', 0x0A 'Ċ', 0x20 'Ġ', 0x7F 'ġ', 0xAD 'Ń'; printable bytes as themselves)" {
            let alphabet = Tokenizers.byteLevelAlphabet
            Expect.equal [ alphabet[0x00]; alphabet[0x0A]; alphabet[0x20]; alphabet[0x7F]; alphabet[0xAD] ] [ 'Ā'; 'Ċ'; 'Ġ'; 'ġ'; 'Ń' ] "shifted bytes"
            Expect.equal [ alphabet[int '!']; alphabet[int '~']; alphabet[0xA1]; alphabet[0xFF] ] [ '!'; '~'; '¡'; 'ÿ' ] "printable bytes"
            Expect.equal (Set.ofArray alphabet).Count 256 "one character per byte"
        }
        test "vocab.json + merges.txt: merges apply, bytes cover everything, decode round-trips" {
            use folder = new TempFolder()
            writeVocabAndMerges folder.Path []
            let tokenizer = Tokenizers.fromFolder folder.Path
            Expect.equal (tokenizer.Encode " Human: hi") humanIds "\" Human\" is one token, the rest bytes"
            Expect.equal (tokenizer.Encode "é") [| 195L; 169L |] "UTF-8 bytes"
            Expect.equal (tokenizer.Decode humanIds) " Human: hi" "decode"
            Expect.equal tokenizer.VocabSize 262 "256 bytes + 5 merges + <|endoftext|>"
            Expect.equal tokenizer.Name folder.Path "name"
        }
        test "tokenizer.json (merges as pairs) gives the same ids and its added tokens stay whole" {
            use folder = new TempFolder()
            writeTokenizerJson folder.Path
            let tokenizer = Tokenizers.fromFolder folder.Path
            Expect.equal (tokenizer.Encode " Human: hi") humanIds "ids"
            Expect.equal (tokenizer.Encode "a<|endoftext|> Human") [| 97L; 261L; 260L |] "added token is one id"
            Expect.equal (tokenizer.Decode [| 97L; 261L; 260L |]) "a Human" "special added token left out"
        }
        test "tokenizer.json with merges as \"left right\" strings" {
            use folder = new TempFolder()
            let merges = tinyMerges |> List.map (fun (l, r) -> jsonString (l + " " + r))
            let model = sprintf """{"type": "BPE", "vocab": %s, "merges": [%s]}""" (vocabJson (tinyVocab [])) (String.Join(", ", merges))
            write folder "tokenizer.json" (tokenizerJson model)
            Expect.equal ((Tokenizers.fromFolder folder.Path).Encode " Human: hi") humanIds "ids"
        }
        test "a Split pre-tokenizer's regex replaces GPT-2's pattern (digits in groups of three)" {
            // Merges by rank: "3 4", "1 2", "12 3". GPT-2's pattern keeps "1234" whole: 1 2 34, then 12 34.
            // The Split regex cuts "123" + "4": 12 3, then 123; and 4.
            let vocab =
                [ yield! Tokenizers.byteLevelAlphabet |> Array.map string; "34"; "12"; "123" ] |> List.mapi (fun id t -> t, id)
            let model split =
                let preTokenizer =
                    if split then
                        """{"type": "Sequence", "pretokenizers": [
                             {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}| ?\\p{L}+|\\s+"}, "behavior": "Isolated", "invert": false},
                             {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"""
                    else """{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}"""
                sprintf """{"pre_tokenizer": %s, "decoder": {"type": "ByteLevel"},
                            "model": {"type": "BPE", "vocab": %s, "merges": ["3 4", "1 2", "12 3"]}}"""
                    preTokenizer (vocabJson vocab)
            use gpt2 = new TempFolder()
            use split = new TempFolder()
            write gpt2 "tokenizer.json" (model false)
            write split "tokenizer.json" (model true)
            Expect.equal ((Tokenizers.fromFolder gpt2.Path).Encode "1234") [| 257L; 256L |] "12 34"
            Expect.equal ((Tokenizers.fromFolder split.Path).Encode "1234") [| 258L; 52L |] "123 4"
        }
        test "ByteLevel add_prefix_space puts a space before the text" {
            use folder = new TempFolder()
            writeTokenizerJson folder.Path
            let path = folder.File "tokenizer.json"
            File.WriteAllText(path, File.ReadAllText(path).Replace("\"ByteLevel\", \"add_prefix_space\": false", "\"ByteLevel\", \"add_prefix_space\": true"))
            Expect.equal ((Tokenizers.fromFolder folder.Path).Encode "Human") [| 260L |] "as \" Human\""
        }
        test "tokenizer.json is preferred over vocab.json + merges.txt" {
            use folder = new TempFolder()
            writeTokenizerJson folder.Path
            write folder "vocab.json" (vocabJson (tinyVocab []))
            write folder "merges.txt" "#version: 0.2\n"
            Expect.equal ((Tokenizers.fromFolder folder.Path).Encode " Human") [| 260L |] "tokenizer.json's merges"
        }
        test "fingerprints depend on the vocabulary files and special tokens, not on the folder" {
            use a = new TempFolder()
            use b = new TempFolder()
            use c = new TempFolder()
            writeVocabAndMerges a.Path []
            writeVocabAndMerges b.Path []
            writeVocabAndMerges c.Path []
            write c "config.json" """{"eos_token_id": 261}"""
            let fingerprint (f: TempFolder) = (Tokenizers.fromFolder f.Path).Fingerprint
            Expect.equal (fingerprint a) (fingerprint b) "same files, same fingerprint"
            Expect.notEqual (fingerprint a) (fingerprint c) "another eos, another fingerprint"
        }
    ]

let private specialTokens =
    // Extra vocabulary: "<s>" 262, "</s>" 263, "<pad>" 264.
    let folderWith (files: (string * string) list) =
        let folder = new TempFolder()
        writeVocabAndMerges folder.Path [ "<s>"; "</s>"; "<pad>" ]
        for name, text in files do
            write folder name text
        folder
    let specialOf files =
        use folder = folderWith files
        (Tokenizers.fromFolder folder.Path).Special
    testList "special tokens" [
        test "tokenizer_config.json: token strings and {\"content\": ...} objects" {
            let special =
                specialOf [ "tokenizer_config.json", """{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}, "pad_token": "<pad>"}""" ]
            Expect.equal special { Bos = Some 262L; Eos = Some 263L; Pad = Some 264L } "ids"
        }
        test "special_tokens_map.json, with pad falling back to eos" {
            let special = specialOf [ "special_tokens_map.json", """{"eos_token": "</s>"}""" ]
            Expect.equal special { Bos = None; Eos = Some 263L; Pad = Some 263L } "ids"
        }
        test "generation_config.json: ids, an eos list gives its first id" {
            let special = specialOf [ "generation_config.json", """{"bos_token_id": 262, "eos_token_id": [263, 261], "pad_token_id": 264}""" ]
            Expect.equal special { Bos = Some 262L; Eos = Some 263L; Pad = Some 264L } "ids"
        }
        test "config.json: ids, a null pad falls back to eos" {
            let special = specialOf [ "config.json", """{"bos_token_id": 262, "eos_token_id": 263, "pad_token_id": null}""" ]
            Expect.equal special { Bos = Some 262L; Eos = Some 263L; Pad = Some 263L } "ids"
        }
        test "precedence: tokenizer_config, special_tokens_map, generation_config, config" {
            let special =
                specialOf
                    [ "tokenizer_config.json", """{"eos_token": "</s>"}"""
                      "special_tokens_map.json", """{"eos_token": "<s>", "pad_token": "<pad>"}"""
                      "generation_config.json", """{"eos_token_id": 261, "bos_token_id": 262}"""
                      "config.json", """{"eos_token_id": 262, "bos_token_id": 261, "pad_token_id": 262}""" ]
            Expect.equal special { Bos = Some 262L; Eos = Some 263L; Pad = Some 264L } "ids"
        }
        test "no special tokens anywhere: none" {
            Expect.equal (specialOf []) { Bos = None; Eos = None; Pad = None } "none"
        }
        test "added_tokens_decoder adds tokens beyond the vocabulary; decoding leaves special ones out" {
            use folder =
                folderWith
                    [ "tokenizer_config.json",
                      """{"added_tokens_decoder": {"265": {"content": "<|im_end|>", "special": true}}, "eos_token": "<|im_end|>"}""" ]
            let tokenizer = Tokenizers.fromFolder folder.Path
            Expect.equal (tokenizer.Encode "a<|im_end|>") [| 97L; 265L |] "one id"
            Expect.equal tokenizer.VocabSize 266 "vocabulary grows"
            Expect.equal tokenizer.Special.Eos (Some 265L) "eos resolved through the added token"
            Expect.equal (tokenizer.Decode [| 97L; 265L; 262L |]) "a<s>" "special left out, plain vocabulary entry kept"
        }
        test "a token string that is not in the vocabulary is rejected naming the file and key" {
            use folder = folderWith [ "tokenizer_config.json", """{"eos_token": "<nope>"}""" ]
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "tokenizer_config.json"; "eos_token"; "<nope>" ]
        }
        test "an id outside the vocabulary is rejected naming the file and key" {
            use folder = folderWith [ "config.json", """{"eos_token_id": 5000}""" ]
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "config.json"; "eos_token_id"; "5000" ]
        }
    ]

let private sentencePiece =
    testList "SentencePiece" [
        test "tokenizer.model: pieces merge by score, dummy prefix, byte fallback, bos/eos from the model" {
            use folder = new TempFolder()
            File.WriteAllBytes(folder.File "tokenizer.model", sentencePieceModel ())
            let tokenizer = Tokenizers.fromFolder folder.Path
            Expect.equal (tokenizer.Encode "hello") [| 263L |] "▁hello"
            Expect.equal (tokenizer.Encode "hello world") [| 263L; 264L; 269L; 268L; 270L; 267L; 271L |] "▁hello ▁ w o r l d"
            Expect.equal (tokenizer.Encode "hé") [| 260L; 3L + 0xC3L; 3L + 0xA9L |] "▁h, then é as its UTF-8 bytes"
            Expect.equal tokenizer.Special { Bos = Some 1L; Eos = Some 2L; Pad = Some 2L } "model ids, pad = eos"
            Expect.equal tokenizer.VocabSize (3 + 256 + normalPieces.Length) "vocabulary"
            Expect.equal (tokenizer.Decode [| 1L; 263L; 264L; 269L; 268L; 270L; 267L; 271L; 2L |]) "hello world" "bos/eos left out"
            Expect.equal (tokenizer.Decode(tokenizer.Encode "hé")) "hé" "round trip"
        }
        test "a SentencePiece-style tokenizer.json is read itself, also beside a tokenizer.model (as HF's fast tokenizer)" {
            use folder = new TempFolder()
            File.WriteAllBytes(folder.File "tokenizer.model", sentencePieceModel ())
            write folder "tokenizer.json" """{"pre_tokenizer": {"type": "Metaspace"}, "decoder": {"type": "Metaspace"},
                "model": {"type": "BPE", "unk_token": "<unk>",
                          "vocab": {"<unk>": 0, "\u2581": 1, "h": 2, "e": 3, "l": 4, "o": 5, "\u2581h": 6, "\u2581he": 7, "\u2581hel": 8, "\u2581hell": 9, "\u2581hello": 10},
                          "merges": ["\u2581 h", "\u2581h e", "\u2581he l", "\u2581hel l", "\u2581hell o"]}}"""
            let tokenizer = Tokenizers.fromFolder folder.Path
            Expect.equal (tokenizer.Encode "hello") [| 10L |] "the tokenizer.json's vocabulary and merges, not tokenizer.model's"
            Expect.equal (tokenizer.Decode [| 10L |]) "hello" "Metaspace decodes the leading space away"
        }
        test "a corrupt tokenizer.model is rejected naming the file" {
            use folder = new TempFolder()
            File.WriteAllBytes(folder.File "tokenizer.model", [| 0xFFuy; 0x01uy; 0x02uy |])
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "tokenizer.model"; "SentencePiece" ]
        }
    ]

let private folderErrors =
    testList "folder errors" [
        test "a folder without tokenizer files lists what is expected" {
            use folder = new TempFolder()
            write folder "config.json" "{}"
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ folder.Path; "tokenizer.json"; "vocab.json + merges.txt"; "tokenizer.model" ]
        }
        test "a missing folder is named" {
            rejects (fun () -> Tokenizers.fromFolder "/no/such/folder") [ "/no/such/folder"; "does not exist" ]
        }
        test "a WordPiece tokenizer.json is rejected naming the file and the model type" {
            use folder = new TempFolder()
            write folder "tokenizer.json" """{"model": {"type": "WordPiece", "vocab": {"[UNK]": 0}}}"""
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "tokenizer.json"; "model.type"; "WordPiece"; "tokenizer.model" ]
        }
        test "a Unigram tokenizer.json is rejected" {
            use folder = new TempFolder()
            write folder "tokenizer.json" """{"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}}"""
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "tokenizer.json"; "Unigram" ]
        }
        test "a tokenizer.json that is not JSON is rejected naming the file" {
            use folder = new TempFolder()
            write folder "tokenizer.json" """{"model": {"type": "BPE", """
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "tokenizer.json"; "not valid JSON" ]
        }
        test "a merges.txt line that is not two tokens is rejected naming the line" {
            use folder = new TempFolder()
            writeVocabAndMerges folder.Path []
            write folder "merges.txt" "#version: 0.2\nĠ H\nĠH u x\n"
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "merges.txt:line 3"; "two tokens" ]
        }
        test "a vocab.json id that is not an integer is rejected naming the token" {
            use folder = new TempFolder()
            writeVocabAndMerges folder.Path []
            write folder "vocab.json" """{"a": 0, "b": "one"}"""
            rejects (fun () -> Tokenizers.fromFolder folder.Path) [ "vocab.json:b"; "integer" ]
        }
    ]

let private training =
    let texts = taskTexts 200 7
    let trained =
        lazy
            (use folder = new TempFolder()
             BpeTraining.trainToFolder texts 20 folder.Path
             Tokenizers.fromFolder folder.Path)
    testList "BPE training" [
        test "the same texts give byte-identical files" {
            use a = new TempFolder()
            use b = new TempFolder()
            BpeTraining.trainToFolder texts 40 a.Path
            BpeTraining.trainToFolder (Seq.ofList texts) 40 b.Path
            Expect.equal (snapshot a.Path) (snapshot b.Path) "identical files"
            Expect.equal
                (snapshot a.Path |> Map.keys |> List.ofSeq)
                [ "merges.txt"; "special_tokens_map.json"; "tokenizer_config.json"; "vocab.json" ]
                "the GPT-2 tokenizer files"
        }
        test "frequent words become single tokens; <|endoftext|> is bos, eos and pad with the last id" {
            use folder = new TempFolder()
            BpeTraining.trainToFolder texts 40 folder.Path
            let tokenizer = Tokenizers.fromFolder folder.Path
            for word in [ " Human"; " Assistant"; " reverse" ] do
                Expect.equal (tokenizer.Encode word).Length 1 (sprintf "%A is one token" word)
            let last = int64 (tokenizer.VocabSize - 1)
            Expect.equal tokenizer.Special { Bos = Some last; Eos = Some last; Pad = Some last } "special"
            Expect.equal tokenizer.VocabSize (256 + 40 + 1) "256 bytes + 40 merges + <|endoftext|>"
            let text = List.head texts
            let ids = tokenizer.Encode text
            Expect.isLessThan ids.Length (Encoding.UTF8.GetByteCount text / 2) "far fewer tokens than bytes"
            Expect.equal (tokenizer.Decode ids) text "round trip"
        }
        testPropertyWithConfig { config with maxTest = 50 } "a trained tokenizer round-trips any Unicode string"
        <| Prop.forAll unicodeText (fun s -> trained.Value.Decode(trained.Value.Encode s) = s)
        test "ties go to the pair with the smaller ids (\"Ġ\" 32 before \"a\" 97 before \"b\" 98)" {
            let vocabulary = BpeTraining.train [ "ba ab" ] 1
            Expect.equal vocabulary.Merges [ "Ġ", "a" ] "Ġa first"
        }
        test "training stops when every piece is one token" {
            let vocabulary = BpeTraining.train [ "ab ab" ] 100
            Expect.equal vocabulary.Merges [ "a", "b"; "Ġ", "ab" ] "two merges"
            Expect.equal vocabulary.Tokens.Length (256 + 2 + 1) "vocabulary"
            Expect.equal (List.last vocabulary.Tokens) BpeTraining.endOfText "special token last"
        }
        test "a negative number of merges is rejected" {
            rejects (fun () -> BpeTraining.train texts -1) [ "merges"; "-1" ]
        }
    ]

let private cli =
    testList "functional tokenize" [
        test "--tokenizer cl100k_base prints the ids" {
            let run = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "tiktoken is great!" ]
            Expect.equal run.ExitCode 0 run.Stderr
            Expect.equal (run.Stdout.Trim()) "83 1609 5963 374 2294 0" "ids"
        }
        test "--decode prints the text, with the ids after --decode or as the argument" {
            let run = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode"; "83 1609 5963 374 2294 0" ]
            Expect.equal run.ExitCode 0 run.Stderr
            Expect.equal (run.Stdout.TrimEnd('\n', '\r')) "tiktoken is great!" "text"
            let run = runCli [ "tokenize"; "--tokenizer"; "o200k_base"; "[976, 4853, 19705]"; "--decode" ]
            Expect.equal run.ExitCode 0 run.Stderr
            Expect.equal (run.Stdout.TrimEnd('\n', '\r')) "The quick brown" "text"
        }
        test "--model uses the folder's tokenizer" {
            use folder = new TempFolder()
            writeVocabAndMerges folder.Path []
            let run = runCli [ "tokenize"; "--model"; folder.Path; " Human: hi" ]
            Expect.equal run.ExitCode 0 run.Stderr
            Expect.equal (run.Stdout.Trim()) "260 58 32 104 105" "ids"
        }
        test "an unknown encoding exits 2 naming --tokenizer and the known encodings" {
            let run = runCli [ "tokenize"; "--tokenizer"; "p50k_base"; "x" ]
            Expect.equal run.ExitCode 2 "exit code"
            Expect.stringContains run.Stderr "--tokenizer" "option named"
            Expect.stringContains run.Stderr "cl100k_base" "known encodings listed"
            Expect.isFalse (run.Stderr.Contains "   at ") "no stack trace"
        }
        test "ids that are not numbers exit 2" {
            let run = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode"; "1 two" ]
            Expect.equal run.ExitCode 2 "exit code"
            Expect.stringContains run.Stderr "--decode" "option named"
        }
    ]

[<Tests>]
let tests = testList "tokenizers" [ tiktoken; bpeFolders; specialTokens; sentencePiece; folderErrors; training; cli ]
