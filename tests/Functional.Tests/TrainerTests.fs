/// HF model folders in and out, and the training loop's bookkeeping (epochs, logging, step counts).
module Functional.Tests.TrainerTests

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

let private goldenModel family = Path.Combine(goldenDir (family + "-cosine"), "model")

let private parameters (model: CausalLm) =
    [ for struct (name, p) in model.Module.named_parameters () -> name, p.detach().clone() ]

let private expectSameParameters (a: CausalLm) (b: CausalLm) =
    let pa, pb = parameters a, parameters b
    Expect.sequenceEqual (List.map fst pa) (List.map fst pb) "same parameter names"
    for (name, x), (_, y) in List.zip pa pb do
        Expect.isTrue (x.Equals y) (sprintf "%s is bit-identical" name)

/// The config.json of a golden model with one field changed.
let private configWith (family: string) (key: string) (value: obj) =
    let node = Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(goldenModel family, "config.json"))).AsObject()
    node[key] <- Nodes.JsonValue.Create(value)
    node.ToJsonString()

let private checkpoints =
    testList "model folders" [
        for family in [ "gpt2"; "llama" ] do
            for tied in [ true; false ] do
                test (sprintf "%s (tied head: %b): export then import is exact" family tied) {
                    use folder = new TempFolder()
                    let config = ModelConfig.parse "test" (configWith family "tie_word_embeddings" tied)
                    let model = CausalLm.create config 3L
                    HfModelFolder.save (folder.File "m") model None []
                    let names = Safetensors.readHeader(folder.File "m/model.safetensors").Entries |> List.map (fun e -> e.Name)
                    Expect.equal (List.contains "lm_head.weight" names) (not tied) "lm_head.weight is written only when untied"
                    expectSameParameters model (HfModelFolder.load (folder.File "m") 99L)
                }
        test "a GPT-2 base-model checkpoint with attn.bias buffers loads like the LM-head names" {
            use folder = new TempFolder()
            let source = goldenModel "gpt2"
            let canonical = HfModelFolder.load source 1L
            Directory.CreateDirectory(folder.File "base") |> ignore
            File.Copy(Path.Combine(source, "config.json"), folder.File "base/config.json")
            let tensors =
                [ for name, t in parameters canonical -> name.Substring("transformer.".Length), t ]
                @ [ for i in 0..1 -> sprintf "h.%d.attn.bias" i, torch.ones(1L, 1L, 64L, 64L).tril() ]
            Safetensors.save (folder.File "base/model.safetensors") Map.empty tensors
            expectSameParameters canonical (HfModelFolder.load (folder.File "base") 1L)
        }
        test "the saved config keeps the source's extra keys" {
            use folder = new TempFolder()
            let source = File.ReadAllText(Path.Combine(goldenModel "gpt2", "config.json"))
            let model = HfModelFolder.load (goldenModel "gpt2") 1L
            HfModelFolder.save (folder.File "m") model (Some source) []
            let saved = JsonDocument.Parse(File.ReadAllText(folder.File "m/config.json")).RootElement
            Expect.equal (saved.GetProperty("eos_token_id").GetInt32()) 95 "eos_token_id survives"
            Expect.equal (saved.GetProperty("model_type").GetString()) "gpt2" "model_type"
        }
        test "saving over an existing model folder replaces it whole" {
            use folder = new TempFolder()
            let model = HfModelFolder.load (goldenModel "llama") 1L
            Directory.CreateDirectory(folder.File "m") |> ignore
            File.WriteAllText(folder.File "m/stale.txt", "old")
            HfModelFolder.save (folder.File "m") model None []
            Expect.isFalse (File.Exists(folder.File "m/stale.txt")) "old files are gone"
            Expect.sequenceEqual (Directory.GetDirectories folder.Path |> Array.map Path.GetFileName) [ "m" ] "no staging folder is left"
        }
    ]

let private run (options: TrainOptions) =
    let dir = goldenDir "llama-cosine"
    let model = HfModelFolder.load (Path.Combine(dir, "model")) 1L
    let data = loadTokenized (Path.Combine(dir, "data.jsonl"))
    let logs = ResizeArray<StepLog>()
    let plan = TrainingLoop.plan options data.Rows.Length
    let result = TrainingLoop.train plan model data None { OnLog = logs.Add; AfterStep = fun _ -> StepDecision.Continue }
    plan, result, List.ofSeq logs

/// 13 rows in micro-batches of 2 make 7 micro-batches per epoch; windows of 3 give 3 steps per epoch.
let private small =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 3
        MaxSeqLen = 32
        LearningRate = 1e-3
        Shuffle = false }

let private loop =
    testList "loop" [
        test "max steps past an epoch start the data again; epochs count micro-batches" {
            let _, result, logs = run { small with MaxSteps = 7 }
            Expect.equal result.Steps 7 "seven steps"
            Expect.equal (logs |> List.map (fun l -> l.Step)) [ 1..7 ] "every step logged"
            let epochs = logs |> List.map (fun l -> System.Math.Round(l.Epoch, 9))
            Expect.equal epochs ([ 3.0 / 7.0; 6.0 / 7.0; 1.0; 1.0 + 3.0 / 7.0; 1.0 + 6.0 / 7.0; 2.0; 2.0 + 3.0 / 7.0 ] |> List.map (fun e -> System.Math.Round(e, 9))) "epochs"
            // Row lengths 28 38 8 16 36 9 31 25 5 18 24 10 33, truncated to 32, predict one token less
            // each: micro-batches of 2 rows predict 58 22 39 54 21 32 31, windows of 3: 119 107 31.
            Expect.equal (logs |> List.map (fun l -> l.PredictedTokens)) [ 119L; 107L; 31L; 119L; 107L; 31L; 119L ] "each window's predicted tokens"
        }
        test "num_train_epochs decides the steps without max_steps, rounding up fractions" {
            let plan, _, _ = run { small with NumTrainEpochs = 2.0; LoggingSteps = 100 }
            Expect.equal plan.TotalSteps 6 "2 epochs of ceil(7/3) steps"
            Expect.equal (TrainingLoop.plan { small with NumTrainEpochs = 1.5 } 13).TotalSteps 5 "ceil(1.5 * 3)"
        }
        test "logging every n steps also logs the last step" {
            let _, _, logs = run { small with MaxSteps = 7; LoggingSteps = 3 }
            Expect.equal (logs |> List.map (fun l -> l.Step)) [ 3; 6; 7 ] "steps 3, 6 and the last"
        }
        test "warmup ratio is rounded up and the first update uses lr 0" {
            let plan, _, logs = run { small with MaxSteps = 7; WarmupRatio = 0.3; LrSchedulerType = SchedulerKind.Linear }
            Expect.equal plan.WarmupSteps 3 "ceil(7 * 0.3)"
            Expect.equal logs.Head.LearningRate 0.0 "first update at lr 0"
            Expect.floatClose Accuracy.high logs[3].LearningRate 1e-3 "full rate at the end of warmup"
        }
        test "sgd with momentum trains: the loss goes down" {
            let _, _, logs = run { small with Optimizer = OptimizerKind.Sgd; Momentum = 0.9; LearningRate = 0.5; MaxSteps = 12; LrSchedulerType = SchedulerKind.Constant }
            Expect.isLessThan (List.last logs).Loss logs.Head.Loss "last loss below first"
        }
    ]

[<Tests>]
let tests = testList "trainer" [ checkpoints; loop ]
