namespace Functional.Training

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Generation
open Functional.Models
open Functional.Peft
open TorchSharp
open Functional.Reporting
open Functional.Text

/// Where the data comes from and how it becomes token ids.
[<NoComparison>]
type DataSettings =
    { /// A separate evaluation file (same formats as the training data).
      EvalDataPath: string option
      /// Format, fields, completion-only training, packing, split, evaluation hold-out. MaxSeqLen and
      /// Seed are taken from the training options.
      Prompt: PromptDataOptions
      /// A tiktoken encoding name (cl100k_base, o200k_base); None uses the model folder's tokenizer files.
      TokenizerName: string option
      /// Folder of the tokenized-data cache; None turns the cache off.
      CachePath: string option
      /// Evaluation samples whose answers are generated (greedy) and scored by exact match before and
      /// after training; 0 turns scoring off.
      ExactMatchSamples: int
      /// Longest generated answer when scoring exact match, in tokens.
      ExactMatchMaxNewTokens: int }

/// LoRA for a fine-tuning job (DeepSpeed-Chat's --lora_dim, --only_optimize_lora, --lora_learning_rate;
/// PEFT's target modules).
[<NoComparison>]
type LoraSettings =
    { /// Rank, alpha, dropout and the projections to adapt.
      Config: Functional.Peft.LoraConfig
      /// Freeze the base model: only the adapters train.
      OnlyOptimizeLora: bool
      /// The adapters' own peak learning rate (default: the run's).
      LearningRate: float option
      /// Start from an existing PEFT adapter folder: its config and values.
      AdapterPath: string option }

/// Prefix tuning for a fine-tuning job (PaddleNLP's --prefix_tuning, PEFT's PREFIX_TUNING): learned
/// key/value prefixes for every layer train, the base model stays frozen, and final/ is the adapter.
[<NoComparison>]
type PrefixSettings =
    { /// N, the virtual tokens of the prefix (PaddleNLP's --num_prefix_tokens, default
      /// PrefixTuning.DefaultNumVirtualTokens = 128). With AdapterPath it must equal the adapter's
      /// num_virtual_tokens, or be 0: the run reads the adapter's.
      NumPrefixTokens: int
      /// Start from an existing PEFT prefix adapter folder: its values.
      AdapterPath: string option }

/// A fine-tuning job: where the model, data and output are, and how to train.
[<NoComparison>]
type FineTuneRequest =
    { /// A Hugging Face model folder (config.json + model.safetensors, tokenizer files optional).
      ModelPath: string
      /// Training data: JSON or JSON Lines (prompt/answer shapes, text or input_ids).
      DataPath: string
      /// The output folder (metrics.jsonl, TensorBoard events, plot, final/).
      OutputPath: string
      /// Where the caller moves OutputPath once the job has finished, when it trains in a staging folder
      /// (the embedded default run): the checkpoint paths trainer_state.json records
      /// (best_model_checkpoint) name that place. None: OutputPath itself.
      PublishedOutputPath: string option
      /// Allow an output folder that is not empty.
      OverwriteOutputDir: bool
      /// The hyperparameters.
      Options: TrainOptions
      /// Data reading, evaluation and scoring.
      Data: DataSettings
      /// A checkpoint folder to resume from, or "latest" (the newest complete one in OutputPath).
      ResumeFromCheckpoint: string option
      /// LoRA adapters to train (None: plain fine-tuning).
      Lora: LoraSettings option
      /// A prefix to train instead of the model (None: no prefix). Excludes Lora, mixed precision and
      /// gradient checkpointing.
      Prefix: PrefixSettings option
      /// Recompute each transformer block in backward instead of keeping its activations (HF's
      /// gradient_checkpointing, PaddleNLP's recompute): less memory, the same gradients, more time.
      GradientCheckpointing: bool }

/// Evaluation figures at one point of a run.
[<NoComparison>]
type EvalFigures =
    { /// Token-weighted loss and perplexity on the evaluation set.
      Eval: EvalResult
      /// Fraction of scored evaluation samples whose generated answer equals the reference (0 to 1).
      ExactMatch: float option }

/// What a fine-tuning job tells its caller while it runs.
[<NoComparison; NoEquality>]
type FineTuneEvents =
    { /// After every logged optimizer step.
      OnStep: StepLog -> unit
      /// After every evaluation: the step (0: before training) and the figures (exact match only in the
      /// evaluation before training; the result's After holds the closing one).
      OnEvaluation: int -> EvalFigures -> unit
      /// A line for the user: the checkpoint a resume starts from, a newer one it skipped and why.
      OnMessage: string -> unit }

/// What a finished job wrote and measured.
[<NoComparison>]
type FineTuneOutcome =
    { /// Optimizer steps of the run done, counting those before a resume (HF's global_step).
      Steps: int
      /// The step this process started from: 0, or the step of the checkpoint it resumed from.
      StartStep: int
      /// The last step's loss.
      FinalLoss: float
      /// The mean of the per-step losses of the whole run, steps before a resume included (HF's
      /// train_loss); NaN when no step was trained.
      TrainLoss: float
      /// OUTPUT/metrics.jsonl.
      MetricsPath: string
      /// OUTPUT/final: config.json + model.safetensors in HF naming (+ tokenizer files).
      FinalModelPath: string
      /// OUTPUT/loss.png: loss and learning rate per step.
      PlotPath: string
      /// Evaluation before training, when there is an evaluation set.
      Before: EvalFigures option
      /// Evaluation after training, when there is an evaluation set.
      After: EvalFigures option
      /// Rows skipped as bad (--skip-bad-rows).
      SkippedRows: int
      /// Seconds spent in the training loop (HF's train_runtime).
      TrainRuntime: float
      /// The checkpoints left in OutputPath, oldest first.
      Checkpoints: string list
      /// The best checkpoint by the metric, when checkpoints were evaluated.
      BestCheckpoint: string option
      /// The checkpoint the run resumed from.
      ResumedFrom: string option
      /// Early stopping ended the run before its planned steps.
      StoppedEarly: bool
      /// Cancellation (SIGINT/SIGTERM) ended the run after saving a checkpoint; final/ was not written.
      Interrupted: bool
      /// Wall-clock seconds of the whole job.
      Seconds: float }

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

    /// A request to fine-tune every weight of the model folder on the data file into the output folder, with
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
          GradientCheckpointing = false }

    /// The default cache folder: $FUNCTIONAL_CACHE, else ~/.cache/functional/data.
    let defaultCachePath () =
        match Environment.GetEnvironmentVariable "FUNCTIONAL_CACHE" with
        | null | "" ->
            Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache", "functional", "data")
        | path -> path

    let private jsonOptions =
        JsonSerializerOptions(NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)

    let private jsonLine (fields: (string * obj) list) =
        JsonSerializer.Serialize(Collections.Generic.Dictionary<string, obj>(dict fields), jsonOptions)

    /// One metrics.jsonl line of a training step (HF's names: step, epoch, loss, lr, grad_norm, and
    /// num_tokens: the window's predicted tokens). Timings stay out, so the same seed gives the same file.
    let metricsLine (log: StepLog) =
        jsonLine
            [ "step", box log.Step
              "epoch", box log.Epoch
              "loss", box log.Loss
              "lr", box log.LearningRate
              "grad_norm", box log.GradNorm
              "num_tokens", box log.PredictedTokens ]

    /// The files that hold a model folder's tokenizer.
    let private tokenizerFiles =
        [ "tokenizer.json"; "vocab.json"; "merges.txt"; "tokenizer.model"; "tokenizer_config.json"
          "special_tokens_map.json"; "generation_config.json" ]

    let private hasTokenizer (folder: string) =
        [ "tokenizer.json"; "vocab.json"; "tokenizer.model" ] |> List.exists (fun f -> File.Exists(Path.Combine(folder, f)))

    /// The tokenizer of a job: a named encoding, the model folder's files, or none (pre-tokenized data only:
    /// encoding text then raises an error that says what is missing).
    let private tokenizerFor (request: FineTuneRequest) : TextTokenizer =
        match request.Data.TokenizerName with
        | Some name -> Tokenizers.fromEncoding name
        | None when hasTokenizer request.ModelPath -> Tokenizers.fromFolder request.ModelPath
        | None ->
            TextTokenizer.absent request.DataPath
                (sprintf "the data holds text, but the model folder %s has no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model): pass --tokenizer NAME or pre-tokenized {\"input_ids\": [...]} rows" request.ModelPath)

    /// Creates the folder when missing, writes and deletes a probe file, then removes what it created, so
    /// that a read-only file system, a missing permission or a full disk stops the run before training,
    /// naming the folder and the reason. A folder already there is left as it was.
    let private checkWritable (path: string) =
        let rec missingAncestors (folder: string) =
            if String.IsNullOrEmpty folder || Directory.Exists folder || File.Exists folder then []
            else folder :: missingAncestors (Path.GetDirectoryName folder)
        let created = missingAncestors (Path.GetFullPath path)
        match created |> List.tryLast |> Option.map Path.GetDirectoryName with
        | Some parent when File.Exists parent ->
            InvalidInput.fail path "" (sprintf "the folder cannot be created: %s is a file" parent)
        | _ -> ()
        let probe = Path.Combine(path, sprintf ".write-probe-%d" Environment.ProcessId)
        try
            try
                Directory.CreateDirectory path |> ignore
                File.WriteAllBytes(probe, Array.zeroCreate 4096)
                File.Delete probe
            with
            | :? FileNotFoundException
            | :? DirectoryNotFoundException ->
                // mkdir answers ENOENT where the file system takes no new folders (/proc, /sys).
                InvalidInput.fail path "" "the folder cannot be created there: the file system takes no new folders"
            | :? IOException
            | :? UnauthorizedAccessException as e ->
                InvalidInput.fail path "" (sprintf "the folder is not writable: %s" (e.Message.ReplaceLineEndings " "))
        finally
            if File.Exists probe then (try File.Delete probe with _ -> ())
            for folder in created do
                if Directory.Exists folder then (try Directory.Delete folder with _ -> ())

    let private checkOutputFolder (request: FineTuneRequest) =
        let path = request.OutputPath
        if File.Exists path then InvalidInput.fail path "" "the output path is a file (expected a folder)"
        if Directory.Exists path && Directory.EnumerateFileSystemEntries path |> Seq.isEmpty |> not && not request.OverwriteOutputDir then
            InvalidInput.fail path "" "the output folder already exists and is not empty; pass --overwrite-output-dir to write into it"
        checkWritable path

    /// Exact-match accuracy of greedy answers to the first `count` samples: the generated text, trimmed,
    /// equals the reference answer, trimmed.
    let exactMatch (model: CausalLm) (tokenizer: TextTokenizer) (samples: Sample[]) (count: int) (maxNewTokens: int) =
        // A prompt longer than the model's context cannot be answered: it is left out of the score
        // (generating would refuse it, after training, before final/ is written).
        let limit = Generator.positionLimit model
        let fits (s: Sample) = (Generator.encodePrompts tokenizer [ s.Prompt ] |> Array.head).Length <= limit
        let scored = samples |> Array.truncate count |> Array.filter (fun s -> s.Prompt <> "" && fits s)
        if scored.Length = 0 then None
        else
            let options =
                { GenerationOptions.defaults with
                    MaxNewTokens = maxNewTokens
                    EosId = tokenizer.Special.Eos
                    PadId = tokenizer.Special.Pad |> Option.defaultValue 0L }
            let answers =
                scored
                |> Array.chunkBySize 32
                |> Array.collect (fun chunk ->
                    Generator.generateText model tokenizer [ for s in chunk -> s.Prompt ] options |> Array.ofList)
            let correct = Array.map2 (fun (s: Sample) (a: string) -> a.Trim() = s.Answer.Trim()) scored answers |> Array.filter id
            Some(float correct.Length / float scored.Length)

    /// The evaluation figures of the model now: eval is the evaluation loss, computed by the caller.
    let private figures (request: FineTuneRequest) model tokenizer (eval: EvalResult) samples =
        { Eval = eval
          ExactMatch =
            if request.Data.ExactMatchSamples > 0 then
                exactMatch model tokenizer samples request.Data.ExactMatchSamples request.Data.ExactMatchMaxNewTokens
            else None }

    /// The metrics a checkpoint can be ranked by.
    let private rankable = [ "eval_loss"; "eval_perplexity" ]

    /// The metric name with HF's "eval_" prefix.
    let private metricName (options: TrainOptions) =
        let name = options.MetricForBestModel.Trim()
        if name.StartsWith "eval_" then name else "eval_" + name

    let private checkSettings (request: FineTuneRequest) (hasEvalSet: bool) =
        let o = request.Options
        let needsEval = o.LoadBestModelAtEnd || o.EarlyStoppingPatience > 0 || TrainOptions.evalStrategy o <> IntervalStrategy.No
        if needsEval && not hasEvalSet then
            let option =
                if o.LoadBestModelAtEnd then "--load-best-model-at-end"
                elif o.EarlyStoppingPatience > 0 then "--early-stopping-patience"
                else "--eval-strategy"
            InvalidInput.option option "needs an evaluation set (--eval-data or --eval-split-ratio)"
        if not (List.contains (metricName o) rankable) then
            InvalidInput.option "--metric-for-best-model"
                (sprintf "unknown metric %s (expected eval_loss or eval_perplexity)" o.MetricForBestModel)

    /// Refuses prefix tuning together with what it does not work with, naming both options.
    let private checkPrefixCombinations (request: FineTuneRequest) =
        if request.Prefix.IsSome then
            if request.Lora.IsSome then
                InvalidInput.option "--prefix-tuning" "cannot be combined with LoRA (--lora-dim / --lora-adapter): train one adapter at a time"
            let precision = MixedPrecision.flag request.Options.Precision
            if precision <> "" then
                InvalidInput.option precision
                    "cannot be combined with --prefix-tuning: mixed precision trains every parameter of the model, the prefix trains alone"
            if request.GradientCheckpointing then
                InvalidInput.option "--gradient-checkpointing"
                    "cannot be combined with --prefix-tuning: the prefix runs through the key/value-cache path, which does not recompute blocks"

    /// The model's context must cover the prefix and the longest row (the rows' positions start at N), for
    /// every family: GPT-2's n_positions, LLaMA's max_position_embeddings (see TrainOptions.sequenceLength).
    let private checkPrefixFits (model: CausalLm) (numVirtualTokens: int) (options: TrainOptions) (datasets: TokenizedDataset list) =
        let context = ModelConfig.contextLength model.Config
        let longest =
            datasets
            |> List.collect (fun d -> [ for row in d.Rows -> min row.Length options.MaxSeqLen ])
            |> List.fold max 0
        if numVirtualTokens + longest > context then
            InvalidInput.option "--num-prefix-tokens"
                (sprintf "%d prefix tokens and the longest row (%d tokens) need %d positions; the model has %s = %d (lower --num-prefix-tokens or --max-seq-len)"
                    numVirtualTokens longest (numVirtualTokens + longest) (ModelConfig.contextField model.Config) context)

    let private metricOf (options: TrainOptions) (eval: EvalResult) =
        if metricName options = "eval_perplexity" then eval.Perplexity else eval.Loss

    /// A metrics value: a JSON number, or "NaN" / "Infinity" / "-Infinity" as the metrics lines write them.
    let private number (value: JsonElement) =
        if value.ValueKind = JsonValueKind.String then Double.Parse(value.GetString(), Globalization.CultureInfo.InvariantCulture)
        else value.GetDouble()

    let private readFigure (line: string) =
        use document = JsonDocument.Parse line
        let root = document.RootElement
        let get (name: string) =
            match root.TryGetProperty name with
            | true, v when v.ValueKind = JsonValueKind.Number || v.ValueKind = JsonValueKind.String -> Some(number v)
            | _ -> None
        match root.TryGetProperty "step", get "eval_loss" with
        | (true, step), Some loss when step.GetInt32() = 0 ->
            Some { Eval = { Loss = loss; Perplexity = defaultArg (get "eval_perplexity") (exp loss); Tokens = 0L }; ExactMatch = get "eval_exact_match" }
        | _ -> None

    /// runObserved's work (see there), without the clean-up after a failure.
    let private execute (request: FineTuneRequest) (cancellation: Threading.CancellationToken) (observer: FineTuneEvents) : FineTuneOutcome =
        let clock = Stopwatch.StartNew()
        let options = request.Options
        TrainOptions.validate options
        checkPrefixCombinations request
        // NumPrefixTokens 0 with an adapter folder: the adapter's own size, read here rather than when the request is made.
        let request =
            match request.Prefix with
            | Some({ AdapterPath = Some path; NumPrefixTokens = 0 } as prefix) ->
                { request with Prefix = Some { prefix with NumPrefixTokens = (PrefixTuning.loadConfig path).NumVirtualTokens } }
            | _ -> request
        if request.ResumeFromCheckpoint.IsNone then checkOutputFolder request else checkWritable request.OutputPath
        match options.LoggingDir with
        | Some folder when options.ReportToTensorBoard -> checkWritable folder
        | _ -> ()
        let model = HfModelFolder.load request.ModelPath options.Seed
        // From here on MaxSeqLen is the row length of the run: the model's context when it was 0.
        let options =
            { options with
                MaxSeqLen = TrainOptions.sequenceLength options model.Config (request.Prefix |> Option.map (fun p -> p.NumPrefixTokens) |> Option.defaultValue 0) }
        let sourceConfig = File.ReadAllText(Path.Combine(request.ModelPath, "config.json"))
        let tokenizer = tokenizerFor request
        let promptOptions = { request.Data.Prompt with MaxSeqLen = options.MaxSeqLen; Seed = options.Seed }
        let data =
            match request.Data.CachePath with
            | Some cache -> fst (DataCache.loadTrainAndEval cache request.DataPath request.Data.EvalDataPath promptOptions tokenizer)
            | None -> PromptDataset.loadTrainAndEval request.DataPath request.Data.EvalDataPath promptOptions tokenizer
        checkSettings request data.Eval.IsSome
        let vocabSize = ModelConfig.vocabSize model.Config
        TokenizedDataset.checkVocabulary vocabSize data.Train
        data.Eval |> Option.iter (TokenizedDataset.checkVocabulary vocabSize)
        let plan = TrainingLoop.plan options data.Train.Rows.Length
        let adapters =
            request.Lora
            |> Option.map (fun lora ->
                let adapters =
                    match lora.AdapterPath with
                    | Some path -> Lora.load path model
                    | None -> Lora.wrap lora.Config model options.Seed
                if lora.OnlyOptimizeLora then Lora.freezeBase model
                adapters)
        let prefix =
            request.Prefix
            |> Option.map (fun settings ->
                let adapter =
                    match settings.AdapterPath with
                    | Some path ->
                        let adapter = PrefixTuning.load path model
                        if adapter.Config.NumVirtualTokens <> settings.NumPrefixTokens then
                            InvalidInput.option "--num-prefix-tokens"
                                (sprintf "is %d, but the prefix adapter %s has num_virtual_tokens = %d"
                                    settings.NumPrefixTokens (Path.Combine(path, PrefixTuning.ConfigFileName)) adapter.Config.NumVirtualTokens)
                        adapter
                    | None -> PrefixTuning.create settings.NumPrefixTokens model options.Seed
                checkPrefixFits model adapter.Config.NumVirtualTokens options (data.Train :: Option.toList data.Eval)
                PrefixTuning.freezeBase model
                adapter)
        // What trains, evaluates and generates: the model behind its prefix when there is one.
        let trained = prefix |> Option.map (fun p -> p.Model) |> Option.defaultValue model
        CausalLm.setGradientCheckpointing model request.GradientCheckpointing
        let adapterParameters =
            (adapters |> Option.map Lora.parameters |> Option.defaultValue [])
            @ (prefix |> Option.map PrefixTuning.parameters |> Option.defaultValue [])
        let trainable =
            [ if not (request.Lora |> Option.exists (fun l -> l.OnlyOptimizeLora)) && prefix.IsNone then
                  for struct (name, p) in model.Module.named_parameters () -> name, p
              yield! adapterParameters ]
        let adapterLearningRate = request.Lora |> Option.bind (fun l -> l.LearningRate) |> Option.defaultValue options.LearningRate
        if adapterLearningRate <> options.LearningRate && options.LearningRate = 0.0 then
            InvalidInput.option "--learning-rate" "must be > 0 when --lora-learning-rate differs from it (the schedule scales both)"
        let isAdapter = set (List.map fst adapterParameters)
        let learningRate name = if isAdapter.Contains name then adapterLearningRate else options.LearningRate
        let signature =
            TrainingCheckpoint.signature plan model data.Train
            @ [ "--lora-*",
                (match request.Lora, adapters with
                 | Some l, Some a -> sprintf "%A only=%b lr=%g" a.Config l.OnlyOptimizeLora adapterLearningRate
                 | _ -> "none")
                "--prefix-tuning / --num-prefix-tokens",
                (match prefix with
                 | Some p -> sprintf "num_virtual_tokens=%d" p.Config.NumVirtualTokens
                 | None -> "none") ]
        let saveAdapters folder =
            adapters |> Option.iter (Lora.save folder (Some request.ModelPath))
            prefix |> Option.iter (PrefixTuning.save folder (Some request.ModelPath))
        // LoRA and prefix adapters share PEFT's file name.
        let loadAdapters (path: string) =
            if not adapterParameters.IsEmpty then
                let file = Path.Combine(path, Lora.WeightsFileName)
                let saved = Safetensors.load file
                use _ = torch.no_grad ()
                for name, p in adapterParameters do
                    match saved.TryFind name with
                    | Some t -> p.copy_ t |> ignore
                    | None -> InvalidInput.fail file name "missing from the checkpoint's adapter"
                saved |> Map.iter (fun _ t -> t.Dispose())
        let restored =
            request.ResumeFromCheckpoint
            |> Option.map (fun spec ->
                let skipped (folder: string) (problem: string) = observer.OnMessage(sprintf "skipped %s: %s" (Path.GetFileName folder) problem)
                let path = CheckpointFolder.resolveReporting request.OutputPath spec skipped
                TrainingCheckpoint.restore path model (List.map fst trainable) loadAdapters signature)
        let startStep = restored |> Option.map (fun r -> r.Resume.Accumulation.OptimizerStep) |> Option.defaultValue 0
        restored
        |> Option.iter (fun r ->
            if plan.TotalSteps < startStep then
                InvalidInput.option (if options.MaxSteps > 0 then "--max-steps" else "--num-train-epochs")
                    (sprintf "makes a run of %d steps, but %s is at step %d: a resume may lengthen the run, not shorten it (give at least %d steps)"
                        plan.TotalSteps r.Path startStep startStep)
            observer.OnMessage(sprintf "resuming from %s (step %d of %d)" r.Path startStep plan.TotalSteps))
        // HF's floating_point_ops: 6 x the parameters outside embeddings x the input tokens.
        let flopsPerInputToken =
            let embeddings =
                set [ for struct (name, m) in model.Module.named_modules () do
                          if m :? TorchSharp.Modules.Embedding then yield (if name = "" then "weight" else name + ".weight") ]
            let counted =
                [ for struct (name, p) in model.Module.named_parameters () do
                      if not (embeddings.Contains name) then yield name, p.numel ()
                  for name, p in adapterParameters -> name, p.numel () ]
                |> List.distinctBy fst
            6.0 * float (List.sumBy snd counted)
        let published = Path.GetFullPath(request.PublishedOutputPath |> Option.defaultValue request.OutputPath)
        let publish (path: string) = Path.Combine(published, Path.GetRelativePath(Path.GetFullPath request.OutputPath, path))
        let tokenizerCopies =
            if request.Data.TokenizerName.IsSome then []
            else tokenizerFiles |> List.map (fun f -> Path.Combine(request.ModelPath, f)) |> List.filter File.Exists
        // Everything is checked: from here on the output folder is written.
        Directory.CreateDirectory request.OutputPath |> ignore
        CheckpointFolder.cleanStale request.OutputPath
        let metricsPath = Path.Combine(request.OutputPath, "metrics.jsonl")
        let finalPath = Path.Combine(request.OutputPath, "final")
        let plotPath = Path.Combine(request.OutputPath, "loss.png")
        let evaluate eval = Evaluation.evaluate trained eval options.PerDeviceEvalBatchSize options.MaxSeqLen TrainingLoop.PadId
        let history = ResizeArray<string>(restored |> Option.map (fun r -> r.Record.History) |> Option.defaultValue [])
        let mutable best = restored |> Option.bind (fun r -> r.Record.Best)
        let mutable earlyStopping = restored |> Option.map (fun r -> r.Record.EarlyStopping) |> Option.defaultValue (0, None)
        let mutable lastEval: (int * EvalResult) option = None
        let savedTokens, savedFlos, savedLoss =
            match restored with
            | Some r -> r.Record.InputTokensSeen, r.Record.TotalFlos, r.Record.TrainLoss
            | None -> 0L, 0.0, (0.0, 0)
        let mutable trainLoss = savedLoss
        let mutable inputTokensSeen = savedTokens
        let mutable stoppedEarly = false
        let mutable interrupted = false
        let greaterIsBetter = options.GreaterIsBetter |> Option.defaultValue (Rotation.defaultGreaterIsBetter (metricName options))
        let trainClock = Stopwatch()
        let result, before =
            use metrics = new StreamWriter(metricsPath, false)
            let events =
                if options.ReportToTensorBoard then Some(TensorBoard.create (defaultArg options.LoggingDir request.OutputPath))
                else None
            use _ = { new IDisposable with member _.Dispose() = events |> Option.iter (fun e -> (e :> IDisposable).Dispose()) }
            let scalars step values = events |> Option.iter (fun e -> TensorBoard.scalars e step values)
            for line in history do metrics.WriteLine line
            metrics.Flush()
            let write (line: string) =
                history.Add line
                metrics.WriteLine line
                metrics.Flush()
            let logEval step (eval: EvalResult) (exact: float option) =
                write (
                    jsonLine
                        [ yield "step", box step
                          yield "eval_loss", box eval.Loss
                          yield "eval_perplexity", box eval.Perplexity
                          match exact with
                          | Some m -> yield "eval_exact_match", box m
                          | None -> () ])
                scalars (int64 step) [ "eval/loss", eval.Loss; "eval/perplexity", eval.Perplexity ]
                observer.OnEvaluation step { Eval = eval; ExactMatch = exact }
            let before =
                match restored, data.Eval with
                | Some _, _ -> history |> Seq.tryPick readFigure
                | None, Some eval ->
                    let figures = figures request trained tokenizer (evaluate eval) data.EvalSamples
                    logEval 0 figures.Eval figures.ExactMatch
                    Some figures
                | None, None -> None
            let saveCheckpoint (context: StepContext) =
                let step = context.Log.Step
                let candidate =
                    match lastEval with
                    | Some(at, eval) when at = step -> Some(metricOf options eval)
                    | _ -> None
                let path = Path.GetFullPath(Path.Combine(request.OutputPath, sprintf "checkpoint-%d" step))
                match candidate with
                | Some value when Rotation.isBetter greaterIsBetter value (best |> Option.map fst) -> best <- Some(value, path)
                | _ -> ()
                TrainingLoop.ensureFinite options step context.Parameters
                let record =
                    { History = List.ofSeq history
                      Best = best |> Option.map (fun (value, path) -> value, publish path)
                      EarlyStopping = earlyStopping
                      InputTokensSeen = inputTokensSeen
                      TotalFlos = savedFlos + flopsPerInputToken * float (inputTokensSeen - savedTokens)
                      TrainLoss = trainLoss }
                let adapterWriters =
                    if adapterParameters.IsEmpty then []
                    else [ Lora.ConfigFileName, (fun (path: string) -> saveAdapters (Path.GetDirectoryName path)) ]
                TrainingCheckpoint.save request.OutputPath plan model (Some sourceConfig) tokenizerCopies signature adapterWriters context record |> ignore
                let existing = CheckpointFolder.list request.OutputPath
                let bestStep = best |> Option.bind (fun (_, p) -> existing |> List.tryFind (fun (_, q) -> Path.GetFullPath q = p) |> Option.map fst)
                for victim in Rotation.toDelete (List.map fst existing) bestStep options.SaveTotalLimit do
                    existing |> List.find (fun (s, _) -> s = victim) |> snd |> CheckpointFolder.delete
            let afterStep (context: StepContext) =
                let step = context.Log.Step
                trainLoss <- fst trainLoss + context.Log.Loss, snd trainLoss + 1
                inputTokensSeen <- savedTokens + context.InputTokensSeen
                let last = step = plan.TotalSteps
                let evalNow =
                    match TrainOptions.evalStrategy options with
                    | IntervalStrategy.Steps -> step % options.EvalSteps = 0
                    | IntervalStrategy.Epoch -> context.EpochEnded
                    | IntervalStrategy.No -> false
                match data.Eval with
                | Some eval when evalNow || last ->
                    let result = evaluate eval
                    logEval step result None
                    lastEval <- Some(step, result)
                    if evalNow && options.EarlyStoppingPatience > 0 then
                        let value = metricOf options result
                        let counter, bestSeen = earlyStopping
                        let improved = Rotation.isBetter greaterIsBetter value bestSeen
                        let next = EarlyStopping.observe improved { Patience = options.EarlyStoppingPatience; Counter = counter }
                        earlyStopping <- next.Counter, (if improved then Some value else bestSeen)
                | _ -> ()
                let saveNow =
                    match options.SaveStrategy with
                    | IntervalStrategy.Steps -> step % options.SaveSteps = 0
                    | IntervalStrategy.Epoch -> context.EpochEnded
                    | IntervalStrategy.No -> false
                interrupted <- cancellation.IsCancellationRequested && not last
                if saveNow || interrupted then saveCheckpoint context
                stoppedEarly <-
                    options.EarlyStoppingPatience > 0 && not last
                    && EarlyStopping.shouldStop { Patience = options.EarlyStoppingPatience; Counter = fst earlyStopping }
                if interrupted || stoppedEarly then StepDecision.Stop else StepDecision.Continue
            trainClock.Start()
            let result =
                // Under --bf16/--fp16 the adapters are copied onto the low-precision compute copy.
                let attach = adapters |> Option.map MixedPrecision.attachLora |> Option.defaultValue MixedPrecision.attachNothing
                TrainingLoop.trainAttached plan trained attach [ for name, p in trainable -> struct (name, p) ] learningRate data.Train (restored |> Option.map (fun r -> r.Resume))
                    { OnLog =
                        fun log ->
                            write (metricsLine log)
                            scalars (int64 log.Step)
                                [ "train/loss", log.Loss; "train/learning_rate", log.LearningRate; "train/grad_norm", log.GradNorm ]
                            observer.OnStep log
                      AfterStep = afterStep }
            trainClock.Stop()
            result, before
        let steps =
            history
            |> Seq.choose (fun line ->
                use document = JsonDocument.Parse line
                let root = document.RootElement
                match root.TryGetProperty "loss", root.TryGetProperty "lr" with
                | (true, loss), (true, lr) -> Some(root.GetProperty("step").GetInt32(), number loss, number lr)
                | _ -> None)
            |> List.ofSeq
        let evalPoints =
            history
            |> Seq.choose (fun line ->
                use document = JsonDocument.Parse line
                let root = document.RootElement
                match root.TryGetProperty "eval_loss" with
                | true, loss -> Some(root.GetProperty("step").GetInt32(), number loss)
                | _ -> None)
            |> List.ofSeq
        let after =
            if interrupted then None
            else
                if options.LoadBestModelAtEnd then
                    best
                    |> Option.iter (fun (_, path) ->
                        if Directory.Exists path then
                            HfModelFolder.loadWeightsInto path model
                            loadAdapters path)
                match data.Eval, lastEval with
                | Some eval, Some(_, final) ->
                    let evalResult = if options.LoadBestModelAtEnd && best.IsSome then evaluate eval else final
                    Some(figures request trained tokenizer evalResult data.EvalSamples)
                | _ -> None
        let runtime = trainClock.Elapsed.TotalSeconds
        let averageLoss = if snd trainLoss = 0 then nan else fst trainLoss / float (snd trainLoss)
        if not interrupted then
            TrainingLoop.ensureFinite options result.Steps result.Parameters
            // Speeds measure the steps this process trained, in the time it trained them.
            let stepsHere = float (result.Steps - startStep)
            let samples = stepsHere * float (options.PerDeviceTrainBatchSize * options.GradientAccumulationSteps)
            File.AppendAllLines(
                metricsPath,
                [ jsonLine
                      [ yield "step", box result.Steps
                        yield "train_runtime", box runtime
                        yield "train_samples_per_second", box (samples / runtime)
                        yield "train_steps_per_second", box (stepsHere / runtime)
                        yield "total_flos", box (savedFlos + flopsPerInputToken * float (inputTokensSeen - savedTokens))
                        yield "train_loss", box averageLoss
                        match after with
                        | Some a ->
                            yield "eval_loss", box a.Eval.Loss
                            yield "eval_perplexity", box a.Eval.Perplexity
                            match a.ExactMatch with
                            | Some m -> yield "eval_exact_match", box m
                            | None -> ()
                        | None -> () ] ])
            if not adapterParameters.IsEmpty then
                // A LoRA or prefix run's final/ is the adapter (PEFT's save_pretrained), plus the base model
                // when it was trained too (LoRA without --only-optimize-lora), and the tokenizer files.
                let staging = Functional.Runtime.StagedFolder.create finalPath
                saveAdapters staging
                if request.Lora |> Option.exists (fun l -> not l.OnlyOptimizeLora) then
                    File.WriteAllText(Path.Combine(staging, "config.json"), HfModelFolder.configJson model (Some sourceConfig))
                    HfModelFolder.writeWeights (Path.Combine(staging, "model.safetensors")) model
                for file in tokenizerCopies do File.Copy(file, Path.Combine(staging, Path.GetFileName file), true)
                Functional.Runtime.StagedFolder.commit staging finalPath
            else HfModelFolder.save finalPath model (Some sourceConfig) tokenizerCopies
        MetricsPlot.save plotPath steps evalPoints
        result.Parameters.Dispose()
        { Steps = result.Steps
          StartStep = startStep
          FinalLoss = result.FinalLoss
          TrainLoss = averageLoss
          MetricsPath = metricsPath
          FinalModelPath = finalPath
          PlotPath = plotPath
          Before = before
          After = after
          SkippedRows = data.Skipped
          TrainRuntime = runtime
          Checkpoints = CheckpointFolder.list request.OutputPath |> List.map snd
          BestCheckpoint = best |> Option.map snd
          ResumedFrom = restored |> Option.map (fun r -> r.Path)
          StoppedEarly = stoppedEarly
          Interrupted = interrupted
          Seconds = clock.Elapsed.TotalSeconds }

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
        try
            execute request cancellation observer
        with _ when wasEmpty && Directory.Exists path && List.isEmpty (CheckpointFolder.list path) ->
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
