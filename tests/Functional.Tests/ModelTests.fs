module Functional.Tests.ModelTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Models
open Functional.Runtime
open Functional.Tests.TestUtil

// ---------------------------------------------------------------- helpers

/// An fp32 tensor of the given shape holding data.
let private tensorOf (shape: int64[]) (data: float[]) =
    use t = torch.tensor data
    t.to_type(torch.float32).reshape shape

let private expectInvalid (origin: string) (location: string) (action: unit -> ModelConfig) =
    try
        action () |> ignore
        failtest "expected an InvalidInputException"
    with :? InvalidInputException as (TestUtil.CommandLine e) ->
        Expect.equal e.Origin origin "origin names the file"
        Expect.equal e.Location location (sprintf "location names the field (message: %s)" e.Message)

let private tinyGpt2 =
    { VocabSize = 11
      NPositions = 8
      NEmbd = 8
      NLayer = 2
      NHead = 2
      NInner = 16
      ActivationFunction = Activation.GeluNew
      ResidPdrop = 0.0
      EmbdPdrop = 0.0
      AttnPdrop = 0.0
      LayerNormEpsilon = 1e-5
      InitializerRange = 0.02
      ScaleAttnWeights = true
      TieWordEmbeddings = true }

let private tinyLlama =
    { VocabSize = 13
      HiddenSize = 16
      IntermediateSize = 24
      NumHiddenLayers = 2
      NumAttentionHeads = 4
      NumKeyValueHeads = 2
      HeadDim = 4
      HiddenAct = Activation.Silu
      MaxPositionEmbeddings = 32
      RmsNormEps = 1e-6
      RopeTheta = 10000.0
      InitializerRange = 0.02
      TieWordEmbeddings = false
      AttentionBias = false
      MlpBias = false
      AttentionDropout = 0.0
      PadTokenId = None
      Variant = LlamaVariant.llama }

let private names (lm: CausalLm) = CausalLm.parameterSpec lm |> List.map fst

let private randomIds (vocab: int) (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, shape, dtype = torch.int64, generator = g)

// ---------------------------------------------------------------- configs

let private gpt2ConfigJson =
    """{
  "activation_function": "gelu_new",
  "architectures": [
    "GPT2LMHeadModel"
  ],
  "attn_pdrop": 0.1,
  "bos_token_id": 50256,
  "embd_pdrop": 0.1,
  "eos_token_id": 50256,
  "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2",
  "n_ctx": 1024,
  "n_embd": 768,
  "n_head": 12,
  "n_inner": null,
  "n_layer": 12,
  "n_positions": 1024,
  "reorder_and_upcast_attn": false,
  "resid_pdrop": 0.1,
  "scale_attn_by_inverse_layer_idx": false,
  "scale_attn_weights": true,
  "summary_activation": null,
  "summary_first_dropout": 0.1,
  "summary_proj_to_labels": true,
  "summary_type": "cls_index",
  "summary_use_proj": true,
  "task_specific_params": {
    "text-generation": {
      "do_sample": true,
      "max_length": 50
    }
  },
  "torch_dtype": "float32",
  "transformers_version": "4.46.0",
  "use_cache": true,
  "vocab_size": 50257
}"""

let private llamaConfigJson =
    """{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 2048,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 22,
  "num_key_value_heads": 4,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.35.0",
  "use_cache": true,
  "vocab_size": 32000
}"""

let private expectedGpt2Config =
    { VocabSize = 50257
      NPositions = 1024
      NEmbd = 768
      NLayer = 12
      NHead = 12
      NInner = 3072
      ActivationFunction = Activation.GeluNew
      ResidPdrop = 0.1
      EmbdPdrop = 0.1
      AttnPdrop = 0.1
      LayerNormEpsilon = 1e-5
      InitializerRange = 0.02
      ScaleAttnWeights = true
      TieWordEmbeddings = true }

let private expectedLlamaConfig =
    { VocabSize = 32000
      HiddenSize = 2048
      IntermediateSize = 5632
      NumHiddenLayers = 22
      NumAttentionHeads = 32
      NumKeyValueHeads = 4
      HeadDim = 64
      HiddenAct = Activation.Silu
      MaxPositionEmbeddings = 2048
      RmsNormEps = 1e-5
      RopeTheta = 10000.0
      InitializerRange = 0.02
      TieWordEmbeddings = false
      AttentionBias = false
      MlpBias = false
      AttentionDropout = 0.0
      PadTokenId = None
      Variant = LlamaVariant.llama }

/// The gpt2 config with one field's JSON text replaced (or the field removed when value is None).
let private editGpt2 (field: string) (value: string option) =
    let node = Nodes.JsonNode.Parse(gpt2ConfigJson).AsObject()
    node.Remove field |> ignore
    value |> Option.iter (fun v -> node[field] <- Nodes.JsonNode.Parse v)
    node.ToJsonString()

let private editLlama (field: string) (value: string option) =
    let node = Nodes.JsonNode.Parse(llamaConfigJson).AsObject()
    node.Remove field |> ignore
    value |> Option.iter (fun v -> node[field] <- Nodes.JsonNode.Parse v)
    node.ToJsonString()

let private configTests =
    testList "config" [
        test "a realistic gpt2 config.json parses to HF's values, n_inner null meaning 4 * n_embd" {
            Expect.equal (ModelConfig.parse "gpt2/config.json" gpt2ConfigJson) (Gpt2 expectedGpt2Config) "gpt2"
        }
        test "a realistic llama config.json parses, head_dim defaulting to hidden / heads" {
            Expect.equal (ModelConfig.parse "llama/config.json" llamaConfigJson) (Llama expectedLlamaConfig) "llama"
        }
        test "absent optional fields take HF's defaults" {
            let minimal = """{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2}"""
            match ModelConfig.parse "m" minimal with
            | Llama c ->
                Expect.equal c.NumKeyValueHeads 2 "kv heads = heads"
                Expect.equal c.HeadDim 4 "head_dim = hidden / heads"
                Expect.equal c.RopeTheta 10000.0 "rope_theta"
                Expect.equal c.RmsNormEps 1e-6 "rms_norm_eps"
                Expect.equal c.MaxPositionEmbeddings 2048 "max_position_embeddings"
                Expect.isFalse c.TieWordEmbeddings "LLaMA heads are untied by default"
                Expect.equal c.HiddenAct Activation.Silu "hidden_act"
            | other -> failtestf "expected llama, got %A" other
            let gpt2 = """{"model_type": "gpt2", "vocab_size": 10, "n_positions": 4, "n_embd": 8, "n_layer": 1, "n_head": 2}"""
            match ModelConfig.parse "g" gpt2 with
            | Gpt2 c ->
                Expect.equal c.ActivationFunction Activation.GeluNew "activation_function"
                Expect.isTrue c.TieWordEmbeddings "GPT-2 heads are tied by default"
                Expect.equal c.NInner 32 "n_inner"
                Expect.equal (c.ResidPdrop, c.EmbdPdrop, c.AttnPdrop) (0.1, 0.1, 0.1) "dropouts"
            | other -> failtestf "expected gpt2, got %A" other
        }
        test "transformers 5 rope_parameters give rope_theta" {
            let json = (editLlama "rope_theta" None).Replace("\"rope_scaling\":null", "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":500000.0}")
            match ModelConfig.parse "m" json with
            | Llama c -> Expect.equal c.RopeTheta 500000.0 "rope_theta"
            | other -> failtestf "expected llama, got %A" other
        }
        test "toJson writes the HF architecture, model_type and dtype, and parse reads it back equal" {
            for config in [ Gpt2 expectedGpt2Config; Llama expectedLlamaConfig; Llama { tinyLlama with PadTokenId = Some 0; TieWordEmbeddings = true } ] do
                let json = ModelConfig.toJson config
                use doc = Text.Json.JsonDocument.Parse json
                let root = doc.RootElement
                let architecture = (root.GetProperty "architectures").[0].GetString()
                let expectedArchitecture = match config with Gpt2 _ -> "GPT2LMHeadModel" | Llama _ -> "LlamaForCausalLM" | other -> (ModelFamily.traits other).Architecture
                Expect.equal architecture expectedArchitecture "architectures"
                Expect.equal (root.GetProperty("torch_dtype").GetString()) "float32" "torch_dtype"
                Expect.equal (ModelConfig.parse "written" json) config "round trip"
        }
        testProperty "toJson then parse is the identity on valid configs" <| fun (heads: PositiveInt) (headWidth: PositiveInt) (eps: NormalFloat) (theta: NormalFloat) (tied: bool) ->
            let heads = heads.Get % 16 + 1
            let headWidth = 2 * (headWidth.Get % 64 + 1)
            let eps = abs eps.Get + 1e-12
            let config =
                Llama { tinyLlama with
                          NumAttentionHeads = heads
                          NumKeyValueHeads = 1
                          HeadDim = headWidth
                          HiddenSize = heads * headWidth
                          RmsNormEps = eps
                          RopeTheta = abs theta.Get + 1.0
                          TieWordEmbeddings = tied }
            ModelConfig.parse "p" (ModelConfig.toJson config) = config
        test "load reads a file and names it in errors" {
            let dir = Directory.CreateTempSubdirectory "functional-models-"
            try
                let path = Path.Combine(dir.FullName, "config.json")
                File.WriteAllText(path, gpt2ConfigJson)
                Expect.equal (ModelConfig.load path) (Gpt2 expectedGpt2Config) "loaded"
                File.WriteAllText(path, editGpt2 "n_head" (Some "7"))
                expectInvalid path "n_head" (fun () -> ModelConfig.load path)
                let missing = Path.Combine(dir.FullName, "absent.json")
                expectInvalid missing "" (fun () -> ModelConfig.load missing)
            finally
                dir.Delete true
        }
        test "a missing required field is named" {
            expectInvalid "c.json" "n_embd" (fun () -> ModelConfig.parse "c.json" (editGpt2 "n_embd" None))
            expectInvalid "c.json" "num_hidden_layers" (fun () -> ModelConfig.parse "c.json" (editLlama "num_hidden_layers" None))
        }
        test "a field of the wrong type is named" {
            expectInvalid "c.json" "n_layer" (fun () -> ModelConfig.parse "c.json" (editGpt2 "n_layer" (Some "\"12\"")))
            expectInvalid "c.json" "n_embd" (fun () -> ModelConfig.parse "c.json" (editGpt2 "n_embd" (Some "768.5")))
            expectInvalid "c.json" "tie_word_embeddings" (fun () -> ModelConfig.parse "c.json" (editLlama "tie_word_embeddings" (Some "1")))
            expectInvalid "c.json" "rms_norm_eps" (fun () -> ModelConfig.parse "c.json" (editLlama "rms_norm_eps" (Some "\"1e-5\"")))
        }
        test "an unknown or missing model_type is refused" {
            expectInvalid "c.json" "model_type" (fun () -> ModelConfig.parse "c.json" (editGpt2 "model_type" (Some "\"bert\"")))
            expectInvalid "c.json" "model_type" (fun () -> ModelConfig.parse "c.json" (editGpt2 "model_type" None))
        }
        test "invalid JSON is reported with its line" {
            expectInvalid "c.json" "line 3" (fun () -> ModelConfig.parse "c.json" "{\n  \"model_type\": \"gpt2\",\n  \"n_embd\": ,\n}")
            expectInvalid "c.json" "" (fun () -> ModelConfig.parse "c.json" "[1, 2]")
        }
        test "inconsistent sizes are refused, naming the field" {
            expectInvalid "c.json" "n_head" (fun () -> ModelConfig.parse "c.json" (editGpt2 "n_head" (Some "5")))
            expectInvalid "c.json" "n_layer" (fun () -> ModelConfig.parse "c.json" (editGpt2 "n_layer" (Some "0")))
            expectInvalid "c.json" "vocab_size" (fun () -> ModelConfig.parse "c.json" (editLlama "vocab_size" (Some "-3")))
            expectInvalid "c.json" "num_key_value_heads" (fun () -> ModelConfig.parse "c.json" (editLlama "num_key_value_heads" (Some "5")))
            expectInvalid "c.json" "attn_pdrop" (fun () -> ModelConfig.parse "c.json" (editGpt2 "attn_pdrop" (Some "1.5")))
            expectInvalid "c.json" "activation_function" (fun () -> ModelConfig.parse "c.json" (editGpt2 "activation_function" (Some "\"swiglu\"")))
            expectInvalid "c.json" "pad_token_id" (fun () -> ModelConfig.parse "c.json" (editLlama "pad_token_id" (Some "32000")))
        }
        test "RoPE scaling and GPT-2 variants we do not build are refused" {
            expectInvalid "c.json" "rope_scaling" (fun () ->
                ModelConfig.parse "c.json" (editLlama "rope_scaling" (Some """{"type": "linear", "factor": 2.0}""")))
            expectInvalid "c.json" "scale_attn_by_inverse_layer_idx" (fun () ->
                ModelConfig.parse "c.json" (editGpt2 "scale_attn_by_inverse_layer_idx" (Some "true")))
        }
    ]

// ---------------------------------------------------------------- names

let private gpt2Names =
    [ "transformer.wte.weight"
      "transformer.wpe.weight"
      "transformer.h.0.ln_1.weight"
      "transformer.h.0.ln_1.bias"
      "transformer.h.0.attn.c_attn.weight"
      "transformer.h.0.attn.c_attn.bias"
      "transformer.h.0.attn.c_proj.weight"
      "transformer.h.0.attn.c_proj.bias"
      "transformer.h.0.ln_2.weight"
      "transformer.h.0.ln_2.bias"
      "transformer.h.0.mlp.c_fc.weight"
      "transformer.h.0.mlp.c_fc.bias"
      "transformer.h.0.mlp.c_proj.weight"
      "transformer.h.0.mlp.c_proj.bias"
      "transformer.h.1.ln_1.weight"
      "transformer.h.1.ln_1.bias"
      "transformer.h.1.attn.c_attn.weight"
      "transformer.h.1.attn.c_attn.bias"
      "transformer.h.1.attn.c_proj.weight"
      "transformer.h.1.attn.c_proj.bias"
      "transformer.h.1.ln_2.weight"
      "transformer.h.1.ln_2.bias"
      "transformer.h.1.mlp.c_fc.weight"
      "transformer.h.1.mlp.c_fc.bias"
      "transformer.h.1.mlp.c_proj.weight"
      "transformer.h.1.mlp.c_proj.bias"
      "transformer.ln_f.weight"
      "transformer.ln_f.bias" ]

let private llamaNames =
    [ "model.embed_tokens.weight"
      "model.layers.0.self_attn.q_proj.weight"
      "model.layers.0.self_attn.k_proj.weight"
      "model.layers.0.self_attn.v_proj.weight"
      "model.layers.0.self_attn.o_proj.weight"
      "model.layers.0.mlp.gate_proj.weight"
      "model.layers.0.mlp.up_proj.weight"
      "model.layers.0.mlp.down_proj.weight"
      "model.layers.0.input_layernorm.weight"
      "model.layers.0.post_attention_layernorm.weight"
      "model.layers.1.self_attn.q_proj.weight"
      "model.layers.1.self_attn.k_proj.weight"
      "model.layers.1.self_attn.v_proj.weight"
      "model.layers.1.self_attn.o_proj.weight"
      "model.layers.1.mlp.gate_proj.weight"
      "model.layers.1.mlp.up_proj.weight"
      "model.layers.1.mlp.down_proj.weight"
      "model.layers.1.input_layernorm.weight"
      "model.layers.1.post_attention_layernorm.weight"
      "model.norm.weight" ]

let private nameTests =
    testList "names" [
        torchTest "GPT-2 named_parameters are HF's state-dict names in HF's order, the tied head absent" (fun () ->
            let lm = CausalLm.create (Gpt2 tinyGpt2) 1L
            Expect.sequenceEqual (names lm) gpt2Names "names"
            Expect.equal lm.TiedKeys [ "lm_head.weight" ] "tied keys"
            Expect.equal lm.BasePrefix "transformer." "prefix")
        torchTest "GPT-2 shapes: Conv1D weights are (in, out), embeddings (rows, n_embd)" (fun () ->
            let spec = CausalLm.parameterSpec (CausalLm.create (Gpt2 tinyGpt2) 1L) |> Map.ofList
            Expect.sequenceEqual spec["transformer.wte.weight"] [| 11L; 8L |] "wte"
            Expect.sequenceEqual spec["transformer.wpe.weight"] [| 8L; 8L |] "wpe"
            Expect.sequenceEqual spec["transformer.h.0.attn.c_attn.weight"] [| 8L; 24L |] "c_attn"
            Expect.sequenceEqual spec["transformer.h.0.attn.c_attn.bias"] [| 24L |] "c_attn bias"
            Expect.sequenceEqual spec["transformer.h.0.mlp.c_fc.weight"] [| 8L; 16L |] "c_fc"
            Expect.sequenceEqual spec["transformer.h.0.mlp.c_proj.weight"] [| 16L; 8L |] "mlp c_proj")
        torchTest "GPT-2 with an untied head adds lm_head.weight last" (fun () ->
            let lm = CausalLm.create (Gpt2 { tinyGpt2 with TieWordEmbeddings = false }) 1L
            Expect.sequenceEqual (names lm) (gpt2Names @ [ "lm_head.weight" ]) "names"
            Expect.equal lm.TiedKeys [] "no tied keys")
        torchTest "LLaMA named_parameters are HF's names, lm_head.weight present only when untied" (fun () ->
            let untied = CausalLm.create (Llama tinyLlama) 1L
            Expect.sequenceEqual (names untied) (llamaNames @ [ "lm_head.weight" ]) "untied"
            Expect.equal untied.TiedKeys [] "untied keys"
            let tied = CausalLm.create (Llama { tinyLlama with TieWordEmbeddings = true }) 1L
            Expect.sequenceEqual (names tied) llamaNames "tied"
            Expect.equal tied.TiedKeys [ "lm_head.weight" ] "tied keys"
            Expect.equal tied.BasePrefix "model." "prefix")
        torchTest "LLaMA grouped-query shapes: k_proj and v_proj are (kv_heads * head_dim, hidden)" (fun () ->
            let spec = CausalLm.parameterSpec (CausalLm.create (Llama tinyLlama) 1L) |> Map.ofList
            Expect.sequenceEqual spec["model.layers.0.self_attn.q_proj.weight"] [| 16L; 16L |] "q"
            Expect.sequenceEqual spec["model.layers.0.self_attn.k_proj.weight"] [| 8L; 16L |] "k"
            Expect.sequenceEqual spec["model.layers.0.self_attn.v_proj.weight"] [| 8L; 16L |] "v"
            Expect.sequenceEqual spec["model.layers.0.self_attn.o_proj.weight"] [| 16L; 16L |] "o"
            Expect.sequenceEqual spec["model.layers.0.mlp.gate_proj.weight"] [| 24L; 16L |] "gate"
            Expect.sequenceEqual spec["model.layers.0.mlp.down_proj.weight"] [| 16L; 24L |] "down"
            Expect.sequenceEqual spec["lm_head.weight"] [| 13L; 16L |] "lm_head")
        torchTest "LLaMA biases appear with attention_bias and mlp_bias" (fun () ->
            let lm = CausalLm.create (Llama { tinyLlama with AttentionBias = true; MlpBias = true; NumHiddenLayers = 1 }) 1L
            let biases = names lm |> List.filter (fun n -> n.EndsWith ".bias")
            Expect.sequenceEqual biases
                [ "model.layers.0.self_attn.q_proj.bias"; "model.layers.0.self_attn.k_proj.bias"
                  "model.layers.0.self_attn.v_proj.bias"; "model.layers.0.self_attn.o_proj.bias"
                  "model.layers.0.mlp.gate_proj.bias"; "model.layers.0.mlp.up_proj.bias"
                  "model.layers.0.mlp.down_proj.bias" ] "biases")
        torchTest "rotary inv_freq is a non-persistent buffer, not a parameter nor a state-dict entry" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 1L
            Expect.isFalse (names lm |> List.exists (fun n -> n.Contains "inv_freq")) "not a parameter"
            let rotary =
                lm.Module.named_modules ()
                |> Seq.choose (fun struct (n, m) -> match m with :? LlamaRotaryEmbedding -> Some n | _ -> None)
                |> List.ofSeq
            Expect.equal rotary [ "model.rotary_emb" ] "one rotary module, where HF has it"
            Expect.contains lm.IgnoredBufferSuffixes ".rotary_emb.inv_freq" "HF checkpoints' inv_freq is skipped on load"
            Expect.isEmpty (lm.Module.state_dict().Keys |> Seq.filter (fun k -> k.Contains "inv_freq")) "not in the state dict")
        torchTest "GPT-2 has no buffers and its state dict equals its parameters" (fun () ->
            let lm = CausalLm.create (Gpt2 tinyGpt2) 1L
            Expect.isEmpty (lm.Module.named_buffers ()) "no buffers"
            Expect.equal (lm.Module.state_dict().Keys |> Set.ofSeq) (Set.ofList gpt2Names) "state dict keys")
        torchTest "NoWeightDecay holds exactly the biases and the norm weights" (fun () ->
            let gpt2 = CausalLm.create (Gpt2 tinyGpt2) 1L
            let expectedGpt2 = gpt2Names |> List.filter (fun n -> n.EndsWith ".bias" || n.Contains ".ln_") |> Set.ofList
            Expect.equal gpt2.NoWeightDecay expectedGpt2 "gpt2"
            let llama = CausalLm.create (Llama { tinyLlama with AttentionBias = true }) 1L
            let expectedLlama = names llama |> List.filter (fun n -> n.EndsWith ".bias" || n.EndsWith "norm.weight") |> Set.ofList
            Expect.equal llama.NoWeightDecay expectedLlama "llama"
            Expect.equal (expectedLlama |> Set.filter (fun n -> n.EndsWith "norm.weight") |> Set.count) 5 "2 layers x 2 norms + final norm")
    ]

// ---------------------------------------------------------------- numerics

let private numericTests =
    testList "numerics" [
        torchTest "gelu_new equals the tanh formula 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))" (fun () ->
            let xs = [| for i in -60 .. 60 -> float i / 10.0 |]
            use x = torch.tensor(xs |> Array.map float32)
            use y = Activation.apply Activation.GeluNew x
            let expected = xs |> Array.map (fun v -> 0.5 * v * (1.0 + Math.Tanh(Math.Sqrt(2.0 / Math.PI) * (v + 0.044715 * v ** 3.0))))
            use e = torch.tensor expected
            expectClose 2e-6 y e "gelu_new")
        torchTest "Conv1D computes x @ W + b with W stored (in, out)" (fun () ->
            use conv = new Conv1D(2L, 3L)
            using (torch.no_grad ()) (fun _ ->
                conv.Weight.copy_(tensorOf [| 2L; 3L |] [| 1.0; 2.0; 3.0; 4.0; 5.0; 6.0 |]) |> ignore
                conv.Bias.copy_(torch.tensor([| 0.5f; 0.0f; -1.0f |])) |> ignore)
            use x = tensorOf [| 1L; 1L; 2L |] [| 1.0; 10.0 |]
            use y = conv.forward x
            use expected = tensorOf [| 1L; 1L; 3L |] [| 41.5; 52.0; 62.0 |]
            expectClose 0.0 y expected "1*[1,2,3] + 10*[4,5,6] + b")
        torchTest "RMSNorm equals weight * x / sqrt(mean(x^2) + eps)" (fun () ->
            use norm = new RmsNorm(5L, 1e-6)
            let w = [| 0.5; 1.0; 2.0; -1.0; 3.0 |]
            using (torch.no_grad ()) (fun _ -> norm.Weight.copy_(torch.tensor(w |> Array.map float32)) |> ignore)
            let rows = [| [| 1.0; -2.0; 3.0; 0.5; 0.0 |]; [| 1e-3; 2e-3; -1e-3; 0.0; 4e-3 |] |]
            use x = tensorOf [| 2L; 5L |] (Array.concat rows)
            use y = norm.forward x
            let expected =
                rows |> Array.collect (fun r ->
                    let rms = Math.Sqrt((r |> Array.sumBy (fun v -> v * v)) / 5.0 + 1e-6)
                    Array.map2 (fun v wi -> wi * v / rms) r w)
            use e = tensorOf [| 2L; 5L |] expected
            expectClose 1e-5 y e "rmsnorm")
        torchTest "rotary on a pinned example equals the closed-form rotation of each (i, i + d/2) pair" (fun () ->
            // head_dim 4, theta 10000: inv_freq = [1, 0.01]; position p rotates pair (0, 2) by p and (1, 3) by 0.01 p.
            use invFreq = Rotary.inverseFrequencies 4 10000.0
            use expectedInv = torch.tensor([| 1.0; 0.01 |])
            expectClose 1e-9 invFreq expectedInv "inv_freq"
            let q = [| [| 1.0; 2.0; 3.0; 4.0 |]; [| -0.5; 0.25; 2.0; -1.0 |]; [| 0.3; -0.7; 1.1; 0.9 |] |]
            use x = tensorOf [| 1L; 1L; 3L; 4L |] (Array.concat q) // (B, nh, T, hd)
            use positions = torch.arange(3L, dtype = torch.int64)
            let cosT, sinT = Rotary.cosSin invFreq positions
            use cosT = cosT
            use sinT = sinT
            use y = Rotary.apply x cosT sinT
            let expected =
                q |> Array.mapi (fun p v ->
                    let a0, a1 = float p, 0.01 * float p
                    [| v[0] * Math.Cos a0 - v[2] * Math.Sin a0
                       v[1] * Math.Cos a1 - v[3] * Math.Sin a1
                       v[2] * Math.Cos a0 + v[0] * Math.Sin a0
                       v[3] * Math.Cos a1 + v[1] * Math.Sin a1 |])
                |> Array.concat
            use e = torch.tensor(expected).reshape(1L, 1L, 3L, 4L)
            expectClose 1e-6 y e "rotated")
        torchTest "LLaMA attention equals manual causal softmax attention with k, v heads shared in groups" (fun () ->
            for kvHeads in [ 4; 2; 1 ] do
                torch.manual_seed 7L |> ignore
                let hidden, heads, hd, T = 16L, 4L, 4L, 5L
                let kvWidth = int64 kvHeads * hd
                let q_proj = torch.nn.Linear(hidden, heads * hd, hasBias = true)
                let k_proj = torch.nn.Linear(hidden, kvWidth, hasBias = true)
                let v_proj = torch.nn.Linear(hidden, kvWidth, hasBias = true)
                let o_proj = torch.nn.Linear(heads * hd, hidden, hasBias = true)
                use attention = new LlamaAttention(q_proj, k_proj, v_proj, o_proj, None, 4, kvHeads, 4, 0.0, NoBias, ParallelRegion.whole)
                use x = torch.randn(2L, T, hidden)
                use invFreq = Rotary.inverseFrequencies 4 10000.0
                let cos, sin = Rotary.cosSin invFreq (torch.arange(T, dtype = torch.int64))
                use signedSin = Rotary.signHalf sin // the layers take the sin table as the model passes it
                use actual = attention.forward(x, cos, signedSin)
                use scope = torch.NewDisposeScope()
                let split (t: torch.Tensor) n = t.view(2L, T, n, hd).transpose(1, 2)
                let q = Rotary.apply (split (q_proj.forward x) heads) cos sin
                let k = Rotary.apply (split (k_proj.forward x) (int64 kvHeads)) cos sin
                let v = split (v_proj.forward x) (int64 kvHeads)
                let group = torch.tensor([| for h in 0L .. heads - 1L -> h / (heads / int64 kvHeads) |])
                let k = k.index_select(1L, group)
                let v = v.index_select(1L, group)
                let scores = q.matmul(k.transpose(2, 3)) / Math.Sqrt(float hd)
                let future = torch.ones(T, T, dtype = torch.ScalarType.Bool).triu(1L)
                let probabilities = scores.masked_fill(future, Double.NegativeInfinity).softmax(-1L)
                let y = probabilities.matmul(v).transpose(1, 2).reshape(2L, T, heads * hd)
                let expected = o_proj.forward y
                expectClose 1e-5 actual expected (sprintf "kv heads %d" kvHeads))
        torchTest "GPT-2 attention equals manual causal softmax attention" (fun () ->
            let C, nh, T = 8L, 2L, 4L
            for scaled in [ true; false ] do
                torch.manual_seed 3L |> ignore
                let c_attn = new Conv1D(C, 3L * C)
                let c_proj = new Conv1D(C, C)
                using (torch.no_grad ()) (fun _ ->
                    for p in [ c_attn.Weight; c_attn.Bias; c_proj.Weight; c_proj.Bias ] do
                        p.normal_(0.0, 0.5) |> ignore)
                use attention = new Gpt2Attention(c_attn, c_proj, torch.nn.Dropout 0.0, 2, 0.0, scaled)
                use x = torch.randn(1L, T, C)
                use actual = attention.forward x
                use scope = torch.NewDisposeScope()
                let qkv = x.matmul(c_attn.Weight) + c_attn.Bias
                let heads (i: int64) = qkv.narrow(2, i * C, C).view(1L, T, nh, C / nh).transpose(1, 2)
                let scores = heads(0L).matmul(heads(1L).transpose(2, 3))
                let scores = if scaled then scores / Math.Sqrt(float (C / nh)) else scores
                let future = torch.ones(T, T, dtype = torch.ScalarType.Bool).triu(1L)
                let y = scores.masked_fill(future, Double.NegativeInfinity).softmax(-1L).matmul(heads 2L)
                let expected = y.transpose(1, 2).reshape(1L, T, C).matmul(c_proj.Weight) + c_proj.Bias
                expectClose 1e-5 actual expected (sprintf "scale_attn_weights %b" scaled))
        torchTest "logits are (B, T, vocab_size) for both families, tied and untied" (fun () ->
            for config in [ Gpt2 tinyGpt2; Gpt2 { tinyGpt2 with TieWordEmbeddings = false }
                            Llama tinyLlama; Llama { tinyLlama with TieWordEmbeddings = true } ] do
                let lm = CausalLm.create config 5L
                use ids = randomIds (ModelConfig.vocabSize config) [| 3L; 7L |] 1L
                use logits = lm.Module.forward ids
                Expect.sequenceEqual logits.shape [| 3L; 7L; int64 (ModelConfig.vocabSize config) |] "shape"
                Expect.equal logits.dtype torch.float32 "fp32")
        torchTest "a tied head computes hidden @ embedding^T" (fun () ->
            let gpt2 = Gpt2.build tinyGpt2 2L
            use ids = randomIds 11 [| 2L; 5L |] 2L
            use logits = gpt2.forward ids
            use hidden = gpt2.Backbone.forward ids
            use expected = hidden.matmul(gpt2.Backbone.TokenEmbedding.weight.t())
            expectClose 1e-6 logits expected "gpt2"
            let llama = Llama.build { tinyLlama with TieWordEmbeddings = true } 2L
            use ids = randomIds 13 [| 2L; 5L |] 3L
            use logits = llama.forward ids
            use hidden = llama.Backbone.forward ids
            use expected = hidden.matmul(llama.Backbone.TokenEmbedding.weight.t())
            expectClose 1e-6 logits expected "llama")
        torchTest "changing token t changes no logits before t, and changes logits at t (causality)" (fun () ->
            for config in [ Gpt2 tinyGpt2; Llama tinyLlama ] do
                let lm = CausalLm.create config 9L
                lm.Module.eval ()
                use ids = randomIds (ModelConfig.vocabSize config) [| 2L; 6L |] 4L
                use changed = ids.clone ()
                let t = 3L
                let next = (ids[0L, t].item<int64> () + 1L) % int64 (ModelConfig.vocabSize config)
                changed[0L, t] <- torch.tensor next
                use before = lm.Module.forward ids
                use after = lm.Module.forward changed
                expectClose 1e-6 (after.narrow(1, 0L, t)) (before.narrow(1, 0L, t)) "positions before t"
                Expect.isGreaterThan (maxAbsDiff (after.narrow(1, t, 1L)) (before.narrow(1, t, 1L))) 1e-4 "position t"
                expectClose 0.0 (after[1L]) (before[1L]) "the other sequence")
        torchTest "backward reaches every parameter of both families" (fun () ->
            for config in [ Gpt2 tinyGpt2; Llama { tinyLlama with AttentionBias = true; TieWordEmbeddings = true } ] do
                let lm = CausalLm.create config 8L
                use ids = randomIds (ModelConfig.vocabSize config) [| 2L; 6L |] 5L
                use logits = lm.Module.forward ids
                use loss = logits.square().mean()
                loss.backward ()
                for struct (name, p) in lm.Module.named_parameters () do
                    Expect.isNotNull p.grad (name + " has a gradient")
                    Expect.isGreaterThan (p.grad.abs().max().item<float32> ()) 0.0f (name + " gradient is not zero"))
        torchTest "GPT-2 refuses inputs longer than n_positions" (fun () ->
            let lm = CausalLm.create (Gpt2 tinyGpt2) 1L
            use ids = torch.zeros(1L, 9L, dtype = torch.int64)
            Expect.throwsT<ArgumentException> (fun () -> lm.Module.forward ids |> ignore) "9 > n_positions 8")
        torchTest "dropout is active in training and off in eval" (fun () ->
            let config = Gpt2 { tinyGpt2 with ResidPdrop = 0.5; EmbdPdrop = 0.5; AttnPdrop = 0.5 }
            let lm = CausalLm.create config 1L
            use ids = randomIds 11 [| 2L; 5L |] 1L
            lm.Module.train ()
            use a = lm.Module.forward ids
            use b = lm.Module.forward ids
            Expect.isGreaterThan (maxAbsDiff a b) 1e-4 "training forwards differ"
            lm.Module.eval ()
            use c = lm.Module.forward ids
            use d = lm.Module.forward ids
            expectClose 0.0 c d "eval forwards agree")
    ]

// ---------------------------------------------------------------- initialization

let private std (t: torch.Tensor) = t.std().item<float32>() |> float

let private initTests =
    testList "init" [
        torchTest "GPT-2 init is HF's: normal(0, 0.02), c_proj scaled by 1/sqrt(2 n_layer), norms one, biases zero" (fun () ->
            let config = { tinyGpt2 with VocabSize = 500; NEmbd = 64; NInner = 256; NHead = 4; NLayer = 2; NPositions = 64 }
            let lm = CausalLm.create (Gpt2 config) 11L
            let p = lm.Module.named_parameters () |> Seq.map (fun struct (n, t) -> n, t) |> Map.ofSeq
            let near (expected: float) (name: string) =
                let s = std p[name]
                Expect.floatClose { absolute = 0.0; relative = 0.1 } s expected (sprintf "%s std %g" name s)
            near 0.02 "transformer.wte.weight"
            near 0.02 "transformer.h.0.attn.c_attn.weight"
            near 0.02 "transformer.h.1.mlp.c_fc.weight"
            near 0.01 "transformer.h.0.attn.c_proj.weight"
            near 0.01 "transformer.h.1.mlp.c_proj.weight"
            for KeyValue(name, t) in p do
                let v = values t
                if name.EndsWith ".bias" then Expect.isTrue (v |> Array.forall ((=) 0.0)) (name + " zero")
                elif name.Contains ".ln_" then Expect.isTrue (v |> Array.forall ((=) 1.0)) (name + " one"))
        torchTest "LLaMA init: normal(0, 0.02) weights, norms one, the padding row zero" (fun () ->
            let config = { tinyLlama with VocabSize = 400; HiddenSize = 64; IntermediateSize = 96; PadTokenId = Some 3 }
            let lm = CausalLm.create (Llama config) 11L
            let p = lm.Module.named_parameters () |> Seq.map (fun struct (n, t) -> n, t) |> Map.ofSeq
            for name in [ "model.embed_tokens.weight"; "model.layers.0.mlp.up_proj.weight"; "lm_head.weight" ] do
                Expect.floatClose { absolute = 0.0; relative = 0.1 } (std p[name]) 0.02 name
            Expect.isTrue (values (p["model.embed_tokens.weight"][3L]) |> Array.forall ((=) 0.0)) "pad row zero"
            Expect.isTrue (values p["model.norm.weight"] |> Array.forall ((=) 1.0)) "norm one")
        torchTest "the same seed gives the same weights, another seed other weights" (fun () ->
            let flat seed =
                let lm = CausalLm.create (Llama tinyLlama) seed
                lm.Module.parameters () |> Seq.collect values |> Array.ofSeq
            Expect.equal (flat 5L) (flat 5L) "same seed"
            Expect.notEqual (flat 5L) (flat 6L) "other seed")
    ]

[<Tests>]
let tests = testList "models" [ configTests; nameTests; numericTests; initTests ]
