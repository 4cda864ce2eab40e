using System.CommandLine;
using Functional.Checkpoint;
using Functional.Peft;

namespace Functional.Cli;

/// <summary>`functional export --merge-lora`: fold a LoRA adapter into its base model and save a plain HF model folder.</summary>
internal static class ExportCommand
{
    private static readonly string[] TokenizerFiles =
        ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

    public static Command Create()
    {
        var model = CliOption.Create("--model", "The base model folder.", "", "--model_name_or_path", "--model-name-or-path");
        var adapter = CliOption.Create("--lora-adapter", "The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).", "");
        var merge = CliOption.Create("--merge-lora", "Fold the adapter into the base weights (PEFT's merge_and_unload).", false);
        var output = CliOption.Create("--output", "The folder of the merged HF model (replaced only when complete).", "", "--output_dir", "--output-dir");
        var command = new Command("export", "Export a model: with --merge-lora, base + adapter become one HF model folder.")
        {
            model, adapter, merge, output,
        };
        command.SetAction(parse =>
        {
            foreach (var (option, value) in new[] { (model, parse.GetValue(model)), (adapter, parse.GetValue(adapter)), (output, parse.GetValue(output)) })
            {
                if (string.IsNullOrWhiteSpace(value))
                {
                    throw new InvalidInputException(option.Name, "", "is required");
                }
            }
            if (!parse.GetValue(merge))
            {
                throw new InvalidInputException("--merge-lora", "", "export folds an adapter into its base model: pass --merge-lora");
            }
            var basePath = parse.GetValue(model)!;
            var lm = HfModelFolder.load(basePath, 0);
            var adapters = Lora.load(parse.GetValue(adapter)!, lm);
            Lora.merge(adapters);
            var tokenizer = TokenizerFiles.Select(f => Path.Combine(basePath, f)).Where(File.Exists);
            var source = File.ReadAllText(Path.Combine(basePath, "config.json"));
            HfModelFolder.save(parse.GetValue(output)!, lm, Microsoft.FSharp.Core.FSharpOption<string>.Some(source), Microsoft.FSharp.Collections.ListModule.OfSeq(tokenizer));
            Console.WriteLine($"merged {adapters.Adapters.Length} adapted projections into {parse.GetValue(output)}");
            return 0;
        });
        return command;
    }
}
