namespace Functional.Optim

open System
open TorchSharp
open Functional

/// fp16 loss-scaling settings, DeepSpeed's "fp16" block (deepspeed/runtime/constants.py). With
/// LossScale = 0 the scale is dynamic (DeepSpeed's DynamicLossScaler); with LossScale > 0 it is
/// that static scale and the dynamic settings are not used.
type LossScalerConfig =
    {
        /// A static loss scale, or 0 (default) for dynamic scaling (DeepSpeed "loss_scale", --loss-scale).
        LossScale: float
        /// The dynamic scale starts at 2^InitialScalePower; default 16 (DeepSpeed
        /// "initial_scale_power", --initial-scale-power).
        InitialScalePower: int
        /// Updates without an overflow, counted from the last overflow or growth, after which the
        /// scale doubles; default 1000 (DeepSpeed "loss_scale_window", --loss-scale-window).
        LossScaleWindow: int
        /// Overflows tolerated before the scale starts to halve (DeepSpeed "hysteresis", its
        /// delayed_shift; --hysteresis); default 2: the first overflow only spends hysteresis.
        Hysteresis: int
        /// Whether every clean update restores the full hysteresis, so only Hysteresis overflows in
        /// a row halve the scale; default false: only a growth restores it (DeepSpeed
        /// "consecutive_hysteresis").
        ConsecutiveHysteresis: bool
        /// The dynamic scale never goes below this; default 1 (DeepSpeed "min_loss_scale", --min-loss-scale).
        MinLossScale: float
    }

/// The loss scaler's state between updates: plain numbers, so a checkpoint can store them as they are
/// (DeepSpeed's cur_scale, cur_iter, last_overflow_iter and cur_hysteresis).
type LossScalerState =
    {
        /// The scale to multiply the next loss by (and to divide its gradients by).
        Scale: float
        /// Updates seen so far, overflows included (DeepSpeed's cur_iter).
        Iteration: int
        /// The Iteration at which the last overflow happened; -1 before the first.
        LastOverflowIteration: int
        /// Overflows still tolerated before the scale halves, between 1 and the configured Hysteresis.
        CurrentHysteresis: int
    }

/// What one update did to the scale.
type LossScaleChange =
    /// The scale stayed (a clean update inside the window, or any update of a static scale).
    | Unchanged
    /// A clean update completed a window: the scale doubled and the hysteresis was restored.
    | Grew
    /// An overflow was absorbed by the hysteresis: the scale stayed, the hysteresis went down by one.
    | HysteresisSpent
    /// An overflow halved the scale (never below MinLossScale).
    | Shrank
    /// An overflow was due to halve the scale, but it already is MinLossScale. DeepSpeed raises
    /// "Current loss scale already at minimum" here and ends the run (raise_error_at_min_scale).
    | OverflowAtMinimum

/// The outcome of one update: whether the optimizer step may run, what happened to the scale, and
/// the next state.
type LossScaleDecision =
    {
        /// False after an overflow: the trainer skips the optimizer step.
        ApplyUpdate: bool
        /// What happened to the scale.
        Change: LossScaleChange
        /// The state for the next update.
        Next: LossScalerState
    }

/// fp16 loss scaling with DeepSpeed's semantics (deepspeed/runtime/fp16/loss_scaler.py,
/// DynamicLossScaler.update_scale). A pure state machine plus two tensor helpers.
///
/// Contract for the trainer, once per optimizer step (after all micro-batches are accumulated):
/// multiply each micro-batch loss by state.Scale before backward; then
/// `hasOverflow flat.Grads`; then `decide config state overflow`. When ApplyUpdate is true:
/// `unscale state.Scale flat.Grads` (with the scale the gradients were made with, i.e. the state
/// BEFORE the update), clip, run the optimizer step and advance the learning-rate schedule. When it
/// is false (an overflow): skip the optimizer step, do NOT advance the schedule or the optimizer's
/// step count, zero the gradients, and go on with the next batch. Keep decision.Next either way
/// (and store it in checkpoints). On OverflowAtMinimum DeepSpeed ends the run with an error, which
/// is what the trainer should do too: fp16 cannot hold these gradients at any allowed scale.
[<RequireQualifiedAccess>]
module LossScaler =

    /// The factor by which the dynamic scale grows and shrinks: 2, DeepSpeed's scale_factor.
    [<Literal>]
    let ScaleFactor = 2.0

    /// DeepSpeed's defaults: dynamic (loss_scale 0), initial_scale_power 16, loss_scale_window 1000,
    /// hysteresis 2, consecutive_hysteresis false, min_loss_scale 1.
    let defaults: LossScalerConfig =
        { LossScale = 0.0
          InitialScalePower = 16
          LossScaleWindow = 1000
          Hysteresis = 2
          ConsecutiveHysteresis = false
          MinLossScale = 1.0 }

    /// Largest accepted --initial-scale-power: 2^127 is the largest power of two in fp32.
    [<Literal>]
    let MaxInitialScalePower = 127

    /// True when the scale is dynamic (LossScale = 0).
    let isDynamic (config: LossScalerConfig) = config.LossScale = 0.0

    let private check (valid: bool) (option: string) (problem: unit -> string) =
        if not valid then InvalidInput.failSetting option (problem ())

    /// Raises InvalidInputException naming the command-line option of the first bad setting:
    /// --loss-scale (0 or a positive finite number), --initial-scale-power (0 to 127),
    /// --loss-scale-window (at least 1), --hysteresis (at least 1), --min-loss-scale (positive, finite
    /// and at most the initial scale 2^power).
    let validate (config: LossScalerConfig) : unit =
        check (Double.IsFinite config.LossScale && config.LossScale >= 0.0) "{loss_scale}" (fun () ->
            sprintf "expected 0 (dynamic scaling) or a positive finite static scale, got %g" config.LossScale)
        check (config.InitialScalePower >= 0 && config.InitialScalePower <= MaxInitialScalePower) "{initial_scale_power}" (fun () ->
            sprintf "expected a whole number from 0 to %d (the scale starts at 2^power), got %d" MaxInitialScalePower config.InitialScalePower)
        check (config.LossScaleWindow >= 1) "{loss_scale_window}" (fun () ->
            sprintf "expected at least 1 update between scale increases, got %d" config.LossScaleWindow)
        check (config.Hysteresis >= 1) "{hysteresis}" (fun () ->
            sprintf "expected at least 1 (1 halves the scale at every overflow), got %d" config.Hysteresis)
        let initialScale = Math.Pow(2.0, float config.InitialScalePower)
        check (Double.IsFinite config.MinLossScale && config.MinLossScale > 0.0 && config.MinLossScale <= initialScale) "{min_loss_scale}" (fun () ->
            sprintf "expected a positive number no larger than the initial scale 2^%d = %g, got %g"
                config.InitialScalePower initialScale config.MinLossScale)

    /// The state before the first update: the static scale, or 2^InitialScalePower with the full
    /// hysteresis, iteration 0 and no overflow yet (last overflow -1). Validates the config first.
    let init (config: LossScalerConfig) : LossScalerState =
        validate config
        { Scale = (if isDynamic config then Math.Pow(2.0, float config.InitialScalePower) else config.LossScale)
          Iteration = 0
          LastOverflowIteration = -1
          CurrentHysteresis = config.Hysteresis }

    /// One update after an optimizer step's gradients were checked, as DeepSpeed's
    /// DynamicLossScaler.update_scale. On an overflow the step is skipped (ApplyUpdate false) and:
    /// when the configured hysteresis is 1 or the current one is down to 1, the scale halves (not
    /// below MinLossScale; OverflowAtMinimum when it already is the minimum); otherwise the current
    /// hysteresis goes down by one and the scale stays. The overflow's iteration is remembered, which
    /// restarts the window. On a clean update: with ConsecutiveHysteresis the hysteresis is restored;
    /// when (Iteration - LastOverflowIteration) is a multiple of LossScaleWindow the scale doubles and
    /// the hysteresis is restored. So from the start the scale doubles after every LossScaleWindow
    /// clean updates, and after an overflow the first doubling comes on its LossScaleWindow-th clean
    /// update. A static scale never changes. Iteration advances by one in every case.
    let decide (config: LossScalerConfig) (state: LossScalerState) (overflow: bool) : LossScaleDecision =
        let next = { state with Iteration = state.Iteration + 1 }
        if not (isDynamic config) then
            { ApplyUpdate = not overflow; Change = Unchanged; Next = next }
        elif overflow then
            let afterOverflow = { next with LastOverflowIteration = state.Iteration }
            if config.Hysteresis = 1 || state.CurrentHysteresis = 1 then
                if state.Scale = config.MinLossScale then
                    { ApplyUpdate = false; Change = OverflowAtMinimum; Next = afterOverflow }
                else
                    { ApplyUpdate = false
                      Change = Shrank
                      Next = { afterOverflow with Scale = max (state.Scale / ScaleFactor) config.MinLossScale } }
            else
                { ApplyUpdate = false
                  Change = HysteresisSpent
                  Next = { afterOverflow with CurrentHysteresis = state.CurrentHysteresis - 1 } }
        elif (state.Iteration - state.LastOverflowIteration) % config.LossScaleWindow = 0 then
            { ApplyUpdate = true
              Change = Grew
              Next = { next with Scale = state.Scale * ScaleFactor; CurrentHysteresis = config.Hysteresis } }
        else
            let hysteresis = if config.ConsecutiveHysteresis then config.Hysteresis else state.CurrentHysteresis
            { ApplyUpdate = true; Change = Unchanged; Next = { next with CurrentHysteresis = hysteresis } }

    /// The next state after one update (decide's Next).
    let update (config: LossScalerConfig) (state: LossScalerState) (overflow: bool) : LossScalerState =
        (decide config state overflow).Next

    /// Checks a state read back from a checkpoint (origin names the file) and raises
    /// InvalidInputException naming the first bad field: Scale positive and finite, Iteration >= 0,
    /// LastOverflowIteration from -1 to Iteration - 1, CurrentHysteresis at least 1.
    let checkState (origin: string) (state: LossScalerState) : unit =
        let field name valid problem = if not valid then InvalidInput.fail origin name (problem ())
        field "Scale" (Double.IsFinite state.Scale && state.Scale > 0.0) (fun () ->
            sprintf "expected a positive finite loss scale, found %g" state.Scale)
        field "Iteration" (state.Iteration >= 0) (fun () ->
            sprintf "expected a count >= 0, found %d" state.Iteration)
        field "LastOverflowIteration" (state.LastOverflowIteration >= -1 && state.LastOverflowIteration < state.Iteration) (fun () ->
            sprintf "expected -1 (no overflow yet) or an iteration below %d, found %d" state.Iteration state.LastOverflowIteration)
        field "CurrentHysteresis" (state.CurrentHysteresis >= 1) (fun () ->
            sprintf "expected at least 1, found %d" state.CurrentHysteresis)

    /// True when any element of the gradients is +inf, -inf or NaN: one isfinite pass and one
    /// all-reduction, then a single sync. Unlike DeepSpeed's sum test, finite gradients whose sum
    /// exceeds the float range are not reported as an overflow. Works for any floating dtype.
    let hasOverflow (grads: torch.Tensor) : bool =
        use finite = torch.isfinite grads
        use allFinite = finite.all ()
        not (allFinite.item<bool> ())

    /// Divides the gradients by the loss scale in place (grads *= 1 / scale) under no_grad. Exact
    /// when the scale is a power of two (as the dynamic scale is) and nothing underflows.
    let unscale (scale: float) (grads: torch.Tensor) : unit =
        if not (Double.IsFinite scale && scale > 0.0) then
            raise (ArgumentOutOfRangeException(nameof scale, scale, "the loss scale must be positive and finite"))
        use _ = torch.no_grad ()
        use inverse = (1.0 / scale).ToScalar()
        grads.mul_ inverse |> ignore
