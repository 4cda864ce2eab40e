/// BLOOM (BloomForCausalLM): config.json reading and writing, HF names, save/load, the key/value cache
/// with ALiBi (left padding included), LoRA on query_key_value, prefix tuning, bf16, activation
/// checkpointing and an exact resume. The PyTorch comparisons are the goldens bloom-cosine,
/// bloom-postln-linear and bloom-lora (GoldenTests.fs).
module Functional.Tests.BloomTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Checkpoint
open Functional.Generation
open Functional.Models
open Functional.Peft
open Functional.Training
open Functional.Tests.TestUtil

// ---------------------------------------------------------------- helpers

/// A tiny BLOOM: 3 heads (not a power of two: ALiBi's extra slopes), head_dim 6, untied head, a wide
/// initialization so greedy decoding moves between tokens.
let private tinyBloom : BloomConfig =
    { VocabSize = 19
      HiddenSize = 18
      NLayer = 2
      NHead = 3
      LayerNormEpsilon = 1e-5
      InitializerRange = 0.5
      ApplyResidualConnectionPostLayernorm = false
      HiddenDropout = 0.0
      AttentionDropout = 0.0
      PretrainingTp = 1
      SeqLength = 64
      TieWordEmbeddings = false
      PadTokenId = None }

let private variants =
    [ "BLOOM", Bloom tinyBloom
      "BLOOM post-layernorm residual, tied", Bloom { tinyBloom with ApplyResidualConnectionPostLayernorm = true; TieWordEmbeddings = true; NHead = 6 } ]

/// A fresh model per test (tests run in parallel and switch modes), in eval mode.
let private model config =
    let lm = CausalLm.create config 11L
    lm.Module.eval ()
    lm

let private randomIds (vocab: int) (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, shape, dtype = torch.int64, generator = g)

let private ones (rows: int64) (columns: int64) = torch.ones(rows, columns, dtype = torch.int64)

let private logits (lm: CausalLm) (input: torch.Tensor) =
    use _ = torch.no_grad ()
    lm.Module.forward input

let private expectEqual (actual: torch.Tensor) (expected: torch.Tensor) message =
    Expect.sequenceEqual actual.shape expected.shape (message + ": shape")
    Expect.isTrue (actual.Equals expected) (message + ": bit-identical")

let private parse json = ModelConfig.parse "config.json" json

let private bloomOf config =
    match config with
    | Bloom c -> c
    | other -> failtestf "expected a BLOOM config, got %A" other

/// bigscience/bloomz-560m's config.json (Megatron-era fields HF ignores included).
let private bloomz560m =
    """{"apply_residual_connection_post_layernorm": false, "architectures": ["BloomForCausalLM"],
        "attention_dropout": 0.0, "attention_softmax_in_fp32": true, "bias_dropout_fusion": true,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": true,
        "model_type": "bloom", "n_head": 16, "n_inner": null, "n_layer": 24, "offset_alibi": 100,
        "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": true, "skip_bias_add_qkv": false,
        "slow_but_exact": false, "torch_dtype": "float16", "transformers_version": "4.20.0",
        "unk_token_id": 0, "use_cache": true, "vocab_size": 250880}"""

let private golden = goldenDir "bloom-cosine"

// ---------------------------------------------------------------- config.json

let private configTests =
    testList "config" [
        test "bloomz-560m's config.json parses" {
            Expect.equal
                (parse bloomz560m)
                (Bloom
                    { VocabSize = 250880; HiddenSize = 1024; NLayer = 24; NHead = 16; LayerNormEpsilon = 1e-5
                      InitializerRange = 0.02; ApplyResidualConnectionPostLayernorm = false; HiddenDropout = 0.0
                      AttentionDropout = 0.0; PretrainingTp = 1; SeqLength = 2048; TieWordEmbeddings = true; PadTokenId = Some 3 })
                "bloomz-560m"
        }
        test "absent fields take BloomConfig's defaults" {
            let c = bloomOf (parse """{"model_type": "bloom"}""")
            Expect.equal (c.VocabSize, c.HiddenSize, c.NLayer, c.NHead) (250880, 64, 2, 8) "sizes"
            Expect.equal (c.LayerNormEpsilon, c.InitializerRange) (1e-5, 0.02) "eps and init"
            Expect.equal (c.HiddenDropout, c.AttentionDropout) (0.0, 0.0) "dropouts"
            Expect.isFalse c.ApplyResidualConnectionPostLayernorm "pre-norm residual"
            Expect.isTrue c.TieWordEmbeddings "tied head"
        }
        test "the legacy n_embed wins over hidden_size; num_attention_heads and num_hidden_layers are aliases" {
            let c = bloomOf (parse """{"model_type": "bloom", "n_embed": 36, "hidden_size": 64, "num_attention_heads": 6, "num_hidden_layers": 3}""")
            Expect.equal (c.HiddenSize, c.NHead, c.NLayer) (36, 6, 3) "n_embed, aliases"
            let same = bloomOf (parse """{"model_type": "bloom", "n_head": 4, "num_attention_heads": 4}""")
            Expect.equal same.NHead 4 "equal values under both names"
        }
        test "bad fields are refused naming the file and field" {
            let refused field parts json = expectInvalidInput "config.json" field parts (fun () -> parse json |> ignore)
            refused "n_head" [ "divisible" ] """{"model_type": "bloom", "hidden_size": 10, "n_head": 4}"""
            refused "num_attention_heads" [ "disagree" ] """{"model_type": "bloom", "n_head": 4, "num_attention_heads": 8}"""
            refused "slow_but_exact" [ "pretraining_tp = 4" ] """{"model_type": "bloom", "pretraining_tp": 4, "slow_but_exact": true}"""
            refused "hidden_dropout" [ "[0, 1)" ] """{"model_type": "bloom", "hidden_dropout": 1.5}"""
            refused "n_layer" [ "positive" ] """{"model_type": "bloom", "n_layer": 0}"""
            refused "vocab_size" [ "integer" ] """{"model_type": "bloom", "vocab_size": "big"}"""
        }
        test "pretraining_tp without slow_but_exact is read and kept (it does not change the computation)" {
            let c = bloomOf (parse """{"model_type": "bloom", "pretraining_tp": 4, "slow_but_exact": false}""")
            Expect.equal c.PretrainingTp 4 "pretraining_tp"
            let again = bloomOf (parse """{"model_type": "bloom", "pretraining_tp": 1, "slow_but_exact": true}""")
            Expect.equal again.PretrainingTp 1 "slow_but_exact with one slice is the plain computation"
        }
        test "pad_token_id is read, written back (bloom-560m's 3), left out when absent, and refused outside the vocabulary" {
            Expect.equal (bloomOf (parse """{"model_type": "bloom", "vocab_size": 10, "pad_token_id": 3}""")).PadTokenId (Some 3) "read"
            Expect.equal (bloomOf (parse """{"model_type": "bloom"}""")).PadTokenId None "absent"
            Expect.isFalse ((ModelConfig.toJson (Bloom tinyBloom)).Contains "pad_token_id") "a config without one writes none"
            expectInvalidInput "config.json" "pad_token_id" [ "[0, 10)" ] (fun () ->
                parse """{"model_type": "bloom", "vocab_size": 10, "pad_token_id": 10}""" |> ignore)
        }
        test "toJson writes BloomForCausalLM and model_type bloom, and parse reads it back equal" {
            for _, config in variants @ [ "bloomz-560m", parse bloomz560m; "dropout", Bloom { tinyBloom with HiddenDropout = 0.1; AttentionDropout = 0.2; PretrainingTp = 4 } ] do
                let json = ModelConfig.toJson config
                use doc = JsonDocument.Parse json
                let root = doc.RootElement
                Expect.equal ((root.GetProperty "architectures").[0].GetString()) "BloomForCausalLM" "architectures"
                Expect.equal (root.GetProperty("model_type").GetString()) "bloom" "model_type"
                Expect.equal (ModelConfig.parse "written" json) config "round trip"
        }
        test "withoutDropout zeroes both probabilities and nothing else" {
            let c = { tinyBloom with HiddenDropout = 0.1; AttentionDropout = 0.2 }
            Expect.equal (Bloom.withoutDropout c) { c with HiddenDropout = 0.0; AttentionDropout = 0.0 } "no dropout"
        }
        test "traits: HF names, tied key, PEFT's default LoRA target and the prefix shape" {
            let t = ModelFamily.traits (Bloom tinyBloom)
            Expect.equal (t.DisplayName, t.ModelType, t.Architecture, t.BasePrefix) ("BLOOM", "bloom", "BloomForCausalLM", "transformer.") "names"
            Expect.equal t.DefaultLoraTargets [ "query_key_value" ] "LoRA targets"
            Expect.equal t.PrefixShape { Layers = 2; KeyValueHeads = 3; HeadDim = 6 } "prefix shape"
            Expect.equal t.TiedKeys [] "untied"
            Expect.equal (ModelFamily.traits (Bloom { tinyBloom with TieWordEmbeddings = true })).TiedKeys [ "lm_head.weight" ] "tied"
            Expect.equal (t.PositionLimit, t.PositionField, t.LearnedPositions) (64, "seq_length", false) "context"
            Expect.equal (ModelFamily.resize 3 24 4 (Bloom tinyBloom)) (Bloom { tinyBloom with NLayer = 3; HiddenSize = 24; NHead = 4 }) "resize"
        }
    ]

// ---------------------------------------------------------------- modules, names, files

let private moduleTests =
    testList "modules" [
        torchTest "named_parameters are HF's state-dict names in HF's order" (fun () ->
            let lm = model (Bloom { tinyBloom with NLayer = 1; TieWordEmbeddings = true })
            let names = [ for struct (name, _) in lm.Module.named_parameters () -> name ]
            let layer =
                [ "input_layernorm.weight"; "input_layernorm.bias"
                  "self_attention.query_key_value.weight"; "self_attention.query_key_value.bias"
                  "self_attention.dense.weight"; "self_attention.dense.bias"
                  "post_attention_layernorm.weight"; "post_attention_layernorm.bias"
                  "mlp.dense_h_to_4h.weight"; "mlp.dense_h_to_4h.bias"; "mlp.dense_4h_to_h.weight"; "mlp.dense_4h_to_h.bias" ]
            Expect.equal
                names
                ([ "transformer.word_embeddings.weight"; "transformer.word_embeddings_layernorm.weight"; "transformer.word_embeddings_layernorm.bias" ]
                 @ [ for n in layer -> "transformer.h.0." + n ]
                 @ [ "transformer.ln_f.weight"; "transformer.ln_f.bias" ])
                "names"
            let shape name = [ for struct (n, p) in lm.Module.named_parameters () do if n = name then yield! p.shape ]
            Expect.equal (shape "transformer.h.0.self_attention.query_key_value.weight") [ 54L; 18L ] "fused q/k/v (3C, C)"
            Expect.equal (shape "transformer.h.0.mlp.dense_h_to_4h.weight") [ 72L; 18L ] "4C MLP"
            Expect.isEmpty [ for struct (n, _) in lm.Module.named_buffers () -> n ] "no buffer in the state dict")

        torchTest "ALiBi slopes of 6 heads follow HF's rule for head counts that are not a power of two" (fun () ->
            use slopes = Alibi.slopes 6
            Expect.equal (values slopes |> List.ofArray) [ 0.25; 0.0625; 0.015625; 0.00390625; 0.5; 0.125 ] "slopes")

        torchTest "the fused projection is per head (q, k, v) interleaved: zeroing head 0's value rows silences head 0 only" (fun () ->
            // With the value rows of head 0 zeroed, head 0 contributes nothing to dense's input; a layout read
            // as three blocks would zero part of the queries instead and leave the head's output non-zero.
            let lm = model (Bloom { tinyBloom with NLayer = 1 })
            let attention = lm.Module.named_modules () |> Seq.pick (fun struct (n, m) -> if n.EndsWith "self_attention" then Some(m :?> BloomAttention) else None)
            let qkv = lm.Module.named_modules () |> Seq.pick (fun struct (n, m) -> if n.EndsWith "query_key_value" then Some(m :?> Linear) else None)
            let dense = lm.Module.named_modules () |> Seq.pick (fun struct (n, m) -> if n.EndsWith "self_attention.dense" then Some(m :?> Linear) else None)
            use _ = torch.no_grad ()
            let hd = 6L
            qkv.weight.narrow(0L, 2L * hd, hd).zero_() |> ignore // head 0's value rows
            qkv.bias.narrow(0L, 2L * hd, hd).zero_() |> ignore
            use g = new torch.Generator(3UL)
            use x = torch.randn([| 1L; 5L; 18L |], generator = g)
            use mask = AttentionMask.causal (Alibi(Alibi.slopes 3)) 5L x.device
            // dense's weight restricted to head 0's input columns: if head 0's context is zero, removing
            // those columns does not change the output.
            use full = attention.forward(x, mask)
            dense.weight.narrow(1L, 0L, hd).zero_() |> ignore
            use without = attention.forward(x, mask)
            expectClose 1e-6 without full "head 0 carried zero values")

        torchTest "save and load round-trip the model exactly; config.json names BloomForCausalLM; the tied head is not saved" (fun () ->
            for _, config in variants do
                let lm = model config
                use folder = new TempFolder()
                HfModelFolder.save folder.Path lm None []
                use json = JsonDocument.Parse(File.ReadAllText(folder.File "config.json"))
                Expect.equal (json.RootElement.GetProperty("model_type").GetString()) "bloom" "model_type"
                Expect.equal ((json.RootElement.GetProperty "architectures").[0].GetString()) "BloomForCausalLM" "architectures"
                let keys = (Safetensors.readHeader (folder.File "model.safetensors")).Entries |> List.map (fun e -> e.Name)
                let tied = (bloomOf config).TieWordEmbeddings
                Expect.equal (List.contains "lm_head.weight" keys) (not tied) "lm_head.weight only when untied"
                let loaded = HfModelFolder.load folder.Path 99L
                loaded.Module.eval ()
                Expect.equal loaded.Config config "the config reads back"
                let reference = dict [ for struct (name, p) in lm.Module.named_parameters () -> name, p ]
                for struct (name, p) in loaded.Module.named_parameters () do
                    expectEqual p reference[name] name
                use input = randomIds 19 [| 2L; 7L |] 4L
                use expected = logits lm input
                use actual = logits loaded input
                expectEqual actual expected "logits")
    ]

// ---------------------------------------------------------------- key/value cache and generation

let private cacheTests =
    testList "kv cache" [
        for name, config in variants do
            let fresh () = model config
            FamilyChecks.cachedLogits name fresh
            FamilyChecks.paddedRows name "ALiBi from the mask's cumulative sum" fresh 7L [| 3L; 1L; 4L; 1L; 5L; 9L |]
            FamilyChecks.greedyMatches name fresh FamilyChecks.prompt 24 1
            FamilyChecks.batchedMatches name fresh FamilyChecks.prompts 12
    ]

// ---------------------------------------------------------------- LoRA

let private defaultLora = { R = 4; Alpha = 8.0; Dropout = 0.0; TargetModules = []; ModuleNameSubstring = None }

/// Gives every lora_A and lora_B random values in +-0.5 (B is zero after wrap).
let private randomize (adapters: LoraAdapters) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    use _ = torch.no_grad ()
    for _, p in Lora.parameters adapters do
        p.uniform_(-0.5, 0.5, g) |> ignore

let private small =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 3
        MaxSeqLen = 32
        LearningRate = 1e-2
        Shuffle = false }

let private loraTests =
    testList "LoRA" [
        torchTest "the default targets are query_key_value (PEFT's mapping), as nn.Linear adapters (fan_in_fan_out false)" (fun () ->
            let lm = model (Bloom tinyBloom)
            use adapters = Lora.wrap defaultLora lm 1L
            Expect.equal
                [ for name, p in Lora.parameters adapters -> name, List.ofArray p.shape ]
                [ for i in 0 .. 1 do
                      let m = sprintf "base_model.model.transformer.h.%d.self_attention.query_key_value" i
                      yield m + ".lora_A.weight", [ 4L; 18L ]
                      yield m + ".lora_B.weight", [ 54L; 4L ] ]
                "PEFT names and shapes"
            Expect.equal adapters.TargetModuleNames [ "query_key_value" ] "target_modules")

        torchTest "training steps with only the adapters change the adapters and leave the base bit-identical" (fun () ->
            let lm = HfModelFolder.load (Path.Combine(golden, "model")) 1L
            let adapters = Lora.wrap defaultLora lm 3L
            randomize adapters 4L
            FamilyChecks.expectOnlyAdaptersTrain golden lm adapters { small with MaxSteps = 2 } |> ignore)

        torchTest "the adapters save in PEFT's files and load back to the same logits" (fun () ->
            let lm = model (Bloom tinyBloom)
            use adapters = Lora.wrap defaultLora lm 1L
            randomize adapters 2L
            use folder = new TempFolder()
            Lora.save folder.Path (Some "bloom") adapters
            use json = JsonDocument.Parse(File.ReadAllText(folder.File "adapter_config.json"))
            Expect.equal [ for t in json.RootElement.GetProperty("target_modules").EnumerateArray() -> t.GetString() ] [ "query_key_value" ] "target_modules"
            Expect.isFalse (json.RootElement.GetProperty("fan_in_fan_out").GetBoolean()) "fan_in_fan_out"
            let fresh = model (Bloom tinyBloom)
            use loaded = Lora.load folder.Path fresh
            use input = randomIds 19 [| 2L; 6L |] 3L
            use expected = logits lm input
            use actual = logits fresh input
            expectEqual actual expected "logits of the reloaded adapters"
            use plain = logits (model (Bloom tinyBloom)) input
            Expect.isGreaterThan (maxAbsDiff expected plain) 1e-2 "the adapters change the logits")
    ]

// ---------------------------------------------------------------- prefix tuning

/// prompt_embeddings (N, layers * 2 * token_dim) in PEFT's layout holding a cache's keys and values:
/// row n, layer l's key at columns [2l D, (2l + 1) D), its value the next D, each split into heads.
let private embeddingsOf (cache: KvCache) =
    let part (t: torch.Tensor) = t[0L].permute(1L, 0L, 2L).reshape(t.shape[2], -1L) // (N, heads * hd)
    torch.cat([| for l in 0 .. cache.Keys.Length - 1 do
                     yield part cache.Keys[l]
                     yield part cache.Values[l] |], 1L)

let private prefixTests =
    testList "prefix tuning" [
        for name, config in variants do
            torchTest (sprintf "%s: an empty prefix gives the base forward" name) (fun () ->
                let lm = model config
                let shape = (ModelFamily.traits config).PrefixShape
                let prefixConfig = { NumVirtualTokens = 0; NumLayers = shape.Layers; TokenDim = shape.HeadDim * shape.KeyValueHeads; NumAttentionHeads = shape.KeyValueHeads }
                let embeddings = torch.nn.Parameter(torch.zeros(prefixConfig.EmbeddingsShape))
                use wrapped = new PrefixTunedModel(lm.Module, prefixConfig, embeddings)
                use input = randomIds 19 [| 2L; 7L |] 6L
                use _ = torch.no_grad ()
                use expected = lm.Module.forward input
                use actual = wrapped.forward input
                expectClose 1e-5 actual expected "logits")

            torchTest (sprintf "%s: a prefix holding the cache of N real tokens gives the logits of those tokens followed by the input (ALiBi positions after the prefix)" name) (fun () ->
                let lm = model config
                use all = randomIds 19 [| 1L; 9L |] 7L
                use _ = torch.no_grad ()
                use first = all.narrow(1L, 0L, 3L)
                use rest = all.narrow(1L, 3L, 6L)
                let out, cache = CausalLm.forwardCached lm first (ones 1L 3L) None
                out.Dispose()
                use cache = cache
                let adapter = PrefixTuning.create 3 lm 1L
                use values = embeddingsOf cache
                adapter.Embeddings.copy_ values |> ignore
                use expected = lm.Module.forward all
                use actual = adapter.Model.Module.forward rest
                expectClose 1e-5 actual (expected.narrow(1L, 3L, 6L)) "logits after the prefix")
    ]

// ---------------------------------------------------------------- bf16, checkpointing, resume

let private gradientsOf (lm: CausalLm) (input: torch.Tensor) (checkpointing: bool) =
    CausalLm.setGradientCheckpointing lm checkpointing
    for p in lm.Module.parameters () do
        p.grad <- null
    do
        use scope = torch.NewDisposeScope()
        let out = lm.Module.forward input
        let loss = Loss.causalLmSum out input
        loss.backward ()
    [ for struct (name, p) in lm.Module.named_parameters () -> name, values p.grad ]

let private trainingTests =
    testList "training" [
        torchTest "a bf16 model's logits are close to the fp32 model's" (fun () ->
            let lm = HfModelFolder.load (Path.Combine(golden, "model")) 0L
            let low = HfModelFolder.load (Path.Combine(golden, "model")) 0L
            lm.Module.eval ()
            low.Module.eval ()
            low.Module.``to`` torch.bfloat16 |> ignore
            use input = randomIds 96 [| 2L; 16L |] 8L
            use expected = logits lm input
            use actual = logits low input
            let scale = values expected |> Array.map abs |> Array.max
            Expect.isLessThan (maxAbsDiff actual expected) (0.05 * scale) "within 5% of the largest logit")

        torchTest "bf16 training follows the fp32 loss curve within 2% over 20 steps" (fun () ->
            let options = { small with MaxSteps = 20; LearningRate = 3e-3; LrSchedulerType = SchedulerKind.Cosine; NumWarmupSteps = 2 }
            let _, mixed = FamilyChecks.expectBf16FollowsFp32 golden options 0.02
            Expect.isLessThan (List.last mixed).Loss (mixed.Head.Loss - 0.1) "bf16 training learns")

        for name, config in variants do
            torchTest (sprintf "%s: gradient checkpointing gives the plain run's gradients" name) (fun () ->
                let lm = CausalLm.create config 4L
                lm.Module.train ()
                use input = randomIds 19 [| 3L; 9L |] 1L
                let plain = gradientsOf lm input false
                let checkpointed = gradientsOf lm input true
                Expect.sequenceEqual (List.map fst checkpointed) (List.map fst plain) "names"
                for (n, a), (_, e) in List.zip checkpointed plain do
                    let diff = Array.map2 (fun x y -> abs (x - y)) a e |> Array.max
                    Expect.isLessThanOrEqual diff 1e-6 (sprintf "%s: max abs difference %g" n diff))

        torchTest "dropout acts in training mode only, and withoutDropout turns it off" (fun () ->
            let config = { tinyBloom with HiddenDropout = 0.3; AttentionDropout = 0.3 }
            let lm = model (Bloom config)
            use input = randomIds 19 [| 2L; 7L |] 2L
            use evalA = logits lm input
            use evalB = logits lm input
            expectEqual evalA evalB "eval mode is deterministic"
            lm.Module.train ()
            use trainA = logits lm input
            Expect.isGreaterThan (maxAbsDiff trainA evalA) 1e-4 "training mode drops"
            let plain = CausalLm.create (Bloom(Bloom.withoutDropout config)) 11L
            plain.Module.train ()
            use noDrop = logits plain input
            expectClose 1e-6 noDrop evalA "without dropout, training mode equals eval mode")

        torchTest "60 training steps keep the live tensor count flat" (fun () ->
            let lm = HfModelFolder.load (Path.Combine(golden, "model")) 1L
            let data = loadTokenized (Path.Combine(golden, "data.jsonl"))
            let options = { small with GradientAccumulationSteps = 2; MaxSteps = 60; LearningRate = 1e-3 }
            let live = Array.zeroCreate<int64> 61
            TrainingLoop.train (TrainingLoop.plan options data.Rows.Length) lm data None
                { OnLog = fun log -> live[log.Step] <- DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
                  AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            // Windows of 2, 2, 2, 1 micro-batches repeat every 4 steps: compare those steps' counts.
            Expect.isGreaterThan live[8] 0L "the count is read"
            Expect.equal ([| for step in 8 .. 4 .. 60 -> live[step] |] |> Array.distinct) [| live[8] |] "flat")

        torchTest "resuming from a checkpoint continues exactly as the uninterrupted run" (fun () ->
            let options = { small with MaxSteps = 6; SaveSteps = 3; GradientAccumulationSteps = 2; LearningRate = 3e-3 }
            FamilyChecks.expectResumeMatches (Path.Combine(golden, "model")) (Path.Combine(golden, "data.jsonl")) options)
    ]

[<Tests>]
let tests = testList "bloom" [ configTests; moduleTests; cacheTests; loraTests; prefixTests; trainingTests ]
