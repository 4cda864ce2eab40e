using Functional.Checkpoint;
using Functional.Generation;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;

namespace Functional;

/// <summary>How <see cref="TextGeneration.Generate"/> continues prompts; the defaults are sampling at
/// temperature 1 with no filter, 64 new tokens, seed 42.</summary>
public sealed class GenerateOptions
{
    /// <summary>Most tokens to generate per prompt (--max-new-tokens).</summary>
    public int MaxNewTokens { get; set; } = GenerationOptionsModule.defaults.MaxNewTokens;

    /// <summary>Divide the logits by this before sampling (--temperature).</summary>
    public double Temperature { get; set; } = 1.0;

    /// <summary>Sample among the k most likely tokens; 0 turns the filter off (--top-k).</summary>
    public int TopK { get; set; }

    /// <summary>Sample among the most likely tokens whose probability sums to p; 1 turns the filter off (--top-p).</summary>
    public double TopP { get; set; } = 1.0;

    /// <summary>Seed of the sampling and of the model's load: the same seed gives the same text (--seed).</summary>
    public long Seed { get; set; } = 42;

    /// <summary>Always take the most likely token (--greedy).</summary>
    public bool Greedy { get; set; }

    /// <summary>Intra-op threads; 0 leaves TorchSharp's setting (--threads).</summary>
    public int Threads { get; set; }

    /// <summary>A PEFT prefix adapter folder: every layer attends to its prefix first (--prefix-adapter); null: none.</summary>
    public string? PrefixAdapter { get; set; }

    /// <summary>Each prompt is a user message: rendered with the model's chat template and its generation prompt,
    /// and a row stops at the template's end-of-turn token as well as at eos (--chat).</summary>
    public bool Chat { get; set; }

    /// <summary>With <see cref="Chat"/>: a system message put before every prompt (--system); null: none.</summary>
    public string? System { get; set; }

    /// <summary>With <see cref="Chat"/>: a Jinja chat template file instead of the model's own (--chat-template).</summary>
    public string? ChatTemplate { get; set; }
}

/// <summary>The continuations of a batch of prompts.</summary>
/// <param name="Texts">One continuation per prompt, in order.</param>
/// <param name="NewTokenLimit">The most new tokens the model's context left to the longest prompt.</param>
/// <param name="LongestPrompt">Tokens of the longest prompt.</param>
/// <param name="ContextField">The config.json field that holds the model's context, e.g. "n_positions".</param>
/// <param name="ContextLength">The model's context in tokens.</param>
public sealed record GenerationResult(
    IReadOnlyList<string> Texts, int NewTokenLimit, int LongestPrompt, string ContextField, int ContextLength);

/// <summary>Text generation with a Hugging Face model folder and its tokenizer (the `functional generate` command).</summary>
public static class TextGeneration
{
    /// <summary>
    /// Continues every prompt (batched, with the key/value cache; a row stops at the model's context). Checks the
    /// options first, then loads the tokenizer, the model and the prefix adapter. Bad input raises
    /// <see cref="InvalidInputException"/>; a bad option is named by its setting (<see cref="InvalidInputException.Setting"/>,
    /// e.g. max_new_tokens; <see cref="CommandLineFlags.Of"/> spells it as the command line does).
    /// </summary>
    /// <param name="modelPath">The model folder, with its tokenizer files.</param>
    /// <param name="prompts">The prompts, at least one.</param>
    /// <param name="options">Sampling and length; null: the defaults.</param>
    public static GenerationResult Generate(string modelPath, IEnumerable<string> prompts, GenerateOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(modelPath);
        ArgumentNullException.ThrowIfNull(prompts);
        var o = options ?? new GenerateOptions();
        var defaults = GenerationOptionsModule.defaults;
        var generation = new GenerationOptions(
            maxNewTokens: o.MaxNewTokens,
            sampling: new SamplingOptions(greedy: o.Greedy, temperature: o.Temperature, topK: o.TopK, topP: o.TopP, seed: o.Seed),
            eosId: defaults.EosId,
            stopIds: defaults.StopIds,
            padId: defaults.PadId,
            useCache: true);
        GenerationOptionsModule.validate(generation);
        if (!o.Chat && (o.System is not null || o.ChatTemplate is not null))
        {
            throw new InvalidInputException(o.System is not null ? "--system" : "--chat-template", "", "renders chat prompts: add --chat");
        }
        Runtime.TorchRuntime.ensure();
        if (o.Threads > 0)
        {
            TorchSharp.torch.set_num_threads(o.Threads);
        }
        var tokenizer = Text.Tokenizers.fromFolder(modelPath);
        var lm = HfModelFolder.load(modelPath, o.Seed);
        if (Microsoft.FSharp.Core.OptionModule.IsSome(Models.SequenceClassification.tryHead(lm)))
        {
            throw new InvalidInputException(
                System.IO.Path.Combine(modelPath, "config.json"),
                "architectures",
                $"is {Models.SequenceClassification.architecture(lm.Config)}, a sequence classifier: it scores texts and generates none; generate with a causal LM folder (...ForCausalLM), evaluate this one with functional eval");
        }
        if (o.PrefixAdapter is { } adapter)
        {
            lm = Peft.PrefixTuning.load(adapter, lm).Model;
        }
        long[][] encoded;
        if (o.Chat)
        {
            var template = Text.ChatTemplateModule.load(modelPath, o.ChatTemplate is null ? FSharpOption<string>.None : FSharpOption<string>.Some(o.ChatTemplate));
            var chat = Generator.encodeChatPrompts(
                template, tokenizer, o.System is null ? FSharpOption<string>.None : FSharpOption<string>.Some(o.System), ListModule.OfSeq(prompts));
            encoded = chat.Item1;
            generation = new GenerationOptions(
                generation.MaxNewTokens, generation.Sampling, generation.EosId, chat.Item2, generation.PadId, generation.UseCache);
        }
        else
        {
            encoded = Generator.encodePrompts(tokenizer, ListModule.OfSeq(prompts));
        }
        var room = Generator.newTokenLimit(lm, encoded);
        var texts = Generator.generateEncoded(lm, tokenizer, encoded, generation).ToList();
        return new GenerationResult(
            texts, room, encoded.Length == 0 ? 0 : encoded.Max(ids => ids.Length),
            Models.ModelConfigModule.contextField(lm.Config), Models.ModelConfigModule.contextLength(lm.Config));
    }
}

/// <summary>Exporting models (the `functional export` command).</summary>
public static class ModelExport
{
    private static readonly string[] TokenizerFiles =
        ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

    /// <summary>Folds a PEFT LoRA adapter into its base model (PEFT's merge_and_unload) and saves a plain HF model
    /// folder with the base's config and tokenizer files; the output folder is replaced only when complete.</summary>
    /// <param name="modelPath">The base model folder.</param>
    /// <param name="adapterPath">The adapter folder (adapter_config.json + adapter_model.safetensors).</param>
    /// <param name="outputPath">The merged model's folder.</param>
    /// <returns>The number of adapted projections merged.</returns>
    public static int MergeLora(string modelPath, string adapterPath, string outputPath)
    {
        ArgumentNullException.ThrowIfNull(adapterPath);
        return Export(modelPath, outputPath, null, null, adapterPath).MergedProjections;
    }

    /// <summary>Writes a model folder anew as HF's save_pretrained(torch_dtype, max_shard_size) would: config.json
    /// (torch_dtype set), the weights in one model.safetensors or in shards with model.safetensors.index.json, and the
    /// tokenizer files; with an adapter, the LoRA adapter is folded in first (PEFT's merge_and_unload). The output folder
    /// is written aside and replaces the old one only when complete. Weights load as float32 (exactly) and are rounded
    /// once to the dtype written, so exporting to the stored dtype is bit-exact.</summary>
    /// <param name="modelPath">The model folder.</param>
    /// <param name="outputPath">The exported model's folder.</param>
    /// <param name="dtype">fp32, bf16 or fp16 (also float32, bfloat16, float16); null keeps the dtype the source stores.</param>
    /// <param name="maxShardSize">The largest shard in HF's spelling ("5GB" = 5e9 bytes, "2GiB", "500MB"); null: 5GB.</param>
    /// <param name="loraAdapterPath">A PEFT LoRA adapter folder to merge; null for none.</param>
    public static ExportResult Export(string modelPath, string outputPath, string? dtype = null, string? maxShardSize = null, string? loraAdapterPath = null)
    {
        ArgumentNullException.ThrowIfNull(modelPath);
        ArgumentNullException.ThrowIfNull(outputPath);
        var shard = maxShardSize is null ? WeightsFormatModule.defaultMaxShardSize : WeightsFormatModule.parseSize("max_shard_size", maxShardSize);
        var requested = dtype is null ? (TorchSharp.torch.ScalarType?)null : WeightsFormatModule.parseDType("dtype", dtype);
        Runtime.TorchRuntime.ensure();
        var lm = HfModelFolder.load(modelPath, 0);
        var merged = 0;
        if (loraAdapterPath is not null)
        {
            var adapters = Peft.Lora.load(loraAdapterPath, lm);
            Peft.Lora.merge(adapters);
            merged = adapters.Adapters.Length;
        }
        var stored = requested ?? HfModelFolder.storedDType(modelPath);
        var tokenizer = TokenizerFiles.Select(f => Path.Combine(modelPath, f)).Where(File.Exists);
        var source = File.ReadAllText(Path.Combine(modelPath, "config.json"));
        HfModelFolder.saveAs(outputPath, lm, FSharpOption<string>.Some(source), ListModule.OfSeq(tokenizer), new WeightsFormat(stored, shard));
        var files = Directory.GetFiles(outputPath).Select(Path.GetFileName).Where(f => f!.EndsWith(".safetensors", StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToList();
        return new ExportResult(merged, WeightsFormatModule.shortName(stored), files!);
    }
}

/// <summary>What <see cref="ModelExport.Export"/> wrote.</summary>
/// <param name="MergedProjections">The LoRA-adapted projections folded in (0 without an adapter).</param>
/// <param name="DType">The dtype of the written weights: fp32, bf16 or fp16.</param>
/// <param name="WeightFiles">The safetensors files written, in name order.</param>
public sealed record ExportResult(int MergedProjections, string DType, IReadOnlyList<string> WeightFiles)
{
}

/// <summary>A tokenizer of a model folder or a tiktoken encoding, for .NET callers (the `functional tokenize` command).</summary>
public sealed class Tokenizer
{
    private readonly Text.TextTokenizer tokenizer;

    private Tokenizer(Text.TextTokenizer tokenizer) => this.tokenizer = tokenizer;

    /// <summary>The tiktoken encodings <see cref="FromEncoding"/> knows, e.g. "cl100k_base".</summary>
    public static IReadOnlyList<string> KnownEncodings { get; } = Text.Tokenizers.knownEncodings.ToList();

    /// <summary>The tokenizer of a Hugging Face model or tokenizer folder (tokenizer.json, vocab.json + merges.txt,
    /// or tokenizer.model).</summary>
    /// <param name="folder">The folder.</param>
    public static Tokenizer FromFolder(string folder) => new(Text.Tokenizers.fromFolder(folder));

    /// <summary>A tiktoken encoding by name (see <see cref="KnownEncodings"/>).</summary>
    /// <param name="name">The encoding's name.</param>
    public static Tokenizer FromEncoding(string name) => new(Text.Tokenizers.fromEncoding(name));

    /// <summary>The number of token ids.</summary>
    public int VocabSize => tokenizer.VocabSize;

    /// <summary>The token ids of a text.</summary>
    /// <param name="text">The text.</param>
    public long[] Encode(string text) => tokenizer.Encode.Invoke(text);

    /// <summary>The text of token ids.</summary>
    /// <param name="ids">The ids.</param>
    public string Decode(long[] ids) => tokenizer.Decode.Invoke(ids);
}

/// <summary>A model's chat template (the `functional chat-template` command): renders conversations as
/// transformers' <c>apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=False)</c>.</summary>
public sealed class ChatTemplate
{
    private readonly Text.ChatTemplate template;

    private ChatTemplate(Text.ChatTemplate template) => this.template = template;

    /// <summary>The chat template of a model folder: <paramref name="templateFile"/> when given, else the folder's
    /// chat_template.jinja, else tokenizer_config.json's chat_template; special tokens from tokenizer_config.json.</summary>
    /// <param name="folder">The model or tokenizer folder.</param>
    /// <param name="templateFile">A Jinja template file that replaces the folder's template, or null.</param>
    /// <exception cref="InvalidInputException">No template, or one that does not parse (file and line named).</exception>
    public static ChatTemplate FromFolder(string folder, string? templateFile = null) =>
        new(Text.ChatTemplateModule.load(folder, templateFile is null ? FSharpOption<string>.None : FSharpOption<string>.Some(templateFile)));

    /// <summary>Where the template came from.</summary>
    public string Source => template.Source;

    /// <summary>Renders one conversation given as JSON: an object with "messages" (role/content objects; roles
    /// system, user, assistant, tool) or ShareGPT's "conversations" (from/value), and optionally "tools".</summary>
    /// <param name="conversationJson">The conversation row.</param>
    /// <param name="addGenerationPrompt">Append the header of the assistant's next turn.</param>
    /// <exception cref="InvalidInputException">The row is not a conversation, or the template refused it.</exception>
    public string Render(string conversationJson, bool addGenerationPrompt = false)
    {
        var parsed = JsonInput.tryParse(conversationJson);
        if (parsed.IsError)
        {
            throw new InvalidInputException("conversation", "", $"not valid JSON ({parsed.ErrorValue.Reason})");
        }
        var conversation = Text.ChatTemplateModule.parseConversation(parsed.ResultValue);
        if (conversation.IsError)
        {
            throw new InvalidInputException("conversation", "", conversation.ErrorValue);
        }
        try
        {
            return Text.ChatTemplateModule.render(template, conversation.ResultValue, addGenerationPrompt);
        }
        catch (Text.JinjaException e)
        {
            throw new InvalidInputException(e.Template, e.Line > 0 ? e.Line.ToString(System.Globalization.CultureInfo.InvariantCulture) : "", e.Problem);
        }
    }
}
