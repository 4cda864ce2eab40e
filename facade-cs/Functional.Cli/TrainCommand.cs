using System.CommandLine;

namespace Functional.Cli;

/// <summary>`functional train`: fine-tunes an HF model folder on pre-tokenized JSON Lines.</summary>
internal static class TrainCommand
{
    /// <summary>An option spelled in kebab-case, also accepting HF/DeepSpeed snake_case spellings.</summary>
    private static Option<T> Option<T>(string name, string description, T defaultValue, params string[] moreAliases)
    {
        var snake = "--" + name[2..].Replace('-', '_');
        var aliases = new[] { snake }.Concat(moreAliases).Where(a => a != name).Distinct().ToArray();
        return new Option<T>(name, aliases)
        {
            Description = description,
            DefaultValueFactory = _ => defaultValue,
        };
    }

    public static Command Create()
    {
        var d = new FineTuneOptions();
        var model = Option("--model", "Hugging Face model folder (config.json + model.safetensors).", "", "--model_name_or_path", "--model-name-or-path");
        var data = Option("--data", "Pre-tokenized JSON Lines, one {\"input_ids\": [...]} per line.", "", "--data_path", "--data-path", "--train_file", "--train-file");
        var output = Option("--output", "Output folder for metrics.jsonl and final/.", "", "--output_dir", "--output-dir");
        var overwrite = Option("--overwrite-output-dir", "Write into an output folder that is not empty.", false);
        var batch = Option("--per-device-train-batch-size", "Rows per micro-batch.", d.PerDeviceTrainBatchSize);
        var accumulation = Option("--gradient-accumulation-steps", "Micro-batches per optimizer step.", d.GradientAccumulationSteps);
        var lr = Option("--learning-rate", "Peak learning rate.", d.LearningRate);
        var weightDecay = Option("--weight-decay", "Weight decay (not applied to biases and norm weights).", d.WeightDecay);
        var beta1 = Option("--adam-beta1", "Adam beta1.", d.AdamBeta1);
        var beta2 = Option("--adam-beta2", "Adam beta2.", d.AdamBeta2);
        var epsilon = Option("--adam-epsilon", "Adam epsilon.", d.AdamEpsilon);
        var optimizer = Option("--optimizer", "adamw or sgd.", "adamw", "--optim");
        var momentum = Option("--momentum", "SGD momentum.", d.Momentum);
        var nesterov = Option("--nesterov", "SGD Nesterov momentum.", false);
        var scheduler = Option("--lr-scheduler-type", "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr or warmup_stable_decay.", d.LrSchedulerType);
        var schedulerKwargs = Option<string?>("--lr-scheduler-kwargs", "Schedule parameters as JSON, e.g. {\"num_cycles\": 2}.", null);
        var warmupSteps = Option("--num-warmup-steps", "Warmup optimizer steps.", d.NumWarmupSteps, "--warmup_steps", "--warmup-steps");
        var warmupRatio = Option("--warmup-ratio", "Warmup as a fraction of all steps (rounded up).", d.WarmupRatio);
        var epochs = Option("--num-train-epochs", "Epochs (when --max-steps is not set).", d.NumTrainEpochs);
        var maxSteps = Option("--max-steps", "Total optimizer steps (-1: use epochs).", d.MaxSteps);
        var maxGradNorm = Option("--max-grad-norm", "Clip gradients to this global norm (0: off).", d.MaxGradNorm);
        var maxSeqLen = Option("--max-seq-len", "Truncate rows to this many tokens.", d.MaxSeqLen, "--max_seq_length", "--max-seq-length");
        var seed = Option("--seed", "Random seed.", d.Seed);
        var noShuffle = Option("--no-shuffle", "Keep rows in file order.", false);
        var loggingSteps = Option("--logging-steps", "Write metrics every N optimizer steps.", d.LoggingSteps);
        var threads = Option("--threads", "Intra-op threads (0: all cores).", d.Threads);

        var command = new Command("train", "Fine-tune a GPT-2 or LLaMA checkpoint on pre-tokenized data.")
        {
            model, data, output, overwrite, batch, accumulation, lr, weightDecay, beta1, beta2, epsilon, optimizer,
            momentum, nesterov, scheduler, schedulerKwargs, warmupSteps, warmupRatio, epochs, maxSteps, maxGradNorm,
            maxSeqLen, seed, noShuffle, loggingSteps, threads,
        };
        command.SetAction(parse =>
        {
            var optimizerName = parse.GetValue(optimizer)!;
            var options = new FineTuneOptions
            {
                ModelPath = parse.GetValue(model)!,
                DataPath = parse.GetValue(data)!,
                OutputPath = parse.GetValue(output)!,
                OverwriteOutputDir = parse.GetValue(overwrite),
                PerDeviceTrainBatchSize = parse.GetValue(batch),
                GradientAccumulationSteps = parse.GetValue(accumulation),
                LearningRate = parse.GetValue(lr),
                WeightDecay = parse.GetValue(weightDecay),
                AdamBeta1 = parse.GetValue(beta1),
                AdamBeta2 = parse.GetValue(beta2),
                AdamEpsilon = parse.GetValue(epsilon),
                Optimizer = optimizerName.ToLowerInvariant() switch
                {
                    "adamw" or "adamw_torch" => OptimizerType.AdamW,
                    "sgd" => OptimizerType.Sgd,
                    _ => throw new InvalidInputException("--optimizer", "", $"expected adamw or sgd, got '{optimizerName}'"),
                },
                Momentum = parse.GetValue(momentum),
                Nesterov = parse.GetValue(nesterov),
                LrSchedulerType = parse.GetValue(scheduler)!,
                LrSchedulerKwargs = parse.GetValue(schedulerKwargs),
                NumWarmupSteps = parse.GetValue(warmupSteps),
                WarmupRatio = parse.GetValue(warmupRatio),
                NumTrainEpochs = parse.GetValue(epochs),
                MaxSteps = parse.GetValue(maxSteps),
                MaxGradNorm = parse.GetValue(maxGradNorm),
                MaxSeqLen = parse.GetValue(maxSeqLen),
                Seed = parse.GetValue(seed),
                NoShuffle = parse.GetValue(noShuffle),
                LoggingSteps = parse.GetValue(loggingSteps),
                Threads = parse.GetValue(threads),
            };
            var result = FineTuning.Run(options, p => Console.WriteLine(
                $"step {p.Step}/{p.TotalSteps}  epoch {Program.Num(p.Epoch, "F2")}  loss {Program.Num(p.Loss, "F4")}  " +
                $"lr {Program.Num(p.LearningRate, "E2")}  grad_norm {Program.Num(p.GradNorm, "F3")}  tokens/s {Program.Num(p.TokensPerSecond, "F0")}"));
            Console.WriteLine(
                $"trained {result.Steps} steps in {Program.Num(result.Seconds, "F1")} s; final loss {Program.Num(result.FinalLoss, "F4")}");
            Console.WriteLine($"metrics: {result.MetricsPath}");
            Console.WriteLine($"model:   {result.FinalModelPath}");
            return 0;
        });
        return command;
    }
}
