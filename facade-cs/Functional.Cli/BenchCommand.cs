using System.CommandLine;
using Functional.Checkpoint;
using Functional.Generation;
using Functional.Models;
using Microsoft.FSharp.Collections;

namespace Functional.Cli;

/// <summary>`functional bench`: benchmarks that print figures.</summary>
internal static class BenchCommand
{
    public static Command Create()
    {
        var model = CliOption.Create<string?>("--model", "Hugging Face model folder (default: a random model the size of the embedded default's).", null);
        var lengths = CliOption.Create("--lengths", "Numbers of new tokens to time, comma separated.", "32,64,128,256");
        var threads = CliOption.Create("--threads", "Intra-op threads (0: all cores).", 0);
        var generation = new Command("generation", "Seconds per generated token with and without the key/value cache, for several lengths.")
        {
            model, lengths, threads,
        };
        generation.SetAction(parse =>
        {
            var counts = parse.GetValue(lengths)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(s => int.TryParse(s, out var n) ? n : throw new InvalidInputException("--lengths", "", $"expected whole numbers separated by commas, found '{s}'"))
                .ToList();
            if (parse.GetValue(threads) > 0)
            {
                TorchSharp.torch.set_num_threads(parse.GetValue(threads));
            }
            var lm = parse.GetValue(model) is { } path
                ? HfModelFolder.load(path, 1)
                : CausalLmModule.create(Training.EmbeddedRun.modelConfig(512), 1);
            Console.WriteLine($"generation benchmark, {TorchSharp.torch.get_num_threads()} threads: one prompt of 8 tokens, greedy");
            Console.Write(GenerationBenchmark.format(GenerationBenchmark.run(lm, ListModule.OfSeq(counts))));
            return 0;
        });
        return new Command("bench", "Benchmarks that print figures.") { generation };
    }
}
