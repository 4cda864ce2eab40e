namespace Functional.Models

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Functional

/// An activation function, named as in HF transformers' ACT2FN table.
[<RequireQualifiedAccess>]
type Activation =
    /// "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's default.
    | GeluNew
    /// "gelu_pytorch_tanh": the same tanh approximation as GeluNew.
    | GeluPytorchTanh
    /// "gelu_fast": the same tanh approximation as GeluNew, written with other constants.
    | GeluFast
    /// "gelu": the exact GELU, x Phi(x) with the normal CDF Phi (erf form).
    | Gelu
    /// "quick_gelu": x sigmoid(1.702 x).
    | QuickGelu
    /// "relu": max(x, 0).
    | Relu
    /// "silu" (alias "swish"): x sigmoid(x), LLaMA's default.
    | Silu
    /// "tanh".
    | Tanh

/// Names and evaluation of activation functions.
[<RequireQualifiedAccess>]
module Activation =

    /// The name HF writes in config.json for this activation.
    let hfName activation =
        match activation with
        | Activation.GeluNew -> "gelu_new"
        | Activation.GeluPytorchTanh -> "gelu_pytorch_tanh"
        | Activation.GeluFast -> "gelu_fast"
        | Activation.Gelu -> "gelu"
        | Activation.QuickGelu -> "quick_gelu"
        | Activation.Relu -> "relu"
        | Activation.Silu -> "silu"
        | Activation.Tanh -> "tanh"

    /// The activation an HF config name stands for ("swish" reads as Silu); None when unknown.
    let tryParse (name: string) =
        match name with
        | "gelu_new" -> Some Activation.GeluNew
        | "gelu_pytorch_tanh" -> Some Activation.GeluPytorchTanh
        | "gelu_fast" -> Some Activation.GeluFast
        | "gelu" -> Some Activation.Gelu
        | "quick_gelu" -> Some Activation.QuickGelu
        | "relu" -> Some Activation.Relu
        | "silu" | "swish" -> Some Activation.Silu
        | "tanh" -> Some Activation.Tanh
        | _ -> None

    /// The names tryParse accepts, for error messages.
    let supportedNames =
        [ "gelu_new"; "gelu_pytorch_tanh"; "gelu_fast"; "gelu"; "quick_gelu"; "relu"; "silu"; "swish"; "tanh" ]

    /// Applies the activation elementwise; returns a fresh tensor. The three tanh approximations of GELU
    /// are one function mathematically; they run as libtorch's fused gelu(approximate="tanh"), which
    /// agrees with HF's explicit formula to float rounding and needs no intermediate tensors.
    let apply activation (x: torch.Tensor) : torch.Tensor =
        match activation with
        | Activation.GeluNew
        | Activation.GeluPytorchTanh
        | Activation.GeluFast -> torch.nn.functional.gelu(x, TorchSharp.Modules.GELU.Approximate.tanh)
        | Activation.Gelu -> torch.nn.functional.gelu x
        | Activation.QuickGelu ->
            use s = torch.sigmoid(x * 1.702)
            x * s
        | Activation.Relu -> torch.nn.functional.relu x
        | Activation.Silu -> torch.nn.functional.silu x
        | Activation.Tanh -> torch.tanh x

/// The fields of an HF GPT2Config that GPT2LMHeadModel's forward pass and initialization use.
/// Each field names its config.json key; defaults are HF's.
type Gpt2Config =
    { /// "vocab_size" (required).
      VocabSize: int
      /// "n_positions" (required): the longest sequence the position embedding covers.
      NPositions: int
      /// "n_embd" (required): the width of the residual stream.
      NEmbd: int
      /// "n_layer" (required): the number of transformer blocks.
      NLayer: int
      /// "n_head" (required): attention heads; must divide NEmbd.
      NHead: int
      /// "n_inner": the MLP's hidden width; null or absent means 4 * NEmbd.
      NInner: int
      /// "activation_function" (default "gelu_new").
      ActivationFunction: Activation
      /// "resid_pdrop" (default 0.1): dropout after each attention and MLP output projection.
      ResidPdrop: float
      /// "embd_pdrop" (default 0.1): dropout on the summed token and position embeddings.
      EmbdPdrop: float
      /// "attn_pdrop" (default 0.1): dropout on the attention probabilities.
      AttnPdrop: float
      /// "layer_norm_epsilon" (default 1e-5).
      LayerNormEpsilon: float
      /// "initializer_range" (default 0.02): the standard deviation of the normal initialization.
      InitializerRange: float
      /// "scale_attn_weights" (default true): divide attention scores by sqrt(head_dim).
      ScaleAttnWeights: bool
      /// "tie_word_embeddings" (default true): the LM head reuses the token embedding matrix.
      TieWordEmbeddings: bool }

/// What sets a LLaMA-shaped family apart (HF's LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
/// MistralForCausalLM share the layout and the parameter names): read from config.json's model_type.
type LlamaVariant =
    { /// config.json's "model_type": "llama", "qwen2", "qwen3" or "mistral".
      ModelType: string
      /// The HF class config.json's "architectures" names: "LlamaForCausalLM", ...
      Architecture: string
      /// Biases on the q, k and v projections regardless of attention_bias (Qwen2).
      QkvBias: bool
      /// A bias on the o projection regardless of attention_bias (none of the variants so far).
      OutputBias: bool
      /// "sliding_window" (Mistral): each query sees this many keys, its own included; None for all.
      SlidingWindow: int option
      /// Per-head RMSNorms q_norm and k_norm (weight of size head_dim, eps rms_norm_eps) on the queries and
      /// keys before the rotary embedding (Qwen3).
      QkNorm: bool }

/// The LLaMA variants.
[<RequireQualifiedAccess>]
module LlamaVariant =

    /// LLaMA: biases only as attention_bias says, no window.
    let llama =
        { ModelType = "llama"; Architecture = "LlamaForCausalLM"; QkvBias = false; OutputBias = false; SlidingWindow = None; QkNorm = false }

    /// Qwen2: q, k and v always biased, o_proj never (HF's Qwen2Attention).
    let qwen2 =
        { ModelType = "qwen2"; Architecture = "Qwen2ForCausalLM"; QkvBias = true; OutputBias = false; SlidingWindow = None; QkNorm = false }

    /// Qwen3: per-head q_norm and k_norm before the rotary embedding; biases as attention_bias says
    /// (HF's Qwen3Attention).
    let qwen3 =
        { ModelType = "qwen3"; Architecture = "Qwen3ForCausalLM"; QkvBias = false; OutputBias = false; SlidingWindow = None; QkNorm = true }

    /// Mistral with the given sliding window (None: every key).
    let mistral (window: int option) =
        { ModelType = "mistral"; Architecture = "MistralForCausalLM"; QkvBias = false; OutputBias = false; SlidingWindow = window; QkNorm = false }

/// The fields of an HF LlamaConfig that LlamaForCausalLM's forward pass and initialization use.
/// Each field names its config.json key; defaults are HF's.
type LlamaConfig =
    { /// "vocab_size" (required).
      VocabSize: int
      /// "hidden_size" (required): the width of the residual stream.
      HiddenSize: int
      /// "intermediate_size" (required): the SwiGLU MLP's hidden width.
      IntermediateSize: int
      /// "num_hidden_layers" (required): the number of decoder layers.
      NumHiddenLayers: int
      /// "num_attention_heads" (required): query heads.
      NumAttentionHeads: int
      /// "num_key_value_heads": key/value heads for grouped-query attention; must divide
      /// NumAttentionHeads. Null means NumAttentionHeads; absent means HF's default of the variant:
      /// NumAttentionHeads (llama), 32 (qwen2, qwen3), 8 (mistral).
      NumKeyValueHeads: int
      /// "head_dim": the width of one head (default HiddenSize / NumAttentionHeads; 128 for qwen3, as HF's
      /// Qwen3Config); must be even.
      HeadDim: int
      /// "hidden_act" (default "silu"): the activation of the MLP's gate.
      HiddenAct: Activation
      /// "max_position_embeddings" (default 2048): the longest sequence the model was built for.
      MaxPositionEmbeddings: int
      /// "rms_norm_eps" (default 1e-6).
      RmsNormEps: float
      /// "rope_theta" (default 10000): the base of the rotary embedding frequencies.
      RopeTheta: float
      /// "initializer_range" (default 0.02): the standard deviation of the normal initialization.
      InitializerRange: float
      /// "tie_word_embeddings" (default false): the LM head reuses the token embedding matrix.
      TieWordEmbeddings: bool
      /// "attention_bias" (default false; read for llama and qwen3): biases on the q, k, v and o projections.
      AttentionBias: bool
      /// "mlp_bias" (default false): biases on the gate, up and down projections.
      MlpBias: bool
      /// "attention_dropout" (default 0): dropout on the attention probabilities.
      AttentionDropout: float
      /// "pad_token_id" (default null): the embedding row HF's nn.Embedding(padding_idx) keeps at zero
      /// and never updates.
      PadTokenId: int option
      /// The family variant (model_type "llama", "qwen2", "qwen3", "mistral"), see LlamaVariant.
      Variant: LlamaVariant }

/// The fields of an HF BloomConfig that BloomForCausalLM's forward pass and initialization use.
/// Each field names its config.json key; defaults are HF's (BloomConfig's constructor defaults).
type BloomConfig =
    { /// "vocab_size" (default 250880).
      VocabSize: int
      /// "hidden_size" (default 64), or the legacy "n_embed", which takes precedence as in HF: the width
      /// of the residual stream; the MLP's inner width is 4 * HiddenSize.
      HiddenSize: int
      /// "n_layer" (alias "num_hidden_layers", default 2): the number of BLOOM blocks.
      NLayer: int
      /// "n_head" (alias "num_attention_heads", default 8): attention heads; must divide HiddenSize. Any
      /// count works, ALiBi's slopes follow HF's rule for counts that are not a power of two.
      NHead: int
      /// "layer_norm_epsilon" (default 1e-5).
      LayerNormEpsilon: float
      /// "initializer_range" (default 0.02): the standard deviation of the normal initialization.
      InitializerRange: float
      /// "apply_residual_connection_post_layernorm" (default false): each sublayer's residual is the
      /// output of the layer norm before it instead of the sublayer's input.
      ApplyResidualConnectionPostLayernorm: bool
      /// "hidden_dropout" (default 0): dropout on the attention and MLP outputs before the residual add.
      HiddenDropout: float
      /// "attention_dropout" (default 0): dropout on the attention probabilities.
      AttentionDropout: float
      /// "pretraining_tp" (default 1): the tensor-parallel degree BLOOM was trained with; without
      /// slow_but_exact it does not change the computation and is only kept for the written config.
      PretrainingTp: int
      /// "seq_length" (not a BloomConfig field; read when a config carries it, default 2048, BLOOM's
      /// training context; written back only when it is not 2048): the longest sequence runs default to.
      /// ALiBi itself has no position table.
      SeqLength: int
      /// "tie_word_embeddings" (default true): the LM head reuses the word embedding matrix.
      TieWordEmbeddings: bool
      /// "pad_token_id" (default null; bloom-560m's is 3): BLOOM's embedding has no padding row, so it
      /// changes no computation; sequence classification pools at the last token that is not it, and it
      /// is written back so that a saved config keeps it.
      PadTokenId: int option }
/// The fields of an HF OPTConfig that OPTForCausalLM's forward pass and initialization use.
/// Each field names its config.json key; defaults are HF's.
type OptConfig =
    { /// "vocab_size" (required).
      VocabSize: int
      /// "hidden_size" (required): the width of the residual stream.
      HiddenSize: int
      /// "num_hidden_layers" (required): the number of decoder layers.
      NumHiddenLayers: int
      /// "num_attention_heads" (required): attention heads; must divide HiddenSize.
      NumAttentionHeads: int
      /// "ffn_dim" (required): the MLP's hidden width (fc1's output).
      FfnDim: int
      /// "max_position_embeddings" (default 2048): the learned position table has this many rows plus
      /// HF's offset of 2 (position p reads row p + 2).
      MaxPositionEmbeddings: int
      /// "word_embed_proj_dim" (default HiddenSize): the width of the token embedding and of the LM head;
      /// when it differs from HiddenSize, project_in and project_out (no bias) map between the two.
      WordEmbedProjDim: int
      /// "do_layer_norm_before" (default true): pre-norm layers (125m, 1.3b, ...); false gives opt-350m's
      /// post-norm layers (a LayerNorm after each residual addition) and no final LayerNorm.
      DoLayerNormBefore: bool
      /// "_remove_final_layer_norm" (default false): drops the decoder's final LayerNorm of a pre-norm model.
      RemoveFinalLayerNorm: bool
      /// "activation_function" (default "relu"): the activation between fc1 and fc2.
      ActivationFunction: Activation
      /// "dropout" (default 0.1): dropout after the attention's out_proj and after fc2 (training only).
      Dropout: float
      /// "attention_dropout" (default 0): dropout on the attention probabilities (training only).
      AttentionDropout: float
      /// "activation_dropout" (default 0): kept for the round trip only; HF's OPT layers never apply it.
      ActivationDropout: float
      /// "init_std" (default 0.02): the standard deviation of the normal initialization.
      InitStd: float
      /// "enable_bias" (default true): biases on the attention projections and on fc1 and fc2.
      EnableBias: bool
      /// "layer_norm_elementwise_affine" (default true): LayerNorms with a weight and a bias.
      LayerNormElementwiseAffine: bool
      /// "tie_word_embeddings" (default true): the LM head reuses the token embedding matrix.
      TieWordEmbeddings: bool
      /// "pad_token_id" (default 1, null for none): the token embedding row HF's nn.Embedding(padding_idx)
      /// initializes to zero and never updates.
      PadTokenId: int option }

/// A model's architecture, as read from an HF config.json; "model_type" picks the case. The matches on
/// it live in Models/ only: parsing and writing (Family.fs) and the family traits (ModelFamily.traits).
type ModelConfig =
    /// "model_type": "gpt2" (GPT2LMHeadModel).
    | Gpt2 of Gpt2Config
    /// "model_type": "llama", "qwen2", "qwen3" or "mistral" (LlamaForCausalLM and its variants).
    | Llama of LlamaConfig
    /// "model_type": "bloom" (BloomForCausalLM).
    | Bloom of BloomConfig
    /// "model_type": "opt" (OPTForCausalLM).
    | Opt of OptConfig

/// Reading the fields of HF config.json objects.
[<RequireQualifiedAccess>]
module ConfigJson =

    /// How a JSON value reads in error messages: its kind and its first 40 characters.
    let describe (element: JsonElement) =
        let raw = element.GetRawText()
        let shown = if raw.Length > 40 then raw.Substring(0, 40) + "..." else raw
        match element.ValueKind with
        | JsonValueKind.String -> sprintf "the string %s" shown
        | JsonValueKind.Number -> sprintf "the number %s" shown
        | JsonValueKind.True
        | JsonValueKind.False -> sprintf "the boolean %s" shown
        | JsonValueKind.Object -> sprintf "the object %s" shown
        | JsonValueKind.Array -> sprintf "the array %s" shown
        | _ -> shown

    /// The fields of one config.json object, with the file name for error messages.
    type Reader(origin: string, root: JsonElement) =

        /// Raises InvalidInputException naming the file and the field.
        member _.Fail (field: string) (problem: string) : 'T = InvalidInput.fail origin field problem

        /// Whether the field is present (null included).
        member _.Has(field: string) = fst (root.TryGetProperty field)

        /// The field's value; None when absent or null (HF treats both as "use the default").
        member _.TryGet(field: string) =
            match root.TryGetProperty field with
            | true, v when v.ValueKind <> JsonValueKind.Null -> Some v
            | _ -> None

        /// The field as an integer; fallback when absent or null (None: the field is required).
        member r.Int (field: string) (fallback: int option) =
            match r.TryGet field, fallback with
            | Some v, _ when v.ValueKind = JsonValueKind.Number && fst (v.TryGetInt32()) -> v.GetInt32()
            | Some v, _ -> r.Fail field (sprintf "expected an integer, found %s" (describe v))
            | None, Some d -> d
            | None, None -> r.Fail field "required field is missing"

        /// The field as a number; fallback when absent or null.
        member r.Float (field: string) (fallback: float) =
            match r.TryGet field with
            | Some v when v.ValueKind = JsonValueKind.Number -> v.GetDouble()
            | Some v -> r.Fail field (sprintf "expected a number, found %s" (describe v))
            | None -> fallback

        /// The field as true or false; fallback when absent or null.
        member r.Bool (field: string) (fallback: bool) =
            match r.TryGet field with
            | Some v when v.ValueKind = JsonValueKind.True -> true
            | Some v when v.ValueKind = JsonValueKind.False -> false
            | Some v -> r.Fail field (sprintf "expected true or false, found %s" (describe v))
            | None -> fallback

        /// The field as a string; None when absent or null.
        member r.String (field: string) =
            match r.TryGet field with
            | Some v when v.ValueKind = JsonValueKind.String -> Some(v.GetString())
            | Some v -> r.Fail field (sprintf "expected a string, found %s" (describe v))
            | None -> None

        /// The field as an activation name (Activation.tryParse); fallback when absent or null.
        member r.Activation (field: string) (fallback: Activation) =
            match r.String field with
            | None -> fallback
            | Some name ->
                match Activation.tryParse name with
                | Some a -> a
                | None ->
                    r.Fail field (sprintf "unsupported activation \"%s\"; expected one of %s"
                                      name (String.Join(", ", Activation.supportedNames)))

        /// The field as a token id of a vocabulary of vocabSize tokens; None when absent or null (pad_token_id:
        /// HF's default of most configs); an id outside [0, vocabSize) raises naming the field.
        member r.TokenId (field: string) (vocabSize: int) : int option =
            match r.TryGet field with
            | Some _ ->
                let id = r.Int field None
                if id < 0 || id >= vocabSize then
                    r.Fail field (sprintf "expected a token id in [0, %d), found %d" vocabSize id)
                Some id
            | None -> None

        /// value when it is a positive integer; raises naming the field otherwise.
        member r.Positive (field: string) (value: int) =
            if value <= 0 then r.Fail field (sprintf "expected a positive integer, found %d" value)
            value

        /// value when it is a dropout probability in [0, 1); raises naming the field otherwise.
        member r.Probability (field: string) (value: float) =
            if not (value >= 0.0 && value < 1.0) then
                r.Fail field (sprintf "expected a dropout probability in [0, 1), found %g" value)
            value

        /// value when it is a positive finite number; raises naming the field otherwise.
        member r.PositiveFloat (field: string) (value: float) =
            if not (value > 0.0 && Double.IsFinite value) then
                r.Fail field (sprintf "expected a positive number, found %g" value)
            value

        /// value when it is a non-negative finite number; raises naming the field otherwise.
        member r.NonNegativeFloat (field: string) (value: float) =
            if not (value >= 0.0 && Double.IsFinite value) then
                r.Fail field (sprintf "expected a non-negative number, found %g" value)
            value

        /// Fails when a switch for an architecture variant we do not build is on.
        member r.Unsupported (field: string) =
            if r.Bool field false then r.Fail field "true is not supported yet; expected false or absent"
