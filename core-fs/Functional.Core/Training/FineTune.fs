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

/// A fine-tuning job: where the model, data and output are, and how to train.
[<NoComparison>]
type FineTuneRequest =
    { /// A Hugging Face model folder (config.json + model.safetensors, tokenizer files optional).
      ModelPath: string
      /// Training data: JSON or JSON Lines (prompt/answer shapes, text or input_ids).
      DataPath: string
      /// The output folder (metrics.jsonl, TensorBoard events, plot, final/).
      OutputPath: string
      /// Allow an output folder that is not empty.
      OverwriteOutputDir: bool
      /// The hyperparameters.
      Options: TrainOptions
      /// Data reading, evaluation and scoring.
      Data: DataSettings }

/// Evaluation figures at one point of a run.
[<NoComparison>]
type EvalFigures =
    { /// Token-weighted loss and perplexity on the evaluation set.
      Eval: EvalResult
      /// Fraction of scored evaluation samples whose generated answer equals the reference (0 to 1).
      ExactMatch: float option }

/// What a finished job wrote and measured.
[<NoComparison>]
type FineTuneResult =
    { /// Optimizer steps taken.
      Steps: int
      /// The last step's loss.
      FinalLoss: float
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

    let private checkOutputFolder (request: FineTuneRequest) =
        let path = request.OutputPath
        if File.Exists path then InvalidInput.fail path "" "the output path is a file (expected a folder)"
        if Directory.Exists path && Directory.EnumerateFileSystemEntries path |> Seq.isEmpty |> not && not request.OverwriteOutputDir then
            InvalidInput.fail path "" "the output folder already exists and is not empty; pass --overwrite-output-dir to write into it"

    /// Exact-match accuracy of greedy answers to the first `count` samples: the generated text, trimmed,
    /// equals the reference answer, trimmed.
    let exactMatch (model: CausalLm) (tokenizer: TextTokenizer) (samples: Sample[]) (count: int) (maxNewTokens: int) =
        let scored = samples |> Array.truncate count |> Array.filter (fun s -> s.Prompt <> "")
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

    /// Validates options, output folder, model folder, tokenizer and data (raising InvalidInputException
    /// before anything is written), then trains, writing OUTPUT/metrics.jsonl and TensorBoard events as it
    /// goes, and at the end OUTPUT/final/ (staged and renamed, so a failed run never leaves a half-written
    /// model), OUTPUT/loss.png and a last metrics line with HF's summary fields and the final evaluation.
    let run (request: FineTuneRequest) (onStep: StepLog -> unit) : FineTuneResult =
        let clock = Stopwatch.StartNew()
        let options = request.Options
        TrainOptions.validate options
        checkOutputFolder request
        let model = HfModelFolder.load request.ModelPath options.Seed
        let sourceConfig = File.ReadAllText(Path.Combine(request.ModelPath, "config.json"))
        let tokenizer = tokenizerFor request
        let promptOptions = { request.Data.Prompt with MaxSeqLen = options.MaxSeqLen; Seed = options.Seed }
        let data =
            match request.Data.CachePath with
            | Some cache -> fst (DataCache.loadTrainAndEval cache request.DataPath request.Data.EvalDataPath promptOptions tokenizer)
            | None -> PromptDataset.loadTrainAndEval request.DataPath request.Data.EvalDataPath promptOptions tokenizer
        let vocabSize = ModelConfig.vocabSize model.Config
        TokenizedDataset.checkVocabulary vocabSize data.Train
        data.Eval |> Option.iter (TokenizedDataset.checkVocabulary vocabSize)
        let plan = Trainer.plan options data.Train.Rows.Length
        Directory.CreateDirectory request.OutputPath |> ignore
        let metricsPath = Path.Combine(request.OutputPath, "metrics.jsonl")
        let finalPath = Path.Combine(request.OutputPath, "final")
        let plotPath = Path.Combine(request.OutputPath, "loss.png")
        let evaluate eval = Evaluation.evaluate model eval options.PerDeviceEvalBatchSize options.MaxSeqLen Trainer.PadId
        let before = data.Eval |> Option.map (fun eval -> figures request model tokenizer (evaluate eval) data.EvalSamples)
        let mutable lastEval = None
        let steps = ResizeArray<int * float * float>()
        let evalPoints = ResizeArray<int * float>()
        let trainClock = Stopwatch()
        let trained =
            use metrics = new StreamWriter(metricsPath, false)
            use events = TensorBoard.create request.OutputPath
            let write (line: string) =
                metrics.WriteLine line
                metrics.Flush()
            before
            |> Option.iter (fun b ->
                write (jsonLine [ "step", box 0; "eval_loss", box b.Eval.Loss; "eval_perplexity", box b.Eval.Perplexity ])
                TensorBoard.scalars events 0L [ "eval/loss", b.Eval.Loss; "eval/perplexity", b.Eval.Perplexity ]
                evalPoints.Add(0, b.Eval.Loss))
            trainClock.Start()
            let result =
                Trainer.train plan model data.Train data.Eval
                    (fun log ->
                        write (metricsLine log)
                        TensorBoard.scalars events (int64 log.Step)
                            [ "train/loss", log.Loss; "train/learning_rate", log.LearningRate; "train/grad_norm", log.GradNorm ]
                        steps.Add(log.Step, log.Loss, log.LearningRate)
                        onStep log)
                    (fun step eval ->
                        write (jsonLine [ "step", box step; "eval_loss", box eval.Loss; "eval_perplexity", box eval.Perplexity ])
                        TensorBoard.scalars events (int64 step) [ "eval/loss", eval.Loss; "eval/perplexity", eval.Perplexity ]
                        evalPoints.Add(step, eval.Loss)
                        lastEval <- Some eval)
            trainClock.Stop()
            // The trainer evaluates after the last step, so the final loss is already known.
            let after = lastEval |> Option.map (fun eval -> figures request model tokenizer eval data.EvalSamples)
            let runtime = trainClock.Elapsed.TotalSeconds
            let samples = float plan.TotalSteps * float (options.PerDeviceTrainBatchSize * options.GradientAccumulationSteps)
            write (
                jsonLine
                    [ yield "step", box plan.TotalSteps
                      yield "train_runtime", box runtime
                      yield "train_samples_per_second", box (samples / runtime)
                      yield "train_steps_per_second", box (float plan.TotalSteps / runtime)
                      yield "train_loss", box result.FinalLoss
                      match after with
                      | Some a ->
                          yield "eval_loss", box a.Eval.Loss
                          yield "eval_perplexity", box a.Eval.Perplexity
                          match a.ExactMatch with
                          | Some m -> yield "eval_exact_match", box m
                          | None -> ()
                      | None -> () ])
            result, after
        let result, after = trained
        let tokenizerCopies =
            if request.Data.TokenizerName.IsSome then []
            else tokenizerFiles |> List.map (fun f -> Path.Combine(request.ModelPath, f)) |> List.filter File.Exists
        HfModelFolder.save finalPath model (Some sourceConfig) tokenizerCopies
        MetricsPlot.save plotPath (List.ofSeq steps) (List.ofSeq evalPoints)
        result.Parameters.Dispose()
        { Steps = result.Steps
          FinalLoss = result.FinalLoss
          MetricsPath = metricsPath
          FinalModelPath = finalPath
          PlotPath = plotPath
          Before = before
          After = after
          SkippedRows = data.Skipped
          TrainRuntime = trainClock.Elapsed.TotalSeconds
          Seconds = clock.Elapsed.TotalSeconds }
