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

    /// <summary>all (the loss over prompt and answer), completion (the answer only) or assistant (the assistant turns of
    /// conversation rows) (--train-on; default all).</summary>
    public string TrainOn { get; set; } = "all";

    /// <summary>A Jinja chat template file for conversation rows instead of the model's own (--chat-template).</summary>
    public string? ChatTemplate { get; set; }

    /// <summary>Rows are cut to this many tokens; 0: the model's context (--max-seq-len; default 0).</summary>
    public int MaxSeqLen { get; set; }

    /// <summary>Rows per micro-batch (--per-device-eval-batch-size; default 8).</summary>
    public int BatchSize { get; set; } = 8;

    /// <summary>A tiktoken encoding instead of the model folder's tokenizer (--tokenizer).</summary>
    public string? Tokenizer { get; set; }

    /// <summary>What the folder is evaluated as (--task): "causal-lm", "sequence-classification" or
    /// "reward-model"; null: the folder's config.json decides (a causal LM; a one-label classifier without
    /// problem_type as a reward model; any other classifier on "text" and "label" fields).</summary>
    public string? Task { get; set; }

    /// <summary>The label field of a classification file (--label-field; needs <see cref="Task"/>).</summary>
    public string? LabelField { get; set; }

    /// <summary>The preferred answer's field of a reward file (--chosen-field; needs <see cref="Task"/>).</summary>
    public string? ChosenField { get; set; }

    /// <summary>The other answer's field of a reward file (--rejected-field; needs <see cref="Task"/>).</summary>
    public string? RejectedField { get; set; }
}

/// <summary>What an evaluation measured.</summary>
/// <param name="Task">What the model was evaluated as: "causal-lm", "sequence-classification" or "reward-model".</param>
/// <param name="Metrics">The names of training's evaluation lines: eval_loss, eval_perplexity, eval_samples, eval_tokens
/// (causal LM); eval_loss, eval_accuracy, eval_macro_f1, eval_samples (classification); eval_loss, eval_accuracy,
/// eval_mean_margin, eval_samples (reward model, samples are pairs).</param>
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
            ChatTemplate = options.ChatTemplate,
            Tokenizer = options.Tokenizer,
        });
        FSharpOption<TrainingTask> task;
        if (options.Task is null)
        {
            var stray = options.LabelField is not null ? "--label-field"
                : options.ChosenField is not null ? "--chosen-field"
                : options.RejectedField is not null ? "--rejected-field"
                : null;
            if (stray is not null)
            {
                throw new InvalidInputException(stray, "", "needs --task sequence-classification or reward-model");
            }
            task = FSharpOption<TrainingTask>.None;
        }
        else
        {
            task = FSharpOption<TrainingTask>.Some(FineTuning.ToTask(new FineTuneOptions
            {
                Task = options.Task,
                TextField = options.TextField,
                PromptField = options.PromptField,
                LabelField = options.LabelField,
                ChosenField = options.ChosenField,
                RejectedField = options.RejectedField,
            }));
        }
        var request = new EvalRequest(
            modelPath: options.ModelPath,
            dataPath: options.DataPath,
            outputPath: options.OutputPath is null ? FSharpOption<string>.None : FSharpOption<string>.Some(options.OutputPath),
            prompt: data.Prompt,
            maxSeqLen: options.MaxSeqLen,
            tokenizerName: data.TokenizerName,
            batchSize: options.BatchSize,
            task: task);
        var report = Training.Evaluate.run(request);
        var metrics = report.Metrics.ToDictionary(m => m.Item1, m => m.Item2);
        return new EvaluationReport(report.Task, metrics, report.OutputPath, Training.Evaluate.metricsLine(report));
    }
}
