namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules
open System.Text.Json
open Functional.Runtime

// LLaMA as HF transformers' LlamaForCausalLM (modeling_llama.py), built bottom-up, with its variants
// as data (LlamaVariant): Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorms) and Mistral (a sliding
// window) share its layout and names.
// As in Gpt2.fs, each module registers its parts explicitly under HF's names and in HF's order, so
// named_parameters() yields the state-dict names ("model.layers.0.self_attn.q_proj.weight", ...) in
// HF's order; the fields holding the parts carry the same names.

/// LLaMA's causal self-attention with grouped-query heads: q, k, v and o projections (nn.Linear,
/// biased as the variant says), rotary embeddings on q and k, k and v repeated to the query heads.
/// qkNorm: Qwen3's q_norm and k_norm, RMSNorms over each head's head_dim applied to the queries and keys
/// before the rotary embedding (None for the other variants). attentionDropout applies to the attention
/// probabilities in training only; bias is NoBias, or Mistral's sliding Window. region: where a
/// tensor-parallel rank's part begins and ends (its q/k/v hold its heads, o its columns; numHeads and
/// numKeyValueHeads are then the rank's); ParallelRegion.whole otherwise.
type LlamaAttention
    (q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, qkNorm: (RmsNorm * RmsNorm) option,
     numHeads: int, numKeyValueHeads: int, headDim: int, attentionDropout: float, bias: AttentionBias, region: ParallelRegion) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("LlamaAttention")
    do
        this.register_module("q_proj", q_proj)
        this.register_module("k_proj", k_proj)
        this.register_module("v_proj", v_proj)
        this.register_module("o_proj", o_proj)
        match qkNorm with
        | Some(q_norm, k_norm) ->
            this.register_module("q_norm", q_norm)
            this.register_module("k_norm", k_norm)
        | None -> ()
        this.RegisterComponents()

    /// q (B, nh, T, hd), k and v (B, nkv, T, hd) of x (B, T, hidden), q/k-normed (Qwen3) and rotary
    /// applied to q and k.
    member private _.Heads(x: torch.Tensor, cos: torch.Tensor, signedSin: torch.Tensor) =
        let shape = x.shape
        let B, T = shape[0], shape[1]
        let nh, nkv, hd = int64 numHeads, int64 numKeyValueHeads, int64 headDim
        let x = region.Enter x
        // (B, T, heads * hd) -> (B, heads, T, hd); with one position a view gives the same tensor.
        let split (t: torch.Tensor) (heads: int64) =
            if T = 1L then t.view(B, heads, 1L, hd) else t.view(B, T, heads, hd).transpose(1, 2)
        let q = split (q_proj.call x) nh // (B, nh, T, hd)
        let k = split (k_proj.call x) nkv // (B, nkv, T, hd)
        let v = split (v_proj.call x) nkv // (B, nkv, T, hd)
        // The norms reduce over head_dim only, so they apply to the split heads in any layout.
        let q, k =
            match qkNorm with
            | Some(q_norm, k_norm) -> q_norm.forward q, k_norm.forward k
            | None -> q, k
        Rotary.applySigned q cos signedSin, Rotary.applySigned k cos signedSin, v

    /// Attention of q (B, nh, T, hd) over k, v (B, nkv, T_total, hd), repeated to the query heads, with
    /// the cached forward's mask (IncrementalDecoding.keyMask) or, when causal, the training forward's
    /// causal mask and bias; merged and projected: (B, T, hidden).
    member private this.Attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, causal: bool) =
        let shape = q.shape
        let B, nh, T, hd = shape[0], shape[1], shape[2], shape[3]
        let nkv = int64 numKeyValueHeads
        let nRep = nh / nkv
        let p = if this.training then attentionDropout else 0.0
        // SDPA's default scale 1/sqrt(hd) is HF's head_dim ** -0.5.
        if T = 1L && not causal then
            // One new position (a decoding step): the nRep query heads of a key/value head are nRep
            // queries over the same keys, so SDPA runs on the keys and values as cached, without
            // repeating them; a (B, 1, 1, T_total) mask broadcasts over them. (B, nkv, nRep, hd) is the
            // heads' order of (B, 1, nh * hd).
            use grouped = q.reshape(B, nkv, nRep, hd)
            use y = CausalAttention.applyCached grouped k v allowed p
            use merged = y.reshape(B, 1L, nh * hd)
            region.Leave(o_proj.call merged)
        else
            let k = GroupedQuery.repeatKv k nRep // (B, nh, T_total, hd)
            let v = GroupedQuery.repeatKv v nRep // (B, nh, T_total, hd)
            let y =
                if causal then CausalAttention.apply q k v { Dropout = p; Bias = bias } // (B, nh, T, hd)
                else CausalAttention.applyCached q k v allowed p
            let y = y.transpose(1, 2).reshape(B, T, nh * hd) // (B, T, nh * hd)
            region.Leave(o_proj.call y)

    /// x (B, T, hidden) with the rotary cos and signed sin (Rotary.signHalf), (T, hd) -> (B, T, hidden).
    override this.forward(x, cos, signedSin) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads(x, cos, signedSin)
        scope.MoveToOuter(this.Attend(q, k, v, null, true))

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, hidden), rotary
    /// cos and signed sin (B or 1, 1, T_new, hd), the mask (IncrementalDecoding.keyMask) or null for all
    /// keys, the layer's cached keys
    /// and values (B, nkv, T_past, hd) -> (B, T_new, hidden) and the keys and values of all T_total
    /// positions (B, nkv, T_total, hd).
    member this.ForwardCached
        (x: torch.Tensor, cos: torch.Tensor, signedSin: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads(x, cos, signedSin)
        let k = IncrementalDecoding.append (Option.map fst past) k // (B, nkv, T_total, hd)
        let v = IncrementalDecoding.append (Option.map snd past) v // (B, nkv, T_total, hd)
        scope.MoveToOuter(this.Attend(q, k, v, allowed, false)), scope.MoveToOuter k, scope.MoveToOuter v

/// LLaMA's gated MLP (SwiGLU with silu): down_proj(act(gate_proj(x)) * up_proj(x)). region: where a
/// tensor-parallel rank's part (its block of the inner features) begins and ends; ParallelRegion.whole
/// otherwise.
type LlamaMlp(gate_proj: Linear, up_proj: Linear, down_proj: Linear, activation: Activation, region: ParallelRegion) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("LlamaMLP")
    do
        this.register_module("gate_proj", gate_proj)
        this.register_module("up_proj", up_proj)
        this.register_module("down_proj", down_proj)
        this.RegisterComponents()

    /// (B, T, hidden) -> (B, T, hidden).
    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let x = region.Enter x
        let gate = Activation.apply activation (gate_proj.call x) // (B, T, intermediate)
        scope.MoveToOuter(region.Leave(down_proj.call (gate * up_proj.call x)))

/// A pre-norm decoder layer: x + self_attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)).
type LlamaDecoderLayer(self_attn: LlamaAttention, mlp: LlamaMlp, input_layernorm: RmsNorm, post_attention_layernorm: RmsNorm) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("LlamaDecoderLayer")
    do
        this.register_module("self_attn", self_attn)
        this.register_module("mlp", mlp)
        this.register_module("input_layernorm", input_layernorm)
        this.register_module("post_attention_layernorm", post_attention_layernorm)
        this.RegisterComponents()

    /// x (B, T, hidden) with the rotary cos and signed sin (Rotary.signHalf), (T, hd) -> (B, T, hidden).
    override _.forward(x, cos, signedSin) =
        use scope = torch.NewDisposeScope()
        let h = x + self_attn.forward(input_layernorm.forward x, cos, signedSin)
        scope.MoveToOuter(h + mlp.forward (post_attention_layernorm.forward h))

    interface IDecoderLayer with
        /// See forward; extras are the rotary cos and signed sin.
        member this.Forward(x, extras) = this.forward(x, extras[0], extras[1])

        /// The layer over T_new new positions with the layer's cache (see LlamaAttention.ForwardCached).
        member _.ForwardCached(x, extras, mask, past) =
            use scope = torch.NewDisposeScope()
            let a, k, v = self_attn.ForwardCached(input_layernorm.forward x, extras[0], extras[1], mask, past)
            let h = x + a
            scope.MoveToOuter(h + mlp.forward (post_attention_layernorm.forward h)), scope.MoveToOuter k, scope.MoveToOuter v

/// LlamaModel: token embedding, the decoder layers, a final RMSNorm; rotary embeddings shared by all
/// layers. Returns the last hidden states (the layer loop is DecoderBackbone's). bias: the attention
/// bias of every layer (Mistral's sliding window), for the cached forward's mask. lookup: how token ids
/// become embeddings through embed_tokens (its forward; a tensor-parallel rank's block of the vocabulary
/// looks up its own rows and sums over the ranks, see Distributed.VocabParallel).
type LlamaModel
    (embed_tokens: Embedding, layers: ModuleList<LlamaDecoderLayer>, norm: RmsNorm, rotary_emb: LlamaRotaryEmbedding, bias: AttentionBias,
     lookup: Embedding -> torch.Tensor -> torch.Tensor) as this =
    inherit DecoderBackbone("LlamaModel")
    let stack = [| for layer in layers -> (layer :> torch.nn.Module), (layer :> IDecoderLayer) |]
    do
        this.register_module("embed_tokens", embed_tokens)
        this.register_module("layers", layers)
        this.register_module("norm", norm)
        this.register_module("rotary_emb", rotary_emb)
        this.RegisterComponents()

    /// The token embedding, (vocab_size, hidden); the tied LM head reads it.
    member _.EmbedTokens = embed_tokens

    /// See DecoderBackbone.TokenEmbedding.
    override _.TokenEmbedding = embed_tokens

    /// The decoder layers layers.0, layers.1, ...
    override _.Layers = stack

    /// See DecoderBackbone.Bias.
    override _.Bias = bias

    /// The token embedding (fp32 for a bf16/fp16 model) and the rotary cos and signed sin
    /// (Rotary.signHalf, once for every layer): (T, hd) each for (T) positions, (B or 1, 1, T, hd) for
    /// per-row (B or 1, T) positions.
    override _.Embed(inputIds, positions) =
        use scope = torch.NewDisposeScope()
        let cos, sin = if positions.dim () = 1L then rotary_emb.CosSin positions else rotary_emb.CosSinPerRow positions
        let signedSin = Rotary.signHalf sin
        let x = Autocast.residual (lookup embed_tokens inputIds) // (B, T, hidden)
        scope.MoveToOuter x, [| scope.MoveToOuter cos; scope.MoveToOuter signedSin |]

    /// norm.
    override _.FinalNorm x = norm.forward x

    /// The rotary angles of Embed, without the token embedding.
    override _.LayerExtras(_, positions) =
        use scope = torch.NewDisposeScope()
        let cos, sin = if positions.dim () = 1L then rotary_emb.CosSin positions else rotary_emb.CosSinPerRow positions
        let signedSin = Rotary.signHalf sin
        [| scope.MoveToOuter cos; scope.MoveToOuter signedSin |]

/// Reading, writing and building LLaMA models and their variants (Qwen2, Qwen3, Mistral).
[<RequireQualifiedAccess>]
module Llama =
    /// rope_theta, from the top level (transformers 4.x) or from "rope_parameters" (5.x). Only the
    /// default rotary embedding is built: any rope_scaling, or another rope_type, is refused.
    let private readRopeTheta (r: ConfigJson.Reader) =
        match r.TryGet "rope_scaling" with
        | Some v -> r.Fail "rope_scaling" (sprintf "RoPE scaling is not supported yet; expected null, found %s" (ConfigJson.describe v))
        | None -> ()
        match r.TryGet "rope_parameters" with
        | Some p when p.ValueKind = JsonValueKind.Object ->
            let ropeType =
                match p.TryGetProperty "rope_type" with
                | true, t when t.ValueKind = JsonValueKind.String -> t.GetString()
                | true, t when t.ValueKind <> JsonValueKind.Null -> r.Fail "rope_parameters.rope_type" (sprintf "expected a string, found %s" (ConfigJson.describe t))
                | _ -> "default"
            if ropeType <> "default" then
                r.Fail "rope_parameters.rope_type" (sprintf "RoPE type \"%s\" is not supported yet; expected \"default\"" ropeType)
            match p.TryGetProperty "rope_theta" with
            | true, t when t.ValueKind = JsonValueKind.Number -> t.GetDouble()
            | true, t when t.ValueKind <> JsonValueKind.Null -> r.Fail "rope_parameters.rope_theta" (sprintf "expected a number, found %s" (ConfigJson.describe t))
            | _ -> r.Float "rope_theta" 10000.0
        | Some p -> r.Fail "rope_parameters" (sprintf "expected an object, found %s" (ConfigJson.describe p))
        | None -> r.Float "rope_theta" 10000.0

    /// The variant a LLaMA-shaped model_type names ("llama", "qwen2", "qwen3", "mistral"); None for
    /// another. Mistral's window is "sliding_window": absent means HF's default 4096, null means none.
    /// Qwen2's and Qwen3's use_sliding_window (sliding attention on the layers from max_window_layers on)
    /// is refused; off (HF's default), their sliding_window, max_window_layers and layer_types change
    /// nothing.
    let tryVariant (modelType: string) (r: ConfigJson.Reader) : LlamaVariant option =
        match modelType with
        | "llama" -> Some LlamaVariant.llama
        | "qwen2" ->
            r.Unsupported "use_sliding_window"
            Some LlamaVariant.qwen2
        | "qwen3" ->
            r.Unsupported "use_sliding_window"
            Some LlamaVariant.qwen3
        | "mistral" ->
            let window =
                if not (r.Has "sliding_window") then Some 4096
                else
                    match r.TryGet "sliding_window" with
                    | Some _ -> Some(r.Int "sliding_window" None |> r.Positive "sliding_window")
                    | None -> None
            Some(LlamaVariant.mistral window)
        | _ -> None

    /// Reads LlamaConfig's fields from a config.json object of the variant (see tryVariant). Qwen2 and
    /// Mistral have no attention_bias or mlp_bias (their biases are the variant's), Qwen3 no mlp_bias;
    /// the defaults are HF's per variant: context 32768 (qwen2, qwen3) and 131072 (mistral), key/value
    /// heads 32 (qwen2, qwen3) and 8 (mistral) when the field is absent, head_dim 128 (qwen3). Raises
    /// InvalidInputException naming the field at fault.
    let read (variant: LlamaVariant) (r: ConfigJson.Reader) : LlamaConfig =
        let isLlama = variant.ModelType = "llama"
        let defaultContext =
            match variant.ModelType with
            | "qwen2"
            | "qwen3" -> 32768
            | "mistral" -> 4096 * 32
            | _ -> 2048
        let vocabSize = r.Int "vocab_size" None |> r.Positive "vocab_size"
        let hidden = r.Int "hidden_size" None |> r.Positive "hidden_size"
        let heads = r.Int "num_attention_heads" None |> r.Positive "num_attention_heads"
        // HF's config classes: an absent field takes the class default, an explicit null means "as many
        // as the query heads".
        let defaultKvHeads =
            match variant.ModelType with
            | "qwen2"
            | "qwen3" when not (r.Has "num_key_value_heads") -> 32
            | "mistral" when not (r.Has "num_key_value_heads") -> 8
            | _ -> heads
        let kvHeads = r.Int "num_key_value_heads" (Some defaultKvHeads) |> r.Positive "num_key_value_heads"
        if heads % kvHeads <> 0 then
            r.Fail "num_key_value_heads"
                (sprintf "num_attention_heads (%d) must be divisible by num_key_value_heads (%d%s)" heads kvHeads
                     (if r.Has "num_key_value_heads" then "" else sprintf ", the %s default when the field is absent" variant.ModelType))
        let headDim =
            match r.TryGet "head_dim" with
            | Some _ -> r.Int "head_dim" None |> r.Positive "head_dim"
            | None when variant.ModelType = "qwen3" -> 128
            | None when hidden % heads = 0 -> hidden / heads
            | None ->
                r.Fail "num_attention_heads"
                    (sprintf "hidden_size (%d) must be divisible by num_attention_heads (%d) when head_dim is absent" hidden heads)
        if headDim % 2 <> 0 then
            r.Fail "head_dim" (sprintf "rotary embeddings need an even head dimension, found %d" headDim)
        let padTokenId = r.TokenId "pad_token_id" vocabSize
        { VocabSize = vocabSize
          HiddenSize = hidden
          IntermediateSize = r.Int "intermediate_size" None |> r.Positive "intermediate_size"
          NumHiddenLayers = r.Int "num_hidden_layers" None |> r.Positive "num_hidden_layers"
          NumAttentionHeads = heads
          NumKeyValueHeads = kvHeads
          HeadDim = headDim
          HiddenAct = r.Activation "hidden_act" Activation.Silu
          MaxPositionEmbeddings = r.Int "max_position_embeddings" (Some defaultContext) |> r.Positive "max_position_embeddings"
          RmsNormEps = r.Float "rms_norm_eps" 1e-6 |> r.PositiveFloat "rms_norm_eps"
          RopeTheta = readRopeTheta r |> r.PositiveFloat "rope_theta"
          InitializerRange = r.Float "initializer_range" 0.02 |> r.NonNegativeFloat "initializer_range"
          TieWordEmbeddings = r.Bool "tie_word_embeddings" false
          AttentionBias = (isLlama || variant.ModelType = "qwen3") && r.Bool "attention_bias" false
          MlpBias = isLlama && r.Bool "mlp_bias" false
          AttentionDropout = r.Float "attention_dropout" 0.0 |> r.Probability "attention_dropout"
          PadTokenId = padTokenId
          Variant = variant }


    /// Writes LlamaConfig's fields into a config.json object (after "architectures", before
    /// torch_dtype), with the variant's own model_type; parse reads them back to an equal value.
    let write (w: Utf8JsonWriter) (c: LlamaConfig) =
        w.WriteString("model_type", c.Variant.ModelType)
        w.WriteNumber("vocab_size", c.VocabSize)
        w.WriteNumber("hidden_size", c.HiddenSize)
        w.WriteNumber("intermediate_size", c.IntermediateSize)
        w.WriteNumber("num_hidden_layers", c.NumHiddenLayers)
        w.WriteNumber("num_attention_heads", c.NumAttentionHeads)
        w.WriteNumber("num_key_value_heads", c.NumKeyValueHeads)
        w.WriteNumber("head_dim", c.HeadDim)
        w.WriteString("hidden_act", Activation.hfName c.HiddenAct)
        w.WriteNumber("max_position_embeddings", c.MaxPositionEmbeddings)
        w.WriteNumber("rms_norm_eps", c.RmsNormEps)
        w.WriteNumber("rope_theta", c.RopeTheta)
        w.WriteNull "rope_scaling"
        w.WriteNumber("initializer_range", c.InitializerRange)
        w.WriteBoolean("tie_word_embeddings", c.TieWordEmbeddings)
        match c.Variant.ModelType with
        | "llama" ->
            w.WriteBoolean("attention_bias", c.AttentionBias)
            w.WriteBoolean("mlp_bias", c.MlpBias)
        | "qwen3" ->
            w.WriteBoolean("attention_bias", c.AttentionBias)
            w.WriteBoolean("use_sliding_window", false)
        | "mistral" ->
            match c.Variant.SlidingWindow with
            | Some window -> w.WriteNumber("sliding_window", window)
            | None -> w.WriteNull "sliding_window"
        | _ -> w.WriteBoolean("use_sliding_window", false)
        w.WriteNumber("attention_dropout", c.AttentionDropout)
        match c.PadTokenId with
        | Some id -> w.WriteNumber("pad_token_id", id)
        | None -> w.WriteNull "pad_token_id"

    /// HF's LlamaPreTrainedModel._init_weights, drawn from the generator: Linear and Embedding weights
    /// from normal(0, initializer_range), biases zero, the padding row (pad_token_id) zero, RMSNorm
    /// weights one.
    let initialize (config: LlamaConfig) (generator: torch.Generator) (model: CausalLmHead) =
        let std = config.InitializerRange
        use _ = torch.no_grad ()
        for _, m in model.named_modules () do
            match m with
            | :? Linear as l -> HfInit.linear std generator l
            | :? Embedding as e ->
                e.weight.normal_(0.0, std, generator) |> ignore
                config.PadTokenId |> Option.iter (fun pad -> e.weight[int64 pad].zero_() |> ignore)
            | :? RmsNorm as n -> torch.nn.init.ones_ n.Weight |> ignore
            | _ -> ()

    /// Builds the variant's causal LM (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
    /// MistralForCausalLM: a CausalLmHead over LlamaModel, registered as "model") for the config,
    /// initialized as HF does from a generator seeded with seed. q/k/v are biased when attention_bias or
    /// the variant's QkvBias, o_proj when attention_bias or OutputBias; Qwen3's QkNorm gives every layer
    /// q_norm and k_norm (head_dim wide); Mistral's window becomes every layer's AttentionBias.Window.
    let rec build (config: LlamaConfig) (seed: int64) : CausalLmHead =
        buildIn ParallelRegion.whole (fun embedding ids -> embedding.forward ids) config seed

    /// build with every layer's attention and MLP in region and the token embedding looked up by lookup
    /// (a tensor-parallel rank's part: the config then holds the rank's heads, key/value heads,
    /// intermediate size and block of the vocabulary).
    and buildIn (region: ParallelRegion) (lookup: Embedding -> torch.Tensor -> torch.Tensor) (config: LlamaConfig) (seed: int64) : CausalLmHead =
        TorchRuntime.ensure ()
        let hidden = int64 config.HiddenSize
        let intermediate = int64 config.IntermediateSize
        let qWidth = int64 (config.NumAttentionHeads * config.HeadDim)
        let kvWidth = int64 (config.NumKeyValueHeads * config.HeadDim)
        let linear inputs outputs hasBias = torch.nn.Linear(inputs, outputs, hasBias = hasBias)
        let qkvBias = config.AttentionBias || config.Variant.QkvBias
        let outputBias = config.AttentionBias || config.Variant.OutputBias
        let bias =
            match config.Variant.SlidingWindow with
            | Some window -> Window window
            | None -> NoBias
        let layer () =
            let attention =
                new LlamaAttention(
                    linear hidden qWidth qkvBias,
                    linear hidden kvWidth qkvBias,
                    linear hidden kvWidth qkvBias,
                    linear qWidth hidden outputBias,
                    (if config.Variant.QkNorm then
                         Some(new RmsNorm(int64 config.HeadDim, config.RmsNormEps), new RmsNorm(int64 config.HeadDim, config.RmsNormEps))
                     else None),
                    config.NumAttentionHeads, config.NumKeyValueHeads, config.HeadDim, config.AttentionDropout, bias, region)
            let mlp =
                new LlamaMlp(
                    linear hidden intermediate config.MlpBias,
                    linear hidden intermediate config.MlpBias,
                    linear intermediate hidden config.MlpBias,
                    config.HiddenAct,
                    region)
            new LlamaDecoderLayer(attention, mlp, new RmsNorm(hidden, config.RmsNormEps), new RmsNorm(hidden, config.RmsNormEps))
        let embedding =
            match config.PadTokenId with
            | Some pad -> torch.nn.Embedding(int64 config.VocabSize, hidden, padding_idx = Nullable(int64 pad))
            | None -> torch.nn.Embedding(int64 config.VocabSize, hidden)
        let model =
            new LlamaModel(
                embedding,
                torch.nn.ModuleList<LlamaDecoderLayer>([| for _ in 1 .. config.NumHiddenLayers -> layer () |]),
                new RmsNorm(hidden, config.RmsNormEps),
                new LlamaRotaryEmbedding(config.HeadDim, config.RopeTheta),
                bias,
                lookup)
        let lmHead =
            if config.TieWordEmbeddings then None
            else Some(linear hidden (int64 config.VocabSize) false)
        let lm = new CausalLmHead(config.Variant.Architecture, "model", model, lmHead)
        use generator = new torch.Generator(uint64 seed)
        initialize config generator lm
        lm
