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
        Training.FineTuneResult result;
        using (var progress = new ProgressDisplay(0))
        {
            result = Training.EmbeddedRun.run(
                runSettings,
                Microsoft.FSharp.Core.FuncConvert.FromAction<string>(progress.Message),
                Microsoft.FSharp.Core.FuncConvert.FromAction<Training.StepLog>(log => progress.Report(FineTuning.ToProgress(log))));
        }
        Report.Print(FineTuning.ToResult(result));
        Console.WriteLine($"try:     functional generate --model {result.FinalModelPath} --greedy --prompt \" Human: reverse q w e r t Assistant:\"");
        return 0;
    }
}
