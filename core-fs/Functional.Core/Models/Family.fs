namespace Functional.Models

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open TorchSharp.Modules
open Functional

// The one place that knows the families: each case of ModelConfig is matched here (traits, build, the
// config.json writer's architecture) and in the family's own file. Consumers ask ModelFamily.traits.

/// The keys and values a prefix (prefix tuning) holds per layer: PEFT's num_layers, key/value heads and
/// head width.
type PrefixShape =
    { /// The layers that attend to the prefix.
      Layers: int
      /// Key/value heads per layer (n_head for GPT-2, num_key_value_heads for LLaMA).
      KeyValueHeads: int
      /// The width of one head.
      HeadDim: int }

/// What the rest of the library needs to know of a model's family.
[<NoEquality; NoComparison>]
type FamilyTraits =
    { /// How the family reads in messages and reports: "GPT-2", "LLaMA", "Qwen2", "Mistral".
      DisplayName: string
      /// config.json's "model_type".
      ModelType: string
      /// The HF class config.json's "architectures" names.
      Architecture: string
      /// The prefix of the base model's names inside the LM-head model ("transformer.", "model.");
      /// checkpoints of the bare base model lack it.
      BasePrefix: string
      /// Suffixes of buffers HF checkpoints may hold that this model does not (GPT-2's causal-mask
      /// buffers, LLaMA's rotary inv_freq); loaders skip them.
      IgnoredBufferSuffixes: string list
      /// State-dict keys that alias another parameter and that save_pretrained leaves out
      /// (["lm_head.weight"] for a tied head).
      TiedKeys: string list
      /// The width of the logits.
      VocabSize: int
      /// The most positions a sequence may take: n_positions (learned positions end there) or
      /// max_position_embeddings (the context a rotary model was trained for; a hard limit here too).
      PositionLimit: int
      /// The config.json field PositionLimit comes from, for messages.
      PositionField: string
      /// Whether positions are a learned table (GPT-2), so no position past PositionLimit exists.
      LearnedPositions: bool
      /// The shape of a prefix for prefix tuning.
      PrefixShape: PrefixShape
      /// PEFT's default LoRA target modules (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
      DefaultLoraTargets: string list
      /// Parameters used only by a table lookup (never in a matmul): GPT-2's wpe, and the token
      /// embedding when the head is untied.
      LookupOnly: string list
      /// The number of transformer layers.
      Depth: int
      /// The width of the residual stream.
      Width: int }

/// The family facts of a model as plain .NET types, for C# callers.
type FamilyDescription =
    { /// See FamilyTraits.DisplayName.
      DisplayName: string
      /// config.json's "model_type".
      ModelType: string
      /// The HF architecture class.
      Architecture: string
      /// The number of transformer layers.
      Layers: int
      /// The width of the residual stream.
      Width: int
      /// The width of the logits.
      VocabSize: int
      /// See FamilyTraits.PositionLimit.
      PositionLimit: int
      /// See FamilyTraits.PositionField.
      PositionField: string
      /// PEFT's default LoRA target modules.
      DefaultLoraTargets: string[] }

/// The family registry: traits and builders of every ModelConfig case.
[<RequireQualifiedAccess>]
module ModelFamily =

    let private tied (tie: bool) = if tie then [ "lm_head.weight" ] else []

    /// The traits of the config's family.
    let traits (config: ModelConfig) : FamilyTraits =
        match config with
        | Gpt2 c ->
            { DisplayName = "GPT-2"
              ModelType = "gpt2"
              Architecture = "GPT2LMHeadModel"
              BasePrefix = "transformer."
              IgnoredBufferSuffixes = [ ".attn.bias"; ".attn.masked_bias" ]
              TiedKeys = tied c.TieWordEmbeddings
              VocabSize = c.VocabSize
              PositionLimit = c.NPositions
              PositionField = "n_positions"
              LearnedPositions = true
              PrefixShape = { Layers = c.NLayer; KeyValueHeads = c.NHead; HeadDim = c.NEmbd / c.NHead }
              DefaultLoraTargets = [ "c_attn" ]
              LookupOnly = "transformer.wpe.weight" :: (if c.TieWordEmbeddings then [] else [ "transformer.wte.weight" ])
              Depth = c.NLayer
              Width = c.NEmbd }
        | Llama c ->
            let v = c.Variant
            { DisplayName =
                match v.ModelType with
                | "qwen2" -> "Qwen2"
                | "qwen3" -> "Qwen3"
                | "mistral" -> "Mistral"
                | _ -> "LLaMA"
              ModelType = v.ModelType
              Architecture = v.Architecture
              BasePrefix = "model."
              IgnoredBufferSuffixes = [ ".rotary_emb.inv_freq" ]
              TiedKeys = tied c.TieWordEmbeddings
              VocabSize = c.VocabSize
              PositionLimit = c.MaxPositionEmbeddings
              PositionField = "max_position_embeddings"
              LearnedPositions = false
              PrefixShape = { Layers = c.NumHiddenLayers; KeyValueHeads = c.NumKeyValueHeads; HeadDim = c.HeadDim }
              DefaultLoraTargets = [ "q_proj"; "v_proj" ]
              LookupOnly = if c.TieWordEmbeddings then [] else [ "model.embed_tokens.weight" ]
              Depth = c.NumHiddenLayers
              Width = c.HiddenSize }
        | Bloom c ->
            { DisplayName = "BLOOM"
              ModelType = "bloom"
              Architecture = "BloomForCausalLM"
              BasePrefix = "transformer."
              IgnoredBufferSuffixes = []
              TiedKeys = tied c.TieWordEmbeddings
              VocabSize = c.VocabSize
              PositionLimit = c.SeqLength
              PositionField = "seq_length"
              LearnedPositions = false
              PrefixShape = { Layers = c.NLayer; KeyValueHeads = c.NHead; HeadDim = c.HiddenSize / c.NHead }
              DefaultLoraTargets = [ "query_key_value" ]
              LookupOnly = if c.TieWordEmbeddings then [] else [ "transformer.word_embeddings.weight" ]
              Depth = c.NLayer
              Width = c.HiddenSize }
        | Opt c ->
            { DisplayName = "OPT"
              ModelType = "opt"
              Architecture = Opt.Architecture
              BasePrefix = "model."
              IgnoredBufferSuffixes = []
              TiedKeys = tied c.TieWordEmbeddings
              VocabSize = c.VocabSize
              PositionLimit = c.MaxPositionEmbeddings
              PositionField = "max_position_embeddings"
              LearnedPositions = true
              PrefixShape = { Layers = c.NumHiddenLayers; KeyValueHeads = c.NumAttentionHeads; HeadDim = c.HiddenSize / c.NumAttentionHeads }
              DefaultLoraTargets = [ "q_proj"; "v_proj" ]
              LookupOnly =
                "model.decoder.embed_positions.weight" :: (if c.TieWordEmbeddings then [] else [ "model.decoder.embed_tokens.weight" ])
              Depth = c.NumHiddenLayers
              Width = c.HiddenSize }

    /// Builds the config's causal LM with HF's initialization drawn from a generator seeded with seed.
    let build (config: ModelConfig) (seed: int64) : CausalLmHead =
        match config with
        | Gpt2 c -> Gpt2.build c seed
        | Llama c -> Llama.build c seed
        | Bloom c -> Bloom.build c seed
        | Opt c -> Opt.build c seed

    /// The config with another depth and width: heads as given (and as many key/value heads), GPT-2's
    /// n_inner 4 * width, LLaMA's intermediate size 8/3 of the width rounded up to a multiple of 8 and
    /// head_dim width / heads, OPT's ffn_dim 4 * width and word_embed_proj_dim the width (half of it when
    /// the model projects its embeddings); BLOOM's MLP is always 4 * width; everything else kept.
    let resize (layers: int) (width: int) (heads: int) (config: ModelConfig) : ModelConfig =
        match config with
        | Gpt2 c -> Gpt2 { c with NLayer = layers; NEmbd = width; NHead = heads; NInner = 4 * width }
        | Llama c ->
            Llama
                { c with
                    NumHiddenLayers = layers
                    HiddenSize = width
                    NumAttentionHeads = heads
                    NumKeyValueHeads = heads
                    HeadDim = width / heads
                    IntermediateSize = (width * 8 / 3 + 7) / 8 * 8 }
        | Bloom c -> Bloom { c with NLayer = layers; HiddenSize = width; NHead = heads }
        | Opt c ->
            Opt
                { c with
                    NumHiddenLayers = layers
                    HiddenSize = width
                    NumAttentionHeads = heads
                    FfnDim = 4 * width
                    WordEmbedProjDim = if c.WordEmbedProjDim = c.HiddenSize then width else width / 2 }

    /// The config with every dropout probability of the family at 0 (DeepSpeed-Chat's --disable_dropout,
    /// applied to the config the model is built from, so a saved config.json holds 0 too): GPT-2's
    /// resid_pdrop, embd_pdrop and attn_pdrop; LLaMA's (and its variants') attention_dropout; BLOOM's
    /// hidden_dropout and attention_dropout; OPT's dropout, attention_dropout and activation_dropout.
    let withoutDropout (config: ModelConfig) : ModelConfig =
        match config with
        | Gpt2 c -> Gpt2 { c with ResidPdrop = 0.0; EmbdPdrop = 0.0; AttnPdrop = 0.0 }
        | Llama c -> Llama { c with AttentionDropout = 0.0 }
        | Bloom c -> Bloom { c with HiddenDropout = 0.0; AttentionDropout = 0.0 }
        | Opt c -> Opt { c with Dropout = 0.0; AttentionDropout = 0.0; ActivationDropout = 0.0 }

    /// The config with another vocab_size (HF's resize_token_embeddings updates config.vocab_size so);
    /// everything else kept.
    let withVocabSize (vocabSize: int) (config: ModelConfig) : ModelConfig =
        match config with
        | Gpt2 c -> Gpt2 { c with VocabSize = vocabSize }
        | Llama c -> Llama { c with VocabSize = vocabSize }
        | Bloom c -> Bloom { c with VocabSize = vocabSize }
        | Opt c -> Opt { c with VocabSize = vocabSize }

    /// The family facts as plain .NET types (see FamilyDescription), for C#.
    let describe (config: ModelConfig) : FamilyDescription =
        let t = traits config
        { DisplayName = t.DisplayName
          ModelType = t.ModelType
          Architecture = t.Architecture
          Layers = t.Depth
          Width = t.Width
          VocabSize = t.VocabSize
          PositionLimit = t.PositionLimit
          PositionField = t.PositionField
          DefaultLoraTargets = Array.ofList t.DefaultLoraTargets }

/// Reading and writing HF config.json files; family facts through ModelFamily.traits.
[<RequireQualifiedAccess>]
[<CompilationRepresentation(CompilationRepresentationFlags.ModuleSuffix)>]
module ModelConfig =

    /// Parses the text of an HF config.json; origin names the source in error messages.
    /// Fields we do not use are ignored. Raises InvalidInputException naming the field at fault
    /// (or the line, for malformed JSON).
    let parse (origin: string) (json: string) : ModelConfig =
        let root =
            match JsonInput.tryParseWith true (ReadOnlyMemory(Text.Encoding.UTF8.GetBytes json)) with
            | Ok root -> root
            | Error e -> InvalidInput.fail origin (if e.Line > 0L then sprintf "line %d" e.Line else "") (sprintf "invalid JSON: %s" e.Message)
        if root.ValueKind <> JsonValueKind.Object then
            InvalidInput.fail origin "" (sprintf "expected a JSON object, found %s" (ConfigJson.describe root))
        let r = ConfigJson.Reader(origin, root)
        let expected = "expected \"gpt2\", \"llama\", \"qwen2\", \"qwen3\", \"mistral\", \"opt\" or \"bloom\""
        match r.String "model_type" with
        | Some "gpt2" -> Gpt2(Gpt2.read r)
        | Some "bloom" -> Bloom(Bloom.read r)
        | Some "opt" -> Opt(Opt.read r)
        | Some other ->
            match Llama.tryVariant other r with
            | Some variant -> Llama(Llama.read variant r)
            | None -> r.Fail "model_type" (sprintf "unsupported model type \"%s\"; %s" other expected)
        | None -> r.Fail "model_type" (sprintf "required field is missing; %s" expected)

    /// Reads and parses an HF config.json file.
    let load (path: string) : ModelConfig =
        if Directory.Exists path then InvalidInput.fail path "" "is a folder; expected the model's config.json file"
        let text =
            try
                File.ReadAllText path
            with
            | :? FileNotFoundException
            | :? DirectoryNotFoundException -> InvalidInput.fail path "" "file not found"
            | :? IOException
            | :? UnauthorizedAccessException as e -> InvalidInput.fail path "" (sprintf "cannot read the file: %s" e.Message)
        parse path text

    /// Writes a config.json that HF transformers loads as the same architecture (GPT2LMHeadModel,
    /// LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, OPTForCausalLM,
    /// BloomForCausalLM; torch_dtype float32); parse reads it back to an equal value.
    let toJson (config: ModelConfig) : string =
        use stream = new MemoryStream()
        do
            use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
            w.WriteStartObject()
            w.WriteStartArray "architectures"
            w.WriteStringValue (ModelFamily.traits config).Architecture
            w.WriteEndArray()
            match config with
            | Gpt2 c -> Gpt2.write w c
            | Llama c -> Llama.write w c
            | Bloom c -> Bloom.write w c
            | Opt c -> Opt.write w c
            w.WriteString("torch_dtype", "float32")
            w.WriteEndObject()
        Encoding.UTF8.GetString(stream.ToArray()) + "\n"

    /// The vocabulary size: the width of the logits.
    let vocabSize (config: ModelConfig) = (ModelFamily.traits config).VocabSize

    /// The longest sequence the model was built for (see FamilyTraits.PositionLimit).
    let contextLength (config: ModelConfig) = (ModelFamily.traits config).PositionLimit

    /// The config.json field that holds contextLength ("n_positions", "max_position_embeddings"), for messages.
    let contextField (config: ModelConfig) = (ModelFamily.traits config).PositionField
