namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules
open Functional.Runtime

// LLaMA as HF transformers' LlamaForCausalLM (modeling_llama.py), built bottom-up.
// As in Gpt2.fs, each module registers its parts explicitly under HF's names and in HF's order, so
// named_parameters() yields the state-dict names ("model.layers.0.self_attn.q_proj.weight", ...) in
// HF's order; the fields holding the parts carry the same names.

/// LLaMA's RMSNorm as HF computes it: in fp32, x * rsqrt(mean(x^2) + eps), cast back to the input
/// dtype, then scaled by weight. On the fp32 residual stream of a bf16/fp16 model (Autocast), where x's
/// dtype differs from the weight's, the scaling runs in fp32 too (as autocast's fp32 weight would) and
/// the result is rounded once to the weight's dtype, the input dtype of the next projection.
type RmsNorm(dim: int64, eps: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("LlamaRMSNorm")
    let weight = torch.nn.Parameter(torch.ones(dim).DetachFromDisposeScope()) // (dim)
    do
        this.register_parameter("weight", weight)
        this.RegisterComponents()

    /// The scale, shaped (dim).
    member _.Weight = weight

    /// (..., dim) -> (..., dim).
    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let x32 = x.to_type torch.float32
        let variance = x32.square().mean([| -1L |], keepdim = true) // (..., 1)
        let normed = x32 * torch.rsqrt(variance + eps)
        if x.dtype = weight.dtype then scope.MoveToOuter(weight * normed.to_type x.dtype)
        else scope.MoveToOuter((normed * weight.to_type torch.float32).to_type weight.dtype)

/// Rotary position embeddings in HF's rotate_half convention: a head vector's first and second
/// halves are the two coordinates of each rotated pair.
[<RequireQualifiedAccess>]
module Rotary =

    /// HF's inv_freq: 1 / theta^(arange(0, headDim, 2) / headDim), in fp32 as HF computes it. (headDim / 2)
    let inverseFrequencies (headDim: int) (theta: float) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let exponents = torch.arange(0L, int64 headDim, 2L, dtype = torch.int64).to_type(torch.float32) / float headDim
        let powers = torch.pow(torch.tensor(theta, dtype = torch.float32), exponents)
        scope.MoveToOuter(powers.reciprocal())

    /// cos and sin of the angles position * inv_freq, each half repeated: (T) positions -> (T, headDim) twice.
    let cosSin (inverseFrequencies: torch.Tensor) (positions: torch.Tensor) : torch.Tensor * torch.Tensor =
        use scope = torch.NewDisposeScope()
        let freqs = torch.outer(positions.to_type torch.float32, inverseFrequencies) // (T, hd/2)
        let angles = torch.cat([| freqs; freqs |], -1L) // (T, hd)
        scope.MoveToOuter(angles.cos()), scope.MoveToOuter(angles.sin())

    /// HF's rotate_half: (x1, x2) -> (-x2, x1) over the halves of the last dimension.
    let rotateHalf (x: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let half = x.shape[x.shape.Length - 1] / 2L
        let x1 = x.narrow(-1L, 0L, half)
        let x2 = x.narrow(-1L, half, half)
        scope.MoveToOuter(torch.cat([| x2.neg(); x1 |], -1L))

    /// x * cos + rotate_half(x) * sin: (B, nh, T, hd) with cos, sin (T, hd) or per row (B, 1, T, hd)
    /// -> (B, nh, T, hd) in x's dtype. HF casts the tables to the dtype of the hidden states, which under
    /// autocast is the fp32 residual stream: bf16/fp16 q and k are rotated in fp32 and rounded once to
    /// their dtype (what the attention kernel then receives), as here.
    let apply (x: torch.Tensor) (cos: torch.Tensor) (sin: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        if Autocast.isLowPrecision x.dtype then
            let x32 = x.to_type torch.float32
            let cos = cos.to_type torch.float32
            let sin = sin.to_type torch.float32
            scope.MoveToOuter((x32 * cos + rotateHalf x32 * sin).to_type x.dtype)
        else
            let cos = if cos.dtype = x.dtype then cos else cos.to_type x.dtype
            let sin = if sin.dtype = x.dtype then sin else sin.to_type x.dtype
            scope.MoveToOuter(x * cos + rotateHalf x * sin)

/// HF's LlamaRotaryEmbedding (default rope type): holds inv_freq as a non-persistent buffer, so it is
/// neither a parameter nor part of the state dict. (TorchSharp 0.107 leaves non-persistent buffers out
/// of named_buffers() and Module.to(), so CosSin brings inv_freq to the positions' device itself.)
type LlamaRotaryEmbedding(headDim: int, theta: float) as this =
    inherit torch.nn.Module("LlamaRotaryEmbedding")
    let inv_freq = (Rotary.inverseFrequencies headDim theta).DetachFromDisposeScope() // (hd/2)
    do
        this.register_buffer("inv_freq", inv_freq, persistent = false)
        this.RegisterComponents()

    /// inv_freq, (headDim / 2) fp32.
    member _.InverseFrequencies = inv_freq

    /// The rotary cos and sin for (T) int64 positions, each (T, headDim) fp32 on the positions' device.
    member _.CosSin(positions: torch.Tensor) =
        use inverseFrequencies = inv_freq.``to`` positions.device
        Rotary.cosSin inverseFrequencies positions

    /// The rotary cos and sin for per-row (B, T) int64 positions, each (B, 1, T, headDim) fp32, so they
    /// broadcast over the heads.
    member this.CosSinPerRow(positions: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let B, T = positions.shape[0], positions.shape[1]
        let cos, sin = this.CosSin(positions.reshape(-1L)) // (B * T, hd) each
        let perRow (t: torch.Tensor) = scope.MoveToOuter(t.view(B, 1L, T, -1L)) // (B, 1, T, hd)
        perRow cos, perRow sin

/// Repeats each key/value head nRep times, as HF's repeat_kv: (B, nkv, T, hd) -> (B, nkv * nRep, T, hd).
[<RequireQualifiedAccess>]
module GroupedQuery =

    /// Key/value head j serves query heads j * nRep .. j * nRep + nRep - 1.
    let repeatKv (x: torch.Tensor) (nRep: int64) : torch.Tensor =
        if nRep = 1L then x.alias ()
        else
            let B, nkv, T, hd = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
            use expanded = x.unsqueeze(2).expand(B, nkv, nRep, T, hd) // (B, nkv, nRep, T, hd)
            expanded.reshape(B, nkv * nRep, T, hd)

/// LLaMA's causal self-attention with grouped-query heads: q, k, v and o projections (nn.Linear,
/// bias when attention_bias), rotary embeddings on q and k, k and v repeated to the query heads.
/// attentionDropout applies to the attention probabilities in training only.
type LlamaAttention
    (q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear,
     numHeads: int, numKeyValueHeads: int, headDim: int, attentionDropout: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("LlamaAttention")
    do
        this.register_module("q_proj", q_proj)
        this.register_module("k_proj", k_proj)
        this.register_module("v_proj", v_proj)
        this.register_module("o_proj", o_proj)
        this.RegisterComponents()

    /// q (B, nh, T, hd), k and v (B, nkv, T, hd) of x (B, T, hidden), rotary applied to q and k.
    member private _.Heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) =
        let B, T = x.shape[0], x.shape[1]
        let nh, nkv, hd = int64 numHeads, int64 numKeyValueHeads, int64 headDim
        let q = q_proj.call(x).view(B, T, nh, hd).transpose(1, 2) // (B, nh, T, hd)
        let k = k_proj.call(x).view(B, T, nkv, hd).transpose(1, 2) // (B, nkv, T, hd)
        let v = v_proj.call(x).view(B, T, nkv, hd).transpose(1, 2) // (B, nkv, T, hd)
        Rotary.apply q cos sin, Rotary.apply k cos sin, v

    /// Attention of q (B, nh, T, hd) over k, v (B, nkv, T_total, hd), repeated to the query heads, with
    /// SDPA's mask and causal flag, merged and projected: (B, T, hidden).
    member private this.Attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, causal: bool) =
        let B, nh, T, hd = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
        let nRep = nh / int64 numKeyValueHeads
        let k = GroupedQuery.repeatKv k nRep // (B, nh, T_total, hd)
        let v = GroupedQuery.repeatKv v nRep // (B, nh, T_total, hd)
        let p = if this.training then attentionDropout else 0.0
        // SDPA's default scale 1/sqrt(hd) is HF's head_dim ** -0.5.
        let y =
            if causal && isNull allowed then CausalAttention.apply q k v p // (B, nh, T, hd)
            else torch.nn.functional.scaled_dot_product_attention(q, k, v, allowed, p, causal)
        let y = y.transpose(1, 2).reshape(B, T, nh * hd) // (B, T, nh * hd)
        o_proj.call y

    /// x (B, T, hidden) with rotary cos, sin (T, hd) -> (B, T, hidden).
    override this.forward(x, cos, sin) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads(x, cos, sin)
        scope.MoveToOuter(this.Attend(q, k, v, null, true))

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, hidden), rotary
    /// cos, sin (B, 1, T_new, hd), the allowed keys (B, 1, T_new, T_total) bool, the layer's cached keys
    /// and values (B, nkv, T_past, hd) -> (B, T_new, hidden) and the keys and values of all T_total
    /// positions (B, nkv, T_total, hd).
    member this.ForwardCached
        (x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads(x, cos, sin)
        let k = IncrementalDecoding.append (Option.map fst past) k // (B, nkv, T_total, hd)
        let v = IncrementalDecoding.append (Option.map snd past) v // (B, nkv, T_total, hd)
        scope.MoveToOuter(this.Attend(q, k, v, allowed, false)), scope.MoveToOuter k, scope.MoveToOuter v

/// LLaMA's gated MLP (SwiGLU with silu): down_proj(act(gate_proj(x)) * up_proj(x)).
type LlamaMlp(gate_proj: Linear, up_proj: Linear, down_proj: Linear, activation: Activation) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("LlamaMLP")
    do
        this.register_module("gate_proj", gate_proj)
        this.register_module("up_proj", up_proj)
        this.register_module("down_proj", down_proj)
        this.RegisterComponents()

    /// (B, T, hidden) -> (B, T, hidden).
    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let gate = Activation.apply activation (gate_proj.call x) // (B, T, intermediate)
        scope.MoveToOuter(down_proj.call (gate * up_proj.call x))

/// A pre-norm decoder layer: x + self_attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)).
type LlamaDecoderLayer(self_attn: LlamaAttention, mlp: LlamaMlp, input_layernorm: RmsNorm, post_attention_layernorm: RmsNorm) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("LlamaDecoderLayer")
    do
        this.register_module("self_attn", self_attn)
        this.register_module("mlp", mlp)
        this.register_module("input_layernorm", input_layernorm)
        this.register_module("post_attention_layernorm", post_attention_layernorm)
        this.RegisterComponents()

    /// x (B, T, hidden) with rotary cos, sin (T, hd) -> (B, T, hidden).
    override _.forward(x, cos, sin) =
        use scope = torch.NewDisposeScope()
        let h = x + self_attn.forward(input_layernorm.forward x, cos, sin)
        scope.MoveToOuter(h + mlp.forward (post_attention_layernorm.forward h))

    /// The layer over T_new new positions with the layer's cache (see LlamaAttention.ForwardCached):
    /// (B, T_new, hidden) -> (B, T_new, hidden) and the keys and values of all positions.
    member _.ForwardCached
        (x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let a, k, v = self_attn.ForwardCached(input_layernorm.forward x, cos, sin, allowed, past)
        let h = x + a
        scope.MoveToOuter(h + mlp.forward (post_attention_layernorm.forward h)), scope.MoveToOuter k, scope.MoveToOuter v

/// LlamaModel: token embedding, the decoder layers, a final RMSNorm; rotary embeddings shared by all
/// layers. Returns the last hidden states.
type LlamaModel(embed_tokens: Embedding, layers: ModuleList<LlamaDecoderLayer>, norm: RmsNorm, rotary_emb: LlamaRotaryEmbedding) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("LlamaModel")
    let mutable gradientCheckpointing = false
    do
        this.register_module("embed_tokens", embed_tokens)
        this.register_module("layers", layers)
        this.register_module("norm", norm)
        this.register_module("rotary_emb", rotary_emb)
        this.RegisterComponents()

    /// The token embedding, (vocab_size, hidden); the tied LM head reads it.
    member _.EmbedTokens = embed_tokens

    /// input_ids (B, T) int64 -> hidden states (B, T, hidden).
    override this.forward(inputIds) =
        use scope = torch.NewDisposeScope()
        let T = inputIds.shape[1]
        let positions = torch.arange(T, dtype = torch.int64, device = inputIds.device) // (T)
        let cos, sin = rotary_emb.CosSin positions // (T, hd) each
        let x = Autocast.residual (embed_tokens.forward inputIds) // (B, T, hidden), fp32 for a bf16/fp16 model
        let runLayer (x: torch.Tensor) (layer: LlamaDecoderLayer) =
            if gradientCheckpointing && this.training then
                ActivationCheckpointing.run layer (fun inputs -> layer.forward(inputs[0], inputs[1], inputs[2])) [| x; cos; sin |]
            else layer.forward(x, cos, sin)
        let x = layers |> Seq.fold runLayer x
        scope.MoveToOuter(norm.forward x)

    /// Incremental forward (see IIncrementalDecoder): input_ids (B, T_new), attention_mask
    /// (B, T_past + T_new), the cache -> hidden states (B, T_new, hidden) and the cache of all positions.
    /// Rotary positions follow the attention mask, so left-padded rows start at position 0.
    member _.ForwardCached(inputIds: torch.Tensor, attentionMask: torch.Tensor, cache: KvCache option) =
        IncrementalDecoding.checkInputs inputIds attentionMask cache layers.Count
        use scope = torch.NewDisposeScope()
        let newLength = inputIds.shape[1]
        let positions = IncrementalDecoding.positionIds attentionMask newLength // (B, T_new)
        let cos, sin = rotary_emb.CosSinPerRow positions // (B, 1, T_new, hd) each
        let allowed = IncrementalDecoding.attentionMask attentionMask newLength // (B, 1, T_new, T_total)
        let x = Autocast.residual (embed_tokens.forward inputIds) // (B, T_new, hidden), fp32 for a bf16/fp16 model
        let keysValues, x =
            layers
            |> Seq.indexed
            |> Seq.mapFold
                (fun x (i, layer: LlamaDecoderLayer) ->
                    let past = cache |> Option.map (fun c -> c.Keys[i], c.Values[i])
                    let y, k, v = layer.ForwardCached(x, cos, sin, allowed, past)
                    (k, v), y)
                x
        let keysValues = Array.ofSeq keysValues
        let hidden = scope.MoveToOuter(norm.forward x)
        hidden,
        { Keys = keysValues |> Array.map (fst >> scope.MoveToOuter)
          Values = keysValues |> Array.map (snd >> scope.MoveToOuter) }

    interface IGradientCheckpointing with
        /// Whether training-mode forwards recompute each layer in backward (see ActivationCheckpointing.run).
        member _.GradientCheckpointing
            with get () = gradientCheckpointing
            and set enabled = gradientCheckpointing <- enabled

/// LlamaForCausalLM: the model and an LM head. An untied head (HF's default for LLaMA) is
/// lm_head.weight, (vocab_size, hidden); a tied one computes logits = h @ embed_tokens.weight^T.
type LlamaForCausalLm(model: LlamaModel, lmHead: Linear option) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("LlamaForCausalLM")
    do
        this.register_module("model", model)
        lmHead |> Option.iter (fun head -> this.register_module("lm_head", head))
        this.RegisterComponents()

    /// The LlamaModel below the head.
    member _.Model = model

    /// Logits of hidden states: (B, T, hidden) -> (B, T, vocab_size).
    member private _.Logits(hidden: torch.Tensor) =
        match lmHead with
        | Some head -> head.call hidden
        | None -> torch.nn.functional.linear(hidden, model.EmbedTokens.weight)

    /// input_ids (B, T) int64 -> logits (B, T, vocab_size).
    override this.forward(inputIds) =
        use hidden = model.forward inputIds // (B, T, hidden)
        this.Logits hidden

    interface IIncrementalDecoder with
        /// See IIncrementalDecoder.ForwardCached.
        member this.ForwardCached(inputIds, attentionMask, cache, lastPositionOnly) =
            let hidden, newCache = model.ForwardCached(inputIds, attentionMask, cache) // (B, T_new, hidden)
            use hidden = hidden
            let T = hidden.shape[1]
            use kept = if lastPositionOnly then hidden.narrow(1L, T - 1L, 1L) else hidden.alias ()
            this.Logits kept, newCache

/// Building LLaMA models.
[<RequireQualifiedAccess>]
module Llama =

    /// HF's LlamaPreTrainedModel._init_weights, drawn from the generator: Linear and Embedding weights
    /// from normal(0, initializer_range), biases zero, the padding row (pad_token_id) zero, RMSNorm
    /// weights one.
    let initialize (config: LlamaConfig) (generator: torch.Generator) (model: LlamaForCausalLm) =
        let std = config.InitializerRange
        use _ = torch.no_grad ()
        for _, m in model.named_modules () do
            match m with
            | :? Linear as l ->
                l.weight.normal_(0.0, std, generator) |> ignore
                if not (isNull l.bias) then torch.nn.init.zeros_ l.bias |> ignore
            | :? Embedding as e ->
                e.weight.normal_(0.0, std, generator) |> ignore
                config.PadTokenId |> Option.iter (fun pad -> e.weight[int64 pad].zero_() |> ignore)
            | :? RmsNorm as n -> torch.nn.init.ones_ n.Weight |> ignore
            | _ -> ()

    /// Builds LlamaForCausalLM for the config, initialized as HF does from a generator seeded with seed.
    let build (config: LlamaConfig) (seed: int64) : LlamaForCausalLm =
        TorchRuntime.ensure ()
        let hidden = int64 config.HiddenSize
        let intermediate = int64 config.IntermediateSize
        let qWidth = int64 (config.NumAttentionHeads * config.HeadDim)
        let kvWidth = int64 (config.NumKeyValueHeads * config.HeadDim)
        let linear inputs outputs hasBias = torch.nn.Linear(inputs, outputs, hasBias = hasBias)
        let layer () =
            let attention =
                new LlamaAttention(
                    linear hidden qWidth config.AttentionBias,
                    linear hidden kvWidth config.AttentionBias,
                    linear hidden kvWidth config.AttentionBias,
                    linear qWidth hidden config.AttentionBias,
                    config.NumAttentionHeads, config.NumKeyValueHeads, config.HeadDim, config.AttentionDropout)
            let mlp =
                new LlamaMlp(
                    linear hidden intermediate config.MlpBias,
                    linear hidden intermediate config.MlpBias,
                    linear intermediate hidden config.MlpBias,
                    config.HiddenAct)
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
                new LlamaRotaryEmbedding(config.HeadDim, config.RopeTheta))
        let lmHead =
            if config.TieWordEmbeddings then None
            else Some(linear hidden (int64 config.VocabSize) false)
        let lm = new LlamaForCausalLm(model, lmHead)
        use generator = new torch.Generator(uint64 seed)
        initialize config generator lm
        lm
