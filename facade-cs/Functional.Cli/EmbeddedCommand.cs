using System.CommandLine;
using Functional.Demo;

namespace Functional.Cli;

/// <summary>`functional train` without --model and --data: the embedded default run.</summary>
internal static class EmbeddedCommand
{
    /// <summary>Runs the embedded default; only --output, --seed, --threads and --max-steps apply to it.</summary>
    public static int Run(ParseResult parse, Option<string> output, Option<long> seed, Option<int> threads, Option<int> maxSteps)
    {
        var allowed = new HashSet<string> { output.Name, seed.Name, threads.Name, maxSteps.Name };
        var other = parse.CommandResult.Children.OfType<System.CommandLine.Parsing.OptionResult>()
            .Where(r => !r.Implicit && !allowed.Contains(r.Option.Name))
            .Select(r => r.Option.Name)
            .FirstOrDefault();
        if (other is not null)
        {
            throw new InvalidInputException(other, "",
                "applies to fine-tuning a --model on --data; the embedded default run (no --model, no --data) takes only --output, --seed, --threads and --max-steps");
        }
        var outputPath = !CliOption.Given(parse, output) ? EmbeddedDemo.DefaultOutputPath : parse.GetValue(output)!;
        int? seedValue = !CliOption.Given(parse, seed) ? null : checked((int)parse.GetValue(seed));
        int? steps = !CliOption.Given(parse, maxSteps) ? null : parse.GetValue(maxSteps);
        Console.WriteLine("Embedded default run: a small LLaMA learns to reverse and sort letters from scratch.");
        FineTuneResult? result;
        using (var signals = new StopOnSignal($"stopping after the current step without saving ({outputPath} is left as it was)"))
        using (var progress = new ProgressDisplay(0))
        {
            try
            {
                result = EmbeddedDemo.Run(
                    outputPath, seedValue, steps, parse.GetValue(threads), signals.Token,
                    progress.Report, e => progress.Message(Report.EvaluationLine(e)), progress.Message);
            }
            catch (OperationCanceledException) when (signals.Received is not null)
            {
                result = null;
            }
            if (result is null || result.Interrupted)
            {
                var when = result is null ? "before training" : $"after step {result.Steps}";
                progress.Message($"interrupted by {signals.Received} {when}: nothing was saved and {outputPath} is unchanged (the run is short: start it again to train)");
                return signals.ExitCode;
            }
        }
        Report.Print(result);
        Console.WriteLine($"try:     functional generate --model {result.FinalModelPath} --greedy --prompt \" Human: reverse q w e r t Assistant:\"");
        return 0;
    }

    /// <summary>Runs the embedded classification demo (--task sequence-classification without --model and --data);
    /// only --output, --seed, --threads, --max-steps and --task apply to it.</summary>
    public static int RunClassification(ParseResult parse, Option<string> output, Option<long> seed, Option<int> threads, Option<int> maxSteps, Option<string> task)
    {
        var allowed = new HashSet<string> { output.Name, seed.Name, threads.Name, maxSteps.Name, task.Name };
        var other = parse.CommandResult.Children.OfType<System.CommandLine.Parsing.OptionResult>()
            .Where(r => !r.Implicit && !allowed.Contains(r.Option.Name))
            .Select(r => r.Option.Name)
            .FirstOrDefault();
        if (other is not null)
        {
            throw new InvalidInputException(other, "",
                "applies to fine-tuning a --model on --data; the embedded classification demo (--task sequence-classification, no --model, no --data) takes only --output, --seed, --threads and --max-steps");
        }
        var outputPath = !CliOption.Given(parse, output) ? EmbeddedDemo.ClassificationOutputPath : parse.GetValue(output)!;
        int? seedValue = !CliOption.Given(parse, seed) ? null : checked((int)parse.GetValue(seed));
        int? steps = !CliOption.Given(parse, maxSteps) ? null : parse.GetValue(maxSteps);
        Console.WriteLine("Embedded classification demo: a small LLaMA classifier learns the sentiment of short reviews, negation included.");
        FineTuneResult? result;
        using (var signals = new StopOnSignal($"stopping after the current step without saving ({outputPath} is left as it was)"))
        using (var progress = new ProgressDisplay(0))
        {
            try
            {
                result = EmbeddedDemo.RunClassification(
                    outputPath, seedValue, steps, parse.GetValue(threads), signals.Token,
                    progress.Report, e => progress.Message(Report.EvaluationLine(e)), progress.Message);
            }
            catch (OperationCanceledException) when (signals.Received is not null)
            {
                result = null;
            }
            if (result is null || result.Interrupted)
            {
                progress.Message($"interrupted by {signals.Received}: nothing was saved and {outputPath} is unchanged");
                return signals.ExitCode;
            }
        }
        Report.Print(result);
        return 0;
    }
}
