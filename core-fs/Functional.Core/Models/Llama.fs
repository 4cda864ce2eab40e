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
        let fp32 = x.dtype = torch.float32
        let x32 = if fp32 then x else x.to_type torch.float32
        let variance = x32.square().mean([| -1L |], keepdim = true) // (..., 1)
        let normed = x32 * (variance + eps).rsqrt_()
        if x.dtype = weight.dtype then scope.MoveToOuter(weight * (if fp32 then normed else normed.to_type x.dtype))
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

    /// sin with the first half of its last dimension negated, for applySigned: rotate_half's negation
    /// moved onto the table, where one forward computes it once for every layer. (..., hd) -> (..., hd).
    let signHalf (sin: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let half = sin.shape[sin.shape.Length - 1] / 2L
        scope.MoveToOuter(torch.cat([| sin.narrow(-1L, 0L, half).neg(); sin.narrow(-1L, half, half) |], -1L))

    /// apply with the sin table given as signHalf sin: x * cos + roll(x, hd / 2) * signedSin, where
    /// roll(x, hd / 2) = (x2, x1) and signedSin = (-sin1, sin2), so the products are rotate_half's
    /// (-x2 sin1 equals x2 (-sin1) exactly) in four tensor operations instead of seven.
    let applySigned (x: torch.Tensor) (cos: torch.Tensor) (signedSin: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let shape = x.shape
        let half = shape[shape.Length - 1] / 2L
        let rotate (x: torch.Tensor) (cos: torch.Tensor) (signedSin: torch.Tensor) =
            x * cos + x.roll(half, -1L) * signedSin
        let dtype = x.dtype
        if Autocast.isLowPrecision dtype then
            let x32 = x.to_type torch.float32
            scope.MoveToOuter((rotate x32 (cos.to_type torch.float32) (signedSin.to_type torch.float32)).to_type dtype)
        else
            let cos = if cos.dtype = dtype then cos else cos.to_type dtype
            let signedSin = if signedSin.dtype = dtype then signedSin else signedSin.to_type dtype
            scope.MoveToOuter(rotate x cos signedSin)

    /// x * cos + rotate_half(x) * sin: (B, nh, T, hd) with cos, sin (T, hd) or per row (B, 1, T, hd)
    /// -> (B, nh, T, hd) in x's dtype. HF casts the tables to the dtype of the hidden states, which under
    /// autocast is the fp32 residual stream: bf16/fp16 q and k are rotated in fp32 and rounded once to
    /// their dtype (what the attention kernel then receives), as here. The models compute signHalf once
    /// per forward and call applySigned.
    let apply (x: torch.Tensor) (cos: torch.Tensor) (sin: torch.Tensor) : torch.Tensor =
        use signedSin = signHalf sin
        applySigned x cos signedSin

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
    member private _.Heads(x: torch.Tensor, cos: torch.Tensor, signedSin: torch.Tensor) =
        let shape = x.shape
        let B, T = shape[0], shape[1]
        let nh, nkv, hd = int64 numHeads, int64 numKeyValueHeads, int64 headDim
        // (B, T, heads * hd) -> (B, heads, T, hd); with one position a view gives the same tensor.
        let split (t: torch.Tensor) (heads: int64) =
            if T = 1L then t.view(B, heads, 1L, hd) else t.view(B, T, heads, hd).transpose(1, 2)
        let q = split (q_proj.call x) nh // (B, nh, T, hd)
        let k = split (k_proj.call x) nkv // (B, nkv, T, hd)
        let v = split (v_proj.call x) nkv // (B, nkv, T, hd)
        Rotary.applySigned q cos signedSin, Rotary.applySigned k cos signedSin, v

    /// Attention of q (B, nh, T, hd) over k, v (B, nkv, T_total, hd), repeated to the query heads, with
    /// SDPA's mask and causal flag, merged and projected: (B, T, hidden).
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
            use y = torch.nn.functional.scaled_dot_product_attention(grouped, k, v, allowed, p, false)
            use merged = y.reshape(B, 1L, nh * hd)
            o_proj.call merged
        else
            let k = GroupedQuery.repeatKv k nRep // (B, nh, T_total, hd)
            let v = GroupedQuery.repeatKv v nRep // (B, nh, T_total, hd)
            let y =
                if causal && isNull allowed then CausalAttention.apply q k v p // (B, nh, T, hd)
                else torch.nn.functional.scaled_dot_product_attention(q, k, v, allowed, p, causal)
            let y = y.transpose(1, 2).reshape(B, T, nh * hd) // (B, T, nh * hd)
            o_proj.call y

    /// x (B, T, hidden) with the rotary cos and signed sin (Rotary.signHalf), (T, hd) -> (B, T, hidden).
    override this.forward(x, cos, signedSin) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads(x, cos, signedSin)
        scope.MoveToOuter(this.Attend(q, k, v, null, true))

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, hidden), rotary
    /// cos and signed sin (B or 1, 1, T_new, hd), the allowed keys (B, 1, T_new, T_total) bool or null for
    /// all of them, the layer's cached keys
    /// and values (B, nkv, T_past, hd) -> (B, T_new, hidden) and the keys and values of all T_total
    /// positions (B, nkv, T_total, hd).
    member this.ForwardCached
        (x: torch.Tensor, cos: torch.Tensor, signedSin: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads(x, cos, signedSin)
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

    /// x (B, T, hidden) with the rotary cos and signed sin (Rotary.signHalf), (T, hd) -> (B, T, hidden).
    override _.forward(x, cos, signedSin) =
        use scope = torch.NewDisposeScope()
        let h = x + self_attn.forward(input_layernorm.forward x, cos, signedSin)
        scope.MoveToOuter(h + mlp.forward (post_attention_layernorm.forward h))

    /// The layer over T_new new positions with the layer's cache (see LlamaAttention.ForwardCached):
    /// (B, T_new, hidden) -> (B, T_new, hidden) and the keys and values of all positions.
    member _.ForwardCached
        (x: torch.Tensor, cos: torch.Tensor, signedSin: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let a, k, v = self_attn.ForwardCached(input_layernorm.forward x, cos, signedSin, allowed, past)
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
        let signedSin = Rotary.signHalf sin // once for every layer (Rotary.applySigned)
        let x = Autocast.residual (embed_tokens.forward inputIds) // (B, T, hidden), fp32 for a bf16/fp16 model
        let runLayer (x: torch.Tensor) (layer: LlamaDecoderLayer) =
            if gradientCheckpointing && this.training then
                ActivationCheckpointing.run layer (fun inputs -> layer.forward(inputs[0], inputs[1], inputs[2])) [| x; cos; signedSin |]
            else layer.forward(x, cos, signedSin)
        let x = layers |> Seq.fold runLayer x
        scope.MoveToOuter(norm.forward x)

    /// Incremental forward (see IIncrementalDecoder): input_ids (B, T_new), attention_mask
    /// (B, T_past + T_new), the cache -> hidden states (B, T_new, hidden) and the cache of all positions.
    /// Rotary positions follow the attention mask, so left-padded rows start at position 0.
    member _.ForwardCached(inputIds: torch.Tensor, attentionMask: torch.Tensor, cache: KvCache option) =
        IncrementalDecoding.checkInputs inputIds attentionMask cache layers.Count
        use scope = torch.NewDisposeScope()
        let newLength = inputIds.shape[1]
        let noPadding = IncrementalDecoding.hasNoPadding attentionMask
        let positions = IncrementalDecoding.positions attentionMask newLength noPadding // (B or 1, T_new)
        let cos, sin = rotary_emb.CosSinPerRow positions // (B or 1, 1, T_new, hd) each
        let signedSin = Rotary.signHalf sin // once for every layer (Rotary.applySigned)
        let allowed = IncrementalDecoding.allowedKeys attentionMask newLength noPadding // (B, 1, T_new, T_total) or null
        let x = Autocast.residual (embed_tokens.forward inputIds) // (B, T_new, hidden), fp32 for a bf16/fp16 model
        let keysValues, x =
            layers
            |> Seq.indexed
            |> Seq.mapFold
                (fun x (i, layer: LlamaDecoderLayer) ->
                    let past = cache |> Option.map (fun c -> c.Keys[i], c.Values[i])
                    let y, k, v = layer.ForwardCached(x, cos, signedSin, allowed, past)
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
