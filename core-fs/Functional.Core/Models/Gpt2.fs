namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules
open Functional.Runtime

// GPT-2 as HF transformers' GPT2LMHeadModel (modeling_gpt2.py), built bottom-up.
// Each module registers its parts explicitly, under HF's names and in HF's order, so that
// named_parameters() yields exactly the state-dict names save_pretrained writes
// ("transformer.h.0.attn.c_attn.weight", ...) in HF's order. The fields holding the parts carry the
// same snake_case names: TorchSharp's RegisterComponents and Module.to() match fields to registered
// components by name (F# does not keep constructor-parameter order in fields, hence the explicit order).

// ---------------------------------------------------------------- incremental decoding
// The key/value cache and the masks of incremental decoding are shared by both families; they sit at the
// top of the first model file compiled.

/// Keys and values of the positions a causal LM has already seen, one pair per layer, each shaped
/// (B, kv_heads, T_past, head_dim): the state of incremental decoding. It owns its tensors: Dispose
/// frees them.
[<NoEquality; NoComparison>]
type KvCache =
    { /// Per layer: the keys (B, kv_heads, T_past, head_dim), with LLaMA's rotary embedding applied.
      Keys: torch.Tensor[]
      /// Per layer: the values (B, kv_heads, T_past, head_dim).
      Values: torch.Tensor[] }

    /// T_past: the number of positions (padding included) the cache holds.
    member this.Length = this.Keys[0].shape[2]

    /// Every tensor of the cache, keys first.
    member this.Tensors = Array.append this.Keys this.Values

    interface IDisposable with
        /// Frees every tensor of the cache.
        member this.Dispose() =
            for t in this.Tensors do
                t.Dispose()

/// A causal LM that decodes incrementally with a key/value cache.
type IIncrementalDecoder =
    /// input_ids (B, T_new) int64; attention_mask (B, T_past + T_new) of 0/1 (0 marks left padding),
    /// covering the cached positions and the new ones; the cache of the T_past earlier positions (None
    /// when there are none) -> logits (B, T_new, vocab_size), or (B, 1, vocab_size) for the last position
    /// only when lastPositionOnly, and the cache of all T_past + T_new positions. Returns fresh tensors
    /// and leaves the input cache untouched.
    abstract ForwardCached:
        inputIds: torch.Tensor * attentionMask: torch.Tensor * cache: KvCache option * lastPositionOnly: bool ->
            torch.Tensor * KvCache

/// Position ids, attention masks and cache growth for incremental decoding, as HF transformers'
/// generate computes them.
[<RequireQualifiedAccess>]
module IncrementalDecoding =

    /// Checks that the attention mask covers the cached and the new positions of every row, and that the
    /// cache has one entry per layer; raises ArgumentException otherwise.
    let checkInputs (inputIds: torch.Tensor) (attentionMask: torch.Tensor) (cache: KvCache option) (layers: int) =
        if inputIds.dim () <> 2L || attentionMask.dim () <> 2L then
            invalidArg "inputIds" (sprintf "expected input ids (B, T_new) and an attention mask (B, T_past + T_new), found %A and %A" inputIds.shape attentionMask.shape)
        let pastLength =
            match cache with
            | Some c ->
                if c.Keys.Length <> layers || c.Values.Length <> layers then
                    invalidArg "cache" (sprintf "the cache holds %d layers; the model has %d" c.Keys.Length layers)
                if c.Keys[0].shape[0] <> inputIds.shape[0] then
                    invalidArg "cache" (sprintf "the cache holds %d rows; the input has %d" c.Keys[0].shape[0] inputIds.shape[0])
                c.Length
            | None -> 0L
        if attentionMask.shape[0] <> inputIds.shape[0] || attentionMask.shape[1] <> pastLength + inputIds.shape[1] then
            invalidArg "attentionMask"
                (sprintf "expected an attention mask of shape [%d; %d] (B, T_past + T_new), found %A"
                     inputIds.shape[0] (pastLength + inputIds.shape[1]) attentionMask.shape)

    /// HF's position ids: cumsum(attention_mask) - 1, clamped at 0 where the row has not started, so a
    /// left-padded row starts at position 0 at its first real token. (B, T_past + T_new) -> (B, T_new) int64.
    let positionIds (attentionMask: torch.Tensor) (newLength: int64) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let total = attentionMask.shape[1]
        let positions = attentionMask.to_type(torch.int64).cumsum(1L) - 1L // (B, T_total)
        scope.MoveToOuter(positions.clamp_min(0L).narrow(1L, total - newLength, newLength))

    /// Which keys each new query attends to: the real (mask 1) keys at or before its own position, and
    /// its own key always, so a padding query attends to itself instead of to nothing (softmax over no
    /// key is NaN); real queries never see padding. (B, T_past + T_new) -> (B, 1, T_new, T_past + T_new) bool.
    let attentionMask (attentionMask: torch.Tensor) (newLength: int64) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let total = attentionMask.shape[1]
        let device = attentionMask.device
        let keyPositions = torch.arange(total, dtype = torch.int64, device = device).unsqueeze 0 // (1, T_total)
        let queryPositions = torch.arange(total - newLength, total, dtype = torch.int64, device = device).unsqueeze 1 // (T_new, 1)
        let causal = keyPositions.le(queryPositions).unsqueeze 0 // (1, T_new, T_total)
        let own = keyPositions.eq(queryPositions).unsqueeze 0 // (1, T_new, T_total)
        let real = attentionMask.to_type(torch.ScalarType.Bool).unsqueeze 1 // (B, 1, T_total)
        let allowed = torch.logical_or(torch.logical_and(causal, real), own) // (B, T_new, T_total)
        scope.MoveToOuter(allowed.unsqueeze 1)

    /// Whether no row has left padding: every entry of the attention mask (B, T_total) is 1.
    let hasNoPadding (attentionMask: torch.Tensor) : bool =
        use all = attentionMask.all ()
        all.item<bool> ()

    /// The new positions' ids: positionIds, or, when no row has padding (noPadding), the positions
    /// T_past .. T_total - 1 shared by every row as (1, T_new), which broadcasts over the rows.
    let positions (attentionMask: torch.Tensor) (newLength: int64) (noPadding: bool) : torch.Tensor =
        if noPadding then
            let total = attentionMask.shape[1]
            use row = torch.arange(total - newLength, total, dtype = torch.int64, device = attentionMask.device)
            row.unsqueeze 0
        else positionIds attentionMask newLength

    /// The mask SDPA takes: attentionMask's allowed keys, or null when a single new position has no
    /// padding to avoid (noPadding) and so attends to every key, cached and its own.
    let allowedKeys (mask: torch.Tensor) (newLength: int64) (noPadding: bool) : torch.Tensor =
        if noPadding && newLength = 1L then null else attentionMask mask newLength

    /// The layer's keys or values after the new positions: the cached ones followed by the new ones along
    /// the time axis, (B, heads, T_past + T_new, head_dim); a compact copy of the new ones without a cache.
    let append (past: torch.Tensor option) (fresh: torch.Tensor) : torch.Tensor =
        match past with
        | Some p -> torch.cat([| p; fresh |], 2L)
        | None -> fresh.contiguous ()

/// What PyTorch's autocast keeps in fp32 when a model's weights are bf16 or fp16 (the compute copy of
/// mixed-precision training, Training/MixedPrecision.fs). Under autocast the weights stay fp32 and only
/// matmul-like ops (linear, matmul, SDPA) run in the low precision: the embeddings come out fp32, so the
/// residual stream stays fp32 (a low-precision sublayer output added to it promotes to fp32), and
/// LayerNorm/RMSNorm run in fp32 with fp32 weights; their output is rounded only where the next
/// projection casts its input. With weights in the activations' dtype (a plain fp32 model) each function
/// here is the plain computation.
[<RequireQualifiedAccess>]
module Autocast =

    /// Whether dtype is a low compute precision (bfloat16 or float16).
    let isLowPrecision (dtype: torch.ScalarType) : bool = dtype = torch.bfloat16 || dtype = torch.float16

    /// The residual stream of embeddings x: x upcast to fp32 when it is bf16/fp16, else x itself (a fresh
    /// handle to the same tensor).
    let residual (x: torch.Tensor) : torch.Tensor =
        if isLowPrecision x.dtype then x.to_type torch.float32 else x.alias ()

    /// norm(x), the way autocast runs it on the fp32 residual stream: when x's dtype differs from the
    /// norm's weights (fp32 stream, bf16/fp16 weights), normalizes in fp32 with the weight and bias upcast
    /// and rounds the result once to the weights' dtype (what the next projection consumes); otherwise
    /// norm.forward x. (..., C) -> (..., C).
    let layerNorm (norm: LayerNorm) (x: torch.Tensor) : torch.Tensor =
        if x.dtype = norm.weight.dtype then norm.forward x
        else
            use scope = torch.NewDisposeScope()
            let x32 = x.to_type torch.float32
            let weight = norm.weight.to_type torch.float32
            let bias = if isNull norm.bias then null else norm.bias.to_type torch.float32
            let y = torch.nn.functional.layer_norm(x32, norm.normalized_shape, weight, bias, norm.eps) // (..., C) fp32
            scope.MoveToOuter(y.to_type norm.weight.dtype)

/// Causal self-attention with the fastest kernel per dtype: libtorch's scaled_dot_product_attention in
/// fp32 (about 2x faster than the written-out form there), and the written-out form in bf16/fp16 (about
/// 2.4x faster than SDPA on this CPU, TORCHSHARP-NOTES.md), with the softmax in fp32.
[<RequireQualifiedAccess>]
module CausalAttention =

    /// q, k, v (B, nh, T, hs) -> (B, nh, T, hs), scores scaled by 1/sqrt(hs), dropout p on the weights.
    let apply (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) (dropout: float) : torch.Tensor =
        if q.dtype = torch.float32 || q.dtype = torch.float64 then
            torch.nn.functional.scaled_dot_product_attention(q, k, v, null, dropout, true)
        else
            use scope = torch.NewDisposeScope()
            let T = q.shape[2]
            let scale = 1.0 / Math.Sqrt(float q.shape[3])
            // q @ k^T runs in bf16 as autocast runs matmul (fp32 inputs cost 15% of a 12-layer GPT-2's
            // bf16 step); the products are then scaled, masked and softmaxed in fp32, and the
            // weights rounded to q's dtype for the product with v.
            let scores = torch.matmul(q, k.transpose(-2L, -1L)).to_type(torch.float32).mul_(scale.ToScalar()) // (B, nh, T, T)
            let future = torch.ones([| T; T |], dtype = torch.ScalarType.Bool, device = q.device).triu(1L)
            let weights = scores.masked_fill_(future, Double.NegativeInfinity).softmax(-1L).to_type(q.dtype)
            let weights = if dropout > 0.0 then torch.nn.functional.dropout(weights, dropout, true) else weights
            scope.MoveToOuter(torch.matmul(weights, v))

/// HF's Conv1D: a linear layer whose weight is stored transposed, (in, out), so y = x @ W + b.
type Conv1D(inFeatures: int64, outFeatures: int64) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Conv1D")
    // Detached from any dispose scope of the caller: parameters live as long as the module.
    let weight = torch.nn.Parameter(torch.zeros(inFeatures, outFeatures).DetachFromDisposeScope()) // (in, out)
    let bias = torch.nn.Parameter(torch.zeros(outFeatures).DetachFromDisposeScope()) // (out)
    do
        this.register_parameter("weight", weight)
        this.register_parameter("bias", bias)
        this.RegisterComponents()

    /// The weight, shaped (in, out).
    member _.Weight = weight

    /// The bias, shaped (out).
    member _.Bias = bias

    /// (..., in) -> (..., out).
    override _.forward(x) =
        let outShape = Array.append x.shape[.. x.shape.Length - 2] [| outFeatures |]
        use flat = x.reshape(-1L, inFeatures) // (N, in)
        use y = bias.addmm(flat, weight) // (N, out)
        y.view outShape

/// GPT-2's causal self-attention: one fused projection to q, k, v (c_attn), scaled dot-product
/// attention over n_head heads, an output projection (c_proj) and residual dropout.
/// attnPdrop applies to the attention probabilities in training only.
type Gpt2Attention
    (c_attn: Conv1D, c_proj: Conv1D, resid_dropout: Dropout, nHead: int, attnPdrop: float, scaleAttnWeights: bool) as this
    =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("GPT2Attention")
    do
        this.register_module("c_attn", c_attn)
        this.register_module("c_proj", c_proj)
        this.register_module("resid_dropout", resid_dropout)
        this.RegisterComponents()

    /// q, k, v of x (B, T, C), each (B, nh, T, hs); q pre-multiplied by sqrt(hs) without
    /// scale_attn_weights, since SDPA always divides by sqrt(hs) and the scores must stay unscaled.
    member private _.Heads(x: torch.Tensor) =
        let B, T, C = x.shape[0], x.shape[1], x.shape[2]
        let nh = int64 nHead
        let hs = C / nh
        let qkv = c_attn.call x // (B, T, 3C)
        let heads (t: torch.Tensor) = t.view(B, T, nh, hs).transpose(1, 2) // (B, nh, T, hs)
        let q = heads (qkv.narrow(2, 0L, C))
        let k = heads (qkv.narrow(2, C, C))
        let v = heads (qkv.narrow(2, 2L * C, C))
        let q = if scaleAttnWeights then q else q * Math.Sqrt(float hs)
        q, k, v

    /// The heads' outputs y (B, nh, T, hs) merged and projected: (B, T, C).
    member private _.Output(y: torch.Tensor) =
        let B, nh, T, hs = y.shape[0], y.shape[1], y.shape[2], y.shape[3]
        let y = y.transpose(1, 2).reshape(B, T, nh * hs) // (B, T, C)
        resid_dropout.forward (c_proj.call y)

    /// (B, T, C) -> (B, T, C).
    override this.forward(x) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads x
        let p = if this.training then attnPdrop else 0.0
        let y = CausalAttention.apply q k v p // (B, nh, T, hs)
        scope.MoveToOuter(this.Output y)

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, C), the allowed
    /// keys (B, 1, T_new, T_total) bool, the layer's cached keys and values (B, nh, T_past, hs) ->
    /// (B, T_new, C) and the keys and values of all T_total positions (B, nh, T_total, hs).
    member this.ForwardCached(x: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads x
        let k = IncrementalDecoding.append (Option.map fst past) k // (B, nh, T_total, hs)
        let v = IncrementalDecoding.append (Option.map snd past) v // (B, nh, T_total, hs)
        let p = if this.training then attnPdrop else 0.0
        let y = torch.nn.functional.scaled_dot_product_attention(q, k, v, allowed, p, false) // (B, nh, T_new, hs)
        scope.MoveToOuter(this.Output y), scope.MoveToOuter k, scope.MoveToOuter v

/// GPT-2's MLP: c_fc to the inner width, the activation, c_proj back, dropout (resid_pdrop).
type Gpt2Mlp(c_fc: Conv1D, c_proj: Conv1D, activation: Activation, dropout: Dropout) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("GPT2MLP")
    do
        this.register_module("c_fc", c_fc)
        this.register_module("c_proj", c_proj)
        this.register_module("dropout", dropout)
        this.RegisterComponents()

    /// (B, T, C) -> (B, T, C).
    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let h = c_fc.call x // (B, T, n_inner)
        let h = Activation.apply activation h
        scope.MoveToOuter(dropout.forward (c_proj.call h)) // (B, T, C)

/// A pre-norm transformer block: x + attn(ln_1(x)), then h + mlp(ln_2(h)).
type Gpt2Block(ln_1: LayerNorm, attn: Gpt2Attention, ln_2: LayerNorm, mlp: Gpt2Mlp) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("GPT2Block")
    do
        this.register_module("ln_1", ln_1)
        this.register_module("attn", attn)
        this.register_module("ln_2", ln_2)
        this.register_module("mlp", mlp)
        this.RegisterComponents()

    /// (B, T, C) -> (B, T, C).
    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let h = x + attn.forward (Autocast.layerNorm ln_1 x)
        scope.MoveToOuter(h + mlp.forward (Autocast.layerNorm ln_2 h))

    /// The block over T_new new positions with the layer's cache (see Gpt2Attention.ForwardCached):
    /// (B, T_new, C) -> (B, T_new, C) and the keys and values of all positions.
    member _.ForwardCached(x: torch.Tensor, allowed: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let a, k, v = attn.ForwardCached(Autocast.layerNorm ln_1 x, allowed, past)
        let h = x + a
        scope.MoveToOuter(h + mlp.forward (Autocast.layerNorm ln_2 h)), scope.MoveToOuter k, scope.MoveToOuter v

/// GPT2Model: token embedding (wte) plus learned position embedding (wpe), dropout, the blocks (h)
/// and a final LayerNorm (ln_f). Returns the last hidden states.
type Gpt2Model(wte: Embedding, wpe: Embedding, drop: Dropout, h: ModuleList<Gpt2Block>, ln_f: LayerNorm) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("GPT2Model")
    let mutable gradientCheckpointing = false
    do
        this.register_module("wte", wte)
        this.register_module("wpe", wpe)
        this.register_module("drop", drop)
        this.register_module("h", h)
        this.register_module("ln_f", ln_f)
        this.RegisterComponents()

    /// The token embedding, (vocab_size, n_embd); the tied LM head reads it.
    member _.Wte = wte

    /// input_ids (B, T) int64 -> hidden states (B, T, C).
    override this.forward(inputIds) =
        let T = inputIds.shape[1]
        let nPositions = wpe.weight.shape[0]
        if T > nPositions then
            invalidArg "inputIds" (sprintf "GPT-2 input has %d positions; the model has n_positions = %d" T nPositions)
        use scope = torch.NewDisposeScope()
        let positions = torch.arange(T, dtype = torch.int64, device = inputIds.device) // (T)
        let x = drop.forward (Autocast.residual (wte.forward inputIds) + Autocast.residual (wpe.forward positions)) // (B, T, C)
        let runBlock (x: torch.Tensor) (block: Gpt2Block) =
            if gradientCheckpointing && this.training then
                ActivationCheckpointing.run block (fun inputs -> block.forward inputs[0]) [| x |]
            else block.forward x
        let x = h |> Seq.fold runBlock x
        scope.MoveToOuter(Autocast.layerNorm ln_f x)

    /// Incremental forward (see IIncrementalDecoder): input_ids (B, T_new), attention_mask
    /// (B, T_past + T_new), the cache -> hidden states (B, T_new, C) and the cache of all positions.
    /// Positions follow the attention mask, so left-padded rows start at position 0.
    member _.ForwardCached(inputIds: torch.Tensor, attentionMask: torch.Tensor, cache: KvCache option) =
        IncrementalDecoding.checkInputs inputIds attentionMask cache h.Count
        let total = attentionMask.shape[1]
        let nPositions = wpe.weight.shape[0]
        if total > nPositions then
            invalidArg "attentionMask" (sprintf "GPT-2 input spans %d positions; the model has n_positions = %d" total nPositions)
        use scope = torch.NewDisposeScope()
        let newLength = inputIds.shape[1]
        let noPadding = IncrementalDecoding.hasNoPadding attentionMask
        let positions = IncrementalDecoding.positions attentionMask newLength noPadding // (B or 1, T_new)
        let allowed = IncrementalDecoding.allowedKeys attentionMask newLength noPadding // (B, 1, T_new, T_total) or null
        let x = drop.forward (Autocast.residual (wte.forward inputIds) + Autocast.residual (wpe.forward positions)) // (B, T_new, C)
        let keysValues, x =
            h
            |> Seq.indexed
            |> Seq.mapFold
                (fun x (i, block: Gpt2Block) ->
                    let past = cache |> Option.map (fun c -> c.Keys[i], c.Values[i])
                    let y, k, v = block.ForwardCached(x, allowed, past)
                    (k, v), y)
                x
        let keysValues = Array.ofSeq keysValues
        let hidden = scope.MoveToOuter(Autocast.layerNorm ln_f x)
        hidden,
        { Keys = keysValues |> Array.map (fst >> scope.MoveToOuter)
          Values = keysValues |> Array.map (snd >> scope.MoveToOuter) }

    interface IGradientCheckpointing with
        /// Whether training-mode forwards recompute each block in backward (see ActivationCheckpointing.run).
        member _.GradientCheckpointing
            with get () = gradientCheckpointing
            and set enabled = gradientCheckpointing <- enabled

/// GPT2LMHeadModel: the transformer and an LM head. A tied head (tie_word_embeddings, HF's default
/// for GPT-2) computes logits = h @ wte.weight^T and owns no parameter; an untied one is lm_head.weight.
type Gpt2LmHeadModel(transformer: Gpt2Model, lmHead: Linear option) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("GPT2LMHeadModel")
    do
        this.register_module("transformer", transformer)
        lmHead |> Option.iter (fun head -> this.register_module("lm_head", head))
        this.RegisterComponents()

    /// The GPT2Model below the head.
    member _.Transformer = transformer

    /// Logits of hidden states: (B, T, C) -> (B, T, vocab_size).
    member private _.Logits(hidden: torch.Tensor) =
        match lmHead with
        | Some head -> head.call hidden
        | None -> torch.nn.functional.linear(hidden, transformer.Wte.weight)

    /// input_ids (B, T) int64 -> logits (B, T, vocab_size).
    override this.forward(inputIds) =
        use hidden = transformer.forward inputIds // (B, T, C)
        this.Logits hidden

    interface IIncrementalDecoder with
        /// See IIncrementalDecoder.ForwardCached.
        member this.ForwardCached(inputIds, attentionMask, cache, lastPositionOnly) =
            let hidden, newCache = transformer.ForwardCached(inputIds, attentionMask, cache) // (B, T_new, C)
            use hidden = hidden
            let T = hidden.shape[1]
            use kept = if lastPositionOnly then hidden.narrow(1L, T - 1L, 1L) else hidden.alias ()
            this.Logits kept, newCache

/// Building GPT-2 models.
[<RequireQualifiedAccess>]
module Gpt2 =

    /// HF's GPT2PreTrainedModel._init_weights, drawn from the generator: Conv1D, Linear and Embedding
    /// weights from normal(0, initializer_range), except c_proj weights (attention and MLP) from
    /// normal(0, initializer_range / sqrt(2 * n_layer)); biases zero; LayerNorm weight one, bias zero.
    let initialize (config: Gpt2Config) (generator: torch.Generator) (model: Gpt2LmHeadModel) =
        let std = config.InitializerRange
        let projectionStd = std / Math.Sqrt(2.0 * float config.NLayer)
        use _ = torch.no_grad ()
        for name, m in model.named_modules () do
            match m with
            | :? Conv1D as c ->
                let s = if name.EndsWith "c_proj" then projectionStd else std
                c.Weight.normal_(0.0, s, generator) |> ignore
                torch.nn.init.zeros_ c.Bias |> ignore
            | :? Linear as l ->
                l.weight.normal_(0.0, std, generator) |> ignore
                if not (isNull l.bias) then torch.nn.init.zeros_ l.bias |> ignore
            | :? Embedding as e -> e.weight.normal_(0.0, std, generator) |> ignore
            | :? LayerNorm as n ->
                torch.nn.init.ones_ n.weight |> ignore
                torch.nn.init.zeros_ n.bias |> ignore
            | _ -> ()

    /// Builds GPT2LMHeadModel for the config, initialized as HF does from a generator seeded with seed.
    let build (config: Gpt2Config) (seed: int64) : Gpt2LmHeadModel =
        TorchRuntime.ensure ()
        let C = int64 config.NEmbd
        let inner = int64 config.NInner
        let eps = config.LayerNormEpsilon
        let block () =
            let attention =
                new Gpt2Attention(
                    new Conv1D(C, 3L * C), new Conv1D(C, C), torch.nn.Dropout config.ResidPdrop,
                    config.NHead, config.AttnPdrop, config.ScaleAttnWeights)
            let mlp = new Gpt2Mlp(new Conv1D(C, inner), new Conv1D(inner, C), config.ActivationFunction, torch.nn.Dropout config.ResidPdrop)
            new Gpt2Block(torch.nn.LayerNorm(C, eps), attention, torch.nn.LayerNorm(C, eps), mlp)
        let transformer =
            new Gpt2Model(
                torch.nn.Embedding(int64 config.VocabSize, C),
                torch.nn.Embedding(int64 config.NPositions, C),
                torch.nn.Dropout config.EmbdPdrop,
                torch.nn.ModuleList<Gpt2Block>([| for _ in 1 .. config.NLayer -> block () |]),
                torch.nn.LayerNorm(C, eps))
        let lmHead =
            if config.TieWordEmbeddings then None
            else Some(torch.nn.Linear(C, int64 config.VocabSize, hasBias = false))
        let model = new Gpt2LmHeadModel(transformer, lmHead)
        use generator = new torch.Generator(uint64 seed)
        initialize config generator model
        model
