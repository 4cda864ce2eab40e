/// Isolated packing (issue 16): packed rows restart their positions, attend only within each sample
/// and mask the label across each boundary, so a packed micro-batch gives the loss and gradients of the
/// same samples unpacked, for every family; completion-only training keeps each sample's prompt
/// masked; --packing-attention cross keeps the old stream packing.
module Functional.Tests.PackingTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional
open Functional.Data
open Functional.Models
open Functional.Training
open Functional.Tests.TestUtil

/// max-seq-len of the packed rows in these tests.
let private width = 16

/// count distinct samples of 3 to 12 tokens drawn from seed (ids in [1, vocab)); every third sample has
/// a prompt of 1 to 3 tokens, the others none.
let private samples (vocab: int) (count: int) (seed: int) : TokenizedDataset =
    let random = Random seed
    let rows = Array.init count (fun i -> Array.init (random.Next(3, 13)) (fun _ -> int64 (random.Next(1, vocab))))
    let rows = rows |> Array.mapi (fun i row -> if i > 0 && rows[.. i - 1] |> Array.contains row then Array.append row [| 1L |] else row)
    { Path = "mem"
      Rows = rows
      Lines = Array.init count ((+) 1)
      PromptLengths = Array.init count (fun i -> if i % 3 = 0 then 1 + random.Next 3 else 0)
      Segments = [||]
      TrainMasks = [||] }

let private all (dataset: TokenizedDataset) = Array.init dataset.Rows.Length id

/// The packed dataset of the samples, checked to hold fewer rows than samples and a row of several.
let private packed (dataset: TokenizedDataset) =
    let p = TokenizedDataset.packIsolated width dataset
    Expect.isLessThan p.Rows.Length dataset.Rows.Length "packing needs fewer rows"
    Expect.isTrue (p.Segments |> Array.exists (fun s -> s.Length > 1)) "a row holds several samples"
    p

let private gradients (lm: CausalLm) =
    [ for name, p in lm.Module.named_parameters () -> name, (if isNull p.grad then torch.zeros_like p else p.grad.clone ()) ]

/// The loss sum, the predicted tokens and every parameter's gradient of one micro-batch of all rows.
let private lossAndGradientsWith (objective: Objective) (lm: CausalLm) (dataset: TokenizedDataset) =
    lm.Module.zero_grad ()
    use batch = objective.Collate width 0L dataset (all dataset)
    use loss = objective.LossSum lm batch
    loss.backward ()
    float (loss.item<float32> ()), batch.PredictedTokens, gradients lm

let private lossAndGradients = lossAndGradientsWith Objective.causalLm

/// Expects the packed micro-batch's token-weighted loss and gradients under packedObjective to equal the
/// unpacked one's under the full causal-LM loss.
let private expectSameTrainingWith (packedObjective: Objective) (lm: CausalLm) (dataset: TokenizedDataset) =
    lm.Module.train ()
    let lossUnpacked, countUnpacked, gradUnpacked = lossAndGradients lm dataset
    let lossPacked, countPacked, gradPacked = lossAndGradientsWith packedObjective lm (packed dataset)
    Expect.equal countPacked countUnpacked "the same predicted tokens"
    Expect.isGreaterThan countUnpacked 0L "something is predicted"
    let mean sum = sum / float countUnpacked
    Expect.floatClose { absolute = 1e-6; relative = 1e-5 } (mean lossPacked) (mean lossUnpacked) "token-weighted loss"
    for (name, packedGrad), (_, unpackedGrad) in List.zip gradPacked gradUnpacked do
        use scale = unpackedGrad.abs().max ()
        let tolerance = 1e-6 + 1e-4 * float (scale.item<float32> ())
        expectClose tolerance packedGrad unpackedGrad (sprintf "gradient of %s" name)
    // The gradients are not all zero: the comparison says something.
    Expect.isTrue (gradUnpacked |> List.exists (fun (_, g) -> maxAbsDiff g (torch.zeros_like g) > 1e-6)) "the gradients move"

let private expectSameTraining = expectSameTrainingWith Objective.causalLm

/// Expects every sample's logits in the packed rows to equal the sample's logits run alone.
let private expectSameLogits (lm: CausalLm) (dataset: TokenizedDataset) =
    lm.Module.eval ()
    use _ = torch.no_grad ()
    let p = packed dataset
    use batch = Batching.collate width 0L p (all p)
    use logits = Objective.causalLmLogits lm batch // (B, T, V)
    let mutable checkedSegments = 0
    for r in 0 .. p.Rows.Length - 1 do
        let mutable start = 0
        for s in p.Segments[r] do
            let tokens = p.Rows[r][start .. start + s.Length - 1]
            let i = dataset.Rows |> Array.findIndex (fun row -> row = tokens)
            use ids = torch.tensor(tokens, ReadOnlySpan [| 1L; int64 tokens.Length |])
            use alone = lm.Module.forward ids // (1, L, V)
            use inRow = logits.narrow(0L, int64 r, 1L).narrow(1L, int64 start, int64 s.Length)
            expectClose 1e-5 inRow alone (sprintf "row %d, sample %d (line %d)" r (checkedSegments + 1) dataset.Lines[i])
            checkedSegments <- checkedSegments + 1
            start <- start + s.Length
    Expect.equal checkedSegments dataset.Rows.Length "every sample is in a packed row"

let private parse (json: string) = ModelConfig.parse "config.json" json

let private families : (string * ModelConfig) list =
    [ "GPT-2", Gpt2 tinyGpt2
      "LLaMA (grouped-query)", Llama tinyLlama
      "Qwen3 (q/k norms)",
      parse """{"model_type": "qwen3", "vocab_size": 19, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "max_position_embeddings": 32, "initializer_range": 0.2}"""
      "Mistral (sliding window 3)",
      parse """{"model_type": "mistral", "vocab_size": 19, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, "sliding_window": 3, "initializer_range": 0.2}"""
      "OPT (learned positions, offset 2)",
      parse """{"model_type": "opt", "vocab_size": 19, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 32,
                "max_position_embeddings": 32, "dropout": 0.0, "attention_dropout": 0.0, "init_std": 0.2}"""
      "OPT (post-norm, projected embeddings)",
      parse """{"model_type": "opt", "vocab_size": 19, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 32,
                "max_position_embeddings": 32, "dropout": 0.0, "attention_dropout": 0.0, "init_std": 0.2,
                "do_layer_norm_before": false, "word_embed_proj_dim": 12}"""
      "BLOOM (ALiBi, 3 heads)",
      parse """{"model_type": "bloom", "vocab_size": 19, "hidden_size": 18, "n_layer": 2, "n_head": 3, "initializer_range": 0.5,
                "hidden_dropout": 0.0, "attention_dropout": 0.0}""" ]

let private modelTests =
    testList "models" [
        for name, config in families do
            torchTest (sprintf "%s: every packed sample's logits equal the sample's logits alone" name) (fun () ->
                let lm = CausalLm.create config 3L
                use _ = lm.Module
                expectSameLogits lm (samples (ModelConfig.vocabSize config) 9 5))
        for name, config in families |> List.filter (fun (n, _) -> n.StartsWith "GPT-2" || n.StartsWith "LLaMA" || n.StartsWith "BLOOM" || n.StartsWith "OPT (l") do
            torchTest (sprintf "%s: a packed micro-batch gives the loss and every gradient of the samples unpacked (token-weighted)" name) (fun () ->
                let lm = CausalLm.create config 4L
                use _ = lm.Module
                expectSameTraining lm (samples (ModelConfig.vocabSize config) 9 6))
        torchTest "LLaMA with train masks (assistant-only rows): packed loss and gradients equal the unpacked ones" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 6L
            use _ = lm.Module
            let data = samples tinyLlama.VocabSize 9 8
            // Two "assistant turns" per row where it is long enough: runs of kept positions, the rest -100.
            let masks = data.Rows |> Array.map (fun row -> Array.init row.Length (fun t -> t % 5 = 2 || t % 5 = 3))
            let data = { data with PromptLengths = Array.zeroCreate data.Rows.Length; TrainMasks = masks }
            let packedData = packed data
            Expect.equal (packedData.TrainMasks |> Array.sumBy Array.length) (packedData.Rows |> Array.sumBy Array.length) "the masks follow the rows"
            expectSameTraining lm data)
        torchTest "LLaMA with chunked cross-entropy (--loss-chunk-size): packed rows use the packed forward" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 7L
            use _ = lm.Module
            expectSameTrainingWith (Objective.causalLmChunked 3) lm (samples tinyLlama.VocabSize 9 9))
        torchTest "LLaMA with activation checkpointing: packed gradients still equal the unpacked ones" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 5L
            use _ = lm.Module
            CausalLm.setGradientCheckpointing lm true
            expectSameTraining lm (samples tinyLlama.VocabSize 8 7))
        torchTest "without packing the plain causal forward runs: a micro-batch of unpacked rows carries no packed inputs" (fun () ->
            use batch = Batching.collate width 0L (samples 19 4 1) [| 0; 1; 2; 3 |]
            Expect.isNone batch.Packed "the is_causal fast path")
        torchTest "the packed mask is block-diagonal and causal; padding attends only to padding" (fun () ->
            use segments = torch.tensor([| 0L; 0L; 1L; 1L; 1L; -1L |], ReadOnlySpan [| 1L; 6L |])
            use allowed = PackedAttention.allowed segments
            Expect.sequenceEqual allowed.shape [| 1L; 1L; 6L; 6L |] "(B, 1, T, T)"
            let expected =
                array2D [ [ 1; 0; 0; 0; 0; 0 ]; [ 1; 1; 0; 0; 0; 0 ]; [ 0; 0; 1; 0; 0; 0 ]
                          [ 0; 0; 1; 1; 0; 0 ]; [ 0; 0; 1; 1; 1; 0 ]; [ 0; 0; 0; 0; 0; 1 ] ]
            for i in 0 .. 5 do
                for j in 0 .. 5 do
                    Expect.equal (allowed[0L, 0L, int64 i, int64 j].item<bool> ()) (expected[i, j] = 1) (sprintf "query %d, key %d" i j))
        torchTest "a prefix-tuned model has no packed forward: refused naming --packing-attention" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 1L
            use _ = lm.Module
            Expect.isTrue (CausalLm.supportsIsolatedPacking lm) "a plain causal LM packs"
            let prefix = Peft.PrefixTuning.create 2 lm 1L
            Expect.isFalse (CausalLm.supportsIsolatedPacking prefix.Model) "the prefix-tuned one does not"
            let dataset = samples tinyLlama.VocabSize 6 2
            let p = TokenizedDataset.packIsolated width dataset
            use batch = Batching.collate width 0L p (all p)
            expectInvalidInput "--packing-attention" "" [ "prefix tuning"; "--packing-attention cross" ] (fun () ->
                (Objective.causalLmLogits prefix.Model batch).Dispose()))
    ]

let private dataTests =
    testList "data" [
        torchTest "packed rows hold whole samples, at most max-seq-len tokens, with restarting positions, segment ids and masked boundaries" (fun () ->
            let dataset = { samples 19 11 9 with PromptLengths = Array.zeroCreate 11 }
            let p = packed dataset
            Expect.isTrue (p.Rows |> Array.forall (fun r -> r.Length <= width)) "rows fit max-seq-len"
            for r in 0 .. p.Rows.Length - 1 do
                Expect.equal (p.Segments[r] |> Array.sumBy (fun s -> s.Length)) p.Rows[r].Length (sprintf "row %d: the segments cover it" r)
            let pieces =
                [ for r in 0 .. p.Rows.Length - 1 do
                      let mutable start = 0
                      for s in p.Segments[r] do
                          yield p.Rows[r][start .. start + s.Length - 1]
                          start <- start + s.Length ]
            Expect.equal (List.sort pieces) (List.sort (List.ofArray dataset.Rows)) "every sample exactly once, never split"
            use batch = Batching.collate width 0L p (all p)
            let packedInputs = batch.Packed.Value
            let positions = packedInputs.PositionIds.data<int64>().ToArray()
            let segmentIds = packedInputs.SegmentIds.data<int64>().ToArray()
            let labels = batch.Labels.data<int64>().ToArray()
            let T = int batch.InputIds.shape[1]
            for r in 0 .. p.Rows.Length - 1 do
                let mutable start = 0
                for k in 0 .. p.Segments[r].Length - 1 do
                    let s = p.Segments[r][k]
                    for t in 0 .. s.Length - 1 do
                        Expect.equal positions[r * T + start + t] (int64 t) (sprintf "row %d: positions restart at sample %d" r k)
                        Expect.equal segmentIds[r * T + start + t] (int64 k) (sprintf "row %d: segment id of sample %d" r k)
                    Expect.equal labels[r * T + start] Loss.IgnoreIndex (sprintf "row %d: sample %d's first token is not predicted from the previous sample" r k)
                    for t in 1 .. s.Length - 1 do
                        let token = p.Rows[r][start + t]
                        Expect.equal labels[r * T + start + t] token "the sample's other tokens are labels"
                    start <- start + s.Length
                for t in start .. T - 1 do
                    Expect.equal segmentIds[r * T + t] -1L "padding has its own segment"
                    Expect.equal labels[r * T + t] Loss.IgnoreIndex "padding is not trained on"
            Expect.equal batch.PredictedTokens (dataset.Rows |> Array.sumBy (fun row -> int64 (row.Length - 1))) "each sample predicts all but its first token"
            Expect.equal batch.Tokens (dataset.Rows |> Array.sumBy (fun row -> int64 row.Length)) "real tokens")
        torchTest "completion-only with isolated packing keeps every sample's prompt masked" (fun () ->
            let dataset = samples 19 10 3
            let p = packed dataset
            use packedBatch = Batching.collate width 0L p (all p)
            use unpacked = Batching.collate width 0L dataset (all dataset)
            Expect.equal packedBatch.PredictedTokens unpacked.PredictedTokens "the same tokens are trained on"
            let labels = packedBatch.Labels.data<int64>().ToArray()
            let T = int packedBatch.InputIds.shape[1]
            let mutable prompts = 0
            for r in 0 .. p.Rows.Length - 1 do
                let mutable start = 0
                for s in p.Segments[r] do
                    for t in 0 .. s.PromptLength - 1 do
                        Expect.equal labels[r * T + start + t] Loss.IgnoreIndex "a prompt token is not trained on"
                        prompts <- prompts + 1
                    start <- start + s.Length
            Expect.isGreaterThan prompts 0 "some samples have prompts")
        test "completion-only text data packs in isolation with each prompt's length; cross packing still refuses it" {
            let records =
                PromptDatasetTests.pairs
                |> Array.map (fun (p, a) -> JsonSerializer.Serialize(dict [ "prompt", p; "chosen", a ]))
                |> String.concat "\n"
            PromptDatasetTests.withData "d.jsonl" records (fun path ->
                let tokenizer = PromptDatasetTests.cl100k (ref 0) None
                let options = { PromptDataset.defaults with MaxSeqLen = 64; TrainOn = TrainOn.Completion }
                let unpacked = (PromptDataset.load path options tokenizer).Dataset
                let isolated = (PromptDataset.load path { options with Packing = true } tokenizer).Dataset
                Expect.equal options.PackingAttention PackingAttention.Isolated "isolated is the default"
                Expect.isLessThan isolated.Rows.Length unpacked.Rows.Length "packed"
                let segments = isolated.Segments |> Array.concat
                Expect.equal (segments |> Array.map (fun s -> s.PromptLength) |> Array.sort) (Array.sort unpacked.PromptLengths) "each sample keeps its prompt length"
                Expect.isTrue (unpacked.PromptLengths |> Array.forall (fun n -> n > 0)) "the prompts are masked"
                expectInvalidInput "--packing" "" [ "--packing-attention isolated" ] (fun () ->
                    PromptDataset.load path { options with Packing = true; PackingAttention = PackingAttention.Cross } tokenizer |> ignore))
        }
        test "cross packing is unchanged: the eos-separated stream cut into rows of exactly max-seq-len, attending across samples" {
            let texts = [| for i in 1 .. 6 -> sprintf "Sample %d: %s" i (String.replicate i "la ") |]
            let records = texts |> Array.map (fun t -> JsonSerializer.Serialize(dict [ "text", t ])) |> String.concat "\n"
            PromptDatasetTests.withData "t.jsonl" records (fun path ->
                let tokenizer = PromptDatasetTests.cl100k (ref 0) None
                let options = { PromptDataset.defaults with MaxSeqLen = 8; Packing = true; PackingAttention = PackingAttention.Cross }
                let dataset = (PromptDataset.load path options tokenizer).Dataset
                let stream = texts |> Array.collect (fun t -> Array.append (tokenizer.Encode t) [| PromptDatasetTests.endOfText |])
                Expect.equal (Array.concat dataset.Rows) stream "the stream"
                Expect.isTrue (dataset.Rows[.. dataset.Rows.Length - 2] |> Array.forall (fun r -> r.Length = 8)) "full rows"
                Expect.isEmpty dataset.Segments "no segments"
                Runtime.TorchRuntime.ensure ()
                use batch = Batching.collate 8 0L dataset [| 0; 1 |]
                Expect.isNone batch.Packed "the plain causal forward")
        }
        test "--packing-attention takes cross or isolated; anything else is refused naming the option and the values" {
            Expect.equal (PromptDataset.parsePackingAttention "cross") PackingAttention.Cross "cross"
            Expect.equal (PromptDataset.parsePackingAttention " Isolated ") PackingAttention.Isolated "isolated"
            expectInvalidInput "--packing-attention" "" [ "cross or isolated"; "sideways" ] (fun () ->
                PromptDataset.parsePackingAttention "sideways" |> ignore)
        }
        test "the data cache keeps the segments of rows packed in isolation" {
            let records = [ for i in 1 .. 7 -> sprintf "{\"input_ids\": [%s]}" (String.Join(", ", [ for k in 1 .. 2 + i -> k ])) ] |> String.concat "\n"
            PromptDatasetTests.withData "ids.jsonl" records (fun path ->
                use cache = new TempFolder()
                let tokenizer = PromptDatasetTests.cl100k (ref 0) None
                let options = { PromptDataset.defaults with MaxSeqLen = width; Packing = true }
                let built, hit = DataCache.loadTrainAndEval (cache.File "c") path None options tokenizer
                let read, hitAgain = DataCache.loadTrainAndEval (cache.File "c") path None options tokenizer
                Expect.isFalse hit "built"
                Expect.isTrue hitAgain "read back"
                Expect.isNonEmpty built.Train.Segments "packed in isolation"
                Expect.equal read.Train.Segments built.Train.Segments "the same segments"
                Expect.equal read.Train.Rows built.Train.Rows "the same rows")
        }
    ]

let private benchTests =
    testList "bench" [
        torchTest "the packing comparison trains the same samples padded and packed, and packing needs fewer rows and less padding" (fun () ->
            let config = Benchmarks.TrainingBenchmark.resize 1 64 4 32 Benchmarks.TrainingBenchmark.gpt2Small
            let settings: Benchmarks.BenchmarkSettings = { Steps = 3; WarmupSteps = 1; Threads = 1; LearningRate = 1e-3 }
            let c = Benchmarks.TrainingBenchmark.packingComparison config "fp32" settings ignore
            Expect.equal c.Samples 16 "batch x (warm-up + steps) samples"
            Expect.equal c.Padded.Rows 16 "one sample per padded row"
            Expect.isLessThan c.Packed.Rows c.Padded.Rows "packed into fewer rows"
            Expect.isLessThan c.Packed.PaddingShare c.Padded.PaddingShare "less padding"
            for r in [ c.Padded; c.Packed ] do
                Expect.isGreaterThan r.RealTokensPerSecond 0.0 (r.Mode + ": a speed")
                Expect.isTrue (Double.IsFinite r.FirstLoss) (r.Mode + ": a finite loss")
            let table = Benchmarks.TrainingBenchmark.formatPackingComparison c
            Expect.stringContains table "real tokens/s" "the table")
    ]

let private cliTests =
    testList "cli" [
        test "functional bench train --packing-compare prints real tokens/s padded and packed" {
            let run =
                runCli [ "bench"; "train"; "--packing-compare"; "--config"; "gpt2-small"; "--layers"; "1"; "--width"; "64"; "--batch"; "4"
                         "--seq-len"; "32"; "--steps"; "2"; "--warmup"; "1"; "--precision"; "fp32"; "--threads"; "1" ]
            Expect.equal run.ExitCode 0 (sprintf "exit code 0 (stderr: %s)" run.Stderr)
            for part in [ "real tokens/s"; "padded"; "packed"; "packed / padded" ] do
                Expect.stringContains run.Stdout part "the comparison table"
        }
        test "functional train --packing (isolated): one step over all rows has the loss and gradient norm of the rows unpacked" {
            use folder = new TempFolder()
            let golden = goldenDir "llama-cosine"
            let train (output: string) (extra: string list) =
                runCli (
                    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl"); "--output"; output
                      "--per-device-train-batch-size"; "16"; "--max-steps"; "1"; "--max-seq-len"; "64"; "--learning-rate"; "1e-3"
                      "--no-data-cache"; "--save-strategy"; "no" ]
                    @ extra)
            let plain = train (folder.File "plain") []
            Expect.equal plain.ExitCode 0 (sprintf "unpacked run (stderr: %s)" plain.Stderr)
            let isolated = train (folder.File "packed") [ "--packing" ]
            Expect.equal isolated.ExitCode 0 (sprintf "packed run (stderr: %s)" isolated.Stderr)
            let step (output: string) =
                readJsonLines (Path.Combine(output, "metrics.jsonl")) |> Array.find (fun l -> (fst (l.TryGetProperty "loss")) && l.GetProperty("step").GetInt32() = 1)
            let a, b = step (folder.File "plain"), step (folder.File "packed")
            Expect.floatClose { absolute = 1e-6; relative = 1e-5 } (b.GetProperty("loss").GetDouble()) (a.GetProperty("loss").GetDouble()) "the same loss"
            Expect.floatClose { absolute = 1e-6; relative = 1e-4 } (b.GetProperty("grad_norm").GetDouble()) (a.GetProperty("grad_norm").GetDouble()) "the same gradient norm"
            let bad = train (folder.File "bad") [ "--packing"; "--packing-attention"; "sideways" ]
            Expect.equal bad.ExitCode 2 "an unknown mode is refused"
            Expect.stringContains bad.Stderr "--packing-attention" "names the option"
            Expect.stringContains bad.Stderr "cross or isolated" "names the values"
        }
    ]

[<Tests>]
let tests = testList "isolated packing" [ dataTests; modelTests; benchTests; cliTests ]
