using System.CommandLine;

namespace Functional.Cli;

/// <summary>`functional generate`: continue prompts with a model folder and its tokenizer.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var defaults = new GenerateOptions();
        var model = CliOption.Create("--model", "Hugging Face model folder with its tokenizer files.", "", "--model_name_or_path", "--model-name-or-path");
        var prompts = new Option<string[]>("--prompt")
        {
            Description = "A prompt to continue; repeat the option for a batch.",
            AllowMultipleArgumentsPerToken = false,
        };
        var promptFile = CliOption.Create<string?>("--prompt-file", "A file with one prompt per line.", null);
        var maxNewTokens = CliOption.Create("--max-new-tokens", "Most tokens to generate per prompt.", defaults.MaxNewTokens);
        var temperature = CliOption.Create("--temperature", "Divide the logits by this before sampling.", 1.0);
        var topK = CliOption.Create("--top-k", "Sample among the k most likely tokens (0: off).", 0);
        var topP = CliOption.Create("--top-p", "Sample among the most likely tokens whose probability sums to p (1: off).", 1.0);
        var seed = CliOption.Create("--seed", "Seed of the sampling: the same seed gives the same text.", 42L);
        var greedy = CliOption.Create("--greedy", "Always take the most likely token.", false);
        var threads = CliOption.Create("--threads", "Intra-op threads (0: all cores).", 0);
        var prefixAdapter = CliOption.Create<string?>("--prefix-adapter", "A PEFT prefix adapter folder (functional train --prefix-tuning): every layer attends to its prefix first.", null);
        var chat = CliOption.Create("--chat", "Each prompt is a user message, rendered with the model's chat template (and its generation prompt); stop at the template's end-of-turn token.", false);
        var system = CliOption.Create<string?>("--system", "With --chat: a system message before every prompt.", null);
        var chatTemplate = CliOption.Create<string?>("--chat-template", "With --chat: a Jinja chat template file instead of the model's own.", null, "--chat_template");
        var command = new Command("generate", "Continue prompts with a trained model (stops at eos; batched; key/value cache).")
        {
            model, prompts, promptFile, maxNewTokens, temperature, topK, topP, seed, greedy, threads, prefixAdapter, chat, system, chatTemplate,
        };
        HelpGroups.Add(command, "Model and prompts", model, prompts, promptFile, prefixAdapter, chat, system, chatTemplate);
        HelpGroups.Add(command, "Decoding", maxNewTokens, greedy, temperature, topK, topP, seed, threads);
        command.SetAction(parse =>
        {
            var modelPath = parse.GetValue(model)!;
            if (string.IsNullOrWhiteSpace(modelPath))
            {
                throw new InvalidInputException("--model", "", "is required");
            }
            var all = (parse.GetValue(prompts) ?? []).ToList();
            if (parse.GetValue(promptFile) is { } file)
            {
                if (!File.Exists(file))
                {
                    throw new InvalidInputException(file, "", "the prompt file does not exist");
                }
                all.AddRange(File.ReadAllLines(file).Where(line => line.Length > 0));
            }
            if (all.Count == 0)
            {
                throw new InvalidInputException("--prompt", "", "give at least one prompt (--prompt TEXT or --prompt-file FILE)");
            }
            var result = TextGeneration.Generate(modelPath, all, new GenerateOptions
            {
                MaxNewTokens = parse.GetValue(maxNewTokens),
                Greedy = parse.GetValue(greedy),
                Temperature = parse.GetValue(temperature),
                TopK = parse.GetValue(topK),
                TopP = parse.GetValue(topP),
                Seed = parse.GetValue(seed),
                Threads = parse.GetValue(threads),
                PrefixAdapter = parse.GetValue(prefixAdapter),
                Chat = parse.GetValue(chat),
                System = parse.GetValue(system),
                ChatTemplate = parse.GetValue(chatTemplate),
            });
            if (result.NewTokenLimit < parse.GetValue(maxNewTokens))
            {
                Console.Error.WriteLine(
                    $"note: generation stops at the model's context ({result.ContextField} = {result.ContextLength}): the longest prompt has {result.LongestPrompt} tokens, so at most {result.NewTokenLimit} new tokens instead of --max-new-tokens {parse.GetValue(maxNewTokens)}");
            }
            var answers = result.Texts;
            foreach (var answer in answers)
            {
                Console.WriteLine(answer);
            }
            return 0;
        });
        return command;
    }
}
