/// The LLaMA variants Qwen3 (q/k norms, head_dim from the config), Qwen2 (q/k/v biases) and Mistral (a
/// sliding window): HF's config defaults and refusals, parameter names, save/load, generation with and
/// without the cache (left padding, sequences past the window), LoRA, prefix tuning, bf16, gradient
/// checkpointing and an exact resume. The forward and training numbers against PyTorch are the golden
/// cases qwen2-linear, qwen3-cosine and mistral-cosine (GoldenTests.fs).
module Functional.Tests.LlamaVariantTests

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

/// A config.json of the model type with the fields every LLaMA-shaped config needs (heads query heads,
/// width 4 per head), plus extra fields.
let private configWith (modelType: string) (heads: int) (extra: string) =
    sprintf """{"model_type": "%s", "vocab_size": 40, "hidden_size": %d, "intermediate_size": 24,
               "num_hidden_layers": 2, "num_attention_heads": %d%s}""" modelType (4 * heads) heads extra

/// configWith 4 query heads (width 16).
let private configText (modelType: string) (extra: string) = configWith modelType 4 extra

let private parse (json: string) =
    match ModelConfig.parse "c.json" json with
    | Llama c -> c
    | other -> failtestf "expected a LLaMA-shaped config, found %A" other

/// Tiny models of the three variants, wide-initialized so that greedy decoding moves between tokens:
/// Qwen3 with head_dim 6 (not width / heads = 4) and q/k norms, Qwen2 with q/k/v biases, Mistral with a
/// window of 4 keys. (A tied head with this initialization mostly repeats the last token; the golden
/// Qwen2 case ties its head.)
let private tiny (variant: LlamaVariant) =
    { tinyLlama with
        VocabSize = 23
        MaxPositionEmbeddings = 64
        InitializerRange = 0.5
        HeadDim = (if variant.QkNorm then 6 else 4)
        Variant = variant }

let private variants =
    [ "Qwen3", LlamaVariant.qwen3; "Qwen2", LlamaVariant.qwen2; "Mistral (window 4)", LlamaVariant.mistral (Some 4) ]

/// The golden case folders of the three variants (make_golden.py).
let private goldenCases = [ "Qwen3", "qwen3-cosine"; "Qwen2", "qwen2-linear"; "Mistral", "mistral-cosine" ]

/// A fresh model (tests run in parallel and switch modes), in eval mode; biases and norm weights drawn
/// so that they matter (HF initializes them to zero and one). Qwen3's q_norm and k_norm get wide weights:
/// with unit-RMS heads the scores would stay small and every query would average its keys.
let private model (config: LlamaConfig) (seed: int64) =
    let lm = CausalLm.create (Llama config) seed
    use g = new torch.Generator(uint64 (seed + 100L))
    do
        use _ = torch.no_grad ()
        for struct (name, p) in lm.Module.named_parameters () do
            if name.EndsWith ".bias" then p.normal_(0.0, 0.5, g) |> ignore
            elif name.EndsWith "q_norm.weight" || name.EndsWith "k_norm.weight" then p.normal_(0.0, 3.0, g) |> ignore
            elif name.Contains "norm" then p.normal_(1.0, 0.3, g) |> ignore
    lm.Module.eval ()
    lm

let private idsOf (vocab: int) (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, shape, generator = g, dtype = torch.int64)

let private logits (lm: CausalLm) (ids: torch.Tensor) =
    use _ = torch.no_grad ()
    lm.Module.forward ids

let private names (lm: CausalLm) = [ for struct (name, _) in lm.Module.named_parameters () -> name ]

let private greedy newTokens = { GenerationOptions.defaults with MaxNewTokens = newTokens }

// ---------------------------------------------------------------- config.json

let private configTests =
    testList "config" [
        test "qwen3 takes HF's Qwen3Config defaults: head_dim 128, 32 key/value heads, context 32768, untied, no bias" {
            let c = parse (configWith "qwen3" 32 "")
            Expect.equal c.Variant LlamaVariant.qwen3 "variant"
            Expect.equal (c.HeadDim, c.NumKeyValueHeads, c.MaxPositionEmbeddings) (128, 32, 32768) "defaults"
            Expect.equal (c.TieWordEmbeddings, c.AttentionBias, c.MlpBias) (false, false, false) "untied, unbiased"
            Expect.equal (c.RopeTheta, c.RmsNormEps) (10000.0, 1e-6) "rope_theta and rms_norm_eps"
        }
        test "qwen3 uses head_dim and attention_bias as given; mlp_bias is not Qwen3's" {
            let c = parse (configText "qwen3" """, "num_key_value_heads": 2, "head_dim": 6, "attention_bias": true, "mlp_bias": true""")
            Expect.equal (c.HeadDim, c.NumKeyValueHeads, c.AttentionBias, c.MlpBias) (6, 2, true, false) "fields"
        }
        test "an absent num_key_value_heads is HF's class default (qwen2 and qwen3 32, mistral 8, llama the heads); null is the heads" {
            let kv modelType extra = (parse (configWith modelType 32 extra)).NumKeyValueHeads
            Expect.equal (kv "qwen3" "") 32 "qwen3"
            Expect.equal (kv "qwen2" "") 32 "qwen2"
            Expect.equal (kv "mistral" "") 8 "mistral"
            Expect.equal (kv "llama" "") 32 "llama"
            Expect.equal (kv "qwen2" """, "num_key_value_heads": null""") 32 "null means the heads"
            Expect.equal (kv "mistral" """, "num_key_value_heads": null""") 32 "null means the heads (mistral)"
            Expect.equal (kv "mistral" """, "num_key_value_heads": 4""") 4 "given"
            // With 4 heads the 32 of the default cannot divide them: the message says where 32 came from.
            expectInvalidInput "c.json" "num_key_value_heads" [ "(32, the qwen2 default when the field is absent)" ] (fun () ->
                parse (configText "qwen2" "") |> ignore)
        }
        test "Qwen2 and Qwen3 refuse use_sliding_window true and ignore their window fields when it is off" {
            for modelType in [ "qwen2"; "qwen3" ] do
                expectInvalidInput "c.json" "use_sliding_window" [ "not supported" ] (fun () ->
                    parse (configText modelType """, "num_key_value_heads": 2, "use_sliding_window": true""") |> ignore)
                let c = parse (configText modelType """, "num_key_value_heads": 2, "use_sliding_window": false, "sliding_window": 4, "max_window_layers": 1""")
                Expect.equal c.Variant.SlidingWindow None (modelType + ": no window")
        }
        test "an odd or non-positive head_dim is refused naming the field" {
            expectInvalidInput "c.json" "head_dim" [ "even" ] (fun () -> parse (configText "qwen3" """, "num_key_value_heads": 2, "head_dim": 5""") |> ignore)
            expectInvalidInput "c.json" "head_dim" [ "positive" ] (fun () -> parse (configText "qwen3" """, "num_key_value_heads": 2, "head_dim": 0""") |> ignore)
        }
        test "toJson reads back equal for every variant" {
            for json in
                [ configWith "qwen3" 32 ""
                  configText "qwen3" """, "num_key_value_heads": 2, "head_dim": 6, "attention_bias": true, "tie_word_embeddings": true"""
                  configText "qwen2" """, "num_key_value_heads": 2, "rope_theta": 1000000.0"""
                  configWith "mistral" 8 """, "sliding_window": null"""
                  configText "mistral" """, "num_key_value_heads": 2, "sliding_window": 8""" ] do
                let config = ModelConfig.parse "c.json" json
                Expect.equal (ModelConfig.parse "again.json" (ModelConfig.toJson config)) config json
        }
        test "traits: display name, HF class, PEFT's LoRA targets, the prefix's head width" {
            for json, display, architecture in
                [ configText "qwen3" """, "num_key_value_heads": 2, "head_dim": 6""", "Qwen3", "Qwen3ForCausalLM"
                  configText "qwen2" """, "num_key_value_heads": 2""", "Qwen2", "Qwen2ForCausalLM"
                  configText "mistral" """, "num_key_value_heads": 2""", "Mistral", "MistralForCausalLM" ] do
                let config = ModelConfig.parse "c.json" json
                let t = ModelFamily.traits config
                Expect.equal (t.DisplayName, t.Architecture, t.BasePrefix) (display, architecture, "model.") display
                Expect.equal t.DefaultLoraTargets [ "q_proj"; "v_proj" ] (display + ": PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING")
                let headDim = match config with Llama c -> c.HeadDim | _ -> 0
                Expect.equal t.PrefixShape { Layers = 2; KeyValueHeads = 2; HeadDim = headDim } (display + ": prefix shape")
        }
    ]

// ---------------------------------------------------------------- modules, saving and loading

let private modelTests =
    testList "model" [
        torchTest "qwen3: q_norm and k_norm (head_dim wide) after o_proj in HF's order, exempt from weight decay" (fun () ->
            let lm = model (tiny LlamaVariant.qwen3) 1L
            let layer = [ for struct (name, p) in lm.Module.named_parameters () do
                              if name.StartsWith "model.layers.0." then name.Substring 15, List.ofArray p.shape ]
            Expect.equal layer
                [ "self_attn.q_proj.weight", [ 24L; 16L ]; "self_attn.k_proj.weight", [ 12L; 16L ]
                  "self_attn.v_proj.weight", [ 12L; 16L ]; "self_attn.o_proj.weight", [ 16L; 24L ]
                  "self_attn.q_norm.weight", [ 6L ]; "self_attn.k_norm.weight", [ 6L ]
                  "mlp.gate_proj.weight", [ 24L; 16L ]; "mlp.up_proj.weight", [ 24L; 16L ]; "mlp.down_proj.weight", [ 16L; 24L ]
                  "input_layernorm.weight", [ 16L ]; "post_attention_layernorm.weight", [ 16L ] ]
                "layer 0's parameters"
            Expect.isTrue (lm.NoWeightDecay.Contains "model.layers.1.self_attn.k_norm.weight") "k_norm is a norm"
            let biased = model { tiny LlamaVariant.qwen3 with AttentionBias = true } 1L
            for p in [ "q_proj"; "k_proj"; "v_proj"; "o_proj" ] do
                Expect.contains (names biased) (sprintf "model.layers.1.self_attn.%s.bias" p) (p + " bias with attention_bias"))

        torchTest "qwen3: the norms act on each head before the rotary embedding" (fun () ->
            // Scaling every weight of q_norm and k_norm by c scales every score by c^2: the logits change,
            // and a model whose norms are all 1 differs from one without them (unit-norm heads).
            let lm = model (tiny LlamaVariant.qwen3) 2L
            use ids = idsOf 23 [| 2L; 7L |] 3L
            use before = logits lm ids
            do
                use _ = torch.no_grad ()
                for struct (name, p) in lm.Module.named_parameters () do
                    if name.EndsWith "q_norm.weight" || name.EndsWith "k_norm.weight" then p.mul_((2.0).ToScalar()) |> ignore
            use after = logits lm ids
            Expect.isGreaterThan (maxAbsDiff after before) 1e-3 "the norm weights scale the scores")

        for display, case in goldenCases do
            torchTest (sprintf "%s: save and load round-trip exactly; config.json names model_type and the HF class" display) (fun () ->
                let lm = HfModelFolder.load (Path.Combine(goldenDir case, "model")) 0L
                lm.Module.eval ()
                use folder = new TempFolder()
                let dir = folder.File "model"
                HfModelFolder.save dir lm None []
                let traits = ModelFamily.traits lm.Config
                use document = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
                let root = document.RootElement
                Expect.equal (root.GetProperty("model_type").GetString()) traits.ModelType "model_type"
                Expect.equal [ for a in root.GetProperty("architectures").EnumerateArray() -> a.GetString() ] [ traits.Architecture ] "architectures"
                let saved = Safetensors.load (Path.Combine(dir, "model.safetensors"))
                let golden = Safetensors.load (Path.Combine(goldenDir case, "model", "model.safetensors"))
                Expect.sequenceEqual (saved |> Map.keys |> Seq.sort) (golden |> Map.keys |> Seq.sort) "HF's tensor names (a tied head saves no lm_head.weight)"
                for KeyValue(name, t) in golden do
                    Expect.isTrue (saved[name].Equals t) (name + " saved bit for bit")
                let reloaded = HfModelFolder.load dir 9L
                reloaded.Module.eval ()
                Expect.equal reloaded.Config lm.Config "the config reads back equal"
                use ids = idsOf 96 [| 2L; 12L |] 4L
                use a = logits lm ids
                use b = logits reloaded ids
                Expect.isTrue (a.Equals b) "the same logits"
                use exported = JsonDocument.Parse(HfModelFolder.configJson lm (Some(File.ReadAllText(Path.Combine(goldenDir case, "model", "config.json")))))
                Expect.equal (exported.RootElement.GetProperty("model_type").GetString()) traits.ModelType "export over the source config keeps model_type"
                let architectures = exported.RootElement.GetProperty "architectures"
                Expect.equal [ for a in architectures.EnumerateArray() -> a.GetString() ] [ traits.Architecture ] "and the architecture")
    ]

// ---------------------------------------------------------------- generation

let private generationTests =
    testList "generation" [
        for display, variant in variants do
            FamilyChecks.greedyMatches display (fun () -> model (tiny variant) 11L) [| 1L; 4L; 2L; 8L; 3L; 7L |] 20 2
            FamilyChecks.batchedMatches display (fun () -> model (tiny variant) 12L) [| [| 5L |]; [| 3L; 1L; 4L; 1L; 5L; 9L; 2L |]; [| 9L; 2L; 6L |] |] 12

        for display, variant in variants do
            torchTest (sprintf "%s: attention_dropout acts in training mode only" display) (fun () ->
                let lm = model { tiny variant with AttentionDropout = 0.5 } 14L
                use ids = idsOf 23 [| 2L; 9L |] 15L
                use a = logits lm ids
                use b = logits lm ids
                Expect.isTrue (a.Equals b) "eval mode: no dropout"
                lm.Module.train ()
                use c = logits lm ids
                Expect.isGreaterThan (maxAbsDiff c a) 1e-4 "training mode drops attention weights")

        for display, variant in variants do
            torchTest (sprintf "%s: live tensors stay flat over 40 generated tokens" display) (fun () ->
                let lm = model (tiny variant) 16L
                let live () = DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
                let counts = ResizeArray()
                let before = live ()
                let generated = Generator.generateWith (fun _ -> counts.Add(live ())) lm [| [| 1L; 2L; 3L |]; [| 4L |] |] (greedy 40)
                Expect.equal generated[0].Length 40 "40 tokens generated"
                Expect.equal (Array.distinct (counts.ToArray())) [| counts[0] |] (sprintf "the count after every step equals step 0's (%d)" counts[0])
                Expect.equal (live ()) before "nothing is left alive after generation")

        torchTest "Mistral: the window changes generation once the sequence is longer than it" (fun () ->
            let windowed = model (tiny (LlamaVariant.mistral (Some 4))) 11L
            let full = model (tiny (LlamaVariant.mistral None)) 11L
            let prompt = [| 1L; 4L; 2L |]
            let a = Generator.generate windowed [| prompt |] (greedy 16)
            let b = Generator.generate full [| prompt |] (greedy 16)
            Expect.equal (Array.head a[0]) (Array.head b[0]) "the first new token sees only 3 keys either way"
            Expect.notEqual a[0] b[0] "later tokens see only the last 4")

        torchTest "Mistral: cached decoding past the window equals the training forward at every position, left padding included" (fun () ->
            let lm = model (tiny (LlamaVariant.mistral (Some 4))) 13L
            use _ = torch.no_grad ()
            let pad = 0L
            let row = [| 3L; 1L; 4L; 1L; 5L; 9L; 2L; 6L; 5L; 3L |]
            use alone = logits lm (torch.tensor(row, ReadOnlySpan [| 1L; 10L |])) // (1, 10, V)
            // The row behind 3 pads in a batch, fed as a prefill of 5 and then one position at a time.
            use batch = torch.tensor(Array.append [| pad; pad; pad |] row, ReadOnlySpan [| 1L; 13L |])
            use mask = torch.tensor(Array.append [| 0L; 0L; 0L |] (Array.create 10 1L), ReadOnlySpan [| 1L; 13L |])
            let mutable cache: KvCache option = None
            let pieces =
                [ for start, length in [ 0L, 5L ] @ [ for t in 5L .. 12L -> t, 1L ] do
                      use m = mask.narrow(1L, 0L, start + length)
                      use chunk = batch.narrow(1L, start, length)
                      let out, next = CausalLm.forwardCached lm chunk m cache
                      cache |> Option.iter (fun c -> (c :> IDisposable).Dispose())
                      cache <- Some next
                      yield out ]
            cache |> Option.iter (fun c -> (c :> IDisposable).Dispose())
            use stepwise = torch.cat(Array.ofList pieces, 1L)
            for p in pieces do p.Dispose()
            expectClose 1e-5 (stepwise.narrow(1L, 3L, 10L)) alone "the real positions")
    ]

// ---------------------------------------------------------------- PEFT, precision, checkpointing, resume

/// 13 rows in micro-batches of 2, windows of 2.
let private small =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 2
        MaxSeqLen = 32
        LearningRate = 1e-2
        Shuffle = false }

let private trainingTests =
    testList "training" [
        for display, case in goldenCases do
            torchTest (sprintf "%s: LoRA with the default targets trains only the adapters, which save and load" display) (fun () ->
                let dir = goldenDir case
                let lm = HfModelFolder.load (Path.Combine(dir, "model")) 1L
                use adapters = Lora.wrap { R = 2; Alpha = 4.0; Dropout = 0.0; TargetModules = []; ModuleNameSubstring = None } lm 3L
                Expect.equal adapters.TargetModuleNames [ "q_proj"; "v_proj" ] "PEFT's default targets"
                let original = FamilyChecks.expectOnlyAdaptersTrain dir lm adapters { small with MaxSteps = 2 }
                use folder = new TempFolder()
                Lora.save folder.Path None adapters
                use loaded = Lora.load folder.Path original
                lm.Module.eval ()
                original.Module.eval ()
                use ids = idsOf 96 [| 2L; 9L |] 5L
                use a = logits lm ids
                use b = logits original ids
                Expect.isTrue (a.Equals b) "the reloaded adapters give the same logits")

            torchTest (sprintf "%s: prefix tuning with an empty prefix equals the base forward; a prefix changes it" display) (fun () ->
                let lm = HfModelFolder.load (Path.Combine(goldenDir case, "model")) 1L
                lm.Module.eval ()
                let config = { PrefixTuning.configFor lm.Config 1 with NumVirtualTokens = 0 }
                let empty = torch.nn.Parameter(torch.zeros(config.EmbeddingsShape).DetachFromDisposeScope())
                use wrapped = new PrefixTunedModel(lm.Module, config, empty)
                use ids = idsOf 96 [| 2L; 20L |] 6L
                use _ = torch.no_grad ()
                use plain = lm.Module.forward ids
                use prefixed = wrapped.forward ids
                expectClose 1e-5 prefixed plain "an empty prefix"
                let adapter = PrefixTuning.create 3 lm 7L
                use withPrefix = adapter.Model.Module.forward ids
                Expect.isGreaterThan (maxAbsDiff withPrefix plain) 1e-4 "a prefix of 3")

            torchTest (sprintf "%s: bf16 training follows the fp32 loss curve within 1%%" display) (fun () ->
                let _, bf16 = FamilyChecks.expectBf16FollowsFp32 (goldenDir case) { small with MaxSteps = 6 } 0.01
                Expect.isLessThan (List.last bf16).Loss (List.head bf16).Loss "bf16 training learns")

            torchTest (sprintf "%s: a bf16 forward is close to the fp32 one" display) (fun () ->
                let lm = HfModelFolder.load (Path.Combine(goldenDir case, "model")) 1L
                lm.Module.eval ()
                let low = HfModelFolder.load (Path.Combine(goldenDir case, "model")) 1L
                low.Module.``to`` torch.bfloat16 |> ignore
                low.Module.eval ()
                use ids = idsOf 96 [| 2L; 24L |] 8L
                use a = logits lm ids
                use b = logits low ids
                Expect.equal b.dtype torch.bfloat16 "bf16 logits"
                let error = FamilyChecks.relativeL2 b a
                Expect.isLessThan error 2e-2 (sprintf "relative L2 error %g" error))

            torchTest (sprintf "%s: gradient checkpointing gives the same loss and gradients" display) (fun () ->
                let lm = HfModelFolder.load (Path.Combine(goldenDir case, "model")) 1L
                lm.Module.train ()
                use ids = idsOf 96 [| 2L; 24L |] 9L
                let run (checkpointing: bool) =
                    CausalLm.setGradientCheckpointing lm checkpointing
                    for p in lm.Module.parameters () do p.grad <- null
                    let loss =
                        use scope = torch.NewDisposeScope()
                        use out = lm.Module.forward ids
                        use loss = Loss.causalLmSum out ids
                        loss.backward ()
                        loss.item<float32> () |> float
                    loss, [ for struct (name, p) in lm.Module.named_parameters () -> name, values p.grad ]
                let plainLoss, plain = run false
                let checkpointedLoss, checkpointed = run true
                Expect.equal checkpointedLoss plainLoss "loss"
                for (name, a), (_, e) in List.zip checkpointed plain do
                    Expect.isGreaterThan (Array.sumBy abs e) 0.0 (name + " has a gradient")
                    let diff = Array.map2 (fun x y -> abs (x - y)) a e |> Array.max
                    Expect.isLessThanOrEqual diff 1e-6 (sprintf "%s: max abs difference %g" name diff))

            torchTest (sprintf "%s: resuming from a checkpoint continues exactly as the uninterrupted run" display) (fun () ->
                let dir = goldenDir case
                let options = { small with MaxSteps = 6; SaveSteps = 3; LrSchedulerType = SchedulerKind.Cosine; NumWarmupSteps = 1 }
                FamilyChecks.expectResumeMatches (Path.Combine(dir, "model")) (Path.Combine(dir, "data.jsonl")) options)
    ]

[<Tests>]
let tests = testList "llama variants" [ configTests; modelTests; generationTests; trainingTests ]
