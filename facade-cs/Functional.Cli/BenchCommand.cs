using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using Functional.Benchmarks;

namespace Functional.Cli;

/// <summary>`functional bench`: benchmarks that print figures.</summary>
internal static class BenchCommand
{
    private static Command PrecisionCommand()
    {
        var layers = CliOption.Create("--layers", "Transformer blocks.", 12);
        var width = CliOption.Create("--width", "Hidden size.", 512);
        var batch = CliOption.Create("--batch", "Rows per micro-batch.", 4);
        var sequence = CliOption.Create("--seq-len", "Tokens per row.", 128);
        var steps = CliOption.Create("--steps", "Optimizer steps per precision.", 200);
        var threads = CliOption.Create("--threads", "Intra-op threads (0: all cores).", 0);
        var learningRate = CliOption.Create("--learning-rate", "Peak learning rate.", 3e-4);
        var warmup = CliOption.Create("--warmup-steps", "Linear warmup steps, then constant.", 20);
        var command = new Command("precision", "Tokens/s and final loss of the same training in fp32 and in bf16 (fp32 master weights).")
        {
            layers, width, batch, sequence, steps, threads, learningRate, warmup,
        };
        command.SetAction(parse =>
        {
            var threadCount = Bench.SetThreads(parse.GetValue(threads));
            int rowsPerStep = parse.GetValue(batch), length = parse.GetValue(sequence), total = parse.GetValue(steps);
            Console.WriteLine($"GPT-2, {parse.GetValue(layers)} layers, width {parse.GetValue(width)}, vocabulary 8192; batch {rowsPerStep} x {length} tokens, {total} steps, lr {parse.GetValue(learningRate)} ({parse.GetValue(warmup)} warmup steps, then constant), {threadCount} threads");
            Console.WriteLine("precision   tokens/s   final loss");
            var results = Bench.Precision(parse.GetValue(layers), parse.GetValue(width), rowsPerStep, length, total,
                parse.GetValue(learningRate), parse.GetValue(warmup),
                run => Console.WriteLine($"{run.Precision,-9} {run.TokensPerSecond,10:F0} {run.Loss,12:F4}"));
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
        var vocab = CliOption.Create("--vocab", "Vocabulary of the loss section (Llama 3: 128256).", 128256);
        var lossWidth = CliOption.Create("--loss-width", "Hidden size of the loss section.", 256);
        var lossBatch = CliOption.Create("--loss-batch", "Rows of the loss section.", 4);
        var lossSequence = CliOption.Create("--loss-seq-len", "Tokens per row of the loss section.", 512);
        var lossChunk = CliOption.Create("--loss-chunk-size", "Positions per chunk of the chunked cross-entropy.", 1024);
        var lossPrecisions = CliOption.Create("--loss-precision", "Precisions of the loss section, comma separated: fp32, bf16 (bf16 matmuls are slow on CPUs without AVX-512 BF16).", "fp32");
        var section = CliOption.Create("--section", "all, checkpointing (gradient checkpointing and LoRA) or loss (full logits vs chunked cross-entropy).", "all");
        var command = new Command("memory", "Activation memory and step time with and without gradient checkpointing; LoRA vs full fine-tuning optimizer state; "
            + "peak memory of the loss and its backward for a large vocabulary with the full logits and with chunked cross-entropy.")
        {
            layers, width, batch, sequence, loraDim, threads, vocab, lossWidth, lossBatch, lossSequence, lossChunk, lossPrecisions, section,
        };
        command.SetAction(parse =>
        {
            var threadCount = Bench.SetThreads(parse.GetValue(threads));
            var which = parse.GetValue(section)!.Trim().ToLowerInvariant();
            if (which is not ("all" or "checkpointing" or "loss"))
            {
                throw new InvalidInputException("--section", "", $"expected all, checkpointing or loss, got '{which}'");
            }
            if (which != "loss")
            {
                Checkpointing(parse, layers, width, batch, sequence, loraDim, threadCount);
            }
            if (which != "checkpointing")
            {
                foreach (var (option, name) in new[] { (vocab, "--vocab"), (lossWidth, "--loss-width"), (lossBatch, "--loss-batch"), (lossSequence, "--loss-seq-len"), (lossChunk, "--loss-chunk-size") })
                {
                    if (parse.GetValue(option) < 1)
                    {
                        throw new InvalidInputException(name, "", $"must be at least 1, got {parse.GetValue(option)}");
                    }
                }
                var precisions = parse.GetValue(lossPrecisions)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
                if (precisions.Length == 0 || precisions.Any(p => p is not ("fp32" or "bf16")))
                {
                    throw new InvalidInputException("--loss-precision", "", $"expected fp32, bf16 or fp32,bf16, got '{parse.GetValue(lossPrecisions)}'");
                }
                LossSection(parse.GetValue(vocab), parse.GetValue(lossWidth), parse.GetValue(lossBatch), parse.GetValue(lossSequence), parse.GetValue(lossChunk), precisions, threadCount);
            }
            return 0;
        });
        return command;
    }

    /// <summary>The loss section of `bench memory`: peak memory of the loss and its backward, full logits vs chunked.</summary>
    private static void LossSection(int vocabulary, int width, int rows, int length, int chunk, string[] precisions, int threadCount)
    {
        Console.WriteLine($"causal-LM loss + backward, vocabulary {vocabulary:N0}, hidden {width}, batch {rows} x {length} tokens (every 8th label -100), {threadCount} threads; " +
            $"the full fp32 logits alone are {Bench.LogitsBytes(vocabulary, rows, length) / 1e6:F0} MB");
        Console.WriteLine("precision  path              peak MB    seconds        loss   max grad diff");
        var results = Bench.LossMemory(vocabulary, width, rows, length, chunk, precisions);
        static string Peak(LossMemoryRow row) => Bench.LossPeakBytes(row) is { } bytes ? $"{bytes / 1e6,10:F0}" : "         -";
        foreach (var row in results)
        {
            Console.WriteLine($"{row.Precision,-9}  {row.Path,-14} {Peak(row)} {row.Seconds,10:F2} {row.Loss,11:F3} {row.GradientDifference,15:E1}");
        }
        for (var i = 0; i + 1 < results.Length; i += 2)
        {
            var (full, chunked) = (results[i], results[i + 1]);
            if (Bench.LossPeakBytes(full) is { } f && Bench.LossPeakBytes(chunked) is { } c && f > 0)
            {
                Console.WriteLine($"{full.Precision}: chunked peak {100.0 * (1 - (double)c / f):F0}% lower ({f / 1e6:F0} MB -> {c / 1e6:F0} MB); loss relative difference {Math.Abs(chunked.Loss / full.Loss - 1):E1}");
            }
        }
        Console.WriteLine("peak MB: the process's resident high-water mark during the loss and backward above the resident memory before it " +
            "(freed heap returned first); the head weight's gradient exists before, as the trainer's gradient buffer does.");
    }

    /// <summary>The gradient-checkpointing and LoRA section of `bench memory`.</summary>
    private static void Checkpointing(ParseResult parse, Option<int> layers, Option<int> width, Option<int> batch, Option<int> sequence, Option<int> loraDim, int threadCount)
    {
        var m = Bench.Memory(parse.GetValue(layers), parse.GetValue(width), parse.GetValue(batch), parse.GetValue(sequence), parse.GetValue(loraDim));
        var parameters = m.Parameters;
        Console.WriteLine($"GPT-2, {parse.GetValue(layers)} layers, width {parse.GetValue(width)}, vocabulary 8192: {parameters:N0} parameters; " +
            $"batch {parse.GetValue(batch)} x {parse.GetValue(sequence)} tokens, {threadCount} threads, fp32");
        var (plain, checkpointed) = (m.Plain, m.Checkpointed);
        Console.WriteLine("                          activations kept   step (fwd+bwd)");
        Console.WriteLine($"plain                     {plain.RetainedBytes / 1e6,12:F0} MB   {plain.Seconds,10:F2} s");
        Console.WriteLine($"gradient checkpointing    {checkpointed.RetainedBytes / 1e6,12:F0} MB   {checkpointed.Seconds,10:F2} s");
        Console.WriteLine($"activation memory {100.0 * (1 - (double)checkpointed.RetainedBytes / plain.RetainedBytes):F0}% lower; step time {100.0 * (checkpointed.Seconds / plain.Seconds - 1):+0;-0}%");
        var adapterParameters = m.AdapterParameters;
        // AdamW keeps two fp32 moments per trained parameter.
        Console.WriteLine($"optimizer state: full fine-tuning {2 * 4 * parameters / 1e6:F1} MB, LoRA r={parse.GetValue(loraDim)} on c_attn {2 * 4 * adapterParameters / 1e6:F2} MB ({100.0 * adapterParameters / parameters:F2}%)");
    }

    /// <summary>The interpreter that runs the PyTorch reference (Debian's python3-torch).</summary>
    private const string Python = "/usr/bin/python3";

    /// <summary>tools/reference/bench_torch.py, looked for above the current folder, then above the program's.</summary>
    private static string PyTorchScript()
    {
        foreach (var start in new[] { Environment.CurrentDirectory, AppContext.BaseDirectory })
        {
            for (var folder = new DirectoryInfo(start); folder is not null; folder = folder.Parent)
            {
                var candidate = Path.Combine(folder.FullName, "tools", "reference", "bench_torch.py");
                if (File.Exists(candidate))
                {
                    return candidate;
                }
            }
        }
        throw new InvalidInputException("--pytorch", "", "tools/reference/bench_torch.py was not found above the current folder or the program's");
    }

    /// <summary>Runs bench_torch.py with the given arguments and returns its JSON output (its progress
    /// lines pass through to stderr).</summary>
    private static JsonElement RunPyTorch(IEnumerable<string> arguments)
    {
        if (!File.Exists(Python))
        {
            throw new InvalidInputException("--pytorch", "", $"{Python} was not found (install python3-torch: tools/reference/install-deps.sh)");
        }
        var info = new ProcessStartInfo(Python) { RedirectStandardOutput = true, UseShellExecute = false };
        info.ArgumentList.Add(PyTorchScript());
        foreach (var argument in arguments)
        {
            info.ArgumentList.Add(argument);
        }
        using var process = Process.Start(info)!;
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        if (process.ExitCode != 0)
        {
            throw new InvalidInputException("--pytorch", "", $"bench_torch.py failed with exit code {process.ExitCode} (its messages are above)");
        }
        return JsonDocument.Parse(output).RootElement.Clone();
    }

    /// <summary>The model's HF config.json in a temporary file, for bench_torch.py --model-config.</summary>
    private static string ConfigFile(string configJson)
    {
        var path = Path.Combine(Path.GetTempPath(), $"functional-bench-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, configJson);
        return path;
    }

    private static string Mb(long bytes) => Program.Num(bytes / 1e6, "F0");

    private static string Row(string precision, string loop, double tokensPerSecond, double step, double forward, double backward,
        double optimizer, double other, double mfuFp32, double mfuBf16, string peak, string comparison) =>
        $"{precision,-5} {loop,-8} {Program.Num(tokensPerSecond, "F0"),8} {Program.Num(step, "F3"),8} {Program.Num(forward, "F3"),7} " +
        $"{Program.Num(backward, "F3"),7} {Program.Num(optimizer, "F3"),7} {Program.Num(other, "F3"),7} " +
        $"{Program.Num(100 * mfuFp32, "F1") + "%",7} {Program.Num(100 * mfuBf16, "F1") + "%",7} {peak,8}  {comparison}";

    private static string Row(string precision, string loop, LoopFigures figures, double flopsPerToken, double peakFp32, double peakBf16, string comparison) =>
        Row(precision, loop, figures.TokensPerSecond, figures.Split.Total, figures.Split.Forward, figures.Split.Backward,
            figures.Split.Optimizer, figures.Split.Other, flopsPerToken * figures.TokensPerSecond / peakFp32,
            flopsPerToken * figures.TokensPerSecond / peakBf16,
            Bench.PeakBytes(figures) is { } peak ? Mb(peak) : "-", comparison);

    /// <summary>Prints one configuration's figures (and PyTorch's, when given) as a compact table.</summary>
    private static void Print(TrainingBenchmarkResult result, JsonElement? pytorch)
    {
        var c = result.Config;
        var model = Bench.Describe(c);
        var s = result.Settings;
        Console.WriteLine();
        Console.WriteLine($"{c.Name}: {model.Family}, {model.Layers} layers, width {model.Width}, vocabulary {model.Vocabulary}, " +
            $"{result.Parameters:N0} parameters (N = {result.MatmulParameters:N0} in matmuls); batch {c.BatchSize} x {c.SequenceLength} tokens; " +
            $"{s.Threads} threads; {s.WarmupSteps} warm-up + {s.Steps} timed steps; AdamW, clip 1.0, constant lr {s.LearningRate}");
        Console.WriteLine($"model FLOPs per token 6N + 12LTd = {Program.Num(result.FlopsPerToken / 1e6, "F1")} M; " +
            $"matmul peak (1024^3, best of 10, this process): fp32 {Program.Num(result.PeakFp32 / 1e9, "F1")} GFLOP/s, bf16 {Program.Num(result.PeakBf16 / 1e9, "F1")} GFLOP/s");
        Console.WriteLine("prec  loop     tokens/s   step s   fwd s   bwd s   opt s other s MFU/f32 MFU/b16  peak MB");
        foreach (var p in result.Precisions)
        {
            var ours = p.Trainer;
            Console.WriteLine(Row(p.Precision, "ours", ours, result.FlopsPerToken, result.PeakFp32, result.PeakBf16,
                $"optimizer {Program.Num(100 * ours.Split.Optimizer / ours.Split.Total, "F1")}% of the step"));
            Console.WriteLine(Row(p.Precision, "plain", p.PlainLoop, result.FlopsPerToken, result.PeakFp32, result.PeakBf16,
                $"our overhead {Program.Num(100 * (p.PlainLoop.TokensPerSecond / ours.TokensPerSecond - 1), "+0.0;-0.0")}%"));
            if (pytorch is { } py)
            {
                foreach (var run in py.GetProperty("runs").EnumerateArray().Where(r => r.GetProperty("precision").GetString() == p.Precision))
                {
                    double Get(string name) => run.GetProperty(name).GetDouble();
                    var tokens = Get("tokens_per_second");
                    var peak = run.GetProperty("peak_resident_bytes") is { ValueKind: JsonValueKind.Number } bytes ? Mb(bytes.GetInt64()) : "-";
                    Console.WriteLine(Row(p.Precision, "pytorch", tokens, Get("step_seconds"), Get("forward_seconds"), Get("backward_seconds"),
                        Get("optimizer_seconds"), Get("other_seconds"), Get("mfu_fp32_peak"), Get("mfu_bf16_peak"), peak,
                        $"ours / pytorch {Program.Num(ours.TokensPerSecond / tokens, "F2")}x"));
                }
            }
        }
        foreach (var p in result.Precisions)
        {
            var m = p.Memory;
            var peak = Bench.PeakBytes(p.Trainer) ?? 0L;
            Console.WriteLine($"memory {p.Precision}: estimate {Mb(m.Total)} MB = weights {Mb(m.Weights)} + gradients {Mb(m.Gradients)} + " +
                $"AdamW moments {Mb(m.OptimizerState)} + activations {Mb(m.Activations)} (measured: peak of a forward and backward); ours peak {Mb(peak)} MB resident, " +
                $"{Mb(p.BaselineResidentBytes)} MB before the model: (peak - before) / estimate = {Program.Num((double)(peak - p.BaselineResidentBytes) / m.Total, "F2")}x");
        }
        if (result.Precisions.Length == 2)
        {
            Console.WriteLine($"bf16 / fp32 tokens/s (ours): {Program.Num(result.Precisions[1].Trainer.TokensPerSecond / result.Precisions[0].Trainer.TokensPerSecond, "F2")}x");
        }
    }

    private static object Figures(LoopFigures f) => new
    {
        tokens_per_second = f.TokensPerSecond,
        step_seconds = f.Split.Total,
        forward_seconds = f.Split.Forward,
        backward_seconds = f.Split.Backward,
        optimizer_seconds = f.Split.Optimizer,
        other_seconds = f.Split.Other,
        peak_resident_bytes = Bench.PeakBytes(f),
        losses = f.Losses.ToArray(),
    };

    private static object Figures(TrainingBenchmarkResult r, JsonElement? pytorch) => new
    {
        config = r.Config.Name,
        model = JsonDocument.Parse(Bench.ConfigJson(r.Config)).RootElement,
        batch = r.Config.BatchSize,
        seq_len = r.Config.SequenceLength,
        threads = r.Settings.Threads,
        steps = r.Settings.Steps,
        warmup = r.Settings.WarmupSteps,
        learning_rate = r.Settings.LearningRate,
        parameters = r.Parameters,
        matmul_parameters = r.MatmulParameters,
        flops_per_token = r.FlopsPerToken,
        flops_formula = "6 N + 12 L T d",
        matmul_peak_fp32_flops = r.PeakFp32,
        matmul_peak_bf16_flops = r.PeakBf16,
        runs = r.Precisions.Select(p => new
        {
            precision = p.Precision,
            ours = Figures(p.Trainer),
            plain = Figures(p.PlainLoop),
            model_flops_per_second = p.ModelFlopsPerSecond,
            mfu_fp32_peak = p.MfuFp32Peak,
            mfu_bf16_peak = p.MfuBf16Peak,
            memory_estimate = new
            {
                weights = p.Memory.Weights,
                gradients = p.Memory.Gradients,
                optimizer_state = p.Memory.OptimizerState,
                activations = p.Memory.Activations,
                total = p.Memory.Total,
            },
            baseline_resident_bytes = p.BaselineResidentBytes,
        }).ToArray(),
        pytorch,
    };

    private static Command TrainBenchCommand()
    {
        var config = CliOption.Create("--config", "gpt2-small, gpt2-base, llama or all.", "all");
        var precision = CliOption.Create("--precision", "fp32, bf16 or both.", "both");
        var steps = CliOption.Create("--steps", "Timed optimizer steps.", 10);
        var warmup = CliOption.Create("--warmup", "Optimizer steps before timing starts.", 2);
        var threads = CliOption.Create("--threads", "Intra-op threads (the same for PyTorch).", 2);
        var pytorch = CliOption.Create("--pytorch", "Also run tools/reference/bench_torch.py (PyTorch) with the same settings and print it side by side.", false);
        var json = CliOption.Create<string?>("--json", "Write every figure to this JSON file.", null);
        var layers = CliOption.Create("--layers", "Override the configuration's depth (quick runs, tests).", 0);
        var width = CliOption.Create("--width", "Override the configuration's width (heads: width / 64).", 0);
        var batch = CliOption.Create("--batch", "Override the configuration's rows per step.", 0);
        var sequence = CliOption.Create("--seq-len", "Override the configuration's tokens per row.", 0);
        var packingCompare = CliOption.Create("--packing-compare",
            "Instead: real tokens/s (padding excluded) of our trainer on variable-length samples (16 to --seq-len tokens) "
            + "one per padded row against packed in isolation (--packing), the same samples for one epoch each.", false);
        foreach (var hidden in new Option[] { layers, width, batch, sequence })
        {
            hidden.Hidden = true;
        }
        var command = new Command("train",
            "Training tokens/s, step split (forward, backward, optimizer, other), MFU against the measured matmul peak and peak memory: " +
            "our trainer against a plain TorchSharp loop and, with --pytorch, PyTorch.")
        {
            config, precision, steps, warmup, threads, pytorch, json, layers, width, batch, sequence, packingCompare,
        };
        command.SetAction(parse =>
        {
            var name = parse.GetValue(config)!;
            var configs = Bench.TrainConfigs(name, parse.GetValue(layers), parse.GetValue(width), parse.GetValue(batch), parse.GetValue(sequence));
            var precisions = parse.GetValue(precision) switch
            {
                "both" => new[] { "fp32", "bf16" },
                "fp32" => ["fp32"],
                "bf16" => ["bf16"],
                var other => throw new InvalidInputException("--precision", "", $"expected fp32, bf16 or both, found '{other}'"),
            };
            int timedSteps = parse.GetValue(steps), warmupSteps = parse.GetValue(warmup), threadCount = parse.GetValue(threads);
            var all = new List<object>();
            if (parse.GetValue(packingCompare))
            {
                foreach (var c in configs)
                {
                    foreach (var p in precisions)
                    {
                        var comparison = Bench.PackingComparison(c, p, timedSteps, warmupSteps, threadCount, line => Console.Error.WriteLine(line));
                        Console.Write(Bench.FormatPackingComparison(comparison));
                        all.Add(PackingFigures(comparison));
                    }
                }
                WriteFigures(parse.GetValue(json), all);
                return 0;
            }
            foreach (var c in configs)
            {
                var result = Bench.Train(c, precisions, timedSteps, warmupSteps, threadCount, line => Console.Error.WriteLine(line));
                JsonElement? reference = null;
                if (parse.GetValue(pytorch))
                {
                    var file = ConfigFile(Bench.ConfigJson(c));
                    try
                    {
                        reference = RunPyTorch([
                            "train", "--config", c.Name, "--model-config", file, "--batch", $"{c.BatchSize}", "--seq-len", $"{c.SequenceLength}",
                            "--precision", parse.GetValue(precision)!, "--steps", $"{timedSteps}", "--warmup", $"{warmupSteps}",
                            "--threads", $"{threadCount}", "--learning-rate", "1e-3"]);
                    }
                    finally
                    {
                        File.Delete(file);
                    }
                }
                Print(result, reference);
                all.Add(Figures(result, reference));
            }
            WriteFigures(parse.GetValue(json), all);
            return 0;
        });
        return command;
    }

    /// <summary>Writes the figures of `bench train` to path, when given.</summary>
    private static void WriteFigures(string? path, List<object> all)
    {
        if (path is { })
        {
            File.WriteAllText(path, JsonSerializer.Serialize(all, new JsonSerializerOptions { WriteIndented = true }) + "\n");
            Console.WriteLine($"figures: {path}");
        }
    }

    /// <summary>The figures of a packing comparison, for --json.</summary>
    private static object PackingFigures(PackingComparison c)
    {
        object Run(PackingRun r) => new
        {
            mode = r.Mode,
            rows = r.Rows,
            steps = r.Steps,
            timed_steps = r.TimedSteps,
            real_tokens = r.RealTokens,
            input_tokens = r.InputTokens,
            padding_share = r.PaddingShare,
            seconds = r.Seconds,
            epoch_seconds = r.EpochSeconds,
            real_tokens_per_second = r.RealTokensPerSecond,
            first_loss = r.FirstLoss,
        };
        return new
        {
            config = c.Config.Name,
            precision = c.Precision,
            batch = c.Config.BatchSize,
            seq_len = c.MaxLength,
            min_length = c.MinLength,
            samples = c.Samples,
            padded = Run(c.Padded),
            packed = Run(c.Packed),
        };
    }

    /// <summary>The ZeRO stages of --stages ("0,1,2,3").</summary>
    private static int[] Stages(string text) =>
        text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(s => int.TryParse(s, out var n) && n is >= 0 and <= 3 ? n : throw new InvalidInputException("--stages", "", $"expected ZeRO stages 0 to 3 separated by commas, found '{s}'"))
            .ToArray();

    private static Command ParallelCommand()
    {
        var layers = CliOption.Create("--layers", "Decoder layers of the benchmark LLaMA.", 4);
        var width = CliOption.Create("--width", "Hidden size (a multiple of 128: heads of 64, half as many key/value heads).", 256);
        var vocabulary = CliOption.Create("--vocab", "Vocabulary entries (divisible by the processes for tensor parallelism).", 8192);
        var batch = CliOption.Create("--batch", "Rows per optimizer step over all processes (the same global batch in every layout).", 8);
        var microBatch = CliOption.Create("--micro-batch", "Rows per micro-batch (the window accumulates batch / micro-batch of them, over the data-parallel processes).", 2);
        var sequence = CliOption.Create("--seq-len", "Tokens per row.", 128);
        var steps = CliOption.Create("--steps", "Timed optimizer steps per layout (one more measures the step's memory).", 3);
        var warmup = CliOption.Create("--warmup", "Optimizer steps per layout before timing starts.", 1);
        var processes = CliOption.Create("--processes", "Processes mpirun starts (when not started by a launcher).", 2);
        var layouts = CliOption.Create("--layouts", "Layouts to measure, comma separated: dp (data parallel), tp (tensor parallel), pp (pipeline parallel).", "dp,tp,pp");
        var command = new Command("parallel",
            "Per-rank memory of parameters, gradients, optimizer state and one step's activations, and tokens/s, of data, tensor and pipeline " +
            "parallelism over the same processes, model and global batch. Alone it starts mpirun -np N itself; under mpirun it measures the launch's ranks.")
        {
            layers, width, vocabulary, batch, microBatch, sequence, steps, warmup, processes, layouts,
        };
        command.SetAction(parse =>
        {
            if (Bench.LaunchedByLauncher())
            {
                var table = Bench.Parallel(parse.GetValue(layers), parse.GetValue(width), parse.GetValue(vocabulary), parse.GetValue(batch), parse.GetValue(microBatch),
                    parse.GetValue(sequence), parse.GetValue(warmup), parse.GetValue(steps), parse.GetValue(layouts)!.Split(','), line => Console.Error.WriteLine(line));
                if (Bench.IsMainProcess())
                {
                    Console.Write(table);
                }
                return 0;
            }
            var processCount = parse.GetValue(processes);
            if (processCount < 2)
            {
                throw new InvalidInputException("--processes", "", $"expected at least 2 processes, got {processCount}");
            }
            var mpirun = Mpirun.Require("bench parallel");
            var info = Mpirun.StartInfo(mpirun, processCount, null, [
                "bench", "parallel", "--layers", $"{parse.GetValue(layers)}", "--width", $"{parse.GetValue(width)}", "--vocab", $"{parse.GetValue(vocabulary)}",
                "--batch", $"{parse.GetValue(batch)}", "--micro-batch", $"{parse.GetValue(microBatch)}", "--seq-len", $"{parse.GetValue(sequence)}",
                "--steps", $"{parse.GetValue(steps)}", "--warmup", $"{parse.GetValue(warmup)}", "--layouts", parse.GetValue(layouts)!]);
            info.Environment["OMP_NUM_THREADS"] = "1";
            using var ranks = Process.Start(info) ?? throw new InvalidOperationException($"{mpirun} did not start");
            ranks.WaitForExit();
            if (ranks.ExitCode != 0)
            {
                Console.Error.WriteLine($"error: the {processCount} ranks under mpirun failed (exit code {ranks.ExitCode}); their messages are above");
            }
            return ranks.ExitCode;
        });
        return command;
    }

    private static Command DistributedCommand()
    {
        var config = CliOption.Create("--config", "gpt2-small, gpt2-base or llama (then resized by --layers, --width, --batch, --seq-len).", "gpt2-small");
        var layers = CliOption.Create("--layers", "Transformer blocks (0: the configuration's).", 0);
        var width = CliOption.Create("--width", "Hidden size (heads: width / 64; 0: the configuration's).", 512);
        var batch = CliOption.Create("--batch", "Rows per step over all processes (each process trains on its share).", 8);
        var sequence = CliOption.Create("--seq-len", "Tokens per row.", 128);
        var steps = CliOption.Create("--steps", "Timed optimizer steps per stage.", 5);
        var warmup = CliOption.Create("--warmup", "Optimizer steps per stage before timing starts.", 2);
        var processes = CliOption.Create("--processes", "Processes mpirun starts (the single-process reference gets processes x threads threads).", 2);
        var threads = CliOption.Create("--threads", "Intra-op threads per process.", 1);
        var stages = CliOption.Create("--stages", "ZeRO stages to measure, comma separated.", "0,1,2,3");
        var json = CliOption.Create<string?>("--json", "Write every figure to this JSON file.", null);
        var figures = CliOption.Create<string?>("--figures", "Under mpirun: rank 0 writes its run's figures to this file instead of printing (the driver's hand-over).", null);
        figures.Hidden = true;
        var command = new Command("distributed",
            "Per-rank memory of parameters, gradients and optimizer state for each ZeRO stage, tokens/s of N ranks against one process " +
            "with as many threads, and the share of a step spent communicating. Alone it starts mpirun -np N itself; under mpirun it measures the launch's ranks.")
        {
            config, layers, width, batch, sequence, steps, warmup, processes, threads, stages, json, figures,
        };
        command.SetAction(parse =>
        {
            var c = Bench.TrainConfigs(parse.GetValue(config)!, parse.GetValue(layers), parse.GetValue(width), parse.GetValue(batch), parse.GetValue(sequence))[0];
            int timedSteps = parse.GetValue(steps), warmupSteps = parse.GetValue(warmup), threadCount = parse.GetValue(threads);
            var stageList = Stages(parse.GetValue(stages)!);
            void Progress(string line) => Console.Error.WriteLine(line);
            if (Bench.LaunchedByLauncher())
            {
                // A rank of a launch: measure with the others; rank 0 reports.
                var run = Bench.Distributed(c, stageList, timedSteps, warmupSteps, threadCount, Progress);
                if (Bench.IsMainProcess())
                {
                    if (parse.GetValue(figures) is { } handOver)
                    {
                        File.WriteAllText(handOver, Bench.DistributedJson(run));
                    }
                    else
                    {
                        Console.Write(Bench.FormatDistributed(c, timedSteps, warmupSteps, [run]));
                        WriteDistributedJson(parse.GetValue(json), c, timedSteps, warmupSteps, [run]);
                    }
                }
                return 0;
            }
            var processCount = parse.GetValue(processes);
            if (processCount < 2)
            {
                throw new InvalidInputException("--processes", "", $"expected at least 2 processes to compare with one, got {processCount}");
            }
            if (c.BatchSize % processCount != 0)
            {
                throw new InvalidInputException("--batch", "", $"the rows per step (over all processes) must be a multiple of the {processCount} processes, found {c.BatchSize}");
            }
            var mpirun = Mpirun.Require("bench distributed");
            var handOverFile = Path.Combine(Path.GetTempPath(), $"functional-bench-distributed-{Guid.NewGuid():N}.json");
            try
            {
                var info = Mpirun.StartInfo(mpirun, processCount, null, [
                    "bench", "distributed", "--config", parse.GetValue(config)!, "--layers", $"{parse.GetValue(layers)}", "--width", $"{parse.GetValue(width)}",
                    "--batch", $"{parse.GetValue(batch)}", "--seq-len", $"{parse.GetValue(sequence)}", "--steps", $"{timedSteps}", "--warmup", $"{warmupSteps}",
                    "--threads", $"{threadCount}", "--stages", parse.GetValue(stages)!, "--figures", handOverFile]);
                info.Environment["OMP_NUM_THREADS"] = $"{threadCount}";
                info.RedirectStandardOutput = true;
                using (var ranks = Process.Start(info) ?? throw new InvalidOperationException($"{mpirun} did not start"))
                {
                    // The ranks' progress goes to stderr as it comes; what they print otherwise is shown on failure.
                    var output = ranks.StandardOutput.ReadToEndAsync();
                    ranks.WaitForExit();
                    if (ranks.ExitCode != 0 || !File.Exists(handOverFile))
                    {
                        Console.Error.Write(output.Result);
                        Console.Error.WriteLine($"error: the {processCount} ranks under mpirun failed (exit code {ranks.ExitCode}); their messages are above");
                        return ranks.ExitCode != 0 ? ranks.ExitCode : 1;
                    }
                }
                var distributed = Bench.ReadDistributed(File.ReadAllText(handOverFile));
                var single = Bench.SingleProcess(c, timedSteps, warmupSteps, processCount * threadCount, Progress);
                Console.Write(Bench.FormatDistributed(c, timedSteps, warmupSteps, [distributed, single]));
                WriteDistributedJson(parse.GetValue(json), c, timedSteps, warmupSteps, [distributed, single]);
                return 0;
            }
            finally
            {
                File.Delete(handOverFile);
            }
        });
        return command;
    }

    /// <summary>Writes the configuration and the runs of `bench distributed` to path, when given.</summary>
    private static void WriteDistributedJson(string? path, BenchmarkConfig c, int steps, int warmup, DistributedRun[] runs)
    {
        if (path is null)
        {
            return;
        }
        var figures = new
        {
            config = c.Name,
            model = JsonDocument.Parse(Bench.ConfigJson(c)).RootElement,
            batch = c.BatchSize,
            seq_len = c.SequenceLength,
            steps,
            warmup,
            learning_rate = 1e-3,
            runs = runs.Select(r => JsonDocument.Parse(Bench.DistributedJson(r)).RootElement).ToArray(),
        };
        File.WriteAllText(path, JsonSerializer.Serialize(figures, new JsonSerializerOptions { WriteIndented = true }) + "\n");
        Console.WriteLine($"figures: {path}");
    }

    public static Command Create()
    {
        var model = CliOption.Create<string?>("--model", "Hugging Face model folder (default: a random model the size of the embedded default's).", null);
        var lengths = CliOption.Create("--lengths", "Numbers of new tokens to time, comma separated.", "32,64,128,256");
        var threads = CliOption.Create("--threads", "Intra-op threads (0: all cores).", 0);
        var generationPyTorch = CliOption.Create("--pytorch", "Also time an HF-style PyTorch generation loop (tools/reference/bench_torch.py) on a model of the same config.", false);
        var generation = new Command("generation", "Seconds per generated token with and without the key/value cache, for several lengths.")
        {
            model, lengths, threads, generationPyTorch,
        };
        generation.SetAction(parse =>
        {
            var counts = parse.GetValue(lengths)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(s => int.TryParse(s, out var n) ? n : throw new InvalidInputException("--lengths", "", $"expected whole numbers separated by commas, found '{s}'"))
                .ToList();
            var threadCount = Bench.SetThreads(parse.GetValue(threads));
            Console.WriteLine($"generation benchmark, {threadCount} threads: a one-token prompt, greedy");
            var run = Bench.Generation(parse.GetValue(model), counts.ToArray());
            var rows = run.Rows;
            Console.Write(run.Table);
            if (parse.GetValue(generationPyTorch))
            {
                var file = ConfigFile(run.ConfigJson);
                JsonElement reference;
                try
                {
                    reference = RunPyTorch(["generation", "--model-config", file, "--lengths", string.Join(",", counts),
                        "--threads", $"{threadCount}"]);
                }
                finally
                {
                    File.Delete(file);
                }
                Console.WriteLine("PyTorch (HF-style loop, past_key_values grown by torch.cat; random weights of the same config):");
                Console.WriteLine($"{"new tokens",10} {"cached ms/token",16} {"uncached ms/token",18} {"speed ours / pytorch",22}");
                foreach (var (ours, py) in rows.Zip(reference.GetProperty("rows").EnumerateArray()))
                {
                    var cached = py.GetProperty("cached_seconds_per_token").GetDouble();
                    Console.WriteLine($"{py.GetProperty("new_tokens").GetInt32(),10} {Program.Num(1000 * cached, "F3"),16} " +
                        $"{Program.Num(1000 * py.GetProperty("uncached_seconds_per_token").GetDouble(), "F3"),18} " +
                        $"{Program.Num(cached / ours.CachedSecondsPerToken, "F2") + "x",22}");
                }
            }
            return 0;
        });
        return new Command("bench", "Benchmarks that print figures.") { generation, MemoryCommand(), PrecisionCommand(), TrainBenchCommand(), DistributedCommand(), ParallelCommand() };
    }
}
