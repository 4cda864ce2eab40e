namespace Functional

open System

/// The learning-rate schedules of Hugging Face's `--lr_scheduler_type`, by their HF names.
[<RequireQualifiedAccess>]
type SchedulerKind =
    /// "constant": the base learning rate at every step.
    | Constant
    /// "constant_with_warmup": linear warmup, then the base learning rate.
    | ConstantWithWarmup
    /// "linear": linear warmup, then linear decay to 0 at the last step.
    | Linear
    /// "cosine": linear warmup, then cosine decay (half a wave by default) to 0.
    | Cosine
    /// "cosine_with_restarts": linear warmup, then cosine decays with hard restarts.
    | CosineWithRestarts
    /// "polynomial": linear warmup, then polynomial decay to an absolute end learning rate.
    | Polynomial
    /// "inverse_sqrt": linear warmup, then decay as 1/sqrt(step / timescale).
    | InverseSqrt
    /// "cosine_with_min_lr": linear warmup, then cosine decay to a minimum learning rate.
    | CosineWithMinLr
    /// "cosine_warmup_with_min_lr": a warmup that starts above 0 (at warmup_lr_rate, or one warmup step's
    /// share), then cosine decay to a minimum learning rate, one step ahead of cosine_with_min_lr.
    | CosineWarmupWithMinLr
    /// "warmup_stable_decay": warmup, a constant phase, then a decay to a minimum ratio.
    | WarmupStableDecay
    /// "reduce_lr_on_plateau": the base rate, multiplied by a factor whenever the evaluation metric stops
    /// improving (torch's ReduceLROnPlateau, stepped after each evaluation; no warmup). Driven by
    /// evaluations, so not a function of the step: see PlateauSchedule.
    | ReduceLrOnPlateau

/// How the warmup phase of a warmup-stable-decay schedule rises, or how its decay phase falls
/// (HF's warmup_type and decay_type: "linear", "cosine", "1-sqrt").
[<RequireQualifiedAccess>]
type PhaseShape =
    /// "linear": proportional to progress.
    | Linear
    /// "cosine": a half cosine wave over the phase.
    | Cosine
    /// "1-sqrt": 1 - sqrt(progress) for decay, 1 - sqrt(1 - progress) for warmup.
    | OneMinusSqrt

/// The floor of a cosine_with_min_lr schedule: an absolute learning rate (HF's min_lr) or a fraction
/// of the base learning rate (HF's min_lr_rate).
[<RequireQualifiedAccess>]
type MinLearningRate =
    /// An absolute learning rate (HF's min_lr); the schedule uses minLr / baseLr as its rate.
    | Absolute of float
    /// A fraction of the base learning rate (HF's min_lr_rate).
    | RatioOfBase of float

/// The schedule-specific parameters (HF's lr_scheduler_kwargs). A field left None takes the default of
/// the schedule that reads it; fields a schedule does not read are ignored.
type ScheduleOptions =
    {
        /// Cosine waves: default 0.5 for cosine, cosine_with_min_lr and warmup_stable_decay
        /// (half a wave: from the base down to the floor); default 1 for cosine_with_restarts
        /// (the number of hard restarts).
        NumCycles: float option
        /// Polynomial: the absolute learning rate at and after the last step (default 1e-7); must be
        /// below the base learning rate.
        LrEnd: float option
        /// Polynomial: the power of the decay (default 1.0, linear).
        Power: float option
        /// Inverse square root: the timescale (default: the warmup steps, or 10,000 without warmup).
        /// HF's get_scheduler never passes it on; here it is honoured.
        Timescale: int option
        /// Cosine_with_min_lr: the floor, absolute or relative; required by that schedule.
        MinLr: MinLearningRate option
        /// Warmup_stable_decay: the number of decay steps; required by that schedule.
        NumDecaySteps: int option
        /// Warmup_stable_decay: the number of constant steps (default: total - warmup - decay steps).
        NumStableSteps: int option
        /// Warmup_stable_decay: the warmup shape (default linear).
        WarmupShape: PhaseShape option
        /// Warmup_stable_decay: the decay shape (default cosine).
        DecayShape: PhaseShape option
        /// Warmup_stable_decay: the floor as a fraction of the base learning rate (default 0).
        MinLrRatio: float option
        /// Cosine_warmup_with_min_lr: the first warmup step's learning rate as a fraction of the base
        /// (HF's warmup_lr_rate); None: the warmup rises (k + 1) / warmupSteps.
        WarmupLrRate: float option
        /// Reduce_lr_on_plateau: torch's mode (default min).
        Mode: PlateauMode option
        /// Reduce_lr_on_plateau: torch's factor (default 0.1).
        Factor: float option
        /// Reduce_lr_on_plateau: torch's patience (default 10).
        Patience: int option
        /// Reduce_lr_on_plateau: torch's threshold (default 1e-4).
        Threshold: float option
        /// Reduce_lr_on_plateau: torch's threshold_mode (default rel).
        ThresholdMode: ThresholdMode option
        /// Reduce_lr_on_plateau: torch's cooldown (default 0).
        Cooldown: int option
        /// Reduce_lr_on_plateau: torch's eps (default 1e-8). Its min_lr is MinLr's absolute form.
        Eps: float option
    }

    /// Every field None: each schedule's defaults.
    static member Defaults =
        { NumCycles = None
          LrEnd = None
          Power = None
          Timescale = None
          MinLr = None
          NumDecaySteps = None
          NumStableSteps = None
          WarmupShape = None
          DecayShape = None
          MinLrRatio = None
          WarmupLrRate = None
          Mode = None
          Factor = None
          Patience = None
          Threshold = None
          ThresholdMode = None
          Cooldown = None
          Eps = None }

/// Learning-rate schedules as plain functions of the optimizer step, with Hugging Face's formulas
/// (transformers/optimization.py, the lr_lambda of each get_*_schedule_with_warmup) and its step
/// convention: the k-th optimizer update (k from 0) uses baseLr * f(k), so with warmup the first update
/// uses learning rate 0 and step k = warmupSteps is the first at the full base rate.
/// Every constructor checks its arguments at once and raises ArgumentException naming the bad one; the
/// schedules it returns raise ArgumentOutOfRangeException for a negative step.
[<RequireQualifiedAccess>]
module Schedule =

    /// A schedule: the learning rate (or any scalar) at optimizer step k >= 0.
    type Schedule = int -> float

    let private argument (name: string) (problem: string) : 'T = raise (ArgumentException(problem, name))

    let private nonNegative name (value: int) =
        if value < 0 then argument name (sprintf "%s must be >= 0, got %d." name value)

    let private finiteNonNegative name (value: float) =
        if not (Double.IsFinite value) || value < 0.0 then
            argument name (sprintf "%s must be a finite number >= 0, got %g." name value)

    let private checkBaseLr (baseLr: float) =
        if not (Double.IsFinite baseLr) || baseLr < 0.0 then
            argument "baseLr" (sprintf "baseLr must be a finite number >= 0, got %g." baseLr)

    let private checkedStep (schedule: Schedule) : Schedule =
        fun step ->
            if step < 0 then raise (ArgumentOutOfRangeException("step", step, "The step must be >= 0."))
            schedule step

    /// The learning rate baseLr * multiplier(k), as torch's LambdaLR computes it from an HF lr_lambda.
    let private scaled (baseLr: float) (multiplier: Schedule) : Schedule =
        checkedStep (fun step -> baseLr * multiplier step)

    /// Optax's join_schedules: schedules[0] before boundaries[0]; from boundaries[i - 1] on,
    /// schedules[i] evaluated at (step - boundaries[i - 1]). Boundaries are steps >= 0 in
    /// non-decreasing order, one fewer than the schedules.
    let join (schedules: Schedule list) (boundaries: int list) : Schedule =
        if List.isEmpty schedules then argument "schedules" "join needs at least one schedule."
        if List.length boundaries <> List.length schedules - 1 then
            argument "boundaries"
                (sprintf "join needs one boundary fewer than schedules: %d schedules, %d boundaries."
                    (List.length schedules) (List.length boundaries))
        boundaries |> List.iter (nonNegative "boundaries")
        if boundaries <> List.sort boundaries then
            argument "boundaries" (sprintf "boundaries must be non-decreasing, got %A." boundaries)
        let pieces = Array.ofList schedules
        let starts = Array.ofList (0 :: boundaries)
        checkedStep (fun step ->
            let mutable i = pieces.Length - 1
            while step < starts[i] do
                i <- i - 1
            pieces[i] (step - starts[i]))

    /// HF's warmup multiplier for step k < warmupSteps: k / max(1, warmupSteps).
    let private linearWarmup (warmupSteps: int) : Schedule =
        fun step -> float step / float (max 1 warmupSteps)

    /// The multiplier warmup(k) for k < warmupSteps, then after(k - warmupSteps).
    let private withWarmup (warmupSteps: int) (after: Schedule) : Schedule =
        join [ linearWarmup warmupSteps; after ] [ warmupSteps ]

    /// HF's decay progress after warmup: j / max(1, totalSteps - warmupSteps), j = k - warmupSteps.
    let private progress (warmupSteps: int) (totalSteps: int) (sinceWarmup: int) =
        float sinceWarmup / float (max 1 (totalSteps - warmupSteps))

    /// The base learning rate at every step (HF's get_constant_schedule).
    let constant (baseLr: float) : Schedule =
        checkBaseLr baseLr
        scaled baseLr (fun _ -> 1.0)

    /// Linear warmup from 0 over warmupSteps, then baseLr (HF's get_constant_schedule_with_warmup):
    /// f(k) = k / max(1, w) for k < w, else 1.
    let constantWithWarmup (baseLr: float) (warmupSteps: int) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        scaled baseLr (withWarmup warmupSteps (fun _ -> 1.0))

    /// Linear warmup, then linear decay to 0 at totalSteps and 0 after it (HF's
    /// get_linear_schedule_with_warmup): f(k) = max(0, (T - k) / max(1, T - w)) for k >= w.
    let linear (baseLr: float) (warmupSteps: int) (totalSteps: int) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "totalSteps" totalSteps
        scaled baseLr (withWarmup warmupSteps (fun sinceWarmup ->
            let remaining = totalSteps - (warmupSteps + sinceWarmup)
            max 0.0 (float remaining / float (max 1 (totalSteps - warmupSteps)))))

    /// Linear warmup, then cosine decay (HF's get_cosine_schedule_with_warmup):
    /// f(k) = max(0, 0.5 (1 + cos(pi * numCycles * 2 * p))), p = (k - w) / max(1, T - w).
    /// With the default numCycles = 0.5 the rate reaches 0 at k = T; like HF, it is not clamped after T
    /// (the wave continues).
    let cosine (baseLr: float) (warmupSteps: int) (totalSteps: int) (numCycles: float) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "totalSteps" totalSteps
        finiteNonNegative "numCycles" numCycles
        scaled baseLr (withWarmup warmupSteps (fun sinceWarmup ->
            let p = progress warmupSteps totalSteps sinceWarmup
            max 0.0 (0.5 * (1.0 + Math.Cos(Math.PI * numCycles * 2.0 * p)))))

    /// Linear warmup, then numCycles cosine decays from baseLr to 0, each restarting at baseLr, and 0 from
    /// totalSteps on (HF's get_cosine_with_hard_restarts_schedule_with_warmup, default numCycles 1):
    /// f(k) = 0 if p >= 1, else max(0, 0.5 (1 + cos(pi * ((numCycles * p) mod 1)))).
    let cosineWithRestarts (baseLr: float) (warmupSteps: int) (totalSteps: int) (numCycles: float) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "totalSteps" totalSteps
        finiteNonNegative "numCycles" numCycles
        scaled baseLr (withWarmup warmupSteps (fun sinceWarmup ->
            let p = progress warmupSteps totalSteps sinceWarmup
            if p >= 1.0 then 0.0
            else
                // Python's % on non-negative floats is IEEE fmod.
                max 0.0 (0.5 * (1.0 + Math.Cos(Math.PI * ((numCycles * p) % 1.0))))))

    /// Linear warmup, then polynomial decay from baseLr to the absolute lrEnd at totalSteps, and lrEnd
    /// after it (HF's get_polynomial_decay_schedule_with_warmup, defaults lrEnd 1e-7, power 1.0):
    /// lr(k) = baseLr * (((baseLr - lrEnd) * (1 - (k - w) / (T - w))^power + lrEnd) / baseLr). lrEnd
    /// must be below baseLr, as HF requires; power must be >= 0. Where HF divides by zero (T = w, k = T)
    /// the rate is lrEnd.
    let polynomial (baseLr: float) (warmupSteps: int) (totalSteps: int) (lrEnd: float) (power: float) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "totalSteps" totalSteps
        finiteNonNegative "lrEnd" lrEnd
        finiteNonNegative "power" power
        if not (baseLr > lrEnd) then
            argument "lrEnd" (sprintf "lrEnd (%g) must be smaller than the base learning rate (%g)." lrEnd baseLr)
        let decaySteps = totalSteps - warmupSteps
        scaled baseLr (withWarmup warmupSteps (fun sinceWarmup ->
            if sinceWarmup > decaySteps || decaySteps = 0 then lrEnd / baseLr
            else
                let remaining = 1.0 - float sinceWarmup / float decaySteps
                ((baseLr - lrEnd) * Math.Pow(remaining, power) + lrEnd) / baseLr))

    /// Linear warmup, then 1 / sqrt((k + timescale - w) / timescale) (HF's get_inverse_sqrt_schedule).
    /// timescale None means HF's default: warmupSteps, or 10,000 when warmupSteps is 0.
    let inverseSqrt (baseLr: float) (warmupSteps: int) (timescale: int option) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        let timescale = timescale |> Option.defaultValue (if warmupSteps = 0 then 10_000 else warmupSteps)
        if timescale <= 0 then argument "timescale" (sprintf "timescale must be >= 1, got %d." timescale)
        scaled baseLr (withWarmup warmupSteps (fun sinceWarmup ->
            1.0 / Math.Sqrt(float (sinceWarmup + timescale) / float timescale)))

    /// The rate minLr / baseLr of an absolute floor, or the given ratio.
    let private minLrRate (baseLr: float) (minLr: MinLearningRate) =
        match minLr with
        | MinLearningRate.Absolute lr ->
            finiteNonNegative "minLr" lr
            if baseLr = 0.0 then argument "minLr" "An absolute minLr needs a base learning rate > 0."
            lr / baseLr
        | MinLearningRate.RatioOfBase ratio ->
            finiteNonNegative "minLr" ratio
            ratio

    /// Linear warmup, then cosine decay from baseLr to a floor (HF's
    /// get_cosine_with_min_lr_schedule_with_warmup): with rate = minLr / baseLr (or the given ratio),
    /// f(k) = max(0, c * (1 - rate) + rate), c = 0.5 (1 + cos(pi * numCycles * 2 * p)).
    let cosineWithMinLr (baseLr: float) (warmupSteps: int) (totalSteps: int) (numCycles: float) (minLr: MinLearningRate) : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "totalSteps" totalSteps
        finiteNonNegative "numCycles" numCycles
        let rate = minLrRate baseLr minLr
        scaled baseLr (withWarmup warmupSteps (fun sinceWarmup ->
            let p = progress warmupSteps totalSteps sinceWarmup
            let factor = 0.5 * (1.0 + Math.Cos(Math.PI * numCycles * 2.0 * p))
            max 0.0 (factor * (1.0 - rate) + rate)))

    /// A warmup that starts above 0, then cosine decay from baseLr to a floor, counted one step ahead
    /// (HF's get_cosine_with_min_lr_schedule_with_warmup_lr_rate). With rate = minLr / baseLr (or the
    /// given ratio): for k < w, f(k) = (k + 1) / max(1, w) without warmupLrRate, else
    /// r + (1 - r) k / max(1, w - 1) with r = warmupLrRate (so the ramp ends at the base on step w - 1);
    /// from k = w on, f(k) = max(0, c (1 - rate) + rate), c = 0.5 (1 + cos(pi * numCycles * 2 * p)),
    /// p = (k - w + 1) / max(1, T - w): the floor is reached at k = T - 1, the last update of a T-step
    /// run, and like HF the wave is not clamped after it.
    let cosineWarmupWithMinLr
        (baseLr: float)
        (warmupSteps: int)
        (totalSteps: int)
        (numCycles: float)
        (minLr: MinLearningRate)
        (warmupLrRate: float option)
        : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "totalSteps" totalSteps
        finiteNonNegative "numCycles" numCycles
        warmupLrRate |> Option.iter (finiteNonNegative "warmupLrRate")
        let rate = minLrRate baseLr minLr
        let warmup (step: int) =
            match warmupLrRate with
            | None -> (float step + 1.0) / float (max 1 warmupSteps)
            | Some r -> r + (1.0 - r) * float step / float (max 1 (warmupSteps - 1))
        let decay (sinceWarmup: int) =
            let p = (float sinceWarmup + 1.0) / float (max 1 (totalSteps - warmupSteps))
            let factor = 0.5 * (1.0 + Math.Cos(Math.PI * numCycles * 2.0 * p))
            max 0.0 (factor * (1.0 - rate) + rate)
        scaled baseLr (join [ warmup; decay ] [ warmupSteps ])

    /// Warmup over warmupSteps, constant over stableSteps, decay over decaySteps, then minLrRatio (HF's
    /// get_wsd_schedule). Warmup and decay follow their shapes and are lifted to the floor:
    /// f = max(0, s * (1 - minLrRatio) + minLrRatio), so the first warmup step is minLrRatio (0 by
    /// default), not 0. Warmup: linear s = p, cosine s = 0.5 (1 - cos(pi p)), 1-sqrt s = 1 - sqrt(1 - p),
    /// p = k / max(1, w). Decay: linear s = 1 - p, cosine s = 0.5 (1 + cos(pi * numCycles * 2 * p)),
    /// 1-sqrt s = 1 - sqrt(p), p = (k - w - stable) / max(1, decaySteps).
    let warmupStableDecay
        (baseLr: float)
        (warmupSteps: int)
        (stableSteps: int)
        (decaySteps: int)
        (warmupShape: PhaseShape)
        (decayShape: PhaseShape)
        (minLrRatio: float)
        (numCycles: float)
        : Schedule =
        checkBaseLr baseLr
        nonNegative "warmupSteps" warmupSteps
        nonNegative "stableSteps" stableSteps
        nonNegative "decaySteps" decaySteps
        finiteNonNegative "minLrRatio" minLrRatio
        finiteNonNegative "numCycles" numCycles
        let lift s = max 0.0 (s * (1.0 - minLrRatio) + minLrRatio)
        let warmup step =
            let p = float step / float (max 1 warmupSteps)
            match warmupShape with
            | PhaseShape.Linear -> p
            | PhaseShape.Cosine -> 0.5 * (1.0 - Math.Cos(Math.PI * p))
            | PhaseShape.OneMinusSqrt -> 1.0 - Math.Sqrt(1.0 - p)
            |> lift
        let decay step =
            let p = float step / float (max 1 decaySteps)
            match decayShape with
            | PhaseShape.Linear -> 1.0 - p
            | PhaseShape.Cosine -> 0.5 * (1.0 + Math.Cos(Math.PI * numCycles * 2.0 * p))
            | PhaseShape.OneMinusSqrt -> 1.0 - Math.Sqrt p
            |> lift
        let multiplier =
            join
                [ warmup; (fun _ -> 1.0); decay; (fun _ -> minLrRatio) ]
                [ warmupSteps; warmupSteps + stableSteps; warmupSteps + stableSteps + decaySteps ]
        scaled baseLr multiplier

    /// HF's names of the schedules, in SchedulerKind's order.
    let names =
        [ "constant"
          "constant_with_warmup"
          "linear"
          "cosine"
          "cosine_with_restarts"
          "polynomial"
          "inverse_sqrt"
          "cosine_with_min_lr"
          "cosine_warmup_with_min_lr"
          "warmup_stable_decay"
          "reduce_lr_on_plateau" ]

    let private kinds =
        [ SchedulerKind.Constant
          SchedulerKind.ConstantWithWarmup
          SchedulerKind.Linear
          SchedulerKind.Cosine
          SchedulerKind.CosineWithRestarts
          SchedulerKind.Polynomial
          SchedulerKind.InverseSqrt
          SchedulerKind.CosineWithMinLr
          SchedulerKind.CosineWarmupWithMinLr
          SchedulerKind.WarmupStableDecay
          SchedulerKind.ReduceLrOnPlateau ]

    /// The kind HF calls name (exact, case-sensitive, as HF's SchedulerType), or None.
    let parseName (name: string) : SchedulerKind option =
        List.zip names kinds |> List.tryFind (fun (n, _) -> n = name) |> Option.map snd

    /// HF's name of a kind.
    let name (kind: SchedulerKind) : string =
        List.zip names kinds |> List.find (fun (_, k) -> k = kind) |> fst

    /// The problem text for an unknown schedule name: it quotes the name and lists the valid ones.
    let unknownNameProblem (name: string) : string =
        sprintf "expected one of %s, got \"%s\"" (String.Join(", ", names)) name

    /// The kind an option names (parseName), or InvalidInputException for optionName (e.g.
    /// the setting lr_scheduler_type) whose problem quotes the value and lists the valid names.
    let parseOption (optionName: string) (name: string) : SchedulerKind =
        match parseName name with
        | Some kind -> kind
        | None -> InvalidInput.failSetting optionName (unknownNameProblem name)

    /// HF's shape names ("linear", "cosine", "1-sqrt") for warmup_type and decay_type, or None.
    let parseShape (name: string) : PhaseShape option =
        match name with
        | "linear" -> Some PhaseShape.Linear
        | "cosine" -> Some PhaseShape.Cosine
        | "1-sqrt" -> Some PhaseShape.OneMinusSqrt
        | _ -> None

    /// The warmup steps of a run, as HF's TrainingArguments.get_warmup_steps: warmupSteps when given
    /// and > 0, else ceil(totalSteps * warmupRatio) computed in floating point exactly as HF does (so
    /// 100 * 0.07 = 7.000000000000001 rounds up to 8), else 0. The ratio must lie in [0, 1].
    let warmupSteps (totalSteps: int) (warmupSteps: int option) (warmupRatio: float option) : int =
        nonNegative "totalSteps" totalSteps
        warmupSteps |> Option.iter (nonNegative "warmupSteps")
        warmupRatio
        |> Option.iter (fun r ->
            if not (r >= 0.0 && r <= 1.0) then
                argument "warmupRatio" (sprintf "warmupRatio must lie in [0, 1], got %g." r))
        match warmupSteps, warmupRatio with
        | Some steps, _ when steps > 0 -> steps
        | _, Some ratio -> int (Math.Ceiling(float totalSteps * ratio))
        | _ -> 0

    /// The HF names (lr_scheduler_kwargs keys) of the options that are set, in ScheduleOptions' order.
    let givenKwargs (options: ScheduleOptions) : string list =
        [ if options.NumCycles.IsSome then "num_cycles"
          if options.LrEnd.IsSome then "lr_end"
          if options.Power.IsSome then "power"
          if options.Timescale.IsSome then "timescale"
          match options.MinLr with
          | Some(MinLearningRate.Absolute _) -> "min_lr"
          | Some(MinLearningRate.RatioOfBase _) -> "min_lr_rate"
          | None -> ()
          if options.NumDecaySteps.IsSome then "num_decay_steps"
          if options.NumStableSteps.IsSome then "num_stable_steps"
          if options.WarmupShape.IsSome then "warmup_type"
          if options.DecayShape.IsSome then "decay_type"
          if options.MinLrRatio.IsSome then "min_lr_ratio"
          if options.WarmupLrRate.IsSome then "warmup_lr_rate"
          if options.Mode.IsSome then "mode"
          if options.Factor.IsSome then "factor"
          if options.Patience.IsSome then "patience"
          if options.Threshold.IsSome then "threshold"
          if options.ThresholdMode.IsSome then "threshold_mode"
          if options.Cooldown.IsSome then "cooldown"
          if options.Eps.IsSome then "eps" ]

    /// The lr_scheduler_kwargs keys a kind takes: the keyword parameters of HF's schedule function
    /// besides the optimizer, the step counts and last_epoch (inverse_sqrt's timescale included, which
    /// HF's get_scheduler never passes on but is honoured here).
    let acceptedKwargs (kind: SchedulerKind) : string list =
        match kind with
        | SchedulerKind.Constant
        | SchedulerKind.ConstantWithWarmup
        | SchedulerKind.Linear -> []
        | SchedulerKind.Cosine
        | SchedulerKind.CosineWithRestarts -> [ "num_cycles" ]
        | SchedulerKind.Polynomial -> [ "lr_end"; "power" ]
        | SchedulerKind.InverseSqrt -> [ "timescale" ]
        | SchedulerKind.CosineWithMinLr -> [ "num_cycles"; "min_lr"; "min_lr_rate" ]
        | SchedulerKind.CosineWarmupWithMinLr -> [ "num_cycles"; "min_lr"; "min_lr_rate"; "warmup_lr_rate" ]
        | SchedulerKind.WarmupStableDecay ->
            [ "num_stable_steps"; "num_decay_steps"; "warmup_type"; "decay_type"; "min_lr_ratio"; "num_cycles" ]
        | SchedulerKind.ReduceLrOnPlateau ->
            [ "mode"; "factor"; "patience"; "threshold"; "threshold_mode"; "cooldown"; "min_lr"; "eps" ]

    /// Raises ArgumentException, named after the first key, when options set a kwarg the kind does not
    /// take (HF raises TypeError for an unexpected keyword argument); the message names the key, the
    /// schedule and the keys it takes.
    let checkKwargs (kind: SchedulerKind) (options: ScheduleOptions) : unit =
        let accepted = acceptedKwargs kind
        match givenKwargs options |> List.filter (fun k -> not (List.contains k accepted)) with
        | [] -> ()
        | unexpected ->
            let takes =
                if List.isEmpty accepted then "takes none"
                else sprintf "takes %s" (String.Join(", ", accepted))
            argument (List.head unexpected)
                (sprintf "%s does not take %s (it %s)." (name kind) (String.Join(", ", unexpected)) takes)

    /// The settings of reduce_lr_on_plateau from its options (torch's defaults for those not set; min_lr
    /// is MinLr's absolute form), checked by Plateau.validate. Raises ArgumentException naming a kwarg the
    /// schedule does not take (checkKwargs), min_lr_rate included.
    let plateauOptions (options: ScheduleOptions) : PlateauOptions =
        checkKwargs SchedulerKind.ReduceLrOnPlateau options
        let d = PlateauOptions.Defaults
        let o =
            { Mode = options.Mode |> Option.defaultValue d.Mode
              Factor = options.Factor |> Option.defaultValue d.Factor
              Patience = options.Patience |> Option.defaultValue d.Patience
              Threshold = options.Threshold |> Option.defaultValue d.Threshold
              ThresholdMode = options.ThresholdMode |> Option.defaultValue d.ThresholdMode
              Cooldown = options.Cooldown |> Option.defaultValue d.Cooldown
              MinLr =
                (match options.MinLr with
                 | Some(MinLearningRate.Absolute lr) -> lr
                 | _ -> d.MinLr)
              Eps = options.Eps |> Option.defaultValue d.Eps }
        Plateau.validate o
        o

    /// The schedule of a kind as HF's get_scheduler builds it from the base learning rate, the warmup
    /// and total optimizer steps and the schedule-specific options (ScheduleOptions documents each
    /// default). Raises ArgumentException naming the bad argument or option (cosine_with_min_lr needs
    /// MinLr; warmup_stable_decay needs NumDecaySteps and, without NumStableSteps, warmup + decay
    /// steps <= total steps; a kwarg the kind does not take raises, see checkKwargs).
    let create (kind: SchedulerKind) (baseLr: float) (warmupSteps: int) (totalSteps: int) (options: ScheduleOptions) : Schedule =
        checkKwargs kind options
        let cycles defaultValue = options.NumCycles |> Option.defaultValue defaultValue
        match kind with
        | SchedulerKind.Constant -> constant baseLr
        | SchedulerKind.ConstantWithWarmup -> constantWithWarmup baseLr warmupSteps
        | SchedulerKind.Linear -> linear baseLr warmupSteps totalSteps
        | SchedulerKind.Cosine -> cosine baseLr warmupSteps totalSteps (cycles 0.5)
        | SchedulerKind.CosineWithRestarts -> cosineWithRestarts baseLr warmupSteps totalSteps (cycles 1.0)
        | SchedulerKind.Polynomial ->
            polynomial baseLr warmupSteps totalSteps (options.LrEnd |> Option.defaultValue 1e-7)
                (options.Power |> Option.defaultValue 1.0)
        | SchedulerKind.InverseSqrt -> inverseSqrt baseLr warmupSteps options.Timescale
        | SchedulerKind.CosineWithMinLr ->
            match options.MinLr with
            | Some minLr -> cosineWithMinLr baseLr warmupSteps totalSteps (cycles 0.5) minLr
            | None -> argument "MinLr" "cosine_with_min_lr needs min_lr or min_lr_rate."
        | SchedulerKind.CosineWarmupWithMinLr ->
            match options.MinLr with
            | Some minLr -> cosineWarmupWithMinLr baseLr warmupSteps totalSteps (cycles 0.5) minLr options.WarmupLrRate
            | None -> argument "MinLr" "cosine_warmup_with_min_lr needs min_lr or min_lr_rate."
        | SchedulerKind.WarmupStableDecay ->
            match options.NumDecaySteps with
            | None -> argument "NumDecaySteps" "warmup_stable_decay needs num_decay_steps."
            | Some decaySteps ->
                let stableSteps =
                    match options.NumStableSteps with
                    | Some steps -> steps
                    | None ->
                        let steps = totalSteps - warmupSteps - decaySteps
                        if steps < 0 then
                            argument "NumDecaySteps"
                                (sprintf "warmup (%d) + decay (%d) steps exceed the %d total steps."
                                    warmupSteps decaySteps totalSteps)
                        steps
                warmupStableDecay baseLr warmupSteps stableSteps decaySteps
                    (options.WarmupShape |> Option.defaultValue PhaseShape.Linear)
                    (options.DecayShape |> Option.defaultValue PhaseShape.Cosine)
                    (options.MinLrRatio |> Option.defaultValue 0.0)
                    (cycles 0.5)
        | SchedulerKind.ReduceLrOnPlateau ->
            argument "kind" "reduce_lr_on_plateau is driven by evaluations, not by the step: build a PlateauSchedule (plateauOptions)."
