using System.CommandLine;

namespace Functional.Cli;

/// <summary>`functional export --merge-lora`: fold a LoRA adapter into its base model and save a plain HF model folder.</summary>
internal static class ExportCommand
{
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
            var merged = ModelExport.MergeLora(parse.GetValue(model)!, parse.GetValue(adapter)!, parse.GetValue(output)!);
            Console.WriteLine($"merged {merged} adapted projections into {parse.GetValue(output)}");
            return 0;
        });
        return command;
    }
}
