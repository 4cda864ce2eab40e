using System.CommandLine;
using Functional.Demo;

namespace Functional.Cli;

/// <summary>`functional train` without --model and --data: the embedded default run.</summary>
internal static class EmbeddedCommand
{
    /// <summary>Runs the embedded default; only --output, --seed, --threads and --max-steps apply to it.</summary>
    public static int Run(ParseResult parse, Option<string> output, Option<long> seed, Option<int> threads, Option<int> maxSteps)
    {
        var outputPath = Prepare(parse, output, seed, maxSteps, [output, seed, threads, maxSteps],
            "the embedded default run (no --model, no --data)", EmbeddedDemo.DefaultOutputPath,
            out var seedValue, out var steps);
        Console.WriteLine("Embedded default run: a small LLaMA learns to reverse and sort letters from scratch.");
        var result = Execute(outputPath, EmbeddedDemo.Run, seedValue, steps, parse.GetValue(threads), out var exitCode,
            (received, result) =>
            {
                var when = result is null ? "before training" : $"after step {result.Steps}";
                return $"interrupted by {received} {when}: nothing was saved and {outputPath} is unchanged (the run is short: start it again to train)";
            });
        if (result is null)
        {
            return exitCode;
        }
        Report.Print(result);
        Console.WriteLine($"try:     functional generate --model {result.FinalModelPath} --greedy --prompt \" Human: reverse q w e r t Assistant:\"");
        return 0;
    }

    /// <summary>Runs the embedded classification demo (--task sequence-classification without --model and --data);
    /// only --output, --seed, --threads, --max-steps and --task apply to it.</summary>
    public static int RunClassification(ParseResult parse, Option<string> output, Option<long> seed, Option<int> threads, Option<int> maxSteps, Option<string> task)
    {
        var outputPath = Prepare(parse, output, seed, maxSteps, [output, seed, threads, maxSteps, task],
            "the embedded classification demo (--task sequence-classification, no --model, no --data)", EmbeddedDemo.ClassificationOutputPath,
            out var seedValue, out var steps);
        Console.WriteLine("Embedded classification demo: a small LLaMA classifier learns the sentiment of short reviews, negation included.");
        var result = Execute(outputPath, EmbeddedDemo.RunClassification, seedValue, steps, parse.GetValue(threads), out var exitCode,
            (received, _) => $"interrupted by {received}: nothing was saved and {outputPath} is unchanged");
        if (result is null)
        {
            return exitCode;
        }
        Report.Print(result);
        return 0;
    }

    /// <summary>The embedded demos' entry points (EmbeddedDemo.Run, EmbeddedDemo.RunClassification).</summary>
    private delegate FineTuneResult Demo(
        string outputPath, int? seed, int? maxSteps, int threads, CancellationToken cancellation,
        Action<TrainingProgress> onProgress, Action<EvaluationProgress> onEvaluation, Action<string> onMessage);

    /// <summary>Refuses any given option outside allowed (naming the demo as what takes only --output, --seed,
    /// --threads and --max-steps) and reads the output path (defaultOutput unless given), the seed and the steps.</summary>
    private static string Prepare(ParseResult parse, Option<string> output, Option<long> seed, Option<int> maxSteps,
        Option[] allowed, string demo, string defaultOutput, out int? seedValue, out int? steps)
    {
        var names = allowed.Select(o => o.Name).ToHashSet();
        var other = parse.CommandResult.Children.OfType<System.CommandLine.Parsing.OptionResult>()
            .Where(r => !r.Implicit && !names.Contains(r.Option.Name))
            .Select(r => r.Option.Name)
            .FirstOrDefault();
        if (other is not null)
        {
            throw new InvalidInputException(other, "",
                $"applies to fine-tuning a --model on --data; {demo} takes only --output, --seed, --threads and --max-steps");
        }
        seedValue = !CliOption.Given(parse, seed) ? null : checked((int)parse.GetValue(seed));
        steps = !CliOption.Given(parse, maxSteps) ? null : parse.GetValue(maxSteps);
        return !CliOption.Given(parse, output) ? defaultOutput : parse.GetValue(output)!;
    }

    /// <summary>Runs the demo with progress on the console, stopping cleanly on a signal: the result, or null
    /// when a signal interrupted it (then interrupted's message is shown and exitCode is the signal's).</summary>
    private static FineTuneResult? Execute(string outputPath, Demo run, int? seed, int? steps, int threads, out int exitCode,
        Func<string?, FineTuneResult?, string> interrupted)
    {
        FineTuneResult? result;
        using var signals = new StopOnSignal($"stopping after the current step without saving ({outputPath} is left as it was)");
        using var progress = new ProgressDisplay(0);
        try
        {
            result = run(
                outputPath, seed, steps, threads, signals.Token,
                progress.Report, e => progress.Message(Report.EvaluationLine(e)), progress.Message);
        }
        catch (OperationCanceledException) when (signals.Received is not null)
        {
            result = null;
        }
        if (result is null || result.Interrupted)
        {
            progress.Message(interrupted(signals.Received, result));
            exitCode = signals.ExitCode;
            return null;
        }
        exitCode = 0;
        return result;
    }
}
