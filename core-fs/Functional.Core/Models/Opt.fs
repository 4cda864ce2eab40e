namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules
open System.Text.Json
open Functional.Runtime

// OPT as HF transformers' OPTForCausalLM (modeling_opt.py), built bottom-up: OPTForCausalLM holds
// "model" (OPTModel), which holds "decoder" (OPTDecoder) with the token embedding, the learned positions
// (HF's offset of 2), the optional project_in / project_out, the optional final LayerNorm and the layers.
// As in Gpt2.fs, each module registers its parts explicitly under HF's names and in HF's order, so that
// named_parameters() yields the state-dict names ("model.decoder.layers.0.self_attn.k_proj.weight", ...)
// in HF's order; the fields holding the parts carry the same names.

/// The LayerNorms of OPT under the precision rules of Autocast, for pre-norm and post-norm layers alike
/// and for LayerNorms without weights (layer_norm_elementwise_affine false).
[<RequireQualifiedAccess>]
module internal OptNorm =

    /// norm(x) as autocast computes it: in fp32 when x is the fp32 residual stream of a bf16/fp16 model
    /// (weights upcast), the result staying fp32 (a post-norm layer's output is the residual stream);
    /// otherwise in x's dtype. (..., C) -> (..., C).
    let apply (norm: LayerNorm) (x: torch.Tensor) : torch.Tensor =
        let weight = norm.weight
        if isNull weight then torch.nn.functional.layer_norm(x, norm.normalized_shape, null, null, norm.eps)
        elif x.dtype = weight.dtype then norm.forward x
        else
            use scope = torch.NewDisposeScope()
            let x32 = x.to_type torch.float32
            let w = weight.to_type torch.float32
            let b = if isNull norm.bias then null else norm.bias.to_type torch.float32
            scope.MoveToOuter(torch.nn.functional.layer_norm(x32, norm.normalized_shape, w, b, norm.eps))

    /// x in the given compute dtype (what the next projection consumes): x itself (a fresh handle) when
    /// it already has it, else a rounded copy.
    let toDtype (dtype: torch.ScalarType) (x: torch.Tensor) : torch.Tensor =
        if x.dtype = dtype then x.alias () else x.to_type dtype

/// OPT's self-attention: k, v, q and out projections (nn.Linear, biased per enable_bias) over num_heads
/// heads of width hidden / heads. HF scales q by head_dim^-0.5 before q k^T; the attention kernel's
/// 1/sqrt(head_dim) scaling of the scores is the same product. attentionDropout applies to the attention
/// probabilities in training only.
type OptAttention(k_proj: Linear, v_proj: Linear, q_proj: Linear, out_proj: Linear, numHeads: int, attentionDropout: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("OPTAttention")
    do
        this.register_module("k_proj", k_proj)
        this.register_module("v_proj", v_proj)
        this.register_module("q_proj", q_proj)
        this.register_module("out_proj", out_proj)
        this.RegisterComponents()

    /// q, k, v of x (B, T, C), each (B, nh, T, hd).
    member private _.Heads(x: torch.Tensor) =
        let shape = x.shape
        let B, T, C = shape[0], shape[1], shape[2]
        let nh = int64 numHeads
        let hd = C / nh
        let heads (t: torch.Tensor) = t.view(B, T, nh, hd).transpose(1, 2) // (B, nh, T, hd)
        heads (q_proj.call x), heads (k_proj.call x), heads (v_proj.call x)

    /// The heads' outputs y (B, nh, T, hd) merged and projected: (B, T, C).
    member private _.Output(y: torch.Tensor) =
        let shape = y.shape
        let B, nh, T, hd = shape[0], shape[1], shape[2], shape[3]
        out_proj.call (y.transpose(1, 2).reshape(B, T, nh * hd))

    /// (B, T, C) -> (B, T, C), causal.
    override this.forward(x) =
        let p = if this.training then attentionDropout else 0.0
        CausalAttention.sublayer this.Heads this.Output { Dropout = p; Bias = NoBias } x

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, C), the mask
    /// (IncrementalDecoding.keyMask) or null, the layer's cached keys and values (B, nh, T_past, hd) ->
    /// (B, T_new, C) and the keys and values of all T_total positions (B, nh, T_total, hd).
    member this.ForwardCached(x: torch.Tensor, mask: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        let p = if this.training then attentionDropout else 0.0
        CausalAttention.sublayerCached this.Heads this.Output p x mask past

/// An OPT decoder layer. Pre-norm (do_layer_norm_before): h = x + drop(self_attn(self_attn_layer_norm(x))),
/// then h + drop(fc2(act(fc1(final_layer_norm(h))))). Post-norm (opt-350m): the same sublayers on the
/// un-normalized stream, each residual sum followed by its LayerNorm. dropout applies in training only.
type OptDecoderLayer
    (self_attn: OptAttention, self_attn_layer_norm: LayerNorm, fc1: Linear, fc2: Linear, final_layer_norm: LayerNorm,
     doLayerNormBefore: bool, activation: Activation, dropout: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("OPTDecoderLayer")
    do
        this.register_module("self_attn", self_attn)
        this.register_module("self_attn_layer_norm", self_attn_layer_norm)
        this.register_module("fc1", fc1)
        this.register_module("fc2", fc2)
        this.register_module("final_layer_norm", final_layer_norm)
        this.RegisterComponents()

    member private this.Drop(x: torch.Tensor) =
        if this.training && dropout > 0.0 then torch.nn.functional.dropout(x, dropout, true) else x

    /// The layer with the attention given as a function of its (compute-dtype) input; x is the residual
    /// stream (fp32 for a bf16/fp16 model). Returns the new residual stream.
    member private this.Apply(x: torch.Tensor, attend: torch.Tensor -> torch.Tensor) =
        let dtype = fc1.weight.dtype
        let input = if doLayerNormBefore then OptNorm.apply self_attn_layer_norm x else x
        let h = x + this.Drop(attend (OptNorm.toDtype dtype input))
        let h = if doLayerNormBefore then h else OptNorm.apply self_attn_layer_norm h
        let input = if doLayerNormBefore then OptNorm.apply final_layer_norm h else h
        let m = fc2.call (Activation.apply activation (fc1.call (OptNorm.toDtype dtype input)))
        let out = h + this.Drop m
        if doLayerNormBefore then out else OptNorm.apply final_layer_norm out

    /// (B, T, C) -> (B, T, C).
    override this.forward(x) =
        use scope = torch.NewDisposeScope()
        scope.MoveToOuter(this.Apply(x, self_attn.forward))

    interface IDecoderLayer with
        /// See forward; OPT takes no extras.
        member this.Forward(x, _) = this.forward x

        /// The layer over T_new new positions with the layer's cache (see OptAttention.ForwardCached).
        member this.ForwardCached(x, _, mask, past) =
            use scope = torch.NewDisposeScope()
            let keysValues = ref None
            let attend (h: torch.Tensor) =
                let a, k, v = self_attn.ForwardCached(h, mask, past)
                keysValues.Value <- Some(k, v)
                a
            let y = this.Apply(x, attend)
            let keys, values = keysValues.Value.Value
            scope.MoveToOuter y, scope.MoveToOuter keys, scope.MoveToOuter values

/// OPTDecoder: the token embedding (vocab_size, word_embed_proj_dim), the learned positions
/// (max_position_embeddings + 2, hidden_size), project_out and project_in when word_embed_proj_dim differs
/// from hidden_size, the final LayerNorm of a pre-norm model, and the layers. A container; the layer loop
/// is OptModel's (DecoderBackbone).
type OptDecoder
    (embed_tokens: Embedding, embed_positions: Embedding, project_out: Linear option, project_in: Linear option,
     final_layer_norm: LayerNorm option, layers: ModuleList<OptDecoderLayer>) as this =
    inherit torch.nn.Module("OPTDecoder")
    do
        this.register_module("embed_tokens", embed_tokens)
        this.register_module("embed_positions", embed_positions)
        project_out |> Option.iter (fun m -> this.register_module("project_out", m))
        project_in |> Option.iter (fun m -> this.register_module("project_in", m))
        final_layer_norm |> Option.iter (fun m -> this.register_module("final_layer_norm", m))
        this.register_module("layers", layers)
        this.RegisterComponents()

    /// The token embedding, (vocab_size, word_embed_proj_dim).
    member _.EmbedTokens = embed_tokens

    /// The learned positions, (max_position_embeddings + 2, hidden_size).
    member _.EmbedPositions = embed_positions

    /// hidden_size -> word_embed_proj_dim, when the widths differ.
    member _.ProjectOut = project_out

    /// word_embed_proj_dim -> hidden_size, when the widths differ.
    member _.ProjectIn = project_in

    /// The final LayerNorm (pre-norm models without _remove_final_layer_norm).
    member _.FinalLayerNorm = final_layer_norm

    /// The decoder layers.
    member _.Layers = layers

/// OPTModel: the decoder below OPTForCausalLM's head, registered as "decoder". Returns the last hidden
/// states in word_embed_proj_dim (after project_out), as HF's decoder does.
type OptModel(decoder: OptDecoder) as this =
    inherit DecoderBackbone("OPTModel")
    let stack = [| for layer in decoder.Layers -> (layer :> torch.nn.Module), (layer :> IDecoderLayer) |]
    /// HF's OPTLearnedPositionalEmbedding offset: position p reads row p + 2.
    static let offset = 2L
    do
        this.register_module("decoder", decoder)
        this.RegisterComponents()

    /// The decoder.
    member _.Decoder = decoder

    /// See DecoderBackbone.TokenEmbedding.
    override _.TokenEmbedding = decoder.EmbedTokens

    /// The layers decoder.layers.0, decoder.layers.1, ...
    override _.Layers = stack

    /// The token embedding (through project_in when present) plus the learned positions (row p + 2 for
    /// position p), the sum fp32 for a bf16/fp16 model (Autocast.residual); no dropout (HF applies none
    /// here) and no extras.
    override _.Embed(inputIds, positions) =
        use scope = torch.NewDisposeScope()
        let tokens = decoder.EmbedTokens.forward inputIds // (B, T, word_embed_proj_dim)
        let tokens =
            match decoder.ProjectIn with
            | Some p -> p.call tokens // (B, T, hidden)
            | None -> tokens
        let rows = positions + offset
        let placed = decoder.EmbedPositions.forward rows // (T, hidden) or (B or 1, T, hidden)
        scope.MoveToOuter(Autocast.residual tokens + Autocast.residual placed), [||]

    /// The final LayerNorm (when present), then project_out (when present), in the model's compute dtype
    /// (what the LM head consumes).
    override _.FinalNorm x =
        use scope = torch.NewDisposeScope()
        let normed =
            match decoder.FinalLayerNorm with
            | Some norm -> OptNorm.apply norm x
            | None -> x.alias ()
        let h = OptNorm.toDtype decoder.EmbedTokens.weight.dtype normed
        let h =
            match decoder.ProjectOut with
            | Some p -> p.call h
            | None -> h
        scope.MoveToOuter h

    /// Learned positions: the layers take no extras.
    override _.LayerExtras(_, _) = [||]

    /// The learned positions end at max_position_embeddings (the table's rows less the offset).
    override _.CheckLength(length, cached) =
        let limit = decoder.EmbedPositions.weight.shape[0] - offset
        if length > limit then
            if cached then
                invalidArg "attentionMask" (sprintf "OPT input spans %d positions; the model has max_position_embeddings = %d" length limit)
            else invalidArg "inputIds" (sprintf "OPT input has %d positions; the model has max_position_embeddings = %d" length limit)

/// Reading, writing and building OPT models.
[<RequireQualifiedAccess>]
module Opt =

    /// The architecture config.json names.
    [<Literal>]
    let Architecture = "OPTForCausalLM"

    /// Reads OPTConfig's fields from a config.json object (model_type "opt"). layerdrop above 0 is refused
    /// (HF skips whole layers at random in training; not built here). Raises InvalidInputException naming
    /// the field at fault.
    let read (r: ConfigJson.Reader) : OptConfig =
        let vocabSize = r.Int "vocab_size" None |> r.Positive "vocab_size"
        let hidden = r.Int "hidden_size" None |> r.Positive "hidden_size"
        let heads = r.Int "num_attention_heads" None |> r.Positive "num_attention_heads"
        if hidden % heads <> 0 then
            r.Fail "num_attention_heads" (sprintf "hidden_size (%d) must be divisible by num_attention_heads (%d)" hidden heads)
        let layerdrop = r.Float "layerdrop" 0.0 |> r.Probability "layerdrop"
        if layerdrop > 0.0 then
            r.Fail "layerdrop" (sprintf "LayerDrop is not supported yet; expected 0, found %g" layerdrop)
        // OPTConfig's default is 1; an explicit null means none.
        let padTokenId = if not (r.Has "pad_token_id") then Some 1 else r.TokenId "pad_token_id" vocabSize
        match padTokenId with
        | Some id when id < 0 || id >= vocabSize ->
            r.Fail "pad_token_id" (sprintf "expected a token id in [0, %d), found %d" vocabSize id)
        | _ -> ()
        { VocabSize = vocabSize
          HiddenSize = hidden
          NumHiddenLayers = r.Int "num_hidden_layers" None |> r.Positive "num_hidden_layers"
          NumAttentionHeads = heads
          FfnDim = r.Int "ffn_dim" None |> r.Positive "ffn_dim"
          MaxPositionEmbeddings = r.Int "max_position_embeddings" (Some 2048) |> r.Positive "max_position_embeddings"
          WordEmbedProjDim = r.Int "word_embed_proj_dim" (Some hidden) |> r.Positive "word_embed_proj_dim"
          DoLayerNormBefore = r.Bool "do_layer_norm_before" true
          RemoveFinalLayerNorm = r.Bool "_remove_final_layer_norm" false
          ActivationFunction = r.Activation "activation_function" Activation.Relu
          Dropout = r.Float "dropout" 0.1 |> r.Probability "dropout"
          AttentionDropout = r.Float "attention_dropout" 0.0 |> r.Probability "attention_dropout"
          ActivationDropout = r.Float "activation_dropout" 0.0 |> r.Probability "activation_dropout"
          InitStd = r.Float "init_std" 0.02 |> r.NonNegativeFloat "init_std"
          EnableBias = r.Bool "enable_bias" true
          LayerNormElementwiseAffine = r.Bool "layer_norm_elementwise_affine" true
          TieWordEmbeddings = r.Bool "tie_word_embeddings" true
          PadTokenId = padTokenId }

    /// Writes OPTConfig's fields into a config.json object (after "architectures", before torch_dtype);
    /// read reads them back to an equal value.
    let write (w: Utf8JsonWriter) (c: OptConfig) =
        w.WriteString("model_type", "opt")
        w.WriteNumber("vocab_size", c.VocabSize)
        w.WriteNumber("hidden_size", c.HiddenSize)
        w.WriteNumber("num_hidden_layers", c.NumHiddenLayers)
        w.WriteNumber("num_attention_heads", c.NumAttentionHeads)
        w.WriteNumber("ffn_dim", c.FfnDim)
        w.WriteNumber("max_position_embeddings", c.MaxPositionEmbeddings)
        w.WriteNumber("word_embed_proj_dim", c.WordEmbedProjDim)
        w.WriteBoolean("do_layer_norm_before", c.DoLayerNormBefore)
        w.WriteBoolean("_remove_final_layer_norm", c.RemoveFinalLayerNorm)
        w.WriteString("activation_function", Activation.hfName c.ActivationFunction)
        w.WriteNumber("dropout", c.Dropout)
        w.WriteNumber("attention_dropout", c.AttentionDropout)
        w.WriteNumber("activation_dropout", c.ActivationDropout)
        w.WriteNumber("layerdrop", 0.0)
        w.WriteNumber("init_std", c.InitStd)
        w.WriteBoolean("enable_bias", c.EnableBias)
        w.WriteBoolean("layer_norm_elementwise_affine", c.LayerNormElementwiseAffine)
        w.WriteBoolean("tie_word_embeddings", c.TieWordEmbeddings)
        match c.PadTokenId with
        | Some id -> w.WriteNumber("pad_token_id", id)
        | None -> w.WriteNull "pad_token_id"

    /// The config with every dropout probability 0 (dropout, attention_dropout, activation_dropout).
    let withoutDropout (c: OptConfig) : OptConfig =
        { c with Dropout = 0.0; AttentionDropout = 0.0; ActivationDropout = 0.0 }

    /// Whether the decoder has the final LayerNorm: HF's do_layer_norm_before and not
    /// _remove_final_layer_norm.
    let hasFinalLayerNorm (c: OptConfig) = c.DoLayerNormBefore && not c.RemoveFinalLayerNorm

    /// HF's OPTPreTrainedModel._init_weights with init_std, drawn from the generator: Linear weights from
    /// normal(0, init_std) and biases zero; both embeddings from normal(0, init_std), the token embedding's
    /// padding row (pad_token_id) zero; LayerNorms one and zero (as constructed).
    let initialize (config: OptConfig) (generator: torch.Generator) (model: CausalLmHead) =
        let std = config.InitStd
        use _ = torch.no_grad ()
        for name, m in model.named_modules () do
            match m with
            | :? Linear as l -> HfInit.linear std generator l
            | :? Embedding as e ->
                e.weight.normal_(0.0, std, generator) |> ignore
                if name.EndsWith "embed_tokens" then
                    config.PadTokenId |> Option.iter (fun pad -> e.weight[int64 pad].zero_() |> ignore)
            | _ -> ()

    /// Builds OPTForCausalLM (a CausalLmHead over OPTModel, registered as "model") for the config,
    /// initialized as HF does from a generator seeded with seed. The token embedding passes pad_token_id
    /// as padding_idx (that row gets no gradient, as in HF); the head is tied unless tie_word_embeddings
    /// is false.
    let build (config: OptConfig) (seed: int64) : CausalLmHead =
        TorchRuntime.ensure ()
        let C = int64 config.HiddenSize
        let E = int64 config.WordEmbedProjDim
        let ffn = int64 config.FfnDim
        let bias = config.EnableBias
        let affine = config.LayerNormElementwiseAffine
        let linear inputs outputs hasBias = torch.nn.Linear(inputs, outputs, hasBias = hasBias)
        let layerNorm () = torch.nn.LayerNorm(C, 1e-5, elementwise_affine = affine)
        let layer () =
            let attention = new OptAttention(linear C C bias, linear C C bias, linear C C bias, linear C C bias, config.NumAttentionHeads, config.AttentionDropout)
            new OptDecoderLayer(
                attention, layerNorm (), linear C ffn bias, linear ffn C bias, layerNorm (),
                config.DoLayerNormBefore, config.ActivationFunction, config.Dropout)
        let embedTokens =
            match config.PadTokenId with
            | Some pad -> torch.nn.Embedding(int64 config.VocabSize, E, padding_idx = Nullable(int64 pad))
            | None -> torch.nn.Embedding(int64 config.VocabSize, E)
        let projected = config.WordEmbedProjDim <> config.HiddenSize
        let decoder =
            new OptDecoder(
                embedTokens,
                torch.nn.Embedding(int64 config.MaxPositionEmbeddings + 2L, C),
                (if projected then Some(linear C E false) else None),
                (if projected then Some(linear E C false) else None),
                (if hasFinalLayerNorm config then Some(layerNorm ()) else None),
                torch.nn.ModuleList<OptDecoderLayer>([| for _ in 1 .. config.NumHiddenLayers -> layer () |]))
        let lmHead = if config.TieWordEmbeddings then None else Some(linear E (int64 config.VocabSize) false)
        let model = new CausalLmHead(Architecture, "model", new OptModel(decoder), lmHead)
        use generator = new torch.Generator(uint64 seed)
        initialize config generator model
        model
