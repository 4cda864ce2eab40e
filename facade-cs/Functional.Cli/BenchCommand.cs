using System.CommandLine;
using Functional.Checkpoint;
using Functional.Generation;
using Functional.Models;
using Microsoft.FSharp.Collections;

namespace Functional.Cli;

/// <summary>`functional bench`: benchmarks that print figures.</summary>
internal static class BenchCommand
{
    /// <summary>A GPT-2 of the given depth and width with an 8192-token vocabulary (the configurations the
    /// performance issue compares with PyTorch).</summary>
    private static Models.CausalLm Gpt2(int layers, int width) =>
        CausalLmModule.create(
            ModelConfigModule.parse("bench", $$"""{"model_type": "gpt2", "vocab_size": 8192, "n_positions": 1024, "n_embd": {{width}}, "n_layer": {{layers}}, "n_head": {{width / 64}}}"""),
            1);

    private static Command PrecisionCommand()
    {
        var layers = CliOption.Create("--layers", "Transformer blocks.", 12);
        var width = CliOption.Create("--width", "Hidden size.", 256);
        var batch = CliOption.Create("--batch", "Rows per micro-batch.", 4);
        var sequence = CliOption.Create("--seq-len", "Tokens per row.", 128);
        var steps = CliOption.Create("--steps", "Optimizer steps per precision.", 200);
        var threads = CliOption.Create("--threads", "Intra-op threads (0: all cores).", 0);
        var command = new Command("precision", "Tokens/s and final loss of the same training in fp32 and in bf16 (fp32 master weights).")
        {
            layers, width, batch, sequence, steps, threads,
        };
        command.SetAction(parse =>
        {
            if (parse.GetValue(threads) > 0)
            {
                TorchSharp.torch.set_num_threads(parse.GetValue(threads));
            }
            int rowsPerStep = parse.GetValue(batch), length = parse.GetValue(sequence), total = parse.GetValue(steps);
            // A learnable stream: each row counts up from a random start, modulo the vocabulary.
            var random = new Random(7);
            var rows = Enumerable.Range(0, rowsPerStep * total)
                .Select(_ => { var start = random.Next(8192); return Enumerable.Range(0, length).Select(i => (long)((start + i) % 8192)).ToArray(); })
                .ToArray();
            var data = new Data.TokenizedDataset("bench", rows, Enumerable.Range(1, rows.Length).ToArray(), new int[rows.Length]);
            Console.WriteLine($"GPT-2, {parse.GetValue(layers)} layers, width {parse.GetValue(width)}, vocabulary 8192; batch {rowsPerStep} x {length} tokens, {total} steps, {TorchSharp.torch.get_num_threads()} threads");
            Console.WriteLine("precision   tokens/s   final loss");
            var results = new List<(string Name, double TokensPerSecond, double Loss)>();
            foreach (var (name, precision) in new[] { ("fp32", Training.Precision.Fp32), ("bf16", Training.Precision.Bf16) })
            {
                var lm = Gpt2(parse.GetValue(layers), parse.GetValue(width));
                var options = Training.TrainOptionsModule.defaults;
                options = new Training.TrainOptions(
                    rowsPerStep, 1, 1e-3, options.WeightDecay, options.AdamBeta1, options.AdamBeta2, options.AdamEpsilon,
                    options.Optimizer, options.Momentum, options.Nesterov, SchedulerKind.Constant, options.LrSchedulerOptions,
                    0, 0, options.NumTrainEpochs, total, options.MaxGradNorm, length, options.Seed, false, 1, options.Threads,
                    options.EvalSteps, options.PerDeviceEvalBatchSize, options.EvalStrategy, Training.IntervalStrategy.No, options.SaveSteps,
                    options.SaveTotalLimit, options.MetricForBestModel, options.GreaterIsBetter, options.LoadBestModelAtEnd,
                    options.EarlyStoppingPatience, precision);
                var plan = Training.Trainer.plan(options, rows.Length);
                Training.StepLog? last = null;
                var hooks = new Training.TrainHooks(
                    Microsoft.FSharp.Core.FuncConvert.FromAction<Training.StepLog>(log => last = log),
                    Microsoft.FSharp.Core.FuncConvert.FromFunc<Training.StepContext, Training.StepDecision>(_ => Training.StepDecision.Continue));
                Training.Trainer.train(plan, lm, data, Microsoft.FSharp.Core.FSharpOption<Training.ResumePoint>.None, hooks).Parameters.Dispose();
                Console.WriteLine($"{name,-9} {last!.TokensPerSecond,10:F0} {last.Loss,12:F4}");
                results.Add((name, last.TokensPerSecond, last.Loss));
            }
            Console.WriteLine($"bf16 / fp32: {results[1].TokensPerSecond / results[0].TokensPerSecond:F2}x tokens/s; final loss {100 * (results[1].Loss / results[0].Loss - 1):+0.00;-0.00}%");
            return 0;
        });
        return command;
    }

    private static Command MemoryCommand()
    {
        var layers = CliOption.Create("--layers", "Transformer blocks.", 12);
        var width = CliOption.Create("--width", "Hidden size.", 768);
        var batch = CliOption.Create("--batch", "Rows per micro-batch.", 4);
        var sequence = CliOption.Create("--seq-len", "Tokens per row.", 256);
        var loraDim = CliOption.Create("--lora-dim", "LoRA rank for the optimizer-state comparison.", 8);
        var threads = CliOption.Create("--threads", "Intra-op threads (0: all cores).", 0);
        var command = new Command("memory", "Activation memory and step time with and without gradient checkpointing; LoRA vs full fine-tuning optimizer state.")
        {
            layers, width, batch, sequence, loraDim, threads,
        };
        command.SetAction(parse =>
        {
            if (parse.GetValue(threads) > 0)
            {
                TorchSharp.torch.set_num_threads(parse.GetValue(threads));
            }
            var lm = Gpt2(parse.GetValue(layers), parse.GetValue(width));
            var parameters = CausalLmModule.parameterSpec(lm).Sum(p => p.Item2.Aggregate(1L, (a, b) => a * b));
            Console.WriteLine($"GPT-2, {parse.GetValue(layers)} layers, width {parse.GetValue(width)}, vocabulary 8192: {parameters:N0} parameters; " +
                $"batch {parse.GetValue(batch)} x {parse.GetValue(sequence)} tokens, {TorchSharp.torch.get_num_threads()} threads, fp32");
            using (var ids = TorchSharp.torch.randint(8192, [parse.GetValue(batch), parse.GetValue(sequence)], dtype: TorchSharp.torch.int64))
            {
                var (plain, checkpointed) = Models.ActivationCheckpointing.measure(lm.Module, ids).ToValueTuple();
                Console.WriteLine("                          activations kept   step (fwd+bwd)");
                Console.WriteLine($"plain                     {plain.RetainedBytes / 1e6,12:F0} MB   {plain.Seconds,10:F2} s");
                Console.WriteLine($"gradient checkpointing    {checkpointed.RetainedBytes / 1e6,12:F0} MB   {checkpointed.Seconds,10:F2} s");
                Console.WriteLine($"activation memory {100.0 * (1 - (double)checkpointed.RetainedBytes / plain.RetainedBytes):F0}% lower; step time {100.0 * (checkpointed.Seconds / plain.Seconds - 1):+0;-0}%");
            }
            var targets = Microsoft.FSharp.Collections.ListModule.OfSeq(new[] { "c_attn" });
            using var adapters = Peft.Lora.wrap(new Peft.LoraConfig(parse.GetValue(loraDim), 16, 0, targets, Microsoft.FSharp.Core.FSharpOption<string>.None), lm, 1);
            var adapterParameters = Peft.Lora.parameters(adapters).Sum(p => p.Item2.numel());
            // AdamW keeps two fp32 moments per trained parameter.
            Console.WriteLine($"optimizer state: full fine-tuning {2 * 4 * parameters / 1e6:F1} MB, LoRA r={parse.GetValue(loraDim)} on c_attn {2 * 4 * adapterParameters / 1e6:F2} MB ({100.0 * adapterParameters / parameters:F2}%)");
            return 0;
        });
        return command;
    }

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
        return new Command("bench", "Benchmarks that print figures.") { generation, MemoryCommand(), PrecisionCommand() };
    }
}
