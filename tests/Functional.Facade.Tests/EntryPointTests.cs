using Microsoft.FSharp.Core;

namespace Functional.Facade.Tests;

/// <summary>The facade's generate, export and tokenize entry points on a tiny model.</summary>
public static class EntryPointTests
{
    private static readonly string[] Texts = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot"];

    /// <summary>A one-layer LLaMA with a byte-level BPE tokenizer learned from <see cref="Texts"/>.</summary>
    private static void TinyModel(string folder, int context)
    {
        var vocabulary = Text.BpeTraining.train(Texts, 12);
        var config = Models.ModelConfigModule.parse("test",
            $$"""{"model_type": "llama", "vocab_size": {{vocabulary.Tokens.Length}}, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": {{context}}}""");
        var lm = Models.CausalLmModule.create(config, 2);
        Checkpoint.HfModelFolder.save(folder, lm, FSharpOption<string>.None, Microsoft.FSharp.Collections.FSharpList<string>.Empty);
        Text.BpeTraining.save(vocabulary, folder);
    }

    [FacadeTest("TextGeneration.Generate continues each prompt, greedy and seeded sampling alike, and reports the context")]
    public static void GenerateOnTinyModel()
    {
        using var folder = new TempFolder();
        var model = folder.File("model");
        TinyModel(model, 32);
        var greedy = TextGeneration.Generate(model, ["the cat", "a dog"], new GenerateOptions { Greedy = true, MaxNewTokens = 4 });
        Check.Equal(2, greedy.Texts.Count, "one text per prompt");
        Check.Equal(32, greedy.ContextLength, "context");
        Check.Equal("max_position_embeddings", greedy.ContextField, "context field");
        Check.True(greedy.NewTokenLimit >= 4 && greedy.LongestPrompt > 0, "room for the new tokens");
        var again = TextGeneration.Generate(model, ["the cat", "a dog"], new GenerateOptions { Greedy = true, MaxNewTokens = 4 });
        Check.True(greedy.Texts.SequenceEqual(again.Texts), "greedy is deterministic");
        var sampled = TextGeneration.Generate(model, ["the cat"], new GenerateOptions { Seed = 3, MaxNewTokens = 4, Temperature = 0.8 });
        var sampledAgain = TextGeneration.Generate(model, ["the cat"], new GenerateOptions { Seed = 3, MaxNewTokens = 4, Temperature = 0.8 });
        Check.Equal(sampled.Texts[0], sampledAgain.Texts[0], "the same seed gives the same text");
        var e = Check.Throws<InvalidInputException>(
            () => TextGeneration.Generate(model, ["the cat"], new GenerateOptions { MaxNewTokens = 0 }), "0 new tokens");
        Check.Equal("max_new_tokens", e.Setting, "the core's check names the setting");
        Check.Equal("--max-new-tokens", e.Render(CommandLineFlags.Of).Origin, "which the command line spells as its option");
    }

    [FacadeTest("Tokenizer encodes and decodes with a model folder's tokenizer and with a tiktoken encoding")]
    public static void TokenizeRoundTrips()
    {
        using var folder = new TempFolder();
        var model = folder.File("model");
        TinyModel(model, 32);
        var tokenizer = Tokenizer.FromFolder(model);
        var ids = tokenizer.Encode("the cat sat");
        Check.True(ids.Length > 0 && ids.All(id => id >= 0 && id < tokenizer.VocabSize), "ids within the vocabulary");
        Check.Equal("the cat sat", tokenizer.Decode(ids), "round trip (folder)");
        Check.True(Tokenizer.KnownEncodings.Contains("cl100k_base"), "cl100k_base is known");
        var tiktoken = Tokenizer.FromEncoding("cl100k_base");
        Check.Equal("hello world", tiktoken.Decode(tiktoken.Encode("hello world")), "round trip (cl100k_base)");
        Check.Throws<InvalidInputException>(() => Tokenizer.FromEncoding("no_such_encoding"), "an unknown encoding");
    }

    [FacadeTest("ModelExport.MergeLora folds the golden GPT-2 adapter into a plain HF model folder")]
    public static void ExportMergesLora()
    {
        using var folder = new TempFolder();
        var golden = Golden.Case("gpt2-lora");
        var output = folder.File("merged");
        var merged = ModelExport.MergeLora(Path.Combine(golden, "model"), Path.Combine(golden, "adapter"), output);
        Check.True(merged > 0, $"adapted projections merged ({merged})");
        Check.True(File.Exists(Path.Combine(output, "config.json")) && File.Exists(Path.Combine(output, "model.safetensors")), "an HF model folder");
        Check.True(!File.Exists(Path.Combine(output, "adapter_config.json")), "no adapter left");
        var e = Check.Throws<InvalidInputException>(
            () => ModelExport.MergeLora(Path.Combine(golden, "model"), folder.File("none"), folder.File("merged2")), "a missing adapter");
        Check.True(e.Origin.Contains("adapter_config.json"), $"names the adapter file ({e.Origin})");
    }

    [FacadeTest("ModelExport.Export writes bf16 shards with the options applied to a LoRA merge, and ModelEvaluation.Evaluate measures the result")]
    public static void ExportShardsAndEvaluates()
    {
        using var folder = new TempFolder();
        var golden = Golden.Case("gpt2-lora");
        var output = folder.File("merged");
        var result = ModelExport.Export(Path.Combine(golden, "model"), output, "bf16", "20KB", Path.Combine(golden, "adapter"));
        Check.True(result.MergedProjections > 0, $"adapted projections merged ({result.MergedProjections})");
        Check.Equal("bf16", result.DType, "dtype");
        Check.True(result.WeightFiles.Count > 1 && File.Exists(Path.Combine(output, "model.safetensors.index.json")), "sharded");
        var report = ModelEvaluation.Evaluate(new EvaluateOptions { ModelPath = output, DataPath = Path.Combine(golden, "data.jsonl"), OutputPath = folder.File("eval.json") });
        Check.Equal("causal-lm", report.Task, "task");
        Check.True(report.Metrics["eval_loss"] > 0 && Math.Abs(report.Metrics["eval_perplexity"] - Math.Exp(report.Metrics["eval_loss"])) < 1e-9 * report.Metrics["eval_perplexity"], "loss and perplexity");
        Check.True(File.Exists(folder.File("eval.json")), "written");
        var e = Check.Throws<InvalidInputException>(() => ModelExport.Export(Path.Combine(golden, "model"), folder.File("x"), "int8"), "a bad dtype");
        Check.True(e.Message.Contains("int8"), $"names the value ({e.Message})");
    }
}
