namespace Functional;

/// <summary>
/// The entry point for C# callers: <c>Trainer.CreateBuilder().UseModel(folder).UseData(file).UseOutput(folder)
/// .UseAdamW(3e-4).UseCosineSchedule(warmupSteps: 100).AccumulateGradients(8).Build().Fit()</c>.
/// (The F# core's training loop is <c>Functional.Training.TrainingLoop</c>.)
/// </summary>
public static class Trainer
{
    /// <summary>A new builder with every setting at the command line's (Hugging Face's) default.</summary>
    public static TrainerBuilder CreateBuilder() => new(commandLine: false);

    /// <summary>A builder whose errors keep the command line's option names, for the `functional train` command.</summary>
    internal static TrainerBuilder CreateCommandLineBuilder() => new(commandLine: true);
}
