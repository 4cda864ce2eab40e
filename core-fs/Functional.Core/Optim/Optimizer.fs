namespace Functional.Optim

open TorchSharp

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
