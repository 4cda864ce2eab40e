using System.CommandLine;

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
        var defaults = Training.EmbeddedRun.defaults;
        var outputPath = !CliOption.Given(parse, output) ? defaults.OutputPath : parse.GetValue(output)!;
        var runSettings = new Training.EmbeddedSettings(
            outputPath,
            !CliOption.Given(parse, seed) ? defaults.Seed : checked((int)parse.GetValue(seed)),
            defaults.TrainSamples,
            defaults.EvalSamples,
            !CliOption.Given(parse, maxSteps) ? defaults.MaxSteps : parse.GetValue(maxSteps),
            parse.GetValue(threads));
        Console.WriteLine("Embedded default run: a small LLaMA learns to reverse and sort letters from scratch.");
        FineTuneResult? result;
        using (var signals = new StopOnSignal($"stopping after the current step without saving ({outputPath} is left as it was)"))
        using (var progress = new ProgressDisplay(0))
        {
            var events = FineTuning.Events(
                progress.Report, e => progress.Message(Report.EvaluationLine(e)), progress.Message);
            try
            {
                result = FineTuning.ToResult(Training.EmbeddedRun.run(runSettings, signals.Token, events));
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
}
