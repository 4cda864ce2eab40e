/// LoRA adapters attached from outside the model: PEFT's names, shapes and files, the adapted forward
/// (plain, no_grad, key/value cache), gradients, merging and bad input.
module Functional.Tests.LoraTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Checkpoint
open Functional.Models
open Functional.Peft
open Functional.Runtime
open Functional.Tests.TestUtil

// ---------------------------------------------------------------- helpers

let private values (t: torch.Tensor) : float[] =
    use f = t.detach().to_type(torch.float64).contiguous().cpu()
    f.data<float>().ToArray()

let private maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) =
    Array.map2 (fun x y -> abs (x - y)) (values a) (values b) |> Array.max

let private expectClose (tolerance: float) (actual: torch.Tensor) (expected: torch.Tensor) message =
    Expect.sequenceEqual actual.shape expected.shape (message + ": shape")
    let diff = maxAbsDiff actual expected
    Expect.isLessThanOrEqual diff tolerance (sprintf "%s: max abs difference %g" message diff)

let private expectEqual (actual: torch.Tensor) (expected: torch.Tensor) message =
    Expect.sequenceEqual actual.shape expected.shape (message + ": shape")
    Expect.sequenceEqual (values actual) (values expected) message

let private torchTest name (body: unit -> unit) =
    test name {
        TorchRuntime.ensure ()
        body ()
    }

let private expectInvalid origin location (messagePart: string) action = expectInvalidInput origin location [ messagePart ] action

let private gpt2Config = Gpt2 tinyGpt2

/// Grouped-query attention: 4 query heads share 2 key/value heads (q_proj 16 -> 16, v_proj 16 -> 8).
let private llamaConfig =
    Llama
        tinyLlama

let private lora r alpha targets =
    { R = r
      Alpha = alpha
      Dropout = 0.0
      TargetModules = targets
      ModuleNameSubstring = None }

let private gpt2Lora = lora 4 8.0 [ "c_attn" ]
let private llamaLora = lora 2 4.0 [ "q_proj"; "v_proj" ]

let private cases = [ "GPT-2", gpt2Config, gpt2Lora; "LLaMA (GQA)", llamaConfig, llamaLora ]

/// A fresh model per test (tests run in parallel and switch modes), in eval mode.
let private model config =
    let lm = CausalLm.create config 5L
    lm.Module.eval ()
    lm

let private inputIds config (seed: int64) =
    let vocab = ModelConfig.vocabSize config
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, [| 2L; 6L |], dtype = torch.int64, generator = g)

let private logits (lm: CausalLm) (ids: torch.Tensor) =
    use _ = torch.no_grad ()
    lm.Module.forward ids

/// Gives every lora_A and lora_B random values in +-0.5 (B is zero after wrap).
let private randomize (adapters: LoraAdapters) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    use _ = torch.no_grad ()
    for _, p in Lora.parameters adapters do
        p.uniform_(-0.5, 0.5, g) |> ignore

let private namesAndShapes (adapters: LoraAdapters) =
    [ for name, p in Lora.parameters adapters -> name, List.ofArray p.shape ]

// ---------------------------------------------------------------- tests

[<Tests>]
let tests =
    testList "lora" [
        torchTest "GPT-2 c_attn adapters carry PEFT's names and shapes (A [r, in], B [out, r])" (fun () ->
            let lm = model gpt2Config
            use adapters = Lora.wrap gpt2Lora lm 1L
            let expected =
                [ for layer in 0 .. 1 do
                      let prefix = sprintf "base_model.model.transformer.h.%d.attn.c_attn" layer
                      yield prefix + ".lora_A.weight", [ 4L; 16L ]
                      yield prefix + ".lora_B.weight", [ 48L; 4L ] ]
            Expect.equal (namesAndShapes adapters) expected "names and shapes"
            Expect.equal adapters.Scale 2.0 "scale = alpha / r"
            for _, p in Lora.parameters adapters do
                Expect.equal p.dtype torch.float32 "adapters are fp32"
                Expect.isTrue p.requires_grad "adapters train")

        torchTest "a module name text chooses every GPT-2 projection whose name contains it" (fun () ->
            let lm = model gpt2Config
            let config = { gpt2Lora with TargetModules = []; ModuleNameSubstring = Some "h.1." }
            use adapters = Lora.wrap config lm 1L
            let prefix = "base_model.model.transformer.h.1."
            let expected =
                [ prefix + "attn.c_attn", [ 4L; 16L ], [ 48L; 4L ]
                  prefix + "attn.c_proj", [ 4L; 16L ], [ 16L; 4L ]
                  prefix + "mlp.c_fc", [ 4L; 16L ], [ 32L; 4L ]
                  prefix + "mlp.c_proj", [ 4L; 32L ], [ 16L; 4L ] ]
                |> List.collect (fun (m, a, b) -> [ m + ".lora_A.weight", a; m + ".lora_B.weight", b ])
            Expect.equal (namesAndShapes adapters) expected "all four projections of layer 1"
            Expect.equal adapters.TargetModuleNames
                [ "transformer.h.1.attn.c_attn"; "transformer.h.1.attn.c_proj"; "transformer.h.1.mlp.c_fc"; "transformer.h.1.mlp.c_proj" ]
                "suffixes would also choose layer 0, so target_modules lists the full names"
            let everyLayer = { config with ModuleNameSubstring = Some "h." }
            use all = Lora.wrap everyLayer (model gpt2Config) 1L
            Expect.equal all.Adapters.Length 8 "every Conv1D of both layers (the tied head is no module)"
            Expect.equal all.TargetModuleNames [ "c_attn"; "c_proj"; "c_fc" ] "suffixes when they choose the same projections"
            let both = { gpt2Lora with ModuleNameSubstring = Some "h.0." }
            use intersection = Lora.wrap both (model gpt2Config) 1L
            Expect.equal [ for a in intersection.Adapters -> a.ModuleName ] [ "transformer.h.0.attn.c_attn" ]
                "target modules and module name text together choose the projections matching both")

        torchTest "LLaMA q_proj and v_proj adapters with grouped-query heads carry PEFT's names and shapes" (fun () ->
            let lm = model llamaConfig
            use adapters = Lora.wrap llamaLora lm 1L
            let expected =
                [ for layer in 0 .. 1 do
                      let prefix = sprintf "base_model.model.model.layers.%d.self_attn." layer
                      yield prefix + "q_proj.lora_A.weight", [ 2L; 16L ]
                      yield prefix + "q_proj.lora_B.weight", [ 16L; 2L ]
                      yield prefix + "v_proj.lora_A.weight", [ 2L; 16L ]
                      yield prefix + "v_proj.lora_B.weight", [ 8L; 2L ] ]
            Expect.equal (namesAndShapes adapters) expected "names and shapes")

        torchTest "lora_A is drawn like nn.Linear's weight (within 1/sqrt(in)) from the seed and lora_B starts at zero" (fun () ->
            use first = Lora.wrap llamaLora (model llamaConfig) 7L
            use again = Lora.wrap llamaLora (model llamaConfig) 7L
            use other = Lora.wrap llamaLora (model llamaConfig) 8L
            for (_, p), (_, q) in List.zip (Lora.parameters first) (Lora.parameters again) do
                expectEqual p q "the same seed gives the same values"
            for adapter in first.Adapters do
                let a = values adapter.A
                Expect.isLessThanOrEqual (a |> Array.map abs |> Array.max) (1.0 / sqrt 16.0) "A within the kaiming bound"
                Expect.isGreaterThan (a |> Array.map abs |> Array.max) (0.5 / sqrt 16.0) "A spreads over the bound"
                Expect.isTrue (values adapter.B |> Array.forall ((=) 0.0)) "B is zero"
            Expect.isGreaterThan (maxAbsDiff first.Adapters.Head.A other.Adapters.Head.A) 0.0 "another seed, other values")

        // The adapters ride on forward hooks, which TorchSharp runs in Module.call only (Module.forward
        // skips them): the models must invoke every projection through call.
        for name, config, _ in cases do
            torchTest (sprintf "%s: every projection runs its forward hooks, in forward and in the key/value-cache path" name) (fun () ->
                let lm = model config
                let counts = Collections.Generic.Dictionary<string, int>()
                let removers =
                    [ for struct (moduleName, m) in lm.Module.named_modules () do
                          match m with
                          | :? Linear
                          | :? Conv1D ->
                              counts[moduleName] <- 0
                              let count = Func<torch.nn.Module<torch.Tensor, torch.Tensor>, torch.Tensor, torch.Tensor, torch.Tensor>(fun _ _ output ->
                                  counts[moduleName] <- counts[moduleName] + 1
                                  output)
                              yield (m :?> torch.nn.Module<torch.Tensor, torch.Tensor>).register_forward_hook count
                          | _ -> () ]
                use ids = inputIds config 3L
                use _ = logits lm ids
                let afterForward = Map.ofSeq [ for KeyValue(k, v) in counts -> k, v ]
                do
                    use _ = torch.no_grad ()
                    use mask = torch.ones(2L, 6L, dtype = torch.int64)
                    let cachedLogits, cache = CausalLm.forwardCached lm ids mask None
                    cachedLogits.Dispose()
                    (cache :> IDisposable).Dispose()
                for remover in removers do remover.remove ()
                Expect.isGreaterThanOrEqual counts.Count 8 "the model has its projections (4 per layer at least)"
                for KeyValue(moduleName, calls) in counts do
                    Expect.equal afterForward[moduleName] 1 (moduleName + " runs its hooks once in forward")
                    Expect.equal calls 2 (moduleName + " runs its hooks once more in forwardCached"))

        for name, config, loraConfig in cases do
            torchTest (sprintf "%s: with lora_B zero the logits equal the base model's" name) (fun () ->
                let lm = model config
                use ids = inputIds config 3L
                use before = logits lm ids
                use adapters = Lora.wrap loraConfig lm 1L
                use after = logits lm ids
                expectEqual after before "logits")

        torchTest "a wrapped Linear returns base(x) + scale * x A^T B^T (LLaMA q_proj)" (fun () ->
            let lm = model llamaConfig
            use adapters = Lora.wrap llamaLora lm 1L
            randomize adapters 2L
            let adapter = adapters.Adapters.Head
            Expect.equal adapter.ModuleName "model.layers.0.self_attn.q_proj" "the first adapter"
            let linear = adapter.Target :?> Linear
            use g = new torch.Generator(9UL)
            use x = torch.randn([| 2L; 3L; 16L |], generator = g)
            use _ = torch.no_grad ()
            use actual = linear.call x
            use expected = x.matmul(linear.weight.t()) + x.matmul(adapter.A.t()).matmul(adapter.B.t()) * 2.0
            expectClose 1e-5 actual expected "q_proj output"
            Expect.isGreaterThan (maxAbsDiff actual (linear.forward x)) 1e-2 "the adapter changes the output")

        torchTest "a wrapped Conv1D returns base(x) + scale * x A^T B^T (GPT-2 c_attn, weight stored [in, out])" (fun () ->
            let lm = model gpt2Config
            use adapters = Lora.wrap gpt2Lora lm 1L
            randomize adapters 2L
            let adapter = adapters.Adapters[1]
            Expect.equal adapter.ModuleName "transformer.h.1.attn.c_attn" "the second adapter"
            let conv = adapter.Target :?> Conv1D
            use g = new torch.Generator(9UL)
            use x = torch.randn([| 2L; 3L; 16L |], generator = g)
            use _ = torch.no_grad ()
            use actual = conv.call x
            use expected = x.matmul(conv.Weight) + conv.Bias + x.matmul(adapter.A.t()).matmul(adapter.B.t()) * 2.0
            expectClose 1e-5 actual expected "c_attn output")

        for name, config, loraConfig in cases do
            torchTest (sprintf "%s: merged and unmerged adapters give the same logits, and the merged model saves as a plain HF model" name) (fun () ->
                let lm = model config
                use ids = inputIds config 3L
                use baseLogits = logits lm ids
                let adapters = Lora.wrap loraConfig lm 1L
                randomize adapters 2L
                use unmerged = logits lm ids
                Expect.isGreaterThan (maxAbsDiff unmerged baseLogits) 1e-2 "the adapters change the logits"
                Lora.merge adapters
                use merged = logits lm ids
                expectClose 1e-5 merged unmerged "merged logits"
                use folder = new TempFolder()
                HfModelFolder.save folder.Path lm None []
                let reloaded = HfModelFolder.load folder.Path 99L
                reloaded.Module.eval ()
                use fromFolder = logits reloaded ids
                expectEqual fromFolder merged "the saved merged model")

        for name, config, loraConfig in cases do
            torchTest (sprintf "%s: save and load round-trip the adapters exactly with PEFT's files" name) (fun () ->
                let lm = model config
                use adapters = Lora.wrap { loraConfig with Dropout = 0.1 } lm 1L
                randomize adapters 2L
                use folder = new TempFolder()
                Lora.save folder.Path (Some "base-model") adapters
                let header = Safetensors.readHeader (folder.File "adapter_model.safetensors")
                Expect.equal
                    (header.Entries |> List.map (fun e -> e.Name) |> List.sort)
                    (Lora.parameters adapters |> List.map fst |> List.sort)
                    "the safetensors keys are PEFT's"
                Expect.equal (header.Metadata.TryFind "format") (Some "pt") "format metadata"
                use json = JsonDocument.Parse(File.ReadAllText(folder.File "adapter_config.json"))
                let root = json.RootElement
                Expect.equal (root.GetProperty("peft_type").GetString()) "LORA" "peft_type"
                Expect.equal (root.GetProperty("task_type").GetString()) "CAUSAL_LM" "task_type"
                Expect.equal (root.GetProperty("r").GetInt32()) loraConfig.R "r"
                Expect.equal (root.GetProperty("lora_alpha").GetDouble()) loraConfig.Alpha "lora_alpha"
                Expect.equal (root.GetProperty("lora_dropout").GetDouble()) 0.1 "lora_dropout"
                Expect.equal (root.GetProperty("bias").GetString()) "none" "bias"
                Expect.equal (root.GetProperty("base_model_name_or_path").GetString()) "base-model" "base model"
                Expect.equal [ for t in root.GetProperty("target_modules").EnumerateArray() -> t.GetString() ] loraConfig.TargetModules "target_modules"
                Expect.equal (root.GetProperty("fan_in_fan_out").GetBoolean()) (name = "GPT-2") "fan_in_fan_out for Conv1D"
                Expect.equal (Lora.loadConfig folder.Path) { loraConfig with Dropout = 0.1 } "the configuration reads back"
                let fresh = model config
                use loaded = Lora.load folder.Path fresh
                Expect.equal (namesAndShapes loaded) (namesAndShapes adapters) "the same adapters"
                for (_, p), (_, q) in List.zip (Lora.parameters loaded) (Lora.parameters adapters) do
                    expectEqual p q "values"
                use ids = inputIds config 3L
                use expected = logits lm ids
                use actual = logits fresh ids
                expectEqual actual expected "logits of the reloaded adapters")

        for name, config, loraConfig in cases do
            torchTest (sprintf "%s: after freezeBase only the adapters get gradients" name) (fun () ->
                let lm = model config
                use adapters = Lora.wrap { loraConfig with Dropout = 0.2 } lm 1L
                randomize adapters 2L
                Lora.freezeBase lm
                lm.Module.train ()
                use ids = inputIds config 3L
                use output = lm.Module.forward ids
                use loss = output.square().mean()
                loss.backward ()
                for struct (parameterName, p) in lm.Module.named_parameters () do
                    Expect.isFalse p.requires_grad (parameterName + " is frozen")
                    Expect.isTrue (isNull p.grad || values p.grad |> Array.forall ((=) 0.0)) (parameterName + " has no gradient")
                for parameterName, p in Lora.parameters adapters do
                    Expect.isFalse (isNull p.grad) (parameterName + " has a gradient")
                    Expect.isTrue (values p.grad |> Array.exists ((<>) 0.0)) (parameterName + " has a non-zero gradient"))

        torchTest "adapter dropout acts in training mode only" (fun () ->
            let lm = model llamaConfig
            use adapters = Lora.wrap { llamaLora with Dropout = 0.5 } lm 1L
            randomize adapters 2L
            let q = adapters.Adapters.Head.Target
            use g = new torch.Generator(4UL)
            use x = torch.randn([| 4L; 16L |], generator = g)
            use _ = torch.no_grad ()
            use eval1 = q.call x
            use eval2 = q.call x
            expectEqual eval1 eval2 "eval mode is deterministic"
            use expected = q.forward x + x.matmul(adapters.Adapters.Head.A.t()).matmul(adapters.Adapters.Head.B.t()) * 2.0
            expectClose 1e-5 eval1 expected "eval mode uses every input"
            q.train ()
            use trained = q.call x
            Expect.isGreaterThan (maxAbsDiff trained eval1) 1e-3 "training mode drops inputs of the adapter path")

        for name, config, loraConfig in cases do
            torchTest (sprintf "%s: the key/value-cache path sees the adapters" name) (fun () ->
                let lm = model config
                use ids = inputIds config 3L
                use baseLogits = logits lm ids
                use adapters = Lora.wrap loraConfig lm 1L
                randomize adapters 2L
                use full = logits lm ids
                use _ = torch.no_grad ()
                use mask = torch.ones(2L, 6L, dtype = torch.int64)
                use prompt = ids.narrow(1L, 0L, 4L)
                use promptMask = mask.narrow(1L, 0L, 4L)
                let first, cache = CausalLm.forwardCached lm prompt promptMask None
                use first = first
                use cache = cache
                use rest = ids.narrow(1L, 4L, 2L)
                let second, next = CausalLm.forwardCached lm rest mask (Some cache)
                use second = second
                use next = next
                use cached = torch.cat([| first; second |], 1L)
                expectClose 1e-5 cached full "cached logits equal the adapted forward"
                Expect.isGreaterThan (maxAbsDiff cached baseLogits) 1e-2 "and differ from the base model's")

        for name, config, loraConfig in cases do
            torchTest (sprintf "%s: disposing the adapters restores the base logits" name) (fun () ->
                let lm = model config
                use ids = inputIds config 3L
                use before = logits lm ids
                let adapters = Lora.wrap loraConfig lm 1L
                randomize adapters 2L
                use adapted = logits lm ids
                Expect.isGreaterThan (maxAbsDiff adapted before) 1e-2 "the adapters change the logits"
                (adapters :> IDisposable).Dispose()
                use after = logits lm ids
                expectEqual after before "logits after Dispose")

        torchTest "without target modules or module name the family's default targets are adapted (PEFT's mapping)" (fun () ->
            for config, expected in [ gpt2Config, [ "c_attn" ]; llamaConfig, [ "q_proj"; "v_proj" ] ] do
                let lm = model config
                Lora.validate (lora 2 4.0 [])
                use adapters = Lora.wrap (lora 2 4.0 []) lm 1L
                let chosen = [ for a in adapters.Adapters -> a.ModuleName.Substring(a.ModuleName.LastIndexOf '.' + 1) ] |> List.distinct
                Expect.equal chosen expected "default targets"
                Expect.equal adapters.TargetModuleNames expected "target_modules as saved")
        torchTest "bad configurations raise InvalidInputException naming the option" (fun () ->
            let lm = model gpt2Config
            let wrap config () = (Lora.wrap config lm 1L :> IDisposable).Dispose()
            expectInvalid "--lora-dim" "" "at least 1" (wrap { gpt2Lora with R = 0 })
            expectInvalid "--lora-alpha" "" "positive" (wrap { gpt2Lora with Alpha = 0.0 })
            expectInvalid "--lora-alpha" "" "positive" (wrap { gpt2Lora with Alpha = nan })
            expectInvalid "--lora-dropout" "" "[0, 1)" (wrap { gpt2Lora with Dropout = 1.0 })
            expectInvalid "--lora-dropout" "" "[0, 1)" (wrap { gpt2Lora with Dropout = -0.1 })
            expectInvalid "--lora-target-modules" "" "c_attn, c_proj, c_fc" (wrap { gpt2Lora with TargetModules = [ "c_attn"; "q_proj" ] })
            expectInvalid "--lora-target-modules" "" "without spaces" (wrap { gpt2Lora with TargetModules = [ " c_attn" ] })
            expectInvalid "--lora-module-name" "" "transformer.h.0.attn.c_attn" (wrap { gpt2Lora with TargetModules = []; ModuleNameSubstring = Some "layers." })
            expectInvalid "--lora-module-name" "" "among the target modules" (wrap { gpt2Lora with ModuleNameSubstring = Some "h.5." })
            expectInvalid "--lora-module-name" "" "empty" (wrap { gpt2Lora with ModuleNameSubstring = Some "" })
            Lora.validate llamaLora
            expectInvalid "--lora-dim" "" "at least 1" (fun () -> Lora.validate { llamaLora with R = -1 }))

        torchTest "bad adapter files raise InvalidInputException naming the file and field or tensor" (fun () ->
            use folder = new TempFolder()
            let configPath = folder.File "adapter_config.json"
            let weightsPath = folder.File "adapter_model.safetensors"
            let load () = (Lora.load folder.Path (model gpt2Config) :> IDisposable).Dispose()
            expectInvalid configPath "" "does not exist" load
            do
                use adapters = Lora.wrap gpt2Lora (model gpt2Config) 1L
                Lora.save folder.Path None adapters
            let original = File.ReadAllText configPath
            let edit (field: string) (value: string) =
                let json = Nodes.JsonNode.Parse(original).AsObject()
                json[field] <- (if isNull value then null else Nodes.JsonNode.Parse value)
                File.WriteAllText(configPath, json.ToJsonString())
            edit "peft_type" "\"PREFIX_TUNING\""
            expectInvalid configPath "peft_type" "LORA" load
            edit "r" "2.5"
            expectInvalid configPath "r" "integer" load
            edit "r" "0"
            expectInvalid configPath "r" "at least 1" load
            edit "lora_alpha" "\"16\""
            expectInvalid configPath "lora_alpha" "a number" load
            edit "target_modules" "[\"q_proj\"]"
            expectInvalid configPath "target_modules" "matches no projection" load
            edit "target_modules" "\".*attn\""
            expectInvalid configPath "target_modules" "regular expression" load
            edit "use_dora" "true"
            expectInvalid configPath "use_dora" "DoRA" load
            edit "r" "8"
            expectInvalid weightsPath "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" "expected shape" load
            File.WriteAllText(configPath, original)
            do
                use adapters = Lora.wrap { gpt2Lora with ModuleNameSubstring = Some "h.0." } (model gpt2Config) 1L
                StateDict.export weightsPath Map.empty [ for n, p in Lora.parameters adapters -> n, (p :> torch.Tensor) ]
            expectInvalid weightsPath "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight" "missing" load
            do
                use adapters = Lora.wrap { gpt2Lora with TargetModules = [ "c_attn"; "c_fc" ] } (model gpt2Config) 1L
                StateDict.export weightsPath Map.empty [ for n, p in Lora.parameters adapters -> n, (p :> torch.Tensor) ]
            expectInvalid weightsPath "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight" "not an adapter" load
            File.Delete weightsPath
            expectInvalid weightsPath "" "does not exist" load)
    ]
