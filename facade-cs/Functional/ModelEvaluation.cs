using Functional.Training;
using Microsoft.FSharp.Core;

namespace Functional;

/// <summary>What <see cref="ModelEvaluation.Evaluate"/> reads and how (the `functional eval` command).</summary>
public sealed class EvaluateOptions
{
    /// <summary>The model folder (--model).</summary>
    public string ModelPath { get; set; } = "";

    /// <summary>The data file, in any training data format; every row is evaluated (--data).</summary>
    public string DataPath { get; set; } = "";

    /// <summary>The metrics file (--output); null: MODEL/eval_results.json, HF Trainer's file.</summary>
    public string? OutputPath { get; set; }

    /// <summary>auto, deepspeed-chat, phoenix, alpaca, text or input-ids (--data-format; default auto).</summary>
    public string DataFormat { get; set; } = "auto";

    /// <summary>A custom prompt field (--prompt-field).</summary>
    public string? PromptField { get; set; }

    /// <summary>A custom answer field (--answer-field).</summary>
    public string? AnswerField { get; set; }

    /// <summary>A custom text field (--text-field).</summary>
    public string? TextField { get; set; }

    /// <summary>all (the loss over prompt and answer) or completion (the answer only) (--train-on; default all).</summary>
    public string TrainOn { get; set; } = "all";

    /// <summary>Rows are cut to this many tokens; 0: the model's context (--max-seq-len; default 0).</summary>
    public int MaxSeqLen { get; set; }

    /// <summary>Rows per micro-batch (--per-device-eval-batch-size; default 8).</summary>
    public int BatchSize { get; set; } = 8;

    /// <summary>A tiktoken encoding instead of the model folder's tokenizer (--tokenizer).</summary>
    public string? Tokenizer { get; set; }
}

/// <summary>What an evaluation measured.</summary>
/// <param name="Task">What the model was evaluated as: "causal-lm".</param>
/// <param name="Metrics">eval_loss, eval_perplexity, eval_samples, eval_tokens (the names of training's evaluation lines).</param>
/// <param name="OutputPath">The metrics file written.</param>
/// <param name="Line">The metrics as one compact JSON line.</param>
public sealed record EvaluationReport(string Task, IReadOnlyDictionary<string, double> Metrics, string OutputPath, string Line);

/// <summary>Evaluating a model folder on a data file (the `functional eval` command).</summary>
public static class ModelEvaluation
{
    /// <summary>Evaluates the model on every row of the data (eval mode, no gradients) and writes the metrics as JSON.
    /// Bad input raises <see cref="InvalidInputException"/> naming the file, line or option and what was expected.</summary>
    /// <param name="options">The model, the data and how to read it.</param>
    public static EvaluationReport Evaluate(EvaluateOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (string.IsNullOrWhiteSpace(options.ModelPath))
        {
            throw new InvalidInputException("--model", "", "is required");
        }
        if (string.IsNullOrWhiteSpace(options.DataPath))
        {
            throw new InvalidInputException("--data", "", "is required");
        }
        var data = FineTuning.ToData(new FineTuneOptions
        {
            DataFormat = options.DataFormat,
            PromptField = options.PromptField,
            AnswerField = options.AnswerField,
            TextField = options.TextField,
            TrainOn = options.TrainOn,
            Tokenizer = options.Tokenizer,
        });
        var request = new EvalRequest(
            modelPath: options.ModelPath,
            dataPath: options.DataPath,
            outputPath: options.OutputPath is null ? FSharpOption<string>.None : FSharpOption<string>.Some(options.OutputPath),
            prompt: data.Prompt,
            maxSeqLen: options.MaxSeqLen,
            tokenizerName: data.TokenizerName,
            batchSize: options.BatchSize);
        var report = Training.Evaluate.run(request);
        var metrics = report.Metrics.ToDictionary(m => m.Item1, m => m.Item2);
        return new EvaluationReport(report.Task, metrics, report.OutputPath, Training.Evaluate.metricsLine(report));
    }
}
