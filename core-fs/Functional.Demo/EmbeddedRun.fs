namespace Functional.Training

open System
open System.IO
open System.Text.Json
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Runtime
open Functional.Text

/// The embedded default run's knobs.
[<NoComparison>]
type EmbeddedSettings =
    { /// Where the finished run lands (default runs/embedded); a previous run there is replaced only
      /// when the new one has finished.
      OutputPath: string
      /// Seeds the task, the model and the data order (default 42).
      Seed: int
      /// Training samples (default 20,000).
      TrainSamples: int
      /// Held-out samples: evaluation loss and exact match (default 200).
      EvalSamples: int
      /// Optimizer steps (default 1,000: micro-batches of 16, accumulated in pairs).
      MaxSteps: int
      /// Intra-op threads; 0 adapts to the cores other programs leave free (Functional.Runtime.ThreadBudget).
      Threads: int }

/// `functional train` with no arguments: a small LLaMA-style model learns the embedded task
/// (EmbeddedTask: reverse or sort letters) from scratch, with a byte-level BPE tokenizer trained on the
/// task's text and loaded through Microsoft.ML.Tokenizers, gradient accumulation, a cosine schedule with
/// warmup and evaluation; it reports perplexity and held-out exact match before and after.
[<RequireQualifiedAccess>]
module EmbeddedRun =

    /// The default settings.
    let defaults =
        { OutputPath = Path.Combine("runs", "embedded")
          Seed = 42
          TrainSamples = 20000
          EvalSamples = 200
          MaxSteps = 1000
          Threads = 0 }

    /// BPE merges learned from the task's text: enough for every word of the task to become one token.
    [<Literal>]
    let Merges = 64

    /// The model: LLaMA with grouped-query attention (4 query heads share 2 key/value heads), tied
    /// embeddings, 4 layers of width 128.
    let modelConfig (vocabSize: int) =
        sprintf
            """{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": %d, "hidden_size": 128,
                "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true}"""
            vocabSize
        |> ModelConfig.parse "embedded model"

    /// The training options of the run.
    let trainOptions (settings: EmbeddedSettings) =
        { TrainOptions.defaults with
            PerDeviceTrainBatchSize = 16
            GradientAccumulationSteps = 2
            LearningRate = 3e-3
            WeightDecay = 0.01
            AdamBeta2 = 0.98
            LrSchedulerType = SchedulerKind.Cosine
            WarmupRatio = 0.05
            MaxSteps = settings.MaxSteps
            MaxSeqLen = 48
            Seed = int64 settings.Seed
            LoggingSteps = 10
            EvalSteps = 200
            PerDeviceEvalBatchSize = 50
            SaveSteps = 500
            SaveTotalLimit = Some 1
            Threads = settings.Threads }

    let private writeSamples (path: string) (samples: TaskSample[]) =
        use writer = new StreamWriter(path)
        for s in samples do
            writer.WriteLine(JsonSerializer.Serialize(dict [ "prompt", s.Prompt; "chosen", s.Answer ]))

    let private validate (settings: EmbeddedSettings) =
        if settings.TrainSamples < 100 then InvalidInput.setting "train_samples" "must be at least 100"
        if settings.EvalSamples < 1 then InvalidInput.setting "eval_samples" "must be at least 1"
        if settings.MaxSteps < 1 then InvalidInput.setting "max_steps" "must be at least 1"
        if settings.Threads < 0 then InvalidInput.setting "threads" "must be >= 0"
        if File.Exists settings.OutputPath then InvalidInput.fail settings.OutputPath "" "the output path is a file (expected a folder)"

    /// Runs an embedded job staged beside output (StagedFolder): prepare writes the job's inputs into the
    /// staging folder and returns its fine-tuning request (output the staging folder, published at
    /// output); the job's files then replace output only when it finished. Interrupted (the result says
    /// so) or failing, the staging folder is removed and output is left as it was. The result's paths
    /// point into output.
    let staged
        (output: string) (cancellation: Threading.CancellationToken) (observer: FineTuneEvents) (prepare: string -> FineTuneRequest)
        : FineTuneOutcome =
        let staging = StagedFolder.create output
        try
            let request = prepare staging
            let result = FineTune.runObserved request cancellation observer
            if result.Interrupted then
                StagedFolder.discard staging
                result
            else
                StagedFolder.commit staging output
                let relocate (path: string) = Path.Combine(output, Path.GetRelativePath(staging, path))
                { result with
                    MetricsPath = relocate result.MetricsPath
                    FinalModelPath = relocate result.FinalModelPath
                    PlotPath = relocate result.PlotPath
                    Checkpoints = result.Checkpoints |> List.map relocate
                    BestCheckpoint = result.BestCheckpoint |> Option.map relocate }
        with _ ->
            StagedFolder.discard staging
            reraise ()

    /// The untrained model of an embedded job: a byte-level BPE with the given merges trained on texts
    /// (in staging/tokenizer, removed afterwards), the model of config (of the tokenizer's vocabulary size)
    /// created from seed and saved with the tokenizer's files as staging/initial. Raises
    /// OperationCanceledException when cancelled by then. Returns initial's path, the tokenizer and the model.
    let initialModel
        (staging: string) (texts: string seq) (merges: int) (config: int -> ModelConfig) (seed: int)
        (cancellation: Threading.CancellationToken) =
        let tokenizerFolder = Directory.CreateDirectory(Path.Combine(staging, "tokenizer")).FullName
        BpeTraining.trainToFolder texts merges tokenizerFolder
        let tokenizer = Tokenizers.fromFolder tokenizerFolder
        let model = CausalLm.create (config tokenizer.VocabSize) (int64 seed)
        let initial = Path.Combine(staging, "initial")
        HfModelFolder.save initial model None (List.ofArray (Directory.GetFiles tokenizerFolder))
        Directory.Delete(tokenizerFolder, true)
        cancellation.ThrowIfCancellationRequested()
        initial, tokenizer, model

    /// Runs the embedded default. Everything is written to a staging folder beside OutputPath (the task's
    /// data as DeepSpeed-Chat JSON Lines in data/, the tokenizer and untrained model in initial/, then the
    /// fine-tuning job's metrics.jsonl, TensorBoard events, loss.png and final/), which replaces OutputPath
    /// only when everything succeeded. Staging folders of earlier runs whose process is gone are removed
    /// first (StagedFolder.cleanStale). Cancelling the token aborts cleanly: the staging folder is
    /// removed and OutputPath is left as it was (the run is short, so it keeps no checkpoint to resume).
    /// Cancelled while the data and model are prepared, it raises OperationCanceledException once they
    /// are; cancelled while training, it finishes the current optimizer step and returns a result with
    /// Interrupted set. observer hears what is being
    /// prepared (OnMessage), the logged steps and the evaluations.
    let run (settings: EmbeddedSettings) (cancellation: Threading.CancellationToken) (observer: FineTuneEvents) : FineTuneOutcome =
        validate settings
        let output = Path.GetFullPath settings.OutputPath
        for folder, action in StagedFolder.cleanStale output do
            observer.OnMessage(sprintf "%s: %s (its run is no longer running)" folder action)
        staged output cancellation observer (fun staging ->
            let data = Directory.CreateDirectory(Path.Combine(staging, "data")).FullName
            let train = EmbeddedTask.samples settings.Seed settings.TrainSamples false
            let heldOut = EmbeddedTask.samples (settings.Seed + 1) settings.EvalSamples true
            writeSamples (Path.Combine(data, "train.jsonl")) train
            writeSamples (Path.Combine(data, "eval.jsonl")) heldOut
            observer.OnMessage(sprintf "task: %d training and %d held-out samples, e.g.%s ->%s" train.Length heldOut.Length train[0].Prompt train[0].Answer)
            let initial, tokenizer, model =
                initialModel staging [ for s in train -> s.Prompt + s.Answer ] Merges modelConfig settings.Seed cancellation
            let parameters = CausalLm.parameterSpec model |> List.sumBy (fun (_, shape) -> Array.fold (*) 1L shape)
            observer.OnMessage(sprintf "model: LLaMA, %d parameters, vocabulary of %d tokens (byte-level BPE)" parameters tokenizer.VocabSize)
            let request =
                { ModelPath = initial
                  DataPath = Path.Combine(data, "train.jsonl")
                  OutputPath = staging
                  PublishedOutputPath = Some output
                  OverwriteOutputDir = true
                  Options = trainOptions settings
                  Data =
                    { FineTune.defaultData with
                        EvalDataPath = Some(Path.Combine(data, "eval.jsonl"))
                        Prompt = { PromptDataset.defaults with TrainOn = TrainOn.Completion }
                        ExactMatchSamples = settings.EvalSamples
                        ExactMatchMaxNewTokens = 16 }
                  ResumeFromCheckpoint = None
                  Lora = None
                  Prefix = None
                  GradientCheckpointing = false
                  ModelHandling = FineTune.defaultModelHandling
                  Distributed = FineTune.defaultDistributed
                  Task = TrainingTask.CausalLm
                  Plot = Functional.Reporting.MetricsPlot.drawer }
            request)
