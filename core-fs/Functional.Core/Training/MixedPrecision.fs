namespace Functional.Training

open System
open TorchSharp
open Functional
open Functional.Models
open Functional.Optim
open Functional.Runtime

/// A low-precision (bf16 or fp16) copy of a model that forward and backward run on, while the fp32
/// master weights (a FlatParameters buffer) stay with the optimizer. TorchSharp has no autocast, so
/// mixed precision is explicit: every parameter of the copy aliases its slice of one flat
/// low-precision Values buffer, laid out as the master's (same order, offsets and counts), and its
/// `grad` is the matching slice of one flat low-precision Grads buffer. Refreshing the copy from the
/// master is then one converting copy, and so is moving its gradients to the master.
///
/// What stays in fp32 inside the copy's forward: RMSNorm computes in fp32 (Llama.RmsNorm), the
/// rotary tables are fp32, LayerNorm accumulates in fp32 on CPU, and the loss upcasts the logits to
/// fp32 (Loss.causalLmSum), so the softmax of the cross-entropy and its reduction are fp32.
[<NoEquality; NoComparison>]
type ComputeCopy =
    { /// The low-precision model (same architecture and parameter names as the master model).
      Model: CausalLm
      /// The copy's dtype: bfloat16 or float16.
      DType: torch.ScalarType
      /// Every parameter of the copy, laid out as the master's FlatParameters.Values (1-D, DType).
      Values: torch.Tensor
      /// Every gradient of the copy, laid out as Values (1-D, DType).
      Grads: torch.Tensor }

    /// Releases the copy: its module's parameters and the two flat buffers.
    member this.Dispose() =
        this.Model.Module.Dispose()
        this.Values.Dispose()
        this.Grads.Dispose()

    interface IDisposable with
        /// Releases the copy: its module's parameters and the two flat buffers.
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

    /// The command-line flag of a precision: "--bf16", "--fp16" (or "" for fp32).
    let flag (precision: Precision) : string =
        match precision with
        | Precision.Fp32 -> ""
        | Precision.Bf16 -> "--bf16"
        | Precision.Fp16 _ -> "--fp16"

    /// master.Values converted into copy.Values, in place: one copy after every optimizer update.
    let refresh (copy: ComputeCopy) (master: FlatParameters) : unit =
        use _ = torch.no_grad ()
        copy.Values.copy_ master.Values |> ignore

    /// Adds the copy's gradients, converted to fp32, to the master's (master.Grads += copy.Grads), then
    /// zeroes the copy's. Called after every micro-batch's backward, so accumulation over a window
    /// sums in fp32 (as DeepSpeed's bf16 optimizer accumulates in fp32), not in the low precision.
    let accumulateGradients (copy: ComputeCopy) (master: FlatParameters) : unit =
        use _ = torch.no_grad ()
        master.Grads.add_ copy.Grads |> ignore
        let zeroed = copy.Grads.zero_ ()
        // TorchSharp 0.107's zero_ returns a new handle to the same tensor: release it at once.
        if not (obj.ReferenceEquals(zeroed, copy.Grads)) then zeroed.Dispose()

    /// A compute copy of model in the precision's dtype whose weights equal master's (rounded to the
    /// dtype), or None for fp32. master must hold every parameter of model (full fine-tuning):
    /// otherwise (LoRA, a frozen base) raises InvalidInputException naming --bf16 or --fp16, since
    /// mixed precision does not support training a subset of the parameters yet. The copy is built
    /// from model.Config (CausalLm.create, then Module.to(dtype)), in training mode.
    let create (precision: Precision) (model: CausalLm) (master: FlatParameters) : ComputeCopy option =
        match computeType precision with
        | None -> None
        | Some dtype ->
            TorchRuntime.ensure ()
            let option = flag precision
            let modelNames = [ for struct (name, _) in model.Module.named_parameters () -> name ]
            if List.sort modelNames <> List.sort master.Names then
                InvalidInput.option option
                    (sprintf "LoRA is not supported with %s yet: mixed precision trains every parameter of the model, but %d of its %d parameters were given"
                        option master.Names.Length modelNames.Length)
            let copy = CausalLm.create model.Config 0L
            copy.Module.``to`` dtype |> ignore
            let parameters = dict [ for struct (name, p) in copy.Module.named_parameters () -> name, p ]
            let device = master.Values.device
            let total = master.Values.numel ()
            let values = torch.empty([| total |], dtype = dtype, device = device).DetachFromDisposeScope()
            let grads = torch.zeros([| total |], dtype = dtype, device = device).DetachFromDisposeScope()
            use _ = torch.no_grad ()
            for i, name in List.indexed master.Names do
                let p = parameters[name]
                use valueSlice = values.narrow(0L, master.Offsets[i], master.Counts[i])
                use valueView = valueSlice.view master.Shapes[i]
                p.set_ valueView |> ignore
                use gradSlice = grads.narrow(0L, master.Offsets[i], master.Counts[i])
                use gradView = gradSlice.view master.Shapes[i]
                p.grad <- gradView
            copy.Module.train ()
            let result = { Model = copy; DType = dtype; Values = values; Grads = grads }
            refresh result master
            Some result
