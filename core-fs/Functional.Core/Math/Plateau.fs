namespace Functional

open System

/// Which way a plateau schedule's metric improves (torch's ReduceLROnPlateau mode).
[<RequireQualifiedAccess>]
type PlateauMode =
    /// "min": lower is better (a loss).
    | Min
    /// "max": higher is better (an accuracy).
    | Max

/// How a plateau schedule's threshold measures a significant improvement (torch's threshold_mode).
[<RequireQualifiedAccess>]
type ThresholdMode =
    /// "rel": better than best * (1 - threshold) in min mode, best * (1 + threshold) in max mode.
    | Relative
    /// "abs": better than best - threshold in min mode, best + threshold in max mode.
    | Absolute

/// The settings of reduce_lr_on_plateau, with torch.optim.lr_scheduler.ReduceLROnPlateau's names and
/// defaults (HF's lr_scheduler_kwargs for that schedule).
type PlateauOptions =
    {
        /// "mode" (default min).
        Mode: PlateauMode
        /// "factor": the learning rate is multiplied by this on a plateau; must be < 1 (default 0.1).
        Factor: float
        /// "patience": evaluations without improvement that are tolerated; the next one reduces (default 10).
        Patience: int
        /// "threshold": the least improvement that counts (default 1e-4).
        Threshold: float
        /// "threshold_mode" (default rel).
        ThresholdMode: ThresholdMode
        /// "cooldown": evaluations after a reduction during which bad evaluations are not counted (default 0).
        Cooldown: int
        /// "min_lr": the learning rate never goes below this (default 0).
        MinLr: float
        /// "eps": a reduction smaller than this is skipped (default 1e-8).
        Eps: float
    }

    /// torch's defaults: min, factor 0.1, patience 10, threshold 1e-4 relative, cooldown 0, min_lr 0, eps 1e-8.
    static member Defaults =
        { Mode = PlateauMode.Min
          Factor = 0.1
          Patience = 10
          Threshold = 1e-4
          ThresholdMode = ThresholdMode.Relative
          Cooldown = 0
          MinLr = 0.0
          Eps = 1e-8 }

/// Where a plateau schedule stands after some evaluations: everything a resumed run needs.
type PlateauState =
    {
        /// The learning rate the next optimizer updates use.
        LearningRate: float
        /// The best metric so far; +infinity (min) or -infinity (max) before the first evaluation.
        Best: float
        /// Evaluations since the last improvement (torch's num_bad_epochs).
        BadEvaluations: int
        /// Evaluations of cooldown left (torch's cooldown_counter).
        CooldownLeft: int
        /// Evaluations seen (torch's last_epoch).
        Evaluations: int
    }

/// reduce_lr_on_plateau as a pure state machine: the learning rate changes only when an evaluation's
/// metric is fed to step, exactly as torch.optim.lr_scheduler.ReduceLROnPlateau.step(metric) changes
/// the optimizer's learning rate (torch 1.13 to 2.x), for one parameter group.
[<RequireQualifiedAccess>]
module Plateau =

    let private argument (name: string) (problem: string) : 'T = raise (ArgumentException(problem, name))

    /// Raises ArgumentException named after torch's argument (factor, patience, threshold, cooldown,
    /// min_lr, eps) when a setting is out of range: torch refuses factor >= 1; here also a negative or
    /// non-finite value.
    let validate (options: PlateauOptions) : unit =
        let finiteNonNegative name (v: float) =
            if not (Double.IsFinite v) || v < 0.0 then argument name (sprintf "%s must be a finite number >= 0, got %g." name v)
        if not (Double.IsFinite options.Factor) || options.Factor < 0.0 || options.Factor >= 1.0 then
            argument "factor" (sprintf "factor must lie in [0, 1) (torch: factor should be < 1.0), got %g." options.Factor)
        if options.Patience < 0 then argument "patience" (sprintf "patience must be >= 0, got %d." options.Patience)
        if options.Cooldown < 0 then argument "cooldown" (sprintf "cooldown must be >= 0, got %d." options.Cooldown)
        finiteNonNegative "threshold" options.Threshold
        finiteNonNegative "min_lr" options.MinLr
        finiteNonNegative "eps" options.Eps

    /// The state before any evaluation: the base learning rate, no best metric yet.
    let init (options: PlateauOptions) (baseLr: float) : PlateauState =
        validate options
        if not (Double.IsFinite baseLr) || baseLr < 0.0 then
            argument "baseLr" (sprintf "baseLr must be a finite number >= 0, got %g." baseLr)
        { LearningRate = baseLr
          Best = (match options.Mode with PlateauMode.Min -> Double.PositiveInfinity | PlateauMode.Max -> Double.NegativeInfinity)
          BadEvaluations = 0
          CooldownLeft = 0
          Evaluations = 0 }

    /// Whether metric improves on best significantly (torch's is_better); a NaN metric never does.
    let isBetter (options: PlateauOptions) (metric: float) (best: float) : bool =
        match options.Mode, options.ThresholdMode with
        | PlateauMode.Min, ThresholdMode.Relative -> metric < best * (1.0 - options.Threshold)
        | PlateauMode.Min, ThresholdMode.Absolute -> metric < best - options.Threshold
        | PlateauMode.Max, ThresholdMode.Relative -> metric > best * (options.Threshold + 1.0)
        | PlateauMode.Max, ThresholdMode.Absolute -> metric > best + options.Threshold

    /// The state after one evaluation's metric, as ReduceLROnPlateau.step: an improvement becomes the
    /// best and clears the bad count; otherwise the count grows; during cooldown the count is cleared;
    /// when it exceeds the patience the rate becomes max(rate * factor, min_lr) (unless that changes it
    /// by eps or less) and the cooldown starts.
    let step (options: PlateauOptions) (state: PlateauState) (metric: float) : PlateauState =
        let improved = isBetter options metric state.Best
        let best = if improved then metric else state.Best
        let bad = if improved then 0 else state.BadEvaluations + 1
        let cooldownLeft, bad = if state.CooldownLeft > 0 then state.CooldownLeft - 1, 0 else state.CooldownLeft, bad
        let evaluations = state.Evaluations + 1
        if bad > options.Patience then
            let reduced = max (state.LearningRate * options.Factor) options.MinLr
            let rate = if state.LearningRate - reduced > options.Eps then reduced else state.LearningRate
            { LearningRate = rate; Best = best; BadEvaluations = 0; CooldownLeft = options.Cooldown; Evaluations = evaluations }
        else
            { LearningRate = state.LearningRate; Best = best; BadEvaluations = bad; CooldownLeft = cooldownLeft; Evaluations = evaluations }

/// A reduce_lr_on_plateau schedule during a run: the state the evaluations step (Observe) and the
/// optimizer reads (Rate), shared by both. The one mutable piece of a plan; everything it computes is
/// Plateau.step's.
[<Sealed; AllowNullLiteral(false)>]
type PlateauSchedule(options: PlateauOptions, baseLr: float) =
    let mutable state = Plateau.init options baseLr

    /// The settings.
    member _.Options = options

    /// The state now (store it in checkpoints); set it to resume a run.
    member _.State
        with get () = state
        and set (value: PlateauState) = state <- value

    /// Steps the schedule with one evaluation's metric.
    member _.Observe(metric: float) = state <- Plateau.step options state metric

    /// The learning rate of optimizer step k: the rate now, whatever k is.
    member _.Rate(_step: int) : float = state.LearningRate
