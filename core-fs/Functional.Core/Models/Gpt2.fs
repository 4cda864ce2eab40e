namespace Functional.Models

open System
open TorchSharp
open TorchSharp.Modules
open System.Text.Json
open Functional.Runtime

// GPT-2 as HF transformers' GPT2LMHeadModel (modeling_gpt2.py), built bottom-up.
// Each module registers its parts explicitly, under HF's names and in HF's order, so that
// named_parameters() yields exactly the state-dict names save_pretrained writes
// ("transformer.h.0.attn.c_attn.weight", ...) in HF's order. The fields holding the parts carry the
// same snake_case names: TorchSharp's RegisterComponents and Module.to() match fields to registered
// components by name (F# does not keep constructor-parameter order in fields, hence the explicit order).

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
        let p = if this.training then attnPdrop else 0.0
        CausalAttention.sublayer this.Heads this.Output { Dropout = p; Bias = NoBias } x

    /// Attention of T_new new positions over the cached ones and themselves: x (B, T_new, C), the mask
    /// (IncrementalDecoding.keyMask) or null, the layer's cached keys and values (B, nh, T_past, hs) ->
    /// (B, T_new, C) and the keys and values of all T_total positions (B, nh, T_total, hs).
    member this.ForwardCached(x: torch.Tensor, mask: torch.Tensor, past: (torch.Tensor * torch.Tensor) option) =
        let p = if this.training then attnPdrop else 0.0
        CausalAttention.sublayerCached this.Heads this.Output p x mask past

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

    interface IDecoderLayer with
        /// See forward; GPT-2 takes no extras.
        member this.Forward(x, _) = this.forward x

        /// The block over T_new new positions with the layer's cache (see Gpt2Attention.ForwardCached).
        member _.ForwardCached(x, _, mask, past) =
            use scope = torch.NewDisposeScope()
            let a, k, v = attn.ForwardCached(Autocast.layerNorm ln_1 x, mask, past)
            let h = x + a
            scope.MoveToOuter(h + mlp.forward (Autocast.layerNorm ln_2 h)), scope.MoveToOuter k, scope.MoveToOuter v

/// GPT2Model: token embedding (wte) plus learned position embedding (wpe), dropout, the blocks (h)
/// and a final LayerNorm (ln_f). Returns the last hidden states (the layer loop is DecoderBackbone's).
type Gpt2Model(wte: Embedding, wpe: Embedding, drop: Dropout, h: ModuleList<Gpt2Block>, ln_f: LayerNorm) as this =
    inherit DecoderBackbone("GPT2Model")
    let layers = [| for block in h -> (block :> torch.nn.Module), (block :> IDecoderLayer) |]
    do
        this.register_module("wte", wte)
        this.register_module("wpe", wpe)
        this.register_module("drop", drop)
        this.register_module("h", h)
        this.register_module("ln_f", ln_f)
        this.RegisterComponents()

    /// The token embedding, (vocab_size, n_embd); the tied LM head reads it.
    member _.Wte = wte

    /// See DecoderBackbone.TokenEmbedding.
    override _.TokenEmbedding = wte

    /// The blocks h.0, h.1, ...
    override _.Layers = layers

    /// Token plus learned position embeddings, dropped out; no extras.
    override _.Embed(inputIds, positions) =
        drop.forward (Autocast.residual (wte.forward inputIds) + Autocast.residual (wpe.forward positions)), [||]

    /// ln_f.
    override _.FinalNorm x = Autocast.layerNorm ln_f x

    /// Learned positions: the layers take no extras.
    override _.LayerExtras(_, _) = [||]

    /// The learned positions end at n_positions.
    override _.CheckLength(length, cached) =
        let nPositions = wpe.weight.shape[0]
        if length > nPositions then
            if cached then
                invalidArg "attentionMask" (sprintf "GPT-2 input spans %d positions; the model has n_positions = %d" length nPositions)
            else invalidArg "inputIds" (sprintf "GPT-2 input has %d positions; the model has n_positions = %d" length nPositions)

/// Reading, writing and building GPT-2 models.
[<RequireQualifiedAccess>]
module Gpt2 =

    /// Reads GPT2Config's fields from a config.json object (model_type "gpt2"). Raises
    /// InvalidInputException naming the field at fault.
    let read (r: ConfigJson.Reader) : Gpt2Config =
        let nEmbd = r.Int "n_embd" None |> r.Positive "n_embd"
        let nHead = r.Int "n_head" None |> r.Positive "n_head"
        if nEmbd % nHead <> 0 then
            r.Fail "n_head" (sprintf "n_embd (%d) must be divisible by n_head (%d)" nEmbd nHead)
        r.Unsupported "scale_attn_by_inverse_layer_idx"
        r.Unsupported "add_cross_attention"
        { VocabSize = r.Int "vocab_size" None |> r.Positive "vocab_size"
          NPositions = r.Int "n_positions" None |> r.Positive "n_positions"
          NEmbd = nEmbd
          NLayer = r.Int "n_layer" None |> r.Positive "n_layer"
          NHead = nHead
          NInner = r.Int "n_inner" (Some(4 * nEmbd)) |> r.Positive "n_inner"
          ActivationFunction = r.Activation "activation_function" Activation.GeluNew
          ResidPdrop = r.Float "resid_pdrop" 0.1 |> r.Probability "resid_pdrop"
          EmbdPdrop = r.Float "embd_pdrop" 0.1 |> r.Probability "embd_pdrop"
          AttnPdrop = r.Float "attn_pdrop" 0.1 |> r.Probability "attn_pdrop"
          LayerNormEpsilon = r.Float "layer_norm_epsilon" 1e-5 |> r.PositiveFloat "layer_norm_epsilon"
          InitializerRange = r.Float "initializer_range" 0.02 |> r.NonNegativeFloat "initializer_range"
          ScaleAttnWeights = r.Bool "scale_attn_weights" true
          TieWordEmbeddings = r.Bool "tie_word_embeddings" true }


    /// Writes Gpt2Config's fields into a config.json object (after "architectures", before
    /// torch_dtype); read reads them back to an equal value.
    let write (w: Utf8JsonWriter) (c: Gpt2Config) =
        w.WriteString("model_type", "gpt2")
        w.WriteNumber("vocab_size", c.VocabSize)
        w.WriteNumber("n_positions", c.NPositions)
        w.WriteNumber("n_embd", c.NEmbd)
        w.WriteNumber("n_layer", c.NLayer)
        w.WriteNumber("n_head", c.NHead)
        w.WriteNumber("n_inner", c.NInner)
        w.WriteString("activation_function", Activation.hfName c.ActivationFunction)
        w.WriteNumber("resid_pdrop", c.ResidPdrop)
        w.WriteNumber("embd_pdrop", c.EmbdPdrop)
        w.WriteNumber("attn_pdrop", c.AttnPdrop)
        w.WriteNumber("layer_norm_epsilon", c.LayerNormEpsilon)
        w.WriteNumber("initializer_range", c.InitializerRange)
        w.WriteBoolean("scale_attn_weights", c.ScaleAttnWeights)
        w.WriteBoolean("tie_word_embeddings", c.TieWordEmbeddings)

    /// HF's GPT2PreTrainedModel._init_weights, drawn from the generator: Conv1D, Linear and Embedding
    /// weights from normal(0, initializer_range), except c_proj weights (attention and MLP) from
    /// normal(0, initializer_range / sqrt(2 * n_layer)); biases zero; LayerNorm weight one, bias zero.
    let initialize (config: Gpt2Config) (generator: torch.Generator) (model: CausalLmHead) =
        let std = config.InitializerRange
        let projectionStd = std / Math.Sqrt(2.0 * float config.NLayer)
        use _ = torch.no_grad ()
        for name, m in model.named_modules () do
            match m with
            | :? Conv1D as c ->
                let s = if name.EndsWith "c_proj" then projectionStd else std
                c.Weight.normal_(0.0, s, generator) |> ignore
                torch.nn.init.zeros_ c.Bias |> ignore
            | other -> HfInit.standard std generator other

    /// Builds GPT2LMHeadModel (a CausalLmHead over GPT2Model, registered as "transformer") for the
    /// config, initialized as HF does from a generator seeded with seed.
    let build (config: Gpt2Config) (seed: int64) : CausalLmHead =
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
        let model = new CausalLmHead("GPT2LMHeadModel", "transformer", transformer, lmHead)
        use generator = new torch.Generator(uint64 seed)
        initialize config generator model
        model
