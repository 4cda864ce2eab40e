namespace Functional.Demo

open System
open System.IO
open System.Threading
open Functional
open Functional.Training

/// The embedded default run for .NET callers (the `functional train` command without --model and --data):
/// .NET types in, the facade's result and callbacks out, so the caller handles no F# type.
[<AbstractClass; Sealed>]
type EmbeddedDemo =

    /// Where the run lands by default (runs/embedded).
    static member DefaultOutputPath: string = EmbeddedRun.defaults.OutputPath

    /// Runs the embedded default (EmbeddedRun.run): a small LLaMA learns to reverse and sort letters from
    /// scratch. outputPath null, seed null and maxSteps null keep the defaults; threads 0 adapts to the
    /// machine. Cancelled while the data and model are prepared it raises OperationCanceledException;
    /// cancelled while training it returns a result with Interrupted set (nothing saved).
    static member Run
        (
            outputPath: string,
            seed: Nullable<int>,
            maxSteps: Nullable<int>,
            threads: int,
            cancellation: CancellationToken,
            onProgress: Action<TrainingProgress>,
            onEvaluation: Action<EvaluationProgress>,
            onMessage: Action<string>
        ) : FineTuneResult =
        let defaults = EmbeddedRun.defaults
        let settings =
            { defaults with
                OutputPath = (if isNull outputPath then defaults.OutputPath else outputPath)
                Seed = (if seed.HasValue then seed.Value else defaults.Seed)
                MaxSteps = (if maxSteps.HasValue then maxSteps.Value else defaults.MaxSteps)
                Threads = threads }
        let events = FineTuning.Events(onProgress, onEvaluation, onMessage)
        FineTuning.ToResult(EmbeddedRun.run settings cancellation events)

    /// Where the classification demo lands by default (runs/embedded-classification).
    static member ClassificationOutputPath: string = Path.Combine("runs", "embedded-classification")

    /// Runs the embedded classification demo (EmbeddedClassification.run): a small LLaMA classifier learns
    /// the sentiment of synthetic reviews, negation included, from 2,000 of them in 300 steps. Nulls keep
    /// the defaults; cancellation as Run.
    static member RunClassification
        (
            outputPath: string,
            seed: Nullable<int>,
            maxSteps: Nullable<int>,
            threads: int,
            cancellation: CancellationToken,
            onProgress: Action<TrainingProgress>,
            onEvaluation: Action<EvaluationProgress>,
            onMessage: Action<string>
        ) : FineTuneResult =
        let settings =
            { EmbeddedRun.defaults with
                OutputPath = (if isNull outputPath then EmbeddedDemo.ClassificationOutputPath else outputPath)
                Seed = (if seed.HasValue then seed.Value else EmbeddedRun.defaults.Seed)
                TrainSamples = 2000
                EvalSamples = 200
                MaxSteps = (if maxSteps.HasValue then maxSteps.Value else 300)
                Threads = threads }
        let events = FineTuning.Events(onProgress, onEvaluation, onMessage)
        FineTuning.ToResult(EmbeddedClassification.run settings cancellation events)
