namespace Functional.Models

open TorchSharp
open TorchSharp.Modules
open Functional.Runtime

/// A model whose inputs follow positions of its own (prefix tuning's virtual tokens, see
/// Peft.PrefixTuning): the first token's position is PrefixLength, which counts against GPT-2's
/// n_positions.
type IPrefixedModel =
    /// The number of positions before the first token.
    abstract PrefixLength: int

/// A causal language model of any supported family, with what the trainer and the checkpoint code
/// need to know about its parameter names.
[<NoEquality; NoComparison>]
type CausalLm =
    { /// The architecture.
      Config: ModelConfig
      /// input_ids (B, T) int64 -> logits (B, T, vocab_size) fp32. No attention mask: with right padding
      /// and causal attention, real tokens never attend to padding.
      Module: torch.nn.Module<torch.Tensor, torch.Tensor>
      /// The prefix of the base model's names inside the LM-head model: "transformer." (GPT-2) or
      /// "model." (LLaMA). Checkpoints of the bare base model lack it.
      BasePrefix: string
      /// Suffixes of buffers HF checkpoints may hold that this model does not (GPT-2's causal-mask
      /// buffers ".attn.bias" and ".attn.masked_bias", LLaMA's ".rotary_emb.inv_freq"); loaders skip them.
      IgnoredBufferSuffixes: string list
      /// State-dict keys that alias another parameter and that save_pretrained leaves out:
      /// ["lm_head.weight"] when the head is tied to the token embedding, else [].
      TiedKeys: string list
      /// Parameters exempt from weight decay: every bias and every LayerNorm/RMSNorm weight, the rule of
      /// HF Trainer's get_decay_parameter_names and DeepSpeed-Chat.
      NoWeightDecay: Set<string> }

/// Creating causal language models and describing their parameters.
[<RequireQualifiedAccess>]
module CausalLm =

    /// Names of the parameters that belong to normalization layers (LayerNorm, any INormalization such
    /// as RMSNorm) or are biases.
    let private noWeightDecay (model: torch.nn.Module) =
        let normParameters =
            [ for moduleName, m in model.named_modules () do
                  match box m with
                  | :? LayerNorm
                  | :? INormalization ->
                      for name, _ in m.named_parameters () do
                          yield moduleName + "." + name
                  | _ -> () ]
        let biases =
            [ for name, _ in model.named_parameters () do
                  if name = "bias" || name.EndsWith ".bias" then yield name ]
        Set.ofList (normParameters @ biases)

    /// Wraps a module over the config's family (a causal LM or another head over the same backbone,
    /// such as SequenceClassifierHead) with the family's names (ModelFamily.traits) and the module's
    /// weight-decay exemptions; extraTiedKeys are further checkpoint keys loaders skip (a classifier
    /// built from a causal-LM checkpoint skips its lm_head.weight).
    let ofModule (config: ModelConfig) (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (extraTiedKeys: string list) : CausalLm =
        let traits = ModelFamily.traits config
        { Config = config
          Module = model
          BasePrefix = traits.BasePrefix
          IgnoredBufferSuffixes = traits.IgnoredBufferSuffixes
          TiedKeys = List.distinct (traits.TiedKeys @ extraTiedKeys)
          NoWeightDecay = noWeightDecay model }

    /// Builds the model the config describes (ModelFamily.build), with HF's initialization drawn from a
    /// generator seeded with seed (the same seed gives the same weights); names as ModelFamily.traits says.
    let create (config: ModelConfig) (seed: int64) : CausalLm =
        TorchRuntime.ensure ()
        let traits = ModelFamily.traits config
        let lm = ModelFamily.build config seed :> torch.nn.Module<torch.Tensor, torch.Tensor>
        { Config = config
          Module = lm
          BasePrefix = traits.BasePrefix
          IgnoredBufferSuffixes = traits.IgnoredBufferSuffixes
          TiedKeys = traits.TiedKeys
          NoWeightDecay = noWeightDecay lm }

    /// The parameters' names and shapes, in named_parameters() order (each tensor once: a tied head
    /// does not appear).
    let parameterSpec (lm: CausalLm) : (string * int64[]) list =
        [ for name, p in lm.Module.named_parameters () -> name, p.shape ]

    /// The positions the model puts before its inputs (IPrefixedModel.PrefixLength); 0 for a plain model.
    let prefixLength (lm: CausalLm) : int =
        match box lm.Module with
        | :? IPrefixedModel as prefixed -> prefixed.PrefixLength
        | _ -> 0

    let private decoder (lm: CausalLm) =
        match box lm.Module with
        | :? IIncrementalDecoder as d -> d
        | _ -> invalidArg "lm" (sprintf "the %s module has no key/value cache path" (lm.Module.GetName()))

    /// Incremental forward with a key/value cache, as HF's forward with past_key_values: input_ids
    /// (B, T_new) int64; attention_mask (B, T_past + T_new) of 0/1 over the cached and the new positions
    /// (0 marks left padding); the cache of the T_past earlier positions, None for the first call ->
    /// logits (B, T_new, vocab_size) and the cache of all T_past + T_new positions. Positions are
    /// cumsum(attention_mask) - 1, so a left-padded row equals the same prompt run alone; padded keys are
    /// masked and the new positions attend causally. Each call costs only its new positions. Returns
    /// fresh tensors (the caller disposes the new cache) and leaves the given cache untouched. Without
    /// padding and cache, the logits equal Module.forward's. Meant for eval mode: dropout is active in
    /// training mode as in forward.
    let forwardCached (lm: CausalLm) (inputIds: torch.Tensor) (attentionMask: torch.Tensor) (cache: KvCache option) : torch.Tensor * KvCache =
        (decoder lm).ForwardCached(inputIds, attentionMask, cache, false)

    /// forwardCached, computing the logits of the last new position only: (B, vocab_size) and the cache
    /// of all positions. The LM head then runs on one position per row (what generation needs).
    let nextTokenLogits (lm: CausalLm) (inputIds: torch.Tensor) (attentionMask: torch.Tensor) (cache: KvCache option) : torch.Tensor * KvCache =
        let logits, newCache = (decoder lm).ForwardCached(inputIds, attentionMask, cache, true) // (B, 1, V)
        use logits = logits
        logits.squeeze 1L, newCache

    /// Whether the model trains on rows packed in isolation (its module is an IPackedCausalLm: every
    /// family's causal LM, LoRA included; not a prefix-tuned model or a classifier head).
    let supportsIsolatedPacking (lm: CausalLm) : bool =
        match box lm.Module with
        | :? IPackedCausalLm -> true
        | _ -> false

    /// The forward of rows that pack several samples in isolation: input_ids, position_ids (restarting
    /// at every sample) and segment_ids (one id per sample, padding its own), each (B, T) int64 ->
    /// logits (B, T, vocab_size), each sample's as if it ran alone (IPackedCausalLm.ForwardPacked).
    /// Raises InvalidInputException naming packing_attention for a model without a packed forward.
    let forwardPacked (lm: CausalLm) (inputIds: torch.Tensor) (positionIds: torch.Tensor) (segmentIds: torch.Tensor) : torch.Tensor =
        match box lm.Module with
        | :? IPackedCausalLm as packed -> packed.ForwardPacked(inputIds, positionIds, segmentIds)
        | _ ->
            Functional.InvalidInput.setting "packing_attention"
                (sprintf "the %s module has no packed forward: isolated packing needs a plain causal LM (not prefix tuning); use {packing_attention} cross or no {packing}" (lm.Module.GetName()))

    /// Switches activation checkpointing (HF's gradient_checkpointing_enable / _disable, PaddleNLP's
    /// recompute) on or off: in training mode with gradients enabled, each transformer block keeps only its
    /// input and is recomputed in backward (see ActivationCheckpointing.run). Losses and gradients are
    /// unchanged (dropout draws the same masks); activation memory drops for one extra forward per block.
    /// Eval mode, no_grad and the key/value-cache path run blocks plainly. Off after create.
    let setGradientCheckpointing (lm: CausalLm) (enabled: bool) : unit =
        ActivationCheckpointing.enable lm.Module enabled

    /// Whether activation checkpointing is on (see setGradientCheckpointing).
    let gradientCheckpointing (lm: CausalLm) : bool =
        ActivationCheckpointing.isEnabled lm.Module
