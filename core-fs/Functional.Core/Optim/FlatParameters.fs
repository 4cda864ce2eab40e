namespace Functional.Optim

open System
open TorchSharp
open TorchSharp.Modules
open Functional.Runtime

/// A model's parameters and gradients in one flat fp32 buffer each. Every parameter aliases its slice
/// of Values (`p.set_(view)`) and its `grad` is the matching slice view of Grads, so backward
/// accumulates in place into Grads, and clipping, optimizer updates and all-reduce work on two large
/// vectors instead of one tensor per parameter.
///
/// Values and Grads are detached from every dispose scope: they live until this record is disposed
/// (disposing only releases these two handles; the parameters keep the storage alive). Zero the
/// gradients with `FlatParameters.zeroGrads` (in place): `Module.zero_grad()` sets `p.grad` to None by
/// default and so cuts the link to Grads. Backward with `create_graph = true` also replaces `p.grad`
/// with a fresh tensor (autograd then builds `grad + new` out of place), which the flat layout does
/// not support.
[<NoEquality; NoComparison>]
type FlatParameters =
    {
        /// Parameter names, in the order given to `FlatParameters.create`.
        Names: string list
        /// Each parameter's shape.
        Shapes: int64[] list
        /// Each parameter's first element in Values and Grads.
        Offsets: int64 list
        /// Each parameter's number of elements.
        Counts: int64 list
        /// Every parameter's data, one after the other (fp32, 1-D).
        Values: torch.Tensor
        /// Every parameter's gradient, laid out as Values (fp32, 1-D).
        Grads: torch.Tensor
    }

    /// Releases the handles of Values and Grads (the parameters keep their storage alive).
    member this.Dispose() =
        this.Values.Dispose()
        this.Grads.Dispose()

    interface IDisposable with
        /// Releases the handles of Values and Grads (the parameters keep their storage alive).
        member this.Dispose() = this.Dispose()

/// Building and reading flat parameter buffers.
[<RequireQualifiedAccess>]
module FlatParameters =

    /// Lays the parameters (name, parameter), in order, into one flat fp32 Values buffer and one
    /// zeroed Grads buffer on the parameters' device, copies each parameter's data in, then makes each
    /// parameter alias its slice of Values and sets its `grad` to its slice of Grads (any previous
    /// gradient is dropped). Takes what `Module.named_parameters()` returns. Parameters must be fp32,
    /// on one device, with distinct names.
    let create (parameters: seq<struct (string * Parameter)>) : FlatParameters =
        TorchRuntime.ensure ()
        let items = parameters |> Seq.map (fun struct (name, p) -> name, p) |> List.ofSeq
        match items |> List.countBy fst |> List.tryFind (fun (_, n) -> n > 1) with
        | Some(name, _) -> invalidArg (nameof parameters) (sprintf "parameter name '%s' appears more than once" name)
        | None -> ()
        for name, p in items do
            if p.dtype <> torch.float32 then
                invalidArg (nameof parameters) (sprintf "parameter '%s' is %O; flat buffers hold fp32 parameters" name p.dtype)
        let device =
            match items with
            | (_, p) :: _ -> p.device
            | [] -> torch.CPU
        for name, p in items do
            if string p.device <> string device then
                invalidArg (nameof parameters) (sprintf "parameter '%s' is on %O, the first one on %O" name p.device device)
        let shapes = items |> List.map (fun (_, p) -> Array.copy p.shape)
        let counts = items |> List.map (fun (_, p) -> p.numel ())
        let offsets = counts |> List.scan (+) 0L |> List.take counts.Length
        let total = List.sum counts
        let values = torch.empty([| total |], dtype = torch.float32, device = device).DetachFromDisposeScope()
        let grads = torch.zeros([| total |], dtype = torch.float32, device = device).DetachFromDisposeScope()
        use _ = torch.no_grad ()
        for ((_, p), shape), (offset, count) in List.zip (List.zip items shapes) (List.zip offsets counts) do
            use valueSlice = values.narrow(0L, offset, count)
            use valueView = valueSlice.view shape
            valueView.copy_ p |> ignore
            p.set_ valueView |> ignore
            use gradSlice = grads.narrow(0L, offset, count)
            use gradView = gradSlice.view shape
            p.grad <- gradView
        { Names = items |> List.map fst
          Shapes = shapes
          Offsets = offsets
          Counts = counts
          Values = values
          Grads = grads }

    /// Whether every parameter value is finite (no NaN, no infinity). One reduction, summed in float64
    /// so no finite float32 values can overflow it: NaN and infinities propagate to the sum, nothing else
    /// makes it non-finite. Reads the result back to the host.
    let allFinite (flat: FlatParameters) : bool =
        use _ = torch.no_grad ()
        use sum = flat.Values.sum(``type`` = torch.float64)
        Double.IsFinite(sum.item<double> ())

    /// Sets every gradient to zero in place (the parameters' `grad` views stay attached).
    let zeroGrads (flat: FlatParameters) : unit =
        // TorchSharp 0.107's zero_ returns a new handle to the same tensor (other in-place ops return
        // the receiver): release it at once so zeroing leaves no handle behind, scope or not.
        let result = flat.Grads.zero_ ()
        if not (obj.ReferenceEquals(result, flat.Grads)) then result.Dispose()

    let private indexOf (flat: FlatParameters) (name: string) =
        match List.tryFindIndex ((=) name) flat.Names with
        | Some i -> i
        | None -> invalidArg (nameof name) (sprintf "no parameter named '%s' in the flat buffer" name)

    /// A view of the named parameter's part of a flat buffer laid out as Values (Grads or an optimizer
    /// moment, for instance), in the parameter's shape. A fresh handle sharing the buffer's storage.
    let sliceOf (flat: FlatParameters) (buffer: torch.Tensor) (name: string) : torch.Tensor =
        let i = indexOf flat name
        use part = buffer.narrow(0L, flat.Offsets[i], flat.Counts[i])
        part.view flat.Shapes[i]

    /// A view of the named parameter's data in Values, in the parameter's shape (the tensor the
    /// parameter aliases). A fresh handle sharing Values' storage.
    let slice (flat: FlatParameters) (name: string) : torch.Tensor = sliceOf flat flat.Values name

    /// A fresh flat fp32 tensor laid out as Values: 1 over the parameters whose name satisfies
    /// `selected`, 0 elsewhere (e.g. the weight-decay mask: every parameter but biases and norms).
    let mask (flat: FlatParameters) (selected: string -> bool) : torch.Tensor =
        let result = torch.zeros_like flat.Values
        use one = (1.0).ToScalar()
        for (name, offset), count in List.zip (List.zip flat.Names flat.Offsets) flat.Counts do
            if selected name then
                use part = result.narrow(0L, offset, count)
                part.fill_ one |> ignore
        result

    /// A flat tensor laid out as Values holding `value` everywhere, backed by one element (a zero-stride
    /// view, read-only): e.g. the weight-decay mask of a run without weight decay, which nothing reads,
    /// at 4 bytes instead of 4 bytes per parameter.
    let uniform (flat: FlatParameters) (value: float32) : torch.Tensor =
        use scalar = value.ToScalar()
        use one = torch.full(([| 1L |]: int64[]), scalar, dtype = torch.float32, device = flat.Values.device)
        one.expand [| flat.Values.numel () |]

    /// (name, view of its data in Values) for every parameter, in order, e.g. for export; the views
    /// are fresh handles sharing Values' storage.
    let namedValues (flat: FlatParameters) : (string * torch.Tensor) list =
        flat.Names |> List.map (fun name -> name, slice flat name)
