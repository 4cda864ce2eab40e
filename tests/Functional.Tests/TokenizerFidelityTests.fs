/// Our tokenizers against Hugging Face's on real tokenizer files (the list "tokenizer fidelity"): the goldens of
/// tools/reference/make_fidelity_golden.mjs (@huggingface/tokenizers) hold, for six tokenizers and 335 texts in many
/// scripts, HF's ids without and with special tokens and its decode of them.
module Functional.Tests.TokenizerFidelityTests

open System
open System.IO
open System.IO.Compression
open System.Text.Json
open Expecto
open Functional.Text
open Functional.Tests.TestUtil

let private root = Path.Combine(goldenDir "tokenizer-fidelity")

let private golden = lazy (JsonDocument.Parse(File.ReadAllText(Path.Combine(root, "fidelity.json"))).RootElement)

/// The tokenizer's folder made whole in a temporary folder (tokenizer.json unzipped beside its config).
let private load (name: string) (folder: TempFolder) =
    let source = Path.Combine(root, name)
    use input = File.OpenRead(Path.Combine(source, "tokenizer.json.gz"))
    use gzip = new GZipStream(input, CompressionMode.Decompress)
    use output = File.Create(folder.File "tokenizer.json")
    gzip.CopyTo output
    output.Close()
    File.Copy(Path.Combine(source, "tokenizer_config.json"), folder.File "tokenizer_config.json")
    Tokenizers.fromFolder folder.Path

let private ids (element: JsonElement) = element.EnumerateArray() |> Seq.map (fun e -> e.GetInt64()) |> Array.ofSeq

let private show (text: string) = JsonSerializer.Serialize text

let private check (name: string) =
    test (sprintf "%s: ids, ids with special tokens and decodes equal HF's on every text" name) {
        use folder = new TempFolder()
        let tokenizer = load name folder
        let texts = golden.Value.GetProperty("texts").EnumerateArray() |> Seq.map (fun t -> t.GetString()) |> Array.ofSeq
        let results = golden.Value.GetProperty("tokenizers").GetProperty(name).GetProperty("results").EnumerateArray() |> Array.ofSeq
        Expect.equal results.Length texts.Length "one result per text"
        Expect.isGreaterThanOrEqual texts.Length 300 "at least 300 texts"
        // transformers' LlamaTokenizerFast rebuilds the post-processor from tokenizer_config.json's add_bos_token /
        // add_eos_token (DeepSeek-V3's adds bos, which its tokenizer.json's template leaves out); the tokenizers
        // library reads the template alone. We follow transformers, the library training runs with.
        let transformersRule =
            let config = JsonDocument.Parse(File.ReadAllText(folder.File "tokenizer_config.json")).RootElement
            let flag name = match config.TryGetProperty(name: string) with | true, v when v.ValueKind = JsonValueKind.True -> true | _ -> false
            match config.TryGetProperty "tokenizer_class" with
            | true, c when c.GetString() = "LlamaTokenizerFast" -> Some(flag "add_bos_token", flag "add_eos_token")
            | _ -> None
        let failures = ResizeArray<string>()
        for text, result in Array.zip texts results do
            let expected = ids (result.GetProperty "ids")
            let actual = tokenizer.Encode text
            if actual <> expected then failures.Add(sprintf "ids of %s: ours %A, HF %A" (show text) actual expected)
            let special =
                Array.concat
                    [ (if tokenizer.AddsBos then Option.toArray tokenizer.Special.Bos else [||])
                      actual
                      (if tokenizer.AddsEos then Option.toArray tokenizer.Special.Eos else [||]) ]
            let expectedSpecial =
                match transformersRule with
                | Some(bos, eos) ->
                    Array.concat [ (if bos then Option.toArray tokenizer.Special.Bos else [||]); expected; (if eos then Option.toArray tokenizer.Special.Eos else [||]) ]
                | None -> ids (result.GetProperty "ids_special")
            if special <> expectedSpecial then failures.Add(sprintf "ids with special tokens of %s: ours %A, HF %A" (show text) special expectedSpecial)
            let decoded = tokenizer.Decode expected
            let expectedDecoded = result.GetProperty("decoded_skip").GetString()
            if decoded <> expectedDecoded then failures.Add(sprintf "decode (skipping special tokens) of %s: ours %s, HF %s" (show text) (show decoded) (show expectedDecoded))
        Expect.isEmpty failures (sprintf "%d differences from HF (first 10):\n%s" failures.Count (String.Join("\n", Seq.truncate 10 failures)))
    }

[<Tests>]
let tests =
    testList "tokenizer fidelity" [ for name in [ "gpt2"; "llama2"; "llama3"; "qwen3"; "deepseek_v3"; "mistral_nemo" ] -> check name ]
