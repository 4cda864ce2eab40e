namespace Functional.Optim

open System
open TorchSharp
open Functional
open Functional.Runtime

/// What a gradient transformation keeps between updates, seen from outside: each transform has its
/// own immutable record (Transform.AdamState, Transform.TraceState, ...) implementing this interface.
///
/// The tensors inside are owned buffers, updated in place by Update: the record Update returns is a
/// new value, but it shares those buffers with the state it was given, so a state must not be read
/// after it was passed to Update. Buffers are detached from every dispose scope when Init creates
/// them, so they survive the trainer's per-step `torch.NewDisposeScope()`; dispose the latest state
/// (and only that one) when training ends.
type ITransformState =
    inherit IDisposable

    /// The stable names of the entries Export returns, in that order (checkpoint keys, such as
    /// "adam.exp_avg"; a chain prefixes each member's names with its index, "0.adam.exp_avg").
    abstract Names: string list

    /// The state under its Names: buffers as fresh handles sharing their storage, counters as fresh
    /// 0-dim int64 tensors. The caller disposes them.
    abstract Export: unit -> (string * torch.Tensor) list

    /// This state with its buffers overwritten in place and its counters replaced by `entry name`, for
    /// every name in Names (call under no_grad). Prefer Transform.loadStateTensors, which checks names.
    abstract Import: entry: (string -> torch.Tensor) -> ITransformState

/// A gradient transformation, as Optax's GradientTransformation: a pair of functions over flat tensors.
///
/// Update may work in place: it may write into the `updates` tensor it receives and return that very
/// tensor (all transforms here do), so the updates passed in are consumed. Parameters are only read.
/// Scalars used at every update are created once, with the transform; per-update temporaries
/// (0-dim norms, step-dependent Scalars) are disposed before Update returns, so an update leaves no
/// tensor handle behind even outside a dispose scope; state buffers are never reallocated.
[<NoEquality; NoComparison>]
type Transform =
    {
        /// The initial state for parameters shaped as `parameters` (usually FlatParameters.Values).
        Init: torch.Tensor -> ITransformState
        /// (updates, state, parameters) -> (transformed updates, next state). The first update given
        /// is the gradient; the last transform of an optimizer returns what to add to the parameters.
        Update: torch.Tensor -> ITransformState -> torch.Tensor -> torch.Tensor * ITransformState
    }

/// How clipping turns the sum of squared gradient elements this process holds into the sum over the
/// whole gradient: the identity when the process holds the whole gradient (one process, or data
/// parallel after the gradients were all-reduced), a sum across processes when each holds a shard
/// (ZeRO-2: an all-reduce of one number, e.g. Communicator.sumFloat).
type NormReduction = float -> float

/// Optax-style gradient transformations over flat tensors and their composition. Learning rates come
/// from a schedule `int -> float` of the update count, as Hugging Face: update k (from 0) uses lr(k).
[<RequireQualifiedAccess>]
module Transform =

    let private stateOrigin = "optimizer state"

    /// The state as the record type its transform expects; any other state is a programming error.
    let private own<'S> (transform: string) (state: ITransformState) : 'S =
        match box state with
        | :? 'S as s -> s
        | _ -> invalidArg (nameof state) (sprintf "%s was given a %s, not the state its Init made" transform (state.GetType().Name))

    /// A zeroed buffer shaped as the parameters, owned by a state: detached from every dispose scope.
    let private buffer (parameters: torch.Tensor) =
        let result = torch.zeros_like parameters
        result.DetachFromDisposeScope()

    let private countTensor (count: int) = torch.tensor (int64 count)

    let private readCount (name: string) (source: torch.Tensor) : int =
        if source.numel () <> 1L then
            InvalidInput.fail stateOrigin name (sprintf "expected a counter (one element), found shape %A" source.shape)
        use asDouble = source.to_type torch.float64
        let value = asDouble.item<float> ()
        if not (value >= 0.0 && value <= float Int32.MaxValue && value = Math.Round value) then
            InvalidInput.fail stateOrigin name (sprintf "expected a count (a whole number >= 0), found %g" value)
        int value

    let private copyInto (name: string) (target: torch.Tensor) (source: torch.Tensor) =
        if source.shape <> target.shape then
            InvalidInput.fail stateOrigin name (sprintf "expected shape %A, found %A" target.shape source.shape)
        target.copy_ source |> ignore
        target

    /// A constructor's argument check: ArgumentException naming the setting, as Schedule's constructors do.
    /// Users' values are checked once, with InvalidInputException, by TrainOptions.validate before any
    /// transform is made; this guards library callers that build transforms themselves.
    let private checkOption (valid: bool) (option: string) (problem: unit -> string) =
        if not valid then raise (ArgumentException(sprintf "%s %s" (SettingText.plain option) (problem ())))

    /// The state of a transform that keeps nothing (addDecayedWeights).
    [<NoEquality; NoComparison>]
    type EmptyState =
        /// The only value: nothing to keep.
        | EmptyState

        interface ITransformState with
            member _.Names = []
            member _.Export() = []
            member this.Import _ = this
            member _.Dispose() = ()

    /// scaleByAdam's state: the update count and the first and second moments.
    [<NoEquality; NoComparison>]
    type AdamState =
        {
            /// Updates done so far (torch's "step"); the next update uses t = Count + 1.
            Count: int
            /// First moment m (torch's "exp_avg").
            ExpAvg: torch.Tensor
            /// Second moment v (torch's "exp_avg_sq").
            ExpAvgSq: torch.Tensor
        }

        interface ITransformState with
            member _.Names = [ "adam.exp_avg"; "adam.exp_avg_sq"; "adam.step" ]

            member s.Export() =
                [ "adam.exp_avg", s.ExpAvg.alias ()
                  "adam.exp_avg_sq", s.ExpAvgSq.alias ()
                  "adam.step", countTensor s.Count ]

            member s.Import entry =
                { Count = readCount "adam.step" (entry "adam.step")
                  ExpAvg = copyInto "adam.exp_avg" s.ExpAvg (entry "adam.exp_avg")
                  ExpAvgSq = copyInto "adam.exp_avg_sq" s.ExpAvgSq (entry "adam.exp_avg_sq") }

            member s.Dispose() =
                s.ExpAvg.Dispose()
                s.ExpAvgSq.Dispose()

    /// The factors of Adam's update t (from 1) as scaleByAdam applies them: the step scale
    /// sqrt(1 - b2^t) / (1 - b1^t) and the scaled epsilon eps sqrt(1 - b2^t).
    let adamScales (b1: float) (b2: float) (eps: float) (t: int) : float * float =
        let biasCorrection1 = 1.0 - Math.Pow(b1, float t)
        let biasCorrection2Sqrt = Math.Sqrt(1.0 - Math.Pow(b2, float t))
        biasCorrection2Sqrt / biasCorrection1, eps * biasCorrection2Sqrt

    /// Adam's scaling, with torch.optim.Adam(W)'s formula: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    /// t = Count + 1; u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps), eps added after the bias
    /// correction of sqrt(v). Computed in place into the updates as
    /// u = m * (sqrt(1 - b2^t) / (1 - b1^t)) / (sqrt(v) + eps sqrt(1 - b2^t)), the same quantity.
    /// HF defaults: b1 = 0.9, b2 = 0.999, eps = 1e-8.
    let scaleByAdam (b1: float) (b2: float) (eps: float) : Transform =
        checkOption (b1 >= 0.0 && b1 < 1.0) "{adam_beta1}" (fun () -> sprintf "must lie in [0, 1), got %g" b1)
        checkOption (b2 >= 0.0 && b2 < 1.0) "{adam_beta2}" (fun () -> sprintf "must lie in [0, 1), got %g" b2)
        checkOption (Double.IsFinite eps && eps >= 0.0) "{adam_epsilon}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" eps)
        TorchRuntime.ensure ()
        let beta1 = b1.ToScalar()
        let oneMinusBeta1 = (1.0 - b1).ToScalar()
        let beta2 = b2.ToScalar()
        let oneMinusBeta2 = (1.0 - b2).ToScalar()
        { Init =
            fun parameters ->
                { Count = 0; ExpAvg = buffer parameters; ExpAvgSq = buffer parameters } :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<AdamState> "scaleByAdam" state
                let t = s.Count + 1
                s.ExpAvg.mul_(beta1).add_(updates, oneMinusBeta1) |> ignore
                s.ExpAvgSq.mul_(beta2).addcmul_(updates, updates, oneMinusBeta2) |> ignore
                let stepFactor, epsFactor = adamScales b1 b2 eps t
                use scaledEps = epsFactor.ToScalar()
                use stepScale = stepFactor.ToScalar()
                updates.copy_(s.ExpAvgSq).sqrt_().add_(scaledEps).reciprocal_().mul_(s.ExpAvg).mul_(stepScale)
                |> ignore
                updates, { s with Count = t } :> ITransformState }

    /// Adds decayed weights: u = u + weightDecay * mask * parameters. The mask is a flat 0/1 tensor laid
    /// out as the parameters (FlatParameters.mask); it is read at every update, so it must stay alive
    /// as long as the transform is used. A weight decay of 0 leaves the updates untouched.
    let addDecayedWeights (weightDecay: float) (mask: torch.Tensor) : Transform =
        checkOption (Double.IsFinite weightDecay && weightDecay >= 0.0) "{weight_decay}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" weightDecay)
        TorchRuntime.ensure ()
        let decay = weightDecay.ToScalar()
        { Init =
            fun parameters ->
                if mask.numel () <> parameters.numel () then
                    invalidArg (nameof mask) (sprintf "the weight-decay mask has %d elements, the parameters %d" (mask.numel ()) (parameters.numel ()))
                EmptyState :> ITransformState
          Update =
            fun updates state parameters ->
                if weightDecay <> 0.0 then updates.addcmul_(mask, parameters, decay) |> ignore
                updates, state }

    /// Multiplies the updates elementwise by factors, a flat tensor laid out as the parameters: e.g. a
    /// learning-rate ratio per parameter group (DeepSpeed-Chat's separate LoRA learning rate) after
    /// scaleByLearningRate. The tensor must stay alive as long as the transform is used.
    let scaleByFactors (factors: torch.Tensor) : Transform =
        TorchRuntime.ensure ()
        { Init =
            fun parameters ->
                if factors.numel () <> parameters.numel () then
                    invalidArg (nameof factors) (sprintf "the factors have %d elements, the parameters %d" (factors.numel ()) (parameters.numel ()))
                EmptyState :> ITransformState
          Update = fun updates state _ -> updates.mul_(factors) |> ignore; updates, state }

    /// scaleByLearningRate's state: the number of updates done, which picks the next learning rate.
    [<NoEquality; NoComparison>]
    type LearningRateState =
        {
            /// Updates done so far; the next one uses schedule Count.
            Count: int
        }

        interface ITransformState with
            member _.Names = [ "learning_rate.count" ]
            member s.Export() = [ "learning_rate.count", countTensor s.Count ]
            member _.Import entry = { Count = readCount "learning_rate.count" (entry "learning_rate.count") }
            member _.Dispose() = ()

    /// Scales by the negative scheduled learning rate: u = -schedule(Count) * u, then Count + 1 (HF's
    /// convention: update k, from 0, uses lr(k)). The result is what to add to the parameters.
    let scaleByLearningRate (schedule: int -> float) : Transform =
        TorchRuntime.ensure ()
        { Init = fun _ -> { Count = 0 } :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<LearningRateState> "scaleByLearningRate" state
                use factor = (-(schedule s.Count)).ToScalar()
                updates.mul_ factor |> ignore
                updates, { Count = s.Count + 1 } :> ITransformState }

    /// clipByGlobalNorm's state: the global norm of the last updates it saw, before clipping.
    [<NoEquality; NoComparison>]
    type ClipState =
        {
            /// The L2 norm of the last updates before clipping (NaN before the first update); what HF
            /// logs as grad_norm. Not exported: it is a report, not needed to resume.
            LastNorm: float
        }

        interface ITransformState with
            member _.Names = []
            member _.Export() = []
            member this.Import _ = this
            member _.Dispose() = ()

    /// The L2 norm of all elements of a flat tensor, read back to the host (clipByGlobalNorm's norm).
    let globalNorm (updates: torch.Tensor) : float =
        use normTensor = updates.norm 2.0f
        use asDouble = normTensor.to_type torch.float64
        asDouble.item<float> ()

    /// The norm reduction of a process that holds the whole gradient: the identity.
    let localNorm: NormReduction = id

    /// The L2 norm of the whole gradient of which updates is this process's part: sqrt(reduce(||updates||^2)),
    /// with ||updates|| as globalNorm computes it. With localNorm it is globalNorm's value exactly (the
    /// fp32 norm squared is exact in float64, and so is its square root).
    let reducedNorm (reduce: NormReduction) (updates: torch.Tensor) : float =
        let local = globalNorm updates
        Math.Sqrt(reduce (local * local))

    /// The factor clipByGlobalNorm multiplies updates of this norm by: Some(maxNorm / (norm + 1e-6)) when
    /// clipping is on (maxNorm > 0) and that is not >= 1 (NaN included, as torch), else None.
    let clipCoefficient (maxNorm: float) (norm: float) : float option =
        let coefficient = maxNorm / (norm + 1e-6)
        if maxNorm > 0.0 && not (coefficient >= 1.0) then Some coefficient else None

    /// clipByGlobalNorm over a gradient of which each process holds a part: the norm is
    /// reducedNorm reduce (the sum of squares reduced across the processes), so every process clips by
    /// the same coefficient. clipByGlobalNormWith localNorm is clipByGlobalNorm.
    let clipByGlobalNormWith (reduce: NormReduction) (maxNorm: float) : Transform =
        checkOption (Double.IsFinite maxNorm && maxNorm >= 0.0) "{max_grad_norm}" (fun () ->
            sprintf "must be a finite number >= 0 (0 turns clipping off), got %g" maxNorm)
        TorchRuntime.ensure ()
        { Init = fun _ -> { LastNorm = nan } :> ITransformState
          Update =
            fun updates _ _ ->
                let norm = reducedNorm reduce updates
                match clipCoefficient maxNorm norm with
                | Some coefficient ->
                    use factor = coefficient.ToScalar()
                    updates.mul_ factor |> ignore
                | None -> ()
                updates, { LastNorm = norm } :> ITransformState }

    /// Clips by global norm, as torch.nn.utils.clip_grad_norm_: norm = ||u||_2 over all elements,
    /// coefficient = min(1, maxNorm / (norm + 1e-6)), u = u * coefficient. The pre-clip norm is kept as
    /// ClipState.LastNorm (read it with Transform.lastGradNorm). maxNorm = 0 turns clipping off (HF's
    /// max_grad_norm = 0) but still measures the norm. A non-finite norm gives a NaN or 0 coefficient,
    /// as torch's (with error_if_nonfinite = false). HF default: 1.0. The norm is read back to the host
    /// (a synchronization point on accelerators).
    let clipByGlobalNorm (maxNorm: float) : Transform = clipByGlobalNormWith localNorm maxNorm

    /// trace's state: the momentum buffer (torch.optim.SGD's "momentum_buffer").
    [<NoEquality; NoComparison>]
    type TraceState =
        {
            /// buf = momentum * buf + u; starts at zero, so the first update gives buf = u as torch.
            MomentumBuffer: torch.Tensor
        }

        interface ITransformState with
            member _.Names = [ "trace.momentum_buffer" ]
            member s.Export() = [ "trace.momentum_buffer", s.MomentumBuffer.alias () ]

            member s.Import entry =
                { MomentumBuffer = copyInto "trace.momentum_buffer" s.MomentumBuffer (entry "trace.momentum_buffer") }

            member s.Dispose() = s.MomentumBuffer.Dispose()

    /// Momentum, as torch.optim.SGD with dampening 0: buf = u on the first update, then
    /// buf = momentum * buf + u; the result is u + momentum * buf with Nesterov, else buf.
    /// Nesterov needs momentum > 0 (as torch).
    let trace (momentum: float) (nesterov: bool) : Transform =
        checkOption (Double.IsFinite momentum && momentum >= 0.0) "{momentum}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" momentum)
        checkOption (not nesterov || momentum > 0.0) "{nesterov}" (fun () -> "needs a momentum > 0 (as torch.optim.SGD)")
        TorchRuntime.ensure ()
        let mu = momentum.ToScalar()
        { Init = fun parameters -> { MomentumBuffer = buffer parameters } :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<TraceState> "trace" state
                s.MomentumBuffer.mul_(mu).add_ updates |> ignore
                if nesterov then updates.add_(s.MomentumBuffer, mu) |> ignore
                else updates.copy_ s.MomentumBuffer |> ignore
                updates, state }

    /// chain's state: one state per transform of the chain, in order.
    [<NoEquality; NoComparison>]
    type ChainState =
        {
            /// The member transforms' states, in chain order.
            States: ITransformState list
        }

        interface ITransformState with
            member s.Names =
                s.States |> List.mapi (fun i part -> part.Names |> List.map (sprintf "%d.%s" i)) |> List.concat

            member s.Export() =
                s.States
                |> List.mapi (fun i part -> part.Export() |> List.map (fun (name, t) -> sprintf "%d.%s" i name, t))
                |> List.concat

            member s.Import entry =
                { States = s.States |> List.mapi (fun i part -> part.Import(fun name -> entry (sprintf "%d.%s" i name))) }

            member s.Dispose() =
                for part in s.States do
                    part.Dispose()

    /// Applies the transforms one after the other, each to the previous one's output (Optax's chain).
    /// The empty chain is the identity.
    let chain (transforms: Transform list) : Transform =
        { Init = fun parameters -> { States = transforms |> List.map (fun t -> t.Init parameters) } :> ITransformState
          Update =
            fun updates state parameters ->
                let s = own<ChainState> "chain" state
                if s.States.Length <> transforms.Length then
                    invalidArg (nameof state) (sprintf "chain of %d transforms given a state of %d" transforms.Length s.States.Length)
                let result, states =
                    List.fold2
                        (fun (current, acc) (t: Transform) part ->
                            let next, memberState = t.Update current part parameters
                            next, memberState :: acc)
                        (updates, [])
                        transforms
                        s.States
                result, { States = List.rev states } :> ITransformState }

    /// The state's tensors under stable names, for checkpoints (e.g. "0.adam.exp_avg",
    /// "0.adam.exp_avg_sq", "0.adam.step", "2.learning_rate.count" for Optimizer.adamW). Buffers come
    /// as fresh handles sharing their storage and counters as fresh 0-dim int64 tensors; the caller
    /// disposes them.
    let stateTensors (state: ITransformState) : (string * torch.Tensor) list = state.Export()

    /// Loads tensors written by stateTensors into a state made by the same transform's Init (for the same
    /// parameter layout): buffers are overwritten in place, counters replaced; returns the state to
    /// continue with. A missing, unexpected, duplicated or misshaped entry raises InvalidInputException.
    let loadStateTensors (entries: (string * torch.Tensor) seq) (state: ITransformState) : ITransformState =
        let entries = List.ofSeq entries
        match entries |> List.countBy fst |> List.tryFind (fun (_, n) -> n > 1) with
        | Some(name, _) -> InvalidInput.fail stateOrigin name "appears more than once"
        | None -> ()
        let given = dict entries
        let expected = state.Names
        match expected |> List.tryFind (given.ContainsKey >> not) with
        | Some name -> InvalidInput.fail stateOrigin name "missing from the optimizer state"
        | None -> ()
        match entries |> List.tryFind (fun (name, _) -> not (List.contains name expected)) with
        | Some(name, _) ->
            InvalidInput.fail stateOrigin name (sprintf "not part of this optimizer's state (expected %s)" (String.Join(", ", expected)))
        | None -> ()
        use _ = torch.no_grad ()
        state.Import(fun name -> given[name])

    /// The first member state of type 'S in the state, searching chains depth first in chain order
    /// (the state itself first): a typed query that does not depend on how the chain is nested.
    let rec tryFindState<'S when 'S :> ITransformState> (state: ITransformState) : 'S option =
        match box state with
        | :? 'S as found -> Some found
        | _ ->
            match state with
            | :? ChainState as chained -> List.tryPick tryFindState<'S> chained.States
            | _ -> None

    /// The state with its first member of type 'S (in tryFindState's order) replaced by update of it,
    /// and whether there was one; every other member, and the chains' shape, stay as they are.
    let rec private replaceFirst<'S when 'S :> ITransformState> (update: 'S -> 'S) (state: ITransformState) : ITransformState * bool =
        match box state with
        | :? 'S as found -> (update found :> ITransformState), true
        | _ ->
            match state with
            | :? ChainState as chained ->
                let members, replaced =
                    chained.States
                    |> List.fold
                        (fun (acc, replaced) part ->
                            if replaced then part :: acc, true
                            else
                                let next, found = replaceFirst update part
                                next :: acc, found)
                        ([], false)
                ({ chained with States = List.rev members } :> ITransformState), replaced
            | _ -> state, false

    /// The state with its first member of type 'S (in tryFindState's order) replaced by update of it;
    /// None when the state holds no 'S.
    let tryReplaceState<'S when 'S :> ITransformState> (update: 'S -> 'S) (state: ITransformState) : ITransformState option =
        match replaceFirst update state with
        | next, true -> Some next
        | _, false -> None

    /// The pre-clip global gradient norm of the last update: the LastNorm of the first clipByGlobalNorm
    /// in the state (searching chains in order); NaN when there is none or before the first update.
    let lastGradNorm (state: ITransformState) : float =
        tryFindState<ClipState> state |> Option.map (fun clip -> clip.LastNorm) |> Option.defaultValue nan

    /// The updates the optimizer has applied: the count of the first scaleByLearningRate in the state
    /// (every optimizer chain here holds one); None when it holds none.
    let tryUpdateCount (state: ITransformState) : int option =
        tryFindState<LearningRateState> state |> Option.map (fun rate -> rate.Count)
