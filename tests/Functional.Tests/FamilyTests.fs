module Functional.Tests.FamilyTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Models
open Functional.Tests.TestUtil

// The family registry (ModelFamily.traits, build, describe) and the LLaMA variants Qwen2 and Mistral:
// parse -> build -> parameter names -> save -> config.json -> reload.

let private llamaShaped (modelType: string) (extra: string) =
    sprintf """{"model_type": "%s", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64%s}""" modelType extra

let private gpt2Json = """{"model_type": "gpt2", "vocab_size": 30, "n_positions": 12, "n_embd": 16, "n_layer": 2, "n_head": 2}"""

let private names (lm: CausalLm) = [ for name, _ in CausalLm.parameterSpec lm -> name ]

let private idsOf (vocab: int) (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, shape, generator = g, dtype = torch.int64)

let private logits (lm: CausalLm) (ids: torch.Tensor) =
    lm.Module.eval ()
    use _ = torch.no_grad ()
    lm.Module.forward ids

/// Saves the model, checks config.json's model_type and architecture, reloads it and compares logits.
let private roundTrip (lm: CausalLm) (modelType: string) (architecture: string) =
    use folder = new TempFolder()
    let dir = folder.File "model"
    HfModelFolder.save dir lm None []
    use document = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
    let root = document.RootElement
    Expect.equal (root.GetProperty("model_type").GetString()) modelType "model_type"
    Expect.equal [ for a in root.GetProperty("architectures").EnumerateArray() -> a.GetString() ] [ architecture ] "architectures"
    let reloaded = HfModelFolder.load dir 99L
    Expect.equal reloaded.Config lm.Config "the config reads back equal"
    use ids = idsOf (ModelConfig.vocabSize lm.Config) [| 2L; 9L |] 3L
    use before = logits lm ids
    use after = logits reloaded ids
    expectClose 0.0 after before "logits after reload"

let private traitTests =
    testList "traits" [
        test "each family's traits: HF prefix, LoRA targets, position limit, prefix shape, lookup-only tables" {
            let gpt2 = ModelFamily.traits (ModelConfig.parse "g.json" gpt2Json)
            Expect.equal gpt2.BasePrefix "transformer." "gpt2 prefix"
            Expect.equal gpt2.DefaultLoraTargets [ "c_attn" ] "gpt2 LoRA targets"
            Expect.equal (gpt2.PositionLimit, gpt2.PositionField, gpt2.LearnedPositions) (12, "n_positions", true) "gpt2 positions"
            Expect.equal gpt2.PrefixShape { Layers = 2; KeyValueHeads = 2; HeadDim = 8 } "gpt2 prefix shape"
            Expect.equal gpt2.LookupOnly [ "transformer.wpe.weight" ] "tied gpt2: only wpe is lookup-only"
            Expect.equal gpt2.TiedKeys [ "lm_head.weight" ] "gpt2 ties its head"
            Expect.equal (gpt2.Depth, gpt2.Width, gpt2.VocabSize) (2, 16, 30) "gpt2 depth, width, vocabulary"
            for modelType, display in [ "llama", "LLaMA"; "qwen2", "Qwen2"; "mistral", "Mistral" ] do
                let t = ModelFamily.traits (ModelConfig.parse "l.json" (llamaShaped modelType ""))
                Expect.equal t.DisplayName display "display name"
                Expect.equal t.ModelType modelType "model_type"
                Expect.equal t.BasePrefix "model." "prefix"
                Expect.equal t.DefaultLoraTargets [ "q_proj"; "v_proj" ] (modelType + " LoRA targets")
                Expect.equal (t.PositionLimit, t.PositionField, t.LearnedPositions) (64, "max_position_embeddings", false) "positions"
                Expect.equal t.PrefixShape { Layers = 2; KeyValueHeads = 2; HeadDim = 4 } "grouped-query prefix shape"
                Expect.equal t.LookupOnly [ "model.embed_tokens.weight" ] "untied: the embedding is lookup-only"
                Expect.equal t.TiedKeys [] "untied"
        }
        test "describe gives plain .NET values for C#" {
            let d = ModelFamily.describe (ModelConfig.parse "q.json" (llamaShaped "qwen2" ""))
            Expect.equal (d.DisplayName, d.Architecture, d.Layers, d.Width, d.VocabSize) ("Qwen2", "Qwen2ForCausalLM", 2, 16, 40) "description"
            Expect.equal d.DefaultLoraTargets [| "q_proj"; "v_proj" |] "targets as an array"
        }
        test "model_type picks the variant; Mistral's window: absent is 4096, null none; Qwen2's use_sliding_window is refused" {
            let variant json =
                match ModelConfig.parse "c.json" json with
                | Llama c -> c.Variant
                | _ -> failtest "expected a LLaMA-shaped config"
            Expect.equal (variant (llamaShaped "llama" "")) LlamaVariant.llama "llama"
            Expect.equal (variant (llamaShaped "qwen2" "")) LlamaVariant.qwen2 "qwen2"
            Expect.equal (variant (llamaShaped "mistral" "")).SlidingWindow (Some 4096) "mistral default window"
            Expect.equal (variant (llamaShaped "mistral" ", \"sliding_window\": null")).SlidingWindow None "null window"
            Expect.equal (variant (llamaShaped "mistral" ", \"sliding_window\": 3")).SlidingWindow (Some 3) "window 3"
            expectInvalidInput "c.json" "sliding_window" [ "positive" ] (fun () -> ModelConfig.parse "c.json" (llamaShaped "mistral" ", \"sliding_window\": 0") |> ignore)
            expectInvalidInput "c.json" "use_sliding_window" [ "not supported" ] (fun () -> ModelConfig.parse "c.json" (llamaShaped "qwen2" ", \"use_sliding_window\": true") |> ignore)
            expectInvalidInput "c.json" "model_type" [ "qwen2"; "mistral" ] (fun () -> ModelConfig.parse "c.json" (llamaShaped "bert" "") |> ignore)
            for json in [ llamaShaped "qwen2" ""; llamaShaped "mistral" ", \"sliding_window\": 5"; llamaShaped "mistral" ", \"sliding_window\": null" ] do
                let config = ModelConfig.parse "c.json" json
                Expect.equal (ModelConfig.parse "again.json" (ModelConfig.toJson config)) config "toJson reads back equal"
        }
    ]

let private variantTests =
    testList "variants" [
        torchTest "qwen2: q/k/v biased, o_proj and the MLP not; saved as Qwen2ForCausalLM and reloaded to the same logits" (fun () ->
            let lm = CausalLm.create (ModelConfig.parse "q.json" (llamaShaped "qwen2" ", \"attention_bias\": true, \"mlp_bias\": true")) 1L
            let all = names lm
            for p in [ "q_proj"; "k_proj"; "v_proj" ] do
                Expect.contains all (sprintf "model.layers.0.self_attn.%s.bias" p) (p + " bias")
            Expect.isFalse (all |> List.contains "model.layers.0.self_attn.o_proj.bias") "no o_proj bias"
            Expect.isFalse (all |> List.exists (fun n -> n.Contains ".mlp." && n.EndsWith ".bias")) "no MLP bias"
            Expect.isTrue (lm.NoWeightDecay.Contains "model.layers.1.self_attn.q_proj.bias") "biases are exempt from decay"
            Expect.isTrue (lm.NoWeightDecay.Contains "model.layers.1.input_layernorm.weight") "RMSNorm weights are exempt"
            roundTrip lm "qwen2" "Qwen2ForCausalLM")
        torchTest "mistral: no biases; saved as MistralForCausalLM with its window and reloaded to the same logits" (fun () ->
            let lm = CausalLm.create (ModelConfig.parse "m.json" (llamaShaped "mistral" ", \"sliding_window\": 3")) 1L
            Expect.isFalse (names lm |> List.exists (fun n -> n.EndsWith ".bias")) "no bias"
            roundTrip lm "mistral" "MistralForCausalLM"
            use folder = new TempFolder()
            HfModelFolder.save (folder.File "m") lm None []
            use document = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder.File "m", "config.json")))
            Expect.equal (document.RootElement.GetProperty("sliding_window").GetInt32()) 3 "sliding_window written")
        torchTest "a fine-tuned qwen2 exported over its source config keeps model_type qwen2" (fun () ->
            let source = llamaShaped "qwen2" ", \"bos_token_id\": 1"
            let lm = CausalLm.create (ModelConfig.parse "q.json" source) 1L
            use document = JsonDocument.Parse(HfModelFolder.configJson lm (Some source))
            Expect.equal (document.RootElement.GetProperty("model_type").GetString()) "qwen2" "model_type"
            Expect.equal (document.RootElement.GetProperty("bos_token_id").GetInt32()) 1 "source keys survive")
        torchTest "mistral's window: the forward hides keys window or more positions back, and decoding with the cache agrees" (fun () ->
            let windowed = CausalLm.create (ModelConfig.parse "m.json" (llamaShaped "mistral" ", \"sliding_window\": 2")) 4L
            let unwindowed = CausalLm.create (ModelConfig.parse "m.json" (llamaShaped "mistral" ", \"sliding_window\": null")) 4L
            use ids = idsOf 40 [| 2L; 7L |] 5L
            use full = logits windowed ids
            use plain = logits unwindowed ids
            expectClose 1e-5 (full.narrow(1L, 0L, 2L)) (plain.narrow(1L, 0L, 2L)) "the first two positions see the same keys"
            Expect.isGreaterThan (maxAbsDiff (full.narrow(1L, 2L, 5L)) (plain.narrow(1L, 2L, 5L))) 1e-4 "later positions see fewer keys"
            use _ = torch.no_grad ()
            let mutable cache: KvCache option = None
            let steps =
                [ for t in 0L .. 6L ->
                      use mask = torch.ones(2L, t + 1L, dtype = torch.int64)
                      use input = ids.narrow(1L, t, 1L)
                      let step, next = CausalLm.forwardCached windowed input mask cache
                      cache |> Option.iter (fun c -> (c :> IDisposable).Dispose())
                      cache <- Some next
                      step ]
            cache |> Option.iter (fun c -> (c :> IDisposable).Dispose())
            use stepwise = torch.cat(Array.ofList steps, 1L)
            expectClose 1e-4 stepwise full "cached decoding equals the forward")
    ]

[<Tests>]
let tests = testList "families" [ traitTests; variantTests ]
