namespace Functional.Optim

open System
open TorchSharp

/// An optimizer as the trainer runs it on flat buffers: a transform, which makes the state (and so
/// names the checkpoint entries) and defines the update, and the step that carries the update out,
/// through the transform's Update (Optimizer.unfused) or through one fused pass over memory equal to it
/// to float rounding (Optimizer.fusedAdamW, as torch.optim.AdamW(fused=True)).
[<NoEquality; NoComparison>]
type FlatOptimizer =
    {
        /// The transform: Init makes the state, Update is the reference computation of a step.
        Transform: Transform
        /// One step under no_grad: (flat, state, compute copy) -> next state. Updates flat.Values in place
        /// as Optimizer.apply does; flat.Grads are consumed (zero them before the next accumulation).
        /// When a compute copy is given (a bf16 or fp16 buffer laid out as Values, the trainer's
        /// mixed-precision copy), the updated values are written into it, converted. The given state must
        /// not be used again.
        Step: FlatParameters -> ITransformState -> torch.Tensor option -> ITransformState
    }

/// Optimizers as chains of transforms, equal to torch.optim's, and their application to flat buffers.
[<RequireQualifiedAccess>]
module Optimizer =

    /// torch.optim.AdamW (HF Trainer's "adamw_torch"): p = p (1 - lr wd mask) - lr mhat / (sqrt(vhat) + eps)
    /// with decoupled weight decay scaled by the scheduled lr, as
    /// chain [scaleByAdam b1 b2 eps; addDecayedWeights weightDecay mask; scaleByLearningRate schedule].
    /// The mask (FlatParameters.mask) selects the parameters that decay. HF defaults: b1 = 0.9,
    /// b2 = 0.999, eps = 1e-8, weightDecay = 0.
    let adamW
        (schedule: int -> float)
        (b1: float)
        (b2: float)
        (eps: float)
        (weightDecay: float)
        (mask: torch.Tensor)
        : Transform =
        Transform.chain
            [ Transform.scaleByAdam b1 b2 eps
              Transform.addDecayedWeights weightDecay mask
              Transform.scaleByLearningRate schedule ]

    /// torch.optim.SGD with dampening 0: coupled L2 weight decay first (g = g + wd mask p), then
    /// momentum (plain or Nesterov; left out when momentum is 0), then p = p - lr g, as
    /// chain [addDecayedWeights weightDecay mask; trace momentum nesterov; scaleByLearningRate schedule].
    let sgd
        (schedule: int -> float)
        (momentum: float)
        (nesterov: bool)
        (weightDecay: float)
        (mask: torch.Tensor)
        : Transform =
        Transform.chain
            [ yield Transform.addDecayedWeights weightDecay mask
              if momentum <> 0.0 || nesterov then yield Transform.trace momentum nesterov
              yield Transform.scaleByLearningRate schedule ]

    /// The optimizer preceded by gradient clipping at maxNorm (Transform.clipByGlobalNorm; 0 only
    /// measures the norm), as HF Trainer clips before optimizer.step(). The state's names get a "1."
    /// prefix for the optimizer's part.
    let withClipping (maxNorm: float) (optimizer: Transform) : Transform =
        Transform.chain [ Transform.clipByGlobalNorm maxNorm; optimizer ]

    /// The trainer's chain: chain [Transform.clipByGlobalNorm maxNorm; optimizer], followed by
    /// Transform.scaleByFactors when per-parameter learning-rate factors are given. State names: "0."
    /// for clipping, "1." for the optimizer, "2." for the factors.
    let trainerChain (maxNorm: float) (optimizer: Transform) (factors: torch.Tensor option) : Transform =
        Transform.chain
            [ yield Transform.clipByGlobalNorm maxNorm
              yield optimizer
              match factors with
              | Some f -> yield Transform.scaleByFactors f
              | None -> () ]

    /// One optimizer step on flat parameters under no_grad: runs the transform on flat.Grads and adds
    /// the resulting updates to flat.Values in place (so the model's parameters change). Returns the
    /// next state; the given one must not be used again. The gradients are consumed: the transforms
    /// work in place, so flat.Grads holds the applied update afterwards; zero them
    /// (FlatParameters.zeroGrads) before the next accumulation. Run it inside the step's dispose scope.
    let apply (transform: Transform) (flat: FlatParameters) (state: ITransformState) : ITransformState =
        use _ = torch.no_grad ()
        let updates, next = transform.Update flat.Grads state flat.Values
        flat.Values.add_ updates |> ignore
        next

    /// The transform stepped by Optimizer.apply, then the compute copy (when given) refreshed by one
    /// converting copy. Works for any transform and device.
    let unfused (transform: Transform) : FlatOptimizer =
        { Transform = transform
          Step =
            fun flat state compute ->
                let next = apply transform flat state
                match compute with
                | Some copy ->
                    use _ = torch.no_grad ()
                    copy.copy_ flat.Values |> ignore
                | None -> ()
                next }

    /// The states of fusedAdamW's chain, checked.
    let private adamWStates (state: ITransformState) =
        let fail () =
            invalidArg (nameof state) (sprintf "fusedAdamW was given a %s, not the state its Init made" (state.GetType().Name))
        match state with
        | :? Transform.ChainState as outer ->
            match outer.States with
            | (:? Transform.ClipState) :: (:? Transform.ChainState as inner) :: rest ->
                match inner.States with
                | [ :? Transform.AdamState as adam; decay; :? Transform.LearningRateState as rate ] -> outer, inner, adam, decay, rate, rest
                | _ -> fail ()
            | _ -> fail ()
        | _ -> fail ()

    /// HF Trainer's AdamW step, fused: the transform is
    /// trainerChain maxNorm (adamW schedule b1 b2 eps weightDecay mask) factors (its state and
    /// checkpoint names are those of that chain), and a step measures the gradients' global norm, then
    /// updates the parameters, both moments and the compute copy in one pass over memory, spread over
    /// torch's intra-op threads. The unfused chain makes about fifteen passes over the buffers: at 92M
    /// parameters the fused step takes about 45 ms against 230 ms on this project's 2-core machine (see
    /// docs/benchmarks.md). Same arithmetic in float32, operation for operation, as the unfused transforms,
    /// so results agree to float rounding (libtorch may fuse a multiply-add where .NET does not).
    ///
    /// Buffers that are not contiguous CPU tensors (parameters on an accelerator, for instance) take
    /// the unfused path (Optimizer.unfused); so does a mask that is not when weightDecay is not 0 (the
    /// mask is not read otherwise: FlatParameters.uniform will do). An fp16 compute copy is refreshed by
    /// a converting copy after the kernel.
    let fusedAdamW
        (maxNorm: float)
        (schedule: int -> float)
        (b1: float)
        (b2: float)
        (eps: float)
        (weightDecay: float)
        (mask: torch.Tensor)
        (factors: torch.Tensor option)
        : FlatOptimizer =
        let transform = trainerChain maxNorm (adamW schedule b1 b2 eps weightDecay mask) factors
        let fallback = unfused transform
        let plain = TensorMemory.isPlain torch.float32
        let step (flat: FlatParameters) (state: ITransformState) (compute: torch.Tensor option) =
            let outer, inner, adam, decay, rate, rest = adamWStates state
            let bf16Copy = compute |> Option.filter (TensorMemory.isPlain torch.bfloat16)
            let fusable =
                plain flat.Values && plain flat.Grads && plain adam.ExpAvg && plain adam.ExpAvgSq
                && (weightDecay = 0.0 || plain mask)
                && (factors |> Option.forall plain)
                && flat.Values.numel () = flat.Grads.numel ()
                && (bf16Copy |> Option.forall (fun c -> c.numel () = flat.Values.numel ()))
            if not fusable then fallback.Step flat state compute
            else
                use _ = torch.no_grad ()
                let norm = Transform.globalNorm flat.Grads
                let t = adam.Count + 1
                let stepScale, scaledEps = Transform.adamScales b1 b2 eps t
                let constants: AdamWConstants =
                    { GradScale = Transform.clipCoefficient maxNorm norm |> Option.map float32 |> Option.defaultValue 1.0f
                      Beta1 = float32 b1
                      OneMinusBeta1 = float32 (1.0 - b1)
                      Beta2 = float32 b2
                      OneMinusBeta2 = float32 (1.0 - b2)
                      StepScale = float32 stepScale
                      ScaledEps = float32 scaledEps
                      WeightDecay = float32 weightDecay
                      NegativeLearningRate = float32 (-(schedule rate.Count)) }
                let buffers: AdamWBuffers =
                    { Count = flat.Values.numel ()
                      Parameters = TensorMemory.address flat.Values
                      Gradients = TensorMemory.address flat.Grads
                      ExpAvg = TensorMemory.address adam.ExpAvg
                      ExpAvgSq = TensorMemory.address adam.ExpAvgSq
                      DecayMask = if weightDecay <> 0.0 then TensorMemory.address mask else 0n
                      Factors = factors |> Option.map TensorMemory.address |> Option.defaultValue 0n
                      Bf16Copy = bf16Copy |> Option.map TensorMemory.address |> Option.defaultValue 0n }
                FusedKernels.adamW (torch.get_num_threads ()) constants buffers
                match compute with
                | Some copy when bf16Copy.IsNone -> copy.copy_ flat.Values |> ignore
                | _ -> ()
                let adamNext: Transform.AdamState = { adam with Count = t }
                let rateNext: Transform.LearningRateState = { Count = rate.Count + 1 }
                let innerNext: Transform.ChainState = { inner with States = [ adamNext; decay; rateNext ] }
                let clipNext: Transform.ClipState = { LastNorm = norm }
                { outer with States = (clipNext :> ITransformState) :: (innerNext :> ITransformState) :: rest } :> ITransformState
        { Transform = transform; Step = step }
