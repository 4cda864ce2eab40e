namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules
open System.Text.Json
open Functional.Runtime

// BLOOM as HF transformers' BloomForCausalLM (modeling_bloom.py), built bottom-up over Blocks.fs:
// a word embedding followed by a layer norm, pre-norm blocks with a fused per-head q/k/v projection and
// ALiBi instead of position embeddings, tanh GELU, a final layer norm and a head tied to the embedding.
// As in Gpt2.fs, each module registers its parts explicitly under HF's names and in HF's order, so
// named_parameters() yields the state-dict names ("transformer.h.0.self_attention.query_key_value.weight",
// ...) in HF's order.

/// Layer norms on BLOOM's residual stream, where a norm's output may itself become the residual
/// (apply_residual_connection_post_layernorm) or start it (word_embeddings_layernorm).
[<RequireQualifiedAccess>]
module BloomNorm =

    /// norm(x) twice: the copy the residual stream carries and the copy the next projection consumes.
    /// With x in the weights' dtype both are norm.forward x. On the fp32 stream of a bf16/fp16 model
    /// (Autocast), the norm runs in fp32 with the weights upcast, as autocast's fp32 layer norm: the
    /// stream copy stays fp32, the projection's copy is rounded once to the weights' dtype.
    /// (..., C) -> (..., C) twice.
    let both (norm: LayerNorm) (x: torch.Tensor) : torch.Tensor * torch.Tensor =
        if x.dtype = norm.weight.dtype then
            let y = norm.forward x
            y, y.alias ()
        else
            use scope = torch.NewDisposeScope()
            let x32 = x.to_type torch.float32
            let weight = norm.weight.to_type torch.float32
            let bias = if isNull norm.bias then null else norm.bias.to_type torch.float32
            let y = torch.nn.functional.layer_norm(x32, norm.normalized_shape, weight, bias, norm.eps) // (..., C) fp32
            scope.MoveToOuter y, scope.MoveToOuter(y.to_type norm.weight.dtype)

/// BLOOM's self-attention: one fused projection query_key_value whose output, viewed as (B, T, n_head,
/// 3, head_dim), holds per head its query, key and value rows (not three blocks as GPT-2's c_attn);
/// scores q.k / sqrt(head_dim) plus ALiBi's bias (the additive mask the caller passes); the output
/// projection dense. attentionDropout applies to the attention probabilities in training only.
type BloomAttention(query_key_value: Linear, dense: Linear, nHead: int, attentionDropout: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor, torch.Tensor>("BloomAttention")
    do
        this.register_module("query_key_value", query_key_value)
        this.register_module("dense", dense)
        this.RegisterComponents()

    /// q, k, v of x (B, T, C), each (B, nh, T, hd), from the per-head interleaved fused projection.
    member private _.Heads(x: torch.Tensor) =
        let B, T = x.shape[0], x.shape[1]
        let nh = int64 nHead
        let qkv = query_key_value.call x // (B, T, 3C)
        let hd = qkv.shape[2] / (3L * nh)
        let fused = qkv.view(B, T, nh, 3L, hd) // (B, T, nh, 3, hd)
        let part (i: int64) = fused.select(3L, i).transpose(1L, 2L) // (B, nh, T, hd)
        part 0L, part 1L, part 2L

    /// The heads' outputs y (B, nh, T, hd) merged and projected by dense: (B, T, C).
    member private _.Output(y: torch.Tensor) =
        let B, nh, T, hd = y.shape[0], y.shape[1], y.shape[2], y.shape[3]
        dense.call (y.transpose(1L, 2L).reshape(B, T, nh * hd))

    /// The training forward: x (B, T, C) and the causal ALiBi mask (1, nh, T, T) fp32 (AttentionMask.causal)
    /// -> dense's output (B, T, C), before the hidden dropout and the residual.
    override this.forward(x, mask) =
        use scope = torch.NewDisposeScope()
        let q, k, v = this.Heads x
        let p = if this.training then attentionDropout else 0.0
        let y = CausalAttention.applyCached q k v mask p // (B, nh, T, hd)
        scope.MoveToOuter(this.Output y)

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, C), the additive
    /// ALiBi mask (IncrementalDecoding.keyMask, (B, nh, T_new, T_total)), the layer's cached keys and values
    /// (B, nh, T_past, hd) -> dense's output (B, T_new, C) and the keys and values of all T_total positions.
    member this.ForwardCached(x: torch.Tensor, mask: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        let p = if this.training then attentionDropout else 0.0
        CausalAttention.sublayerCached this.Heads this.Output p x mask past

/// BLOOM's MLP: dense_h_to_4h to 4 * hidden, the tanh approximation of GELU (BloomGelu), dense_4h_to_h back.
type BloomMlp(dense_h_to_4h: Linear, dense_4h_to_h: Linear) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("BloomMLP")
    do
        this.register_module("dense_h_to_4h", dense_h_to_4h)
        this.register_module("dense_4h_to_h", dense_4h_to_h)
        this.RegisterComponents()

    /// (B, T, C) -> (B, T, C), before the hidden dropout and the residual.
    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let h = Activation.apply Activation.GeluPytorchTanh (dense_h_to_4h.call x) // (B, T, 4C)
        scope.MoveToOuter(dense_4h_to_h.call h)

/// A BLOOM block: ln = input_layernorm(x); h = residual + dropout(self_attention(ln)); ln2 =
/// post_attention_layernorm(h); out = residual2 + dropout(mlp(ln2)), the residuals being x and h, or ln
/// and ln2 with apply_residual_connection_post_layernorm (postLayerNormResidual). hiddenDropout applies in
/// training only (HF's dropout_add).
type BloomBlock
    (input_layernorm: LayerNorm, self_attention: BloomAttention, post_attention_layernorm: LayerNorm, mlp: BloomMlp,
     postLayerNormResidual: bool, hiddenDropout: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor, torch.Tensor>("BloomBlock")
    do
        this.register_module("input_layernorm", input_layernorm)
        this.register_module("self_attention", self_attention)
        this.register_module("post_attention_layernorm", post_attention_layernorm)
        this.register_module("mlp", mlp)
        this.RegisterComponents()

    /// residual + dropout(x) (HF's dropout_add).
    member private this.DropoutAdd(x: torch.Tensor, residual: torch.Tensor) =
        if this.training && hiddenDropout > 0.0 then
            use dropped = torch.nn.functional.dropout(x, hiddenDropout, true)
            residual + dropped
        else residual + x

    /// input_layernorm of x: the residual (x, or the norm's output) and the attention's input.
    member private _.AttentionInputs(x: torch.Tensor) =
        let stream, normed = BloomNorm.both input_layernorm x
        (if postLayerNormResidual then stream else x), normed

    /// The MLP half of the block: (B, T, C) -> (B, T, C).
    member private this.MlpHalf(h: torch.Tensor) =
        let stream, normed = BloomNorm.both post_attention_layernorm h
        let residual = if postLayerNormResidual then stream else h
        this.DropoutAdd(mlp.forward normed, residual)

    /// The training forward: x (B, T, C) and the causal ALiBi mask (1, nh, T, T) -> (B, T, C).
    override this.forward(x, mask) =
        use scope = torch.NewDisposeScope()
        let residual, normed = this.AttentionInputs x
        let h = this.DropoutAdd(self_attention.forward(normed, mask), residual)
        scope.MoveToOuter(this.MlpHalf h)

    interface IDecoderLayer with
        /// See forward; extras[0] is the causal ALiBi mask BloomModel.Embed computes once per forward.
        member this.Forward(x, extras) = this.forward(x, extras[0])

        /// The block over T_new new positions with the layer's cache (see BloomAttention.ForwardCached).
        member this.ForwardCached(x, _, mask, past) =
            use scope = torch.NewDisposeScope()
            let residual, normed = this.AttentionInputs x
            let a, k, v = self_attention.ForwardCached(normed, mask, past)
            let h = this.DropoutAdd(a, residual)
            scope.MoveToOuter(this.MlpHalf h), scope.MoveToOuter k, scope.MoveToOuter v

/// BloomModel: word_embeddings, word_embeddings_layernorm, the blocks (h) and ln_f; no position
/// embedding: every layer adds ALiBi's bias with the slopes of Alibi.slopes n_head, held as the
/// non-persistent buffer alibi_slopes (not in the state dict; HF computes the slopes each forward).
type BloomModel(word_embeddings: Embedding, word_embeddings_layernorm: LayerNorm, h: ModuleList<BloomBlock>, ln_f: LayerNorm, nHead: int) as this =
    inherit DecoderBackbone("BloomModel")
    let layers = [| for block in h -> (block :> torch.nn.Module), (block :> IDecoderLayer) |]
    let alibi_slopes = (Alibi.slopes nHead).DetachFromDisposeScope() // (n_head) fp32
    do
        this.register_module("word_embeddings", word_embeddings)
        this.register_module("word_embeddings_layernorm", word_embeddings_layernorm)
        this.register_module("h", h)
        this.register_module("ln_f", ln_f)
        this.register_buffer("alibi_slopes", alibi_slopes, persistent = false)
        this.RegisterComponents()

    /// The word embedding, (vocab_size, hidden); the tied LM head reads it.
    member _.WordEmbeddings = word_embeddings

    /// See DecoderBackbone.TokenEmbedding.
    override _.TokenEmbedding = word_embeddings

    /// The blocks h.0, h.1, ...
    override _.Layers = layers

    /// ALiBi with the model's slopes.
    override _.Bias = Alibi alibi_slopes

    /// word_embeddings_layernorm of the word embedding (the residual stream, fp32 for a bf16/fp16 model);
    /// for the training forward ((T) positions) the extras hold the causal ALiBi mask (1, n_head, T, T)
    /// fp32, computed once for every layer; the cached forward takes its mask from the backbone.
    override _.Embed(inputIds, positions) =
        use scope = torch.NewDisposeScope()
        let x = Autocast.residual (word_embeddings.forward inputIds) // (B, T, C)
        let stream, _ = BloomNorm.both word_embeddings_layernorm x
        let extras =
            if positions.dim () = 1L then [| scope.MoveToOuter(AttentionMask.causal (Alibi alibi_slopes) positions.shape[0] inputIds.device) |]
            else [||]
        scope.MoveToOuter stream, extras

    /// ln_f.
    override _.FinalNorm x = Autocast.layerNorm ln_f x

    /// The ALiBi causal mask of Embed, without the embeddings.
    override _.LayerExtras(inputIds, positions) =
        if positions.dim () = 1L then [| AttentionMask.causal (Alibi alibi_slopes) positions.shape[0] inputIds.device |] else [||]

/// Reading, writing and building BLOOM models.
[<RequireQualifiedAccess>]
module Bloom =

    /// BloomConfig's field or its alias (attribute_map: num_hidden_layers for n_layer,
    /// num_attention_heads for n_head) as a positive integer, fallback when both are absent; both present
    /// must agree.
    let private aliased (r: ConfigJson.Reader) (field: string) (alias: string) (fallback: int) =
        match r.TryGet field, r.TryGet alias with
        | Some _, Some _ ->
            let value = r.Int field None
            let other = r.Int alias None
            if value <> other then
                r.Fail alias (sprintf "%s (%d) and its alias %s (%d) disagree; expected one of them, or equal values" field value alias other)
            value |> r.Positive field
        | Some _, None -> r.Int field None |> r.Positive field
        | None, Some _ -> r.Int alias None |> r.Positive alias
        | None, None -> fallback

    /// Reads BloomConfig's fields from a config.json object (model_type "bloom") with HF's defaults; the
    /// legacy "n_embed" takes precedence over "hidden_size" as in HF. slow_but_exact with pretraining_tp > 1
    /// (HF's sliced output projections) is refused. Raises InvalidInputException naming the field at fault.
    let read (r: ConfigJson.Reader) : BloomConfig =
        let hidden =
            match r.TryGet "n_embed" with
            | Some _ -> r.Int "n_embed" None |> r.Positive "n_embed"
            | None -> r.Int "hidden_size" (Some 64) |> r.Positive "hidden_size"
        let nHead = aliased r "n_head" "num_attention_heads" 8
        if hidden % nHead <> 0 then
            r.Fail "n_head" (sprintf "hidden_size (%d) must be divisible by n_head (%d)" hidden nHead)
        let tp = r.Int "pretraining_tp" (Some 1) |> r.Positive "pretraining_tp"
        if tp > 1 && r.Bool "slow_but_exact" false then
            r.Fail "slow_but_exact" (sprintf "true with pretraining_tp = %d (sliced output projections) is not supported yet; expected false" tp)
        let vocabSize = r.Int "vocab_size" (Some 250880) |> r.Positive "vocab_size"
        let padTokenId = r.TokenId "pad_token_id" vocabSize
        { VocabSize = vocabSize
          HiddenSize = hidden
          NLayer = aliased r "n_layer" "num_hidden_layers" 2
          NHead = nHead
          LayerNormEpsilon = r.Float "layer_norm_epsilon" 1e-5 |> r.PositiveFloat "layer_norm_epsilon"
          InitializerRange = r.Float "initializer_range" 0.02 |> r.NonNegativeFloat "initializer_range"
          ApplyResidualConnectionPostLayernorm = r.Bool "apply_residual_connection_post_layernorm" false
          HiddenDropout = r.Float "hidden_dropout" 0.0 |> r.Probability "hidden_dropout"
          AttentionDropout = r.Float "attention_dropout" 0.0 |> r.Probability "attention_dropout"
          PretrainingTp = tp
          SeqLength = r.Int "seq_length" (Some 2048) |> r.Positive "seq_length"
          TieWordEmbeddings = r.Bool "tie_word_embeddings" true
          PadTokenId = padTokenId }

    /// Writes BloomConfig's fields into a config.json object (after "architectures", before torch_dtype);
    /// read reads them back to an equal value.
    let write (w: Utf8JsonWriter) (c: BloomConfig) =
        w.WriteString("model_type", "bloom")
        w.WriteNumber("vocab_size", c.VocabSize)
        w.WriteNumber("hidden_size", c.HiddenSize)
        w.WriteNumber("n_layer", c.NLayer)
        w.WriteNumber("n_head", c.NHead)
        w.WriteNumber("layer_norm_epsilon", c.LayerNormEpsilon)
        w.WriteNumber("initializer_range", c.InitializerRange)
        w.WriteBoolean("apply_residual_connection_post_layernorm", c.ApplyResidualConnectionPostLayernorm)
        w.WriteNumber("hidden_dropout", c.HiddenDropout)
        w.WriteNumber("attention_dropout", c.AttentionDropout)
        w.WriteNumber("pretraining_tp", c.PretrainingTp)
        w.WriteBoolean("slow_but_exact", false)
        // Not a BloomConfig field: written only when it is not the default, so a plain config stays HF's.
        if c.SeqLength <> 2048 then w.WriteNumber("seq_length", c.SeqLength)
        w.WriteBoolean("tie_word_embeddings", c.TieWordEmbeddings)
        c.PadTokenId |> Option.iter (fun id -> w.WriteNumber("pad_token_id", id))

    /// The config with every dropout probability zero (hidden_dropout, attention_dropout).
    let withoutDropout (c: BloomConfig) : BloomConfig = { c with HiddenDropout = 0.0; AttentionDropout = 0.0 }

    /// HF's BloomPreTrainedModel._init_weights, drawn from the generator: Linear and Embedding weights
    /// from normal(0, initializer_range), biases zero, LayerNorm weight one and bias zero.
    let initialize (config: BloomConfig) (generator: torch.Generator) (model: CausalLmHead) =
        let std = config.InitializerRange
        use _ = torch.no_grad ()
        for _, m in model.named_modules () do
            HfInit.standard std generator m

    /// Builds BloomForCausalLM (a CausalLmHead over BloomModel, registered as "transformer") for the
    /// config, initialized as HF does from a generator seeded with seed.
    let build (config: BloomConfig) (seed: int64) : CausalLmHead =
        TorchRuntime.ensure ()
        let C = int64 config.HiddenSize
        let eps = config.LayerNormEpsilon
        let block () =
            let attention =
                new BloomAttention(torch.nn.Linear(C, 3L * C), torch.nn.Linear(C, C), config.NHead, config.AttentionDropout)
            let mlp = new BloomMlp(torch.nn.Linear(C, 4L * C), torch.nn.Linear(4L * C, C))
            new BloomBlock(
                torch.nn.LayerNorm(C, eps), attention, torch.nn.LayerNorm(C, eps), mlp,
                config.ApplyResidualConnectionPostLayernorm, config.HiddenDropout)
        let transformer =
            new BloomModel(
                torch.nn.Embedding(int64 config.VocabSize, C),
                torch.nn.LayerNorm(C, eps),
                torch.nn.ModuleList<BloomBlock>([| for _ in 1 .. config.NLayer -> block () |]),
                torch.nn.LayerNorm(C, eps),
                config.NHead)
        let lmHead =
            if config.TieWordEmbeddings then None
            else Some(torch.nn.Linear(C, int64 config.VocabSize, hasBias = false))
        let model = new CausalLmHead("BloomForCausalLM", "transformer", transformer, lmHead)
        use generator = new torch.Generator(uint64 seed)
        initialize config generator model
        model
