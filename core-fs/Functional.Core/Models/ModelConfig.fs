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
      /// "num_key_value_heads": key/value heads for grouped-query attention (default NumAttentionHeads);
      /// must divide NumAttentionHeads.
      NumKeyValueHeads: int
      /// "head_dim": the width of one head (default HiddenSize / NumAttentionHeads); must be even.
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
      /// "attention_bias" (default false): biases on the q, k, v and o projections.
      AttentionBias: bool
      /// "mlp_bias" (default false): biases on the gate, up and down projections.
      MlpBias: bool
      /// "attention_dropout" (default 0): dropout on the attention probabilities.
      AttentionDropout: float
      /// "pad_token_id" (default null): the embedding row HF's nn.Embedding(padding_idx) keeps at zero
      /// and never updates.
      PadTokenId: int option }

/// A model's architecture, as read from an HF config.json; "model_type" picks the case.
type ModelConfig =
    /// "model_type": "gpt2" (GPT2LMHeadModel).
    | Gpt2 of Gpt2Config
    /// "model_type": "llama" (LlamaForCausalLM).
    | Llama of LlamaConfig

/// Reading and writing HF config.json files.
[<RequireQualifiedAccess>]
module ModelConfig =

    let private describe (element: JsonElement) =
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
    type private Reader(origin: string, root: JsonElement) =

        member _.Fail (field: string) (problem: string) : 'T = InvalidInput.fail origin field problem

        /// The field's value; None when absent or null (HF treats both as "use the default").
        member _.TryGet(field: string) =
            match root.TryGetProperty field with
            | true, v when v.ValueKind <> JsonValueKind.Null -> Some v
            | _ -> None

        member r.Int (field: string) (fallback: int option) =
            match r.TryGet field, fallback with
            | Some v, _ when v.ValueKind = JsonValueKind.Number && fst (v.TryGetInt32()) -> v.GetInt32()
            | Some v, _ -> r.Fail field (sprintf "expected an integer, found %s" (describe v))
            | None, Some d -> d
            | None, None -> r.Fail field "required field is missing"

        member r.Float (field: string) (fallback: float) =
            match r.TryGet field with
            | Some v when v.ValueKind = JsonValueKind.Number -> v.GetDouble()
            | Some v -> r.Fail field (sprintf "expected a number, found %s" (describe v))
            | None -> fallback

        member r.Bool (field: string) (fallback: bool) =
            match r.TryGet field with
            | Some v when v.ValueKind = JsonValueKind.True -> true
            | Some v when v.ValueKind = JsonValueKind.False -> false
            | Some v -> r.Fail field (sprintf "expected true or false, found %s" (describe v))
            | None -> fallback

        member r.String (field: string) =
            match r.TryGet field with
            | Some v when v.ValueKind = JsonValueKind.String -> Some(v.GetString())
            | Some v -> r.Fail field (sprintf "expected a string, found %s" (describe v))
            | None -> None

        member r.Activation (field: string) (fallback: Activation) =
            match r.String field with
            | None -> fallback
            | Some name ->
                match Activation.tryParse name with
                | Some a -> a
                | None ->
                    r.Fail field (sprintf "unsupported activation \"%s\"; expected one of %s"
                                      name (String.Join(", ", Activation.supportedNames)))

        member r.Positive (field: string) (value: int) =
            if value <= 0 then r.Fail field (sprintf "expected a positive integer, found %d" value)
            value

        member r.Probability (field: string) (value: float) =
            if not (value >= 0.0 && value < 1.0) then
                r.Fail field (sprintf "expected a dropout probability in [0, 1), found %g" value)
            value

        member r.PositiveFloat (field: string) (value: float) =
            if not (value > 0.0 && Double.IsFinite value) then
                r.Fail field (sprintf "expected a positive number, found %g" value)
            value

        member r.NonNegativeFloat (field: string) (value: float) =
            if not (value >= 0.0 && Double.IsFinite value) then
                r.Fail field (sprintf "expected a non-negative number, found %g" value)
            value

        /// Fails when a switch for an architecture variant we do not build is on.
        member r.Unsupported (field: string) =
            if r.Bool field false then r.Fail field "true is not supported yet; expected false or absent"

    let private readGpt2 (r: Reader) =
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

    /// rope_theta, from the top level (transformers 4.x) or from "rope_parameters" (5.x). Only the
    /// default rotary embedding is built: any rope_scaling, or another rope_type, is refused.
    let private readRopeTheta (r: Reader) =
        match r.TryGet "rope_scaling" with
        | Some v -> r.Fail "rope_scaling" (sprintf "RoPE scaling is not supported yet; expected null, found %s" (describe v))
        | None -> ()
        match r.TryGet "rope_parameters" with
        | Some p when p.ValueKind = JsonValueKind.Object ->
            let ropeType =
                match p.TryGetProperty "rope_type" with
                | true, t when t.ValueKind = JsonValueKind.String -> t.GetString()
                | true, t when t.ValueKind <> JsonValueKind.Null -> r.Fail "rope_parameters.rope_type" (sprintf "expected a string, found %s" (describe t))
                | _ -> "default"
            if ropeType <> "default" then
                r.Fail "rope_parameters.rope_type" (sprintf "RoPE type \"%s\" is not supported yet; expected \"default\"" ropeType)
            match p.TryGetProperty "rope_theta" with
            | true, t when t.ValueKind = JsonValueKind.Number -> t.GetDouble()
            | true, t when t.ValueKind <> JsonValueKind.Null -> r.Fail "rope_parameters.rope_theta" (sprintf "expected a number, found %s" (describe t))
            | _ -> r.Float "rope_theta" 10000.0
        | Some p -> r.Fail "rope_parameters" (sprintf "expected an object, found %s" (describe p))
        | None -> r.Float "rope_theta" 10000.0

    let private readLlama (r: Reader) =
        let vocabSize = r.Int "vocab_size" None |> r.Positive "vocab_size"
        let hidden = r.Int "hidden_size" None |> r.Positive "hidden_size"
        let heads = r.Int "num_attention_heads" None |> r.Positive "num_attention_heads"
        let kvHeads = r.Int "num_key_value_heads" (Some heads) |> r.Positive "num_key_value_heads"
        if heads % kvHeads <> 0 then
            r.Fail "num_key_value_heads"
                (sprintf "num_attention_heads (%d) must be divisible by num_key_value_heads (%d)" heads kvHeads)
        let headDim =
            match r.TryGet "head_dim" with
            | Some _ -> r.Int "head_dim" None |> r.Positive "head_dim"
            | None when hidden % heads = 0 -> hidden / heads
            | None ->
                r.Fail "num_attention_heads"
                    (sprintf "hidden_size (%d) must be divisible by num_attention_heads (%d) when head_dim is absent" hidden heads)
        if headDim % 2 <> 0 then
            r.Fail "head_dim" (sprintf "rotary embeddings need an even head dimension, found %d" headDim)
        let padTokenId =
            match r.TryGet "pad_token_id" with
            | Some _ ->
                let id = r.Int "pad_token_id" None
                if id < 0 || id >= vocabSize then
                    r.Fail "pad_token_id" (sprintf "expected a token id in [0, %d), found %d" vocabSize id)
                Some id
            | None -> None
        { VocabSize = vocabSize
          HiddenSize = hidden
          IntermediateSize = r.Int "intermediate_size" None |> r.Positive "intermediate_size"
          NumHiddenLayers = r.Int "num_hidden_layers" None |> r.Positive "num_hidden_layers"
          NumAttentionHeads = heads
          NumKeyValueHeads = kvHeads
          HeadDim = headDim
          HiddenAct = r.Activation "hidden_act" Activation.Silu
          MaxPositionEmbeddings = r.Int "max_position_embeddings" (Some 2048) |> r.Positive "max_position_embeddings"
          RmsNormEps = r.Float "rms_norm_eps" 1e-6 |> r.PositiveFloat "rms_norm_eps"
          RopeTheta = readRopeTheta r |> r.PositiveFloat "rope_theta"
          InitializerRange = r.Float "initializer_range" 0.02 |> r.NonNegativeFloat "initializer_range"
          TieWordEmbeddings = r.Bool "tie_word_embeddings" false
          AttentionBias = r.Bool "attention_bias" false
          MlpBias = r.Bool "mlp_bias" false
          AttentionDropout = r.Float "attention_dropout" 0.0 |> r.Probability "attention_dropout"
          PadTokenId = padTokenId }

    /// Parses the text of an HF config.json; origin names the source in error messages.
    /// Fields we do not use are ignored. Raises InvalidInputException naming the field at fault
    /// (or the line, for malformed JSON).
    let parse (origin: string) (json: string) : ModelConfig =
        let document =
            try
                JsonDocument.Parse(json, JsonDocumentOptions(CommentHandling = JsonCommentHandling.Skip))
            with :? JsonException as e ->
                let line = if e.LineNumber.HasValue then sprintf "line %d" (e.LineNumber.Value + 1L) else ""
                InvalidInput.fail origin line (sprintf "invalid JSON: %s" e.Message)
        use document = document
        let root = document.RootElement
        if root.ValueKind <> JsonValueKind.Object then
            InvalidInput.fail origin "" (sprintf "expected a JSON object, found %s" (describe root))
        let r = Reader(origin, root)
        match r.String "model_type" with
        | Some "gpt2" -> Gpt2(readGpt2 r)
        | Some "llama" -> Llama(readLlama r)
        | Some other -> r.Fail "model_type" (sprintf "unsupported model type \"%s\"; expected \"gpt2\" or \"llama\"" other)
        | None -> r.Fail "model_type" "required field is missing; expected \"gpt2\" or \"llama\""

    /// Reads and parses an HF config.json file.
    let load (path: string) : ModelConfig =
        if Directory.Exists path then InvalidInput.fail path "" "is a folder; expected the model's config.json file"
        let text =
            try
                File.ReadAllText path
            with
            | :? FileNotFoundException
            | :? DirectoryNotFoundException -> InvalidInput.fail path "" "file not found"
            | :? IOException
            | :? UnauthorizedAccessException as e -> InvalidInput.fail path "" (sprintf "cannot read the file: %s" e.Message)
        parse path text

    /// Writes a config.json that HF transformers loads as the same architecture (GPT2LMHeadModel or
    /// LlamaForCausalLM, torch_dtype float32); parse reads it back to an equal value.
    let toJson (config: ModelConfig) : string =
        use stream = new MemoryStream()
        do
            use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
            w.WriteStartObject()
            let architectures (name: string) =
                w.WriteStartArray "architectures"
                w.WriteStringValue name
                w.WriteEndArray()
            match config with
            | Gpt2 c ->
                architectures "GPT2LMHeadModel"
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
            | Llama c ->
                architectures "LlamaForCausalLM"
                w.WriteString("model_type", "llama")
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
                w.WriteBoolean("attention_bias", c.AttentionBias)
                w.WriteBoolean("mlp_bias", c.MlpBias)
                w.WriteNumber("attention_dropout", c.AttentionDropout)
                match c.PadTokenId with
                | Some id -> w.WriteNumber("pad_token_id", id)
                | None -> w.WriteNull "pad_token_id"
            w.WriteString("torch_dtype", "float32")
            w.WriteEndObject()
        Encoding.UTF8.GetString(stream.ToArray()) + "\n"

    /// The vocabulary size: the width of the logits.
    let vocabSize (config: ModelConfig) =
        match config with
        | Gpt2 c -> c.VocabSize
        | Llama c -> c.VocabSize

    /// The longest sequence the model was built for (n_positions, max_position_embeddings). GPT-2's learned
    /// positions end there; LLaMA's rotary positions do not, but max_position_embeddings is the context it
    /// was trained for, and HF's generation warns past it: both are treated as a hard limit here.
    let contextLength (config: ModelConfig) =
        match config with
        | Gpt2 c -> c.NPositions
        | Llama c -> c.MaxPositionEmbeddings

    /// The config.json field that holds contextLength ("n_positions", "max_position_embeddings"), for messages.
    let contextField (config: ModelConfig) =
        match config with
        | Gpt2 _ -> "n_positions"
        | Llama _ -> "max_position_embeddings"
