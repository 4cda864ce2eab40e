namespace Functional.Training

open System
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Distributed
open Functional.Models
open Functional.Optim
open Functional.Runtime

/// One unit of ZeRO stage 3: the trained parameters of one decoder layer, or all the others (embeddings,
/// final norm, heads), laid out one after the other in a unit buffer of Length elements of which each
/// process keeps its block (Sharding.block).
[<NoEquality; NoComparison>]
type internal ZeroUnit =
    { /// The parameters (name, parameter, first element in the unit buffer, elements, shape), in flat order.
      Parameters: (string * Parameter * int64 * int64 * int64[]) list
      /// The compute copy's parameters of the same names, in the same order, under mixed precision (what
      /// forward and backward run on); empty in fp32, where the parameters themselves run.
      Compute: Parameter list
      /// The unit buffer's elements.
      Length: int64
      /// This process's block of the unit buffer.
      Block: ShardRange
      /// Where that block starts in this process's shard buffers.
      ShardOffset: int64 }

/// DeepSpeed's ZeRO stage 3 on CPU tensors: every process keeps only its block of each unit's parameters
/// (ShardFlat: the fp32 values and gradients the optimizer steps on), and a unit's parameters exist whole
/// only while it runs: the units' parameters are all-gathered before use and freed after; each decoder layer
/// runs through activation checkpointing with its parameters gathered for the forward and again for the
/// recomputation in backward, after which its gradients are reduce-scattered into the processes' blocks.
/// The other unit (embeddings, final norm, heads) is gathered for a micro-batch's forward and backward.
/// Parameters that do not train (a frozen base under LoRA) stay whole on every process.
[<Sealed>]
type ZeroThree internal (communicator: ICommunicator, buckets: CollectiveBuckets, units: ZeroUnit[], layerUnits: Map<int, int>, shardFlat: FlatParameters, fragments: StateFragment list, canonical: Map<string, int64>, computeType: torch.ScalarType option) =
    // Gathered buffers per unit: [0] the fp32 values set into the parameters themselves (GatherAll, Finish;
    // also what fp32 training runs on), [1] under mixed precision the low-precision values set into the
    // compute copy's parameters (what training runs on).
    let gatheredValues: torch.Tensor option[][] = Array.init 2 (fun _ -> Array.create units.Length None)
    let gatheredGrads: torch.Tensor option[] = Array.create units.Length None
    let placeholder = torch.empty([| 0L |], dtype = torch.float32).DetachFromDisposeScope()
    let computePlaceholder =
        computeType |> Option.map (fun dtype -> torch.empty([| 0L |], dtype = dtype).DetachFromDisposeScope())
    let mutable collectiveTicks = 0L
    let timed (action: unit -> unit) =
        let start = Diagnostics.Stopwatch.GetTimestamp()
        try action () finally collectiveTicks <- collectiveTicks + (Diagnostics.Stopwatch.GetTimestamp() - start)
    /// The slot training runs on: the compute copy's under mixed precision, else the parameters'.
    let trainingSlot = if computeType.IsSome then 1 else 0
    let targets (unit: ZeroUnit) (slot: int) =
        if slot = 0 then unit.Parameters |> List.map (fun (_, p, first, count, shape) -> p, first, count, shape)
        else List.map2 (fun (_, _, first, count, shape) c -> c, first, count, shape) unit.Parameters unit.Compute

    /// Gathers unit index into slot's parameters (with zeroed gradient buffers when withGrads: in the
    /// slot's dtype). The blocks are all-gathered in fp32 and converted after, so a low-precision copy
    /// holds the master's values rounded once, as the whole compute copy of stages 0 to 2 does.
    let gather (index: int) (slot: int) (withGrads: bool) =
        let unit = units[index]
        let dtype = if slot = 0 then torch.float32 else computeType.Value
        if gatheredValues.[slot].[index].IsNone then
            use _ = torch.no_grad ()
            let whole = torch.empty([| unit.Length |], dtype = torch.float32).DetachFromDisposeScope()
            use own = shardFlat.Values.narrow(0L, unit.ShardOffset, unit.Block.Count)
            timed (fun () -> Sharding.allGather communicator buckets.Allgather own whole)
            let values =
                if dtype = torch.float32 then whole
                else
                    let converted = whole.to_type(dtype).DetachFromDisposeScope()
                    whole.Dispose()
                    converted
            for p, first, count, shape in targets unit slot do
                use part = values.narrow(0L, first, count)
                use view = part.view shape
                p.set_ view |> ignore
            gatheredValues.[slot].[index] <- Some values
        if withGrads && gatheredGrads[index].IsNone then
            let grads = torch.zeros([| unit.Length |], dtype = dtype).DetachFromDisposeScope()
            for p, first, count, shape in targets unit slot do
                use part = grads.narrow(0L, first, count)
                use view = part.view shape
                p.grad <- view
            gatheredGrads[index] <- Some grads

    let releaseSlot (index: int) (slot: int) =
        let unit = units[index]
        use _ = torch.no_grad ()
        let empty = if slot = 0 then placeholder else computePlaceholder.Value
        for p, _, _, _ in targets unit slot do
            p.grad <- null
            p.set_ empty |> ignore
        gatheredValues.[slot].[index] |> Option.iter (fun t -> t.Dispose())
        gatheredValues.[slot].[index] <- None
        if slot = trainingSlot then
            gatheredGrads[index] |> Option.iter (fun t -> t.Dispose())
            gatheredGrads[index] <- None

    /// Frees what training gathered of the unit.
    let release (index: int) = releaseSlot index trainingSlot

    /// Sums the unit's gathered gradients over the processes (in fp32: low-precision gradients are
    /// converted first, as stages 0 to 2 accumulate them in fp32) and adds this process's block to
    /// ShardFlat.Grads.
    let reduceGradients (index: int) =
        match gatheredGrads[index] with
        | Some grads ->
            let unit = units[index]
            use _ = torch.no_grad ()
            use block = torch.empty([| Sharding.blockLength unit.Length communicator.Size |], dtype = torch.float32)
            let reduce (source: torch.Tensor) = timed (fun () -> Sharding.reduceScatter communicator buckets.Reduce source block)
            if grads.dtype = torch.float32 then reduce grads
            else
                use converted = grads.to_type torch.float32
                reduce converted
            use own = shardFlat.Grads.narrow(0L, unit.ShardOffset, unit.Block.Count)
            use reduced = block.narrow(0L, 0L, unit.Block.Count)
            own.add_ reduced |> ignore
        | None -> ()

    let layerExecution =
        { new ILayerExecution with
            member _.Run(layer, block, forward, inputs, _) =
                match layerUnits.TryFind layer with
                | None -> forward inputs
                | Some index ->
                    let hooks: BlockHooks =
                        { BeforeForward = fun () -> gather index trainingSlot false
                          AfterForward = fun () -> release index
                          BeforeBackward = fun () -> gather index trainingSlot true
                          AfterBackward = fun () -> (try reduceGradients index finally release index) }
                    ActivationCheckpointing.runWith hooks block forward inputs }

    /// The seconds spent in collectives (gathers and reduce-scatters) since the last call, forgotten.
    member _.TakeCollectiveSeconds() : float =
        let seconds = float collectiveTicks / float Diagnostics.Stopwatch.Frequency
        collectiveTicks <- 0L
        seconds

    /// The unit of everything outside the decoder layers.
    member internal _.OuterUnit = 0

    /// What the optimizer steps on: this process's blocks of every unit, one after the other; its Names,
    /// Offsets and Counts are the parameter fragments the blocks hold (1-D shapes).
    member _.ShardFlat = shardFlat

    /// The parameter fragments of ShardFlat (what a checkpoint stores of this process's optimizer state).
    member _.Fragments = fragments

    /// The layer runner a backbone uses for the run (DecoderBackbone.LayerExecution).
    member _.LayerExecution = layerExecution

    /// Gathers the outer unit with gradient buffers for one micro-batch's forward and backward.
    member _.BeginMicroBatch() = gather 0 trainingSlot true

    /// After a micro-batch's backward: reduce-scatters the outer unit's gradients and frees it.
    member _.EndMicroBatch() =
        try reduceGradients 0 finally release 0

    /// Gathers every unit (no gradients) so the whole model can be read (evaluation, saving) until the
    /// result is disposed, which frees them again. Every process must call it at the same point.
    member _.GatherAll() : IDisposable =
        for i in 0 .. units.Length - 1 do gather i 0 false
        { new IDisposable with
            member _.Dispose() =
                for i in 0 .. units.Length - 1 do releaseSlot i 0 }

    /// Frees every unit's parameters (and the compute copy's).
    member internal _.ReleaseAll() =
        for i in 0 .. units.Length - 1 do
            releaseSlot i 0
            if computeType.IsSome then releaseSlot i 1

    /// This process's elements of a whole flat state buffer laid out as the run's flat parameters (a
    /// checkpoint's moment): the fragments' parts, in ShardFlat's order.
    member _.Select(whole: torch.Tensor) : torch.Tensor =
        use _ = torch.no_grad ()
        let parts =
            [ for f in fragments -> whole.narrow(0L, canonical[f.Parameter] + f.First, f.Count) ]
        if parts.IsEmpty then torch.empty([| 0L |], dtype = whole.dtype)
        else torch.cat(Collections.Generic.List parts, 0L)

    /// Gathers every unit and gives the parameters whole storage again, laid out as one flat buffer (the
    /// run's result). Ends stage 3: the parameters keep that storage.
    member _.Finish(parameters: (string * Parameter) list) : FlatParameters =
        for i in 0 .. units.Length - 1 do
            if computeType.IsSome then releaseSlot i 1
            gather i 0 false
        let flat = FlatParameters.create [ for name, p in parameters -> struct (name, p) ]
        for i in 0 .. units.Length - 1 do
            gatheredValues.[0].[i] |> Option.iter (fun t -> t.Dispose())
            gatheredGrads[i] |> Option.iter (fun t -> t.Dispose())
            gatheredValues.[0].[i] <- None
            gatheredGrads[i] <- None
        flat

    /// Releases the shard buffers.
    member _.Dispose() =
        shardFlat.Dispose()
        placeholder.Dispose()
        computePlaceholder |> Option.iter (fun t -> t.Dispose())

    interface IDisposable with
        member this.Dispose() = this.Dispose()

/// Building the ZeRO stage-3 state of a run.
[<RequireQualifiedAccess>]
module ZeroThree =

    /// The decoder backbone of a model (the module whose layers stage 3 gathers one by one).
    let backbone (model: CausalLm) : DecoderBackbone option =
        model.Module.modules () |> Seq.tryPick (fun m -> match box m with :? DecoderBackbone as b -> Some b | _ -> None)

    /// Shards flat (the run's fp32 flat parameters, which the parameters alias) among the processes: each
    /// keeps its block of every unit; then every parameter is freed (its storage is gathered when it is
    /// used) and flat's buffers are released. Under mixed precision, compute gives the low-precision copy
    /// that forward and backward run on (its dtype and its trained parameters by name, every name of
    /// parameters among them): training gathers a unit into those (the blocks rounded once to the dtype)
    /// and reduces their gradients in fp32, while GatherAll and Finish gather the fp32 parameters. Raises
    /// InvalidInputException naming zero_stage for a model without a decoder backbone.
    let create
        (communicator: ICommunicator)
        (buckets: CollectiveBuckets)
        (model: CausalLm)
        (flat: FlatParameters)
        (parameters: (string * Parameter) list)
        (compute: (torch.ScalarType * Map<string, Parameter>) option)
        : ZeroThree =
        let backbone =
            backbone model
            |> Option.defaultWith (fun () -> InvalidInput.setting "zero_stage" "3 gathers a decoder's layers one by one; this model has no decoder backbone")
        let computeOf (name: string) =
            match compute with
            | None -> []
            | Some(_, byName) ->
                match byName.TryFind name with
                | Some p -> [ p ]
                | None -> invalidArg (nameof compute) (sprintf "the compute copy has no trained parameter '%s'" name)
        let layerOf =
            let owners =
                [ for i, (block, _) in Array.indexed backbone.Layers do
                      for p in block.parameters () -> p, i ]
            fun (p: Parameter) -> owners |> List.tryPick (fun (q, i) -> if obj.ReferenceEquals(p, q) then Some i else None)
        let canonical = Map(List.zip flat.Names flat.Offsets)
        let byUnit = parameters |> List.map (fun (name, p) -> name, p, layerOf p)
        let unitKeys = None :: (byUnit |> List.choose (fun (_, _, l) -> l) |> List.distinct |> List.sort |> List.map Some)
        let size, rank = communicator.Size, communicator.Rank
        let units, _ =
            unitKeys
            |> List.mapFold
                (fun shardOffset key ->
                    let members = byUnit |> List.filter (fun (_, _, l) -> l = key)
                    let counts = members |> List.map (fun (_, p, _) -> p.numel ())
                    let firsts = counts |> List.scan (+) 0L |> List.take counts.Length
                    let length = List.sum counts
                    let block = Sharding.block length size rank
                    { Parameters = [ for (name, p, _), (first, count) in List.zip members (List.zip firsts counts) -> name, p, first, count, Array.copy p.shape ]
                      Compute = members |> List.collect (fun (name, _, _) -> computeOf name)
                      Length = length
                      Block = block
                      ShardOffset = shardOffset },
                    shardOffset + block.Count)
                0L
        let units = Array.ofList units
        let layerUnits = Map [ for i, key in List.indexed unitKeys do match key with Some layer -> yield layer, i | None -> () ]
        let fragments =
            [ for unit in units do
                  for name, _, first, count, _ in unit.Parameters do
                      let from = max first unit.Block.Offset
                      let until = min (first + count) (unit.Block.Offset + unit.Block.Count)
                      if until > from then
                          yield { Parameter = name; First = from - first; Offset = unit.ShardOffset + from - unit.Block.Offset; Count = until - from } ]
        let total = units |> Array.sumBy (fun u -> u.Block.Count)
        let values = torch.empty([| total |], dtype = torch.float32).DetachFromDisposeScope()
        let grads = torch.zeros([| total |], dtype = torch.float32).DetachFromDisposeScope()
        do
            use _ = torch.no_grad ()
            for f in fragments do
                use source = flat.Values.narrow(0L, canonical[f.Parameter] + f.First, f.Count)
                use target = values.narrow(0L, f.Offset, f.Count)
                target.copy_ source |> ignore
        let shardFlat =
            { Names = fragments |> List.map (fun f -> f.Parameter)
              Shapes = fragments |> List.map (fun f -> [| f.Count |])
              Offsets = fragments |> List.map (fun f -> f.Offset)
              Counts = fragments |> List.map (fun f -> f.Count)
              Values = values
              Grads = grads }
        let zero = new ZeroThree(communicator, buckets, units, layerUnits, shardFlat, fragments, canonical, compute |> Option.map fst)
        // Every parameter is freed: from here on it exists only while gathered.
        zero.ReleaseAll()
        flat.Dispose()
        zero
