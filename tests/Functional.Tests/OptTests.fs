/// The OPT family (HF OPTForCausalLM): config.json parsing and writing, HF's names and layout (learned
/// positions with offset 2, project_in/out, pre- and post-norm layers), dropout, saving and loading, the
/// key/value cache and generation, LoRA's default targets, prefix tuning, bf16, activation checkpointing
/// and an exact resume. Forward and training against PyTorch: the golden cases opt-cosine and
/// opt-pre-linear (GoldenTests.fs).
module Functional.Tests.OptTests

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

/// A tiny pre-norm OPT (the 125m / 1.3b layout): a final LayerNorm, no projections. A wide
/// initialization makes greedy decoding move between tokens.
let private tinyOpt : OptConfig =
    { VocabSize = 40
      HiddenSize = 16
      NumHiddenLayers = 2
      NumAttentionHeads = 4
      FfnDim = 32
      MaxPositionEmbeddings = 64
      WordEmbedProjDim = 16
      DoLayerNormBefore = true
      RemoveFinalLayerNorm = false
      ActivationFunction = Activation.Relu
      Dropout = 0.0
      AttentionDropout = 0.0
      ActivationDropout = 0.0
      InitStd = 0.5
      EnableBias = true
      LayerNormElementwiseAffine = true
      TieWordEmbeddings = true
      PadTokenId = Some 1 }

/// opt-350m's layout: post-norm layers, no final LayerNorm, embeddings projected (12 <-> 16).
let private postNormOpt = { tinyOpt with DoLayerNormBefore = false; WordEmbedProjDim = 12 }

let private families = [ "pre-norm", Opt tinyOpt; "post-norm with project_in/out", Opt postNormOpt ]

let private parse (json: string) = ModelConfig.parse "config.json" json

let private optOf (config: ModelConfig) =
    match config with
    | Opt c -> c
    | other -> failtestf "expected an OPT config, got %A" other

/// An opt-350m config.json as the Hub has it, shrunk.
let private opt350mJson =
    """{"_name_or_path": "facebook/opt-350m", "_remove_final_layer_norm": false, "activation_dropout": 0.0,
        "activation_function": "relu", "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 2, "do_layer_norm_before": false, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 64,
        "hidden_size": 32, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 48,
        "model_type": "opt", "num_attention_heads": 4, "num_hidden_layers": 3, "pad_token_id": 1,
        "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.20.0.dev0", "use_cache": true,
        "vocab_size": 50, "word_embed_proj_dim": 24}"""

let private minimalJson (extra: string) =
    sprintf """{"model_type": "opt", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 16%s}""" extra

let private randomIds (vocab: int) (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, shape, dtype = torch.int64, generator = g)

let private ones (rows: int64) (columns: int64) = torch.ones(rows, columns, dtype = torch.int64)

/// A fresh model per test (tests run in parallel and switch modes), in eval mode.
let private model (config: ModelConfig) =
    let lm = CausalLm.create config 11L
    lm.Module.eval ()
    lm

let private logits (lm: CausalLm) (input: torch.Tensor) =
    use _ = torch.no_grad ()
    lm.Module.forward input

let private names (lm: CausalLm) = [ for name, _ in CausalLm.parameterSpec lm -> name ]

let private parameters (lm: CausalLm) =
    dict [ for struct (name, p) in lm.Module.named_parameters () -> name, p :> torch.Tensor ]

/// One training micro-step: forward, summed causal-LM loss, backward; every gradient by name.
let private gradientsOf (lm: CausalLm) (input: torch.Tensor) =
    for p in lm.Module.parameters () do
        p.grad <- null
    do
        use scope = torch.NewDisposeScope()
        let loss = Loss.causalLmSum (lm.Module.forward input) input
        loss.backward ()
    [ for struct (name, p) in lm.Module.named_parameters () ->
          match p.grad with
          | null -> name, None
          | g -> name, Some(values g) ]

let private greedy newTokens = { GenerationOptions.defaults with MaxNewTokens = newTokens }

// ---------------------------------------------------------------- config.json

let private configTests =
    testList "config" [
        test "an opt-350m config.json parses: post-norm, projected embeddings, HF's defaults for the rest" {
            let expected =
                { VocabSize = 50
                  HiddenSize = 32
                  NumHiddenLayers = 3
                  NumAttentionHeads = 4
                  FfnDim = 64
                  MaxPositionEmbeddings = 48
                  WordEmbedProjDim = 24
                  DoLayerNormBefore = false
                  RemoveFinalLayerNorm = false
                  ActivationFunction = Activation.Relu
                  Dropout = 0.1
                  AttentionDropout = 0.0
                  ActivationDropout = 0.0
                  InitStd = 0.02
                  EnableBias = true
                  LayerNormElementwiseAffine = true
                  TieWordEmbeddings = true
                  PadTokenId = Some 1 }
            Expect.equal (parse opt350mJson) (Opt expected) "opt-350m"
        }
        test "absent optional fields take HF's defaults; a null pad_token_id means none" {
            let c = optOf (parse (minimalJson ""))
            Expect.equal c.MaxPositionEmbeddings 2048 "max_position_embeddings"
            Expect.equal c.WordEmbedProjDim 8 "word_embed_proj_dim = hidden_size"
            Expect.isTrue c.DoLayerNormBefore "do_layer_norm_before"
            Expect.isFalse c.RemoveFinalLayerNorm "_remove_final_layer_norm"
            Expect.equal c.ActivationFunction Activation.Relu "activation_function"
            Expect.equal (c.Dropout, c.AttentionDropout, c.ActivationDropout) (0.1, 0.0, 0.0) "dropouts"
            Expect.equal c.InitStd 0.02 "init_std"
            Expect.isTrue (c.EnableBias && c.LayerNormElementwiseAffine && c.TieWordEmbeddings) "enable_bias, affine norms, tied head"
            Expect.equal c.PadTokenId (Some 1) "pad_token_id"
            Expect.equal (optOf (parse (minimalJson ", \"pad_token_id\": null"))).PadTokenId None "null pad_token_id"
            Expect.equal (optOf (parse (minimalJson ", \"word_embed_proj_dim\": null"))).WordEmbedProjDim 8 "null word_embed_proj_dim"
        }
        test "toJson writes OPTForCausalLM and model_type opt, and parse reads it back equal" {
            for config in
                [ Opt tinyOpt
                  Opt postNormOpt
                  Opt { tinyOpt with PadTokenId = None; TieWordEmbeddings = false; EnableBias = false; LayerNormElementwiseAffine = false }
                  Opt { tinyOpt with RemoveFinalLayerNorm = true; ActivationFunction = Activation.Gelu; Dropout = 0.25; AttentionDropout = 0.5; ActivationDropout = 0.125 }
                  parse opt350mJson ] do
                let json = ModelConfig.toJson config
                use document = JsonDocument.Parse json
                let root = document.RootElement
                Expect.equal (root.GetProperty("model_type").GetString()) "opt" "model_type"
                Expect.equal [ for a in root.GetProperty("architectures").EnumerateArray() -> a.GetString() ] [ "OPTForCausalLM" ] "architectures"
                Expect.equal (ModelConfig.parse "written" json) config "round trip"
        }
        test "bad fields raise InvalidInputException naming the field" {
            let bad field (extra: string) parts = expectInvalidInput "config.json" field parts (fun () -> parse (minimalJson extra) |> ignore)
            bad "num_attention_heads" ", \"num_attention_heads\": 3" [ "divisible" ]
            bad "layerdrop" ", \"layerdrop\": 0.1" [ "LayerDrop"; "expected 0" ]
            bad "layerdrop" ", \"layerdrop\": 1.5" [ "probability" ]
            bad "pad_token_id" ", \"pad_token_id\": 10" [ "[0, 10)" ]
            bad "dropout" ", \"dropout\": 1.0" [ "probability" ]
            bad "attention_dropout" ", \"attention_dropout\": -0.1" [ "probability" ]
            bad "activation_function" ", \"activation_function\": \"swiglu\"" [ "unsupported activation" ]
            bad "word_embed_proj_dim" ", \"word_embed_proj_dim\": 0" [ "positive" ]
            bad "do_layer_norm_before" ", \"do_layer_norm_before\": 1" [ "true or false" ]
            expectInvalidInput "config.json" "ffn_dim" [ "required" ] (fun () ->
                parse """{"model_type": "opt", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}""" |> ignore)
            expectInvalidInput "config.json" "model_type" [ "\"opt\"" ] (fun () -> parse """{"model_type": "bert"}""" |> ignore)
        }
        test "traits: HF's prefix, tied head, learned positions, PEFT's LoRA targets, prefix shape" {
            let t = ModelFamily.traits (Opt postNormOpt)
            Expect.equal (t.DisplayName, t.ModelType, t.Architecture) ("OPT", "opt", "OPTForCausalLM") "names"
            Expect.equal t.BasePrefix "model." "base_model_prefix"
            Expect.equal t.TiedKeys [ "lm_head.weight" ] "tied head"
            Expect.equal (t.PositionLimit, t.PositionField, t.LearnedPositions) (64, "max_position_embeddings", true) "positions"
            Expect.equal t.DefaultLoraTargets [ "q_proj"; "v_proj" ] "LoRA targets"
            Expect.equal t.PrefixShape { Layers = 2; KeyValueHeads = 4; HeadDim = 4 } "prefix shape"
            Expect.equal t.LookupOnly [ "model.decoder.embed_positions.weight" ] "tied: the position table is lookup-only"
            Expect.equal (ModelFamily.traits (Opt { tinyOpt with TieWordEmbeddings = false })).LookupOnly
                [ "model.decoder.embed_positions.weight"; "model.decoder.embed_tokens.weight" ] "untied: the token embedding too"
            Expect.equal (t.Depth, t.Width, t.VocabSize) (2, 16, 40) "depth, width, vocabulary"
            match ModelFamily.resize 3 24 2 (Opt postNormOpt) with
            | Opt r ->
                Expect.equal (r.NumHiddenLayers, r.HiddenSize, r.NumAttentionHeads, r.FfnDim, r.WordEmbedProjDim) (3, 24, 2, 96, 12) "resized, still projected"
            | other -> failtestf "resize changed the family: %A" other
        }
        test "withoutDropout sets every dropout probability to 0" {
            let c = Opt.withoutDropout { tinyOpt with Dropout = 0.1; AttentionDropout = 0.2; ActivationDropout = 0.3 }
            Expect.equal (c.Dropout, c.AttentionDropout, c.ActivationDropout) (0.0, 0.0, 0.0) "no dropout"
            Expect.equal { c with Dropout = 0.1; AttentionDropout = 0.2; ActivationDropout = 0.3 } { tinyOpt with Dropout = 0.1; AttentionDropout = 0.2; ActivationDropout = 0.3 } "nothing else changes"
        }
    ]

// ---------------------------------------------------------------- modules

let private layerNames (layer: int) =
    let p = sprintf "model.decoder.layers.%d." layer
    [ for m in [ "k_proj"; "v_proj"; "q_proj"; "out_proj" ] do
          yield p + "self_attn." + m + ".weight"
          yield p + "self_attn." + m + ".bias"
      yield! [ p + "self_attn_layer_norm.weight"; p + "self_attn_layer_norm.bias"; p + "fc1.weight"; p + "fc1.bias"
               p + "fc2.weight"; p + "fc2.bias"; p + "final_layer_norm.weight"; p + "final_layer_norm.bias" ] ]

let private moduleTests =
    testList "modules" [
        torchTest "pre-norm: HF's names in HF's order, a final LayerNorm, no projections, a tied head" (fun () ->
            let lm = model (Opt tinyOpt)
            let expected =
                [ "model.decoder.embed_tokens.weight"; "model.decoder.embed_positions.weight"
                  "model.decoder.final_layer_norm.weight"; "model.decoder.final_layer_norm.bias" ]
                @ layerNames 0 @ layerNames 1
            Expect.equal (names lm) expected "named_parameters"
            let p = parameters lm
            Expect.sequenceEqual p["model.decoder.embed_positions.weight"].shape [| 66L; 16L |] "max_position_embeddings + 2 rows"
            Expect.sequenceEqual p["model.decoder.layers.0.fc1.weight"].shape [| 32L; 16L |] "fc1 (ffn_dim, hidden)"
            Expect.isTrue (lm.NoWeightDecay.Contains "model.decoder.final_layer_norm.weight") "LayerNorm weights are exempt from decay"
            Expect.isTrue (lm.NoWeightDecay.Contains "model.decoder.layers.1.self_attn.k_proj.bias") "biases are exempt from decay"
            Expect.isFalse (lm.NoWeightDecay.Contains "model.decoder.layers.1.fc2.weight") "projection weights decay")
        torchTest "post-norm with word_embed_proj_dim: project_out and project_in, no final LayerNorm" (fun () ->
            let lm = model (Opt postNormOpt)
            let expected =
                [ "model.decoder.embed_tokens.weight"; "model.decoder.embed_positions.weight"
                  "model.decoder.project_out.weight"; "model.decoder.project_in.weight" ]
                @ layerNames 0 @ layerNames 1
            Expect.equal (names lm) expected "named_parameters"
            let p = parameters lm
            Expect.sequenceEqual p["model.decoder.embed_tokens.weight"].shape [| 40L; 12L |] "(vocab, word_embed_proj_dim)"
            Expect.sequenceEqual p["model.decoder.project_out.weight"].shape [| 12L; 16L |] "project_out hidden -> 12"
            Expect.sequenceEqual p["model.decoder.project_in.weight"].shape [| 16L; 12L |] "project_in 12 -> hidden"
            use out = logits lm (randomIds 40 [| 2L; 5L |] 1L)
            Expect.sequenceEqual out.shape [| 2L; 5L; 40L |] "logits (B, T, vocab)")
        torchTest "enable_bias false, affine-free LayerNorms, _remove_final_layer_norm and an untied head change the parameters as HF's" (fun () ->
            let lm = model (Opt { tinyOpt with EnableBias = false; LayerNormElementwiseAffine = false; RemoveFinalLayerNorm = true; TieWordEmbeddings = false })
            let expected =
                [ "model.decoder.embed_tokens.weight"; "model.decoder.embed_positions.weight" ]
                @ [ for layer in 0 .. 1 do
                        for m in [ "self_attn.k_proj"; "self_attn.v_proj"; "self_attn.q_proj"; "self_attn.out_proj"; "fc1"; "fc2" ] ->
                            sprintf "model.decoder.layers.%d.%s.weight" layer m ]
                @ [ "lm_head.weight" ]
            Expect.equal (names lm) expected "no biases, no LayerNorm parameters, lm_head"
            Expect.equal lm.TiedKeys [] "untied"
            use out = logits lm (randomIds 40 [| 2L; 5L |] 1L)
            Expect.isTrue (values out |> Array.forall Double.IsFinite) "finite logits")
        torchTest "initialization: normal(0, init_std), the padding row zero, biases zero, LayerNorms one" (fun () ->
            let lm = CausalLm.create (Opt { postNormOpt with VocabSize = 400; InitStd = 0.05 }) 3L
            let p = parameters lm
            let embedding = p["model.decoder.embed_tokens.weight"]
            Expect.isTrue (values embedding[1L] |> Array.forall ((=) 0.0)) "row pad_token_id = 1 is zero"
            let rest = values (embedding.narrow(0L, 2L, 398L))
            let std = sqrt (Array.averageBy (fun v -> v * v) rest)
            Expect.floatClose { absolute = 0.003; relative = 0.0 } std 0.05 "the embedding's standard deviation is init_std"
            let positions = values p["model.decoder.embed_positions.weight"]
            Expect.isGreaterThan (positions |> Array.map abs |> Array.max) 0.05 "the position table is drawn too (no padding row)"
            Expect.isTrue (values p["model.decoder.layers.0.fc1.bias"] |> Array.forall ((=) 0.0)) "biases zero"
            Expect.isTrue (values p["model.decoder.layers.1.final_layer_norm.weight"] |> Array.forall ((=) 1.0)) "LayerNorm weights one"
            let again = CausalLm.create (Opt { postNormOpt with VocabSize = 400; InitStd = 0.05 }) 3L
            let q = parameters again
            Expect.equal (values q["model.decoder.project_in.weight"]) (values p["model.decoder.project_in.weight"]) "the seed decides")
        torchTest "the padding row gets no gradient from the lookup (nn.Embedding(padding_idx)), other rows do" (fun () ->
            let lm = CausalLm.create (Opt { tinyOpt with TieWordEmbeddings = false }) 5L
            lm.Module.train ()
            use input = torch.tensor([| 3L; 1L; 4L; 1L; 5L; 9L |], ReadOnlySpan [| 1L; 6L |])
            let gradients = dict (gradientsOf lm input)
            let g = gradients["model.decoder.embed_tokens.weight"].Value |> Array.chunkBySize 16
            Expect.isTrue (g[1] |> Array.forall ((=) 0.0)) "row 1 (pad_token_id) has a zero gradient"
            Expect.isTrue (g[3] |> Array.exists ((<>) 0.0)) "row 3 has a gradient"
            Expect.isTrue (g[7] |> Array.forall ((=) 0.0)) "an unused row has none")
        torchTest "positions read the learned table at row p + 2" (fun () ->
            let lm = model (Opt tinyOpt)
            use input = randomIds 40 [| 1L; 6L |] 2L
            use before = logits lm input
            do
                use _ = torch.no_grad ()
                let table = (parameters lm)["model.decoder.embed_positions.weight"]
                table.narrow(0L, 0L, 2L).fill_(100.0) |> ignore
                table[8L].fill_(100.0) |> ignore
            use after = logits lm input
            expectClose 1e-6 (after.narrow(1L, 0L, 6L)) (before.narrow(1L, 0L, 6L)) "rows 0, 1 and 8 are unused by positions 0 .. 5"
            do
                use _ = torch.no_grad ()
                let table = (parameters lm)["model.decoder.embed_positions.weight"]
                table[7L].fill_(100.0) |> ignore
            use moved = logits lm input
            expectClose 1e-6 (moved.narrow(1L, 0L, 5L)) (before.narrow(1L, 0L, 5L)) "positions 0 .. 4 do not read row 7"
            Expect.isGreaterThan (maxAbsDiff (moved.narrow(1L, 5L, 1L)) (before.narrow(1L, 5L, 1L))) 1e-3 "position 5 reads row 7")
        torchTest "max_position_embeddings positions fit, one more is refused" (fun () ->
            let lm = model (Opt { tinyOpt with MaxPositionEmbeddings = 8 })
            use fits = logits lm (randomIds 40 [| 1L; 8L |] 1L)
            Expect.sequenceEqual fits.shape [| 1L; 8L; 40L |] "8 positions"
            Expect.throwsT<ArgumentException> (fun () -> logits lm (randomIds 40 [| 1L; 9L |] 1L) |> ignore) "9 positions")
        torchTest "dropout and attention_dropout act in training mode only; withoutDropout removes them" (fun () ->
            for config in [ { postNormOpt with Dropout = 0.2 }; { tinyOpt with AttentionDropout = 0.3 } ] do
                let lm = CausalLm.create (Opt config) 4L
                use input = randomIds 40 [| 2L; 7L |] 3L
                lm.Module.eval ()
                use eval1 = logits lm input
                use eval2 = logits lm input
                Expect.equal (values eval1) (values eval2) "eval mode is deterministic"
                lm.Module.train ()
                use trained1 = logits lm input
                use trained2 = logits lm input
                Expect.isGreaterThan (maxAbsDiff trained1 eval1) 1e-4 "training mode drops"
                Expect.isGreaterThan (maxAbsDiff trained1 trained2) 1e-4 "with fresh masks each forward"
                let plain = CausalLm.create (Opt(Opt.withoutDropout config)) 4L
                plain.Module.train ()
                use noDrop = logits plain input
                expectClose 1e-6 noDrop eval1 "without dropout, training mode equals eval mode")
    ]

// ---------------------------------------------------------------- saving, loading, export

let private folderTests =
    testList "folders" [
        for family, config in families do
            torchTest (sprintf "%s: save and load round-trip every tensor exactly; config.json says opt and OPTForCausalLM; the tied head is not saved" family) (fun () ->
                let lm = CausalLm.create config 6L
                use folder = new TempFolder()
                let dir = folder.File "model"
                HfModelFolder.save dir lm None []
                use document = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
                let root = document.RootElement
                Expect.equal (root.GetProperty("model_type").GetString()) "opt" "model_type"
                Expect.equal [ for a in root.GetProperty("architectures").EnumerateArray() -> a.GetString() ] [ "OPTForCausalLM" ] "architectures"
                let header = Safetensors.readHeader (Path.Combine(dir, "model.safetensors"))
                Expect.equal (header.Entries |> List.map (fun e -> e.Name) |> List.sort) (names lm |> List.sort) "save_pretrained's keys, no lm_head.weight"
                let reloaded = HfModelFolder.load dir 99L
                Expect.equal reloaded.Config lm.Config "the config reads back equal"
                let before, after = parameters lm, parameters reloaded
                for name in names lm do
                    Expect.isTrue (before[name].Equals after[name]) (name + " bit for bit")
                lm.Module.eval ()
                reloaded.Module.eval ()
                use input = randomIds 40 [| 2L; 9L |] 3L
                use a = logits lm input
                use b = logits reloaded input
                Expect.equal (values b) (values a) "the same logits")
        torchTest "a bare OPTModel checkpoint (names without model.) loads" (fun () ->
            let lm = CausalLm.create (Opt postNormOpt) 6L
            use folder = new TempFolder()
            File.WriteAllText(folder.File "config.json", ModelConfig.toJson lm.Config)
            StateDict.export (folder.File "model.safetensors") (Map [ "format", "pt" ])
                [ for struct (name, p) in lm.Module.named_parameters () -> name.Substring "model.".Length, (p :> torch.Tensor) ]
            let reloaded = HfModelFolder.load folder.Path 1L
            let before, after = parameters lm, parameters reloaded
            for name in names lm do
                Expect.isTrue (before[name].Equals after[name]) name)
        torchTest "a fine-tuned OPT exported over its source config keeps model_type opt and the source's other keys" (fun () ->
            let lm = CausalLm.create (parse opt350mJson) 1L
            use document = JsonDocument.Parse(HfModelFolder.configJson lm (Some opt350mJson))
            let root = document.RootElement
            Expect.equal (root.GetProperty("model_type").GetString()) "opt" "model_type"
            Expect.equal (root.GetProperty("prefix").GetString()) "</s>" "source keys survive"
            Expect.equal (root.GetProperty("torch_dtype").GetString()) "float32" "our dtype"
            Expect.equal (ModelConfig.parse "merged" (root.GetRawText())) lm.Config "reads back equal")
    ]

// ---------------------------------------------------------------- key/value cache and generation

let private cacheTests =
    testList "kv cache" [
        for family, config in families do
            let fresh () = model config
            FamilyChecks.cachedLogits family fresh
            FamilyChecks.paddedRows family "positions from the mask's cumsum" fresh 1L [| 3L; 2L; 4L; 7L; 5L; 9L |]
            FamilyChecks.greedyMatches family fresh FamilyChecks.prompt 16 1
            FamilyChecks.batchedMatches family fresh FamilyChecks.prompts 10
        torchTest "generation stops at max_position_embeddings" (fun () ->
            let lm = model (Opt { tinyOpt with MaxPositionEmbeddings = 12 })
            let generated = Generator.generate lm [| [| 1L; 2L; 3L |] |] (greedy 20)
            Expect.equal generated[0].Length 10 "3 prompt tokens and 9 new ones fill the 12 positions; the last new token is never fed")
    ]

// ---------------------------------------------------------------- adapters

let private lora =
    { R = 4
      Alpha = 8.0
      Dropout = 0.0
      TargetModules = []
      ModuleNameSubstring = None }

let private golden = goldenDir "opt-cosine"

let private trainOptions =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 2
        LearningRate = 0.01
        MaxSteps = 6
        MaxSeqLen = 32
        Seed = 1234L
        Shuffle = true
        SaveSteps = 3 }

let private request (modelPath: string) (output: string) =
    FamilyChecks.fineTuneRequest modelPath (Path.Combine(golden, "data.jsonl")) output trainOptions

let private tensorsOf (path: string) =
    let tensors = Safetensors.load path
    let result = tensors |> Map.map (fun _ t -> values t)
    tensors |> Map.iter (fun _ t -> t.Dispose())
    result

let private adapterTests =
    testList "adapters" [
        torchTest "LoRA without targets adapts q_proj and v_proj (PEFT's mapping for opt) under PEFT's names, in HF's module order" (fun () ->
            let lm = model (Opt postNormOpt)
            use adapters = Lora.wrap lora lm 1L
            let expected =
                [ for layer in 0 .. 1 do
                      for m in [ "v_proj"; "q_proj" ] do
                          let prefix = sprintf "base_model.model.model.decoder.layers.%d.self_attn.%s" layer m
                          yield prefix + ".lora_A.weight", [ 4L; 16L ]
                          yield prefix + ".lora_B.weight", [ 16L; 4L ] ]
            Expect.equal [ for name, p in Lora.parameters adapters -> name, List.ofArray p.shape ] expected "names and shapes"
            Expect.equal (List.sort adapters.TargetModuleNames) [ "q_proj"; "v_proj" ] "target_modules")
        torchTest "LoRA training with only the adapters: the base stays bit-identical, the adapters move, save and load reproduce them" (fun () ->
            use output = new TempFolder()
            let settings = { Config = lora; OnlyOptimizeLora = true; LearningRate = None; AdapterPath = None }
            let result = FineTune.run { request (Path.Combine(golden, "model")) (output.File "run") with Lora = Some settings } ignore
            Expect.equal result.Steps 6 "six steps"
            let baseWeights = tensorsOf (Path.Combine(golden, "model", "model.safetensors"))
            Expect.equal (tensorsOf (Path.Combine(output.File "run", "checkpoint-6", "model.safetensors"))) baseWeights "the base weights are bit-identical after training"
            let final = result.FinalModelPath
            Expect.isFalse (File.Exists(Path.Combine(final, "model.safetensors"))) "final/ holds the adapter only"
            let trained = tensorsOf (Path.Combine(final, "adapter_model.safetensors"))
            Expect.equal trained.Count 8 "A and B of q_proj and v_proj in both layers"
            for KeyValue(name, v) in trained do
                if name.Contains "lora_B" then Expect.isTrue (v |> Array.exists ((<>) 0.0)) (name + " moved from zero")
            use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(final, "adapter_config.json")))
            Expect.equal ([ for t in config.RootElement.GetProperty("target_modules").EnumerateArray() -> t.GetString() ] |> List.sort) [ "q_proj"; "v_proj" ] "target_modules"
            let fresh = HfModelFolder.load (Path.Combine(golden, "model")) 0L
            use loaded = Lora.load final fresh
            use savedAgain = new TempFolder()
            Lora.save savedAgain.Path None loaded
            Expect.equal (tensorsOf (savedAgain.File "adapter_model.safetensors")) trained "load then save gives the same tensors"
            fresh.Module.eval ()
            use input = randomIds 96 [| 2L; 6L |] 3L
            use adapted = logits fresh input
            let plain = HfModelFolder.load (Path.Combine(golden, "model")) 0L
            plain.Module.eval ()
            use baseLogits = logits plain input
            Expect.isGreaterThan (maxAbsDiff adapted baseLogits) 1e-6 "the loaded adapters change the logits")
        for family, config in families do
            torchTest (sprintf "%s: prefix tuning with an empty prefix equals the base forward, and a prefix equals the tokens it caches" family) (fun () ->
                let lm = model config
                use _ = torch.no_grad ()
                use input = randomIds 40 [| 2L; 5L |] 7L
                use plain = lm.Module.forward input
                let shape = (ModelFamily.traits config).PrefixShape
                let empty () = torch.zeros(2L, int64 shape.KeyValueHeads, 0L, int64 shape.HeadDim)
                use emptyPrefix = { Keys = Array.init shape.Layers (fun _ -> empty ()); Values = Array.init shape.Layers (fun _ -> empty ()) }
                let withEmpty, cache = CausalLm.forwardCached lm input (ones 2L 5L) (Some emptyPrefix)
                use withEmpty = withEmpty
                (cache :> IDisposable).Dispose()
                expectClose 1e-6 withEmpty plain "an empty prefix changes nothing"
                // A prefix holding the keys and values of 3 real tokens makes the model continue after them.
                use context = randomIds 40 [| 1L; 3L |] 8L
                use tokens = randomIds 40 [| 1L; 4L |] 9L
                use whole = lm.Module.forward (torch.cat([| context; tokens |], 1L))
                let _, contextCache = CausalLm.forwardCached lm context (ones 1L 3L) None
                use contextCache = contextCache
                let adapter = PrefixTuning.create 3 lm 1L
                let layers = [ for l in 0 .. shape.Layers - 1 do yield contextCache.Keys[l][0L]; yield contextCache.Values[l][0L] ] // (heads, 3, hd) each
                use stacked = torch.stack(layers, 0L) // (layers * 2, heads, 3, hd)
                use layout = stacked.permute(2L, 0L, 1L, 3L).reshape(3L, -1L) // PEFT's (N, layers * 2 * token_dim)
                adapter.Embeddings.copy_ layout |> ignore
                adapter.Model.Module.eval ()
                use prefixed = adapter.Model.Module.forward tokens
                expectClose 1e-5 prefixed (whole.narrow(1L, 3L, 4L)) "the tokens after the prefix, at positions 3 .. 6")
    ]

// ---------------------------------------------------------------- precision, checkpointing, resume

let private trainingTests =
    testList "training" [
        for family, config in families do
            torchTest (sprintf "%s: a bf16 copy's forward is close to fp32's (fp32 residual stream and norms)" family) (fun () ->
                for c in [ config; (match config with Opt c -> Opt { c with LayerNormElementwiseAffine = false } | other -> other) ] do
                    let lm = model c
                    let low = model c
                    low.Module.``to`` torch.bfloat16 |> ignore
                    use input = randomIds 40 [| 2L; 9L |] 4L
                    use full = logits lm input
                    use half = logits low input
                    Expect.equal half.dtype torch.bfloat16 "bf16 logits"
                    let err = FamilyChecks.relativeL2 half full
                    Expect.isLessThan err 0.03 (sprintf "relative L2 error of the bf16 logits %g" err))
        torchTest "bf16 training of the golden post-norm OPT follows the fp32 loss curve within 2%" (fun () ->
            FamilyChecks.expectBf16FollowsFp32 golden { trainOptions with Shuffle = false; MaxSteps = 12 } 0.02 |> ignore)
        torchTest "training steps (dropout on) and generation keep the live tensor count flat" (fun () ->
            let golden = optOf (ModelConfig.load (Path.Combine(golden, "model", "config.json")))
            let lm = CausalLm.create (Opt { golden with Dropout = 0.1; AttentionDropout = 0.1 }) 1L
            let data = loadTokenized (Path.Combine(goldenDir "opt-cosine", "data.jsonl"))
            let options = { trainOptions with Shuffle = false; MaxSteps = 40 }
            let live = Array.zeroCreate<int64> 41
            TrainingLoop.train (TrainingLoop.plan options data.Rows.Length) lm data None
                { OnLog = fun log -> live[log.Step] <- DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
                  AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            // Windows of 2, 2, 2, 1 micro-batches repeat every 4 steps.
            let after = [| for step in 8 .. 4 .. 40 -> live[step] |] |> Array.distinct
            Expect.equal after [| live[8] |] (sprintf "live tensors every 4th step from 8 to 40 equal step 8's (%d)" live[8])
            let generator = model (Opt { postNormOpt with MaxPositionEmbeddings = 128 })
            let counts = ResizeArray()
            let before = DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
            let sampling = { GenerationOptions.defaults with MaxNewTokens = 60; Sampling = { SamplingOptions.greedy with Greedy = false; Seed = 1L } }
            Generator.generateWith (fun _ -> counts.Add DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount) generator [| [| 1L; 2L; 3L |]; [| 4L |] |] sampling
            |> ignore
            Expect.equal (Array.distinct (counts.ToArray())) [| counts[0] |] "the count after every generation step equals step 0's"
            Expect.equal DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount before "nothing is left alive after generation")
    ]

/// Dropout draws from torch's global generator, which parallel tests share: these run alone (testSequenced)
/// and seed it.
let private seededTests =
    testSequenced <| testList "dropout, seeded" [
        for family, config in families do
            torchTest (sprintf "%s: gradient checkpointing gives the same gradients, dropout included" family) (fun () ->
                let config = match config with Opt c -> Opt { c with Dropout = 0.1; AttentionDropout = 0.1 } | other -> other
                let lm = CausalLm.create config 7L
                lm.Module.train ()
                use input = randomIds 40 [| 3L; 9L |] 5L
                let run checkpointing =
                    CausalLm.setGradientCheckpointing lm checkpointing
                    torch.manual_seed 42L |> ignore
                    gradientsOf lm input
                let plain = run false
                let checkpointed = run true
                let norm = plain |> List.sumBy (fun (_, g) -> g |> Option.map (Array.sumBy (fun v -> v * v)) |> Option.defaultValue 0.0) |> sqrt
                Expect.isGreaterThan norm 0.0 "gradients"
                Expect.equal (List.map fst checkpointed) (List.map fst plain) "names"
                for (name, a), (_, e) in List.zip checkpointed plain do
                    match a, e with
                    | Some a, Some e ->
                        let diff = Array.map2 (fun x y -> abs (x - y)) a e |> Array.max
                        Expect.isLessThanOrEqual diff (1e-6 * norm) (sprintf "%s: max abs difference %g" name diff)
                    | None, None -> ()
                    | _ -> failtestf "%s: a gradient in one run only" name)
        torchTest "a run resumed from a checkpoint ends exactly as the uninterrupted run (dropout on, shuffled)" (fun () ->
            use folder = new TempFolder()
            let source = folder.File "model"
            let baseModel = HfModelFolder.load (Path.Combine(golden, "model")) 0L
            HfModelFolder.save source { baseModel with Config = Opt { optOf baseModel.Config with Dropout = 0.1; AttentionDropout = 0.1 } } None []
            FamilyChecks.expectResumeMatches source (Path.Combine(golden, "data.jsonl")) trainOptions)
    ]

[<Tests>]
let tests = testList "opt" [ configTests; moduleTests; folderTests; cacheTests; adapterTests; trainingTests; seededTests ]
