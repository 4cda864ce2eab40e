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

    /// (B, T, C) -> (B, T, C).
    override this.forward(x) =
        use scope = torch.NewDisposeScope()
        let B, T, C = x.shape[0], x.shape[1], x.shape[2]
        let nh = int64 nHead
        let hs = C / nh
        let qkv = c_attn.forward x // (B, T, 3C)
        let heads (t: torch.Tensor) = t.view(B, T, nh, hs).transpose(1, 2) // (B, nh, T, hs)
        let q = heads (qkv.narrow(2, 0L, C))
        let k = heads (qkv.narrow(2, C, C))
        let v = heads (qkv.narrow(2, 2L * C, C))
        // SDPA always divides by sqrt(hs); without scale_attn_weights the scores stay unscaled.
        let q = if scaleAttnWeights then q else q * Math.Sqrt(float hs)
        let p = if this.training then attnPdrop else 0.0
        let y = torch.nn.functional.scaled_dot_product_attention(q, k, v, null, p, true) // (B, nh, T, hs)
        let y = y.transpose(1, 2).reshape(B, T, C) // (B, T, C)
        scope.MoveToOuter(resid_dropout.forward (c_proj.forward y))

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
        let h = c_fc.forward x // (B, T, n_inner)
        let h = Activation.apply activation h
        scope.MoveToOuter(dropout.forward (c_proj.forward h)) // (B, T, C)

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
        let h = x + attn.forward (ln_1.forward x)
        scope.MoveToOuter(h + mlp.forward (ln_2.forward h))

/// GPT2Model: token embedding (wte) plus learned position embedding (wpe), dropout, the blocks (h)
/// and a final LayerNorm (ln_f). Returns the last hidden states.
type Gpt2Model(wte: Embedding, wpe: Embedding, drop: Dropout, h: ModuleList<Gpt2Block>, ln_f: LayerNorm) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("GPT2Model")
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
    override _.forward(inputIds) =
        let T = inputIds.shape[1]
        let nPositions = wpe.weight.shape[0]
        if T > nPositions then
            invalidArg "inputIds" (sprintf "GPT-2 input has %d positions; the model has n_positions = %d" T nPositions)
        use scope = torch.NewDisposeScope()
        // A key/value cache would start the positions at the cached length.
        let positions = torch.arange(T, dtype = torch.int64, device = inputIds.device) // (T)
        let x = drop.forward (wte.forward inputIds + wpe.forward positions) // (B, T, C)
        let x = h |> Seq.fold (fun x block -> block.forward x) x
        scope.MoveToOuter(ln_f.forward x)

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

    /// input_ids (B, T) int64 -> logits (B, T, vocab_size).
    override _.forward(inputIds) =
        use hidden = transformer.forward inputIds // (B, T, C)
        match lmHead with
        | Some head -> head.forward hidden
        | None -> torch.nn.functional.linear(hidden, transformer.Wte.weight)

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
