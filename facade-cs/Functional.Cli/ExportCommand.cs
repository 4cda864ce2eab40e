using System.CommandLine;

namespace Functional.Cli;

/// <summary>`functional export`: write a model folder anew as HF's save_pretrained would (dtype, shards), optionally
/// with a LoRA adapter folded in (--merge-lora).</summary>
internal static class ExportCommand
{
    public static Command Create()
    {
        var model = CliOption.Create("--model", "The model folder (the base model with --merge-lora).", "", "--model_name_or_path", "--model-name-or-path");
        var adapter = CliOption.Create("--lora-adapter", "With --merge-lora: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors).", "");
        var merge = CliOption.Create("--merge-lora", "Fold the adapter into the base weights (PEFT's merge_and_unload).", false);
        var output = CliOption.Create("--output", "The folder of the exported HF model (replaced only when complete).", "", "--output_dir", "--output-dir");
        var dtype = CliOption.Create<string?>("--dtype", "fp32, bf16 or fp16: the dtype of the written weights and config.json's torch_dtype (default: as the source stores them).", null, "--torch-dtype", "--torch_dtype");
        var shard = CliOption.Create<string?>("--max-shard-size", "The largest weight shard (HF's max_shard_size: 5GB = 5e9 bytes, 2GiB, 500MB; default 5GB).", null);
        var command = new Command("export", "Export a model folder as HF's save_pretrained would (--dtype, --max-shard-size); with --merge-lora, base + adapter become one HF model folder.")
        {
            model, adapter, merge, output, dtype, shard,
        };
        command.SetAction(parse =>
        {
            foreach (var (option, value) in new[] { (model, parse.GetValue(model)), (output, parse.GetValue(output)) })
            {
                if (string.IsNullOrWhiteSpace(value))
                {
                    throw new InvalidInputException(option.Name, "", "is required");
                }
            }
            var merging = parse.GetValue(merge);
            var adapterPath = parse.GetValue(adapter);
            if (merging && string.IsNullOrWhiteSpace(adapterPath))
            {
                throw new InvalidInputException("--lora-adapter", "", "is required with --merge-lora");
            }
            if (!merging && !string.IsNullOrWhiteSpace(adapterPath))
            {
                throw new InvalidInputException("--merge-lora", "", "export folds an adapter into its base model only with --merge-lora: pass it, or leave out --lora-adapter");
            }
            var result = ModelExport.Export(parse.GetValue(model)!, parse.GetValue(output)!, parse.GetValue(dtype), parse.GetValue(shard), merging ? adapterPath : null);
            var files = result.WeightFiles.Count == 1 ? result.WeightFiles[0] : $"{result.WeightFiles.Count} shards";
            if (merging)
            {
                Console.WriteLine($"merged {result.MergedProjections} adapted projections into {parse.GetValue(output)} ({result.DType}, {files})");
            }
            else
            {
                Console.WriteLine($"exported {parse.GetValue(model)} to {parse.GetValue(output)} ({result.DType}, {files})");
            }
            return 0;
        });
        return command;
    }
}
