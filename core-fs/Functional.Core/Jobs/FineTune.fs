namespace Functional.Training

open System
open System.IO
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Text

/// Runs a fine-tuning job end to end: everything is validated before anything is written.
[<RequireQualifiedAccess>]
module FineTune =

    /// No evaluation file, HF-like data defaults, the model folder's tokenizer, no cache, no scoring.
    let defaultData =
        { EvalDataPath = None
          Prompt = PromptDataset.defaults
          TokenizerName = None
          CachePath = None
          ExactMatchSamples = 0
          ExactMatchMaxNewTokens = 32 }

    /// Dropout as config.json says, no resize beyond the tokenizer's added tokens, shards of at most 5 GB.
    let defaultModelHandling =
        { DisableDropout = false
          ResizeTokenEmbeddingsToMultipleOf = 0
          MaxShardSize = Functional.Checkpoint.WeightsFormat.defaultMaxShardSize }

    /// A job's distributed settings unless told otherwise: the processes from the launcher's environment
    /// (Communicator.fromEnvironment), ZeRO stage 0, DeepSpeed's bucket sizes, only process 0 logging (no
    /// metrics-rank-R.jsonl).
    let defaultDistributed: DistributedSettings =
        { ZeroStage = 0; Buckets = Functional.Distributed.CollectiveBuckets.defaults; Communicator = None; LogEachRank = false; TensorParallelDegree = 1; PipelineParallelDegree = 1 }

    /// TrainOptions.defaults and defaultData, no resume, no LoRA, no prefix tuning, no gradient
    /// checkpointing and an output folder that must be empty. Scripts start from it and change what they
    /// need: `{ FineTune.request model data output with Options = ...; Lora = Some ... }`.
    let request (modelPath: string) (dataPath: string) (outputPath: string) : FineTuneRequest =
        { ModelPath = modelPath
          DataPath = dataPath
          OutputPath = outputPath
          PublishedOutputPath = None
          OverwriteOutputDir = false
          Options = TrainOptions.defaults
          Data = defaultData
          ResumeFromCheckpoint = None
          Lora = None
          Prefix = None
          GradientCheckpointing = false
          ModelHandling = defaultModelHandling
          Task = TrainingTask.CausalLm
          Distributed = defaultDistributed
          Plot = None }

    /// The default cache folder: $FUNCTIONAL_CACHE, else ~/.cache/functional/data.
    let defaultCachePath () =
        match Environment.GetEnvironmentVariable "FUNCTIONAL_CACHE" with
        | null | "" ->
            Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache", "functional", "data")
        | path -> path

    /// One metrics.jsonl line of a training step (HF's names: step, epoch, loss, lr, grad_norm, and
    /// num_tokens: the window's predicted tokens). Timings stay out, so the same seed gives the same file.
    let metricsLine (log: StepLog) = RunLog.toJson (Trained(RunLog.stepRecord log))

    /// Exact-match accuracy of greedy answers to the first `count` samples (see Job.exactMatch).
    let exactMatch (model: CausalLm) (tokenizer: TextTokenizer) (samples: Sample[]) (count: int) (maxNewTokens: int) =
        Job.exactMatch model tokenizer samples count maxNewTokens

    /// Validates options, output folder, model folder, tokenizer, data and (when resuming) the checkpoint,
    /// raising InvalidInputException before anything is written; then trains. OUTPUT/metrics.jsonl and
    /// TensorBoard events grow as it goes; checkpoints follow the save strategy (atomic, rotated, the best
    /// kept); at the end come OUTPUT/final/ (staged and renamed), OUTPUT/loss.png and a last metrics line
    /// with HF's summary fields and the final evaluation. Cancelling the token finishes the current
    /// optimizer step, saves a checkpoint and returns with Interrupted set.
    ///
    /// A resume (ResumeFromCheckpoint) tells observer.OnMessage the checkpoint it starts from and every newer
    /// one "latest" skipped, with why; it may plan more steps than the saved run (the schedule follows the
    /// new total, as HF's), never fewer than the checkpoint's step.
    ///
    /// A run that fails after it started writing (a diverged loss, an I/O error) into an output folder that
    /// was empty or absent, and saved no checkpoint, removes what it wrote, so the folder blocks no later
    /// run; when it saved a checkpoint, everything stays (resume from it, as HF's resume_from_checkpoint).
    let runObserved (request: FineTuneRequest) (cancellation: Threading.CancellationToken) (observer: FineTuneEvents) : FineTuneOutcome =
        let path = request.OutputPath
        let existed = Directory.Exists path
        let wasEmpty =
            try not existed || Directory.EnumerateFileSystemEntries path |> Seq.isEmpty
            with :? IOException | :? UnauthorizedAccessException -> false
        // Only process 0 of a multi-process run writes the folder, so only it removes what was written.
        let isMain () =
            try (request.Distributed.Communicator |> Option.defaultWith Functional.Distributed.Communicator.fromEnvironment).Rank = 0
            with _ -> false
        try
            Job.run (Job.prepare request observer) cancellation observer
        with _ when wasEmpty && Directory.Exists path && List.isEmpty (CheckpointFolder.list path) && isMain () ->
            if existed then
                for entry in Directory.EnumerateFileSystemEntries path |> List.ofSeq do
                    if Directory.Exists entry then Directory.Delete(entry, true) else File.Delete entry
            else Directory.Delete(path, true)
            reraise ()

    /// Events that only hear the logged steps.
    let stepEvents (onStep: StepLog -> unit) : FineTuneEvents =
        { OnStep = onStep; OnEvaluation = (fun _ _ -> ()); OnMessage = ignore }

    /// runObserved hearing only the logged steps.
    let runWith (request: FineTuneRequest) (cancellation: Threading.CancellationToken) (onStep: StepLog -> unit) : FineTuneOutcome =
        runObserved request cancellation (stepEvents onStep)

    /// runWith without cancellation.
    let run (request: FineTuneRequest) (onStep: StepLog -> unit) : FineTuneOutcome =
        runWith request Threading.CancellationToken.None onStep
