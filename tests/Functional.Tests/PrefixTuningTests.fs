/// Prefix tuning (PEFT's PREFIX_TUNING, PaddleNLP's --prefix_tuning): the prefix's layout and attention
/// semantics against written-out references, training, PEFT's files, resume, the CLI and bad input.
module Functional.Tests.PrefixTuningTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Generation
open Functional.Models
open Functional.Peft
open Functional.Training
open Functional.Tests.TestUtil

// ---------------------------------------------------------------- helpers

let private gpt2Config = Gpt2 tinyGpt2

let private expectInvalid = expectInvalidInput

/// A fresh prefix with values drawn from normal(0, 0.5) by a local generator.
let private randomPrefix (numVirtualTokens: int) (lm: CausalLm) (seed: int64) =
    let adapter = PrefixTuning.create numVirtualTokens lm seed
    use generator = new torch.Generator(uint64 (seed + 1L))
    use _ = torch.no_grad ()
    adapter.Embeddings.normal_(0.0, 0.5, generator) |> ignore
    adapter

let private idsTensor (ids: int64[][]) =
    torch.tensor(Array.concat ids, ReadOnlySpan [| int64 ids.Length; int64 ids[0].Length |])

/// Attention of q (B, H, T, hd) over the prefix keys/values followed by the tokens' (B, H, N + T, hd):
/// every query sees all N prefix positions and the tokens up to its own.
let private attendWithPrefix (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) (n: int64) =
    let T = q.shape[2]
    let keyIndex = torch.arange(0L, n + T, 1L, dtype = torch.int64).unsqueeze(0) // (1, N + T)
    let queryIndex = torch.arange(0L, T, 1L, dtype = torch.int64).unsqueeze(1) // (T, 1)
    let allowed = torch.logical_or(keyIndex.lt(n.ToScalar()), (keyIndex - n).le(queryIndex)) // (T, N + T)
    let scores = q.matmul(k.transpose(-2L, -1L)) / Math.Sqrt(float q.shape[3]) // (B, H, T, N + T)
    let weights = scores.masked_fill(allowed.logical_not(), Double.NegativeInfinity).softmax(-1L)
    weights.matmul(v) // (B, H, T, hd)

/// One layer's prefix keys or values written out from PEFT's layout: in each row of prompt_embeddings,
/// layer l's key is columns [2l * D, (2l + 1) * D) and its value the next D, each split into heads of
/// D / heads. -> (B, heads, N, head_dim).
let private prefixPart (prefix: torch.Tensor) (tokenDim: int64) (heads: int64) (batch: int64) (layer: int) (isValue: bool) =
    let n = prefix.shape[0]
    let start = (2L * int64 layer + (if isValue then 1L else 0L)) * tokenDim
    prefix.narrow(1L, start, tokenDim).reshape(n, heads, tokenDim / heads).permute(1L, 0L, 2L).unsqueeze(0L).expand(batch, heads, n, tokenDim / heads)

/// GPT-2's logits written out: token plus position embeddings with positions N .. N + T - 1, and per
/// block the prefix keys/values concatenated in front of the tokens' in a plain softmax attention.
let private gpt2Reference (lm: CausalLm) (prefix: torch.Tensor) (ids: int64[][]) =
    use scope = torch.NewDisposeScope()
    let c = match lm.Config with Gpt2 c -> c | _ -> failwith "GPT-2 expected"
    let p: Collections.Generic.IDictionary<string, torch.Tensor> = dict [ for struct (name, t) in lm.Module.named_parameters () -> name, t.detach () ]
    let B, T, C, H = int64 ids.Length, int64 ids[0].Length, int64 c.NEmbd, int64 c.NHead
    let n = prefix.shape[0]
    let input = idsTensor ids
    let positions = torch.arange(n, n + T, 1L, dtype = torch.int64)
    let layerNorm (x: torch.Tensor) (name: string) =
        torch.nn.functional.layer_norm(x, [| C |], p[name + ".weight"], p[name + ".bias"], c.LayerNormEpsilon)
    let conv (x: torch.Tensor) (name: string) = x.matmul(p[name + ".weight"]) + p[name + ".bias"]
    let geluNew (x: torch.Tensor) = 0.5 * x * (1.0 + torch.tanh(Math.Sqrt(2.0 / Math.PI) * (x + 0.044715 * x * x * x)))
    let mutable x = p["transformer.wte.weight"].index_select(0L, input.reshape(-1L)).view(B, T, C) + p["transformer.wpe.weight"].index_select(0L, positions)
    for layer in 0 .. c.NLayer - 1 do
        let block = sprintf "transformer.h.%d." layer
        let qkv = conv (layerNorm x (block + "ln_1")) (block + "attn.c_attn") // (B, T, 3C)
        let heads (i: int64) = qkv.narrow(2L, i * C, C).view(B, T, H, C / H).transpose(1L, 2L) // (B, H, T, hd)
        let k = torch.cat([| prefixPart prefix C H B layer false; heads 1L |], 2L)
        let v = torch.cat([| prefixPart prefix C H B layer true; heads 2L |], 2L)
        let y = (attendWithPrefix (heads 0L) k v n).transpose(1L, 2L).reshape(B, T, C)
        x <- x + conv y (block + "attn.c_proj")
        let h = geluNew (conv (layerNorm x (block + "ln_2")) (block + "mlp.c_fc"))
        x <- x + conv h (block + "mlp.c_proj")
    let hidden = layerNorm x "transformer.ln_f"
    scope.MoveToOuter(hidden.matmul(p["transformer.wte.weight"].t ()))

/// LLaMA's logits written out: rotary positions N .. N + T - 1 on the tokens' queries and keys (none on
/// the prefix keys), the prefix's key/value heads in front of the tokens', repeated to the query heads.
let private llamaReference (lm: CausalLm) (prefix: torch.Tensor) (ids: int64[][]) =
    use scope = torch.NewDisposeScope()
    let c = match lm.Config with Llama c -> c | _ -> failwith "LLaMA expected"
    let p: Collections.Generic.IDictionary<string, torch.Tensor> = dict [ for struct (name, t) in lm.Module.named_parameters () -> name, t.detach () ]
    let B, T, hidden = int64 ids.Length, int64 ids[0].Length, int64 c.HiddenSize
    let nh, nkv, hd = int64 c.NumAttentionHeads, int64 c.NumKeyValueHeads, int64 c.HeadDim
    let n = prefix.shape[0]
    let input = idsTensor ids
    let cos, sin = Rotary.cosSin (Rotary.inverseFrequencies c.HeadDim c.RopeTheta) (torch.arange(n, n + T, 1L, dtype = torch.int64))
    let rms (x: torch.Tensor) (name: string) = p[name] * x * torch.rsqrt(x.square().mean([| -1L |], keepdim = true) + c.RmsNormEps)
    let linear (x: torch.Tensor) (name: string) = x.matmul(p[name + ".weight"].t ())
    let mutable x = p["model.embed_tokens.weight"].index_select(0L, input.reshape(-1L)).view(B, T, hidden)
    for layer in 0 .. c.NumHiddenLayers - 1 do
        let prefixName = sprintf "model.layers.%d." layer
        let h = rms x (prefixName + "input_layernorm.weight")
        let project name heads = (linear h (prefixName + "self_attn." + name)).view(B, T, heads, hd).transpose(1L, 2L)
        let q = Rotary.apply (project "q_proj" nh) cos sin // (B, nh, T, hd)
        let k = Rotary.apply (project "k_proj" nkv) cos sin // (B, nkv, T, hd)
        let v = project "v_proj" nkv
        let repeat (t: torch.Tensor) = t.repeat_interleave(nh / nkv, dim = 1L) // (B, nh, N + T, hd)
        let k = repeat (torch.cat([| prefixPart prefix (nkv * hd) nkv B layer false; k |], 2L))
        let v = repeat (torch.cat([| prefixPart prefix (nkv * hd) nkv B layer true; v |], 2L))
        let y = (attendWithPrefix q k v n).transpose(1L, 2L).reshape(B, T, nh * hd)
        x <- x + linear y (prefixName + "self_attn.o_proj")
        let h = rms x (prefixName + "post_attention_layernorm.weight")
        let gate = linear h (prefixName + "mlp.gate_proj")
        x <- x + linear (torch.nn.functional.silu gate * linear h (prefixName + "mlp.up_proj")) (prefixName + "mlp.down_proj")
    scope.MoveToOuter(linear (rms x "model.norm.weight") "lm_head")

let private exactSemantics (family: string) (config: ModelConfig) (reference: CausalLm -> torch.Tensor -> int64[][] -> torch.Tensor) =
    torchTest (sprintf "%s: logits with a prefix equal a written-out attention over the prefix and the tokens, positions from N" family) (fun () ->
        let lm = CausalLm.create config 11L
        let adapter = randomPrefix 3 lm 5L
        adapter.Model.Module.eval ()
        let ids = [| [| 1L; 4L; 2L; 9L; 7L |]; [| 3L; 3L; 0L; 12L; 5L |] |]
        use input = idsTensor ids
        use _ = torch.no_grad ()
        use actual = adapter.Model.Module.forward input // (B, T, V)
        use expected = reference lm adapter.Embeddings ids
        expectClose 1e-5 actual expected "logits"
        use plain = lm.Module.forward input
        Expect.isGreaterThan (maxAbsDiff actual plain) 1e-3 "the prefix changes the logits")

// ---------------------------------------------------------------- training runs

let private golden = goldenDir "llama-cosine"

let private trainOptions =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 1
        LearningRate = 0.01
        WeightDecay = 0.0
        MaxSteps = 6
        MaxSeqLen = 32
        Seed = 1234L
        Shuffle = false
        SaveSteps = 3
        EvalSteps = 3 }

let private request (output: string) =
    { ModelPath = Path.Combine(golden, "model")
      DataPath = Path.Combine(golden, "data.jsonl")
      OutputPath = output
      PublishedOutputPath = None
      OverwriteOutputDir = false
      Options = trainOptions
      Data = { FineTune.defaultData with EvalDataPath = Some(Path.Combine(golden, "data.jsonl")) }
      ResumeFromCheckpoint = None
      Lora = None
      Prefix = Some { NumPrefixTokens = 4; AdapterPath = None }
      GradientCheckpointing = false
      ModelHandling = FineTune.defaultModelHandling
      Distributed = FineTune.defaultDistributed
      Task = TrainingTask.CausalLm
      Plot = None }

let private evalLoss (lm: CausalLm) =
    let dataset = loadTokenized (Path.Combine(golden, "data.jsonl"))
    (Evaluation.evaluate lm dataset trainOptions.PerDeviceEvalBatchSize trainOptions.MaxSeqLen TrainingLoop.PadId).Loss

let private tensorsOf (path: string) =
    let tensors = Safetensors.load path
    let result = tensors |> Map.map (fun _ t -> values t)
    tensors |> Map.iter (fun _ t -> t.Dispose())
    result

let private training =
    testList "training" [
        torchTest "training changes only prompt_embeddings, lowers the loss and writes PEFT's prefix adapter" (fun () ->
            use output = new TempFolder()
            let result = FineTune.run (request (output.File "run")) ignore
            let before, after = result.Before.Value.Eval.Loss, result.After.Value.Eval.Loss
            Expect.isLessThan after before "the evaluation loss decreases"
            let baseWeights = tensorsOf (Path.Combine(golden, "model", "model.safetensors"))
            let checkpointWeights = tensorsOf (Path.Combine(output.File "run", "checkpoint-6", "model.safetensors"))
            Expect.equal checkpointWeights baseWeights "the base weights are bit-identical after training"
            let final = result.FinalModelPath
            Expect.isFalse (File.Exists(Path.Combine(final, "model.safetensors"))) "final/ holds the adapter, not the model"
            use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(final, PrefixTuning.ConfigFileName)))
            let root = config.RootElement
            let text (name: string) = root.GetProperty(name).GetString()
            let integer (name: string) = root.GetProperty(name).GetInt32()
            Expect.equal (text "peft_type") "PREFIX_TUNING" "peft_type"
            Expect.equal (text "task_type") "CAUSAL_LM" "task_type"
            Expect.equal (integer "num_virtual_tokens") 4 "num_virtual_tokens"
            Expect.equal (integer "num_layers") 2 "num_layers"
            Expect.equal (integer "token_dim") 16 "token_dim = head_dim 8 * 2 key/value heads"
            Expect.equal (integer "num_attention_heads") 2 "num_attention_heads = the key/value heads"
            Expect.equal (integer "encoder_hidden_size") 16 "encoder_hidden_size = token_dim"
            Expect.equal (integer "num_transformer_submodules") 1 "num_transformer_submodules"
            Expect.isFalse (root.GetProperty("prefix_projection").GetBoolean()) "prefix_projection"
            Expect.equal (text "base_model_name_or_path") (Path.Combine(golden, "model")) "base_model_name_or_path"
            let header = Safetensors.readHeader (Path.Combine(final, PrefixTuning.WeightsFileName))
            Expect.equal [ for e in header.Entries -> e.Name, List.ofArray e.Shape ] [ "prompt_embeddings", [ 4L; 64L ] ] "one tensor prompt_embeddings [N, layers * 2 * token_dim]"
            let lm = HfModelFolder.load (Path.Combine(golden, "model")) 0L
            Expect.floatClose Accuracy.high (evalLoss (PrefixTuning.create 4 lm trainOptions.Seed).Model) before
                "evaluation before training sees the prefix drawn from the seed"
            Expect.isGreaterThan (abs (evalLoss lm - before)) 1e-4 "and differs from the model without it"
            let loaded = PrefixTuning.load final lm
            Expect.floatClose Accuracy.high (evalLoss loaded.Model) after "the loaded adapter reproduces the trained model's evaluation loss")

        torchTest "resuming a prefix run from a checkpoint continues exactly as the uninterrupted run" (fun () ->
            use output = new TempFolder()
            let full = FineTune.run (request (output.File "full")) ignore
            let resumed =
                FineTune.run { request (output.File "resumed") with ResumeFromCheckpoint = Some(Path.Combine(output.File "full", "checkpoint-3")) } ignore
            Expect.equal resumed.Steps 6 "the resumed run ends at step 6"
            let weights (r: FineTuneOutcome) = tensorsOf (Path.Combine(r.FinalModelPath, PrefixTuning.WeightsFileName))
            Expect.equal (weights resumed) (weights full) "the same final prefix, bit for bit"
            let losses (r: FineTuneOutcome) =
                readJsonLines r.MetricsPath
                |> Array.filter (fun l -> l.TryGetProperty("grad_norm") |> fst)
                |> Array.map (fun l -> l.GetProperty("step").GetInt32(), l.GetProperty("loss").GetDouble())
            Expect.equal (losses resumed) (losses full) "the same per-step losses")
    ]

// ---------------------------------------------------------------- generation and the command line

let private generation =
    testList "generation" [
        torchTest "generation with the prefix as the initial cache equals recomputing prefix and sequence every step" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 3L
            let adapter = randomPrefix 2 lm 8L
            let prompts = [| [| 1L; 5L; 7L |]; [| 2L |] |]
            let options = { GenerationOptions.defaults with MaxNewTokens = 6 }
            let cached = Generator.generate adapter.Model prompts options
            let recomputed = Generator.generate adapter.Model prompts { options with UseCache = false }
            Expect.equal cached recomputed "the same tokens"
            let alone = Generator.generate adapter.Model [| prompts[1] |] options
            Expect.equal cached[1] alone[0] "a left-padded row equals its prompt run alone")

        torchTest "GPT-2 generation counts the prefix against n_positions" (fun () ->
            let lm = CausalLm.create gpt2Config 3L
            let adapter = PrefixTuning.create 10 lm 1L
            expectInvalid "prompts" "prompt 1" [ "has 23 tokens"; "n_positions = 32, 10 of them taken by the prefix"; "at most 22 fit" ] (fun () ->
                Generator.generate adapter.Model [| Array.create 23 1L |] { GenerationOptions.defaults with MaxNewTokens = 5 } |> ignore)
            let generated = Generator.generate adapter.Model [| Array.create 20 1L |] { GenerationOptions.defaults with MaxNewTokens = 5 }
            Expect.equal generated[0].Length 3 "20 prompt tokens leave room for 3 new ones in the 22 positions the prefix leaves")

        torchTest "train --prefix-tuning on the golden LLaMA writes the adapter; generate --prefix-adapter uses it" (fun () ->
            use folder = new TempFolder()
            let run =
                runCli
                    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl")
                      "--output"; folder.File "out"; "--prefix-tuning"; "--num-prefix-tokens"; "4"; "--max-steps"; "2"
                      "--max-seq-len"; "32"; "--per-device-train-batch-size"; "2"; "--learning-rate"; "0.01"; "--no-data-cache" ]
            Expect.equal run.ExitCode 0 (sprintf "train exits 0 (stderr: %s)" run.Stderr)
            let adapter = Path.Combine(folder.File "out", "final")
            Expect.equal (PrefixTuning.loadConfig adapter).NumVirtualTokens 4 "final/ is a prefix adapter of 4 virtual tokens"
            // The golden model has no tokenizer (and 96 ids, fewer than a byte-level BPE's 257): generate
            // runs on a small LLaMA with a trained tokenizer and a prefix saved through the core API.
            let texts = [ "the cat sat on the mat"; "a dog ran in the park"; "the sun is hot" ]
            let vocabulary = Functional.Text.BpeTraining.train texts 12
            let model = folder.File "model"
            let config =
                sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}""" vocabulary.Tokens.Length
            let lm = CausalLm.create (ModelConfig.parse "test" config) 2L
            HfModelFolder.save model lm None []
            Functional.Text.BpeTraining.save vocabulary model
            let prefix = randomPrefix 3 lm 4L
            PrefixTuning.save (folder.File "prefix") None prefix
            let generated =
                runCli [ "generate"; "--model"; model; "--prefix-adapter"; folder.File "prefix"; "--prompt"; "the cat"; "--greedy"; "--max-new-tokens"; "6" ]
            Expect.equal generated.ExitCode 0 (sprintf "generate exits 0 (stderr: %s)" generated.Stderr)
            let tokenizer = Functional.Text.Tokenizers.fromFolder model
            let expected = Generator.generateText prefix.Model tokenizer [ "the cat" ] { GenerationOptions.defaults with MaxNewTokens = 6 }
            Expect.equal (generated.Stdout.Replace("\r", "")) (expected[0] + "\n") "the command prints what the core generates with the prefix")
    ]

// ---------------------------------------------------------------- bad input

let private badInput =
    testList "bad input" [
        torchTest "a corrupt adapter_config.json names the file" (fun () ->
            use folder = new TempFolder()
            File.WriteAllText(folder.File PrefixTuning.ConfigFileName, "{\"peft_type\": ")
            expectInvalid (folder.File PrefixTuning.ConfigFileName) "" [ "not valid JSON" ] (fun () -> PrefixTuning.loadConfig folder.Path |> ignore))

        torchTest "a config field that does not fit names the file and field" (fun () ->
            use folder = new TempFolder()
            let lm = CausalLm.create gpt2Config 1L
            PrefixTuning.save folder.Path None (PrefixTuning.create 3 lm 1L)
            let path = folder.File PrefixTuning.ConfigFileName
            let original = File.ReadAllText path
            let llama = CausalLm.create (Llama tinyLlama) 1L
            expectInvalid path "token_dim" [ "token_dim = 16"; "this model has 8" ] (fun () -> PrefixTuning.load folder.Path llama |> ignore)
            File.WriteAllText(path, original.Replace("\"prefix_projection\": false", "\"prefix_projection\": true"))
            expectInvalid path "prefix_projection" [ "not supported" ] (fun () -> PrefixTuning.loadConfig folder.Path |> ignore)
            File.WriteAllText(path, original.Replace("\"peft_type\": \"PREFIX_TUNING\"", "\"peft_type\": \"LORA\""))
            expectInvalid path "peft_type" [ "PREFIX_TUNING" ] (fun () -> PrefixTuning.loadConfig folder.Path |> ignore)
            File.WriteAllText(path, original.Replace("\"num_virtual_tokens\": 3", "\"num_virtual_tokens\": 0"))
            expectInvalid path "num_virtual_tokens" [ "positive integer" ] (fun () -> PrefixTuning.loadConfig folder.Path |> ignore))

        torchTest "prompt_embeddings of the wrong shape names the file and tensor" (fun () ->
            use folder = new TempFolder()
            let lm = CausalLm.create gpt2Config 1L
            PrefixTuning.save folder.Path None (PrefixTuning.create 3 lm 1L)
            let path = folder.File PrefixTuning.ConfigFileName
            File.WriteAllText(path, File.ReadAllText(path).Replace("\"num_virtual_tokens\": 3", "\"num_virtual_tokens\": 5"))
            expectInvalid (folder.File PrefixTuning.WeightsFileName) "prompt_embeddings" [ "[|5L; 64L|]"; "[|3L; 64L|]" ] (fun () ->
                PrefixTuning.load folder.Path lm |> ignore))

        torchTest "prefix tuning refuses LoRA, --bf16, --fp16 and --gradient-checkpointing, naming both options, before writing anything" (fun () ->
            use folder = new TempFolder()
            let output = folder.File "run"
            let plain = request output
            let lora = { Config = { R = 2; Alpha = 4.0; Dropout = 0.0; TargetModules = [ "q_proj" ]; ModuleNameSubstring = None }; OnlyOptimizeLora = true; LearningRate = None; AdapterPath = None }
            expectInvalid "--prefix-tuning" "" [ "--lora-dim" ] (fun () -> FineTune.run { plain with Lora = Some lora } ignore |> ignore)
            expectInvalid "--bf16" "" [ "--prefix-tuning" ] (fun () ->
                FineTune.run { plain with Options = { trainOptions with Precision = Precision.Bf16 } } ignore |> ignore)
            let fp16 = TrainOptions.precision false true Functional.Optim.LossScaler.defaults
            expectInvalid "--fp16" "" [ "--prefix-tuning" ] (fun () -> FineTune.run { plain with Options = { trainOptions with Precision = fp16 } } ignore |> ignore)
            expectInvalid "--gradient-checkpointing" "" [ "--prefix-tuning" ] (fun () -> FineTune.run { plain with GradientCheckpointing = true } ignore |> ignore)
            Expect.isFalse (Directory.Exists output) "nothing is written")

        torchTest "a GPT-2 prefix that leaves too few positions for the rows names --num-prefix-tokens" (fun () ->
            use folder = new TempFolder()
            let gpt2 = goldenDir "gpt2-cosine"
            let request =
                { request (folder.File "run") with
                    ModelPath = Path.Combine(gpt2, "model")
                    DataPath = Path.Combine(gpt2, "data.jsonl")
                    Options = { trainOptions with EvalSteps = 0 }
                    Data = FineTune.defaultData
                    Prefix = Some { NumPrefixTokens = 40; AdapterPath = None } }
            expectInvalid "--num-prefix-tokens" "" [ "n_positions = 64" ] (fun () -> FineTune.run request ignore |> ignore))

        test "--num-prefix-tokens without --prefix-tuning is refused by the command line" {
            use folder = new TempFolder()
            let run =
                runCli
                    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl")
                      "--output"; folder.File "out"; "--num-prefix-tokens"; "4" ]
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "--num-prefix-tokens" "names the option"
            Expect.stringContains run.Stderr "--prefix-tuning" "says what it needs"
        }
    ]

[<Tests>]
let tests =
    testList "prefix tuning" [
        torchTest "the prefix shape follows PEFT: GPT-2 n_embd over n_head, LLaMA head_dim * key/value heads over the key/value heads" (fun () ->
            Expect.equal (PrefixTuning.configFor gpt2Config 5) { NumVirtualTokens = 5; NumLayers = 2; TokenDim = 16; NumAttentionHeads = 2 } "GPT-2"
            Expect.equal (PrefixTuning.configFor (Llama tinyLlama) 5) { NumVirtualTokens = 5; NumLayers = 2; TokenDim = 8; NumAttentionHeads = 2 } "LLaMA with grouped-query attention"
            let adapter = PrefixTuning.create 5 (CausalLm.create (Llama tinyLlama) 1L) 1L
            Expect.sequenceEqual adapter.Embeddings.shape [| 5L; 32L |] "prompt_embeddings is [N, layers * 2 * token_dim]"
            expectInvalid "--num-prefix-tokens" "" [ "at least 1" ] (fun () -> PrefixTuning.configFor gpt2Config 0 |> ignore))
        torchTest "the prefix is drawn from normal(0, 1) by the seed, as PEFT's nn.Embedding" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 1L
            let a, b, c = PrefixTuning.create 64 lm 7L, PrefixTuning.create 64 lm 7L, PrefixTuning.create 64 lm 8L
            Expect.equal (values a.Embeddings) (values b.Embeddings) "the same seed gives the same prefix"
            Expect.notEqual (values a.Embeddings) (values c.Embeddings) "another seed another"
            let all = values a.Embeddings
            let mean = Array.average all
            let std = sqrt (Array.averageBy (fun x -> (x - mean) ** 2.0) all)
            Expect.isLessThan (abs mean) 0.05 "mean near 0"
            Expect.isLessThan (abs (std - 1.0)) 0.05 "standard deviation near 1")
        exactSemantics "GPT-2" gpt2Config gpt2Reference
        exactSemantics "LLaMA" (Llama tinyLlama) llamaReference
        torchTest "gradients of a loss reach prompt_embeddings and no frozen base weight" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 4L
            let adapter = randomPrefix 3 lm 2L
            PrefixTuning.freezeBase lm
            use input = idsTensor [| [| 1L; 2L; 3L; 4L |] |]
            use logits = adapter.Model.Module.forward input
            use loss = logits.square().mean()
            loss.backward ()
            Expect.isNotNull adapter.Embeddings.grad "the prefix has a gradient"
            Expect.isGreaterThan (values adapter.Embeddings.grad |> Array.map abs |> Array.max) 0.0 "a non-zero one"
            for struct (name, p) in lm.Module.named_parameters () do
                Expect.isNull p.grad (name + " has no gradient"))
        torchTest "the prefix's Adapter puts a copy of the prefix, in the copy's dtype, in front of a bf16 compute copy" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 4L
            let adapter = PrefixTuning.asAdapter (randomPrefix 3 lm 2L)
            let master = Functional.Optim.FlatParameters.create [ for name, p in adapter.Parameters -> struct (name, p) ]
            use copy = (MixedPrecision.createWith Precision.Bf16 lm adapter.AttachToCompute master).Value
            Expect.isFalse (obj.ReferenceEquals(copy.Model.Module, copy.Base.Module)) "the compute model wraps the base copy"
            use input = idsTensor [| [| 1L; 2L; 3L; 4L |] |]
            use expected = adapter.Model.Module.forward input
            use actual = copy.Model.Module.forward input
            Expect.equal actual.dtype torch.bfloat16 "runs in bf16"
            use actual32 = actual.to_type torch.float32
            expectClose 0.05 actual32 expected "the bf16 prefix model computes the fp32 one's logits")
        training
        generation
        badInput
    ]
