/// Sequence-classification and reward-model heads and tasks: HF's *ForSequenceClassification names,
/// pooling and config.json fields, the objectives, sklearn's metrics, the data readers' errors and the
/// jobs' evaluation lines.
module Functional.Tests.HeadsTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Training
open Functional.Tests.TestUtil

let private head (labels: string[]) (pad: int64 option) : ClassificationHead =
    { Labels = labels
      ProblemType = (if labels.Length = 1 then ProblemType.Regression else ProblemType.SingleLabel)
      ProblemTypeWritten = true
      PadTokenId = pad
      InitializerRange = 0.02 }

let private parse (json: string) = ModelConfig.parse "test" json

let private llamaJson (modelType: string) =
    sprintf """{"model_type": "%s", "vocab_size": 19, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": false}""" modelType

let private classifierOf (model: CausalLm) =
    match box model.Module with
    | :? SequenceClassifierHead as c -> c
    | _ -> failtest "not a classifier"

/// A folder holding a causal LM of the config (config.json + model.safetensors).
let private causalFolder (folder: string) (config: ModelConfig) =
    let lm = CausalLm.create config 7L
    HfModelFolder.save folder lm None []
    lm

let private writeLines (path: string) (lines: string list) = File.WriteAllLines(path, lines)

let private ids (values: int64[]) (rows: int64) =
    torch.tensor(values, ReadOnlySpan<int64>([| rows; int64 values.Length / rows |]))

let private expectInvalid (origin: string) (location: string) (parts: string list) (action: unit -> 'T) =
    expectInvalidInput origin location parts (fun () -> action () |> ignore)

let private llamaConfig = Llama { tinyLlama with PadTokenId = Some 0 }

/// A fine-tuning request of a task on pre-tokenized rows in folder (model/ a causal LLaMA, data.jsonl).
let private taskRequest (folder: TempFolder) (task: TrainingTask) (rows: string list) =
    causalFolder (folder.File "model") llamaConfig |> ignore
    writeLines (folder.File "data.jsonl") rows
    { FineTune.request (folder.File "model") (folder.File "data.jsonl") (folder.File "out") with
        Task = task
        Options = { TrainOptions.defaults with MaxSteps = 4; PerDeviceTrainBatchSize = 2; PerDeviceEvalBatchSize = 3; EvalSteps = 2; LearningRate = 1e-3 }
        Data = { FineTune.defaultData with Prompt = { PromptDataset.defaults with EvalSplitRatio = 0.3 } } }

let private classification = TrainingTask.SequenceClassification { TextField = "text"; LabelField = "label"; NumLabels = None; PadTokenId = None }
let private reward = TrainingTask.RewardModel { PromptField = "prompt"; ChosenField = "chosen"; RejectedField = "rejected"; PadTokenId = None }

let private idsRow (rng: Random) = String.Join(", ", Array.init (rng.Next(2, 9)) (fun _ -> rng.Next(1, 19)))

/// One small config.json per family (the golden cases' models), each with pad_token_id 0.
let private familyConfigs =
    [ "gpt2-cosine"; "llama-cosine"; "qwen2-linear"; "qwen3-cosine"; "mistral-cosine"; "opt-cosine"; "opt-pre-linear"; "bloom-cosine" ]
    |> List.map (fun case ->
        let path = Path.Combine(goldenDir case, "model", "config.json")
        let json = Nodes.JsonNode.Parse(File.ReadAllText path).AsObject()
        json["pad_token_id"] <- Nodes.JsonValue.Create 0
        case, ModelConfig.parse path (json.ToJsonString()))

/// Every family carries the classification head: HF's class name, its names (the causal LM's backbone
/// names + score.weight), pooling at the last non-pad token, and an exact save/load round trip.
let private classifierEveryFamily (case: string, config: ModelConfig) =
    test (sprintf "%s: a sequence classifier over the family's backbone saves and loads as HF's class" case) {
        use root = new TempFolder()
        let traits = ModelFamily.traits config
        let expectedClass = traits.Architecture.Replace("LMHeadModel", "ForSequenceClassification").Replace("ForCausalLM", "ForSequenceClassification")
        Expect.equal (SequenceClassification.architecture config) expectedClass "HF's *ForSequenceClassification class"
        let model = SequenceClassification.create config (head [| "a"; "b"; "c" |] (Some 0L)) 3L
        use _ = model.Module
        model.Module.eval ()
        let causal = CausalLm.create config 3L
        use _ = causal.Module
        let backboneNames = [ for struct (name, _) in causal.Module.named_parameters () do if not (name.StartsWith "lm_head.") then yield name ]
        let names = [ for struct (name, _) in model.Module.named_parameters () -> name ]
        Expect.equal (List.sort names) (List.sort ("score.weight" :: backboneNames)) "the causal LM's backbone names and score.weight"
        use _ = torch.no_grad ()
        // Row 0 right-padded with the pad id 0: it pools where the same row alone pools.
        use padded = torch.tensor([| 5L; 9L; 17L; 0L; 0L; 11L; 12L; 13L; 14L; 15L |]).view(2L, 5L)
        use alone = torch.tensor([| 5L; 9L; 17L |]).view(1L, 3L)
        use both = model.Module.forward padded
        use single = model.Module.forward alone
        Expect.sequenceEqual both.shape [| 2L; 3L |] "(batch, num_labels)"
        use first = both.narrow(0L, 0L, 1L)
        Expect.isLessThanOrEqual (maxAbsDiff first single) 1e-5 "a padded row scores as the row alone"
        let folder = root.File "model"
        HfModelFolder.save folder model None []
        use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "config.json")))
        let written = config.RootElement.GetProperty("architectures")
        Expect.equal (written[0].GetString()) expectedClass "config.json's architectures"
        Expect.equal (config.RootElement.GetProperty("id2label").GetProperty("2").GetString()) "c" "id2label"
        let back = HfModelFolder.load folder 99L
        use _ = back.Module
        back.Module.eval ()
        use again = back.Module.forward padded
        Expect.equal (maxAbsDiff again both) 0.0 "the loaded classifier scores bit for bit alike"
    }

/// `functional eval`'s core on a golden case's trained classifier folder, the task decided by the folder.
let private evalGoldenFinal (case: string) (expectedTask: string) (rows: float) (names: string list) =
    test (sprintf "Evaluate.run takes %s's trained folder as %s and reports its metrics" case expectedTask) {
        use root = new TempFolder()
        let dir = goldenDir case
        let request: EvalRequest =
            { ModelPath = Path.Combine(dir, "final")
              DataPath = Path.Combine(dir, "data.jsonl")
              OutputPath = Some(root.File "eval.json")
              Prompt = FineTune.defaultData.Prompt
              MaxSeqLen = 0
              TokenizerName = None
              BatchSize = 4
              Task = None }
        let report = Evaluate.run request
        Expect.equal report.Task expectedTask "the task the folder's config.json names"
        Expect.sequenceEqual (report.Metrics |> List.map fst) names "the metrics, in the names of the eval lines"
        let metrics = Map report.Metrics
        Expect.equal metrics["eval_samples"] rows "every row (or pair) of the file"
        Expect.isTrue (metrics["eval_loss"] > 0.0 && Double.IsFinite metrics["eval_loss"]) "a finite loss"
        Expect.isTrue (metrics["eval_accuracy"] >= 0.0 && metrics["eval_accuracy"] <= 1.0) "an accuracy"
        use written = JsonDocument.Parse(File.ReadAllText(root.File "eval.json"))
        Expect.equal (written.RootElement.GetProperty("eval_loss").GetDouble()) metrics["eval_loss"] "the file holds what was reported"
        let wrongTask = { request with Task = Some TrainingTask.CausalLm }
        expectInvalid (Path.Combine(dir, "final", "config.json")) "architectures" [ "sequence classifier" ] (fun () -> Evaluate.run wrongTask)
    }

[<Tests>]
let tests =
    testList "heads" [
        yield! [ for family in familyConfigs -> classifierEveryFamily family ]
        evalGoldenFinal "llama-classification" "sequence-classification" 13.0 [ "eval_loss"; "eval_accuracy"; "eval_macro_f1"; "eval_samples" ]
        evalGoldenFinal "llama-reward" "reward-model" 9.0 [ "eval_loss"; "eval_accuracy"; "eval_mean_margin"; "eval_samples" ]
        test "each family's classifier is HF's class name: GPT2ForSequenceClassification, LlamaForSequenceClassification, Qwen2's, Mistral's" {
            Expect.equal (SequenceClassification.architecture (Gpt2 tinyGpt2)) "GPT2ForSequenceClassification" "GPT-2"
            Expect.equal (SequenceClassification.architecture (parse (llamaJson "llama"))) "LlamaForSequenceClassification" "LLaMA"
            Expect.equal (SequenceClassification.architecture (parse (llamaJson "qwen2"))) "Qwen2ForSequenceClassification" "Qwen2"
            Expect.equal (SequenceClassification.architecture (parse (llamaJson "mistral"))) "MistralForSequenceClassification" "Mistral"
        }

        torchTest "the classifier's tensors are the backbone's under HF's prefix and score.weight (num_labels, width), no lm_head, score ~ normal(0, initializer_range)" (fun () ->
            for config, prefix in [ Gpt2 tinyGpt2, "transformer."; Llama tinyLlama, "model." ] do
                let model = SequenceClassification.create config { head [| "a"; "b"; "c" |] (Some 0L) with InitializerRange = 0.5 } 3L
                let names = CausalLm.parameterSpec model
                Expect.contains names ("score.weight", [| 3L; 16L |]) "score.weight"
                Expect.isFalse (names |> List.exists (fun (n, _) -> n.StartsWith "lm_head")) "no lm_head"
                for n, _ in names do
                    Expect.isTrue (n = "score.weight" || n.StartsWith prefix) (sprintf "%s under %s" n prefix)
                let std = (classifierOf model).Score.weight.std().item<float32> ()
                Expect.isTrue (std > 0.25f && std < 0.8f) (sprintf "score std %g near 0.5" std)
                Expect.isFalse (model.NoWeightDecay.Contains "score.weight") "score decays")

        torchTest "pooling takes the rightmost token whose id is not pad_token_id (HF's rule); without pad_token_id one row takes the last position and two are refused" (fun () ->
            let model = SequenceClassification.create (Llama tinyLlama) (head [| "a"; "b" |] (Some 0L)) 1L
            use batchIds = ids [| 5L; 6L; 0L; 0L; 7L; 0L; 8L; 0L; 0L; 0L; 0L; 0L |] 3L
            use positions = (classifierOf model).PooledPositions batchIds
            Expect.sequenceEqual (positions.data<int64>().ToArray()) [| 1L; 2L; 0L |] "positions"
            let unpadded = SequenceClassification.create (Llama tinyLlama) (head [| "a"; "b" |] None) 1L
            use one = ids [| 5L; 6L; 0L |] 1L
            use last = (classifierOf unpadded).PooledPositions one
            Expect.equal (last.data<int64>().ToArray()) [| 2L |] "last position"
            expectInvalid "config.json" "pad_token_id" [ "pad_token_id" ] (fun () -> unpadded.Module.forward batchIds))

        torchTest "a right-padded row's logits equal the row's alone (causal attention never sees the padding)" (fun () ->
            for config in [ Gpt2 tinyGpt2; Llama tinyLlama ] do
                let model = SequenceClassification.create config (head [| "a"; "b"; "c" |] (Some 0L)) 2L
                model.Module.eval ()
                use _ = torch.no_grad ()
                use batch = ids [| 3L; 4L; 5L; 6L; 7L; 8L; 0L; 0L |] 2L
                use alone = ids [| 7L; 8L |] 1L
                use both = model.Module.forward batch
                use single = model.Module.forward alone
                Expect.sequenceEqual both.shape [| 2L; 3L |] "(B, num_labels)"
                expectClose 1e-5 (both.narrow(0L, 1L, 1L)) single "padded row = row alone")

        torchTest "a causal-LM folder loads as a classifier (backbone copied, score new); saved, config.json is HF's and loads back as the same classifier" (fun () ->
            use folder = new TempFolder()
            let lm = causalFolder (folder.File "causal") (Llama tinyLlama)
            let model = HfModelFolder.loadClassifier (folder.File "causal") (head [| "neg"; "pos" |] (Some 0L)) 5L
            let lmParams = dict [ for struct (n, p) in lm.Module.named_parameters () -> n, p ]
            for struct (name, p) in model.Module.named_parameters () do
                if name <> "score.weight" then expectClose 0.0 p lmParams[name] (name + " copied")
            HfModelFolder.save (folder.File "cls") model None []
            use config = JsonDocument.Parse(File.ReadAllText(folder.File "cls/config.json"))
            let root = config.RootElement
            Expect.equal ((root.GetProperty "architectures").[0].GetString()) "LlamaForSequenceClassification" "architectures"
            Expect.equal (root.GetProperty("id2label").GetProperty("1").GetString()) "pos" "id2label keys are strings"
            Expect.equal (root.GetProperty("label2id").GetProperty("neg").GetInt32()) 0 "label2id"
            Expect.equal (root.GetProperty("problem_type").GetString()) "single_label_classification" "problem_type"
            Expect.equal (root.GetProperty("pad_token_id").GetInt64()) 0L "pad_token_id"
            let back = HfModelFolder.load (folder.File "cls") 9L
            Expect.equal (SequenceClassification.tryHead back |> Option.map (fun h -> List.ofArray h.Labels)) (Some [ "neg"; "pos" ]) "labels back"
            expectClose 0.0 (classifierOf back).Score.weight (classifierOf model).Score.weight "score loaded")

        test "config.json's head: id2label (string keys) decides num_labels, num_labels without it, multi_label_classification refused" {
            let h = SequenceClassification.readHead "c.json" """{"id2label": {"1": "b", "0": "a"}, "pad_token_id": 3}"""
            Expect.equal (List.ofArray h.Labels) [ "a"; "b" ] "sorted by id"
            Expect.equal h.PadTokenId (Some 3L) "pad"
            Expect.equal (SequenceClassification.readHead "c.json" """{"num_labels": 1}""").ProblemType ProblemType.Regression "one label regresses"
            Expect.equal (SequenceClassification.readHead "c.json" "{}").NumLabels 2 "HF's default of 2"
            expectInvalid "c.json" "problem_type" [ "multi_label_classification" ] (fun () -> SequenceClassification.readHead "c.json" """{"problem_type": "multi_label_classification"}""")
        }

        test "accuracy and macro-F1 follow sklearn: the mean over labels in truth or predictions, 0 for a label never predicted right" {
            Expect.floatClose Accuracy.veryHigh (ClassificationMetrics.macroF1 [| 0; 1; 2; 0; 1; 2 |] [| 0; 2; 1; 0; 0; 1 |]) (0.8 / 3.0) "sklearn docs example"
            Expect.floatClose Accuracy.veryHigh (ClassificationMetrics.accuracy [| 0; 1; 2; 0; 1; 2 |] [| 0; 2; 1; 0; 0; 1 |]) (2.0 / 6.0) "accuracy"
            Expect.floatClose Accuracy.veryHigh (ClassificationMetrics.macroF1 [| 0; 0 |] [| 0; 1 |]) (1.0 / 3.0) "a label only predicted counts"
            Expect.floatClose Accuracy.veryHigh (ClassificationMetrics.macroF1 [| 1; 1 |] [| 1; 1 |]) 1.0 "perfect"
        }

        torchTest "the reward objective is -log sigmoid(r_chosen - r_rejected) summed over pairs, counted in pairs" (fun () ->
            let h = head [| "LABEL_0" |] (Some 0L)
            let model = SequenceClassification.create (Llama tinyLlama) h 4L
            let dataset = TaskData.pairDataset "p.jsonl" (Functional.Text.TextTokenizer.absent "p" "none") 8 [| for i in 1 .. 3 -> { Line = i; Prompt = ""; Chosen = ""; Rejected = ""; Ids = Some([| 1L; 2L; int64 i |], [| 3L + int64 i |]) } |]
            let objective = Objective.reward h
            use batch = objective.Collate 8 0L dataset [| 0; 1; 2 |]
            Expect.equal (objective.Count batch) 3L "pairs"
            use loss = objective.LossSum model batch
            use c = model.Module.forward (ids [| 1L; 2L; 1L; 1L; 2L; 2L; 1L; 2L; 3L |] 3L)
            use r = model.Module.forward (ids [| 4L; 5L; 6L |] 3L)
            use expected = torch.nn.functional.logsigmoid(c - r).sum().neg()
            Expect.floatClose Accuracy.medium (float (loss.item<float32> ())) (float (expected.item<float32> ())) "loss (float32 sums of another order)")

        test "labels: sorted distinct names of the training rows (run_glue), config's id2label when it names them, ids with --num-labels" {
            let rows (labels: RawLabel list) = [| for i, l in List.indexed labels -> { Line = i + 1; Text = "t"; Ids = None; Label = l } |]
            let plain = head [| "LABEL_0"; "LABEL_1" |] None
            let labels, _ = TaskJob.labelsFor "c.json" plain false None (rows [ RawLabel.Text "pos"; RawLabel.Text "neg"; RawLabel.Text "mid"; RawLabel.Text "pos" ])
            Expect.equal (List.ofArray labels) [ "mid"; "neg"; "pos" ] "sorted distinct"
            let labels, _ = TaskJob.labelsFor "c.json" (head [| "bad"; "good" |] None) false None (rows [ RawLabel.Text "good" ])
            Expect.equal (List.ofArray labels) [ "bad"; "good" ] "config names"
            let labels, _ = TaskJob.labelsFor "c.json" plain false (Some 5) (rows [ RawLabel.Number 1.0 ])
            Expect.equal labels.Length 5 "num_labels"
            let _, problem = TaskJob.labelsFor "c.json" plain false None (rows [ RawLabel.Number 0.5 ])
            Expect.equal problem ProblemType.Regression "real targets regress"
        }

        test "bad rows name the file, line and field: unknown label, id out of range, missing field, a pair without rejected" {
            use folder = new TempFolder()
            let file = folder.File "d.jsonl"
            let h = head [| "neg"; "pos" |] None
            writeLines file [ """{"text": "a", "label": "pos"}"""; """{"text": "b", "label": "meh"}""" ]
            let records = TaskData.readLabeled file "text" "label"
            expectInvalid file "2: label" [ "unknown label \"meh\""; "\"neg\", \"pos\"" ] (fun () -> TaskJob.targets h file "label" records)
            writeLines file [ """{"text": "a", "label": 2}""" ]
            expectInvalid file "1: label" [ "out of range"; "0 .. 1" ] (fun () -> TaskJob.targets h file "label" (TaskData.readLabeled file "text" "label"))
            writeLines file [ """{"text": "a", "label": 1}"""; """{"sentence": "a", "label": 1}""" ]
            expectInvalid file "2: text" [ "missing" ] (fun () -> TaskData.readLabeled file "text" "label")
            writeLines file [ """{"prompt": "p", "chosen": "a", "rejected": "b"}"""; """{"prompt": "p", "chosen": "a"}""" ]
            expectInvalid file "2: rejected" [ "missing" ] (fun () -> TaskData.readPairs file "prompt" "chosen" "rejected")
        }

        test "CSV rows: a header, quoted fields with commas, quotes and line breaks, the line each row starts on" {
            use folder = new TempFolder()
            let file = folder.File "d.csv"
            File.WriteAllText(file, "text,label\n\"hello, world\",pos\n\"say \"\"hi\"\"\nthere\",neg\nplain,1\n")
            let records = TaskData.readLabeled file "text" "label"
            Expect.equal [ for r in records -> r.Line, r.Text ] [ 2, "hello, world"; 3, "say \"hi\"\nthere"; 5, "plain" ] "rows"
            Expect.equal records[2].Label (RawLabel.Text "1") "CSV labels are text"
            File.WriteAllText(file, "text,label\nonly\n")
            expectInvalid file "2" [ "expected 2 fields" ] (fun () -> TaskData.readLabeled file "text" "label")
        }

        torchTest "a classification job logs eval_loss, eval_accuracy and eval_macro_f1 (no perplexity) and writes a LlamaForSequenceClassification" (fun () ->
            use folder = new TempFolder()
            let rng = Random 3
            let rows = [ for i in 1 .. 10 -> sprintf """{"input_ids": [%s], "label": "%s"}""" (idsRow rng) (if i % 3 = 0 then "b" else "a") ]
            let result = FineTune.run (taskRequest folder classification rows) ignore
            let evals = readJsonLines result.MetricsPath |> Array.filter (fun l -> fst (l.TryGetProperty "eval_loss") && fst (l.TryGetProperty "step") && not (fst (l.TryGetProperty "train_loss")))
            Expect.isGreaterThanOrEqual evals.Length 2 "evaluations before and during training"
            for e in evals do
                Expect.isTrue (fst (e.TryGetProperty "eval_accuracy") && fst (e.TryGetProperty "eval_macro_f1")) "accuracy and macro-F1"
                Expect.isFalse (fst (e.TryGetProperty "eval_perplexity")) "no perplexity"
            Expect.isSome result.After "closing evaluation"
            Expect.equal (result.After.Value.Eval.Metrics |> List.map fst) [ "accuracy"; "macro_f1" ] "metrics"
            use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(result.FinalModelPath, "config.json")))
            Expect.equal ((config.RootElement.GetProperty "architectures").[0].GetString()) "LlamaForSequenceClassification" "architecture"
            Expect.equal (config.RootElement.GetProperty("id2label").GetProperty("1").GetString()) "b" "labels from the data"
            let again = TaskJob.evaluateClassificationFile result.FinalModelPath (folder.File "data.jsonl") { TextField = "text"; LabelField = "label"; NumLabels = None; PadTokenId = None } 4 0 (Functional.Text.TextTokenizer.absent result.FinalModelPath "pre-tokenized rows only")
            Expect.equal again.Tokens 10L "every row evaluated"
            Expect.equal (again.Metrics |> List.map fst) [ "accuracy"; "macro_f1" ] "functional eval's metrics")

        testProperty "DeepSpeed-Chat's phases partition the shuffled rows; phase 1 is splitIndices" (fun (size: uint8) (a: uint8) (b: uint8) (c: uint8) (seed: int) ->
            let n = int size
            let split = sprintf "%d,%d,%d" (int a + 1) (int b) (int c)
            let phases = [ for phase in 0 .. 2 -> PromptDataset.phaseIndices split phase (int64 seed) n ]
            phases[0] = PromptDataset.splitIndices split (int64 seed) n
            && (Array.concat phases |> Array.sort) = Array.init n id)

        torchTest "a reward job with a data split trains on DeepSpeed-Chat's second share; classification refuses a split" (fun () ->
            use folder = new TempFolder()
            let rng = Random 5
            let rows = [ for _ in 1 .. 20 -> sprintf """{"input_ids_chosen": [%s], "input_ids_rejected": [%s]}""" (idsRow rng) (idsRow rng) ]
            let request = taskRequest folder reward rows
            let split = { request.Data.Prompt with DataSplit = Some "2,4,4" }
            let events = { OnStep = ignore; OnEvaluation = (fun _ _ -> ()); OnMessage = ignore }
            let job = Job.prepare { request with Data = { request.Data with Prompt = split } } events
            use _ = job.Model.Module
            let share = PromptDataset.phaseIndices "2,4,4" 1 request.Options.Seed 20
            let held = job.Data.Eval |> Option.map (fun e -> e.Rows.Length) |> Option.defaultValue 0
            Expect.equal (job.Data.Train.Rows.Length + held) share.Length "the second share's pairs (training and held out)"
            Expect.isTrue (share.Length > 0 && share.Length < 20) "a share, not every pair"
            let labelled = [ for i in 1 .. 6 -> sprintf """{"input_ids": [%s], "label": %d}""" (idsRow rng) (i % 2) ]
            use other = new TempFolder()
            let cls = taskRequest other classification labelled
            expectInvalidInput "--data-split" "" [ "three phases"; "--task reward-model" ] (fun () ->
                Job.prepare { cls with Data = { cls.Data with Prompt = { cls.Data.Prompt with DataSplit = Some "2,4,4" } } } events |> ignore))

        torchTest "a reward job logs eval_loss, eval_accuracy and eval_mean_margin and writes a one-label classifier" (fun () ->
            use folder = new TempFolder()
            let rng = Random 4
            let rows = [ for _ in 1 .. 8 -> sprintf """{"input_ids_chosen": [%s], "input_ids_rejected": [%s]}""" (idsRow rng) (idsRow rng) ]
            let result = FineTune.run (taskRequest folder reward rows) ignore
            Expect.equal (result.After.Value.Eval.Metrics |> List.map fst) [ "accuracy"; "mean_margin" ] "metrics"
            let lines = File.ReadAllText result.MetricsPath
            Expect.stringContains lines "eval_mean_margin" "logged"
            use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(result.FinalModelPath, "config.json")))
            Expect.equal (config.RootElement.GetProperty("id2label").EnumerateObject() |> Seq.length) 1 "one label")

        torchTest "LoRA on a classifier writes PEFT's SEQ_CLS adapter: task_type SEQ_CLS, modules_to_save [score], the trained score under base_model.model.score.weight; it loads back" (fun () ->
            use folder = new TempFolder()
            let rng = Random 5
            let rows = [ for i in 1 .. 8 -> sprintf """{"input_ids": [%s], "label": %d}""" (idsRow rng) (i % 2) ]
            let lora =
                { Config = { R = 2; Alpha = 4.0; Dropout = 0.0; TargetModules = [ "q_proj"; "v_proj" ]; ModuleNameSubstring = None }
                  OnlyOptimizeLora = true
                  LearningRate = None
                  AdapterPath = None }
            let request = { taskRequest folder classification rows with Lora = Some lora }
            let result = FineTune.run request ignore
            use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(result.FinalModelPath, "adapter_config.json")))
            Expect.equal (config.RootElement.GetProperty("task_type").GetString()) "SEQ_CLS" "task_type"
            Expect.equal [ for m in config.RootElement.GetProperty("modules_to_save").EnumerateArray() -> m.GetString() ] [ "score" ] "modules_to_save"
            let saved = Safetensors.load (Path.Combine(result.FinalModelPath, "adapter_model.safetensors"))
            Expect.isTrue (saved.ContainsKey Functional.Peft.Lora.ScoreKey) "score saved under PEFT's name"
            let fresh = HfModelFolder.loadClassifier (folder.File "model") (head [| "LABEL_0"; "LABEL_1" |] (Some 0L)) request.Options.Seed
            let initial = (classifierOf fresh).Score.weight.clone ()
            Expect.isGreaterThan (maxAbsDiff saved[Functional.Peft.Lora.ScoreKey] initial) 0.0 "the score trained"
            let adapters = Functional.Peft.Lora.load result.FinalModelPath fresh
            expectClose 0.0 (classifierOf fresh).Score.weight saved[Functional.Peft.Lora.ScoreKey] "score loaded back"
            Expect.equal (Functional.Peft.Lora.parameters adapters).Length 8 "two adapters per layer, A and B"
            saved |> Map.iter (fun _ t -> t.Dispose()))

        torchTest "a classification job trains under bf16 (the compute copy is a classifier too)" (fun () ->
            use folder = new TempFolder()
            let rng = Random 6
            let rows = [ for i in 1 .. 8 -> sprintf """{"input_ids": [%s], "label": %d}""" (idsRow rng) (i % 2) ]
            let request = taskRequest folder classification rows
            let result = FineTune.run { request with Options = { request.Options with Precision = Precision.Bf16 } } ignore
            Expect.isTrue (Double.IsFinite result.FinalLoss) "finite loss")

        torchTest "a classification run resumed from its checkpoint ends with the same weights (the checkpoint holds the classifier and its config)" (fun () ->
            use folder = new TempFolder()
            let rng = Random 7
            let rows = [ for i in 1 .. 9 -> sprintf """{"input_ids": [%s], "label": "%s"}""" (idsRow rng) (if i % 3 = 0 then "x" else "y") ]
            let request = taskRequest folder classification rows
            let request = { request with Options = { request.Options with SaveSteps = 2; GradientAccumulationSteps = 2 } }
            let full = FineTune.run request ignore
            let resumed = folder.File "resumed"
            copyFolder (Path.Combine(request.OutputPath, "checkpoint-2")) (Path.Combine(resumed, "checkpoint-2"))
            let again = FineTune.run { request with OutputPath = resumed; ResumeFromCheckpoint = Some "latest" } ignore
            Expect.equal again.StartStep 2 "resumed at step 2"
            Expect.sequenceEqual (File.ReadAllBytes(Path.Combine(again.FinalModelPath, "model.safetensors"))) (File.ReadAllBytes(Path.Combine(full.FinalModelPath, "model.safetensors"))) "same final weights"
            Expect.stringContains (File.ReadAllText(Path.Combine(request.OutputPath, "checkpoint-2", "config.json"))) "LlamaForSequenceClassification" "checkpoint config")

        torchTest "batches of more than one row without pad_token_id are refused naming config.json's pad_token_id; a classifier is refused as a causal LM" (fun () ->
            use folder = new TempFolder()
            causalFolder (folder.File "model") (Llama tinyLlama) |> ignore
            writeLines (folder.File "data.jsonl") [ """{"input_ids": [1, 2], "label": 0}"""; """{"input_ids": [3], "label": 1}""" ]
            let request =
                { FineTune.request (folder.File "model") (folder.File "data.jsonl") (folder.File "out") with
                    Task = classification
                    Options = { TrainOptions.defaults with MaxSteps = 1; PerDeviceTrainBatchSize = 2 } }
            expectInvalid (Path.Combine(folder.File "model", "config.json")) "pad_token_id" [ "--pad-token-id" ] (fun () -> FineTune.run request ignore)
            let classifier = SequenceClassification.create (Llama tinyLlama) (head [| "a"; "b" |] (Some 0L)) 1L
            HfModelFolder.save (folder.File "cls") classifier None []
            expectInvalid (Path.Combine(folder.File "cls", "config.json")) "architectures" [ "--task" ]
                (fun () -> FineTune.run { request with ModelPath = folder.File "cls"; Task = TrainingTask.CausalLm } ignore))
    ]

/// A small LLaMA folder with a byte-level BPE tokenizer and a CSV of short texts labelled by their first word.
type private TextScratch() =
    let root = new TempFolder()
    let texts = [ for i in 0 .. 23 -> (if i % 2 = 0 then "good " else "bad ") + String('x', 1 + i % 5) ]
    do
        let model = root.File "model"
        Functional.Text.BpeTraining.trainToFolder texts 20 model
        let vocab = (Functional.Text.Tokenizers.fromFolder model).VocabSize
        let config =
            sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": true, "pad_token_id": 0}""" vocab
        let lm = CausalLm.create (ModelConfig.parse "test" config) 1L
        let weights = root.File "weights"
        HfModelFolder.save weights lm None []
        for f in Directory.GetFiles weights do File.Copy(f, Path.Combine(model, Path.GetFileName f))
        File.WriteAllLines(root.File "data.csv", "sentence,sentiment" :: [ for t in texts -> sprintf "%s,%s" t (if t.StartsWith "good" then "positive" else "negative") ])
    member _.Model = root.File "model"
    member _.Data = root.File "data.csv"
    member _.File name = root.File name
    interface IDisposable with
        member _.Dispose() = (root :> IDisposable).Dispose()

[<Tests>]
let cliTests =
    testList "heads cli" [
        test "functional generate on a classifier folder is refused naming config.json's architectures; functional eval measures it" {
            use folder = new TempFolder()
            let model = folder.File "classifier"
            copyFolder (Path.Combine(goldenDir "llama-classification", "final")) model
            for f in Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "golden", "tokenization", "gpt2")) do
                File.Copy(f, Path.Combine(model, Path.GetFileName f))
            let run = runCli [ "generate"; "--model"; model; "--prompt"; "hi" ]
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "config.json:architectures: is LlamaForSequenceClassification, a sequence classifier" "names the file, field and class"
            let data = Path.Combine(goldenDir "llama-classification", "data.jsonl")
            let eval = runCli [ "eval"; "--model"; model; "--data"; data; "--output"; folder.File "eval.json" ]
            Expect.equal eval.ExitCode 0 eval.Stderr
            Expect.stringContains eval.Stdout "\"eval_macro_f1\"" "a classifier's metrics"
        }
        test "functional train --task sequence-classification without data: the embedded sentiment demo trains and writes a classifier" {
            use folder = new TempFolder()
            let run = runCli [ "train"; "--task"; "sequence-classification"; "--output"; folder.File "demo"; "--max-steps"; "12"; "--threads"; "1" ]
            Expect.equal run.ExitCode 0 (sprintf "exit 0 (stderr: %s)" run.Stderr)
            Expect.stringContains run.Stdout "accuracy" "reports accuracy"
            Expect.stringContains (File.ReadAllText(folder.File "demo/final/config.json")) "\"positive\"" "labels from the data"
            let refused = runCli [ "train"; "--task"; "sequence-classification"; "--output"; folder.File "demo2"; "--learning-rate"; "1" ]
            Expect.equal refused.ExitCode 2 "other options refused"
        }

        test "functional train --task sequence-classification on a CSV: exit 0, eval_accuracy logged, final/ a classifier; an unknown label names file:line" {
            use s = new TextScratch()
            let evalFile = s.File "eval.csv"
            File.WriteAllLines(evalFile, [ "sentence,sentiment"; "good xx,positive"; "bad x,negative" ])
            let args output =
                [ "train"; "--task"; "sequence-classification"; "--model"; s.Model; "--data"; s.Data; "--eval-data"; evalFile
                  "--output"; output; "--text-field"; "sentence"; "--label-field"; "sentiment"; "--max-steps"; "6"
                  "--eval-steps"; "3"; "--per-device-train-batch-size"; "4"; "--learning-rate"; "1e-3"; "--threads"; "1" ]
            let run = runCli (args (s.File "out"))
            Expect.equal run.ExitCode 0 (sprintf "exit 0 (stderr: %s)" run.Stderr)
            Expect.stringContains (File.ReadAllText(s.File "out/metrics.jsonl")) "eval_accuracy" "eval lines"
            Expect.stringContains (File.ReadAllText(s.File "out/final/config.json")) "LlamaForSequenceClassification" "architecture"
            File.AppendAllLines(evalFile, [ "good x,happy" ])
            let bad = runCli (args (s.File "out2"))
            Expect.equal bad.ExitCode 2 (sprintf "exit 2 (stderr: %s)" bad.Stderr)
            Expect.stringContains bad.Stderr (evalFile + ":4") "names file and line"
            Expect.stringContains bad.Stderr "happy" "names the label"
        }
    ]
