module Functional.Tests.AccumulationTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Functional
open Functional.Runtime

let private config = { FsCheckConfig.defaultConfig with maxTest = 200 }

/// Micro-batches per epoch and accumulation steps.
let private plans = Gen.zip (Gen.choose (1, 40)) (Gen.choose (1, 12)) |> Arb.fromGen

let private windowStarts (plan: AccumulationPlan) =
    [ 0 .. plan.AccumulationSteps .. plan.MicroBatchesPerEpoch - 1 ]

/// Drives the machine over epochs; micro-batch i of an epoch has tokens (i % 7) and loss sum 0.5 * i.
/// Returns the reports and the final state.
let private drive (plan: AccumulationPlan) (epochs: int) =
    let tokensOf i = int64 (i % 7)
    let lossOf i = 0.5 * float i
    let mutable state = Accumulation.start
    let reports = ResizeArray()
    for _ in 1 .. epochs * plan.MicroBatchesPerEpoch do
        if not state.WindowOpen then
            let first, size = Accumulation.currentWindow plan state
            state <- Accumulation.beginWindow plan state (List.sumBy tokensOf [ first .. first + size - 1 ])
        let next, event = Accumulation.observe plan state (lossOf state.MicroBatchInEpoch)
        match event with
        | AccumulationEvent.Step report -> reports.Add report
        | AccumulationEvent.Accumulating -> ()
        state <- next
    List.ofSeq reports, state, tokensOf, lossOf

let private stateMachine =
    testList "state machine" [
        testPropertyWithConfig config "steps per epoch are ceil(n / k)" <| Prop.forAll plans (fun (n, k) ->
            Accumulation.stepsPerEpoch (Accumulation.plan n k) = int (Math.Ceiling(float n / float k)))

        testPropertyWithConfig config "window sizes sum to n and all but the last equal k" <| Prop.forAll plans (fun (n, k) ->
            let plan = Accumulation.plan n k
            let sizes = windowStarts plan |> List.map (Accumulation.windowSize plan)
            List.sum sizes = n
            && List.length sizes = Accumulation.stepsPerEpoch plan
            && sizes |> List.take (sizes.Length - 1) |> List.forall ((=) k)
            && List.last sizes >= 1
            && List.last sizes <= k)

        testPropertyWithConfig config "driving several epochs makes epochs * ceil(n / k) updates, each window normalized by its own tokens"
        <| Prop.forAll (Arb.zip (plans, Arb.fromGen (Gen.choose (1, 4)))) (fun ((n, k), epochs) ->
            let plan = Accumulation.plan n k
            let reports, final, tokensOf, lossOf = drive plan epochs
            let windows =
                [ for epoch in 0 .. epochs - 1 do
                      for first in windowStarts plan do
                          epoch, [ first .. first + Accumulation.windowSize plan first - 1 ] ]
            let expectedTotal = epochs * Accumulation.stepsPerEpoch plan
            let reportMatches (report: StepReport) (index, (epoch, window)) =
                let tokens = List.sumBy tokensOf window
                let loss = List.sumBy lossOf window
                report.UpdateIndex = index
                && report.OptimizerStep = index + 1
                && report.Epoch = epoch
                && report.MicroBatches = List.length window
                && report.Tokens = tokens
                && (if tokens = 0L then Double.IsNaN report.Loss else abs (report.Loss - loss / float tokens) < 1e-12)
            final.OptimizerStep = expectedTotal
            && Accumulation.totalSteps plan epochs = expectedTotal
            && final = { Accumulation.start with Epoch = epochs; OptimizerStep = expectedTotal }
            && List.length reports = expectedTotal
            && List.forall2 reportMatches reports (List.indexed windows))

        test "the last partial window of an epoch is normalized by its own tokens" {
            let plan = Accumulation.plan 5 2
            let mutable state = Accumulation.start
            let stepOf window tokens (losses: float list) =
                state <- Accumulation.beginWindow plan state tokens
                let events =
                    [ for loss in losses do
                          let next, event = Accumulation.observe plan state loss
                          state <- next
                          event ]
                List.last events
            stepOf [ 0; 1 ] 10L [ 4.0; 6.0 ] |> ignore
            stepOf [ 2; 3 ] 20L [ 1.0; 1.0 ] |> ignore
            Expect.equal (Accumulation.currentWindow plan state) (4, 1) "the partial window is micro-batch 4 alone"
            Expect.equal (Accumulation.lossScale 3L) (1.0 / 3.0) "scaled by 1/3, its own tokens"
            match stepOf [ 4 ] 3L [ 1.5 ] with
            | AccumulationEvent.Step report ->
                Expect.equal report { UpdateIndex = 2; OptimizerStep = 3; Epoch = 0; MicroBatches = 1; Tokens = 3L; Loss = 0.5 } "1.5 / 3"
            | AccumulationEvent.Accumulating -> failtest "the partial window must end in a step"
            Expect.equal state { Accumulation.start with Epoch = 1; OptimizerStep = 3 } "the next epoch starts"
        }

        test "a window without predicted tokens scales by 0 and reports NaN" {
            let plan = Accumulation.plan 1 1
            let state = Accumulation.beginWindow plan Accumulation.start 0L
            Expect.equal (Accumulation.lossScale 0L) 0.0 "no division by zero"
            match Accumulation.observe plan state 0.0 with
            | _, AccumulationEvent.Step report -> Expect.isTrue (Double.IsNaN report.Loss) "the mean over no tokens"
            | _, AccumulationEvent.Accumulating -> failtest "a one-micro-batch window steps"
        }

        test "misuse is rejected" {
            let plan = Accumulation.plan 4 2
            Expect.throwsT<InvalidOperationException> (fun () -> Accumulation.observe plan Accumulation.start 1.0 |> ignore) "no open window"
            let opened = Accumulation.beginWindow plan Accumulation.start 5L
            Expect.throwsT<InvalidOperationException> (fun () -> Accumulation.beginWindow plan opened 5L |> ignore) "already open"
            let ex = Expect.throwsC (fun () -> Accumulation.plan 0 2 |> ignore) id
            Expect.equal (ex :?> ArgumentException).ParamName "microBatchesPerEpoch" "names the argument"
            let ex = Expect.throwsC (fun () -> Accumulation.windowSize plan 1 |> ignore) id
            Expect.equal (ex :?> ArgumentException).ParamName "microBatchInEpoch" "1 is inside a window"
        }
    ]

// A tiny language model: embedding (V, D), then a linear head (D, V) with bias. Rows are right-padded;
// the model looks at one position at a time, so padding cannot change a real position's logits.

let private vocab = 11L
let private width = 6L

/// One micro-batch: rows of token ids and, per row, how many leading labels are masked (a prompt).
type private Row = { Tokens: int64[]; MaskedPrefix: int }

let private inputsAndLabels (rows: Row list) =
    let time = rows |> List.map (fun r -> r.Tokens.Length) |> List.max
    let pad (row: Row) fill (f: int -> int64) = Array.init time (fun t -> if t < row.Tokens.Length then f t else fill)
    let ids = rows |> List.map (fun r -> pad r 0L (fun t -> r.Tokens[t])) |> Array.concat
    let labels = rows |> List.map (fun r -> pad r -100L (fun t -> if t < r.MaskedPrefix then -100L else r.Tokens[t])) |> Array.concat
    torch.tensor(ids).reshape(int64 rows.Length, int64 time), torch.tensor(labels).reshape(int64 rows.Length, int64 time)

/// The same parameters on every call, from a local generator (Expecto runs tests in parallel, so the
/// global seed is not ours).
let private freshParameters () =
    use generator = new torch.Generator(2024UL)
    [ torch.randn(vocab, width, generator = generator).requires_grad_(true)
      torch.randn(width, vocab, generator = generator).requires_grad_(true)
      torch.randn(vocab, generator = generator).requires_grad_(true) ]

let private logitsOf (parameters: torch.Tensor list) (ids: torch.Tensor) =
    match parameters with
    | [ embedding; head; bias ] ->
        let hidden = embedding.index_select(0L, ids.reshape(-1L)).reshape(ids.shape[0], ids.shape[1], width) // (B, T, D)
        torch.matmul(hidden, head) + bias // (B, T, V)
    | _ -> failwith "three parameters"

let private flatGradient (parameters: torch.Tensor list) =
    torch.cat(parameters |> List.map (fun p -> p.grad.reshape(-1L)) |> Array.ofList, 0L)

/// The gradient of the token mean over all rows of all micro-batches as one padded batch.
let private oneBigBatchGradient (microBatches: Row list list) =
    let parameters = freshParameters ()
    let ids, labels = inputsAndLabels (List.concat microBatches)
    let loss = Loss.causalLmSum (logitsOf parameters ids) labels / float (Loss.predictedTokens labels)
    loss.backward ()
    flatGradient parameters

/// The gradient accumulated micro-batch by micro-batch with the window's 1/tokens scale.
let private accumulatedGradient (microBatches: Row list list) =
    let parameters = freshParameters ()
    let batches = microBatches |> List.map inputsAndLabels
    let windowTokens = batches |> List.sumBy (fun (_, labels) -> Loss.predictedTokens labels)
    let scale = Accumulation.lossScale windowTokens
    for ids, labels in batches do
        (Loss.causalLmSum (logitsOf parameters ids) labels * scale).backward ()
    flatGradient parameters

/// The old way: each micro-batch's own token mean, divided by the number of micro-batches.
let private perMicroBatchMeanGradient (microBatches: Row list list) =
    let parameters = freshParameters ()
    for ids, labels in microBatches |> List.map inputsAndLabels do
        let mean = Loss.causalLmSum (logitsOf parameters ids) labels / float (Loss.predictedTokens labels)
        (mean / float microBatches.Length).backward ()
    flatGradient parameters

let private relativeMaxDifference (expected: torch.Tensor) (actual: torch.Tensor) =
    (expected - actual).abs().max().item<float32> () / expected.norm().item<float32> ()

let private rowGen =
    gen {
        let! length = Gen.choose (1, 8)
        let! tokens = Gen.arrayOfLength length (Gen.choose (0, int vocab - 1) |> Gen.map int64)
        let! masked = Gen.choose (0, length - 1)
        return { Tokens = tokens; MaskedPrefix = masked }
    }

/// 1 to 5 micro-batches of 1 to 3 rows; the first row always has a predicted token.
let private windowGen =
    gen {
        let! microBatches = Gen.choose (1, 5)
        let! window = Gen.listOfLength microBatches (Gen.choose (1, 3) |> Gen.bind (fun rows -> Gen.listOfLength rows rowGen))
        let! first = Gen.arrayOfLength 2 (Gen.choose (0, int vocab - 1) |> Gen.map int64)
        let firstRow = { Tokens = first; MaskedPrefix = 0 }
        return (firstRow :: List.head window) :: List.tail window
    }

let private withTensors (f: unit -> 'T) =
    TorchRuntime.ensure ()
    use scope = torch.NewDisposeScope()
    f ()

let private tensorEquivalence =
    testList "gradient equivalence" [
        testPropertyWithConfig { config with maxTest = 60 }
            "accumulating summed losses scaled by 1/windowTokens gives the one-big-batch gradient"
        <| Prop.forAll (Arb.fromGen windowGen) (fun window ->
            withTensors (fun () ->
                relativeMaxDifference (oneBigBatchGradient window) (accumulatedGradient window) <= 1e-5f))

        test "the old per-micro-batch mean differs when lengths vary" {
            withTensors (fun () ->
                // One token predicted in the first micro-batch, seven in the second: the old way gives the
                // lone token 1/2 of the weight instead of 1/8.
                let window =
                    [ [ { Tokens = [| 3L; 4L |]; MaskedPrefix = 0 } ]
                      [ { Tokens = [| 1L; 5L; 9L; 2L; 7L; 0L; 6L; 8L |]; MaskedPrefix = 0 } ] ]
                let big = oneBigBatchGradient window
                Expect.isLessThanOrEqual (relativeMaxDifference big (accumulatedGradient window)) 1e-5f "token-weighted matches"
                Expect.isGreaterThan (relativeMaxDifference big (perMicroBatchMeanGradient window)) 0.05f "per-micro-batch mean does not")
        }
    ]

[<Tests>]
let tests = testList "accumulation" [ stateMachine; tensorEquivalence ]
