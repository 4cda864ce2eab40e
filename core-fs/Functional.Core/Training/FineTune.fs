namespace Functional.Training

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Functional
open Functional.Checkpoint
open Functional.Data

/// A fine-tuning job: where the model, data and output are, and how to train.
[<NoComparison>]
type FineTuneRequest =
    { /// A Hugging Face model folder (config.json + model.safetensors).
      ModelPath: string
      /// Pre-tokenized JSON Lines.
      DataPath: string
      /// The output folder (metrics.jsonl, final/).
      OutputPath: string
      /// Allow an output folder that is not empty.
      OverwriteOutputDir: bool
      /// The hyperparameters.
      Options: TrainOptions }

/// What a finished job wrote.
[<NoComparison>]
type FineTuneResult =
    { /// Optimizer steps taken.
      Steps: int
      /// The last step's loss.
      FinalLoss: float
      /// OUTPUT/metrics.jsonl.
      MetricsPath: string
      /// OUTPUT/final: config.json + model.safetensors in HF naming.
      FinalModelPath: string
      /// Wall-clock seconds of the whole job.
      Seconds: float }

/// Runs a fine-tuning job end to end: everything is validated before anything is written.
[<RequireQualifiedAccess>]
module FineTune =

    let private jsonOptions =
        JsonSerializerOptions(NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)

    /// One metrics.jsonl line (HF's names: step, epoch, loss, lr, grad_norm, and num_tokens: the
    /// window's predicted tokens). Timings stay out, so the same seed gives the same file.
    let metricsLine (log: StepLog) =
        let fields =
            Collections.Generic.Dictionary<string, obj>(
                dict
                    [ "step", box log.Step
                      "epoch", box log.Epoch
                      "loss", box log.Loss
                      "lr", box log.LearningRate
                      "grad_norm", box log.GradNorm
                      "num_tokens", box log.PredictedTokens ])
        JsonSerializer.Serialize(fields, jsonOptions)

    let private checkOutputFolder (request: FineTuneRequest) =
        let path = request.OutputPath
        if File.Exists path then InvalidInput.fail path "" "the output path is a file (expected a folder)"
        if Directory.Exists path && Directory.EnumerateFileSystemEntries path |> Seq.isEmpty |> not && not request.OverwriteOutputDir then
            InvalidInput.fail path "" "the output folder already exists and is not empty; pass --overwrite-output-dir to write into it"

    /// Validates options, output folder, model folder and data (raising InvalidInputException before
    /// anything is written), then trains, writing OUTPUT/metrics.jsonl as it goes and OUTPUT/final/ at the
    /// end (staged and renamed, so a failed run never leaves a half-written final/).
    let run (request: FineTuneRequest) (onStep: StepLog -> unit) : FineTuneResult =
        let clock = Stopwatch.StartNew()
        TrainOptions.validate request.Options
        checkOutputFolder request
        let model = HfModelFolder.load request.ModelPath request.Options.Seed
        let sourceConfig = File.ReadAllText(Path.Combine(request.ModelPath, "config.json"))
        let dataset = TokenizedDataset.load request.DataPath
        TokenizedDataset.checkVocabulary (Functional.Models.ModelConfig.vocabSize model.Config) dataset
        if Array.map2 (Batching.predictedTokens request.Options.MaxSeqLen) dataset.PromptLengths dataset.Rows |> Array.sum = 0L then
            InvalidInput.fail request.DataPath "" "no row has two or more tokens: there is nothing to predict"
        let plan = Trainer.plan request.Options dataset.Rows.Length
        Directory.CreateDirectory request.OutputPath |> ignore
        let metricsPath = Path.Combine(request.OutputPath, "metrics.jsonl")
        let finalPath = Path.Combine(request.OutputPath, "final")
        let trained =
            use metrics = new StreamWriter(metricsPath, false)
            Trainer.train plan model dataset None (fun log ->
                metrics.WriteLine(metricsLine log)
                metrics.Flush()
                onStep log) (fun _ _ -> ())
        HfModelFolder.save finalPath model (Some sourceConfig)
        trained.Parameters.Dispose()
        { Steps = trained.Steps
          FinalLoss = trained.FinalLoss
          MetricsPath = metricsPath
          FinalModelPath = finalPath
          Seconds = clock.Elapsed.TotalSeconds }
