using System.Globalization;
using System.Text.Json;

namespace Functional.Cli;

/// <summary>
/// A DeepSpeed JSON config (--deepspeed ds.json) read as the train command's options, the way HF Trainer's DeepSpeed
/// integration reads one: batch sizes, gradient accumulation, clipping, fp16 (with its loss scaling) or bf16, the
/// optimizer's and scheduler's parameters. "auto" leaves a value to the command line; ZeRO stages and offloading
/// change nothing on one process (a note says so); keys with no effect here are named in a note.
/// </summary>
internal sealed class DeepSpeedConfig
{
    private readonly Dictionary<string, (object Value, string Field)> values = new();

    private DeepSpeedConfig(string path) => Path = path;

    /// <summary>The config file.</summary>
    public string Path { get; }

    /// <summary>train_batch_size, when set: micro batch x accumulation x processes (1 here).</summary>
    public int? TrainBatchSize { get; private set; }

    /// <summary>zero_optimization.stage, when the file sets it.</summary>
    public int? ZeroStage { get; private set; }

    /// <summary>One-line notes on what the file asks for that has no effect here.</summary>
    public List<string> Notes { get; } = [];

    /// <summary>The value the file sets for a command-line option (by its name, e.g. --max-grad-norm) and the
    /// field that sets it, if any.</summary>
    public bool TryGet(string option, out object value, out string field)
    {
        if (values.TryGetValue(option, out var entry))
        {
            (value, field) = entry;
            return true;
        }
        (value, field) = (null!, "");
        return false;
    }

    /// <summary>Sets a command-line option's value from the batch-size rule (train_batch_size).</summary>
    public void Derive(string option, int value) => values[option] = (value, "train_batch_size");

    /// <summary>Reads the file. Raises <see cref="InvalidInputException"/> naming the file and its line for malformed
    /// JSON, and the field for a value of the wrong kind or one that cannot be honoured.</summary>
    public static DeepSpeedConfig Read(string path)
    {
        InvalidInput.requireFile(path, "the DeepSpeed config file does not exist", "a DeepSpeed JSON config file");
        JsonElement root;
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllText(path));
            root = document.RootElement.Clone();
        }
        catch (JsonException e)
        {
            var line = e.LineNumber is { } n ? (n + 1).ToString(CultureInfo.InvariantCulture) : "";
            var reason = e.Message.Split(" LineNumber:")[0].Split(" Path:")[0].ReplaceLineEndings(" ").Trim();
            throw new InvalidInputException(path, line, $"not valid JSON: {reason}");
        }
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new InvalidInputException(path, "", $"expected a JSON object, found {JsonInput.describe(root.ValueKind)}");
        }
        var config = new DeepSpeedConfig(path);
        config.ReadRoot(root);
        return config;
    }

    private void ReadRoot(JsonElement root)
    {
        var ignored = new List<string>();
        foreach (var property in root.EnumerateObject())
        {
            var name = property.Name;
            var value = property.Value;
            switch (name)
            {
                case "train_batch_size":
                    TrainBatchSize = Integer(value, name);
                    break;
                case "train_micro_batch_size_per_gpu":
                    Set("--per-device-train-batch-size", Integer(value, name), name);
                    break;
                case "gradient_accumulation_steps":
                    Set("--gradient-accumulation-steps", Integer(value, name), name);
                    break;
                case "gradient_clipping":
                    Set("--max-grad-norm", Number(value, name), name);
                    break;
                case "fp16":
                    ReadFp16(Section(value, name));
                    break;
                case "bf16":
                case "bfloat16":
                    if (Enabled(Section(value, name), name) == true)
                    {
                        Set("--bf16", true, $"{name}.enabled");
                    }
                    break;
                case "optimizer":
                    ReadOptimizer(Section(value, name));
                    break;
                case "scheduler":
                    ReadScheduler(Section(value, name));
                    break;
                case "zero_optimization":
                    ReadZero(Section(value, name));
                    break;
                default:
                    ignored.Add(name);
                    break;
            }
        }
        if (ignored.Count > 0)
        {
            Notes.Add($"{Path}: {string.Join(", ", ignored)}: no effect here");
        }
    }

    private void ReadFp16(JsonElement fp16)
    {
        if (Enabled(fp16, "fp16") != true)
        {
            return;
        }
        Set("--fp16", true, "fp16.enabled");
        foreach (var property in fp16.EnumerateObject())
        {
            var field = $"fp16.{property.Name}";
            switch (property.Name)
            {
                case "enabled":
                    break;
                case "loss_scale":
                    Set("--loss-scale", Number(property.Value, field), field);
                    break;
                case "initial_scale_power":
                    Set("--initial-scale-power", Integer(property.Value, field), field);
                    break;
                case "loss_scale_window":
                    Set("--loss-scale-window", Integer(property.Value, field), field);
                    break;
                case "hysteresis":
                    Set("--hysteresis", Integer(property.Value, field), field);
                    break;
                case "min_loss_scale":
                    Set("--min-loss-scale", Number(property.Value, field), field);
                    break;
                default:
                    Notes.Add($"{Path}: {field}: no effect here");
                    break;
            }
        }
    }

    private void ReadOptimizer(JsonElement optimizer)
    {
        if (JsonInput.field(optimizer, "type") is { } type)
        {
            var name = Text(type.Value, "optimizer.type");
            if (name is not null && !name.Equals("Adam", StringComparison.OrdinalIgnoreCase) && !name.Equals("AdamW", StringComparison.OrdinalIgnoreCase))
            {
                throw new InvalidInputException(Path, "optimizer.type", $"expected Adam or AdamW (or remove the block and pass --optimizer), got '{name}'");
            }
            if (name is not null)
            {
                Set("--optimizer", "adamw", "optimizer.type");
            }
        }
        if (JsonInput.field(optimizer, "params") is not { } parameters)
        {
            return;
        }
        var section = Section(parameters.Value, "optimizer.params");
        foreach (var property in section.EnumerateObject())
        {
            var field = $"optimizer.params.{property.Name}";
            switch (property.Name)
            {
                case "lr":
                    Set("--learning-rate", Number(property.Value, field), field);
                    break;
                case "eps":
                    Set("--adam-epsilon", Number(property.Value, field), field);
                    break;
                case "weight_decay":
                    Set("--weight-decay", Number(property.Value, field), field);
                    break;
                case "betas" when property.Value.ValueKind == JsonValueKind.Array && property.Value.GetArrayLength() == 2:
                    Set("--adam-beta1", Number(property.Value[0], field + "[0]"), field + "[0]");
                    Set("--adam-beta2", Number(property.Value[1], field + "[1]"), field + "[1]");
                    break;
                case "betas" when !IsAuto(property.Value):
                    throw new InvalidInputException(Path, field, $"expected [beta1, beta2] or \"auto\", found {JsonInput.describe(property.Value.ValueKind)}");
                case "betas":
                    break;
                default:
                    Notes.Add($"{Path}: {field}: no effect here");
                    break;
            }
        }
    }

    private void ReadScheduler(JsonElement scheduler)
    {
        if (JsonInput.field(scheduler, "type") is { } type && Text(type.Value, "scheduler.type") is { } name)
        {
            var schedule = name switch
            {
                "WarmupLR" => "constant_with_warmup",
                "WarmupDecayLR" => "linear",
                "WarmupCosineLR" => "cosine",
                _ => throw new InvalidInputException(Path, "scheduler.type", $"expected WarmupLR, WarmupDecayLR or WarmupCosineLR (or remove the block and pass --lr-scheduler-type), got '{name}'"),
            };
            Set("--lr-scheduler-type", schedule, "scheduler.type");
        }
        if (JsonInput.field(scheduler, "params") is not { } parameters)
        {
            return;
        }
        foreach (var property in Section(parameters.Value, "scheduler.params").EnumerateObject())
        {
            var field = $"scheduler.params.{property.Name}";
            switch (property.Name)
            {
                case "warmup_num_steps":
                    Set("--num-warmup-steps", Integer(property.Value, field), field);
                    break;
                case "total_num_steps":
                    Set("--max-steps", Integer(property.Value, field), field);
                    break;
                case "warmup_max_lr":
                    Set("--learning-rate", Number(property.Value, field), field);
                    break;
                case "warmup_min_lr":
                    if (Number(property.Value, field) is { } min && min != 0)
                    {
                        throw new InvalidInputException(Path, field, $"only 0 is supported (the warmup starts from 0, as HF's schedules), got {min.ToString(CultureInfo.InvariantCulture)}");
                    }
                    break;
                case "warmup_type":
                    if (Text(property.Value, field) is { } kind && kind != "linear")
                    {
                        Notes.Add($"{Path}: {field} = {kind}: the warmup is linear here (HF's schedules)");
                    }
                    break;
                default:
                    Notes.Add($"{Path}: {field}: no effect here");
                    break;
            }
        }
    }

    private void ReadZero(JsonElement zero)
    {
        if (JsonInput.field(zero, "stage") is { } stageField && Integer(stageField.Value, "zero_optimization.stage") is { } stage)
        {
            if (stage is < 0 or > 3)
            {
                throw new InvalidInputException(Path, "zero_optimization.stage", $"expected 0, 1, 2 or 3, got {stage}");
            }
            ZeroStage = stage;
        }
        foreach (var (name, option) in new[] { ("reduce_bucket_size", "--reduce-bucket-size"), ("allgather_bucket_size", "--allgather-bucket-size") })
        {
            if (JsonInput.field(zero, name) is { } bucket && Number(bucket.Value, "zero_optimization." + name) is { } elements)
            {
                if (elements != Math.Floor(elements) || elements < 1 || elements > int.MaxValue)
                {
                    throw new InvalidInputException(Path, "zero_optimization." + name, $"expected a number of elements from 1 to {int.MaxValue}, got {Show(elements)}");
                }
                Set(option, (long)elements, "zero_optimization." + name);
            }
        }
        var read = new[] { "stage", "reduce_bucket_size", "allgather_bucket_size" };
        var others = zero.EnumerateObject().Select(p => p.Name).Where(n => !read.Contains(n)).ToList();
        if (others.Count > 0)
        {
            Notes.Add($"{Path}: zero_optimization.{string.Join(", zero_optimization.", others)}: no effect here (offload and the other tuning: everything is in CPU memory)");
        }
    }

    private void Set(string option, object? value, string field)
    {
        if (value is null)
        {
            return;
        }
        if (values.TryGetValue(option, out var earlier) && !Equals(earlier.Value, value))
        {
            throw new InvalidInputException(Path, field, $"is {Show(value)}, but {earlier.Field} = {Show(earlier.Value)} sets the same option ({option})");
        }
        values[option] = (value, field);
    }

    /// <summary>A value for messages: numbers in the invariant culture, text as it is.</summary>
    public static string Show(object? value) => value switch
    {
        double d => d.ToString("R", CultureInfo.InvariantCulture),
        bool b => b ? "true" : "false",
        null => "null",
        _ => Convert.ToString(value, CultureInfo.InvariantCulture) ?? "",
    };

    private static bool IsAuto(JsonElement value) => value.ValueKind == JsonValueKind.String && value.GetString() == "auto";

    private JsonElement Section(JsonElement value, string field) =>
        value.ValueKind == JsonValueKind.Object
            ? value
            : throw new InvalidInputException(Path, field, $"expected an object, found {JsonInput.describe(value.ValueKind)}");

    private bool? Enabled(JsonElement section, string name) =>
        JsonInput.field(section, "enabled") is not { } enabled || IsAuto(enabled.Value)
            ? null
            : enabled.Value.ValueKind switch
            {
                JsonValueKind.True => true,
                JsonValueKind.False => false,
                _ => throw new InvalidInputException(Path, $"{name}.enabled", $"expected true, false or \"auto\", found {JsonInput.describe(enabled.Value.ValueKind)}"),
            };

    private double? Number(JsonElement value, string field) =>
        IsAuto(value) ? null
        : value.ValueKind == JsonValueKind.Number ? value.GetDouble()
        : throw new InvalidInputException(Path, field, $"expected a number or \"auto\", found {JsonInput.describe(value.ValueKind)}");

    private int? Integer(JsonElement value, string field) =>
        IsAuto(value) ? null
        : value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out var n) ? n
        : throw new InvalidInputException(Path, field, $"expected an integer or \"auto\", found {(value.ValueKind == JsonValueKind.Number ? value.GetRawText() : JsonInput.describe(value.ValueKind))}");

    private string? Text(JsonElement value, string field) =>
        IsAuto(value) ? null
        : value.ValueKind == JsonValueKind.String ? value.GetString()
        : throw new InvalidInputException(Path, field, $"expected a string, found {JsonInput.describe(value.ValueKind)}");
}
