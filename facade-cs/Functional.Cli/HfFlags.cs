using System.CommandLine;
using System.Globalization;
using Microsoft.FSharp.Core;

namespace Functional.Cli;

/// <summary>
/// Flags of HF Trainer and DeepSpeed(-Chat) training scripts that `functional train` accepts as they are written
/// there: the ones that map are honoured (--report_to, --logging_dir, --logging_strategy, --torch_dtype, --dtype,
/// --deepspeed ds.json, --zero_stage), the ones with no effect on one CPU process are accepted with a one-line note
/// (--offload, --do_train, --dataloader_num_workers, --local_rank, --save_safetensors, --print_loss,
/// --num_padding_at_beginning), and only what contradicts another setting is refused.
/// </summary>
internal sealed class HfFlags
{
    private readonly Option<string[]> reportTo = new("--report-to", "--report_to")
    {
        Description = "HF's report_to: tensorboard (default), all, or none (no event file); other integrations are not available here.",
        AllowMultipleArgumentsPerToken = true,
    };
    private readonly Option<string?> loggingDir = CliOption.Create<string?>("--logging-dir", "Folder of the TensorBoard event file (default: --output).", null);
    private readonly Option<string> loggingStrategy = CliOption.Create("--logging-strategy", "When steps are logged: steps (every --logging-steps), epoch or no (only the last).", "steps");
    private readonly Option<string?> torchDtype = CliOption.Create<string?>("--torch-dtype", "bfloat16, float16 or float32 (or auto): the compute precision, as --bf16 / --fp16.", null);
    private readonly Option<string?> dtype = CliOption.Create<string?>("--dtype", "DeepSpeed-Chat's bf16, fp16 or fp32: the compute precision, as --bf16 / --fp16.", null);
    private readonly Option<string?> deepspeed = CliOption.Create<string?>("--deepspeed", "A DeepSpeed JSON config: batch sizes, accumulation, clipping, fp16/bf16, optimizer and scheduler parameters are read from it.", null);
    private readonly Option<int?> zeroStage = CliOption.Create<int?>("--zero-stage", "DeepSpeed ZeRO stage of a multi-process run (mpirun -np N): 0 (default), 1 shards the optimizer state, 2 also the gradients, 3 also the parameters.", null);
    private readonly Option<long?> reduceBucketSize = CliOption.Create<long?>("--reduce-bucket-size", "DeepSpeed's reduce_bucket_size: elements per all-reduce or reduce-scatter of the gradients under mpirun (default 5e8).", null);
    private readonly Option<long?> allgatherBucketSize = CliOption.Create<long?>("--allgather-bucket-size", "DeepSpeed's allgather_bucket_size: elements per all-gather of the parameters under mpirun (default 5e8).", null);
    private readonly Option<bool> offload = CliOption.Create("--offload", "DeepSpeed offloading: everything is in CPU memory already (accepted, no effect).", false);
    private readonly Option<bool> doTrain = CliOption.Create("--do-train", "HF's do_train: train always trains (accepted, no effect).", false);
    private readonly Option<int?> dataloaderWorkers = CliOption.Create<int?>("--dataloader-num-workers", "HF's loader workers: data is tokenized before training (accepted, no effect).", null);
    private readonly Option<int?> localRank = CliOption.Create<int?>("--local-rank", "The launcher's local rank: taken from its environment (the same value or -1 accepted, no effect).", null);
    private readonly Option<bool> saveSafetensors = CliOption.Create("--save-safetensors", "HF's save_safetensors: weights are always safetensors (accepted, no effect).", true);
    private readonly Option<bool> printLoss = CliOption.Create("--print-loss", "DeepSpeed-Chat's print_loss: the loss is printed anyway (accepted, no effect).", false);
    private readonly Option<int?> numPaddingAtBeginning = CliOption.Create<int?>("--num-padding-at-beginning", "A DeepSpeed-Chat reward-model option (accepted, no effect on fine-tuning).", null);

    /// <summary>The logging flags, in the train help's Logging group.</summary>
    public Option[] Logging => [loggingStrategy, reportTo, loggingDir];

    /// <summary>The precision spellings, in the train help's precision group.</summary>
    public Option[] PrecisionFlags => [torchDtype, dtype];

    /// <summary>DeepSpeed's config and ZeRO flags and the launcher's rank, in the train help's distributed group.</summary>
    public Option[] Distributed => [deepspeed, zeroStage, reduceBucketSize, allgatherBucketSize, localRank];

    /// <summary>The flags accepted with no effect, in the train help's last group.</summary>
    public Option[] Inert => [offload, doTrain, dataloaderWorkers, saveSafetensors, printLoss, numPaddingAtBeginning];

    /// <summary>The options, to add to the train command.</summary>
    public IEnumerable<Option> Options =>
    [
        reportTo, loggingDir, loggingStrategy, torchDtype, dtype, deepspeed, zeroStage, reduceBucketSize, allgatherBucketSize, offload, doTrain,
        dataloaderWorkers, localRank, saveSafetensors, printLoss, numPaddingAtBeginning,
    ];

    /// <summary>HF's logging_strategy as given (checked by the run).</summary>
    public string LoggingStrategy(ParseResult parse) => parse.GetValue(loggingStrategy)!;

    /// <summary>The logging_dir, or null for the output folder.</summary>
    public string? LoggingDir(ParseResult parse) => parse.GetValue(loggingDir);

    /// <summary>Whether TensorBoard events are written, by --report_to: on unless "none" or only other
    /// integrations are named (HF's list syntax: spaces, commas or brackets). Integrations other than TensorBoard
    /// get a note.</summary>
    public bool TensorBoard(ParseResult parse)
    {
        if (!CliOption.Given(parse, reportTo))
        {
            return true;
        }
        var names = (parse.GetValue(reportTo) ?? [])
            .SelectMany(v => v.Split([',', ' ', '[', ']', '"', '\''], StringSplitOptions.RemoveEmptyEntries))
            .Select(v => v.ToLowerInvariant())
            .ToList();
        if (names.Count == 0)
        {
            throw new InvalidInputException("--report-to", "", "expected tensorboard, all or none");
        }
        if (names.Contains("none") && names.Count > 1)
        {
            throw new InvalidInputException("--report-to", "", "none cannot be combined with other integrations");
        }
        var others = names.Where(n => n is not ("tensorboard" or "all" or "none")).ToList();
        if (others.Count > 0)
        {
            Note($"--report-to {string.Join(", ", others)}: not available here (metrics.jsonl and TensorBoard are); ignored");
        }
        return names.Contains("tensorboard") || names.Contains("all");
    }

    /// <summary>Reads --deepspeed's file, checks the flags with no effect (printing their notes) and returns the
    /// values of the train command's options with the file's settings applied. Raises
    /// <see cref="InvalidInputException"/> for a flag or field that contradicts another.</summary>
    public TrainValues Resolve(ParseResult parse, Option<bool> bf16, Option<bool> fp16, Option<int> batch, Option<int> accumulation)
    {
        var config = parse.GetValue(deepspeed) is { } path ? DeepSpeedConfig.Read(path) : null;
        var values = new TrainValues(parse, config);
        CheckNoEffectFlags(parse);
        config?.Notes.ForEach(Note);
        if (config?.TrainBatchSize is { } total)
        {
            ResolveTrainBatchSize(parse, config, values, total, batch, accumulation);
        }
        values.Precision = Precision(parse, config, bf16, fp16);
        values.ZeroStage = ZeroStage(parse, config);
        values.ReduceBucketSize = BucketSize(values, reduceBucketSize);
        values.AllgatherBucketSize = BucketSize(values, allgatherBucketSize);
        return values;
    }

    /// <summary>A bucket size: the flag or the DeepSpeed config's field (both given: they must agree), else DeepSpeed's
    /// default; refused outside 1 to 2^31 - 1 elements.</summary>
    private static long BucketSize(TrainValues values, Option<long?> option)
    {
        var size = values.Get(option) ?? Functional.Distributed.CollectiveBucketsModule.DefaultElements;
        if (size is < 1 or > int.MaxValue)
        {
            throw new InvalidInputException(option.Name, "", $"expected a number of elements from 1 to {int.MaxValue}, got {size}");
        }
        return size;
    }

    /// <summary>The ZeRO stage: --zero-stage, or the DeepSpeed config's zero_optimization.stage (both given: they
    /// must agree), else 0.</summary>
    private int ZeroStage(ParseResult parse, DeepSpeedConfig? config)
    {
        var flag = parse.GetValue(zeroStage);
        if (flag is { } stage and (< 0 or > 3))
        {
            throw new InvalidInputException("--zero-stage", "", $"expected 0, 1, 2 or 3, got {stage}");
        }
        if (flag is { } given && config?.ZeroStage is { } fromFile && given != fromFile)
        {
            throw new InvalidInputException("--zero-stage", "", $"is {given}, but {config.Path} sets zero_optimization.stage = {fromFile}: remove one of them");
        }
        var result = flag ?? config?.ZeroStage ?? 0;
        if (flag is { } noted && Functional.Distributed.Communicator.parseEnvironment(FuncConvert.FromFunc<string, string>(name => Environment.GetEnvironmentVariable(name)!)).Size == 1)
        {
            Note($"--zero-stage {noted}: one process holds everything, so every ZeRO stage computes the same; no effect (it shards under mpirun)");
        }
        return result;
    }

    private void CheckNoEffectFlags(ParseResult parse)
    {
        if (CliOption.Given(parse, offload))
        {
            Note("--offload: everything is in CPU memory already; no effect");
        }
        if (CliOption.Given(parse, doTrain))
        {
            if (!parse.GetValue(doTrain))
            {
                throw new InvalidInputException("--do-train", "", "is false, but `functional train` always trains");
            }
            Note("--do-train: `functional train` always trains; no effect");
        }
        if (parse.GetValue(dataloaderWorkers) is { } workers)
        {
            Note($"--dataloader-num-workers {workers}: the data is tokenized before training, there are no loader workers; no effect");
        }
        if (parse.GetValue(localRank) is { } rank)
        {
            // The launcher's environment says which local rank this process is (mpirun, torchrun).
            var launch = Functional.Distributed.Communicator.parseEnvironment(FuncConvert.FromFunc<string, string>(name => Environment.GetEnvironmentVariable(name)!));
            if (rank >= 0 && rank != launch.LocalRank)
            {
                throw new InvalidInputException("--local-rank", "",
                    launch.Size > 1
                        ? $"is {rank}, but the launcher made this process local rank {launch.LocalRank}"
                        : $"is {rank}, but this is one process, not a distributed launch (local rank 0): start several with mpirun -np N");
            }
            Note($"--local-rank {rank}: the rank comes from the launcher's environment; no effect");
        }
        if (CliOption.Given(parse, saveSafetensors))
        {
            if (!parse.GetValue(saveSafetensors))
            {
                throw new InvalidInputException("--save-safetensors", "", "is false, but weights are only written as safetensors");
            }
            Note("--save-safetensors: weights are always written as safetensors; no effect");
        }
        if (CliOption.Given(parse, printLoss))
        {
            Note("--print-loss: the loss is printed at every logged step anyway; no effect");
        }
        if (parse.GetValue(numPaddingAtBeginning) is { } padding)
        {
            Note($"--num-padding-at-beginning {padding}: a DeepSpeed-Chat reward-model option; no effect on fine-tuning");
        }
    }

    /// <summary>DeepSpeed's rule: train_batch_size = micro batch x accumulation x processes (1 here). Given
    /// train_batch_size, a missing micro batch or accumulation is derived from it; all three must agree.</summary>
    private static void ResolveTrainBatchSize(
        ParseResult parse, DeepSpeedConfig config, TrainValues values, int total, Option<int> batch, Option<int> accumulation)
    {
        bool Known(Option<int> option) => CliOption.Given(parse, option) || config.TryGet(option.Name, out _, out _);
        var microKnown = Known(batch);
        var accumulationKnown = Known(accumulation);
        if (!microKnown && !accumulationKnown)
        {
            config.Derive(batch.Name, total);
            config.Derive(accumulation.Name, 1);
            return;
        }
        // DeepSpeed's train_batch_size counts every process's micro batches.
        var processes = Functional.Distributed.Communicator.parseEnvironment(FuncConvert.FromFunc<string, string>(name => Environment.GetEnvironmentVariable(name)!)).Size;
        if (total % processes != 0)
        {
            throw new InvalidInputException(config.Path, "train_batch_size",
                $"is {total}, but it must equal micro batch x gradient accumulation x processes ({processes}), as DeepSpeed requires");
        }
        total /= processes;
        var known = microKnown ? values.Get(batch) : values.Get(accumulation);
        if (known < 1 || total % known != 0 || (microKnown && accumulationKnown && values.Get(batch) * values.Get(accumulation) != total))
        {
            var micro = microKnown ? values.Get(batch).ToString(CultureInfo.InvariantCulture) : "?";
            var steps = accumulationKnown ? values.Get(accumulation).ToString(CultureInfo.InvariantCulture) : "?";
            throw new InvalidInputException(config.Path, "train_batch_size",
                $"is {total * processes}, but it must equal micro batch ({micro}) x gradient accumulation ({steps}) x processes ({processes}), as DeepSpeed requires");
        }
        if (!accumulationKnown)
        {
            config.Derive(accumulation.Name, total / known);
        }
        else if (!microKnown)
        {
            config.Derive(batch.Name, total / known);
        }
    }

    /// <summary>The compute precision (fp32, bf16 or fp16) asked for by --bf16, --fp16, --torch_dtype, --dtype and
    /// the DeepSpeed config; they must agree.</summary>
    private string Precision(ParseResult parse, DeepSpeedConfig? config, Option<bool> bf16, Option<bool> fp16)
    {
        var sources = new List<(string Origin, string Location, string Value, string Precision)>();
        if (parse.GetValue(bf16))
        {
            sources.Add(("--bf16", "", "", "bf16"));
        }
        if (parse.GetValue(fp16))
        {
            sources.Add(("--fp16", "", "", "fp16"));
        }
        if (parse.GetValue(torchDtype) is { } torchValue && DtypePrecision("--torch-dtype", torchValue, "bfloat16, float16, float32 or auto") is { } torchPrecision)
        {
            sources.Add(("--torch-dtype", "", torchValue, torchPrecision));
        }
        if (parse.GetValue(dtype) is { } dtypeValue && DtypePrecision("--dtype", dtypeValue, "bf16, fp16 or fp32") is { } dtypePrecision)
        {
            sources.Add(("--dtype", "", dtypeValue, dtypePrecision));
        }
        foreach (var (option, precision) in new[] { (bf16.Name, "bf16"), (fp16.Name, "fp16") })
        {
            if (config is not null && config.TryGet(option, out _, out var field))
            {
                sources.Add((config.Path, field, "true", precision));
            }
        }
        if (sources.Count == 0)
        {
            return "fp32";
        }
        var first = sources[0];
        if (sources.FirstOrDefault(s => s.Precision != first.Precision) is { Origin: not null } other)
        {
            var described = first.Location != "" ? $"{first.Origin} ({first.Location} = {first.Value})"
                : first.Value != "" ? $"{first.Origin} {first.Value}" : first.Origin;
            var value = other.Location == "" && other.Value != "" ? $"{other.Value} " : "";
            throw new InvalidInputException(other.Origin, other.Location, $"{value}cannot be combined with {described}: choose one compute precision");
        }
        return first.Precision;
    }

    private static string? DtypePrecision(string option, string value, string expected) => value.Trim().ToLowerInvariant() switch
    {
        "bfloat16" or "bf16" => "bf16",
        "float16" or "fp16" or "half" => "fp16",
        "float32" or "fp32" or "float" => "fp32",
        "auto" => null,
        _ => throw new InvalidInputException(option, "", $"expected {expected}, got '{value}'"),
    };

    private static void Note(string text) => Console.Error.WriteLine($"note: {text}");
}

/// <summary>The train command's option values with a DeepSpeed config's settings applied: a flag that is given wins
/// only when it agrees with the file; otherwise the two contradict and the run is refused.</summary>
internal sealed class TrainValues(ParseResult parse, DeepSpeedConfig? config)
{
    /// <summary>fp32, bf16 or fp16.</summary>
    public string Precision { get; set; } = "fp32";

    /// <summary>DeepSpeed's ZeRO stage (--zero-stage or zero_optimization.stage).</summary>
    public int ZeroStage { get; set; }

    /// <summary>Elements per gradient reduction (--reduce-bucket-size or zero_optimization.reduce_bucket_size).</summary>
    public long ReduceBucketSize { get; set; } = Functional.Distributed.CollectiveBucketsModule.DefaultElements;

    /// <summary>Elements per parameter gather (--allgather-bucket-size or zero_optimization.allgather_bucket_size).</summary>
    public long AllgatherBucketSize { get; set; } = Functional.Distributed.CollectiveBucketsModule.DefaultElements;

    /// <summary>The option's value: the file's when it sets the option (checked against the flag when both are
    /// given), else the command line's (or its default).</summary>
    public T Get<T>(Option<T> option)
    {
        if (config is null || !config.TryGet(option.Name, out var value, out var field))
        {
            return parse.GetValue(option)!;
        }
        var type = Nullable.GetUnderlyingType(typeof(T)) ?? typeof(T);
        var fromFile = (T)Convert.ChangeType(value, type, CultureInfo.InvariantCulture);
        if (CliOption.Given(parse, option) && !Same(parse.GetValue(option), fromFile))
        {
            throw new InvalidInputException(option.Name, "",
                $"is {DeepSpeedConfig.Show(parse.GetValue(option))}, but {config.Path} sets {field} = {DeepSpeedConfig.Show(value)}: remove one of them");
        }
        return fromFile;
    }

    private static bool Same(object? flag, object? fromFile) => (flag, fromFile) switch
    {
        (string a, string b) => Normalize(a) == Normalize(b),
        _ => Equals(flag, fromFile),
    };

    private static string Normalize(string name) => name.Trim().ToLowerInvariant() is "adamw_torch" ? "adamw" : name.Trim().ToLowerInvariant();
}
