/// Interoperability: sharded safetensors and fp16/bf16 weights as HF's save_pretrained writes them, dropout as
/// config.json says (and --disable-dropout), token-embedding resize with HF's mean-resizing rule, and the export
/// and eval commands.
module Functional.Tests.InteropTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Models
open Functional.Tests.TestUtil

let private tensorsOf (model: CausalLm) =
    [ for struct (name, p) in model.Module.named_parameters () -> name, p.detach().clone () ]

let private bitsEqual (a: torch.Tensor) (b: torch.Tensor) = a.dtype = b.dtype && a.shape = b.shape && a.Equals b

let private gpt2 (c: Gpt2Config) seed = CausalLm.create (Gpt2 c) seed
let private llama (c: LlamaConfig) seed = CausalLm.create (Llama c) seed

let private weightFiles (folder: string) =
    Directory.GetFiles(folder, "*.safetensors") |> Array.map Path.GetFileName |> Array.sort |> List.ofArray

let private sizeTests =
    testList "max_shard_size" [
        test "HF's size strings: decimal and binary units, bits with a lowercase b, plain bytes" {
            let cases =
                [ "2GB", 2_000_000_000L; "2GiB", 2L * (1L <<< 30); "500MB", 500_000_000L; "100KB", 100_000L
                  "10MiB", 10L * 1048576L; "1KiB", 1024L; "1.5GB", 1_500_000_000L; "8Gb", 1_000_000_000L
                  "8mb", 1_000_000L; "5gB", 5_000_000_000L; "1TB", 1_000_000_000_000L; "123456", 123456L ]
            for text, expected in cases do
                Expect.equal (WeightsFormat.tryParseSize text) (Some expected) text
        }
        test "a bad size names the setting, the value and what was expected" {
            for bad in [ "2XB"; "GB"; "-5GB"; "0"; ""; "5 G B" ] do
                Expect.isNone (WeightsFormat.tryParseSize bad) bad
            try
                WeightsFormat.parseSize "max_shard_size" "2XB" |> ignore
                failtest "expected an error"
            with :? InvalidInputException as (CommandLine e) ->
                Expect.stringContains e.Message "--max-shard-size" "names the flag"
                Expect.stringContains e.Message "2XB: expected" "names the value"
                Expect.stringContains e.Message "5GB, 500MB" "says what is expected"
        }
        torchTest "a bad dtype names the setting and the choices" (fun () ->
            Expect.equal (WeightsFormat.parseDType "dtype" "BF16") torch.bfloat16 "bf16"
            Expect.equal (WeightsFormat.parseDType "dtype" "float16") torch.float16 "float16"
            try
                WeightsFormat.parseDType "dtype" "int8" |> ignore
                failtest "expected an error"
            with :? InvalidInputException as (CommandLine e) ->
                Expect.stringContains e.Message "--dtype: int8: expected fp32, bf16 or fp16" e.Message)
        test "HF's split: in state-dict order, a new shard when the next tensor would pass the limit" {
            let shards = WeightsFormat.split 10L [ "a", 6L; "b", 6L; "c", 2L; "d", 6L; "e", 2L; "f", 2L ]
            Expect.equal (shards |> List.map (fun s -> s.Tensors)) [ [ "a" ]; [ "b"; "c" ]; [ "d"; "e"; "f" ] ] "[6] [6+2] [6+2+2]"
            Expect.equal (shards |> List.map (fun s -> s.FileName))
                [ "model-00001-of-00003.safetensors"; "model-00002-of-00003.safetensors"; "model-00003-of-00003.safetensors" ] "names"
        }
        test "HF's split: a tensor over the limit gets its own shard at once, before the shard being filled" {
            let shards = WeightsFormat.split 10L [ "a", 4L; "b", 4L; "big", 20L; "c", 2L; "d", 5L ]
            Expect.equal (shards |> List.map (fun s -> s.Tensors)) [ [ "big" ]; [ "a"; "b"; "c" ]; [ "d" ] ] "HF's order"
        }
        test "one shard is model.safetensors" {
            Expect.equal (WeightsFormat.split 100L [ "a", 6L; "b", 6L ]) [ { FileName = "model.safetensors"; Tensors = [ "a"; "b" ] } ] "single"
        }
        testProperty "every tensor lands in exactly one shard, in order, and no shard of several tensors passes the limit" <|
            fun (sizes: FsCheck.PositiveInt list) (limit: FsCheck.PositiveInt) ->
                let tensors = sizes |> List.mapi (fun i s -> sprintf "t%03d" i, int64 s.Get)
                let shards = WeightsFormat.split (int64 limit.Get) tensors
                let sizeOf = Map.ofList tensors
                let all = shards |> List.collect (fun s -> s.Tensors)
                List.sort all = List.map fst tensors
                && shards |> List.forall (fun s -> s.Tensors.Length <= 1 || (s.Tensors |> List.sumBy (fun t -> sizeOf[t])) <= int64 limit.Get)
    ]

let private folderTests =
    testList "model folders" [
        torchTest "sharded save: HF's file names, the index's total_size and weight_map, and a bit-exact load" (fun () ->
            use folder = new TempFolder()
            let model = llama tinyLlama 3L
            let path = folder.File "model"
            HfModelFolder.saveAs path model None [] { WeightsFormat.defaults with MaxShardSize = 2000L }
            let files = weightFiles path
            Expect.isGreaterThan files.Length 1 "several shards"
            Expect.equal files.Head (sprintf "model-00001-of-%05d.safetensors" files.Length) "HF's shard names"
            Expect.isFalse (File.Exists(Path.Combine(path, "model.safetensors"))) "no single file"
            use index = JsonDocument.Parse(File.ReadAllText(Path.Combine(path, "model.safetensors.index.json")))
            let parameters = tensorsOf model
            let bytes = parameters |> List.sumBy (fun (_, t) -> t.numel () * 4L)
            Expect.equal (index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64()) bytes "total_size: the tensor bytes"
            Expect.equal (index.RootElement.GetProperty("metadata").GetProperty("total_parameters").GetInt64()) (parameters |> List.sumBy (fun (_, t) -> t.numel ())) "total_parameters"
            let map = [ for p in index.RootElement.GetProperty("weight_map").EnumerateObject() -> p.Name, p.Value.GetString() ]
            Expect.equal (List.map fst map) (parameters |> List.map fst |> List.sortWith (fun a b -> String.CompareOrdinal(a, b))) "every tensor, sorted"
            for name, file in map do
                let header = Safetensors.readHeader (Path.Combine(path, file))
                Expect.isTrue (header.Entries |> List.exists (fun e -> e.Name = name)) (sprintf "%s is in %s" name file)
                Expect.equal header.Metadata (Map [ "format", "pt" ]) "each shard says format pt"
            let loaded = HfModelFolder.load path 9L
            for (name, expected), (_, actual) in List.zip parameters (tensorsOf loaded) do
                Expect.isTrue (bitsEqual actual expected) (name + " loads bit for bit"))

        torchTest "bf16 and fp16: stored as BF16/F16, torch_dtype says so, loaded widened exactly, re-exported bit for bit" (fun () ->
            for dtype, code, name in [ torch.bfloat16, "BF16", "bfloat16"; torch.float16, "F16", "float16" ] do
                use folder = new TempFolder()
                let model = gpt2 { tinyGpt2 with TieWordEmbeddings = false } 4L
                let first = folder.File "first"
                HfModelFolder.saveAs first model None [] { WeightsFormat.defaults with DType = dtype }
                let header = Safetensors.readHeader (Path.Combine(first, "model.safetensors"))
                Expect.isTrue (header.Entries |> List.forall (fun e -> Safetensors.dtypeCode e.DType = code)) (code + " everywhere")
                use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(first, "config.json")))
                Expect.equal (config.RootElement.GetProperty("torch_dtype").GetString()) name "torch_dtype"
                Expect.equal (HfModelFolder.storedDType first) dtype "storedDType"
                let loaded = HfModelFolder.load first 1L
                for (n, original), (_, actual) in List.zip (tensorsOf model) (tensorsOf loaded) do
                    Expect.equal actual.dtype torch.float32 "loaded as float32"
                    use rounded = original.to_type(dtype).to_type(torch.float32)
                    Expect.isTrue (bitsEqual actual rounded) (n + ": torch's rounding, widened exactly")
                let second = folder.File "second"
                HfModelFolder.saveAs second loaded (Some(File.ReadAllText(Path.Combine(first, "config.json")))) [] { WeightsFormat.defaults with DType = dtype }
                Expect.sequenceEqual (File.ReadAllBytes(Path.Combine(second, "model.safetensors"))) (File.ReadAllBytes(Path.Combine(first, "model.safetensors"))) "the same bytes again")

        torchTest "a source config's dtype key follows the stored dtype; fp32 folders keep float32" (fun () ->
            use folder = new TempFolder()
            let model = gpt2 tinyGpt2 4L
            let source = """{"model_type": "gpt2", "dtype": "float32", "torch_dtype": "float32", "bos_token_id": 5}"""
            let text = HfModelFolder.configJsonAs model (Some source) torch.bfloat16
            use config = JsonDocument.Parse text
            Expect.equal (config.RootElement.GetProperty("dtype").GetString()) "bfloat16" "dtype"
            Expect.equal (config.RootElement.GetProperty("torch_dtype").GetString()) "bfloat16" "torch_dtype"
            Expect.equal (config.RootElement.GetProperty("bos_token_id").GetInt32()) 5 "other keys kept"
            use plain = JsonDocument.Parse(HfModelFolder.configJson model None)
            Expect.equal (plain.RootElement.GetProperty("torch_dtype").GetString()) "float32" "fp32")

        torchTest "writing shards in bf16 and drawing resized rows leave no live tensor behind" (fun () ->
            use folder = new TempFolder()
            let model = llama tinyLlama 3L
            let live () = DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
            let embedding = (dict (tensorsOf model))["model.embed_tokens.weight"]
            let once () =
                HfModelFolder.writeWeightsAs folder.Path model { DType = torch.bfloat16; MaxShardSize = 3000L } |> ignore
                use generator = new torch.Generator(1UL)
                use rows = TokenEmbeddings.meanResizedRows embedding 4L generator
                ()
            once ()
            let settled = live ()
            for _ in 1 .. 3 do once ()
            Expect.equal (live ()) settled "saves and draws create no lasting tensor")

        torchTest "a failing save leaves the folder saved before untouched" (fun () ->
            use folder = new TempFolder()
            let path = folder.File "model"
            let model = gpt2 tinyGpt2 4L
            HfModelFolder.save path model None []
            let before = snapshot path
            try
                HfModelFolder.saveAs path model None [ folder.File "no-such-tokenizer.json" ] { WeightsFormat.defaults with MaxShardSize = 100L }
                failtest "expected the copy to fail"
            with :? FileNotFoundException -> ()
            Expect.equal (snapshot path) before "the old folder is as it was"
            Expect.isEmpty (Directory.GetDirectories(folder.Path) |> Array.filter (fun d -> Path.GetFileName(d).StartsWith ".")) "no staging left")
    ]

/// Two training-mode forwards of the same model on the same ids, and one in eval mode.
let private forwards (model: CausalLm) =
    use ids = torch.tensor([| 1L; 2L; 3L; 4L; 5L; 6L; 7L; 8L |]).view(2L, 4L)
    model.Module.train ()
    let a = model.Module.forward ids
    let b = model.Module.forward ids
    model.Module.eval ()
    let e = model.Module.forward ids
    a, b, e

let private bloomJson (p: float) =
    sprintf """{"model_type": "bloom", "vocab_size": 40, "hidden_size": 16, "n_head": 2, "n_layer": 2, "hidden_dropout": %g, "attention_dropout": %g}""" p p

let private optJson (p: float) =
    sprintf """{"model_type": "opt", "vocab_size": 40, "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": 32, "word_embed_proj_dim": 16, "dropout": %g, "attention_dropout": %g}""" p p

let private dropoutTests =
    testList "dropout" [
        for name, withDropout, withoutIt in
            [ "GPT-2 resid/embd/attn_pdrop", Gpt2 { tinyGpt2 with ResidPdrop = 0.1; EmbdPdrop = 0.1; AttnPdrop = 0.1 }, Gpt2 tinyGpt2
              "GPT-2 attn_pdrop alone", Gpt2 { tinyGpt2 with AttnPdrop = 0.3 }, Gpt2 tinyGpt2
              "LLaMA attention_dropout", Llama { tinyLlama with AttentionDropout = 0.3 }, Llama tinyLlama
              "BLOOM hidden/attention_dropout", ModelConfig.parse "b.json" (bloomJson 0.3), ModelConfig.parse "b.json" (bloomJson 0.0)
              "OPT dropout/attention_dropout", ModelConfig.parse "o.json" (optJson 0.3), ModelConfig.parse "o.json" (optJson 0.0) ] do
            torchTest (name + ": training mode with p > 0 differs run to run, eval mode equals p = 0") (fun () ->
                let dropped = CausalLm.create withDropout 5L
                let plain = CausalLm.create withoutIt 5L
                let a, b, e = forwards dropped
                let pa, pb, pe = forwards plain
                Expect.isFalse (a.Equals b) "two training forwards differ"
                Expect.isTrue (e.Equals pe) "eval mode equals the model without dropout"
                Expect.isTrue (pa.Equals pb) "without dropout training forwards agree"
                Expect.isTrue (pa.Equals pe) "and equal eval mode"
                let disabled = CausalLm.create (ModelFamily.withoutDropout withDropout) 5L
                let da, db, _ = forwards disabled
                Expect.isTrue (da.Equals db && da.Equals pa) "withoutDropout: training forwards equal the p = 0 model")
        test "withoutDropout sets every probability to 0 and the saved config.json says so" {
            let config = ModelFamily.withoutDropout (Gpt2 { tinyGpt2 with ResidPdrop = 0.1; EmbdPdrop = 0.2; AttnPdrop = 0.3 })
            use json = JsonDocument.Parse(ModelConfig.toJson config)
            for key in [ "resid_pdrop"; "embd_pdrop"; "attn_pdrop" ] do
                Expect.equal (json.RootElement.GetProperty(key).GetDouble()) 0.0 key
            match ModelFamily.withoutDropout (Llama { tinyLlama with AttentionDropout = 0.4 }) with
            | Llama c -> Expect.equal c.AttentionDropout 0.0 "attention_dropout"
            | _ -> failtest "family changed"
        }
    ]

let private resizeTests =
    testList "token embedding resize" [
        test "the target size: HF's pad_to_multiple_of over len(tokenizer), added tokens grow the embeddings" {
            Expect.equal (TokenEmbeddings.targetSize 50257 50257 8) 50264 "GPT-2: 8 * ceil(50257 / 8)"
            Expect.equal (TokenEmbeddings.targetSize 32000 32000 8) 32000 "already a multiple"
            Expect.equal (TokenEmbeddings.targetSize 151936 151665 8) 151672 "may shrink, as HF's"
            Expect.equal (TokenEmbeddings.targetSize 100 0 8) 104 "no tokenizer: the current size padded"
            Expect.equal (TokenEmbeddings.targetSize 100 103 0) 103 "added tokens"
            Expect.equal (TokenEmbeddings.targetSize 100 90 0) 100 "a smaller tokenizer changes nothing without a multiple"
        }
        torchTest "growing an untied LLaMA: old rows kept, new rows m + L e from one seeded generator, embedding then head" (fun () ->
            // Width 16 with 40 rows: the covariance is positive definite.
            let model = llama { tinyLlama with VocabSize = 40 } 6L
            let resized = TokenEmbeddings.resize model 45 11L
            Expect.equal (ModelConfig.vocabSize resized.Config) 45 "config vocab_size follows"
            let before, after = dict (tensorsOf model), dict (tensorsOf resized)
            use generator = new torch.Generator(11UL)
            for name in [ "model.embed_tokens.weight"; "lm_head.weight" ] do
                let old, now = before[name], after[name]
                Expect.sequenceEqual now.shape [| 45L; 16L |] (name + " shape")
                Expect.isTrue (now.narrow(0L, 0L, 40L).Equals old) (name + ": the old rows unchanged")
                // The rule written out: mean, covariance / N, 1e-9 scale, Cholesky, e ~ N(0, I).
                let w = old.to_type torch.float64
                let mean = w.mean([| 0L |])
                let centered = w - mean
                let covariance = centered.t().matmul(centered) / 40.0 * 1e-9
                let factor = torch.linalg.cholesky covariance
                let e = torch.randn([| 5L; 16L |], dtype = torch.float32, generator = generator).to_type torch.float64
                let expected = mean.unsqueeze(0) + e.matmul(factor.t())
                expectClose 1e-6 (now.narrow(0L, 40L, 5L).to_type torch.float64) expected (name + ": new rows")
                let spread = (now.narrow(0L, 40L, 5L).to_type torch.float64 - mean).abs().max().item<float> ()
                Expect.isLessThan spread 1e-3 (name + ": new rows lie close to the mean (covariance scaled by 1e-9)")
            for KeyValue(name, t) in before do
                if name <> "model.embed_tokens.weight" && name <> "lm_head.weight" then
                    Expect.isTrue (after[name].Equals t) (name + " copied"))
        torchTest "a tied GPT-2: the head follows the embedding; a non-positive-definite covariance gives the mean" (fun () ->
            let model = gpt2 tinyGpt2 6L
            let resized = TokenEmbeddings.resize model 20 1L
            let weight = dict (tensorsOf resized)
            Expect.isFalse (weight.ContainsKey "lm_head.weight") "still tied"
            use ids = torch.tensor([| 18L; 19L |]).view(1L, 2L)
            resized.Module.eval ()
            use logits = resized.Module.forward ids
            Expect.sequenceEqual logits.shape [| 1L; 2L; 20L |] "logits over the new vocabulary"
            use degenerate = torch.ones(4L, 8L)
            use rows = TokenEmbeddings.meanResizedRows degenerate 3L (new torch.Generator(1UL))
            Expect.isTrue (rows.Equals(torch.ones(3L, 8L))) "singular covariance: the mean, as HF")
        torchTest "PyTorch: new rows equal MultivariateNormal(m, 1e-9 S).sample after torch.manual_seed (tests/golden/resize-embeddings)" (fun () ->
            let golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(goldenDir "resize-embeddings", "resize.json"))).RootElement
            let matrix (name: string) =
                let rows = [| for r in golden.GetProperty(name).EnumerateArray() -> [| for x in r.EnumerateArray() -> float32 (x.GetDouble()) |] |]
                let flat : float32[] = Array.concat rows
                torch.tensor(flat, dtype = torch.float32).view(int64 rows.Length, int64 rows[0].Length)
            use old = matrix "old"
            use expected = matrix "new_rows"
            use generator = new torch.Generator(uint64 (golden.GetProperty("seed").GetInt64()))
            use actual = TokenEmbeddings.meanResizedRows old expected.shape[0] generator
            use mean = old.mean([| 0L |])
            // The rows lie within ~1e-5 of the mean: compare their offsets from it, relative to their size.
            use offsetActual = (actual - mean).to_type torch.float64
            use offsetExpected = (expected - mean).to_type torch.float64
            let relative = (offsetActual - offsetExpected).norm().item<float> () / offsetExpected.norm().item<float> ()
            Expect.isLessThan relative 1e-4 (sprintf "offsets from the mean agree (relative L2 error %g)" relative))
        torchTest "BLOOM and OPT resize through the same backbone and head" (fun () ->
            for config in [ ModelConfig.parse "b.json" (bloomJson 0.0); ModelConfig.parse "o.json" (optJson 0.0) ] do
                let model = CausalLm.create config 2L
                let resized = TokenEmbeddings.resize model 48 3L
                Expect.equal (ModelConfig.vocabSize resized.Config) 48 "vocab_size"
                use ids = torch.tensor([| 1L; 47L |]).view(1L, 2L)
                resized.Module.eval ()
                use logits = resized.Module.forward ids
                Expect.sequenceEqual logits.shape [| 1L; 2L; 48L |] "logits over the new vocabulary")
        torchTest "shrinking keeps the first rows; the same size is the model itself" (fun () ->
            let model = llama { tinyLlama with VocabSize = 40 } 6L
            let smaller = TokenEmbeddings.resize model 32 1L
            let kept = (dict (tensorsOf smaller))["model.embed_tokens.weight"]
            let original = (dict (tensorsOf model))["model.embed_tokens.weight"]
            let first = original.narrow(0L, 0L, 32L)
            Expect.isTrue (kept.Equals first) "first rows"
            Expect.isTrue (obj.ReferenceEquals(TokenEmbeddings.resize model 40 1L, model)) "no change")
    ]

let private builderTests =
    testList "builder" [
        for name, configure, origin in
            [ "UseMaxShardSize", (fun (b: TrainerBuilder) -> b.UseMaxShardSize "2XB"), "UseMaxShardSize"
              "ResizeTokenEmbeddingsToMultipleOf", (fun (b: TrainerBuilder) -> b.ResizeTokenEmbeddingsToMultipleOf -8), "ResizeTokenEmbeddingsToMultipleOf" ] do
            test (name + ": Build names the call") {
                let builder = configure (Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out"))
                try
                    builder.Build() |> ignore
                    failtest "expected InvalidInputException"
                with :? InvalidInputException as e -> Expect.equal e.Origin origin e.Message
            }
        test "DisableDropout, ResizeTokenEmbeddingsToMultipleOf and UseMaxShardSize pass Build" {
            Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out")
                .DisableDropout().ResizeTokenEmbeddingsToMultipleOf(8).UseMaxShardSize("2GiB").Build() |> ignore
        }
    ]

[<Tests>]
let tests = testList "interop" [ sizeTests; folderTests; dropoutTests; resizeTests; builderTests ]

// ---- the command line (end-to-end: Program.endToEnd lists "interop cli") ----

let private expectExit (code: int) (run: CliRun) =
    Expect.equal run.ExitCode code (sprintf "exit code %d (stdout: %s; stderr: %s)" code run.Stdout run.Stderr)

/// Exit code 2 and one `error:` line holding every part.
let private expectError (parts: string list) (run: CliRun) =
    expectExit 2 run
    let errors = run.Stderr.Split('\n') |> Array.filter (fun l -> l.StartsWith "error:")
    Expect.equal errors.Length 1 (sprintf "one error line: %s" run.Stderr)
    for part in parts do Expect.stringContains errors[0] part "the error explains"

/// A copy of the golden GPT-2 model folder whose config.json the edit changes.
let private goldenGpt2 (folder: TempFolder) (edit: Nodes.JsonObject -> unit) =
    let model = folder.File "model"
    copyFolder (Path.Combine(goldenDir "gpt2-linear", "model")) model
    let config = Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json"))).AsObject()
    edit config
    File.WriteAllText(Path.Combine(model, "config.json"), config.ToJsonString())
    model

let private goldenData = Path.Combine(goldenDir "gpt2-linear", "data.jsonl")

let private configOf (folder: string) = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "config.json"))).RootElement

let private cliTests =
    testList "interop cli" [
        test "export --dtype bf16 --max-shard-size: HF's shards, and exporting the export again is bit-exact" {
            use folder = new TempFolder()
            let source = Path.Combine(goldenDir "gpt2-linear", "model")
            let first = folder.File "bf16"
            expectExit 0 (runCli [ "export"; "--model"; source; "--output"; first; "--dtype"; "bf16"; "--max-shard-size"; "20KB" ])
            let files = weightFiles first
            Expect.isGreaterThan files.Length 1 "sharded"
            Expect.isTrue (File.Exists(Path.Combine(first, "model.safetensors.index.json"))) "the index"
            Expect.equal ((configOf first).GetProperty("torch_dtype").GetString()) "bfloat16" "torch_dtype"
            Expect.equal ((configOf first).GetProperty("bos_token_id").GetInt32()) 95 "the source's other keys kept"
            let again = folder.File "again"
            let run = runCli [ "export"; "--model"; first; "--output"; again; "--max-shard-size"; "20KB" ]
            expectExit 0 run
            Expect.stringContains run.Stdout "bf16" "the stored dtype is kept without --dtype"
            for f in files @ [ "model.safetensors.index.json" ] do
                Expect.sequenceEqual (File.ReadAllBytes(Path.Combine(again, f))) (File.ReadAllBytes(Path.Combine(first, f))) (f + " bit for bit")
            let widened = folder.File "fp32"
            expectExit 0 (runCli [ "export"; "--model"; first; "--output"; widened; "--dtype"; "fp32" ])
            Expect.equal (weightFiles widened) [ "model.safetensors" ] "one file under 5GB"
            Functional.Runtime.TorchRuntime.ensure ()
            let original = HfModelFolder.load source 1L
            let exported = HfModelFolder.load widened 1L
            for (name, o), (_, e) in List.zip (tensorsOf original) (tensorsOf exported) do
                use rounded = o.to_type(torch.bfloat16).to_type(torch.float32)
                Expect.isTrue (bitsEqual e rounded) (name + ": fp32 -> bf16 -> fp32 is torch's rounding")
        }
        test "export refuses a bad size or dtype, naming the flag and the value, and leaves the output alone" {
            use folder = new TempFolder()
            let source = Path.Combine(goldenDir "gpt2-linear", "model")
            let output = folder.File "out"
            Directory.CreateDirectory output |> ignore
            File.WriteAllText(Path.Combine(output, "keep.txt"), "saved before")
            expectError [ "--max-shard-size"; "2XB"; "expected" ] (runCli [ "export"; "--model"; source; "--output"; output; "--max-shard-size"; "2XB" ])
            expectError [ "--dtype"; "int4"; "fp32, bf16 or fp16" ] (runCli [ "export"; "--model"; source; "--output"; output; "--dtype"; "int4" ])
            expectError [ "--merge-lora" ] (runCli [ "export"; "--model"; source; "--output"; output; "--lora-adapter"; folder.File "a" ])
            expectError [ "no-model"; "does not exist" ] (runCli [ "export"; "--model"; folder.File "no-model"; "--output"; output ])
            Expect.equal (Directory.GetFileSystemEntries output |> Array.map Path.GetFileName) [| "keep.txt" |] "the output as it was"
        }
        test "train: --disable-dropout, --resize-token-embeddings-to-multiple-of and --max-shard-size shape final/" {
            use folder = new TempFolder()
            let model = goldenGpt2 folder (fun c -> c["resid_pdrop"] <- Nodes.JsonValue.Create 0.1; c["attn_pdrop"] <- Nodes.JsonValue.Create 0.1)
            let output = folder.File "run"
            let run =
                runCli [ "train"; "--model"; model; "--data"; goldenData; "--output"; output; "--max-steps"; "2"; "--no-data-cache"
                         "--disable_dropout"; "--resize-token-embeddings-to-multiple-of"; "64"; "--max-shard-size"; "30KB" ]
            expectExit 0 run
            let final = Path.Combine(output, "final")
            let config = configOf final
            Expect.equal (config.GetProperty("vocab_size").GetInt32()) 128 "96 -> 64 * ceil(96 / 64)"
            for key in [ "resid_pdrop"; "attn_pdrop"; "embd_pdrop" ] do
                Expect.equal (config.GetProperty(key).GetDouble()) 0.0 (key + " is 0 in the saved config, as DeepSpeed-Chat's")
            Expect.isGreaterThan (weightFiles final).Length 1 "final/ in shards"
            Functional.Runtime.TorchRuntime.ensure ()
            let loaded = HfModelFolder.load final 1L
            Expect.equal (ModelConfig.vocabSize loaded.Config) 128 "final/ loads"
        }
        test "train: a tokenizer with more tokens than vocab_size grows the embeddings to len(tokenizer)" {
            use folder = new TempFolder()
            let samples = Functional.Training.EmbeddedTask.samples 5 24 false
            let model = folder.File "model"
            Functional.Text.BpeTraining.trainToFolder [ for s in samples -> s.Prompt + s.Answer ] 40 model
            let tokens = (Functional.Text.Tokenizers.fromFolder model).VocabSize
            let config =
                sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 64}""" (tokens - 3)
            Functional.Runtime.TorchRuntime.ensure ()
            let weights = folder.File "weights"
            HfModelFolder.save weights (CausalLm.create (ModelConfig.parse "test" config) 1L) None []
            for f in Directory.GetFiles weights do File.Copy(f, Path.Combine(model, Path.GetFileName f), true)
            File.WriteAllLines(folder.File "data.jsonl", [ for s in samples -> JsonSerializer.Serialize(dict [ "prompt", s.Prompt; "chosen", s.Answer ]) ])
            let output = folder.File "run"
            expectExit 0 (runCli [ "train"; "--model"; model; "--data"; folder.File "data.jsonl"; "--output"; output; "--max-steps"; "2"; "--no-data-cache"; "--max-seq-len"; "32" ])
            Expect.equal ((configOf (Path.Combine(output, "final"))).GetProperty("vocab_size").GetInt32()) tokens "vocab_size = len(tokenizer)"
            let trained = HfModelFolder.load (Path.Combine(output, "final")) 1L
            let head = (dict (tensorsOf trained))["lm_head.weight"]
            Expect.sequenceEqual head.shape [| int64 tokens; 16L |] "the untied head grew too"
        }
        test "eval: the same loss as training's evaluation before step 1, written beside the model as eval_results.json" {
            use folder = new TempFolder()
            let model = goldenGpt2 folder ignore
            let run = runCli [ "eval"; "--model"; model; "--data"; goldenData ]
            expectExit 0 run
            use printed = JsonDocument.Parse(run.Stdout.Trim())
            let written = JsonDocument.Parse(File.ReadAllText(Path.Combine(model, "eval_results.json"))).RootElement
            let loss = printed.RootElement.GetProperty("eval_loss").GetDouble()
            Expect.equal (written.GetProperty("eval_loss").GetDouble()) loss "printed and written agree"
            Expect.equal (written.GetProperty("eval_samples").GetInt32()) 13 "every row"
            Expect.floatClose Accuracy.veryHigh (written.GetProperty("eval_perplexity").GetDouble()) (exp loss) "perplexity"
            let output = folder.File "run"
            expectExit 0 (runCli [ "train"; "--model"; model; "--data"; goldenData; "--eval-data"; goldenData; "--output"; output; "--max-steps"; "1"; "--no-data-cache"; "--eval-steps"; "1" ])
            let before = readJsonLines (Path.Combine(output, "metrics.jsonl")) |> Array.find (fun l -> l.GetProperty("step").GetInt32() = 0 && fst (l.TryGetProperty "eval_loss"))
            Expect.floatClose Accuracy.veryHigh (before.GetProperty("eval_loss").GetDouble()) loss "training's evaluation before step 1"
            let elsewhere = folder.File "metrics/eval.json"
            expectExit 0 (runCli [ "eval"; "--model"; model; "--data"; goldenData; "--output"; elsewhere ])
            Expect.isTrue (File.Exists elsewhere) "--output"
        }
        test "eval: bad input names the file, the line and what was expected" {
            use folder = new TempFolder()
            let model = goldenGpt2 folder ignore
            expectError [ "no-model"; "does not exist" ] (runCli [ "eval"; "--model"; folder.File "no-model"; "--data"; goldenData ])
            expectError [ "no-data.jsonl" ] (runCli [ "eval"; "--model"; model; "--data"; folder.File "no-data.jsonl" ])
            File.WriteAllText(folder.File "bad.jsonl", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2")
            expectError [ "bad.jsonl:2" ] (runCli [ "eval"; "--model"; model; "--data"; folder.File "bad.jsonl" ])
            File.WriteAllText(folder.File "big.jsonl", "{\"input_ids\": [1, 200]}\n")
            expectError [ "big.jsonl"; "vocab_size 96" ] (runCli [ "eval"; "--model"; model; "--data"; folder.File "big.jsonl" ])
            expectError [ "--max-seq-len"; "n_positions 64" ] (runCli [ "eval"; "--model"; model; "--data"; goldenData; "--max-seq-len"; "65" ])
            expectError [ "--data"; "required" ] (runCli [ "eval"; "--model"; model ])
            Expect.isFalse (File.Exists(Path.Combine(model, "eval_results.json"))) "nothing written"
        }
    ]

[<Tests>]
let endToEndTests = testSequenced cliTests
