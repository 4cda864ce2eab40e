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
            /// With AMSGrad, the running maximum of v (torch's "max_exp_avg_sq"); None otherwise.
            MaxExpAvgSq: torch.Tensor option
        }

        interface ITransformState with
            member s.Names =
                [ yield "adam.exp_avg"
                  yield "adam.exp_avg_sq"
                  if s.MaxExpAvgSq.IsSome then yield "adam.max_exp_avg_sq"
                  yield "adam.step" ]

            member s.Export() =
                [ yield "adam.exp_avg", s.ExpAvg.alias ()
                  yield "adam.exp_avg_sq", s.ExpAvgSq.alias ()
                  match s.MaxExpAvgSq with
                  | Some m -> yield "adam.max_exp_avg_sq", m.alias ()
                  | None -> ()
                  yield "adam.step", countTensor s.Count ]

            member s.Import entry =
                { Count = readCount "adam.step" (entry "adam.step")
                  ExpAvg = copyInto "adam.exp_avg" s.ExpAvg (entry "adam.exp_avg")
                  ExpAvgSq = copyInto "adam.exp_avg_sq" s.ExpAvgSq (entry "adam.exp_avg_sq")
                  MaxExpAvgSq = s.MaxExpAvgSq |> Option.map (fun m -> copyInto "adam.max_exp_avg_sq" m (entry "adam.max_exp_avg_sq")) }

            member s.Dispose() =
                s.ExpAvg.Dispose()
                s.ExpAvgSq.Dispose()
                s.MaxExpAvgSq |> Option.iter (fun m -> m.Dispose())

    /// The factors of Adam's update t (from 1) as scaleByAdam applies them: the step scale
    /// sqrt(1 - b2^t) / (1 - b1^t) and the scaled epsilon eps sqrt(1 - b2^t).
    let adamScales (b1: float) (b2: float) (eps: float) (t: int) : float * float =
        let biasCorrection1 = 1.0 - Math.Pow(b1, float t)
        let biasCorrection2Sqrt = Math.Sqrt(1.0 - Math.Pow(b2, float t))
        biasCorrection2Sqrt / biasCorrection1, eps * biasCorrection2Sqrt

    /// Adam's scaling with torch.optim.Adam(W)'s options: with maximize the gradient is negated first
    /// (the parameters climb the objective, as torch's maximize = True); with amsgrad the denominator
    /// uses the running maximum of the second moment, vmax = max(vmax, v), instead of v (torch's
    /// amsgrad = True, the maximum taken before bias correction). scaleByAdam is scaleByAdamWith with
    /// both off.
    let scaleByAdamWith (b1: float) (b2: float) (eps: float) (amsgrad: bool) (maximize: bool) : Transform =
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
                { Count = 0
                  ExpAvg = buffer parameters
                  ExpAvgSq = buffer parameters
                  MaxExpAvgSq = if amsgrad then Some(buffer parameters) else None }
                :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<AdamState> "scaleByAdam" state
                let t = s.Count + 1
                if maximize then updates.neg_ () |> ignore
                s.ExpAvg.mul_(beta1).add_(updates, oneMinusBeta1) |> ignore
                s.ExpAvgSq.mul_(beta2).addcmul_(updates, updates, oneMinusBeta2) |> ignore
                let denominator =
                    match s.MaxExpAvgSq with
                    | Some m ->
                        use larger = torch.maximum(m, s.ExpAvgSq)
                        m.copy_ larger |> ignore
                        m
                    | None -> s.ExpAvgSq
                let stepFactor, epsFactor = adamScales b1 b2 eps t
                use scaledEps = epsFactor.ToScalar()
                use stepScale = stepFactor.ToScalar()
                updates.copy_(denominator).sqrt_().add_(scaledEps).reciprocal_().mul_(s.ExpAvg).mul_(stepScale)
                |> ignore
                updates, { s with Count = t } :> ITransformState }

    /// Adam's scaling, with torch.optim.Adam(W)'s formula: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    /// t = Count + 1; u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps), eps added after the bias
    /// correction of sqrt(v). Computed in place into the updates as
    /// u = m * (sqrt(1 - b2^t) / (1 - b1^t)) / (sqrt(v) + eps sqrt(1 - b2^t)), the same quantity.
    /// HF defaults: b1 = 0.9, b2 = 0.999, eps = 1e-8.
    let scaleByAdam (b1: float) (b2: float) (eps: float) : Transform = scaleByAdamWith b1 b2 eps false false

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
            /// With a dampening other than 0, whether the buffer was set by a first update (exported as the
            /// 0/1 counter "trace.started"); None without dampening, where a zero buffer already makes
            /// the first update buf = u.
            Started: bool option
        }

        interface ITransformState with
            member s.Names =
                [ yield "trace.momentum_buffer"
                  if s.Started.IsSome then yield "trace.started" ]

            member s.Export() =
                [ yield "trace.momentum_buffer", s.MomentumBuffer.alias ()
                  match s.Started with
                  | Some started -> yield "trace.started", countTensor (if started then 1 else 0)
                  | None -> () ]

            member s.Import entry =
                { MomentumBuffer = copyInto "trace.momentum_buffer" s.MomentumBuffer (entry "trace.momentum_buffer")
                  Started =
                    s.Started
                    |> Option.map (fun _ ->
                        match readCount "trace.started" (entry "trace.started") with
                        | 0 -> false
                        | 1 -> true
                        | n -> InvalidInput.fail stateOrigin "trace.started" (sprintf "expected 0 or 1, found %d" n)) }

            member s.Dispose() = s.MomentumBuffer.Dispose()

    /// Momentum with dampening, as torch.optim.SGD: buf = u on the first update (undampened, as torch
    /// initializes its buffer with the gradient), then buf = momentum * buf + (1 - dampening) * u; the
    /// result is u + momentum * buf with Nesterov, else buf. Nesterov needs momentum > 0 and dampening 0
    /// (as torch). With dampening 0 this is trace.
    let traceWithDampening (momentum: float) (dampening: float) (nesterov: bool) : Transform =
        checkOption (Double.IsFinite momentum && momentum >= 0.0) "{momentum}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" momentum)
        checkOption (Double.IsFinite dampening) "{dampening}" (fun () -> sprintf "must be a finite number, got %g" dampening)
        checkOption (not nesterov || momentum > 0.0) "{nesterov}" (fun () -> "needs a momentum > 0 (as torch.optim.SGD)")
        checkOption (not nesterov || dampening = 0.0) "{nesterov}" (fun () -> "needs a dampening of 0 (as torch.optim.SGD)")
        TorchRuntime.ensure ()
        let mu = momentum.ToScalar()
        let damped = (1.0 - dampening).ToScalar()
        { Init =
            fun parameters ->
                { MomentumBuffer = buffer parameters; Started = if dampening <> 0.0 then Some false else None }
                :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<TraceState> "trace" state
                match s.Started with
                | Some false -> s.MomentumBuffer.copy_ updates |> ignore
                | Some true -> s.MomentumBuffer.mul_(mu).add_(updates, damped) |> ignore
                | None -> s.MomentumBuffer.mul_(mu).add_ updates |> ignore
                if nesterov then updates.add_(s.MomentumBuffer, mu) |> ignore
                else updates.copy_ s.MomentumBuffer |> ignore
                updates, { s with Started = s.Started |> Option.map (fun _ -> true) } :> ITransformState }

    /// Momentum, as torch.optim.SGD with dampening 0: buf = u on the first update, then
    /// buf = momentum * buf + u; the result is u + momentum * buf with Nesterov, else buf.
    /// Nesterov needs momentum > 0 (as torch).
    let trace (momentum: float) (nesterov: bool) : Transform = traceWithDampening momentum 0.0 nesterov

    /// scaleByLion's state: the momentum (Lion's "exp_avg").
    [<NoEquality; NoComparison>]
    type LionState =
        {
            /// m = b2 m + (1 - b2) g, starting at zero.
            ExpAvg: torch.Tensor
        }

        interface ITransformState with
            member _.Names = [ "lion.exp_avg" ]
            member s.Export() = [ "lion.exp_avg", s.ExpAvg.alias () ]
            member s.Import entry = { ExpAvg = copyInto "lion.exp_avg" s.ExpAvg (entry "lion.exp_avg") }
            member s.Dispose() = s.ExpAvg.Dispose()

    /// Lion's sign update (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    /// u = sign(b1 m + (1 - b1) g), then m = b2 m + (1 - b2) g. Every entry of the result is -1, 0 or 1;
    /// chained with addDecayedWeights and scaleByLearningRate it is Lion with decoupled weight decay,
    /// p = p (1 - lr wd) - lr u. Published defaults: b1 = 0.9, b2 = 0.99.
    let scaleByLion (b1: float) (b2: float) : Transform =
        checkOption (b1 >= 0.0 && b1 <= 1.0) "{adam_beta1}" (fun () -> sprintf "must lie in [0, 1], got %g" b1)
        checkOption (b2 >= 0.0 && b2 <= 1.0) "{adam_beta2}" (fun () -> sprintf "must lie in [0, 1], got %g" b2)
        TorchRuntime.ensure ()
        let beta1 = b1.ToScalar()
        let oneMinusBeta1 = (1.0 - b1).ToScalar()
        let beta2 = b2.ToScalar()
        let oneMinusBeta2 = (1.0 - b2).ToScalar()
        { Init = fun parameters -> { ExpAvg = buffer parameters } :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<LionState> "scaleByLion" state
                use interpolated = s.ExpAvg.mul(beta1).add_(updates, oneMinusBeta1)
                s.ExpAvg.mul_(beta2).add_(updates, oneMinusBeta2) |> ignore
                updates.copy_(interpolated).sign_ () |> ignore
                updates, state }

    /// scaleByRms's state: the running averages of torch.optim.RMSprop.
    [<NoEquality; NoComparison>]
    type RmsState =
        {
            /// v = alpha v + (1 - alpha) g^2 (torch's "square_avg").
            SquareAvg: torch.Tensor
            /// When centered, the running mean of g (torch's "grad_avg"); None otherwise.
            GradAvg: torch.Tensor option
        }

        interface ITransformState with
            member s.Names =
                [ yield "rmsprop.square_avg"
                  if s.GradAvg.IsSome then yield "rmsprop.grad_avg" ]

            member s.Export() =
                [ yield "rmsprop.square_avg", s.SquareAvg.alias ()
                  match s.GradAvg with
                  | Some g -> yield "rmsprop.grad_avg", g.alias ()
                  | None -> () ]

            member s.Import entry =
                { SquareAvg = copyInto "rmsprop.square_avg" s.SquareAvg (entry "rmsprop.square_avg")
                  GradAvg = s.GradAvg |> Option.map (fun g -> copyInto "rmsprop.grad_avg" g (entry "rmsprop.grad_avg")) }

            member s.Dispose() =
                s.SquareAvg.Dispose()
                s.GradAvg |> Option.iter (fun g -> g.Dispose())

    /// RMSprop's scaling, as torch.optim.RMSprop: v = alpha v + (1 - alpha) g^2; u = g / (sqrt(v) + eps),
    /// or, centered, with a = alpha a + (1 - alpha) g, u = g / (sqrt(v - a^2) + eps). Momentum, coupled
    /// weight decay and the learning rate are separate transforms (Optimizer.rmsprop). torch defaults:
    /// alpha = 0.99, eps = 1e-8, centered = false.
    let scaleByRms (alpha: float) (eps: float) (centered: bool) : Transform =
        checkOption (alpha >= 0.0 && alpha <= 1.0) "{rmsprop_alpha}" (fun () -> sprintf "must lie in [0, 1], got %g" alpha)
        checkOption (Double.IsFinite eps && eps >= 0.0) "{adam_epsilon}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" eps)
        TorchRuntime.ensure ()
        let decay = alpha.ToScalar()
        let oneMinusDecay = (1.0 - alpha).ToScalar()
        let epsilon = eps.ToScalar()
        let minusOne = (-1.0).ToScalar()
        { Init =
            fun parameters ->
                { SquareAvg = buffer parameters; GradAvg = if centered then Some(buffer parameters) else None }
                :> ITransformState
          Update =
            fun updates state _ ->
                let s = own<RmsState> "scaleByRms" state
                s.SquareAvg.mul_(decay).addcmul_(updates, updates, oneMinusDecay) |> ignore
                use denominator =
                    match s.GradAvg with
                    | Some g ->
                        g.mul_(decay).add_(updates, oneMinusDecay) |> ignore
                        s.SquareAvg.addcmul(g, g, minusOne).sqrt_().add_ epsilon
                    | None -> s.SquareAvg.sqrt().add_ epsilon
                updates.div_ denominator |> ignore
                updates, state }

    /// One parameter's place in a flat buffer: its first element and its shape (FlatParameters'
    /// Offsets and Shapes); what a transform with per-tensor statistics (scaleByAdafactor) needs.
    [<NoComparison>]
    type ParameterSlot =
        {
            /// The parameter's first element in the flat buffer.
            Offset: int64
            /// The parameter's shape.
            Shape: int64[]
        }

    /// The slots of every parameter of flat buffers, in order.
    let slotsOf (flat: FlatParameters) : ParameterSlot list =
        List.map2 (fun offset shape -> { Offset = offset; Shape = shape }) flat.Offsets flat.Shapes

    /// scaleByAdafactor's settings, named after transformers' Adafactor (fairseq's).
    [<NoComparison>]
    type AdafactorSettings =
        {
            /// Added to the squared gradient (default 1e-30).
            Eps1: float
            /// The least parameter scale (default 1e-3).
            Eps2: float
            /// Updates are scaled down to this root mean square (default 1.0).
            ClipThreshold: float
            /// The second moment's decay at step t is 1 - t^DecayRate (default -0.8).
            DecayRate: float
            /// Multiply the step by the relative step size min(1e-2, 1 / sqrt t) (transformers' default true;
            /// HF Trainer's optim="adafactor" turns it off and uses the learning rate).
            RelativeStep: bool
            /// Multiply the step by max(Eps2, RMS(p)) of each parameter (transformers' default true; off
            /// in HF Trainer's optim="adafactor").
            ScaleParameter: bool
            /// With RelativeStep, the relative step is min(1e-6 t, 1 / sqrt t) (default false).
            WarmupInit: bool
            /// Decoupled weight decay, scaled by the step size (default 0).
            WeightDecay: float
        }

    /// transformers' Adafactor defaults (lr = None: relative steps, parameter scale), no weight decay.
    let adafactorDefaults: AdafactorSettings =
        { Eps1 = 1e-30
          Eps2 = 1e-3
          ClipThreshold = 1.0
          DecayRate = -0.8
          RelativeStep = true
          ScaleParameter = true
          WarmupInit = false
          WeightDecay = 0.0 }

    /// scaleByAdafactor's state: the update count and the second-moment statistics of all parameters,
    /// each kind concatenated in parameter order in one [1, n] buffer (two-dimensional, so that
    /// checkpoints keep them whole instead of splitting them as parameter-shaped buffers).
    [<NoEquality; NoComparison>]
    type AdafactorState =
        {
            /// Updates done so far (transformers' "step"); the next update uses t = Count + 1.
            Count: int
            /// Row statistics of the factored parameters (two or more dimensions): shape[:-1] each.
            ExpAvgSqRow: torch.Tensor
            /// Column statistics of the factored parameters: shape[:-2] + shape[-1:] each.
            ExpAvgSqCol: torch.Tensor
            /// Full second moments of the other parameters.
            ExpAvgSq: torch.Tensor
        }

        interface ITransformState with
            member _.Names = [ "adafactor.exp_avg_sq_row"; "adafactor.exp_avg_sq_col"; "adafactor.exp_avg_sq"; "adafactor.step" ]

            member s.Export() =
                [ "adafactor.exp_avg_sq_row", s.ExpAvgSqRow.alias ()
                  "adafactor.exp_avg_sq_col", s.ExpAvgSqCol.alias ()
                  "adafactor.exp_avg_sq", s.ExpAvgSq.alias ()
                  "adafactor.step", countTensor s.Count ]

            member s.Import entry =
                { Count = readCount "adafactor.step" (entry "adafactor.step")
                  ExpAvgSqRow = copyInto "adafactor.exp_avg_sq_row" s.ExpAvgSqRow (entry "adafactor.exp_avg_sq_row")
                  ExpAvgSqCol = copyInto "adafactor.exp_avg_sq_col" s.ExpAvgSqCol (entry "adafactor.exp_avg_sq_col")
                  ExpAvgSq = copyInto "adafactor.exp_avg_sq" s.ExpAvgSq (entry "adafactor.exp_avg_sq") }

            member s.Dispose() =
                s.ExpAvgSqRow.Dispose()
                s.ExpAvgSqCol.Dispose()
                s.ExpAvgSq.Dispose()

    /// Where one parameter's statistics lie in AdafactorState's buffers.
    [<NoComparison>]
    type private AdafactorSlot =
        { Slot: ParameterSlot
          Count: int64
          Factored: bool
          /// Offset and shape in the row buffer (factored), or in the full buffer (otherwise).
          RowOffset: int64
          RowShape: int64[]
          ColOffset: int64
          ColShape: int64[] }

    let private adafactorLayout (slots: ParameterSlot list) =
        let mutable rows = 0L
        let mutable cols = 0L
        let mutable full = 0L
        let placed =
            [ for slot in slots ->
                let count = Array.fold (*) 1L slot.Shape
                if slot.Shape.Length >= 2 then
                    let rowShape = slot.Shape[.. slot.Shape.Length - 2]
                    let colShape = Array.append slot.Shape[.. slot.Shape.Length - 3] [| slot.Shape[slot.Shape.Length - 1] |]
                    let placedSlot =
                        { Slot = slot; Count = count; Factored = true
                          RowOffset = rows; RowShape = rowShape; ColOffset = cols; ColShape = colShape }
                    rows <- rows + Array.fold (*) 1L rowShape
                    cols <- cols + Array.fold (*) 1L colShape
                    placedSlot
                else
                    let placedSlot =
                        { Slot = slot; Count = count; Factored = false
                          RowOffset = full; RowShape = slot.Shape; ColOffset = 0L; ColShape = [||] }
                    full <- full + count
                    placedSlot ]
        placed, rows, cols, full

    /// Adafactor's scaling (Shazeer and Stern 2018) with transformers' (fairseq's) conventions, without
    /// first moment: at t = Count + 1, beta2t = 1 - t^DecayRate and s = g^2 + Eps1; a parameter of two or
    /// more dimensions keeps row and column means R = beta2t R + (1 - beta2t) mean_-1(s) and
    /// C = beta2t C + (1 - beta2t) mean_-2(s) and takes u = g / sqrt((R / mean(R)) C) (factored), any other
    /// keeps V = beta2t V + (1 - beta2t) s and takes u = g / sqrt(V); then u = u / max(1, RMS(u) / ClipThreshold),
    /// and the result is alpha (u + WeightDecay mask p) with alpha = the relative step (when RelativeStep)
    /// times max(Eps2, RMS(p)) (when ScaleParameter), per parameter. Chained with scaleByLearningRate
    /// (the schedule, or 1 with relative steps) it is transformers' Adafactor step. The slots must cover
    /// the parameters (Transform.slotsOf); the mask is read only when WeightDecay is not 0.
    let scaleByAdafactor (slots: ParameterSlot list) (settings: AdafactorSettings) (mask: torch.Tensor) : Transform =
        checkOption (Double.IsFinite settings.Eps1 && settings.Eps1 >= 0.0) "{adafactor_eps1}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" settings.Eps1)
        checkOption (Double.IsFinite settings.Eps2 && settings.Eps2 >= 0.0) "{adafactor_eps2}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" settings.Eps2)
        checkOption (Double.IsFinite settings.ClipThreshold && settings.ClipThreshold > 0.0) "{adafactor_clip_threshold}" (fun () ->
            sprintf "must be a finite number > 0, got %g" settings.ClipThreshold)
        checkOption (Double.IsFinite settings.DecayRate && settings.DecayRate < 0.0) "{adafactor_decay_rate}" (fun () ->
            sprintf "must be a finite number < 0, got %g" settings.DecayRate)
        checkOption (Double.IsFinite settings.WeightDecay && settings.WeightDecay >= 0.0) "{weight_decay}" (fun () ->
            sprintf "must be a finite number >= 0, got %g" settings.WeightDecay)
        TorchRuntime.ensure ()
        let placed, rows, cols, full = adafactorLayout slots
        let total = placed |> List.sumBy (fun p -> p.Count)
        let eps1 = settings.Eps1.ToScalar()
        let clip = settings.ClipThreshold.ToScalar()
        let one = (1.0).ToScalar()
        let statistics (parameters: torch.Tensor) (n: int64) =
            (torch.zeros([| 1L; n |], dtype = parameters.dtype, device = parameters.device)).DetachFromDisposeScope()
        { Init =
            fun parameters ->
                if parameters.numel () <> total then
                    invalidArg (nameof slots) (sprintf "the slots cover %d elements, the parameters have %d" total (parameters.numel ()))
                if settings.WeightDecay <> 0.0 && mask.numel () <> parameters.numel () then
                    invalidArg (nameof mask) (sprintf "the weight-decay mask has %d elements, the parameters %d" (mask.numel ()) (parameters.numel ()))
                { Count = 0
                  ExpAvgSqRow = statistics parameters rows
                  ExpAvgSqCol = statistics parameters cols
                  ExpAvgSq = statistics parameters full }
                :> ITransformState
          Update =
            fun updates state parameters ->
                let s = own<AdafactorState> "scaleByAdafactor" state
                let t = s.Count + 1
                let beta2t = 1.0 - Math.Pow(float t, settings.DecayRate)
                let relativeStep =
                    if settings.RelativeStep then
                        let least = if settings.WarmupInit then 1e-6 * float t else 1e-2
                        Math.Min(least, 1.0 / Math.Sqrt(float t))
                    else 1.0
                for p in placed do
                    use _ = torch.NewDisposeScope()
                    let g = updates.narrow(0, p.Slot.Offset, p.Count).view p.Slot.Shape
                    let value = parameters.narrow(0, p.Slot.Offset, p.Count).view p.Slot.Shape
                    use root = (Math.Sqrt(float p.Count)).ToScalar()
                    let rms (x: torch.Tensor) = x.norm(2.0f).div_ root
                    let scale =
                        if settings.ScaleParameter then Math.Max(settings.Eps2, (rms value).to_type(torch.float64).item<float> ())
                        else 1.0
                    let alpha = scale * relativeStep
                    let squared = g.mul(g).add_ eps1
                    use keep = beta2t.ToScalar()
                    use blend = (1.0 - beta2t).ToScalar()
                    use step = alpha.ToScalar()
                    use decay = (settings.WeightDecay * alpha).ToScalar()
                    let u =
                        if p.Factored then
                            let rowCount = Array.fold (*) 1L p.RowShape
                            let colCount = Array.fold (*) 1L p.ColShape
                            let row = s.ExpAvgSqRow.narrow(1, p.RowOffset, rowCount).view p.RowShape
                            let col = s.ExpAvgSqCol.narrow(1, p.ColOffset, colCount).view p.ColShape
                            row.mul_(keep).add_(squared.mean([| -1L |]), blend) |> ignore
                            col.mul_(keep).add_(squared.mean([| -2L |]), blend) |> ignore
                            let rowFactor = row.div(row.mean([| -1L |], keepdim = true)).rsqrt_().unsqueeze(-1L)
                            let colFactor = col.unsqueeze(-2L).rsqrt()
                            rowFactor.mul(colFactor).mul_ g
                        else
                            let second = s.ExpAvgSq.narrow(1, p.RowOffset, p.Count).view p.Slot.Shape
                            second.mul_(keep).add_(squared, blend) |> ignore
                            second.rsqrt().mul_ g
                    let divisor = (rms u).div_(clip).clamp_min one
                    u.div_(divisor).mul_ step |> ignore
                    if settings.WeightDecay <> 0.0 then
                        let decayMask = mask.narrow(0, p.Slot.Offset, p.Count).view p.Slot.Shape
                        u.addcmul_(decayMask, value, decay) |> ignore
                    g.copy_ u |> ignore
                updates, { s with Count = t } :> ITransformState }

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
