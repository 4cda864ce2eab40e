/// Prompt/answer data files (DeepSpeed-Chat, phoenix-sft, Alpaca, text, custom fields, JSON or JSON
/// Lines) read into samples and token rows, with a real cl100k_base tokenizer.
module Functional.Tests.PromptDatasetTests

open System
open System.IO
open System.Text
open System.Text.Json
open System.Threading
open Expecto
open Microsoft.ML.Tokenizers
open Functional
open Functional.Data
open Functional.Runtime
open Functional.Text
open Functional.Tests.TestUtil

let private tiktoken = lazy (TiktokenTokenizer.CreateForEncoding "cl100k_base")

/// The id of "<|endoftext|>" in cl100k_base.
let endOfText = 100257L

/// A cl100k_base TextTokenizer whose Encode counts its calls in calls; bos, when given, is a made-up id
/// (cl100k_base has none) to test AddBos.
let cl100k (calls: int ref) (bos: int64 option) : TextTokenizer =
    let t = tiktoken.Force()
    { Name = "cl100k_base"
      Fingerprint = "cl100k_base"
      VocabSize = 100277
      Special = { Bos = bos; Eos = Some endOfText; Pad = None }
      AddsBos = false
      AddsEos = false
      Encode =
        fun text ->
            Interlocked.Increment &calls.contents |> ignore
            t.EncodeToIds(text) |> Seq.map int64 |> Seq.toArray
      EncodeJoined =
        fun prompt answer ->
            Interlocked.Increment &calls.contents |> ignore
            let mutable normalized = null
            let tokens = t.EncodeToTokens(prompt + answer, &normalized)
            { Ids = tokens |> Seq.map (fun token -> int64 token.Id) |> Seq.toArray
              PromptTokens = tokens |> Seq.takeWhile (fun token -> token.Offset.End.Value <= prompt.Length) |> Seq.length }
      Decode = fun ids -> t.Decode(ids |> Seq.map int) }

let private encode (text: string) = tiktoken.Force().EncodeToIds(text) |> Seq.map int64 |> Seq.toArray

/// How many leading tokens of prompt + answer decode to characters of the prompt only.
let private promptTokens (prompt: string) (answer: string) =
    let ids = encode (prompt + answer) |> Array.map int
    let within k = (tiktoken.Force().Decode ids[.. k - 1]).Length <= prompt.Length
    Seq.init ids.Length ((+) 1) |> Seq.takeWhile within |> Seq.length

/// Writes content to a file named name in a fresh folder and runs check on its path.
let withData (name: string) (content: string) (check: string -> 'T) : 'T =
    use folder = new TempFolder()
    let path = folder.File name
    File.WriteAllText(path, content, UTF8Encoding false)
    check path

let private json (value: obj) = JsonSerializer.Serialize value

/// The same three prompt/answer pairs (with non-ASCII text, quotes and newlines) in every test.
let pairs =
    [| "\n\nHuman: 你好,请介绍一下DeepSpeed-Chat。\n\nAssistant:", " DeepSpeed-Chat 有三个步骤。"
       "Translate \"al dente\" to English.", "\"Al dente\" means firm to the bite."
       "2 + 3 =", " 5" |]

let private jsonLines (objects: obj seq) = objects |> Seq.map json |> String.concat "\n"
let private jsonArray (objects: obj seq) = "[\n" + (objects |> Seq.map json |> String.concat ",\n") + "\n]"

let private options = PromptDataset.defaults

let private expectInvalid origin location (problem: string) action = expectInvalidInput origin location [ problem ] action

let private plain (samples: Sample[]) = samples |> Array.map (fun s -> s.Prompt, s.Answer, s.Line)

[<Tests>]
let tests =
    testList "prompt dataset" [
        test "DeepSpeed-Chat JSONL and JSON array, phoenix and custom fields parse into the same samples" {
            let expected = pairs |> Array.mapi (fun i (p, a) -> p, a, i + 1)
            let dsChat = pairs |> Array.map (fun (p, a) -> box {| prompt = p; chosen = a; rejected = "no" |})
            let read name content opts = withData name content (fun path -> plain (PromptDataset.readSamples path opts))
            Expect.equal (read "a.jsonl" (jsonLines dsChat) options) expected "DeepSpeed-Chat JSON Lines"
            Expect.equal (read "a.json" (jsonArray dsChat) options) expected "DeepSpeed-Chat JSON array"
            Expect.equal (read "a.jsonl" (jsonLines dsChat) { options with Format = DataFormat.DeepSpeedChat }) expected "format chosen explicitly"
            let phoenix = pairs |> Array.mapi (fun i (p, a) -> box {| id = string i; ``type`` = "Instruction"; from_human = p; from_gpt = a |})
            Expect.equal (read "p.json" (jsonArray phoenix) options) expected "phoenix-sft JSON array"
            Expect.equal (read "p.jsonl" (jsonLines phoenix) options) expected "phoenix-sft JSON Lines"
            let custom = pairs |> Array.map (fun (p, a) -> box {| question = p; reply = a; score = 1 |})
            let fields = { options with Fields = { PromptDataset.noFields with Prompt = Some "question"; Answer = Some "reply" } }
            Expect.equal (read "c.jsonl" (jsonLines custom) fields) expected "custom fields"
        }
        test "text and a custom text field parse as samples with an empty prompt" {
            let texts = pairs |> Array.map (fun (p, a) -> p + a)
            let expected = texts |> Array.mapi (fun i t -> "", t, i + 1)
            withData "t.jsonl" (jsonLines (texts |> Array.map (fun t -> box {| text = t |}))) (fun path ->
                Expect.equal (plain (PromptDataset.readSamples path options)) expected "text shape")
            withData "b.json" (jsonArray (texts |> Array.map (fun t -> box {| body = t |}))) (fun path ->
                let opts = { options with Fields = { PromptDataset.noFields with Text = Some "body" } }
                Expect.equal (plain (PromptDataset.readSamples path opts)) expected "custom text field")
        }
        test "Alpaca samples use the Alpaca template, the no-input one for an empty or missing input" {
            let rows : obj[] =
                [| {| instruction = "Add the numbers."; input = "2, 3"; output = "5" |}
                   {| instruction = "Name a prime."; input = ""; output = "7" |}
                   {| instruction = "Say hi."; output = "hi" |} |]
            withData "alpaca.json" (jsonArray rows) (fun path ->
                let samples = PromptDataset.readSamples path options
                let header = "Below is an instruction that describes a task"
                Expect.equal samples[0].Prompt (header + ", paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n") "with input"
                Expect.equal samples[1].Prompt (header + ". Write a response that appropriately completes the request.\n\n### Instruction:\nName a prime.\n\n### Response:\n") "empty input"
                Expect.equal samples[2].Prompt (header + ". Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n") "missing input"
                Expect.equal (samples |> Array.map (fun s -> s.Answer)) [| "5"; "7"; "hi" |] "answers are the outputs")
        }
        test "phoenix turn arrays put earlier turns in the prompt and answer with the last" {
            withData "turns.jsonl" (json {| from_human = [| "Hi"; "And 2+2?" |]; from_gpt = [| "Hello"; "4" |] |}) (fun path ->
                Expect.equal (plain (PromptDataset.readSamples path options)) [| "Hi\nHello\nAnd 2+2?", "4", 1 |] "joined by newlines")
        }
        test "a row is Encode(prompt + answer) + eos and every token is trained on by default" {
            withData "d.jsonl" (jsonLines (pairs |> Array.map (fun (p, a) -> box {| prompt = p; chosen = a |}))) (fun path ->
                let loaded = PromptDataset.load path options (cl100k (ref 0) None)
                let expected = pairs |> Array.map (fun (p, a) -> Array.append (encode (p + a)) [| endOfText |])
                Expect.equal loaded.Dataset.Rows expected "ids"
                Expect.equal loaded.Dataset.PromptLengths [| 0; 0; 0 |] "no masking"
                Expect.equal loaded.Dataset.Lines [| 1; 2; 3 |] "lines"
                Expect.equal loaded.Skipped 0 "nothing skipped")
        }
        test "completion-only training masks exactly the tokens lying in the prompt (and bos) in the collated labels" {
            TorchRuntime.ensure ()
            withData "d.jsonl" (jsonLines (pairs |> Array.map (fun (p, a) -> box {| prompt = p; chosen = a |}))) (fun path ->
                let bos = 100264L
                let opts = { options with TrainOn = TrainOn.Completion; AddBos = Some true }
                let dataset = (PromptDataset.load path opts (cl100k (ref 0) (Some bos))).Dataset
                Expect.equal dataset.PromptLengths (pairs |> Array.map (fun (p, a) -> 1 + promptTokens p a)) "bos + prompt tokens"
                let spanned, _ = pairs[1]
                Expect.equal dataset.PromptLengths[1] (encode spanned).Length "bos + the prompt's tokens but its last: '.\"' spans the boundary and is trained"
                Expect.isTrue (dataset.Rows |> Array.forall (fun r -> r[0] = bos)) "rows start with bos"
                use batch = Batching.collate opts.MaxSeqLen endOfText dataset [| 0; 1; 2 |]
                let width = int batch.InputIds.shape[1]
                let labels = batch.Labels.data<int64>().ToArray()
                dataset.Rows |> Array.iteri (fun r row ->
                    let rowLabels = labels[r * width .. r * width + row.Length - 1]
                    let prompt = dataset.PromptLengths[r]
                    Expect.equal rowLabels (Array.append (Array.create prompt Loss.IgnoreIndex) row[prompt..]) (sprintf "row %d" r)))
        }
        test "rows are cut to max-seq-len keeping their beginning" {
            withData "t.jsonl" (json {| text = String.replicate 50 "word " |}) (fun path ->
                let row = (PromptDataset.load path { options with MaxSeqLen = 7 } (cl100k (ref 0) None)).Dataset.Rows[0]
                let all = encode (String.replicate 50 "word ")
                Expect.equal row all[..6] "first 7 tokens")
        }
        test "cross packing cuts the eos-separated stream into rows of exactly max-seq-len" {
            let texts = [| for i in 1 .. 9 -> sprintf "Sample number %d says %s." i (String.replicate i "la ") |]
            withData "t.jsonl" (jsonLines (texts |> Array.map (fun t -> box {| text = t |}))) (fun path ->
                let dataset = (PromptDataset.load path { options with Packing = true; PackingAttention = PackingAttention.Cross; MaxSeqLen = 16 } (cl100k (ref 0) None)).Dataset
                let stream = texts |> Array.collect (fun t -> Array.append (encode t) [| endOfText |])
                Expect.equal (Array.concat dataset.Rows) stream "the concatenation of all samples, each followed by eos"
                Expect.isTrue (dataset.Rows[.. dataset.Rows.Length - 2] |> Array.forall (fun r -> r.Length = 16)) "full rows"
                Expect.isTrue (dataset.Rows[dataset.Rows.Length - 1].Length <= 16) "last row"
                Expect.equal (dataset.Rows |> Array.sumBy (Array.filter ((=) endOfText) >> Array.length)) texts.Length "one eos per sample"
                Expect.isTrue (dataset.PromptLengths |> Array.forall ((=) 0)) "every token trained on"
                Expect.isEmpty dataset.Segments "one sequence per row"
                Expect.equal dataset.Lines[0] 1 "the first row starts in line 1")
        }
        test "data split boundaries equal DeepSpeed-Chat's get_raw_dataset_split_index (values from its Python)" {
            Expect.equal (PromptDataset.splitBoundaries "2,4,4" 10) [| 0; 2; 6; 10 |] "exact"
            Expect.equal (PromptDataset.splitBoundaries "2,4,4" 7) [| 0; 1; 4; 7 |] "1.4, 2.8, 2.8 rounded"
            Expect.equal (PromptDataset.splitBoundaries "2,4,4" 1) [| 0; 1; 1; 1 |] "all round to 0, shifted up by 1"
            Expect.equal (PromptDataset.splitBoundaries "1,1" 5) [| 0; 3; 5 |] "2.5 rounds half to even, then shifted"
            Expect.equal (PromptDataset.splitBoundaries "1,1,1" 10) [| 0; 4; 7; 10 |] "3.33 three times sums to 9: every boundary shifted up by 1"
            Expect.equal (PromptDataset.splitBoundaries "2,4,4" 23) [| 0; 5; 14; 23 |] "4.6, 9.2, 9.2 rounded"
            Expect.equal (PromptDataset.splitBoundaries "10" 4) [| 0; 4 |] "one share"
        }
        test "a data split keeps the first share of the seeded shuffle, in shuffled order" {
            let texts = [| for i in 1 .. 23 -> sprintf "text %d" i |]
            withData "t.jsonl" (jsonLines (texts |> Array.map (fun t -> box {| text = t |}))) (fun path ->
                let opts = { options with DataSplit = Some "2,4,4"; Seed = 1234L }
                let dataset = (PromptDataset.load path opts (cl100k (ref 0) None)).Dataset
                let expected = (Sampler.shuffled 1234L 0 23)[.. 4]
                Expect.equal dataset.Lines (expected |> Array.map ((+) 1)) "round(0.2 * 23) = 5 rows of the shuffle"
                Expect.equal (PromptDataset.splitIndices "2,4,4" 1234L 23) expected "splitIndices")
        }
        test "an eval ratio holds out a seeded fraction, at least one row, and keeps the rest for training" {
            let texts = [| for i in 1 .. 20 -> sprintf "text %d" i |]
            withData "t.jsonl" (jsonLines (texts |> Array.map (fun t -> box {| text = t |}))) (fun path ->
                let tokenizer = cl100k (ref 0) None
                let run ratio seed = PromptDataset.loadTrainAndEval path None { options with EvalSplitRatio = ratio; Seed = seed } tokenizer
                let a = run 0.25 7L
                let eval = a.Eval.Value
                Expect.equal eval.Lines.Length 5 "a quarter"
                Expect.equal (Array.sort (Array.append a.Train.Lines eval.Lines)) [| 1 .. 20 |] "disjoint, together everything"
                Expect.equal (a.EvalSamples |> Array.map (fun s -> s.Line)) eval.Lines "eval samples match the eval rows"
                Expect.equal (a.EvalSamples |> Array.map (fun s -> s.Answer)) (eval.Lines |> Array.map (fun l -> texts[l - 1])) "eval text"
                Expect.equal (run 0.25 7L).Eval.Value.Lines eval.Lines "same seed, same split"
                Expect.notEqual (run 0.25 8L).Eval.Value.Lines eval.Lines "another seed, another split"
                Expect.equal (run 0.001 7L).Eval.Value.Lines.Length 1 "at least one row"
                Expect.equal (run 0.99 7L).Train.Lines.Length 1 "training keeps one row")
        }
        test "an evaluation file gives eval rows and their samples" {
            use folder = new TempFolder()
            let trainPath, evalPath = folder.File "train.jsonl", folder.File "eval.json"
            File.WriteAllText(trainPath, jsonLines (pairs |> Array.map (fun (p, a) -> box {| prompt = p; chosen = a |})))
            File.WriteAllText(evalPath, jsonArray [| box {| from_human = "1 + 1 ="; from_gpt = " 2" |} |])
            let loaded = PromptDataset.loadTrainAndEval trainPath (Some evalPath) { options with TrainOn = TrainOn.Completion } (cl100k (ref 0) None)
            Expect.equal loaded.Train.Rows.Length 3 "train rows"
            Expect.equal (plain loaded.EvalSamples) [| "1 + 1 =", " 2", 1 |] "eval samples"
            Expect.equal loaded.Eval.Value.Rows [| Array.concat [ encode "1 + 1 ="; encode " 2"; [| endOfText |] ] |] "eval rows"
            Expect.equal loaded.Eval.Value.PromptLengths [| (encode "1 + 1 =").Length |] "eval prompt masked"
            Expect.equal loaded.Eval.Value.Path evalPath "eval path"
        }
        test "pre-tokenized rows are used as they are" {
            withData "ids.jsonl" "{\"input_ids\": [5, 6, 7]}\n{\"input_ids\": [8, 9]}\n" (fun path ->
                let dataset = (PromptDataset.load path options (cl100k (ref 0) None)).Dataset
                Expect.equal dataset.Rows [| [| 5L; 6L; 7L |]; [| 8L; 9L |] |] "no bos or eos added")
        }
        test "a missing field names file and line, or is skipped and counted" {
            let content = jsonLines [ box {| prompt = "a"; chosen = "b" |}; box {| prompt = "c" |}; box {| prompt = "d"; chosen = "e" |} ]
            withData "d.jsonl" content (fun path ->
                expectInvalid path "2" "no \"chosen\" field" (fun () -> PromptDataset.load path options (cl100k (ref 0) None) |> ignore)
                let loaded = PromptDataset.load path { options with SkipBadRows = true } (cl100k (ref 0) None)
                Expect.equal loaded.Skipped 1 "one skipped"
                Expect.equal loaded.Dataset.Lines [| 1; 3 |] "the others kept")
        }
        test "a line that is not JSON names its line, or is skipped and counted" {
            withData "d.jsonl" "{\"text\": \"a\"}\n{\"text\": \"b\"\n\n{\"text\": \"c\"}\n" (fun path ->
                expectInvalid path "2" "not valid JSON" (fun () -> PromptDataset.load path options (cl100k (ref 0) None) |> ignore)
                let loaded = PromptDataset.load path { options with SkipBadRows = true } (cl100k (ref 0) None)
                Expect.equal (loaded.Skipped, loaded.Dataset.Lines) (1, [| 1; 4 |]) "skipped line 2")
        }
        test "a field of the wrong type names its line" {
            withData "d.jsonl" "{\"prompt\": \"a\", \"chosen\": \"b\"}\n{\"prompt\": 3, \"chosen\": \"b\"}\n" (fun path ->
                expectInvalid path "2" "\"prompt\" must be a string, found a JSON number" (fun () -> PromptDataset.load path options (cl100k (ref 0) None) |> ignore))
        }
        test "a bad element of a JSON array names the element and its line" {
            withData "d.json" "[\n  {\"text\": \"a\"},\n  {\"txt\": \"b\"}\n]" (fun path ->
                expectInvalid path "element 2 (line 3)" "no \"text\" field" (fun () -> PromptDataset.load path options (cl100k (ref 0) None) |> ignore))
        }
        test "invalid UTF-8 names its line even when bad rows are skipped" {
            use folder = new TempFolder()
            let path = folder.File "d.jsonl"
            File.WriteAllBytes(path, Array.concat [ Encoding.UTF8.GetBytes "{\"text\": \"a\"}\n{\"text\": \"b"; [| 0xC3uy; 0x28uy |]; Encoding.UTF8.GetBytes "\"}\n" ])
            expectInvalid path "2" "UTF-8" (fun () -> PromptDataset.load path { options with SkipBadRows = true } (cl100k (ref 0) None) |> ignore)
        }
        test "an empty file is an error even when bad rows are skipped" {
            for content in [ ""; "\n  \n"; "[]" ] do
                withData "d.jsonl" content (fun path ->
                    expectInvalid path "" "no samples" (fun () -> PromptDataset.load path { options with SkipBadRows = true } (cl100k (ref 0) None) |> ignore))
        }
        test "an object of no known shape asks for field names" {
            withData "d.jsonl" "{\"q\": \"a\", \"r\": \"b\"}\n" (fun path ->
                expectInvalid path "1" "--prompt-field" (fun () -> PromptDataset.load path options (cl100k (ref 0) None) |> ignore))
        }
        test "a prompt that fills max-seq-len leaves nothing to train on: an error naming the line, or a counted skip" {
            let long = String.replicate 40 "token "
            let content = jsonLines [ box {| prompt = "short"; chosen = " answer" |}; box {| prompt = long; chosen = " answer" |} ]
            withData "d.jsonl" content (fun path ->
                let opts = { options with TrainOn = TrainOn.Completion; MaxSeqLen = 16 }
                expectInvalid path "2" "nothing left to train on" (fun () -> PromptDataset.load path opts (cl100k (ref 0) None) |> ignore)
                let loaded = PromptDataset.load path { opts with SkipBadRows = true } (cl100k (ref 0) None)
                Expect.equal (loaded.Skipped, loaded.Dataset.Lines) (1, [| 1 |]) "the long prompt is skipped"
                let all = PromptDataset.load path { opts with TrainOn = TrainOn.All } (cl100k (ref 0) None)
                Expect.equal all.Dataset.Rows[1].Length 16 "training on all tokens keeps it, cut to max-seq-len")
        }
        test "conflicting options name the option" {
            withData "d.jsonl" "{\"text\": \"a\"}\n" (fun path ->
                let load opts () = PromptDataset.load path opts (cl100k (ref 0) None) |> ignore
                expectInvalid "--packing" "" "--packing-attention isolated" (load { options with Packing = true; PackingAttention = PackingAttention.Cross; TrainOn = TrainOn.Completion })
                expectInvalid "--data-format" "" "auto" (load { options with Format = DataFormat.Text; Fields = { PromptDataset.noFields with Text = Some "text" } })
                expectInvalid "--data-split" "" "2,4,4" (load { options with DataSplit = Some "2,x" })
                expectInvalid "--eval-split-ratio" "" "[0, 1)" (load { options with EvalSplitRatio = 1.0 })
                expectInvalid "--max-seq-len" "" "at least 1" (load { options with MaxSeqLen = 0 }))
        }
        test "data formats parse from their CLI names" {
            Expect.equal (PromptDataset.parseFormat "deepspeed_chat") DataFormat.DeepSpeedChat "deepspeed_chat"
            Expect.equal (PromptDataset.parseFormat "Alpaca") DataFormat.Alpaca "Alpaca"
            expectInvalid "--data-format" "" "found \"csv\"" (fun () -> PromptDataset.parseFormat "csv" |> ignore)
        }
    ]
