using Functional.Training;
using Microsoft.FSharp.Core;

namespace Functional;

/// <summary>What a fine-tuning run reports after each logged optimizer step.</summary>
/// <param name="Step">The optimizer step just taken, from 1.</param>
/// <param name="TotalSteps">The optimizer steps of the whole run.</param>
/// <param name="Epoch">Fractional epoch reached (HF's "epoch").</param>
/// <param name="Loss">The step's token-weighted mean loss over its accumulation window.</param>
/// <param name="LearningRate">The learning rate the step used.</param>
/// <param name="GradNorm">The global gradient norm before clipping.</param>
/// <param name="TokensPerSecond">Real (non-padding) tokens per second since the run started.</param>
public readonly record struct TrainingProgress(
    int Step, int TotalSteps, double Epoch, double Loss, double LearningRate, double GradNorm, double TokensPerSecond);

/// <summary>The outcome of a finished run.</summary>
/// <param name="Steps">Optimizer steps taken.</param>
/// <param name="FinalLoss">Loss of the last step.</param>
/// <param name="MetricsPath">The metrics.jsonl written.</param>
/// <param name="FinalModelPath">The HF model folder of the trained weights.</param>
/// <param name="Seconds">Wall-clock duration of the run.</param>
public sealed record FineTuneResult(int Steps, double FinalLoss, string MetricsPath, string FinalModelPath, double Seconds);

/// <summary>Runs fine-tuning jobs described by <see cref="FineTuneOptions"/>.</summary>
public static class FineTuning
{
    /// <summary>
    /// Validates the options, the model folder and the data before anything is written, then trains and saves.
    /// Bad input raises <see cref="InvalidInputException"/> naming the option, file and line.
    /// </summary>
    /// <param name="options">What to train and how.</param>
    /// <param name="onProgress">Called after each logged optimizer step; may be null.</param>
    public static FineTuneResult Run(FineTuneOptions options, Action<TrainingProgress>? onProgress = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        var request = new FineTuneRequest(
            Required(options.ModelPath, "--model"),
            Required(options.DataPath, "--data"),
            Required(options.OutputPath, "--output"),
            options.OverwriteOutputDir,
            ToCore(options));
        var report = FuncConvert.FromAction<StepLog>(log => onProgress?.Invoke(new TrainingProgress(
            log.Step, log.TotalSteps, log.Epoch, log.Loss, log.LearningRate, log.GradNorm, log.TokensPerSecond)));
        var result = FineTune.run(request, report);
        return new FineTuneResult(result.Steps, result.FinalLoss, result.MetricsPath, result.FinalModelPath, result.Seconds);
    }

    private static string Required(string value, string option) =>
        string.IsNullOrWhiteSpace(value) ? throw new InvalidInputException(option, "", "is required") : value;

    private static TrainOptions ToCore(FineTuneOptions o)
    {
        var kind = Schedule.parseName(o.LrSchedulerType);
        if (FSharpOption<SchedulerKind>.get_IsNone(kind))
        {
            throw new InvalidInputException("--lr-scheduler-type", "", Schedule.unknownNameProblem(o.LrSchedulerType));
        }
        var scheduleOptions = o.LrSchedulerKwargs is null
            ? ScheduleOptions.Defaults
            : SchedulerKwargs.parse("--lr-scheduler-kwargs", o.LrSchedulerKwargs);
        return new TrainOptions(
            o.PerDeviceTrainBatchSize,
            o.GradientAccumulationSteps,
            o.LearningRate,
            o.WeightDecay,
            o.AdamBeta1,
            o.AdamBeta2,
            o.AdamEpsilon,
            o.Optimizer == OptimizerType.Sgd ? OptimizerKind.Sgd : OptimizerKind.AdamW,
            o.Momentum,
            o.Nesterov,
            kind.Value,
            scheduleOptions,
            o.NumWarmupSteps,
            o.WarmupRatio,
            o.NumTrainEpochs,
            o.MaxSteps,
            o.MaxGradNorm,
            o.MaxSeqLen,
            o.Seed,
            !o.NoShuffle,
            o.LoggingSteps,
            o.Threads,
            o.EvalSteps,
            o.PerDeviceEvalBatchSize);
    }
}
