module Functional.Tests.LossScalerTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Functional
open Functional.Runtime
open Functional.Optim

let private config = { FsCheckConfig.defaultConfig with maxTest = 200 }

/// The decisions of a run of updates from the initial state, one per overflow flag.
let private decisions (c: LossScalerConfig) (overflows: bool list) : LossScaleDecision list =
    overflows
    |> List.scan (fun (previous: LossScaleDecision) overflow -> LossScaler.decide c previous.Next overflow)
        { ApplyUpdate = true; Change = Unchanged; Next = LossScaler.init c }
    |> List.tail

/// The state after a run of updates from the initial state.
let private final (c: LossScalerConfig) (overflows: bool list) : LossScalerState =
    List.fold (LossScaler.update c) (LossScaler.init c) overflows

let private scales c overflows = decisions c overflows |> List.map (fun d -> d.Next.Scale)

let private clean n = List.replicate n false
let private overflow n = List.replicate n true

/// A dynamic config: initial power 0..20, window 1..50, hysteresis 1..4, a minimum scale no larger
/// than the initial one (a power of two, or any number in (0, initial]).
let private dynamicConfigs =
    gen {
        let! power = Gen.choose (0, 20)
        let! window = Gen.choose (1, 50)
        let! hysteresis = Gen.choose (1, 4)
        let! consecutive = Gen.elements [ false; true ]
        let! minimum =
            Gen.oneof
                [ Gen.choose (-4, power) |> Gen.map (fun k -> Math.Pow(2.0, float k))
                  Gen.choose (1, 1000) |> Gen.map (fun i -> Math.Pow(2.0, float power) * float i / 1000.0) ]
        return
            { LossScaler.defaults with
                InitialScalePower = power
                LossScaleWindow = window
                Hysteresis = hysteresis
                ConsecutiveHysteresis = consecutive
                MinLossScale = minimum }
    }

/// Overflow flags, about one in three an overflow, up to 300 updates.
let private overflowRuns =
    gen {
        let! length = Gen.choose (0, 300)
        return! Gen.listOfLength length (Gen.frequency [ 2, Gen.constant false; 1, Gen.constant true ])
    }

let private runs = Gen.zip dynamicConfigs overflowRuns |> Arb.fromGen

let private throwsInvalidInput (origin: string) (location: string) (f: unit -> unit) =
    let ex = Expect.throwsC f id
    match ex with
    | :? InvalidInputException as raised ->
        let e = TestUtil.asCommandLine raised
        Expect.equal e.Origin origin "the exception names the option or file"
        Expect.equal e.Location location "the exception names the field"
    | other -> failtestf "expected InvalidInputException for %s, got %O" origin other

let private pinned =
    testList "DeepSpeed's rules, pinned" [
        test "defaults are DeepSpeed's: dynamic, 2^16, window 1000, hysteresis 2, min 1, factor 2" {
            let d = LossScaler.defaults
            Expect.isTrue (LossScaler.isDynamic d) "loss_scale 0 is dynamic"
            Expect.equal (d.InitialScalePower, d.LossScaleWindow, d.Hysteresis, d.ConsecutiveHysteresis, d.MinLossScale)
                (16, 1000, 2, false, 1.0) "DeepSpeed's fp16 defaults"
            Expect.equal LossScaler.ScaleFactor 2.0 "scale factor"
            Expect.equal (LossScaler.init d)
                { Scale = 65536.0; Iteration = 0; LastOverflowIteration = -1; CurrentHysteresis = 2 } "initial state"
        }

        test "hysteresis 2: the first overflow only spends hysteresis, each later one halves the scale" {
            let ds = decisions LossScaler.defaults (overflow 3)
            Expect.equal (ds |> List.map (fun d -> d.Change)) [ HysteresisSpent; Shrank; Shrank ] "changes"
            Expect.equal (ds |> List.map (fun d -> d.Next.Scale)) [ 65536.0; 32768.0; 16384.0 ] "scales"
            Expect.equal (ds |> List.map (fun d -> d.Next.CurrentHysteresis)) [ 1; 1; 1 ] "hysteresis stays at 1"
            Expect.isTrue (ds |> List.forall (fun d -> not d.ApplyUpdate)) "every overflow skips the step"
        }

        test "without consecutive hysteresis clean updates do not restore it: an overflow 500 clean updates later halves" {
            let d = decisions LossScaler.defaults (overflow 1 @ clean 500 @ overflow 1) |> List.last
            Expect.equal d.Change Shrank "the second overflow halves"
            Expect.equal d.Next.Scale 32768.0 "scale"
        }

        test "with consecutive hysteresis a clean update restores it: the same run keeps the scale" {
            let c = { LossScaler.defaults with ConsecutiveHysteresis = true }
            let ds = decisions c (overflow 1 @ clean 500 @ overflow 2)
            Expect.equal (ds |> List.map (fun d -> d.Change) |> List.skip 501) [ HysteresisSpent; Shrank ]
                "after a clean update only two overflows in a row halve"
            Expect.equal (List.last ds).Next.Scale 32768.0 "scale"
        }

        test "a growth restores the hysteresis" {
            let c = { LossScaler.defaults with LossScaleWindow = 4 }
            let ds = decisions c (overflow 1 @ clean 4 @ overflow 1)
            Expect.equal (ds |> List.map (fun d -> d.Change))
                [ HysteresisSpent; Unchanged; Unchanged; Unchanged; Grew; HysteresisSpent ] "changes"
            Expect.equal (List.last ds).Next.Scale 131072.0 "the overflow after the growth keeps the doubled scale"
        }

        test "from the start the scale doubles on every window-th clean update" {
            let c = { LossScaler.defaults with InitialScalePower = 0; LossScaleWindow = 3 }
            Expect.equal (scales c (clean 7)) [ 1.0; 1.0; 2.0; 2.0; 2.0; 4.0; 4.0 ] "scales"
        }

        test "an overflow restarts the window: clean updates before it do not count" {
            let c = { LossScaler.defaults with InitialScalePower = 3; LossScaleWindow = 4; Hysteresis = 1 }
            Expect.equal (scales c (clean 2 @ overflow 1 @ clean 4)) [ 8.0; 8.0; 4.0; 4.0; 4.0; 4.0; 8.0 ]
                "the first doubling comes on the 4th clean update after the overflow"
        }

        test "forced overflows: 5 overflows then 3000 clean updates back off to 4096 and recover to 32768" {
            let overflows = overflow 5 @ clean 3000
            let s = scales LossScaler.defaults overflows
            Expect.equal (List.take 5 s) [ 65536.0; 32768.0; 16384.0; 8192.0; 4096.0 ] "back-off"
            Expect.equal (List.min s) 4096.0 "lowest scale"
            Expect.equal [ s[1003]; s[1004]; s[2004]; s[3003]; s[3004] ] [ 4096.0; 8192.0; 16384.0; 16384.0; 32768.0 ]
                "doubles on the 1000th, 2000th and 3000th clean update"
            Expect.equal (final LossScaler.defaults overflows)
                { Scale = 32768.0; Iteration = 3005; LastOverflowIteration = 4; CurrentHysteresis = 2 } "final state"
        }

        test "an overflow due to halve at the minimum reports OverflowAtMinimum and keeps the minimum" {
            let c = { LossScaler.defaults with InitialScalePower = 2; Hysteresis = 1; MinLossScale = 3.0 }
            let ds = decisions c (overflow 3)
            Expect.equal (ds |> List.map (fun d -> d.Change)) [ Shrank; OverflowAtMinimum; OverflowAtMinimum ] "changes"
            Expect.equal (ds |> List.map (fun d -> d.Next.Scale)) [ 3.0; 3.0; 3.0 ] "4 halves to max(2, 3)"
        }

        test "a static scale never changes, yet an overflow still skips the step" {
            let c = { LossScaler.defaults with LossScale = 128.0 }
            let ds = decisions c [ true; false; true ]
            Expect.isFalse (LossScaler.isDynamic c) "static"
            Expect.equal (ds |> List.map (fun d -> d.Next.Scale, d.Change, d.ApplyUpdate))
                [ 128.0, Unchanged, false; 128.0, Unchanged, true; 128.0, Unchanged, false ] "decisions"
        }
    ]

let private properties =
    testList "properties over random configs and overflow runs" [
        testPropertyWithConfig config "the scale never goes below min_loss_scale and the hysteresis stays in 1..h" <| Prop.forAll runs (fun (c, overflows) ->
            decisions c overflows
            |> List.forall (fun d ->
                d.Next.Scale >= c.MinLossScale && d.Next.CurrentHysteresis >= 1 && d.Next.CurrentHysteresis <= c.Hysteresis))

        testPropertyWithConfig config "the step is applied exactly when there is no overflow; iteration and last overflow are counted" <| Prop.forAll runs (fun (c, overflows) ->
            let ds = decisions c overflows
            let lastOverflow = overflows |> List.tryFindIndexBack id |> Option.defaultValue -1
            List.forall2 (fun d o -> d.ApplyUpdate = not o) ds overflows
            && (final c overflows).Iteration = overflows.Length
            && (final c overflows).LastOverflowIteration = lastOverflow)

        testPropertyWithConfig config "the scale changes only by the factor 2 (or is clamped at the minimum) and only as its Change says" <| Prop.forAll runs (fun (c, overflows) ->
            let before = LossScaler.init c :: (decisions c overflows |> List.map (fun d -> d.Next))
            List.forall2
                (fun (s: LossScalerState) (d: LossScaleDecision) ->
                    match d.Change with
                    | Grew -> d.Next.Scale = s.Scale * 2.0
                    | Shrank -> d.Next.Scale = max (s.Scale / 2.0) c.MinLossScale && d.Next.Scale < s.Scale
                    | Unchanged | HysteresisSpent -> d.Next.Scale = s.Scale
                    | OverflowAtMinimum -> s.Scale = c.MinLossScale && d.Next.Scale = s.Scale)
                (List.take overflows.Length before) (decisions c overflows))

        testPropertyWithConfig config "after any overflows, n clean updates multiply the scale by 2^(n / window)" <| Prop.forAll (Arb.fromGen (Gen.zip3 dynamicConfigs overflowRuns (Gen.choose (0, 400)))) (fun (c, prefix, n) ->
            let prefix = if prefix.IsEmpty then prefix else prefix @ [ true ]
            let start = final c prefix
            let afterClean = List.fold (LossScaler.update c) start (clean n)
            afterClean.Scale = start.Scale * Math.Pow(2.0, float (n / c.LossScaleWindow)))

        testPropertyWithConfig config "without consecutive hysteresis and without a growth, the h-th overflow and every later one halve" <| Prop.forAll runs (fun (c, overflows) ->
            let c = { c with ConsecutiveHysteresis = false; LossScaleWindow = overflows.Length + 1 }
            let overflowCount = overflows |> List.filter id |> List.length
            let halvings = max 0 (overflowCount - c.Hysteresis + 1)
            let initial = Math.Pow(2.0, float c.InitialScalePower)
            (final c overflows).Scale = max (initial / Math.Pow(2.0, float halvings)) c.MinLossScale)

        testPropertyWithConfig config "with consecutive hysteresis, runs of fewer than h overflows never lower the scale" <| Prop.forAll (Arb.fromGen (Gen.zip3 dynamicConfigs (Gen.listOf (Gen.choose (0, 3))) (Gen.listOf (Gen.choose (1, 60))))) (fun (c, runLengths, cleanLengths) ->
            let c = { c with ConsecutiveHysteresis = true }
            let overflows =
                List.zip (List.truncate cleanLengths.Length runLengths) (List.truncate runLengths.Length cleanLengths)
                |> List.collect (fun (r, n) -> overflow (min r (c.Hysteresis - 1)) @ clean n)
            let s = LossScaler.init c :: (decisions c overflows |> List.map (fun d -> d.Next))
            List.pairwise s |> List.forall (fun (a, b) -> b.Scale >= a.Scale))

        testPropertyWithConfig config "with consecutive hysteresis, h overflows in a row after a clean update halve once" <| Prop.forAll runs (fun (c, prefix) ->
            let c = { c with ConsecutiveHysteresis = true }
            let start = final c (prefix @ [ false ])
            let after = List.fold (LossScaler.update c) start (overflow c.Hysteresis)
            after.Scale = max (start.Scale / 2.0) c.MinLossScale)

        testPropertyWithConfig config "a static scale never changes" <| Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (1, 1 <<< 20)) overflowRuns)) (fun (scale, overflows) ->
            let c = { LossScaler.defaults with LossScale = float scale / 16.0 }
            decisions c overflows
            |> List.forall (fun d -> d.Next.Scale = c.LossScale && d.Change = Unchanged))

        testPropertyWithConfig config "every state of a run passes checkState" <| Prop.forAll runs (fun (c, overflows) ->
            decisions c overflows |> List.iter (fun d -> LossScaler.checkState "checkpoint" d.Next)
            true)
    ]

let private validation =
    testList "validation" [
        test "each bad setting raises InvalidInput naming its command-line option" {
            let d = LossScaler.defaults
            let cases =
                [ "--loss-scale", { d with LossScale = -1.0 }
                  "--loss-scale", { d with LossScale = nan }
                  "--loss-scale", { d with LossScale = infinity }
                  "--initial-scale-power", { d with InitialScalePower = -1 }
                  "--initial-scale-power", { d with InitialScalePower = 128 }
                  "--loss-scale-window", { d with LossScaleWindow = 0 }
                  "--hysteresis", { d with Hysteresis = 0 }
                  "--min-loss-scale", { d with MinLossScale = 0.0 }
                  "--min-loss-scale", { d with MinLossScale = nan }
                  "--min-loss-scale", { d with MinLossScale = 65537.0 } ]
            for option, c in cases do
                throwsInvalidInput option "" (fun () -> LossScaler.init c |> ignore)
        }

        test "the boundary settings are accepted" {
            let d = LossScaler.defaults
            for c in [ { d with LossScale = 0.5 }; { d with InitialScalePower = 0 }; { d with InitialScalePower = 127 }
                       { d with LossScaleWindow = 1; Hysteresis = 1 }; { d with MinLossScale = 65536.0 } ] do
                LossScaler.validate c
        }

        test "checkState names the first bad field of a stored state" {
            let ok = { Scale = 1024.0; Iteration = 10; LastOverflowIteration = 3; CurrentHysteresis = 1 }
            LossScaler.checkState "state.json" ok
            let cases =
                [ "Scale", { ok with Scale = 0.0 }
                  "Scale", { ok with Scale = infinity }
                  "Iteration", { ok with Iteration = -1 }
                  "LastOverflowIteration", { ok with LastOverflowIteration = 10 }
                  "LastOverflowIteration", { ok with LastOverflowIteration = -2 }
                  "CurrentHysteresis", { ok with CurrentHysteresis = 0 } ]
            for field, s in cases do
                throwsInvalidInput "state.json" field (fun () -> LossScaler.checkState "state.json" s)
        }
    ]

let private withTorch (body: unit -> 'T) : 'T =
    TorchRuntime.ensure ()
    use _ = torch.NewDisposeScope()
    body ()

/// Finite fp32 values spread over [-3e38, 3e38] (so most sums overflow), from a local generator.
let private hugeFinite (size: int) (seed: int) =
    use g = new torch.Generator(uint64 seed)
    use two = (2.0).ToScalar()
    use one = (1.0).ToScalar()
    use largest = (3e38).ToScalar()
    torch.rand([| int64 size |], generator = g).mul_(two).sub_(one).mul_(largest)

let private nonFinite = [| Single.PositiveInfinity; Single.NegativeInfinity; Single.NaN |]

let private tensorHelpers =
    testList "tensor helpers" [
        testPropertyWithConfig config "hasOverflow is false for finite gradients, even when their sum overflows fp32" <| Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (1, 5000)) (Gen.choose (0, Int32.MaxValue)))) (fun (size, seed) ->
            withTorch (fun () -> not (LossScaler.hasOverflow (hugeFinite size seed))))

        test "finite gradients whose sum is infinite are not an overflow" {
            withTorch (fun () ->
                use value = (3e38f).ToScalar()
                let grads = torch.full([| 4L |], value)
                use sum = grads.sum ()
                Expect.isTrue (Single.IsInfinity(sum.item<float32> ())) "the sum overflows"
                Expect.isFalse (LossScaler.hasOverflow grads) "no element is inf or NaN")
        }

        testPropertyWithConfig config "hasOverflow finds +inf, -inf or NaN at any position" <| Prop.forAll (Arb.fromGen (gen {
            let! size = Gen.choose (1, 5000)
            let! position = Gen.choose (0, size - 1)
            let! kind = Gen.choose (0, 2)
            let! seed = Gen.choose (0, Int32.MaxValue)
            return size, position, kind, seed })) (fun (size, position, kind, seed) ->
            withTorch (fun () ->
                let grads = hugeFinite size seed
                grads[int64 position] <- torch.tensor nonFinite[kind]
                LossScaler.hasOverflow grads))

        test "hasOverflow works on fp16 and bf16 gradients" {
            withTorch (fun () ->
                for dtype in [ torch.float16; torch.bfloat16 ] do
                    let grads = torch.ones([| 100L |], dtype = dtype)
                    Expect.isFalse (LossScaler.hasOverflow grads) (sprintf "%O finite" dtype)
                    for value in nonFinite do
                        grads[57L] <- (torch.tensor value).to_type dtype
                        Expect.isTrue (LossScaler.hasOverflow grads) (sprintf "%O with %g" dtype value))
        }

        testPropertyWithConfig config "unscale by a power of two restores the unscaled gradients exactly, in place" <| Prop.forAll (Arb.fromGen (Gen.zip3 (Gen.choose (1, 2000)) (Gen.choose (0, 60)) (Gen.choose (0, Int32.MaxValue)))) (fun (size, power, seed) ->
            withTorch (fun () ->
                use g = new torch.Generator(uint64 seed)
                let original = torch.randn([| int64 size |], generator = g)
                let scale = Math.Pow(2.0, float power)
                use factor = scale.ToScalar()
                let grads = original.mul factor
                let view = grads.alias ()
                LossScaler.unscale scale grads
                grads.Equals original && view.Equals original))

        test "unscale rejects a zero, negative or non-finite scale" {
            withTorch (fun () ->
                let grads = torch.ones([| 3L |])
                for scale in [ 0.0; -2.0; nan; infinity ] do
                    Expect.throwsT<ArgumentOutOfRangeException> (fun () -> LossScaler.unscale scale grads) (sprintf "scale %g" scale))
        }
    ]

[<Tests>]
let tests = testList "loss scaler" [ pinned; properties; validation; tensorHelpers ]
