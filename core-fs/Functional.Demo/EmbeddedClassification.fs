namespace Functional.Training

open System
open System.IO
open System.Text.Json
open Functional
open Functional.Checkpoint
open Functional.Models
open Functional.Runtime
open Functional.Text

/// `functional train --task sequence-classification` with no data: a small LLaMA classifier learns the
/// sentiment of short synthetic reviews ("the film was not dull"), negation included, from scratch.
[<RequireQualifiedAccess>]
module EmbeddedClassification =

    let private subjects = [| "the film"; "the food"; "the hotel"; "the book"; "the service"; "the show"; "my day"; "the trip" |]
    let private positive = [| "great"; "good"; "lovely"; "superb"; "fine"; "fun"; "nice"; "bright" |]
    let private negative = [| "bad"; "awful"; "poor"; "dull"; "sad"; "rude"; "slow"; "grim" |]

    /// count reviews drawn from seed: a subject, "was" or "was not", a positive or negative word; the
    /// label is the sentence's sentiment ("positive" or "negative"), negation flipping the word's.
    let samples (seed: int) (count: int) : (string * string)[] =
        let rng = Random seed
        Array.init count (fun _ ->
            let good = rng.Next 2 = 0
            let negated = rng.Next 3 = 0
            let word = if good then positive[rng.Next positive.Length] else negative[rng.Next negative.Length]
            let text = sprintf "%s was %s%s" subjects[rng.Next subjects.Length] (if negated then "not " else "") word
            text, (if good <> negated then "positive" else "negative"))

    /// The model: LLaMA, 2 layers of width 64, tied embeddings, padding with the tokenizer's one special token.
    let private modelConfig (vocabSize: int) =
        sprintf
            """{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": %d, "hidden_size": 64,
                "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 32, "tie_word_embeddings": true, "pad_token_id": %d}"""
            vocabSize (vocabSize - 1)
        |> ModelConfig.parse "embedded classifier"

    let private write (path: string) (rows: (string * string)[]) =
        use writer = new StreamWriter(path)
        for text, label in rows do
            writer.WriteLine(JsonSerializer.Serialize(dict [ "text", text; "label", label ]))

    /// Trains the classifier into settings.OutputPath (staged as EmbeddedRun.run: data/, initial/, then the
    /// job's files and final/, a LlamaForSequenceClassification with id2label negative/positive). The
    /// evaluation lines report loss, accuracy and macro-F1 on held-out reviews. settings.TrainSamples and
    /// MaxSteps size the run (EmbeddedRun.defaults' are too large: callers pass 2,000 and 300).
    let run (settings: EmbeddedSettings) (cancellation: Threading.CancellationToken) (observer: FineTuneEvents) : FineTuneOutcome =
        if settings.MaxSteps < 1 then InvalidInput.setting "max_steps" "must be at least 1"
        let output = Path.GetFullPath settings.OutputPath
        if File.Exists output then InvalidInput.fail output "" "the output path is a file (expected a folder)"
        EmbeddedRun.staged output cancellation observer (fun staging ->
            let data = Directory.CreateDirectory(Path.Combine(staging, "data")).FullName
            let train = samples settings.Seed settings.TrainSamples
            let heldOut = samples (settings.Seed + 1) settings.EvalSamples
            write (Path.Combine(data, "train.jsonl")) train
            write (Path.Combine(data, "eval.jsonl")) heldOut
            observer.OnMessage(sprintf "task: sentiment of %d short reviews (%d held out), e.g. \"%s\" -> %s" train.Length heldOut.Length (fst train[0]) (snd train[0]))
            let initial, _, _ = EmbeddedRun.initialModel staging (Array.map fst train) 96 modelConfig settings.Seed cancellation
            let request =
                { FineTune.request initial (Path.Combine(data, "train.jsonl")) staging with
                    PublishedOutputPath = Some output
                    OverwriteOutputDir = true
                    Options =
                        { TrainOptions.defaults with
                            PerDeviceTrainBatchSize = 32
                            LearningRate = 2e-3
                            WeightDecay = 0.01
                            LrSchedulerType = SchedulerKind.Cosine
                            WarmupRatio = 0.05
                            MaxSteps = settings.MaxSteps
                            MaxSeqLen = 16
                            Seed = int64 settings.Seed
                            LoggingSteps = 10
                            EvalSteps = max 1 (settings.MaxSteps / 3)
                            PerDeviceEvalBatchSize = 100
                            SaveStrategy = IntervalStrategy.No
                            Threads = settings.Threads }
                    Data = { FineTune.defaultData with EvalDataPath = Some(Path.Combine(data, "eval.jsonl")) }
                    Task = TrainingTask.SequenceClassification { TextField = "text"; LabelField = "label"; NumLabels = None; PadTokenId = None }
                    Plot = Functional.Reporting.MetricsPlot.drawer }
            request)
