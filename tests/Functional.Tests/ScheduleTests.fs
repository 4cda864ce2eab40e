module Functional.Tests.ScheduleTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional

/// A random run: base learning rate, total steps, warmup steps (sometimes beyond the total) and a
/// step to evaluate (sometimes beyond the total).
type private Run = { BaseLr: float; Total: int; Warmup: int; Step: int }

let private runs =
    gen {
        let! baseLr = Gen.choose (1, 1000) |> Gen.map (fun i -> float i * 1e-4)
        let! total = Gen.choose (0, 300)
        let! warmup = Gen.frequency [ 1, Gen.constant 0; 6, Gen.choose (0, total); 1, Gen.choose (0, total + 20) ]
        let! step = Gen.choose (0, total + 40)
        return { BaseLr = baseLr; Total = total; Warmup = warmup; Step = step }
    }
    |> Arb.fromGen

let private cycles = Gen.choose (0, 40) |> Gen.map (fun i -> float i / 8.0) |> Arb.fromGen
let private ratios = Gen.choose (0, 100) |> Gen.map (fun i -> float i / 100.0) |> Arb.fromGen
let private shapes = Gen.elements [ PhaseShape.Linear; PhaseShape.Cosine; PhaseShape.OneMinusSqrt ] |> Arb.fromGen

let private config = { FsCheckConfig.defaultConfig with maxTest = 300 }

let private close (expected: float) (actual: float) =
    abs (expected - actual) <= 1e-12 * max 1.0 (abs expected)

// HF's lr_lambda multipliers (transformers/optimization.py), written out in terms of the step k.

let private hfWarmup k w = float k / float (max 1 w)

let private hfLinear k w t =
    if k < w then hfWarmup k w else max 0.0 (float (t - k) / float (max 1 (t - w)))

let private hfCosine k w t (c: float) =
    if k < w then hfWarmup k w
    else
        let p = float (k - w) / float (max 1 (t - w))
        max 0.0 (0.5 * (1.0 + cos (Math.PI * c * 2.0 * p)))

let private hfRestarts k w t (c: float) =
    if k < w then hfWarmup k w
    else
        let p = float (k - w) / float (max 1 (t - w))
        if p >= 1.0 then 0.0 else max 0.0 (0.5 * (1.0 + cos (Math.PI * ((c * p) % 1.0))))

let private hfPolynomial k w t lrEnd power lrInit =
    if k < w then hfWarmup k w
    elif k > t then lrEnd / lrInit
    else ((lrInit - lrEnd) * (1.0 - float (k - w) / float (t - w)) ** power + lrEnd) / lrInit

let private hfInverseSqrt k w timescale =
    if k < w then hfWarmup k w else 1.0 / sqrt (float (k + timescale - w) / float timescale)

let private hfCosineMinLr k w t c rate =
    if k < w then hfWarmup k w
    else
        let p = float (k - w) / float (max 1 (t - w))
        max 0.0 ((0.5 * (1.0 + cos (Math.PI * c * 2.0 * p))) * (1.0 - rate) + rate)

let private hfCosineWarmupMinLr k w t c rate (warmupRate: float option) =
    if k < w then
        match warmupRate with
        | None -> (float k + 1.0) / float (max 1 w)
        | Some r -> r + (1.0 - r) * float k / float (max 1 (w - 1))
    else
        let p = (float k - float w + 1.0) / float (max 1 (t - w))
        max 0.0 ((0.5 * (1.0 + cos (Math.PI * c * 2.0 * p))) * (1.0 - rate) + rate)

let private hfWsd k w s d warmupShape decayShape ratio c =
    let lift f = max 0.0 (f * (1.0 - ratio) + ratio)
    if k < w then
        let p = float k / float (max 1 w)
        match warmupShape with
        | PhaseShape.Linear -> lift p
        | PhaseShape.Cosine -> lift (0.5 * (1.0 - cos (Math.PI * p)))
        | PhaseShape.OneMinusSqrt -> lift (1.0 - sqrt (1.0 - p))
    elif k < w + s then 1.0
    elif k < w + s + d then
        let p = float (k - w - s) / float (max 1 d)
        match decayShape with
        | PhaseShape.Linear -> lift (1.0 - p)
        | PhaseShape.Cosine -> lift (0.5 * (1.0 + cos (Math.PI * c * 2.0 * p)))
        | PhaseShape.OneMinusSqrt -> lift (1.0 - sqrt p)
    else ratio

/// The schedules a run can build with the defaults of their extra parameters.
let private allKinds (r: Run) =
    [ Schedule.constant r.BaseLr
      Schedule.constantWithWarmup r.BaseLr r.Warmup
      Schedule.linear r.BaseLr r.Warmup r.Total
      Schedule.cosine r.BaseLr r.Warmup r.Total 0.5
      Schedule.cosineWithRestarts r.BaseLr r.Warmup r.Total 3.0
      Schedule.polynomial r.BaseLr r.Warmup r.Total 1e-7 2.0
      Schedule.inverseSqrt r.BaseLr r.Warmup None
      Schedule.cosineWithMinLr r.BaseLr r.Warmup r.Total 0.5 (MinLearningRate.RatioOfBase 0.1)
      Schedule.warmupStableDecay r.BaseLr r.Warmup 5 r.Total PhaseShape.Linear PhaseShape.Cosine 0.0 0.5 ]

let private throwsArgument (name: string) (f: unit -> obj) =
    let ex = Expect.throwsC (f >> ignore) id
    match ex with
    | :? ArgumentException as a -> Expect.equal a.ParamName name "the exception names the bad argument"
    | other -> failtestf "expected ArgumentException for %s, got %O" name other

let private closedForms =
    testList "equal HF's closed forms" [
        testPropertyWithConfig config "constant is the base rate at every step" <| Prop.forAll runs (fun r ->
            Schedule.constant r.BaseLr r.Step = r.BaseLr)

        testPropertyWithConfig config "constant_with_warmup" <| Prop.forAll runs (fun r ->
            let expected = r.BaseLr * (if r.Step < r.Warmup then hfWarmup r.Step r.Warmup else 1.0)
            close expected (Schedule.constantWithWarmup r.BaseLr r.Warmup r.Step))

        testPropertyWithConfig config "linear" <| Prop.forAll runs (fun r ->
            close (r.BaseLr * hfLinear r.Step r.Warmup r.Total) (Schedule.linear r.BaseLr r.Warmup r.Total r.Step))

        testPropertyWithConfig config "cosine" <| Prop.forAll (Arb.zip (runs, cycles)) (fun (r, c) ->
            close (r.BaseLr * hfCosine r.Step r.Warmup r.Total c) (Schedule.cosine r.BaseLr r.Warmup r.Total c r.Step))

        testPropertyWithConfig config "cosine_with_restarts" <| Prop.forAll (Arb.zip (runs, cycles)) (fun (r, c) ->
            close
                (r.BaseLr * hfRestarts r.Step r.Warmup r.Total c)
                (Schedule.cosineWithRestarts r.BaseLr r.Warmup r.Total c r.Step))

        testPropertyWithConfig config "polynomial (HF's multiplier relative to the base, lrEnd absolute)"
        <| Prop.forAll (Arb.zip (runs, ratios)) (fun (r, p) ->
            let lrEnd = r.BaseLr * p * 0.5
            let power = 4.0 * p
            // HF divides by zero at k = T = w; that single point is covered by an example.
            r.Total = r.Warmup && r.Step = r.Total
            || close
                (r.BaseLr * hfPolynomial r.Step r.Warmup r.Total lrEnd power r.BaseLr)
                (Schedule.polynomial r.BaseLr r.Warmup r.Total lrEnd power r.Step))

        testPropertyWithConfig config "inverse_sqrt with the default and an explicit timescale"
        <| Prop.forAll runs (fun r ->
            let defaultTimescale = if r.Warmup = 0 then 10_000 else r.Warmup
            let explicitTimescale = r.Total + 1
            close (r.BaseLr * hfInverseSqrt r.Step r.Warmup defaultTimescale) (Schedule.inverseSqrt r.BaseLr r.Warmup None r.Step)
            && close
                (r.BaseLr * hfInverseSqrt r.Step r.Warmup explicitTimescale)
                (Schedule.inverseSqrt r.BaseLr r.Warmup (Some explicitTimescale) r.Step))

        testPropertyWithConfig config "cosine_with_min_lr from a rate and from an absolute minimum"
        <| Prop.forAll (Arb.zip (runs, ratios)) (fun (r, rate) ->
            let fromRate = Schedule.cosineWithMinLr r.BaseLr r.Warmup r.Total 0.5 (MinLearningRate.RatioOfBase rate)
            let minLr = rate * r.BaseLr
            let fromAbsolute = Schedule.cosineWithMinLr r.BaseLr r.Warmup r.Total 0.5 (MinLearningRate.Absolute minLr)
            close (r.BaseLr * hfCosineMinLr r.Step r.Warmup r.Total 0.5 rate) (fromRate r.Step)
            && close (r.BaseLr * hfCosineMinLr r.Step r.Warmup r.Total 0.5 (minLr / r.BaseLr)) (fromAbsolute r.Step))

        testPropertyWithConfig config "cosine_warmup_with_min_lr with and without warmup_lr_rate"
        <| Prop.forAll (Arb.zip (runs, Arb.zip (cycles, ratios))) (fun (r, (c, rate)) ->
            let warmupRate = if r.Step % 2 = 0 then None else Some(rate / 2.0)
            let s = Schedule.cosineWarmupWithMinLr r.BaseLr r.Warmup r.Total c (MinLearningRate.RatioOfBase rate) warmupRate
            close (r.BaseLr * hfCosineWarmupMinLr r.Step r.Warmup r.Total c rate warmupRate) (s r.Step))
        testPropertyWithConfig config "warmup_stable_decay for every warmup and decay shape"
        <| Prop.forAll (Arb.zip (Arb.zip (runs, ratios), Arb.zip (shapes, shapes))) (fun ((r, ratio), (up, down)) ->
            let stable = r.Total / 3
            let decay = r.Total - stable
            close
                (r.BaseLr * hfWsd r.Step r.Warmup stable decay up down ratio 0.5)
                (Schedule.warmupStableDecay r.BaseLr r.Warmup stable decay up down ratio 0.5 r.Step))
    ]

let private phases =
    testList "phases" [
        testPropertyWithConfig config "no schedule is ever negative" <| Prop.forAll runs (fun r ->
            allKinds r |> List.forall (fun s -> s r.Step >= 0.0))

        testPropertyWithConfig config "warmup starts at 0, rises linearly and reaches the base at k = warmup"
        <| Prop.forAll runs (fun r ->
            let total = max r.Total (r.Warmup + 1)
            let withWarmup =
                [ Schedule.constantWithWarmup r.BaseLr r.Warmup
                  Schedule.linear r.BaseLr r.Warmup total
                  Schedule.cosine r.BaseLr r.Warmup total 0.5
                  Schedule.cosineWithRestarts r.BaseLr r.Warmup total 1.0
                  Schedule.polynomial r.BaseLr r.Warmup total 0.0 1.0
                  Schedule.inverseSqrt r.BaseLr r.Warmup None
                  Schedule.cosineWithMinLr r.BaseLr r.Warmup total 0.5 (MinLearningRate.RatioOfBase 0.2)
                  Schedule.warmupStableDecay r.BaseLr r.Warmup 1 total PhaseShape.Linear PhaseShape.Linear 0.0 0.5 ]
            withWarmup
            |> List.forall (fun s ->
                (r.Warmup = 0 || s 0 = 0.0)
                && List.forall (fun k -> close (r.BaseLr * float k / float r.Warmup) (s k)) [ 0 .. r.Warmup - 1 ]
                && close r.BaseLr (s r.Warmup)))

        testPropertyWithConfig config "linear and cosine decay never increase from warmup to the end"
        <| Prop.forAll runs (fun r ->
            let nonIncreasing (s: Schedule.Schedule) =
                List.pairwise [ r.Warmup .. max r.Warmup r.Total ] |> List.forall (fun (a, b) -> s b <= s a)
            nonIncreasing (Schedule.linear r.BaseLr r.Warmup r.Total)
            && nonIncreasing (Schedule.cosine r.BaseLr r.Warmup r.Total 0.5)
            && nonIncreasing (Schedule.cosineWithMinLr r.BaseLr r.Warmup r.Total 0.5 (MinLearningRate.RatioOfBase 0.3))
            && nonIncreasing (Schedule.polynomial r.BaseLr r.Warmup r.Total 1e-7 1.5))

        testPropertyWithConfig config "schedules end at 0, lr_end or min_lr at the last step and stay there"
        <| Prop.forAll runs (fun r ->
            let total = max r.Total (r.Warmup + 1)
            let after = [ total .. total + 5 ]
            let lrEnd = r.BaseLr / 10.0
            let linear = Schedule.linear r.BaseLr r.Warmup total
            let restarts = Schedule.cosineWithRestarts r.BaseLr r.Warmup total 2.0
            let polynomial = Schedule.polynomial r.BaseLr r.Warmup total lrEnd 2.0
            let wsd = Schedule.warmupStableDecay r.BaseLr r.Warmup 0 (total - r.Warmup) PhaseShape.Linear PhaseShape.OneMinusSqrt 0.25 0.5
            abs (Schedule.cosine r.BaseLr r.Warmup total 0.5 total) < 1e-15
            && close (0.3 * r.BaseLr) (Schedule.cosineWithMinLr r.BaseLr r.Warmup total 0.5 (MinLearningRate.RatioOfBase 0.3) total)
            && after |> List.forall (fun k -> linear k = 0.0 && restarts k = 0.0)
            && after |> List.forall (fun k -> close lrEnd (polynomial k))
            && after |> List.forall (fun k -> close (0.25 * r.BaseLr) (wsd k)))

        testPropertyWithConfig config "warmup ratio rounds up; warmup steps > 0 win over the ratio"
        <| Prop.forAll (Arb.zip (runs, ratios)) (fun (r, ratio) ->
            let fromRatio = Schedule.warmupSteps r.Total None (Some ratio)
            let exact = float r.Total * ratio
            float fromRatio >= exact
            && float fromRatio - exact < 1.0
            && Schedule.warmupSteps r.Total (Some(r.Warmup + 1)) (Some ratio) = r.Warmup + 1
            && Schedule.warmupSteps r.Total (Some 0) (Some ratio) = fromRatio)

        testPropertyWithConfig config "join evaluates each piece from its own boundary"
        <| Prop.forAll runs (fun r ->
            let a = r.Warmup
            let b = a + r.Total
            let joined = Schedule.join [ (fun k -> float k); (fun k -> 100.0 + float k); (fun k -> -float k) ] [ a; b ]
            let expected = if r.Step < a then float r.Step elif r.Step < b then 100.0 + float (r.Step - a) else -float (r.Step - b)
            joined r.Step = expected)
    ]

let private examples =
    testList "hand-computed examples" [
        test "linear with base 2, warmup 2, total 10" {
            let s = Schedule.linear 2.0 2 10
            Expect.equal ([ 0; 1; 2; 6; 10; 12 ] |> List.map s) [ 0.0; 1.0; 2.0; 1.0; 0.0; 0.0 ] "0, half, base, half, 0, 0"
        }
        test "cosine without warmup over 4 steps" {
            let s = Schedule.cosine 1.0 0 4 0.5
            Expect.floatClose Accuracy.veryHigh (s 1) 0.8535533905932737 "0.5 (1 + cos(pi/4))"
            Expect.floatClose Accuracy.veryHigh (s 2) 0.5 "half way"
            Expect.floatClose Accuracy.veryHigh (s 3) 0.14644660940672627 "0.5 (1 + cos(3pi/4))"
            Expect.floatClose Accuracy.veryHigh (s 4) 0.0 "0 at the end"
        }
        test "cosine with 2 hard restarts over 4 steps restarts at step 2 and is 0 from the end" {
            let s = Schedule.cosineWithRestarts 1.0 0 4 2.0
            let values = [ 0 .. 5 ] |> List.map s
            Expect.sequenceEqual (values |> List.map (fun v -> Math.Round(v, 12))) [ 1.0; 0.5; 1.0; 0.5; 0.0; 0.0 ] "two waves"
        }
        test "polynomial with power 2 from 1 to lr_end 0.1" {
            let s = Schedule.polynomial 1.0 0 4 0.1 2.0
            Expect.floatClose Accuracy.veryHigh (s 2) 0.325 "0.9 * 0.5^2 + 0.1"
            Expect.floatClose Accuracy.veryHigh (s 4) 0.1 "lr_end at the end"
            Expect.floatClose Accuracy.veryHigh (s 5) 0.1 "lr_end after the end"
        }
        test "polynomial whose warmup fills the run stays at lr_end where HF divides by zero" {
            Expect.floatClose Accuracy.veryHigh (Schedule.polynomial 1.0 4 4 0.1 1.0 4) 0.1 "lr_end"
        }
        test "inverse_sqrt uses the warmup as timescale, or 10000 without warmup" {
            let s = Schedule.inverseSqrt 1.0 4 None
            Expect.equal ([ 2; 4; 16 ] |> List.map s) [ 0.5; 1.0; 0.5 ] "warmup half, then 1/sqrt(k/4)"
            Expect.equal (Schedule.inverseSqrt 1.0 0 None 30_000) 0.5 "1/sqrt(40000/10000)"
        }
        test "cosine_with_min_lr from 1 to 0.1 over 2 steps" {
            let s = Schedule.cosineWithMinLr 1.0 0 2 0.5 (MinLearningRate.Absolute 0.1)
            Expect.floatClose Accuracy.veryHigh (s 1) 0.55 "0.5 * 0.9 + 0.1"
            Expect.floatClose Accuracy.veryHigh (s 2) 0.1 "min_lr at the end"
        }
        test "warmup_stable_decay lifts warmup and decay to min_lr_ratio" {
            let s = Schedule.warmupStableDecay 1.0 2 2 4 PhaseShape.Linear PhaseShape.Linear 0.2 0.5
            let values = [ 0 .. 9 ] |> List.map (fun k -> Math.Round(s k, 12))
            Expect.sequenceEqual values [ 0.2; 0.6; 1.0; 1.0; 1.0; 0.8; 0.6; 0.4; 0.2; 0.2 ] "warmup, stable, decay, floor"
            let sqrtDecay = Schedule.warmupStableDecay 1.0 2 2 4 PhaseShape.Linear PhaseShape.OneMinusSqrt 0.2 0.5
            Expect.floatClose Accuracy.veryHigh (sqrtDecay 5) 0.6 "(1 - sqrt 0.25) * 0.8 + 0.2"
        }
        test "cosine_warmup_with_min_lr: HF's trainer test (lr 0.2, warmup 2, 10 steps, min_lr 1e-5)" {
            let s = Schedule.cosineWarmupWithMinLr 0.2 2 10 0.5 (MinLearningRate.Absolute 1e-5) None
            Expect.equal (s 0) 0.1 "the first update already has half the base rate"
            Expect.equal (s 1) 0.2 "the base on the last warmup step"
            Expect.equal (s 9) 1e-5 "min_lr exactly on the last update"
            Expect.isLessThan (s 2) 0.2 "decay starts one step ahead"
        }
        test "cosine_warmup_with_min_lr ramps from warmup_lr_rate to the base over the warmup" {
            let s = Schedule.cosineWarmupWithMinLr 1.0 5 20 0.5 (MinLearningRate.RatioOfBase 0.1) (Some 0.2)
            let warmup = [ 0 .. 4 ] |> List.map (fun k -> Math.Round(s k, 12))
            Expect.sequenceEqual warmup [ 0.2; 0.4; 0.6; 0.8; 1.0 ] "0.2 + 0.8 k / 4"
            Expect.floatClose Accuracy.veryHigh (s 19) 0.1 "the floor on the last update"
        }
        test "warmup ratio uses HF's floating-point ceil" {
            Expect.equal (Schedule.warmupSteps 10 None (Some 0.25)) 3 "ceil 2.5"
            Expect.equal (Schedule.warmupSteps 1000 None (Some 0.03)) 30 "exactly 30"
            Expect.equal (Schedule.warmupSteps 100 None (Some 0.07)) 8 "100 * 0.07 = 7.000000000000001 rounds up to 8, as in HF"
            Expect.equal (Schedule.warmupSteps 100 (Some 5) (Some 0.5)) 5 "steps win"
            Expect.equal (Schedule.warmupSteps 100 None None) 0 "no warmup"
        }
    ]

let private names =
    testList "names" [
        test "every HF name parses and prints back" {
            for n in Schedule.names do
                match Schedule.parseName n with
                | Some kind -> Expect.equal (Schedule.name kind) n "round trip"
                | None -> failtestf "%s did not parse" n
            Expect.equal (List.length Schedule.names) 11 "eleven schedules"
        }
        test "unknown or miscased names do not parse and the problem lists the valid names" {
            Expect.isNone (Schedule.parseName "Cosine") "case-sensitive like HF"
            Expect.isNone (Schedule.parseName "cosine_warmup") "unknown"
            let problem = Schedule.unknownNameProblem "cosine_warmup"
            Expect.stringContains problem "\"cosine_warmup\"" "quotes the bad name"
            for n in Schedule.names do
                Expect.stringContains problem n "lists every valid name"
        }
        test "warmup and decay shapes parse by HF's names" {
            Expect.equal
                ([ "linear"; "cosine"; "1-sqrt"; "sqrt" ] |> List.map Schedule.parseShape)
                [ Some PhaseShape.Linear; Some PhaseShape.Cosine; Some PhaseShape.OneMinusSqrt; None ]
                "three shapes"
        }
        test "an unknown --lr-scheduler-type is invalid input naming the option" {
            Expect.equal (Schedule.parseOption "--lr-scheduler-type" "cosine") SchedulerKind.Cosine "valid name"
            let ex = Expect.throwsC (fun () -> Schedule.parseOption "--lr-scheduler-type" "cosin" |> ignore) id
            match ex with
            | :? InvalidInputException as (TestUtil.CommandLine e) ->
                Expect.equal e.Origin "--lr-scheduler-type" "the option"
                Expect.equal e.Problem (Schedule.unknownNameProblem "cosin") "quotes the value and lists the names"
            | other -> failtestf "expected InvalidInputException, got %O" other
        }
        test "create builds each kind with HF's defaults" {
            let d = ScheduleOptions.Defaults
            let create kind = Schedule.create kind 1.0 2 10 d
            Expect.equal (create SchedulerKind.Constant 0) 1.0 "constant ignores warmup, as HF's get_scheduler"
            Expect.equal (create SchedulerKind.Linear 6) (Schedule.linear 1.0 2 10 6) "linear"
            Expect.equal (create SchedulerKind.Cosine 6) (Schedule.cosine 1.0 2 10 0.5 6) "cosine 0.5 cycles"
            Expect.equal (create SchedulerKind.CosineWithRestarts 6) (Schedule.cosineWithRestarts 1.0 2 10 1.0 6) "1 cycle"
            Expect.equal (create SchedulerKind.Polynomial 12) 1e-7 "lr_end 1e-7"
            Expect.equal (create SchedulerKind.InverseSqrt 8) (1.0 / sqrt 4.0) "timescale = warmup"
            let minLr = { d with MinLr = Some(MinLearningRate.RatioOfBase 0.1) }
            Expect.floatClose Accuracy.veryHigh (Schedule.create SchedulerKind.CosineWithMinLr 1.0 2 10 minLr 10) 0.1 "min lr"
            let wsd = Schedule.create SchedulerKind.WarmupStableDecay 1.0 2 10 { d with NumDecaySteps = Some 4 }
            Expect.equal (wsd 5) 1.0 "stable = 10 - 2 - 4 steps"
            Expect.floatClose Accuracy.veryHigh (wsd 8) 0.5 "cosine decay half way"
            Expect.equal (wsd 10) 0.0 "min_lr_ratio 0 after the decay"
        }
    ]

let private validation =
    testList "validation" [
        test "constructors name the bad argument" {
            throwsArgument "warmupSteps" (fun () -> box (Schedule.linear 1.0 -1 10))
            throwsArgument "totalSteps" (fun () -> box (Schedule.cosine 1.0 0 -5 0.5))
            throwsArgument "numCycles" (fun () -> box (Schedule.cosine 1.0 0 5 -0.5))
            throwsArgument "baseLr" (fun () -> box (Schedule.constant nan))
            throwsArgument "lrEnd" (fun () -> box (Schedule.polynomial 1e-3 0 10 1e-3 1.0))
            throwsArgument "timescale" (fun () -> box (Schedule.inverseSqrt 1.0 0 (Some 0)))
            throwsArgument "warmupRatio" (fun () -> box (Schedule.warmupSteps 10 None (Some 1.5)))
            throwsArgument "boundaries" (fun () -> box (Schedule.join [ id >> float; id >> float ] [ 5; 3 ]))
            throwsArgument "MinLr" (fun () -> box (Schedule.create SchedulerKind.CosineWithMinLr 1.0 0 10 ScheduleOptions.Defaults))
            throwsArgument "NumDecaySteps" (fun () -> box (Schedule.create SchedulerKind.WarmupStableDecay 1.0 0 10 ScheduleOptions.Defaults))
            throwsArgument "NumDecaySteps" (fun () ->
                box (Schedule.create SchedulerKind.WarmupStableDecay 1.0 5 10 { ScheduleOptions.Defaults with NumDecaySteps = Some 6 }))
        }
        test "a kwarg the schedule does not take is refused naming it" {
            let d = ScheduleOptions.Defaults
            throwsArgument "num_cycles" (fun () -> box (Schedule.create SchedulerKind.Linear 1.0 0 10 { d with NumCycles = Some 2.0 }))
            throwsArgument "lr_end" (fun () -> box (Schedule.create SchedulerKind.Cosine 1.0 0 10 { d with LrEnd = Some 0.0 }))
            throwsArgument "warmup_lr_rate" (fun () ->
                box (Schedule.create SchedulerKind.CosineWithMinLr 1.0 0 10
                    { d with MinLr = Some(MinLearningRate.RatioOfBase 0.1); WarmupLrRate = Some 0.1 }))
            throwsArgument "min_lr" (fun () ->
                box (Schedule.create SchedulerKind.WarmupStableDecay 1.0 0 10
                    { d with NumDecaySteps = Some 2; MinLr = Some(MinLearningRate.Absolute 0.1) }))
            let ex = Expect.throwsC (fun () -> Schedule.checkKwargs SchedulerKind.Constant { d with Power = Some 2.0 }) id
            Expect.stringContains ex.Message "constant does not take power (it takes none)" "names the key and the schedule"
            for kind in Schedule.names |> List.choose Schedule.parseName do
                let accepted = Schedule.acceptedKwargs kind
                Expect.equal (accepted |> List.filter (fun k -> not (List.contains k (Schedule.givenKwargs
                    { NumCycles = Some 1.0; LrEnd = Some 0.0; Power = Some 1.0; Timescale = Some 1
                      MinLr = None; NumDecaySteps = Some 1; NumStableSteps = Some 1; WarmupShape = Some PhaseShape.Linear
                      DecayShape = Some PhaseShape.Linear; MinLrRatio = Some 0.0; WarmupLrRate = Some 0.0
                      Mode = Some PlateauMode.Min; Factor = Some 0.1; Patience = Some 1; Threshold = Some 0.0
                      ThresholdMode = Some ThresholdMode.Absolute; Cooldown = Some 0; Eps = Some 0.0 } @ [ "min_lr"; "min_lr_rate" ]))))
                    [] "every accepted key is one ScheduleOptions can hold"
        }
        test "a negative step is out of range" {
            Expect.throwsT<ArgumentOutOfRangeException> (fun () -> Schedule.linear 1.0 0 10 -1 |> ignore) "step -1"
        }
    ]

/// The InvalidInputException f raises.
let private invalidInput (f: unit -> unit) : InvalidInputException =
    match Expect.throwsC f id with
    | :? InvalidInputException as e -> e
    | other -> failtestf "expected InvalidInputException, got %O" other

let private settings =
    testList "settings" [
        test "lr_scheduler_kwargs refuses min_lr together with min_lr_rate, naming both" {
            for json in [ """{"min_lr": 1e-5, "min_lr_rate": 0.1}"""; """{"min_lr_rate": 0.1, "min_lr": 1e-5}""" ] do
                let e = invalidInput (fun () -> Training.SchedulerKwargs.parse "--lr-scheduler-kwargs" json |> ignore)
                Expect.equal e.Origin "--lr-scheduler-kwargs" "the option"
                Expect.stringContains e.Message "min_lr and min_lr_rate are both given" "names both"
        }
        test "lr_scheduler_kwargs reads warmup_lr_rate and refuses unknown keys" {
            let o = Training.SchedulerKwargs.parse "k" """{"min_lr": 1e-5, "warmup_lr_rate": 0.25}"""
            Expect.equal (o.MinLr, o.WarmupLrRate) (Some(MinLearningRate.Absolute 1e-5), Some 0.25) "both read"
            let e = invalidInput (fun () -> Training.SchedulerKwargs.parse "k" """{"warmup_rate": 0.1}""" |> ignore)
            Expect.stringContains e.Message "warmup_rate" "names the key"
        }
        test "warmup_steps below 1 is a ratio of the run (HF v5), whole numbers are steps" {
            Expect.equal (Training.TrainOptions.warmupOfSteps 0.3 0.0) (0, 0.3) "a ratio"
            Expect.equal (Training.TrainOptions.warmupOfSteps 3.0 0.0) (3, 0.0) "steps"
            Expect.equal (Training.TrainOptions.warmupOfSteps 0.0 0.1) (0, 0.1) "warmup_ratio kept"
            Expect.equal (Training.TrainOptions.warmupOfSteps 2.0 0.1) (2, 0.1) "steps win later, as HF"
            Expect.equal (Schedule.warmupSteps 10 (Some 0) (Some 0.25)) 3 "0.25 of 10 steps: ceil 2.5"
            for bad, ratio in [ 2.5, 0.0; -1.0, 0.0; nan, 0.0; 0.3, 0.1 ] do
                let e = invalidInput (fun () -> Training.TrainOptions.warmupOfSteps bad ratio |> ignore)
                Expect.stringContains e.Message "num_warmup_steps" (sprintf "%g names the setting" bad)
        }
    ]

[<Tests>]
let tests = testList "schedule" [ closedForms; phases; examples; names; validation; settings ]
