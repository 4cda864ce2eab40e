namespace Functional.Peft

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Checkpoint
open Functional.Models
open Functional.Runtime

// Prefix tuning (Li & Liang 2021) as Hugging Face PEFT's PREFIX_TUNING computes it without prefix
// projection (PaddleNLP's --prefix_tuning): one learned tensor prompt_embeddings (N, num_layers * 2 *
// token_dim) holds, per virtual token, every layer's key and value. PEFT's get_prompt reads it as
// (B, N, num_layers * 2, heads, head_dim), permutes it to (num_layers * 2, B, heads, N, head_dim) and
// splits it into per-layer (key, value) pairs: these are the past key/value cache of every layer, so
// each token attends to all N prefix positions, and the tokens' positions start at N (HF derives
// positions from the past length; the prefix keys get no rotary embedding). Here the prefix enters
// the model through its key/value-cache path (IIncrementalDecoder), the one generation uses; the
// model code knows nothing of prefixes.

/// The shape of a prefix, as PEFT's PrefixTuningConfig records it (adapter_config.json).
type PrefixTuningConfig =
    { /// num_virtual_tokens: N, the prefix positions every layer attends to before the tokens
      /// (PaddleNLP's --num_prefix_tokens).
      NumVirtualTokens: int
      /// num_layers: the model's transformer layers.
      NumLayers: int
      /// token_dim: the width of one layer's keys (or values) per position: n_embd for GPT-2,
      /// head_dim * num_key_value_heads for LLaMA (PEFT's rule for grouped-query attention).
      TokenDim: int
      /// num_attention_heads: the key/value heads the prefix is split into (n_head for GPT-2,
      /// num_key_value_heads for LLaMA).
      NumAttentionHeads: int }

    /// token_dim / num_attention_heads: the width of one head.
    member this.HeadDim = this.TokenDim / this.NumAttentionHeads

    /// The shape of prompt_embeddings: [N; num_layers * 2 * token_dim].
    member this.EmbeddingsShape = [| int64 this.NumVirtualTokens; int64 (this.NumLayers * 2 * this.TokenDim) |]

/// A causal LM behind a learned prefix: forward runs the base model's key/value-cache path with the
/// prefix as every layer's past, and ForwardCached prepends it to the caller's cache. The base model is
/// registered as "base_model" and the prefix as the parameter "prompt_embeddings", so train()/eval()
/// reach both; disposing this module disposes the base model too.
type PrefixTunedModel(base_model: torch.nn.Module<torch.Tensor, torch.Tensor>, config: PrefixTuningConfig, prompt_embeddings: Parameter) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("PrefixTunedModel")
    do
        if not (box base_model :? IIncrementalDecoder) then
            invalidArg "base_model" (sprintf "the %s module has no key/value cache path" (base_model.GetName()))
        this.register_parameter("prompt_embeddings", prompt_embeddings)
        this.register_module("base_model", base_model)
        this.RegisterComponents()

    /// The prefix's shape.
    member _.Config = config

    /// prompt_embeddings, (N, num_layers * 2 * token_dim).
    member _.Embeddings = prompt_embeddings

    /// The base model's key/value cache holding only the prefix, as PEFT's get_prompt splits it: per layer
    /// keys and values (B, heads, N, head_dim), expanded over the batch (gradients reach the prefix), in the
    /// base model's dtype.
    member _.PrefixCache(batchSize: int64) : KvCache =
        use scope = torch.NewDisposeScope()
        let n, layers = int64 config.NumVirtualTokens, config.NumLayers
        let heads, headDim = int64 config.NumAttentionHeads, int64 config.HeadDim
        let dtype = (Seq.head (base_model.parameters ())).dtype
        let embeddings = if prompt_embeddings.dtype = dtype then prompt_embeddings :> torch.Tensor else prompt_embeddings.to_type dtype
        let perLayer = embeddings.view(n, 2L * int64 layers, heads, headDim).permute(1L, 2L, 0L, 3L) // (L * 2, heads, N, hd)
        let part (i: int) = scope.MoveToOuter(perLayer[int64 i].unsqueeze(0L).expand(batchSize, heads, n, headDim)) // (B, heads, N, hd)
        { Keys = Array.init layers (fun layer -> part (2 * layer))
          Values = Array.init layers (fun layer -> part (2 * layer + 1)) }

    /// input_ids (B, T) int64 -> logits (B, T, vocab_size), every layer attending to the prefix first;
    /// the tokens' positions are N .. N + T - 1.
    override this.forward(inputIds) =
        use mask = torch.ones(inputIds.shape[0], inputIds.shape[1], dtype = torch.int64, device = inputIds.device) // (B, T)
        let logits, cache = (this :> IIncrementalDecoder).ForwardCached(inputIds, mask, None, false)
        (cache :> IDisposable).Dispose()
        logits

    interface IIncrementalDecoder with
        /// As the base model's ForwardCached, with the prefix in front: the attention mask covers the
        /// caller's positions only (N ones are prepended), a missing cache starts from the prefix, and the
        /// returned cache holds the N prefix positions before the caller's (pass it back as it is).
        member this.ForwardCached(inputIds, attentionMask, cache, lastPositionOnly) =
            let batchSize = inputIds.shape[0]
            use prefixMask = torch.ones(batchSize, int64 config.NumVirtualTokens, dtype = attentionMask.dtype, device = attentionMask.device)
            use mask = torch.cat([| prefixMask; attentionMask |], 1L) // (B, N + T_past + T_new)
            let decoder = box base_model :?> IIncrementalDecoder
            match cache with
            | Some past -> decoder.ForwardCached(inputIds, mask, Some past, lastPositionOnly)
            | None ->
                use prefix = this.PrefixCache batchSize
                decoder.ForwardCached(inputIds, mask, Some prefix, lastPositionOnly)

    interface IPrefixedModel with
        /// N: the tokens' positions start after the prefix.
        member _.PrefixLength = config.NumVirtualTokens

/// A prefix attached to a causal LM by PrefixTuning.create or PrefixTuning.load.
[<NoEquality; NoComparison>]
type PrefixAdapter =
    { /// The prefix's shape.
      Config: PrefixTuningConfig
      /// prompt_embeddings, (N, num_layers * 2 * token_dim) fp32: the only trained tensor.
      Embeddings: Parameter
      /// The model the prefix was attached to, unchanged.
      Base: CausalLm
      /// The base model behind the prefix (a PrefixTunedModel): its forward, key/value-cache path,
      /// generation and evaluation all see the prefix. Its Config, names and weight-decay set are Base's.
      Model: CausalLm }

/// Creating, training, saving and loading prefixes in PEFT's format.
[<RequireQualifiedAccess>]
module PrefixTuning =

    /// The file PEFT's save_pretrained writes the configuration to.
    [<Literal>]
    let ConfigFileName = PeftFolder.ConfigFileName

    /// The file PEFT's save_pretrained writes the prefix to.
    [<Literal>]
    let WeightsFileName = PeftFolder.WeightsFileName

    /// PEFT's key of the prefix in adapter_model.safetensors.
    [<Literal>]
    let EmbeddingsKey = "prompt_embeddings"

    /// PaddleNLP's default --num_prefix_tokens.
    [<Literal>]
    let DefaultNumVirtualTokens = 128

    /// The prefix shape PEFT's _prepare_prompt_learning_config derives for a model: GPT-2 token_dim n_embd
    /// over n_head heads; LLaMA token_dim head_dim * num_key_value_heads over num_key_value_heads heads.
    /// Raises InvalidInputException naming --num-prefix-tokens when numVirtualTokens < 1.
    let configFor (model: ModelConfig) (numVirtualTokens: int) : PrefixTuningConfig =
        if numVirtualTokens < 1 then
            InvalidInput.setting "num_prefix_tokens" (sprintf "expected at least 1 prefix token, found %d" numVirtualTokens)
        let shape = (ModelFamily.traits model).PrefixShape
        { NumVirtualTokens = numVirtualTokens
          NumLayers = shape.Layers
          TokenDim = shape.HeadDim * shape.KeyValueHeads
          NumAttentionHeads = shape.KeyValueHeads }

    let private attach (config: PrefixTuningConfig) (values: torch.Tensor) (lm: CausalLm) =
        let device = (Seq.head (lm.Module.parameters ())).device
        let embeddings = torch.nn.Parameter(values.``to`` device)
        embeddings.DetachFromDisposeScope() |> ignore
        let wrapped = new PrefixTunedModel(lm.Module, config, embeddings)
        { Config = config
          Embeddings = embeddings
          Base = lm
          Model = { lm with Module = wrapped } }

    /// Attaches a fresh prefix of numVirtualTokens positions to the model, drawn as PEFT's nn.Embedding
    /// default (normal(0, 1), fp32) from a generator seeded with seed. Raises InvalidInputException naming
    /// --num-prefix-tokens when numVirtualTokens < 1.
    let create (numVirtualTokens: int) (lm: CausalLm) (seed: int64) : PrefixAdapter =
        TorchRuntime.ensure ()
        let config = configFor lm.Config numVirtualTokens
        use generator = new torch.Generator(uint64 seed)
        use values = torch.empty(config.EmbeddingsShape, dtype = torch.float32).normal_(0.0, 1.0, generator)
        attach config values lm

    /// Stops every base-model parameter from requiring gradients: only the prefix trains.
    let freezeBase (lm: CausalLm) : unit =
        for p in lm.Module.parameters () do
            p.requires_grad <- false

    /// The trainable parameters under PEFT's name: ["prompt_embeddings", the prefix].
    let parameters (adapter: PrefixAdapter) : (string * Parameter) list = [ EmbeddingsKey, adapter.Embeddings ]

    /// adapter_config.json as PEFT's PrefixTuningConfig.to_dict writes it for a causal LM (save_pretrained
    /// sets inference_mode).
    let private configJson (config: PrefixTuningConfig) (baseModelNameOrPath: string option) =
        let json = JsonObject()
        json["auto_mapping"] <- null
        json["base_model_name_or_path"] <- (match baseModelNameOrPath with Some path -> JsonValue.Create path :> JsonNode | None -> null)
        json["encoder_hidden_size"] <- JsonValue.Create config.TokenDim
        json["inference_mode"] <- JsonValue.Create true
        json["num_attention_heads"] <- JsonValue.Create config.NumAttentionHeads
        json["num_layers"] <- JsonValue.Create config.NumLayers
        json["num_transformer_submodules"] <- JsonValue.Create 1
        json["num_virtual_tokens"] <- JsonValue.Create config.NumVirtualTokens
        json["peft_type"] <- JsonValue.Create "PREFIX_TUNING"
        json["prefix_projection"] <- JsonValue.Create false
        json["revision"] <- null
        json["task_type"] <- JsonValue.Create "CAUSAL_LM"
        json["token_dim"] <- JsonValue.Create config.TokenDim
        json.ToJsonString(JsonSerializerOptions(WriteIndented = true))

    /// Writes the prefix in PEFT's save_pretrained format to folder (created when missing; other files
    /// there are left alone): adapter_config.json (peft_type "PREFIX_TUNING", task_type "CAUSAL_LM",
    /// num_virtual_tokens, token_dim, num_layers, num_attention_heads, encoder_hidden_size = token_dim,
    /// num_transformer_submodules 1, prefix_projection false, inference_mode true,
    /// base_model_name_or_path when given) and adapter_model.safetensors ("prompt_embeddings", fp32). Each
    /// file is written under a temporary name and renamed into place.
    let save (folder: string) (baseModelNameOrPath: string option) (adapter: PrefixAdapter) : unit =
        TorchRuntime.ensure ()
        use values = adapter.Embeddings.detach().to_type(torch.float32).cpu()
        PeftFolder.write folder (configJson adapter.Config baseModelNameOrPath) [ EmbeddingsKey, values ]

    /// Reads a prefix configuration from folder's adapter_config.json (PEFT's format). Raises
    /// InvalidInputException naming the file and field for a missing file, malformed JSON, a missing or
    /// mistyped field, a PEFT type other than PREFIX_TUNING, a task type other than CAUSAL_LM, a
    /// non-positive size, a token_dim that num_attention_heads does not divide, or a PEFT feature this
    /// implementation lacks (prefix_projection, num_transformer_submodules other than 1).
    let loadConfig (folder: string) : PrefixTuningConfig =
        let path, root = PeftFolder.readConfig folder
        let field = JsonInput.field root
        let required = JsonInput.required path root
        let positive name =
            let value = required name
            let integer = if value.ValueKind = JsonValueKind.Number then value.TryGetInt32() else (false, 0)
            match integer with
            | true, n when n >= 1 -> n
            | _ -> InvalidInput.fail path name (sprintf "expected a positive integer, found %s" (value.GetRawText()))
        let text name (expected: string) =
            match field name with
            | Some value when value.ValueKind = JsonValueKind.String && value.GetString() = expected -> ()
            | Some value -> InvalidInput.fail path name (sprintf "expected \"%s\", found %s" expected (value.GetRawText()))
            | None -> InvalidInput.fail path name "the field is missing"
        text "peft_type" "PREFIX_TUNING"
        if (field "task_type").IsSome then text "task_type" "CAUSAL_LM"
        match field "prefix_projection" with
        | Some value when value.ValueKind <> JsonValueKind.False ->
            InvalidInput.fail path "prefix_projection"
                (sprintf "prefix projection (an MLP over the prefix) is not supported; expected false, found %s" (value.GetRawText()))
        | _ -> ()
        match field "num_transformer_submodules" with
        | Some value when not (value.ValueKind = JsonValueKind.Number && value.GetRawText() = "1") ->
            InvalidInput.fail path "num_transformer_submodules"
                (sprintf "expected 1 (a decoder-only model), found %s" (value.GetRawText()))
        | _ -> ()
        let config =
            { NumVirtualTokens = positive "num_virtual_tokens"
              NumLayers = positive "num_layers"
              TokenDim = positive "token_dim"
              NumAttentionHeads = positive "num_attention_heads" }
        if config.TokenDim % config.NumAttentionHeads <> 0 then
            InvalidInput.fail path "token_dim"
                (sprintf "expected a multiple of num_attention_heads (%d), found %d" config.NumAttentionHeads config.TokenDim)
        config

    /// Copies the prefix stored in a safetensors file (PEFT's adapter_model.safetensors) into the
    /// adapter's prompt_embeddings. Raises InvalidInputException naming the file and tensor for a missing
    /// file, a missing, extra, misshapen or non-floating tensor.
    let loadValues (path: string) (adapter: PrefixAdapter) : unit =
        TorchRuntime.ensure ()
        if not (File.Exists path) then InvalidInput.fail path "" "the adapter weights file does not exist"
        let stored = Safetensors.load path
        try
            for KeyValue(name, _) in stored do
                if name <> EmbeddingsKey then
                    InvalidInput.fail path name (sprintf "unexpected tensor: a prefix adapter holds only \"%s\"" EmbeddingsKey)
            let expected = adapter.Config.EmbeddingsShape
            match stored.TryFind EmbeddingsKey with
            | None -> InvalidInput.fail path EmbeddingsKey (sprintf "the tensor is missing (expected shape %A)" expected)
            | Some t when t.shape <> expected -> InvalidInput.fail path EmbeddingsKey (sprintf "expected shape %A, found %A" expected t.shape)
            | Some t when not (t.is_floating_point ()) ->
                InvalidInput.fail path EmbeddingsKey (sprintf "expected a floating-point tensor, found %A" t.dtype)
            | Some t ->
                use _ = torch.no_grad ()
                adapter.Embeddings.copy_ t |> ignore
        finally
            for KeyValue(_, t) in stored do t.Dispose()

    /// Attaches the prefix saved in folder (PEFT's adapter_config.json and adapter_model.safetensors) to
    /// the model. Raises InvalidInputException naming the file and field for a bad configuration or one
    /// made for another model shape (num_layers, token_dim, num_attention_heads must be those configFor
    /// derives), and naming the file and tensor for bad weights (see loadValues).
    let load (folder: string) (lm: CausalLm) : PrefixAdapter =
        TorchRuntime.ensure ()
        let config = loadConfig folder
        let path = Path.Combine(folder, ConfigFileName)
        let expected = configFor lm.Config config.NumVirtualTokens
        for name, saved, wanted in
            [ "num_layers", config.NumLayers, expected.NumLayers
              "token_dim", config.TokenDim, expected.TokenDim
              "num_attention_heads", config.NumAttentionHeads, expected.NumAttentionHeads ] do
            if saved <> wanted then
                InvalidInput.fail path name (sprintf "the prefix was made for a model with %s = %d; this model has %d" name saved wanted)
        use zeros = torch.zeros(config.EmbeddingsShape, dtype = torch.float32)
        let adapter = attach config zeros lm
        loadValues (Path.Combine(folder, WeightsFileName)) adapter
        adapter

    /// The prefix as a job's Adapter: Model is the base behind the prefix, the base stays frozen, the
    /// prefix trains at the run's learning rate. AttachToCompute puts a copy of the prefix, in the copy's
    /// dtype, in front of a compute copy of the base model.
    let asAdapter (adapter: PrefixAdapter) : Adapter =
        let trained = parameters adapter
        { Kind = "PREFIX_TUNING"
          Model = adapter.Model
          Parameters = trained
          FreezesBase = true
          LearningRate = None
          Signature = sprintf "num_virtual_tokens=%d" adapter.Config.NumVirtualTokens
          Save = fun folder baseModel -> save folder baseModel adapter
          Load = fun folder -> PeftFolder.loadValues folder trained
          AttachToCompute =
            fun copy ->
                let dtype = (Seq.head (copy.Module.parameters ())).dtype
                use values = adapter.Embeddings.detach().to_type dtype
                let copied = attach adapter.Config values copy
                { Model = copied.Model
                  Parameters = parameters copied
                  Release = fun () -> copied.Embeddings.Dispose() } }
