/// The key/value cache of both model families, sampling and batched generation.
module Functional.Tests.GenerationTests

open System
open Expecto
open TorchSharp
open Functional
open Functional.Models
open Functional.Generation
open Functional.Benchmarks
open Functional.Runtime
open Functional.Tests.TestUtil
open Functional.Text

// ---------------------------------------------------------------- helpers


// A wide initialization makes the tiny models' next-token distributions far from uniform, so greedy
// decoding moves between tokens and near-ties are unlikely.
let private gpt2Config =
    Gpt2
        { VocabSize = 17
          NPositions = 128
          NEmbd = 16
          NLayer = 2
          NHead = 2
          NInner = 32
          ActivationFunction = Activation.GeluNew
          ResidPdrop = 0.0
          EmbdPdrop = 0.0
          AttnPdrop = 0.0
          LayerNormEpsilon = 1e-5
          InitializerRange = 0.5
          ScaleAttnWeights = true
          // A tied head with this wide initialization mostly predicts the last token again.
          TieWordEmbeddings = false }

/// Grouped-query attention: 4 query heads share 2 key/value heads.
let private llamaConfig =
    Llama
        { VocabSize = 19
          HiddenSize = 16
          IntermediateSize = 24
          NumHiddenLayers = 2
          NumAttentionHeads = 4
          NumKeyValueHeads = 2
          HeadDim = 4
          HiddenAct = Activation.Silu
          MaxPositionEmbeddings = 64
          RmsNormEps = 1e-6
          RopeTheta = 10000.0
          InitializerRange = 0.5
          TieWordEmbeddings = false
          AttentionBias = false
          MlpBias = false
          AttentionDropout = 0.0
          PadTokenId = None
          Variant = LlamaVariant.llama }

let private families = [ "GPT-2", gpt2Config; "LLaMA (GQA)", llamaConfig ]

/// A fresh model per test: tests run in parallel and generation switches the module's mode.
let private model config =
    let lm = CausalLm.create config 11L
    lm.Module.eval ()
    lm

let private greedy newTokens =
    { GenerationOptions.defaults with MaxNewTokens = newTokens }

let private sampling seed newTokens =
    { GenerationOptions.defaults with
        MaxNewTokens = newTokens
        Sampling = { SamplingOptions.greedy with Greedy = false; Seed = seed } }

let private expectInvalid origin location action = expectInvalidInput origin location [] action

// ---------------------------------------------------------------- key/value cache

let private cacheTests =
    testList "kv cache" [
        for family, config in families do
            let fresh () = model config
            FamilyChecks.cachedLogits family fresh
            FamilyChecks.paddedRows family "positions from the mask's cumulative sum" fresh 7L [| 3L; 1L; 4L; 1L; 5L; 9L |]
    ]

// ---------------------------------------------------------------- sampling

let private samplingTests =
    let draw options (generator: torch.Generator) (logits: torch.Tensor) =
        use tokens = Sampling.nextTokens options generator logits
        tokens.data<int64>().ToArray()
    testList "sampling" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 30 } "greedy picks the argmax of every row"
            (fun (seed: uint16) ->
                TorchRuntime.ensure ()
                use g = new torch.Generator(uint64 seed)
                use logits = torch.randn([| 4L; 10L |], generator = g)
                let rows = values logits |> Array.chunkBySize 10
                let expected = rows |> Array.map (fun row -> int64 (Array.findIndex ((=) (Array.max row)) row))
                use unused = new torch.Generator(0UL)
                draw SamplingOptions.greedy unused logits = expected)

        torchTest "top-k never samples outside the k most likely tokens" (fun () ->
            use g = new torch.Generator(3UL)
            use logits = torch.randn([| 3L; 20L |], generator = g)
            let best =
                values logits
                |> Array.chunkBySize 20
                |> Array.map (fun row -> row |> Array.indexed |> Array.sortByDescending snd |> Array.take 4 |> Array.map (fst >> int64) |> Set.ofArray)
            let options = { SamplingOptions.greedy with Greedy = false; TopK = 4; Temperature = 3.0 }
            use sampler = new torch.Generator(5UL)
            let drawn = [ for _ in 1 .. 200 -> draw options sampler logits ]
            for row in 0 .. 2 do
                let seen = drawn |> List.map (fun d -> d[row]) |> Set.ofList
                Expect.isTrue (Set.isSubset seen best[row]) (sprintf "row %d drew %A, outside the best 4 %A" row seen best[row])
                Expect.isGreaterThan seen.Count 1 (sprintf "row %d sampled more than one token" row))

        torchTest "top-p keeps exactly the nucleus" (fun () ->
            // Probabilities 0.15, 0.5, 0.05, 0.3: nuclei by descending probability are {1}, {1, 3}, {1, 3, 0}.
            use logits = torch.tensor([| 0.15; 0.5; 0.05; 0.3 |]).log().to_type(torch.float32).unsqueeze 0L
            let kept topP =
                let options = { SamplingOptions.greedy with Greedy = false; TopP = topP }
                use filtered = Sampling.filterLogits options logits
                values filtered |> Array.indexed |> Array.filter (snd >> Double.IsFinite) |> Array.map fst |> Set.ofArray
            Expect.equal (kept 0.4) (set [ 1 ]) "p = 0.4: the top token alone has 0.5"
            Expect.equal (kept 0.75) (set [ 1; 3 ]) "p = 0.75: 0.5 + 0.3"
            Expect.equal (kept 0.85) (set [ 0; 1; 3 ]) "p = 0.85: 0.5 + 0.3 + 0.15"
            Expect.equal (kept 0.01) (set [ 1 ]) "a tiny p still keeps the top token"
            Expect.equal (kept 1.0) (set [ 0; 1; 2; 3 ]) "p = 1 keeps everything")

        torchTest "temperature divides the logits before top-k" (fun () ->
            use logits = torch.tensor([| 2.0f; -1.0f; 4.0f |]).unsqueeze 0L
            let options = { SamplingOptions.greedy with Greedy = false; Temperature = 2.0; TopK = 2 }
            use filtered = Sampling.filterLogits options logits
            Expect.equal (values filtered) [| 1.0; Double.NegativeInfinity; 2.0 |] "scaled by 1/2, lowest dropped")

        torchTest "the same seed gives the same draws and another seed other draws" (fun () ->
            use logits = torch.zeros(2L, 50L)
            let options seed = { SamplingOptions.greedy with Greedy = false; Seed = seed }
            let run seed =
                use g = new torch.Generator(uint64 seed)
                [ for _ in 1 .. 10 -> draw (options seed) g logits ]
            Expect.equal (run 7L) (run 7L) "seed 7 twice"
            Expect.notEqual (run 7L) (run 8L) "seeds 7 and 8")

        test "sampling options name the command-line option at fault" {
            let check option (options: SamplingOptions) =
                expectInvalid option "" (fun () -> SamplingOptions.validate options)
            check "--temperature" { SamplingOptions.greedy with Temperature = 0.0 }
            check "--temperature" { SamplingOptions.greedy with Temperature = nan }
            check "--top-k" { SamplingOptions.greedy with TopK = -1 }
            check "--top-p" { SamplingOptions.greedy with TopP = 0.0 }
            check "--top-p" { SamplingOptions.greedy with TopP = 1.5 }
            SamplingOptions.validate { SamplingOptions.greedy with Temperature = 0.7; TopK = 50; TopP = 0.9 }
        }
    ]

// ---------------------------------------------------------------- generation

let private generationTests =
    testList "generator" [
        for family, config in families do
            let fresh () = model config
            FamilyChecks.greedyMatches family fresh FamilyChecks.prompt 16 1
            FamilyChecks.batchedMatches family fresh FamilyChecks.prompts 10

        torchTest "a row stops at eos, its result ends with eos, and the other rows go on" (fun () ->
            let lm = model llamaConfig
            let first = [| 1L; 4L; 2L; 8L |]
            let second = [| 6L; 6L |]
            let free = Generator.generate lm [| first; second |] (greedy 12)
            let eos = free[0][3]
            let upToEos (tokens: int64[]) =
                match Array.tryFindIndex ((=) eos) tokens with
                | Some i -> tokens[.. i]
                | None -> tokens
            let stopped = Generator.generate lm [| first; second |] { greedy 12 with EosId = Some eos; PadId = 0L }
            Expect.equal stopped[0] (upToEos free[0]) "the first row ends at its first eos"
            Expect.isLessThan stopped[0].Length 12 "the first row stopped early"
            Expect.equal stopped[1] (upToEos free[1]) "the second row is unaffected by the first stopping")

        torchTest "a row stops at any of the stop tokens as well as at eos (a chat template's end of turn)" (fun () ->
            let lm = model llamaConfig
            let prompt = [| 1L; 4L; 2L; 8L |]
            let free = (Generator.generate lm [| prompt |] (greedy 12))[0]
            let stop = free[2]
            let upTo (tokens: int64[]) = tokens[.. Array.findIndex ((=) stop) tokens]
            let stopped = (Generator.generate lm [| prompt |] { greedy 12 with StopIds = [ 9999L; stop ] })[0]
            Expect.equal stopped (upTo free) "ends at the first stop token"
            let both = (Generator.generate lm [| prompt |] { greedy 12 with EosId = Some free[1]; StopIds = [ stop ] })[0]
            let eos = free[1]
            Expect.equal both free[.. Array.findIndex (fun t -> t = eos || t = stop) free] "eos stops it too")

        torchTest "the same seed gives the same tokens and another seed other tokens" (fun () ->
            let lm = model gpt2Config
            let prompts = [| [| 1L; 2L |]; [| 3L |] |]
            let run seed = Generator.generate lm prompts (sampling seed 20)
            Expect.equal (run 42L) (run 42L) "seed 42 twice"
            Expect.notEqual (run 42L) (run 43L) "seeds 42 and 43")

        torchTest "live tensors stay flat over 100 generated tokens" (fun () ->
            // 3 prompt tokens and 100 new ones need more than the 64 positions of llamaConfig.
            let lm =
                match llamaConfig with
                | Llama c -> model (Llama { c with MaxPositionEmbeddings = 128 })
                | other -> model other
            let live () = DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
            let counts = ResizeArray()
            let before = live ()
            let generated =
                Generator.generateWith (fun _ -> counts.Add(live ())) lm [| [| 1L; 2L; 3L |]; [| 4L |] |] (sampling 1L 100)
            Expect.equal generated[0].Length 100 "100 tokens generated"
            Expect.equal (Array.distinct (counts.ToArray())) [| counts[0] |] (sprintf "the count after every step equals step 0's (%d)" counts[0])
            Expect.equal (live ()) before "nothing is left alive after generation")

        torchTest "generation restores the model's training mode" (fun () ->
            let lm = model gpt2Config
            lm.Module.train ()
            Generator.generate lm [| [| 1L |] |] (greedy 2) |> ignore
            Expect.isTrue lm.Module.training "back in training mode")

        torchTest "generateText encodes without special tokens, stops at the tokenizer's eos and decodes the new tokens" (fun () ->
            let lm = model gpt2Config
            let letters = "abcdefghijklmnop" // ids 0 .. 15; 16 is eos
            let tokenizer =
                { Name = "letters"
                  Fingerprint = "letters"
                  VocabSize = 17
                  Special = { Bos = None; Eos = Some 16L; Pad = Some 16L }
                  AddsBos = false
                  AddsEos = false
                  Encode = fun text -> text |> Seq.map (fun c -> int64 (letters.IndexOf c)) |> Array.ofSeq
                  EncodeJoined = fun _ _ -> failwith "not used by generation"
                  Decode = fun tokens -> tokens |> Array.filter ((<>) 16L) |> Array.map (fun t -> letters[int t]) |> String }
            let prompts = [ "bad"; "cafe" ]
            let texts = Generator.generateText lm tokenizer prompts (greedy 8)
            let expected =
                Generator.generate lm (prompts |> List.map tokenizer.Encode |> Array.ofList) { greedy 8 with EosId = Some 16L; PadId = 16L }
                |> Array.map tokenizer.Decode
                |> List.ofArray
            Expect.equal texts expected "the decoded new tokens of each prompt")

        torchTest "invalid generation input names the option or the prompt at fault" (fun () ->
            let lm = model gpt2Config
            let run prompts options = fun () -> Generator.generate lm prompts options |> ignore
            expectInvalid "--max-new-tokens" "" (run [| [| 1L |] |] (greedy 0))
            expectInvalid "--top-p" "" (run [| [| 1L |] |] { greedy 2 with Sampling = { SamplingOptions.greedy with TopP = 2.0 } })
            expectInvalid "prompts" "prompt 2" (run [| [| 1L |]; [||] |] (greedy 2))
            expectInvalid "prompts" "prompt 1, token 2" (run [| [| 1L; 17L |] |] (greedy 2))
            expectInvalid "prompts" "prompt 2" (run [| [| 1L |]; Array.create 129 1L |] (greedy 1))
            let longest = Generator.generate lm [| [| 1L; 2L; 3L |] |] (greedy 126)
            Expect.equal longest[0].Length 126 "126 new tokens fit in 128 positions"
            let capped = Generator.generate lm [| [| 1L; 2L; 3L |] |] (greedy 127)
            Expect.equal capped[0].Length 126 "generation stops at the context")

        torchTest "the benchmark times each length with and without the cache" (fun () ->
            let lm = model llamaConfig
            let rows = GenerationBenchmark.run lm [ 2; 4 ]
            Expect.equal (rows |> List.map (fun r -> r.NewTokens)) [ 2; 4 ] "one row per length"
            for r in rows do
                Expect.isGreaterThan r.CachedSecondsPerToken 0.0 "cached time"
                Expect.isGreaterThan r.UncachedSecondsPerToken 0.0 "uncached time"
            Expect.stringContains (GenerationBenchmark.format rows) "speedup" "the table has a header"
            expectInvalid "--lengths" "" (fun () -> GenerationBenchmark.run lm [ 0 ] |> ignore))
    ]

[<Tests>]
let tests = testList "generation" [ cacheTests; samplingTests; generationTests ]
