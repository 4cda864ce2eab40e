(**
# LoRA fine-tuning and generation

A small LLaMA learns the embedded task (reverse or sort a few letters, in DeepSpeed-Chat's
`" Human: ... Assistant:"` style) in two stages: a short full fine-tuning, then LoRA adapters on the
attention and MLP projections with the base model frozen. Greedy generation shows what the model answers
before and after the adapters; the adapter is saved in PEFT's format and finally merged into the base
weights.

Everything comes from the library: the task's samples, a byte-level BPE tokenizer trained on them, the
model, the trainer and the generator. It takes about a minute on 2 cores.
*)
#load "references.fsx"

open System
open System.IO
open System.Text.Json
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Generation
open Functional.Models
open Functional.Peft
open Functional.Text
open Functional.Training
open References

let output = Repository.output "lora-and-generation"
let folder (name: string) = Directory.CreateDirectory(Path.Combine(output, name)).FullName

(**
## Data and tokenizer

The task's samples are deterministic from a seed; the held-out set never shares a letter sequence with
the training set. Both are written as DeepSpeed-Chat JSON Lines (`prompt`, `chosen`). A byte-level BPE
tokenizer with 64 merges, learned from the training text, makes every word of the task one token.
*)
let train = EmbeddedTask.samples 42 4000 false
let heldOut = EmbeddedTask.samples 43 40 true

let writeJsonLines (path: string) (samples: TaskSample[]) =
    samples
    |> Array.map (fun s -> JsonSerializer.Serialize(dict [ "prompt", s.Prompt; "chosen", s.Answer ]))
    |> fun lines -> File.WriteAllLines(path, lines)
    path

let trainPath = writeJsonLines (Path.Combine(output, "train.jsonl")) train
let evalPath = writeJsonLines (Path.Combine(output, "eval.jsonl")) heldOut

let tokenizerFolder = folder "tokenizer"
BpeTraining.trainToFolder [ for s in train -> s.Prompt + s.Answer ] EmbeddedRun.Merges tokenizerFolder
let tokenizer = Tokenizers.fromFolder tokenizerFolder

printfn "%d training samples, e.g.%s ->%s" train.Length train[0].Prompt train[0].Answer
printfn "vocabulary: %d tokens; \"%s\" -> %A" tokenizer.VocabSize heldOut[0].Prompt (tokenizer.Encode heldOut[0].Prompt)

(**
## A small LLaMA

The embedded run's architecture (4 layers of width 128, grouped-query attention, tied embeddings),
freshly initialized and saved as a Hugging Face folder together with its tokenizer.
*)
let initial = folder "initial"
let untrained = CausalLm.create (EmbeddedRun.modelConfig tokenizer.VocabSize) 42L
HfModelFolder.save initial untrained None (List.ofArray (Directory.GetFiles tokenizerFolder))

(**
## Greedy answers

Four held-out prompts, answered greedily (at most 8 new tokens, stopping at the end-of-text token),
next to the expected answers.
*)
let prompts = heldOut |> Array.truncate 4

let answer (model: CausalLm) =
    let generated =
        Generator.generateText model tokenizer [ for s in prompts -> s.Prompt ] { GenerationOptions.defaults with MaxNewTokens = 8 }
    for s, text in Seq.zip prompts generated do
        printfn "  %-40s expected%-13s got%s" s.Prompt s.Answer text

let exactMatch (model: CausalLm) =
    let samples = heldOut |> Array.mapi (fun i s -> { Sample.Prompt = s.Prompt; Answer = s.Answer; Line = i + 1 })
    FineTune.exactMatch model tokenizer samples samples.Length 8
    |> Option.defaultValue 0.0

printfn "untrained model:"
answer untrained

(**
## Stage 1: full fine-tuning

A short run over every weight: 250 optimizer steps of 16 rows, the loss on the answers only, a cosine
schedule with warmup.
*)
let stage (name: string) (modelPath: string) (lora: LoraSettings option) (options: TrainOptions) =
    let request =
        { FineTune.request modelPath trainPath (folder name) with
            OverwriteOutputDir = true
            Options = options
            Data = { FineTune.defaultData with Prompt = { FineTune.defaultData.Prompt with TrainOn = TrainOn.Completion } }
            Lora = lora }
    let result = FineTune.run request (fun log -> if log.Step % 50 = 0 then printfn "  step %d/%d  loss %.4f" log.Step log.TotalSteps log.Loss)
    printfn "%s: %d steps in %.1f s, final loss %.4f" name result.Steps result.TrainRuntime result.FinalLoss
    result

let fullOptions =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 16
        LearningRate = 3e-3
        WeightDecay = 0.01
        LrSchedulerType = SchedulerKind.Cosine
        WarmupRatio = 0.1
        MaxSteps = 250
        MaxSeqLen = 32 }

let full = stage "full" initial None fullOptions
let baseModel = HfModelFolder.load full.FinalModelPath 42L

printfn "after full fine-tuning (exact match %.0f%%):" (100.0 * exactMatch baseModel)
answer baseModel

(**
## Stage 2: LoRA

Rank-8 adapters (alpha 16) on the query and value projections of every layer (PEFT's default for LLaMA); the base weights stay frozen, only
the adapters train (DeepSpeed-Chat's `--only_optimize_lora`), with their own learning rate.
*)
let lora =
    { Config =
        { R = 8
          Alpha = 16.0
          Dropout = 0.0
          TargetModules = [ "q_proj"; "v_proj" ]
          ModuleNameSubstring = None }
      OnlyOptimizeLora = true
      LearningRate = Some 1e-2
      AdapterPath = None }

let adapted = stage "lora" full.FinalModelPath (Some lora) { fullOptions with MaxSteps = 100; WeightDecay = 0.0; Seed = 7L }

(**
## The adapter

A LoRA run writes only the adapter to `final/`, in PEFT's format: `adapter_config.json` and
`adapter_model.safetensors` with PEFT's tensor names. Loading it onto the base model attaches the adapters
again (as forward hooks); the model then answers as the trained one.
*)
for file in Directory.GetFiles adapted.FinalModelPath |> Array.sort do
    printfn "  %-28s %8d bytes" (Path.GetFileName file) (FileInfo(file).Length)

printfn "%s" (File.ReadAllText(Path.Combine(adapted.FinalModelPath, Lora.ConfigFileName)))

let withAdapter = HfModelFolder.load full.FinalModelPath 42L
let adapters = Lora.load adapted.FinalModelPath withAdapter

printfn "%d adapters, %d adapter parameters, for example:" adapters.Adapters.Length (Lora.parameters adapters |> List.sumBy (fun (_, p) -> p.numel ()))
for name, p in Lora.parameters adapters |> List.truncate 2 do
    printfn "  %s %A" name p.shape

printfn "base model + adapter (exact match %.0f%%):" (100.0 * exactMatch withAdapter)
answer withAdapter

(**
## Merge

`Lora.merge` folds each adapter into its projection's weight (W += alpha / r * B A) and removes the hooks:
the result is a plain model that answers the same, saved as a Hugging Face folder.
*)
Lora.merge adapters
let mergedPath = folder "merged"
HfModelFolder.save mergedPath withAdapter None (List.ofArray (Directory.GetFiles tokenizerFolder))

let merged = HfModelFolder.load mergedPath 42L
printfn "merged model in %s (exact match %.0f%%):" mergedPath (100.0 * exactMatch merged)
answer merged
