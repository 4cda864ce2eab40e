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

/// The hyperparameters of HF Trainer's AdamW step, clipping included (Optimizer.adamWChain,
/// Optimizer.fusedAdamW): the fused kernel reads them from here, by name, rather than from the chain's
/// nesting.
[<NoEquality; NoComparison>]
type AdamWConfig =
    {
        /// The learning rate of update k (from 0).
        Schedule: int -> float
        /// The first moment's decay b1 (HF default 0.9).
        Beta1: float
        /// The second moment's decay b2 (HF default 0.999).
        Beta2: float
        /// Adam's epsilon (HF default 1e-8).
        Epsilon: float
        /// Decoupled weight decay, scaled by the scheduled learning rate (HF default 0).
        WeightDecay: float
        /// The flat 0/1 mask of the parameters that decay (FlatParameters.mask), laid out as the
        /// parameters; read only when WeightDecay is not 0 (FlatParameters.uniform will do then).
        DecayMask: torch.Tensor
        /// Clipping at this global gradient norm; 0 only measures the norm (HF's max_grad_norm).
        MaxGradNorm: float
        /// How the clip norm is reduced across processes: Transform.localNorm when this process holds
        /// the whole gradient.
        NormReduction: NormReduction
        /// Per-parameter learning-rate factors (Transform.scaleByFactors) laid out as the parameters,
        /// or None.
        Factors: torch.Tensor option
        /// AMSGrad (torch's amsgrad = True): the denominator uses the running maximum of the second
        /// moment. Steps through the unfused chain.
        Amsgrad: bool
        /// Maximize the objective (torch's maximize = True): the gradient is negated.
        Maximize: bool
    }

/// Optimizers as chains of transforms, equal to torch.optim's, and their application to flat buffers.
[<RequireQualifiedAccess>]
module Optimizer =

    /// torch.optim.AdamW with its amsgrad and maximize options (Transform.scaleByAdamWith); the state
    /// names are adamW's, plus "0.adam.max_exp_avg_sq" with amsgrad.
    let adamWWith
        (schedule: int -> float)
        (b1: float)
        (b2: float)
        (eps: float)
        (weightDecay: float)
        (mask: torch.Tensor)
        (amsgrad: bool)
        (maximize: bool)
        : Transform =
        Transform.chain
            [ Transform.scaleByAdamWith b1 b2 eps amsgrad maximize
              Transform.addDecayedWeights weightDecay mask
              Transform.scaleByLearningRate schedule ]

    /// torch.optim.AdamW (HF Trainer's "adamw_torch"; adamWWith without amsgrad and maximize):
    /// p = p (1 - lr wd mask) - lr mhat / (sqrt(vhat) + eps) with decoupled weight decay scaled by the
    /// scheduled lr, as
    /// chain [scaleByAdam b1 b2 eps; addDecayedWeights weightDecay mask; scaleByLearningRate schedule].
    /// The mask (FlatParameters.mask) selects the parameters that decay. HF defaults: b1 = 0.9,
    /// b2 = 0.999, eps = 1e-8, weightDecay = 0.
    let adamW (schedule: int -> float) (b1: float) (b2: float) (eps: float) (weightDecay: float) (mask: torch.Tensor) : Transform =
        adamWWith schedule b1 b2 eps weightDecay mask false false

    /// torch.optim.SGD: coupled L2 weight decay first (g = g + wd mask p), then momentum (plain or
    /// Nesterov; left out when momentum is 0), the buffer updated as buf = momentum * buf +
    /// (1 - dampening) * g after its first update (Transform.traceWithDampening), then p = p - lr g.
    let sgdWith
        (schedule: int -> float)
        (momentum: float)
        (dampening: float)
        (nesterov: bool)
        (weightDecay: float)
        (mask: torch.Tensor)
        : Transform =
        Transform.chain
            [ yield Transform.addDecayedWeights weightDecay mask
              if momentum <> 0.0 || nesterov then yield Transform.traceWithDampening momentum dampening nesterov
              yield Transform.scaleByLearningRate schedule ]

    /// torch.optim.SGD with dampening 0 (sgdWith), as chain [addDecayedWeights weightDecay mask;
    /// trace momentum nesterov; scaleByLearningRate schedule].
    let sgd (schedule: int -> float) (momentum: float) (nesterov: bool) (weightDecay: float) (mask: torch.Tensor) : Transform =
        sgdWith schedule momentum 0.0 nesterov weightDecay mask

    /// Lion (HF Trainer's "lion_32bit"): p = p (1 - lr wd mask) - lr sign(b1 m + (1 - b1) g), then
    /// m = b2 m + (1 - b2) g, as chain [scaleByLion b1 b2; addDecayedWeights weightDecay mask;
    /// scaleByLearningRate schedule]. Published defaults b1 = 0.9, b2 = 0.99 (HF Trainer passes its
    /// adam_beta1 and adam_beta2).
    let lion (schedule: int -> float) (b1: float) (b2: float) (weightDecay: float) (mask: torch.Tensor) : Transform =
        Transform.chain
            [ Transform.scaleByLion b1 b2
              Transform.addDecayedWeights weightDecay mask
              Transform.scaleByLearningRate schedule ]

    /// torch.optim.RMSprop (HF Trainer's "rmsprop"): coupled weight decay g = g + wd mask p, then
    /// Transform.scaleByRms alpha eps centered, momentum buf = momentum buf + u (left out when momentum
    /// is 0), then p = p - lr u, as chain [addDecayedWeights; scaleByRms; trace momentum false;
    /// scaleByLearningRate]. torch defaults: alpha = 0.99, eps = 1e-8, momentum = 0, centered = false.
    let rmsprop
        (schedule: int -> float)
        (alpha: float)
        (eps: float)
        (momentum: float)
        (centered: bool)
        (weightDecay: float)
        (mask: torch.Tensor)
        : Transform =
        Transform.chain
            [ yield Transform.addDecayedWeights weightDecay mask
              yield Transform.scaleByRms alpha eps centered
              if momentum <> 0.0 then yield Transform.trace momentum false
              yield Transform.scaleByLearningRate schedule ]

    /// transformers' Adafactor without first moment: chain [scaleByAdafactor slots settings mask;
    /// scaleByLearningRate], on the schedule, or on a constant 1 when settings.RelativeStep (the step
    /// size is then Adafactor's own, as transformers' lr = None). HF Trainer's optim="adafactor" uses
    /// RelativeStep = false and ScaleParameter = false with the scheduled learning rate.
    let adafactor
        (schedule: int -> float)
        (slots: Transform.ParameterSlot list)
        (settings: Transform.AdafactorSettings)
        (mask: torch.Tensor)
        : Transform =
        Transform.chain
            [ Transform.scaleByAdafactor slots settings mask
              Transform.scaleByLearningRate (if settings.RelativeStep then (fun _ -> 1.0) else schedule) ]

    /// The optimizer preceded by gradient clipping at maxNorm (Transform.clipByGlobalNorm; 0 only
    /// measures the norm), as HF Trainer clips before optimizer.step(). The state's names get a "1."
    /// prefix for the optimizer's part.
    let withClipping (maxNorm: float) (optimizer: Transform) : Transform =
        Transform.chain [ Transform.clipByGlobalNorm maxNorm; optimizer ]

    /// The trainer's chain: chain [Transform.clipByGlobalNormWith reduce maxNorm; optimizer], followed by
    /// Transform.scaleByFactors when per-parameter learning-rate factors are given. State names: "0."
    /// for clipping, "1." for the optimizer, "2." for the factors.
    let trainerChain (reduce: NormReduction) (maxNorm: float) (optimizer: Transform) (factors: torch.Tensor option) : Transform =
        Transform.chain
            [ yield Transform.clipByGlobalNormWith reduce maxNorm
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

    /// The transform of HF Trainer's AdamW step for config: trainerChain config.NormReduction
    /// config.MaxGradNorm (adamW ...) config.Factors, whose state names ("1.0.adam.exp_avg", ...) are the
    /// checkpoint keys.
    let adamWChain (config: AdamWConfig) : Transform =
        trainerChain config.NormReduction config.MaxGradNorm
            (adamWWith config.Schedule config.Beta1 config.Beta2 config.Epsilon config.WeightDecay config.DecayMask config.Amsgrad config.Maximize)
            config.Factors

    /// The updates an optimizer state has applied: its learning-rate schedule's count
    /// (Transform.tryUpdateCount), which every optimizer here holds once.
    let appliedUpdates (state: ITransformState) : int =
        match Transform.tryUpdateCount state with
        | Some count -> count
        | None -> invalidArg (nameof state) "the optimizer state has no learning-rate schedule count"

    /// HF Trainer's AdamW step, fused: the transform is adamWChain config (its state and checkpoint
    /// names are those of that chain), and a step measures the gradients' global norm (reduced by
    /// config.NormReduction), then updates the parameters, both moments and the compute copy in one pass
    /// over memory, spread over torch's intra-op threads. The unfused chain makes about fifteen passes over
    /// the buffers: at 92M parameters the fused step takes about 45 ms against 230 ms on this project's
    /// 2-core machine (see docs/benchmarks.md). Same arithmetic in float32, operation for operation, as the
    /// unfused transforms, so results agree to float rounding (libtorch may fuse a multiply-add where .NET
    /// does not). The step finds the states it advances by type (Transform.tryFindState), so it does not
    /// depend on how the chain nests them.
    ///
    /// With config.Maximize the kernel takes the negated (clipped) gradient; with config.Amsgrad every
    /// step takes the unfused chain (the kernel keeps no running maximum).
    ///
    /// Buffers that are not contiguous CPU tensors (parameters on an accelerator, for instance) take
    /// the unfused path (Optimizer.unfused); so does a mask that is not when the weight decay is not 0 (the
    /// mask is not read otherwise: FlatParameters.uniform will do). An fp16 compute copy is refreshed by
    /// a converting copy after the kernel.
    let fusedAdamW (config: AdamWConfig) : FlatOptimizer =
        let transform = adamWChain config
        let fallback = unfused transform
        let plain = TensorMemory.isPlain torch.float32
        let fail (state: ITransformState) : 'T =
            invalidArg (nameof state) (sprintf "fusedAdamW was given a %s, not the state its Init made" (state.GetType().Name))
        let replace (update: 'S -> 'S) (state: ITransformState) =
            Transform.tryReplaceState update state |> Option.defaultWith (fun () -> fail state)
        let step (flat: FlatParameters) (state: ITransformState) (compute: torch.Tensor option) =
            let adam, rate =
                match Transform.tryFindState<Transform.AdamState> state, Transform.tryFindState<Transform.LearningRateState> state with
                | Some adam, Some rate when (Transform.tryFindState<Transform.ClipState> state).IsSome -> adam, rate
                | _ -> fail state
            let bf16Copy = compute |> Option.filter (TensorMemory.isPlain torch.bfloat16)
            let fusable =
                plain flat.Values && plain flat.Grads && plain adam.ExpAvg && plain adam.ExpAvgSq
                && (config.WeightDecay = 0.0 || plain config.DecayMask)
                && (config.Factors |> Option.forall plain)
                && not config.Amsgrad
                && flat.Values.numel () = flat.Grads.numel ()
                && (bf16Copy |> Option.forall (fun c -> c.numel () = flat.Values.numel ()))
            if not fusable then fallback.Step flat state compute
            else
                use _ = torch.no_grad ()
                let norm = Transform.reducedNorm config.NormReduction flat.Grads
                let t = adam.Count + 1
                let stepScale, scaledEps = Transform.adamScales config.Beta1 config.Beta2 config.Epsilon t
                let clipScale = Transform.clipCoefficient config.MaxGradNorm norm |> Option.map float32 |> Option.defaultValue 1.0f
                let constants: AdamWConstants =
                    { GradScale = if config.Maximize then -clipScale else clipScale
                      Beta1 = float32 config.Beta1
                      OneMinusBeta1 = float32 (1.0 - config.Beta1)
                      Beta2 = float32 config.Beta2
                      OneMinusBeta2 = float32 (1.0 - config.Beta2)
                      StepScale = float32 stepScale
                      ScaledEps = float32 scaledEps
                      WeightDecay = float32 config.WeightDecay
                      NegativeLearningRate = float32 (-(config.Schedule rate.Count)) }
                let buffers: AdamWBuffers =
                    { Count = flat.Values.numel ()
                      Parameters = TensorMemory.address flat.Values
                      Gradients = TensorMemory.address flat.Grads
                      ExpAvg = TensorMemory.address adam.ExpAvg
                      ExpAvgSq = TensorMemory.address adam.ExpAvgSq
                      DecayMask = if config.WeightDecay <> 0.0 then TensorMemory.address config.DecayMask else 0n
                      Factors = config.Factors |> Option.map TensorMemory.address |> Option.defaultValue 0n
                      Bf16Copy = bf16Copy |> Option.map TensorMemory.address |> Option.defaultValue 0n }
                FusedKernels.adamW (torch.get_num_threads ()) constants buffers
                match compute with
                | Some copy when bf16Copy.IsNone -> copy.copy_ flat.Values |> ignore
                | _ -> ()
                state
                |> replace (fun (a: Transform.AdamState) -> { a with Count = t })
                |> replace (fun (r: Transform.LearningRateState) -> { r with Count = r.Count + 1 })
                |> replace (fun (c: Transform.ClipState) -> { c with LastNorm = norm })
        { Transform = transform; Step = step }
