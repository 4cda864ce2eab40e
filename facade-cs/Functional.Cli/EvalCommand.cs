using System.CommandLine;

namespace Functional.Cli;

/// <summary>`functional eval`: the loss and the task's metrics of a model folder on a data file, printed and written as JSON.</summary>
internal static class EvalCommand
{
    public static Command Create()
    {
        var d = new EvaluateOptions();
        var model = CliOption.Create("--model", "The model folder.", "", "--model_name_or_path", "--model-name-or-path");
        var data = CliOption.Create("--data", "The data file (any training data format); every row is evaluated.", "", "--validation_file", "--validation-file");
        var output = CliOption.Create<string?>("--output", "The metrics file (default: MODEL/eval_results.json, HF Trainer's file).", null, "--output_file");
        var dataFormat = CliOption.Create("--data-format", "auto, deepspeed-chat, phoenix, alpaca, text, input-ids or conversation (messages / ShareGPT conversations).", d.DataFormat);
        var promptField = CliOption.Create<string?>("--prompt-field", "A custom prompt field.", null);
        var answerField = CliOption.Create<string?>("--answer-field", "A custom answer field.", null);
        var textField = CliOption.Create<string?>("--text-field", "A custom text field.", null);
        var trainOn = CliOption.Create("--train-on", "all (loss over prompt and answer), completion (the answer only) or assistant (the assistant turns of conversations).", d.TrainOn);
        var chatTemplate = CliOption.Create<string?>("--chat-template", "A Jinja chat template file for conversation rows instead of the model's own.", null, "--chat_template");
        var maxSeqLen = CliOption.Create("--max-seq-len", "Cut rows to this many tokens (0: the model's context).", d.MaxSeqLen, "--max_seq_length", "--max-seq-length");
        var batch = CliOption.Create("--per-device-eval-batch-size", "Rows per micro-batch.", d.BatchSize);
        var tokenizer = CliOption.Create<string?>("--tokenizer", "A tiktoken encoding (cl100k_base, o200k_base) instead of the model folder's tokenizer.", null);
        var task = CliOption.Create<string?>("--task", "causal-lm, sequence-classification or reward-model (default: as the folder's config.json says).", null);
        var labelField = CliOption.Create<string?>("--label-field", "The label field of a classification file (default label).", null);
        var chosenField = CliOption.Create<string?>("--chosen-field", "The preferred answer's field of a reward file (default chosen).", null);
        var rejectedField = CliOption.Create<string?>("--rejected-field", "The other answer's field of a reward file (default rejected).", null);
        var command = new Command("eval", "Evaluate a model folder on a data file, printed and written as JSON in the names of training's evaluation lines: eval_loss and eval_perplexity (causal LM), eval_accuracy and eval_macro_f1 (classifier), eval_accuracy and eval_mean_margin (reward model).")
        {
            model, data, output, dataFormat, promptField, answerField, textField, trainOn, chatTemplate, maxSeqLen, batch, tokenizer,
            task, labelField, chosenField, rejectedField,
        };
        command.SetAction(parse =>
        {
            var report = ModelEvaluation.Evaluate(new EvaluateOptions
            {
                ModelPath = parse.GetValue(model)!,
                DataPath = parse.GetValue(data)!,
                OutputPath = parse.GetValue(output),
                DataFormat = parse.GetValue(dataFormat)!,
                PromptField = parse.GetValue(promptField),
                AnswerField = parse.GetValue(answerField),
                TextField = parse.GetValue(textField),
                TrainOn = parse.GetValue(trainOn)!,
                ChatTemplate = parse.GetValue(chatTemplate),
                MaxSeqLen = parse.GetValue(maxSeqLen),
                BatchSize = parse.GetValue(batch),
                Tokenizer = parse.GetValue(tokenizer),
                Task = parse.GetValue(task),
                LabelField = parse.GetValue(labelField),
                ChosenField = parse.GetValue(chosenField),
                RejectedField = parse.GetValue(rejectedField),
            });
            Console.WriteLine(report.Line);
            Console.Error.WriteLine($"wrote {report.OutputPath}");
            return 0;
        });
        return command;
    }
}
