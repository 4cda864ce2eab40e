/// Issue 12, finding 9: training text is one string per sample (prompt + answer), tokenized once, with
/// bos/eos by the tokenizer's own rule, so training rows are Hugging Face's ids of the joined text.
/// The goldens come from tools/reference/make_tokenizer_golden.mjs (HF's tokenizers.js).
module Functional.Tests.NewUserTextTests

open System.IO
open System.Text
open System.Text.Json
open Expecto
open Functional.Data
open Functional.Text
open Functional.Tests.TestUtil

/// One golden sample: the record as a data file holds it and HF's view of its joined text.
type private GoldenSample =
    { Name: string
      Record: string
      Text: string
      Ids: int64[]
      IdsWithSpecialTokens: int64[]
      PromptTokens: int
      PromptIds: int64[] }

let private goldenFolder = goldenDir "tokenization"

let private samples (tokenizer: string) =
    use document = JsonDocument.Parse(File.ReadAllText(Path.Combine(goldenFolder, "tokenization.json")))
    let ids (e: JsonElement) (name: string) = e.GetProperty(name).EnumerateArray() |> Seq.map (fun i -> i.GetInt64()) |> Array.ofSeq
    [ for s in document.RootElement.GetProperty("tokenizers").GetProperty(tokenizer).GetProperty("samples").EnumerateArray() ->
          { Name = s.GetProperty("name").GetString()
            Record = JsonSerializer.Serialize(s.GetProperty "record")
            Text = s.GetProperty("text").GetString()
            Ids = ids s "ids"
            IdsWithSpecialTokens = ids s "ids_with_special_tokens"
            PromptTokens = s.GetProperty("prompt_tokens").GetInt32()
            PromptIds = ids s "prompt_ids" } ]

let private tokenizerOf name = Tokenizers.fromFolder (Path.Combine(goldenFolder, name))

let private llama = lazy (tokenizerOf "llama2")
let private gpt2 = lazy (tokenizerOf "gpt2")

/// The training row (and its prompt length) PromptDataset makes of one golden record.
let private rowOf (tokenizer: TextTokenizer) (options: PromptDataOptions) (sample: GoldenSample) =
    use folder = new TempFolder()
    let path = folder.File "data.jsonl"
    File.WriteAllText(path, sample.Record + "\n", UTF8Encoding false)
    let dataset = (PromptDataset.load path { options with MaxSeqLen = 4096 } tokenizer).Dataset
    dataset.Rows[0], dataset.PromptLengths[0]

let private completion = { PromptDataset.defaults with TrainOn = TrainOn.Completion }

/// Every golden row equals HF's tokenizer(text) (special tokens by the tokenizer's rule) + eos.
let private equalsHf (tokenizer: TextTokenizer) (name: string) =
    let eos = tokenizer.Special.Eos.Value
    for sample in samples name do
        let row, _ = rowOf tokenizer PromptDataset.defaults sample
        Expect.equal row (Array.append sample.IdsWithSpecialTokens [| eos |]) (sprintf "%s: HF's ids of the joined text, then eos" sample.Name)

let private tests =
    testList "finding 9" [
        test "finding 9: with a SentencePiece tokenizer (LLaMA-style tokenizer.json) training rows equal HF's ids of prompt + answer, bos first and eos last" {
            let tokenizer = llama.Force()
            Expect.isTrue tokenizer.AddsBos "tokenizer_config.json says add_bos_token"
            Expect.isFalse tokenizer.AddsEos "and not add_eos_token"
            for sample in samples "llama2" do
                Expect.equal (tokenizer.Encode sample.Text) sample.Ids (sprintf "%s: Encode is HF's encode without special tokens" sample.Name)
            equalsHf tokenizer "llama2"
        }
        test "finding 9: with a byte-level tokenizer (GPT-2) training rows equal HF's ids of prompt + answer with no bos and eos last" {
            let tokenizer = gpt2.Force()
            Expect.isFalse tokenizer.AddsBos "GPT-2's post-processor adds nothing"
            for sample in samples "gpt2" do
                Expect.equal sample.IdsWithSpecialTokens sample.Ids (sprintf "%s: HF adds no special token for GPT-2" sample.Name)
            equalsHf tokenizer "gpt2"
        }
        test "finding 9: the answer's first token is the one that follows the prompt at inference (no extra ▁ between them)" {
            let tokenizer = llama.Force()
            let spacePiece = 28705L // "▁" alone
            for sample in samples "llama2" |> List.filter (fun s -> s.Name.StartsWith "deepspeed-chat" || s.Name.StartsWith "alpaca") do
                let row, promptLength = rowOf tokenizer completion sample
                let bos = tokenizer.Special.Bos.Value
                Expect.equal row[.. promptLength - 1] (Array.append [| bos |] sample.PromptIds) (sprintf "%s: the prompt part is what generation feeds (bos + the prompt's ids)" sample.Name)
                Expect.equal row[promptLength] sample.Ids[sample.PromptTokens] (sprintf "%s: the answer starts with HF's next token" sample.Name)
                Expect.notEqual row[promptLength] spacePiece (sprintf "%s: not a lone ▁" sample.Name)
            let deepSpeed = samples "llama2" |> List.find (fun s -> s.Name = "deepspeed-chat")
            let answer = deepSpeed.Text.Substring(deepSpeed.Text.IndexOf "Assistant:" + "Assistant:".Length)
            Expect.equal (tokenizer.Encode answer |> Array.head) spacePiece "encoding the answer alone (the old way) starts it with a lone ▁"
        }
        test "finding 9: completion-only training masks the tokens lying in the prompt; a token spanning the boundary is trained" {
            for name, tokenizer, bos in [ "llama2", llama.Force(), 1; "gpt2", gpt2.Force(), 0 ] do
                for sample in samples name do
                    let _, promptLength = rowOf tokenizer completion sample
                    Expect.equal promptLength (bos + sample.PromptTokens) (sprintf "%s %s: bos + HF's prompt tokens" name sample.Name)
            // GPT-2 joins the prompt's last space and the answer's first character ("ĠãĤ"): that token is trained.
            let spanning = samples "gpt2" |> List.find (fun s -> s.Name = "unicode")
            use record = JsonDocument.Parse spanning.Record
            let prompt = record.RootElement.GetProperty("prompt").GetString()
            let masked = (gpt2.Force()).Decode spanning.Ids[.. spanning.PromptTokens - 1]
            Expect.equal (masked + " ") prompt "the masked tokens hold all of the prompt but its last space"
        }
        test "finding 9: --no-add-bos drops LLaMA's bos and --add-bos adds GPT-2's; the first token follows the option" {
            let llamaSample = samples "llama2" |> List.head
            let row, promptLength = rowOf (llama.Force()) { completion with AddBos = Some false } llamaSample
            Expect.equal row (Array.append llamaSample.Ids [| 2L |]) "no bos: HF's ids without special tokens, then eos"
            Expect.equal promptLength llamaSample.PromptTokens "the prompt has no bos to mask"
            let gptSample = samples "gpt2" |> List.head
            let row, promptLength = rowOf (gpt2.Force()) { completion with AddBos = Some true } gptSample
            Expect.equal row (Array.concat [ [| 50256L |]; gptSample.Ids; [| 50256L |] ]) "GPT-2's bos (<|endoftext|>) first"
            Expect.equal promptLength (1 + gptSample.PromptTokens) "bos is masked with the prompt"
        }
        test "finding 9: add_bos_token false in tokenizer_config.json turns the rule off, and --add-bos needs a bos token" {
            use folder = new TempFolder()
            File.Copy(Path.Combine(goldenFolder, "llama2", "tokenizer.json"), folder.File "tokenizer.json")
            File.WriteAllText(folder.File "tokenizer_config.json", """{"add_bos_token": false, "bos_token": "<s>", "eos_token": "</s>"}""")
            let tokenizer = Tokenizers.fromFolder folder.Path
            Expect.isFalse tokenizer.AddsBos "the config's flag wins over the post-processor"
            File.Delete(folder.File "tokenizer_config.json")
            Expect.isTrue (Tokenizers.fromFolder folder.Path).AddsBos "without the config the post-processor's <s> $A template adds bos"
            let noBos = Tokenizers.fromEncoding "cl100k_base"
            let sample = samples "gpt2" |> List.head
            expectInvalidInput "--add-bos" "" [ "no bos token" ] (fun () -> rowOf noBos { completion with AddBos = Some true } sample |> ignore)
        }
        test "finding 9: the data cache keys the bos choice" {
            use folder = new TempFolder()
            let path = folder.File "data.jsonl"
            File.WriteAllText(path, (samples "gpt2" |> List.head).Record + "\n")
            let key addBos = DataCache.key path None { PromptDataset.defaults with AddBos = addBos } (gpt2.Force())
            Expect.equal (List.distinct [ key None; key (Some true); key (Some false) ]).Length 3 "three choices, three keys"
        }
        test "finding 9: train refuses --add-bos with --no-add-bos and --add-bos with a tokenizer without bos (exit 2, nothing written)" {
            use folder = new TempFolder()
            copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (folder.File "model")
            File.WriteAllText(folder.File "data.jsonl", (samples "llama2" |> List.head).Record + "\n")
            let args extra =
                [ "train"; "--model"; folder.File "model"; "--data"; folder.File "data.jsonl"; "--output"; folder.File "out"
                  "--max-steps"; "1"; "--tokenizer"; "cl100k_base"; "--no-data-cache" ] @ extra
            for extra, parts in [ [ "--add-bos"; "--no-add-bos" ], [ "--add-bos"; "--no-add-bos" ]; [ "--add-bos" ], [ "--add-bos"; "no bos token" ] ] do
                let run = runCli (args extra)
                Expect.equal run.ExitCode 2 (sprintf "exit 2 (stderr: %s)" run.Stderr)
                for part in parts do
                    Expect.stringContains run.Stderr part "the message names the options"
                Expect.isFalse (Directory.Exists(folder.File "out")) "no output folder"
        }
    ]

[<Tests>]
let newUserTextTests = testList "new user: training text" [ tests ]
