namespace Functional.Training

open System
open TorchSharp
open Functional
open Functional.Models
open Functional.Optim
open Functional.Runtime

/// What a caller attaches to the bf16/fp16 compute copy of its base model (Functional.Peft's type, which
/// every adapter's AttachToCompute returns): the model forward and backward run on, the attached
/// parameters under their fp32 names, and what releases them.
type ComputeAttachment = Functional.Peft.ComputeAttachment

/// A low-precision (bf16 or fp16) copy of a model that forward and backward run on, while the fp32
/// master weights (a FlatParameters buffer) stay with the optimizer. TorchSharp has no autocast, so
/// mixed precision is explicit: every trained parameter of the copy aliases its slice of one flat
/// low-precision Values buffer, laid out as the master's (same order, offsets and counts), and its
/// `grad` is the matching slice of one flat low-precision Grads buffer. Refreshing the copy from the
/// master is then one converting copy, and so is moving its gradients to the master. Parameters that do
/// not train (a frozen base under LoRA) hold the fp32 model's values rounded once, without gradients.
///
/// What stays in fp32 inside the copy's forward, as under PyTorch's autocast (Autocast in Gpt2.fs): the
/// residual stream (the embeddings are upcast; low-precision sublayer outputs are added to it in fp32),
/// LayerNorm and RMSNorm (computed in fp32, rounded once to feed the next projection), the rotary
/// tables, the attention softmax, and the loss (Loss.causalLmSum upcasts the logits). The projections,
/// the attention matmuls, the activations and LoRA's adapter path run in the low precision.
[<NoEquality; NoComparison>]
type ComputeCopy =
    { /// What forward and backward run on: the low-precision model with whatever is attached (same
      /// architecture and parameter names as the fp32 model).
      Model: CausalLm
      /// The low-precision copy of the base model (Model itself, or what Model wraps).
      Base: CausalLm
      /// The copy's dtype: bfloat16 or float16.
      DType: torch.ScalarType
      /// Every trained parameter of the copy, laid out as the master's FlatParameters.Values (1-D, DType).
      Values: torch.Tensor
      /// Every trained parameter's gradient, laid out as Values (1-D, DType).
      Grads: torch.Tensor
      /// The copy's trained parameters under the master's names, in the master's order.
      Trained: (string * TorchSharp.Modules.Parameter) list
      /// Releases what the attach function attached.
      Release: unit -> unit }

    /// Releases the copy: what was attached, the base copy's parameters and the two flat buffers.
    member this.Dispose() =
        this.Release()
        this.Base.Module.Dispose()
        this.Values.Dispose()
        this.Grads.Dispose()

    interface IDisposable with
        /// Releases the copy: what was attached, the base copy's parameters and the two flat buffers.
        member this.Dispose() = this.Dispose()

/// Building a low-precision compute copy and moving weights and gradients between it and the fp32
/// master.
[<RequireQualifiedAccess>]
module MixedPrecision =

    /// The compute dtype of a precision: None for fp32, bfloat16 for Bf16, float16 for Fp16.
    let computeType (precision: Precision) : torch.ScalarType option =
        match precision with
        | Precision.Fp32 -> None
        | Precision.Bf16 -> Some torch.bfloat16
        | Precision.Fp16 _ -> Some torch.float16

    /// The setting of a precision, as a mention for messages: "{bf16}", "{fp16}" (or "" for fp32).
    let flag (precision: Precision) : string =
        match precision with
        | Precision.Fp32 -> ""
        | Precision.Bf16 -> "{bf16}"
        | Precision.Fp16 _ -> "{fp16}"

    /// master.Values converted into copy.Values, in place: one copy after every optimizer update.
    let refresh (copy: ComputeCopy) (master: FlatParameters) : unit =
        use _ = torch.no_grad ()
        copy.Values.copy_ master.Values |> ignore

    /// Elements converted at a time when low-precision gradients are added to the fp32 master (4M: a
    /// 16 MB fp32 temporary).
    [<Literal>]
    let ConversionChunk = 4194304L

    /// Adds the copy's gradients, converted to fp32, to the master's (master.Grads += copy.Grads), then
    /// zeroes the copy's. Called after every micro-batch's backward, so accumulation over a window
    /// sums in fp32 (as DeepSpeed's bf16 optimizer accumulates in fp32), not in the low precision.
    /// firstInWindow marks the window's first micro-batch: master.Grads are then overwritten by one
    /// converting copy, whatever they held (so the trainer does not zero them between windows).
    ///
    /// Otherwise the sum runs in chunks of ConversionChunk elements, each converted to fp32 first:
    /// libtorch's add_ of a bf16 tensor into an fp32 one takes a per-element casting path about 8x
    /// slower than a converting copy plus an fp32 add (0.67 s against 0.03 s for GPT-2's 92M gradients
    /// on this CPU), and the chunks keep the fp32 temporary small.
    let accumulateGradients (copy: ComputeCopy) (master: FlatParameters) (firstInWindow: bool) : unit =
        use _ = torch.no_grad ()
        if firstInWindow then master.Grads.copy_ copy.Grads |> ignore
        else
            let total = master.Grads.numel ()
            let mutable offset = 0L
            while offset < total do
                let count = min ConversionChunk (total - offset)
                use source = copy.Grads.narrow(0L, offset, count)
                use converted = source.to_type torch.float32
                use target = master.Grads.narrow(0L, offset, count)
                target.add_ converted |> ignore
                offset <- offset + count
        let zeroed = copy.Grads.zero_ ()
        // TorchSharp 0.107's zero_ returns a new handle to the same tensor: release it at once.
        if not (obj.ReferenceEquals(zeroed, copy.Grads)) then zeroed.Dispose()

    /// The attach function of a model with nothing attached (full fine-tuning, or a subset of the base
    /// model's own parameters): the copy of the base model as it is.
    let attachNothing (copy: CausalLm) : ComputeAttachment =
        { Functional.Peft.ComputeAttachment.Model = copy; Parameters = []; Release = ignore }

    /// A compute copy in the precision's dtype of model plus what attach attaches to it, or None for fp32.
    /// The base copy is built from model.Config (CausalLm.create, or SequenceClassification.create for a
    /// classifier, then Module.to(dtype)), with model's
    /// gradient-checkpointing setting, in training mode. Every name in master (the trained parameters)
    /// must be a parameter of the base copy or of the attachment: that parameter then aliases its slice of
    /// Values and Grads and holds master's value rounded to the dtype. Every other parameter is frozen
    /// (no gradient); the base copy's take model's values of the same name, rounded once. A trained
    /// parameter with no counterpart raises InvalidInputException naming --bf16 or --fp16 (the kind of
    /// training that mixed precision does not support yet).
    let createWith (precision: Precision) (model: CausalLm) (attach: CausalLm -> ComputeAttachment) (master: FlatParameters) : ComputeCopy option =
        match computeType precision with
        | None -> None
        | Some dtype ->
            TorchRuntime.ensure ()
            let option = flag precision
            let baseCopy =
                match SequenceClassification.tryHead model with
                | Some head -> SequenceClassification.create model.Config head 0L
                | None -> CausalLm.create model.Config 0L
            let attachment =
                try
                    baseCopy.Module.``to`` dtype |> ignore
                    CausalLm.setGradientCheckpointing baseCopy (CausalLm.gradientCheckpointing model)
                    attach baseCopy
                with _ ->
                    baseCopy.Module.Dispose()
                    reraise ()
            let device = master.Values.device
            let total = master.Values.numel ()
            let values = torch.empty([| total |], dtype = dtype, device = device).DetachFromDisposeScope()
            let grads = torch.zeros([| total |], dtype = dtype, device = device).DetachFromDisposeScope()
            let result =
                { Model = attachment.Model
                  Base = baseCopy
                  DType = dtype
                  Values = values
                  Grads = grads
                  Trained = []
                  Release = attachment.Release }
            try
                let baseParameters = [ for struct (name, p) in baseCopy.Module.named_parameters () -> name, p ]
                let candidates = baseParameters @ attachment.Parameters
                match candidates |> List.countBy fst |> List.tryFind (fun (_, n) -> n > 1) with
                | Some(name, _) -> invalidArg (nameof attach) (sprintf "the attachment's parameter '%s' has the name of another parameter" name)
                | None -> ()
                let byName = dict candidates
                let trained = set master.Names
                use _ = torch.no_grad ()
                for i, name in List.indexed master.Names do
                    match byName.TryGetValue name with
                    | true, p ->
                        use valueSlice = values.narrow(0L, master.Offsets[i], master.Counts[i])
                        use valueView = valueSlice.view master.Shapes[i]
                        p.set_ valueView |> ignore
                        use gradSlice = grads.narrow(0L, master.Offsets[i], master.Counts[i])
                        use gradView = gradSlice.view master.Shapes[i]
                        p.grad <- gradView
                        p.requires_grad <- true
                    | _ ->
                        InvalidInput.failSetting option
                            (sprintf "the trained parameter '%s' has no counterpart in the %s compute copy: mixed precision trains the model's own parameters and LoRA adapters, not this kind of parameter yet"
                                name (if dtype = torch.bfloat16 then "bf16" else "fp16"))
                let modelParameters = dict [ for struct (name, p) in model.Module.named_parameters () -> name, p ]
                for name, p in baseParameters do
                    if not (trained.Contains name) then
                        match modelParameters.TryGetValue name with
                        | true, source -> p.copy_ source |> ignore
                        | _ -> invalidArg (nameof model) (sprintf "the model has no parameter '%s' to give its frozen compute copy" name)
                for name, p in candidates do
                    if not (trained.Contains name) then p.requires_grad <- false
                attachment.Model.Module.train ()
                refresh result master
                Some { result with Trained = [ for name in master.Names -> name, byName[name] ] }
            with _ ->
                result.Dispose()
                reraise ()

    /// The copy without its flat Values and Grads buffers (freed; empty tensors in their place), for
    /// ZeRO stage 3, where each unit of its trained parameters is gathered when it runs (ZeroThree)
    /// rather than refreshed from a whole master: refresh and accumulateGradients no longer apply.
    let withoutFlatBuffers (copy: ComputeCopy) : ComputeCopy =
        copy.Values.Dispose()
        copy.Grads.Dispose()
        { copy with
            Values = torch.empty([| 0L |], dtype = copy.DType).DetachFromDisposeScope()
            Grads = torch.empty([| 0L |], dtype = copy.DType).DetachFromDisposeScope() }

    /// createWith with nothing attached (attachNothing): master must hold parameters of model itself.
    let create (precision: Precision) (model: CausalLm) (master: FlatParameters) : ComputeCopy option =
        createWith precision model attachNothing master
