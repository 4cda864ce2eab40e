module Functional.Tests.RotationTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional.Checkpoint
open Functional.Training

/// Existing checkpoint steps (distinct, in random order), the best one's step and save_total_limit.
type private Case = { Steps: int list; Best: int option; Limit: int option }

let private cases =
    gen {
        let! count = Gen.choose (0, 30)
        let! steps = Gen.choose (1, 5000) |> Gen.listOfLength count |> Gen.map List.distinct
        let! shuffled = Gen.shuffle steps |> Gen.map List.ofArray
        let! best =
            if steps.IsEmpty then Gen.constant None
            else Gen.frequency [ 2, Gen.constant None; 6, Gen.elements steps |> Gen.map Some; 1, Gen.constant (Some 6000) ]
        let! limit = Gen.frequency [ 1, Gen.constant None; 1, Gen.choose (-2, 0) |> Gen.map Some; 6, Gen.choose (1, 12) |> Gen.map Some ]
        return { Steps = shuffled; Best = best; Limit = limit }
    }
    |> Arb.fromGen

let private config = { FsCheckConfig.defaultConfig with maxTest = 500 }

/// HF's number of checkpoints kept: save_total_limit, raised to 2 when it is 1 and the last checkpoint
/// of the rotation order is not the best one.
let private effectiveLimit (c: Case) =
    match c.Limit, c.Best with
    | Some 1, Some best when best <> List.max c.Steps -> 2
    | Some limit, _ -> limit
    | None, _ -> Int32.MaxValue

let private deleted (c: Case) = Rotation.toDelete c.Steps c.Best c.Limit

/// A run: the metric of each saved checkpoint (steps 1, 2, ...), the limit and the direction.
let private runs =
    gen {
        let! metrics = Gen.choose (0, 20) |> Gen.map float |> Gen.listOf
        let! limit = Gen.choose (1, 5)
        let! greater = Gen.elements [ true; false ]
        return metrics, limit, greater
    }
    |> Arb.fromGen

let private rotationProperties =
    testList "properties" [
        testPropertyWithConfig config "over a run of random metrics, saving and rotating after each evaluation keeps the best so far and the newest, and at most max(limit, 2)"
        <| Prop.forAll runs (fun (metrics, limit, greater) ->
            let mutable kept = []
            let mutable best: (float * int) option = None
            metrics
            |> List.mapi (fun i metric -> i + 1, metric)
            |> List.forall (fun (step, metric) ->
                if Rotation.isBetter greater metric (best |> Option.map fst) then best <- Some(metric, step)
                kept <- kept @ [ step ]
                let victims = Rotation.toDelete kept (best |> Option.map snd) (Some limit)
                kept <- kept |> List.filter (fun s -> not (List.contains s victims))
                let bestSoFar =
                    let values = metrics |> List.truncate step
                    let target = if greater then List.max values else List.min values
                    1 + List.findIndex ((=) target) values
                List.contains bestSoFar kept && List.contains step kept && kept.Length <= max limit 2))
        testPropertyWithConfig config "the best checkpoint is never deleted" <| Prop.forAll cases (fun c ->
            match c.Best with
            | Some best -> not (List.contains best (deleted c))
            | None -> true)

        testPropertyWithConfig config "the newest checkpoint is never deleted" <| Prop.forAll cases (fun c ->
            c.Steps.IsEmpty || not (List.contains (List.max c.Steps) (deleted c)))

        testPropertyWithConfig config "exactly max(0, count - effective limit) are deleted" <| Prop.forAll cases (fun c ->
            let expected =
                match c.Limit with
                | Some limit when limit > 0 -> max 0 (c.Steps.Length - effectiveLimit c)
                | _ -> 0
            (deleted c).Length = expected)

        testPropertyWithConfig config "the deleted ones are the oldest apart from the best, in step order" <| Prop.forAll cases (fun c ->
            let d = deleted c
            let candidates = c.Steps |> List.sort |> List.filter (fun s -> Some s <> c.Best)
            d = List.truncate d.Length candidates)

        testPropertyWithConfig config "no limit or a limit of 0 or less deletes nothing" <| Prop.forAll cases (fun c ->
            match c.Limit with
            | Some limit when limit > 0 -> true
            | _ -> (deleted c).IsEmpty)

        testPropertyWithConfig config "the order in which the steps are listed does not matter" <| Prop.forAll cases (fun c ->
            deleted c = Rotation.toDelete (List.sort c.Steps) c.Best c.Limit)
    ]

let private rotationExamples =
    let steps = [ 100; 200; 300; 400; 500 ]
    testList "examples from HF's _rotate_checkpoints" [
        test "limit 2 with an older best keeps the best and the newest" {
            Expect.equal (Rotation.toDelete steps (Some 200) (Some 2)) [ 100; 300; 400 ] "kept 200 and 500"
        }
        test "limit 1 with an older best keeps 2: the best and the newest" {
            Expect.equal (Rotation.toDelete steps (Some 200) (Some 1)) [ 100; 300; 400 ] "kept 200 and 500"
        }
        test "limit 1 with the newest as best keeps only it" {
            Expect.equal (Rotation.toDelete steps (Some 500) (Some 1)) [ 100; 200; 300; 400 ] "kept 500"
        }
        test "limit 3 without a best keeps the 3 newest" {
            Expect.equal (Rotation.toDelete steps None (Some 3)) [ 100; 200 ] "kept 300, 400, 500"
        }
        test "limit 3 with the oldest as best keeps it and the 2 newest" {
            Expect.equal (Rotation.toDelete steps (Some 100) (Some 3)) [ 200; 300 ] "kept 100, 400, 500"
        }
        test "a limit at or above the count deletes nothing" {
            Expect.isEmpty (Rotation.toDelete steps (Some 200) (Some 5)) "5 of 5"
            Expect.isEmpty (Rotation.toDelete steps None None) "no limit"
        }
        test "limit 1 with a best step that is not among the checkpoints keeps 2, as HF does" {
            Expect.equal (Rotation.toDelete [ 100; 200; 300 ] (Some 50) (Some 1)) [ 100 ] "kept 200 and 300"
        }
    ]

let private bestMetric =
    testList "best metric" [
        test "isBetter is strict: an equal value is no improvement" {
            Expect.isFalse (Rotation.isBetter true 1.0 (Some 1.0)) "greater, equal"
            Expect.isFalse (Rotation.isBetter false 1.0 (Some 1.0)) "smaller, equal"
            Expect.isTrue (Rotation.isBetter true 1.5 (Some 1.0)) "greater, larger"
            Expect.isTrue (Rotation.isBetter false 0.5 (Some 1.0)) "smaller, smaller"
            Expect.isFalse (Rotation.isBetter true 0.5 (Some 1.0)) "greater, smaller"
            Expect.isFalse (Rotation.isBetter false 1.5 (Some 1.0)) "smaller, larger"
        }
        test "without a best yet any finite value is better, NaN never is" {
            Expect.isTrue (Rotation.isBetter true -1e300 None) "greater"
            Expect.isTrue (Rotation.isBetter false 1e300 None) "smaller"
            Expect.isFalse (Rotation.isBetter true nan None) "NaN, greater"
            Expect.isFalse (Rotation.isBetter false nan None) "NaN, smaller"
            Expect.isFalse (Rotation.isBetter false 0.5 (Some nan)) "nothing beats a NaN best (np.less)"
        }
        testPropertyWithConfig config "isBetter is the strict order of the direction, and never holds both ways"
        <| Prop.forAll (Arb.zip (ArbMap.defaults |> ArbMap.arbitrary<NormalFloat>, ArbMap.defaults |> ArbMap.arbitrary<NormalFloat>))
            (fun (NormalFloat a, NormalFloat b) ->
                Rotation.isBetter true a (Some b) = (a > b)
                && Rotation.isBetter false a (Some b) = (a < b)
                && not (Rotation.isBetter true a (Some b) && Rotation.isBetter true b (Some a)))
        test "greater_is_better defaults to false for names ending in loss, true otherwise (HF)" {
            Expect.isFalse (Rotation.defaultGreaterIsBetter "loss") "loss"
            Expect.isFalse (Rotation.defaultGreaterIsBetter "eval_loss") "eval_loss"
            Expect.isTrue (Rotation.defaultGreaterIsBetter "accuracy") "accuracy"
            // HF looks at the suffix only, so a perplexity metric defaults to greater-is-better too.
            Expect.isTrue (Rotation.defaultGreaterIsBetter "perplexity") "perplexity"
        }
        test "metric names get the eval_ prefix when they lack it" {
            Expect.equal (Rotation.metricKey "loss") "eval_loss" "prefixed"
            Expect.equal (Rotation.metricKey "eval_loss") "eval_loss" "kept"
            Expect.equal (Rotation.metricKey "evaluation") "eval_evaluation" "only the exact prefix counts"
        }
    ]

let private earlyStopping =
    let improvements = ArbMap.defaults |> ArbMap.arbitrary<bool list>
    let patience = Gen.choose (1, 5) |> Arb.fromGen
    testList "early stopping" [
        testPropertyWithConfig config "the counter is the number of non-improving evaluations since the last improvement"
        <| Prop.forAll (Arb.zip (patience, improvements)) (fun (p, observed) ->
            let state = observed |> List.fold (fun s improved -> EarlyStopping.observe improved s) (EarlyStopping.create p)
            let trailing = observed |> List.rev |> List.takeWhile not |> List.length
            state.Counter = trailing && EarlyStopping.shouldStop state = (trailing >= p))
        test "losses 1.0, 0.9, 0.95, 0.9 with patience 2 stop after the fourth evaluation (an equal loss is no improvement)" {
            let losses = [ 1.0; 0.9; 0.95; 0.9; 0.85 ]
            let rec run (state: EarlyStopping) (best: float option) evaluations =
                function
                | [] -> None
                | loss :: rest ->
                    let improved = Rotation.isBetter false loss best
                    let state = EarlyStopping.observe improved state
                    if EarlyStopping.shouldStop state then Some(evaluations + 1)
                    else run state (if improved then Some loss else best) (evaluations + 1) rest
            Expect.equal (run (EarlyStopping.create 2) None 0 losses) (Some 4) "stops at the fourth evaluation"
        }
        test "patience below 1 is refused" {
            Expect.throwsT<ArgumentOutOfRangeException> (fun () -> EarlyStopping.create 0 |> ignore) "patience 0"
        }
    ]

[<Tests>]
let tests = testList "rotation" [ rotationProperties; rotationExamples; bestMetric; earlyStopping ]
