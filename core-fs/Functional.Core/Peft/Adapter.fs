namespace Functional.Peft

open System
open System.Globalization
open TorchSharp.Modules
open Functional.Models

/// What an adapter attaches to the bf16/fp16 compute copy of its base model: the low-precision
/// counterparts of what it attached to the fp32 model. The attach function receives the copy of the base
/// model (same architecture, the compute dtype) and returns the model forward and backward run on.
[<NoEquality; NoComparison>]
type ComputeAttachment =
    { /// The model forward and backward run on: the copy itself, or a module wrapping it.
      Model: CausalLm
      /// The attached parameters, under the names the fp32 ones have in the trainer's parameter list
      /// (each then aliases its slice of the copy's flat buffers).
      Parameters: (string * Parameter) list
      /// Removes what was attached (hooks, wrappers) and frees its tensors; called once, when the compute
      /// copy is released.
      Release: unit -> unit }

/// One parameter-efficient adapter on a causal LM (LoRA, prefix tuning), as a fine-tuning job sees it:
/// what trains, how it is saved and loaded in PEFT's folder format, how it follows the model onto a
/// mixed-precision compute copy, and the text a checkpoint's signature records for it.
[<NoEquality; NoComparison>]
type Adapter =
    { /// PEFT's peft_type: "LORA", "PREFIX_TUNING".
      Kind: string
      /// The model with the adapter: what trains, evaluates and generates (the base model itself when the
      /// adapter hooks into it, a wrapping model otherwise).
      Model: CausalLm
      /// The adapter's trainable parameters under PEFT's names.
      Parameters: (string * Parameter) list
      /// Whether the base model's own parameters stay frozen (only the adapter trains).
      FreezesBase: bool
      /// The adapter parameters' own peak learning rate; None: the run's.
      LearningRate: float option
      /// The adapter's settings as stable "key=value key=value" text (snake_case keys, invariant numbers),
      /// compared on resume.
      Signature: string
      /// Writes adapter_config.json and adapter_model.safetensors to a folder (PEFT's save_pretrained),
      /// with base_model_name_or_path when given.
      Save: string -> string option -> unit
      /// Copies the values of adapter_model.safetensors in a folder this run saved into the parameters.
      Load: string -> unit
      /// Attaches a copy of the adapter to a compute copy of the base model (MixedPrecision.createWith).
      AttachToCompute: CausalLm -> ComputeAttachment }

/// Helpers shared by the adapter kinds.
[<RequireQualifiedAccess>]
module Adapter =

    /// A number as signature text: shortest round-trip form, invariant culture.
    let number (x: float) : string = x.ToString("R", CultureInfo.InvariantCulture)

    /// Signature text of settings: "key=value" pairs joined by single spaces, in the given order.
    let signatureText (settings: (string * string) list) : string =
        String.Join(" ", [ for key, value in settings -> key + "=" + value ])

    /// Stops every base-model parameter from requiring gradients: only the adapter's parameters, which
    /// the model does not hold, train.
    let freezeBase (lm: CausalLm) : unit =
        for p in lm.Module.parameters () do
            p.requires_grad <- false

    /// The parameters of every adapter, in order.
    let parameters (adapters: Adapter list) : (string * Parameter) list = adapters |> List.collect (fun a -> a.Parameters)
