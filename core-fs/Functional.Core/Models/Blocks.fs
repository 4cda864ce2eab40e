namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules

// The blocks causal-LM families share: the key/value cache and the masks of incremental decoding,
// autocast's precision rules, causal attention (with an optional ALiBi bias or sliding window), GPT-2's
// Conv1D, RMSNorm, rotary embeddings, grouped-query heads, and the generic decoder backbone and LM head
// that run one layer loop for the training forward, activation checkpointing and the cached forward.
// A family's own file (Gpt2.fs, Llama.fs) holds only its layers and its builder.

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

/// How a causal attention's scores are biased beyond the causal mask.
[<NoEquality; NoComparison>]
type AttentionBias =
    /// Plain causal attention: query i sees keys j <= i.
    | NoBias
    /// ALiBi (Press et al. 2022, HF BLOOM): per head h, slope_h * j is added to the score of key
    /// position j (softmax makes this the relative bias -slope_h * (i - j)). slopes: (heads) fp32, see
    /// Alibi.slopes.
    | Alibi of slopes: torch.Tensor
    /// A sliding window of this many keys (HF Mistral's sliding_window): query i sees keys j with
    /// i - window < j <= i.
    | Window of int

/// ALiBi's per-head slopes, as HF BLOOM's build_alibi_tensor computes them.
[<RequireQualifiedAccess>]
module Alibi =

    /// The slopes of numHeads heads, (numHeads) fp32: for the largest power of two n <= numHeads,
    /// 2^(-8 i / n) for i = 1 .. n; the remaining heads take the odd powers 2^(-4 i / n), i = 1, 3, ...,
    /// of the sequence for 2n heads (HF's rule for head counts that are not a power of two).
    let slopes (numHeads: int) : torch.Tensor =
        if numHeads < 1 then invalidArg "numHeads" (sprintf "expected at least one head, found %d" numHeads)
        let closest = pown 2 (int (Math.Floor(Math.Log2(float numHeads))))
        let baseOf (n: int) = Math.Pow(2.0, -(Math.Pow(2.0, -(Math.Log2(float n) - 3.0))))
        let first = [ for i in 1 .. closest -> Math.Pow(baseOf closest, float i) ]
        let extra =
            if closest = numHeads then []
            else
                let remaining = min closest (numHeads - closest)
                [ for i in 1 .. 2 .. 2 * remaining - 1 -> Math.Pow(baseOf (2 * closest), float i) ]
        torch.tensor(first @ extra |> List.map float32 |> Array.ofList, dtype = torch.float32)

/// Additive attention masks: 0 where a query may see a key, -inf where it may not, plus ALiBi's bias.
[<RequireQualifiedAccess>]
module AttentionMask =

    /// The additive fp32 mask of allowed keys (B or 1, 1, T_new, T_total) bool under a bias whose query
    /// positions are the last T_new of T_total key positions: Window w also hides keys w or more positions
    /// before the query; Alibi adds slope_h * keyPosition (keyPositions (B or 1, T_total) int64, HF BLOOM's
    /// cumsum(attention_mask) - 1) and gives (B or 1, heads, T_new, T_total); NoBias gives (.., 1, ..).
    let additive (bias: AttentionBias) (allowed: torch.Tensor) (keyPositions: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let newLength, total = allowed.shape[2], allowed.shape[3]
        let device = allowed.device
        let allowed =
            match bias with
            | Window w ->
                let keys = torch.arange(total, dtype = torch.int64, device = device).unsqueeze 0 // (1, T_total)
                let queries = torch.arange(total - newLength, total, dtype = torch.int64, device = device).unsqueeze 1 // (T_new, 1)
                torch.logical_and(allowed, (queries - keys).lt((int64 w).ToScalar())) // (B or 1, 1, T_new, T_total)
            | NoBias
            | Alibi _ -> allowed
        let hidden = torch.zeros(allowed.shape, dtype = torch.float32, device = device).masked_fill_(allowed.logical_not (), Double.NegativeInfinity)
        let mask =
            match bias with
            | Alibi slopes ->
                let slopes = slopes.``to``(device).view(1L, -1L, 1L, 1L) // (1, heads, 1, 1)
                let positions = keyPositions.to_type(torch.float32).unsqueeze(1).unsqueeze(1) // (B or 1, 1, 1, T_total)
                hidden + slopes * positions // (B or 1, heads, T_new, T_total)
            | NoBias
            | Window _ -> hidden
        scope.MoveToOuter mask

    /// The training forward's additive mask for T positions, no padding: (1, 1 or heads, T, T) fp32.
    let causal (bias: AttentionBias) (length: int64) (device: torch.Device) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let positions = torch.arange(length, dtype = torch.int64, device = device)
        let allowed = positions.unsqueeze(0).le(positions.unsqueeze 1).unsqueeze(0).unsqueeze 0 // (1, 1, T, T)
        scope.MoveToOuter(additive bias allowed (positions.unsqueeze 0))

/// The masks of rows that pack several samples (isolated packing, Data.PackedInputs): each token
/// attends causally within its own sample only, so the packed row computes what each sample would
/// alone.
[<RequireQualifiedAccess>]
module PackedAttention =

    /// The allowed keys of segment ids (B, T) int64 (one id per sample of a row, padding its own):
    /// query i sees key j when j <= i and both carry the same id, a block-diagonal causal mask.
    /// Built with torch ops on the ids' device. -> (B, 1, T, T) bool.
    let allowed (segmentIds: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let T = segmentIds.shape[1]
        let positions = torch.arange(T, dtype = torch.int64, device = segmentIds.device)
        let causal = positions.unsqueeze(0).le(positions.unsqueeze 1) // (T, T): key <= query
        let same = segmentIds.unsqueeze(2).eq(segmentIds.unsqueeze 1) // (B, T, T)
        scope.MoveToOuter(torch.logical_and(same, causal.unsqueeze 0).unsqueeze 1)

    /// The mask a layer's attention takes for packed rows under a bias: the allowed keys (bool) for
    /// NoBias; for a sliding window or ALiBi the additive fp32 mask of AttentionMask.additive, ALiBi's
    /// key positions being the restarted position ids (B, T), so each sample sees the biases it would
    /// alone. -> (B, 1 or heads, T, T).
    let mask (bias: AttentionBias) (segmentIds: torch.Tensor) (positionIds: torch.Tensor) : torch.Tensor =
        match bias with
        | NoBias -> allowed segmentIds
        | Window _
        | Alibi _ ->
            use keys = allowed segmentIds
            AttentionMask.additive bias keys positionIds

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

    /// The mask the cached forward's attention takes under a bias: allowedKeys's for NoBias (bool, or null
    /// when every key is allowed); for a window or ALiBi an additive fp32 mask (see AttentionMask.additive)
    /// of attentionMask's allowed keys, ALiBi's key positions being positionIds over all positions.
    let keyMask (bias: AttentionBias) (mask: torch.Tensor) (newLength: int64) (noPadding: bool) : torch.Tensor =
        match bias with
        | NoBias -> allowedKeys mask newLength noPadding
        | Window _
        | Alibi _ ->
            use allowed = attentionMask mask newLength
            use keyPositions = positionIds mask mask.shape[1]
            AttentionMask.additive bias allowed keyPositions

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

/// The options of one causal attention: dropout on the weights (training only) and the bias.
[<NoEquality; NoComparison>]
type AttentionOptions =
    { /// Dropout probability on the attention weights.
      Dropout: float
      /// The bias beyond the causal mask (ALiBi, a sliding window) or NoBias.
      Bias: AttentionBias }

/// Causal self-attention with the fastest kernel per dtype: libtorch's scaled_dot_product_attention in
/// fp32 (about 2x faster than the written-out form there), and the written-out form in bf16/fp16 (about
/// 2.4x faster than SDPA on this CPU, TORCHSHARP-NOTES.md), with the softmax in fp32.
[<RequireQualifiedAccess>]
module CausalAttention =

    /// The written-out attention for low-precision q, k, v: q @ k^T runs in q's dtype as autocast runs
    /// matmul (fp32 inputs cost 15% of a 12-layer GPT-2's bf16 step); the products are scaled, the fp32
    /// additive mask added (or the future hidden when it is null), softmaxed in fp32, and the weights
    /// rounded to q's dtype for the product with v. (B, nh, T, hs) -> (B, nh, T, hs).
    let private written (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) (additive: torch.Tensor) (dropout: float) =
        use scope = torch.NewDisposeScope()
        let scale = 1.0 / Math.Sqrt(float q.shape[3])
        let scores = torch.matmul(q, k.transpose(-2L, -1L)).to_type(torch.float32).mul_(scale.ToScalar()) // (B, nh, T, T_total)
        let scores =
            if isNull additive then
                let T = q.shape[2]
                let future = torch.ones([| T; T |], dtype = torch.ScalarType.Bool, device = q.device).triu(1L)
                scores.masked_fill_(future, Double.NegativeInfinity)
            else scores.add_ additive
        let weights = scores.softmax(-1L).to_type(q.dtype)
        let weights = if dropout > 0.0 then torch.nn.functional.dropout(weights, dropout, true) else weights
        scope.MoveToOuter(torch.matmul(weights, v))

    let private isFullPrecision (dtype: torch.ScalarType) = dtype = torch.float32 || dtype = torch.float64

    /// q, k, v (B, nh, T, hs) -> (B, nh, T, hs), scores scaled by 1/sqrt(hs), dropout on the weights,
    /// query i seeing keys j <= i and the options' bias (AttentionMask.causal). Without a bias this is
    /// SDPA's is_causal path in fp32 and the written-out form in bf16/fp16.
    let apply (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) (options: AttentionOptions) : torch.Tensor =
        match options.Bias with
        | NoBias ->
            if isFullPrecision q.dtype then
                torch.nn.functional.scaled_dot_product_attention(q, k, v, null, options.Dropout, true)
            else written q k v null options.Dropout
        | Window _
        | Alibi _ ->
            use additive = AttentionMask.causal options.Bias q.shape[2] q.device // (1, 1 or nh, T, T) fp32
            if isFullPrecision q.dtype then
                use mask = additive.to_type q.dtype
                torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, options.Dropout, false)
            else written q k v additive options.Dropout

    /// Attention of T_new queries q (B, nh, T_new, hs) over k, v (B, nh, T_total, hs) with the cached
    /// forward's mask (IncrementalDecoding.keyMask): null (every key), bool (allowed keys) or additive
    /// fp32. -> (B, nh, T_new, hs). Heads may be grouped as (B, nkv, nRep, hs) queries over (B, nkv, T, hs)
    /// keys when the mask broadcasts over them.
    let applyCached (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) (mask: torch.Tensor) (dropout: float) : torch.Tensor =
        if isNull mask || mask.dtype = torch.ScalarType.Bool then
            torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout, false)
        elif isFullPrecision q.dtype then
            use cast = if mask.dtype = q.dtype then mask.alias () else mask.to_type q.dtype
            torch.nn.functional.scaled_dot_product_attention(q, k, v, cast, dropout, false)
        else written q k v mask dropout

    /// The training forward of a self-attention sublayer: heads projects x (B, T, C) to q, k, v (B, nh, T,
    /// hd), apply attends causally with the options, output merges the heads' results and projects them
    /// back: (B, T, C).
    let sublayer
        (heads: torch.Tensor -> torch.Tensor * torch.Tensor * torch.Tensor) (output: torch.Tensor -> torch.Tensor)
        (options: AttentionOptions) (x: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let q, k, v = heads x
        let y = apply q k v options // (B, nh, T, hd)
        scope.MoveToOuter(output y)

    /// The cached forward of a self-attention sublayer (heads and output as in sublayer): T_new new
    /// positions x (B, T_new, C) attend over the layer's cached keys and values past (B, nh, T_past, hd)
    /// and themselves with the mask (IncrementalDecoding.keyMask, or null) and dropout ->
    /// (B, T_new, C) and the keys and values of all T_total positions (B, nh, T_total, hd).
    let sublayerCached
        (heads: torch.Tensor -> torch.Tensor * torch.Tensor * torch.Tensor) (output: torch.Tensor -> torch.Tensor)
        (dropout: float) (x: torch.Tensor) (mask: torch.Tensor) (past: (torch.Tensor * torch.Tensor) option) =
        use scope = torch.NewDisposeScope()
        let q, k, v = heads x
        let k = IncrementalDecoding.append (Option.map fst past) k // (B, nh, T_total, hd)
        let v = IncrementalDecoding.append (Option.map snd past) v // (B, nh, T_total, hd)
        let y = applyCached q k v mask dropout // (B, nh, T_new, hd)
        scope.MoveToOuter(output y), scope.MoveToOuter k, scope.MoveToOuter v

/// A projection whose weight is stored transposed, (in, out), so y = x @ W + b (PEFT's fan_in_fan_out):
/// what LoRA needs to know of a projection that is not a Linear.
type ITransposedWeight =
    /// The weight, shaped (in, out).
    abstract Weight: Parameter

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

    interface ITransposedWeight with
        /// The weight, shaped (in, out).
        member _.Weight = weight

/// A normalization layer (RMSNorm; TorchSharp's LayerNorm is recognised by its type): its weights are
/// exempt from weight decay.
type INormalization =
    interface end

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

    interface INormalization

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

/// Where a tensor-parallel block's split projections begin and end (Megatron's f and g): Enter runs on
/// the block's input before its column-parallel projections (q/k/v, gate/up), Leave on the output of its
/// row-parallel projection (o, down). ParallelRegion.whole, for a model that is not split, leaves both as
/// they are; Distributed.TensorParallel makes the split ones.
[<NoEquality; NoComparison>]
type ParallelRegion =
    { /// Before the column-parallel projections: the identity forward (f).
      Enter: torch.Tensor -> torch.Tensor
      /// After the row-parallel projection: the sum of the ranks' partial outputs (g).
      Leave: torch.Tensor -> torch.Tensor }

/// The regions of blocks.
[<RequireQualifiedAccess>]
module ParallelRegion =

    /// The region of a block that is not split: both functions return their input.
    let whole: ParallelRegion = { Enter = id; Leave = id }

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


/// One decoder layer of a backbone (a GPT-2 block, a LLaMA decoder layer). extras: the per-forward
/// tensors the backbone computes once for every layer (LLaMA's rotary cos and signed sin; none for
/// GPT-2); they need no gradient.
type IDecoderLayer =
    /// The training (full-sequence, causal) forward: x (B, T, C) -> (B, T, C).
    abstract Forward: x: torch.Tensor * extras: torch.Tensor[] -> torch.Tensor

    /// The layer over T_new new positions: x (B, T_new, C), the mask of IncrementalDecoding.keyMask
    /// (B, 1 or heads, T_new, T_total) or null, the layer's cached keys and values (B, kv_heads, T_past,
    /// head_dim) -> (B, T_new, C) and the keys and values of all T_total positions. Without a cache and
    /// with PackedAttention.mask (B, 1 or heads, T, T) it is the masked training forward of packed rows
    /// (DecoderBackbone.ForwardPacked), in training mode with dropout.
    abstract ForwardCached:
        x: torch.Tensor * extras: torch.Tensor[] * mask: torch.Tensor * past: (torch.Tensor * torch.Tensor) option ->
            torch.Tensor * torch.Tensor * torch.Tensor

/// How a backbone runs its layers in the training forward when something other than the plain loop or
/// activation checkpointing must happen around each (ZeRO stage 3 gathers a layer's parameters from every
/// process before it runs and frees them after).
type ILayerExecution =
    /// Runs layer index (its parameters in block): forward applied to the hidden state and the extras, as
    /// the backbone would run it (checkpointing says whether activation checkpointing is on).
    abstract Run:
        index: int * block: torch.nn.Module * forward: (torch.Tensor[] -> torch.Tensor) * inputs: torch.Tensor[] * checkpointing: bool ->
            torch.Tensor

/// A decoder-only transformer below its LM head: embeddings, a stack of layers and a final norm. The one
/// layer loop lives here and serves the training forward (with activation checkpointing) and the cached
/// forward; a family supplies its embedding, its layers, its final norm and its attention bias.
[<AbstractClass>]
type DecoderBackbone(name: string) =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>(name)
    let mutable gradientCheckpointing = false
    let mutable layerExecution: ILayerExecution option = None

    /// The token embedding, (vocab_size, C); a tied LM head reads it.
    abstract TokenEmbedding: Embedding

    /// The layers in order, each with the module that holds its parameters.
    abstract Layers: (torch.nn.Module * IDecoderLayer)[]

    /// The residual stream of the tokens and the per-forward extras for the layers: input_ids (B, T)
    /// at positions (T) int64 (the training forward) or (B or 1, T) (the cached forward) -> x (B, T, C)
    /// fp32 for a bf16/fp16 model (Autocast.residual) and the extras.
    abstract Embed: inputIds: torch.Tensor * positions: torch.Tensor -> torch.Tensor * torch.Tensor[]

    /// The final norm of the last layer's output: (B, T, C) -> (B, T, C).
    abstract FinalNorm: x: torch.Tensor -> torch.Tensor

    /// The extras Embed gives the layers, without the residual stream (a pipeline stage after the first
    /// receives that from the previous stage, and may hold no embedding): what rotary positions or ALiBi
    /// need of the positions, nothing for learned positions. The default runs Embed (under no_grad) and
    /// drops its stream; every family here overrides it so that it reads no parameter.
    abstract LayerExtras: inputIds: torch.Tensor * positions: torch.Tensor -> torch.Tensor[]
    default this.LayerExtras(inputIds, positions) =
        use _ = torch.no_grad ()
        let x, extras = this.Embed(inputIds, positions)
        x.Dispose()
        extras

    /// The attention bias every layer applies (what the cached forward's mask is built for).
    abstract Bias: AttentionBias
    default _.Bias = NoBias

    /// Raises ArgumentException when a forward spans more positions than the family can take: length is
    /// the input's T (cached = false) or the attention mask's T_past + T_new (cached = true).
    abstract CheckLength: length: int64 * cached: bool -> unit
    default _.CheckLength(_, _) = ()

    /// Runs the layers of a training-style forward over x and the extras, as activation checkpointing
    /// and the layer execution (ZeRO stage 3) say; layerForward runs one layer on its inputs (the hidden
    /// state first, then the extras).
    member private this.RunLayers(x: torch.Tensor, extras: torch.Tensor[], layerForward: IDecoderLayer -> torch.Tensor[] -> torch.Tensor) =
        let runLayer (x: torch.Tensor) (index: int, (block: torch.nn.Module, layer: IDecoderLayer)) =
            let checkpointing = gradientCheckpointing && this.training
            let forward = layerForward layer
            let inputs = Array.append [| x |] extras
            match layerExecution with
            | Some execution when this.training -> execution.Run(index, block, forward, inputs, checkpointing)
            | _ ->
                if checkpointing then ActivationCheckpointing.run block forward inputs
                else forward inputs
        this.Layers |> Array.indexed |> Array.fold runLayer x

    /// input_ids (B, T) int64 -> hidden states (B, T, C).
    override this.forward(inputIds) =
        let T = inputIds.shape[1]
        this.CheckLength(T, false)
        use scope = torch.NewDisposeScope()
        let positions = torch.arange(T, dtype = torch.int64, device = inputIds.device) // (T)
        let x, extras = this.Embed(inputIds, positions)
        let x = this.RunLayers(x, extras, fun layer inputs -> layer.Forward(inputs[0], inputs[1..]))
        scope.MoveToOuter(this.FinalNorm x)

    /// The training forward of rows that pack several samples (isolated packing): input_ids, position
    /// ids and segment ids, each (B, T) int64 (Data.PackedInputs) -> hidden states (B, T, C). Positions
    /// restart at every sample, and each token attends causally within its sample only
    /// (PackedAttention.mask, built once on the ids' device for every layer), so each sample's hidden
    /// states are those of the sample run alone. Each layer runs its masked path (IDecoderLayer.
    /// ForwardCached without a cache), with activation checkpointing and the layer execution as forward.
    member this.ForwardPacked(inputIds: torch.Tensor, positionIds: torch.Tensor, segmentIds: torch.Tensor) =
        let T = inputIds.shape[1]
        this.CheckLength(T, false)
        if positionIds.shape[0] <> inputIds.shape[0] || positionIds.shape[1] <> T || segmentIds.shape[0] <> inputIds.shape[0] || segmentIds.shape[1] <> T then
            invalidArg "positionIds" (sprintf "expected position and segment ids shaped as the input ids %A, found %A and %A" inputIds.shape positionIds.shape segmentIds.shape)
        use scope = torch.NewDisposeScope()
        let mask = PackedAttention.mask this.Bias segmentIds positionIds // (B, 1 or nh, T, T)
        let x, extras = this.Embed(inputIds, positionIds)
        let masked (layer: IDecoderLayer) (inputs: torch.Tensor[]) =
            use layerScope = torch.NewDisposeScope()
            let n = inputs.Length
            let y, _, _ = layer.ForwardCached(inputs[0], inputs[1 .. n - 2], inputs[n - 1], None)
            layerScope.MoveToOuter y
        let x = this.RunLayers(x, Array.append extras [| mask |], masked)
        scope.MoveToOuter(this.FinalNorm x)

    /// Incremental forward (see IIncrementalDecoder): input_ids (B, T_new), attention_mask
    /// (B, T_past + T_new), the cache -> hidden states (B, T_new, C) and the cache of all positions.
    /// Positions follow the attention mask, so left-padded rows start at position 0.
    member this.ForwardCached(inputIds: torch.Tensor, attentionMask: torch.Tensor, cache: KvCache option) =
        let layers = this.Layers
        IncrementalDecoding.checkInputs inputIds attentionMask cache layers.Length
        this.CheckLength(attentionMask.shape[1], true)
        use scope = torch.NewDisposeScope()
        let newLength = inputIds.shape[1]
        let noPadding = IncrementalDecoding.hasNoPadding attentionMask
        let positions = IncrementalDecoding.positions attentionMask newLength noPadding // (B or 1, T_new)
        let mask = IncrementalDecoding.keyMask this.Bias attentionMask newLength noPadding // (B, 1 or nh, T_new, T_total) or null
        let x, extras = this.Embed(inputIds, positions) // (B, T_new, C)
        let keysValues, x =
            layers
            |> Array.indexed
            |> Array.mapFold
                (fun x (i, (_, layer: IDecoderLayer)) ->
                    let past = cache |> Option.map (fun c -> c.Keys[i], c.Values[i])
                    let y, k, v = layer.ForwardCached(x, extras, mask, past)
                    (k, v), y)
                x
        let hidden = scope.MoveToOuter(this.FinalNorm x)
        hidden,
        { Keys = keysValues |> Array.map (fst >> scope.MoveToOuter)
          Values = keysValues |> Array.map (snd >> scope.MoveToOuter) }

    /// How training-mode forwards run the layers (None, the default: the plain loop, with activation
    /// checkpointing when it is on). ZeRO stage 3 sets it for the run.
    member _.LayerExecution
        with get () = layerExecution
        and set value = layerExecution <- value

    interface IGradientCheckpointing with
        /// Whether training-mode forwards recompute each layer in backward (see ActivationCheckpointing.run).
        member _.GradientCheckpointing
            with get () = gradientCheckpointing
            and set enabled = gradientCheckpointing <- enabled

/// A causal LM that trains on rows packing several samples in isolation (Data.PackedInputs).
type IPackedCausalLm =
    /// input_ids, position_ids and segment_ids, each (B, T) int64 -> logits (B, T, vocab_size): every
    /// sample's logits as if it ran alone (DecoderBackbone.ForwardPacked).
    abstract ForwardPacked: inputIds: torch.Tensor * positionIds: torch.Tensor * segmentIds: torch.Tensor -> torch.Tensor

/// A causal LM: a backbone and an LM head, as HF's GPT2LMHeadModel and LlamaForCausalLM. name is the
/// module's name ("GPT2LMHeadModel"), backboneName the backbone's registered name and so the state-dict
/// prefix ("transformer", "model"). A tied head (lmHead None) computes logits = h @ embedding^T and owns
/// no parameter; an untied one is lm_head.weight, (vocab_size, C).
type CausalLmHead(name: string, backboneName: string, backbone: DecoderBackbone, lmHead: Linear option) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>(name)
    do
        // Registered explicitly and only so: RegisterComponents would register the backbone a second
        // time under its field's name ("backbone") instead of HF's backboneName.
        this.register_module(backboneName, backbone)
        lmHead |> Option.iter (fun head -> this.register_module("lm_head", head))

    /// The backbone below the head.
    member _.Backbone = backbone

    /// The untied LM head (lm_head.weight, (vocab_size, C)); None when the head reads the token embedding.
    member _.LmHead: Linear option = lmHead
    /// The name the backbone is registered under, so the state-dict prefix ("transformer", "model");
    /// other heads over the same backbone (SequenceClassifierHead) register it under this name too.
    member _.BackboneName = backboneName

    /// The weight the head multiplies the final hidden states by, (vocab_size, C): lm_head.weight, or the
    /// token embedding's for a tied head. The head has no bias, scaling or soft-capping in any family, so
    /// logits = linear(hidden, HeadWeight) (what ChunkedLoss.causalLmSum computes chunk by chunk).
    member _.HeadWeight: torch.Tensor =
        match lmHead with
        | Some head -> head.weight
        | None -> backbone.TokenEmbedding.weight

    /// The final hidden states of input_ids (B, T) int64: (B, T, C), the backbone's output after its final
    /// norm, what forward turns into logits.
    member _.HiddenStates(inputIds: torch.Tensor) : torch.Tensor = backbone.forward inputIds

    /// The final hidden states of rows packed in isolation (see IPackedCausalLm.ForwardPacked): (B, T, C),
    /// each sample's as if it ran alone.
    member _.HiddenStatesPacked(inputIds: torch.Tensor, positionIds: torch.Tensor, segmentIds: torch.Tensor) : torch.Tensor =
        backbone.ForwardPacked(inputIds, positionIds, segmentIds)

    /// Logits of hidden states: (B, T, C) -> (B, T, vocab_size).
    member val private HeadInputHook: torch.Tensor -> torch.Tensor = id with get, set

    /// What runs on the final hidden states before the head multiplies them (the identity; Megatron's f
    /// when a tensor-parallel rank's head holds a block of the vocabulary and its logits are that block's,
    /// see Distributed.TensorParallelLlama).
    member this.HeadInput
        with get () = this.HeadInputHook
        and set (hook: torch.Tensor -> torch.Tensor) = this.HeadInputHook <- hook

    member private this.Logits(hidden: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let hidden = this.HeadInputHook hidden
        let logits =
            match lmHead with
            | Some head -> head.call hidden
            | None -> torch.nn.functional.linear(hidden, backbone.TokenEmbedding.weight)
        scope.MoveToOuter logits

    /// input_ids (B, T) int64 -> logits (B, T, vocab_size).
    override this.forward(inputIds) =
        use hidden = backbone.forward inputIds // (B, T, C)
        this.Logits hidden

    interface IPackedCausalLm with
        /// See IPackedCausalLm.ForwardPacked.
        member this.ForwardPacked(inputIds, positionIds, segmentIds) =
            use hidden = backbone.ForwardPacked(inputIds, positionIds, segmentIds) // (B, T, C)
            this.Logits hidden

    interface IIncrementalDecoder with
        /// See IIncrementalDecoder.ForwardCached.
        member this.ForwardCached(inputIds, attentionMask, cache, lastPositionOnly) =
            let hidden, newCache = backbone.ForwardCached(inputIds, attentionMask, cache) // (B, T_new, C)
            use hidden = hidden
            let T = hidden.shape[1]
            use kept = if lastPositionOnly then hidden.narrow(1L, T - 1L, 1L) else hidden.alias ()
            this.Logits kept, newCache

/// The parts of HF's PreTrainedModel._init_weights that the families share, drawn from the generator
/// (call under torch.no_grad, in named_modules order, so the draws follow HF's).
[<RequireQualifiedAccess>]
module HfInit =

    /// A Linear's weight from normal(0, std), its bias (when it has one) zero.
    let linear (std: float) (generator: torch.Generator) (l: Linear) : unit =
        l.weight.normal_(0.0, std, generator) |> ignore
        if not (isNull l.bias) then torch.nn.init.zeros_ l.bias |> ignore

    /// A Linear as linear does; an Embedding's weight from normal(0, std); a LayerNorm's weight one and
    /// bias zero; any other module untouched (GPT-2's and BLOOM's rules for these kinds).
    let standard (std: float) (generator: torch.Generator) (m: torch.nn.Module) : unit =
        match m with
        | :? Linear as l -> linear std generator l
        | :? Embedding as e -> e.weight.normal_(0.0, std, generator) |> ignore
        | :? LayerNorm as n ->
            torch.nn.init.ones_ n.weight |> ignore
            torch.nn.init.zeros_ n.bias |> ignore
        | _ -> ()
