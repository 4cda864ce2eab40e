module Functional.Tests.LossTests

open System
open Expecto
open TorchSharp
open Functional
open Functional.Runtime

let private labelsOf (rows: int64[][]) =
    let time = rows |> Array.map Array.length |> Array.max
    let flat = rows |> Array.collect (fun r -> Array.append r (Array.create (time - r.Length) -100L))
    torch.tensor(flat).reshape(int64 rows.Length, int64 time)

/// The loss written out: for every row b and position t < T-1 whose next label y is not -100,
/// -(logits[b,t,y] - log sum_v exp logits[b,t,v]), in float64.
let private handWrittenLoss (logits: float32[]) (labels: int64[]) batch time vocab =
    let mutable total = 0.0
    for b in 0 .. batch - 1 do
        for t in 0 .. time - 2 do
            let y = labels[b * time + t + 1]
            if y <> -100L then
                let row = Array.init vocab (fun v -> float logits[(b * time + t) * vocab + v])
                let m = Array.max row
                let logSumExp = m + log (row |> Array.sumBy (fun x -> exp (x - m)))
                total <- total - (row[int y] - logSumExp)
    total

[<Tests>]
let tests =
    testList "loss" [
        test "the sum equals a hand-written log-softmax gather over the shifted positions" {
            TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            use generator = new torch.Generator(11UL)
            let batch, time, vocab = 3, 6, 9
            let logits = (torch.randn(int64 batch, int64 time, int64 vocab, generator = generator) * 3.0).requires_grad_(true)
            let labelData =
                [| 4L; 1L; 8L; 0L; -100L; -100L
                   -100L; -100L; 2L; 3L; 5L; 7L
                   6L; 6L; 6L; 1L; 0L; 2L |]
            let labels = torch.tensor(labelData).reshape(int64 batch, int64 time)
            let sum = Loss.causalLmSum logits labels
            let expected = handWrittenLoss (logits.data<float32>().ToArray()) labelData batch time vocab
            Expect.equal sum.dtype torch.ScalarType.Float32 "fp32 sum"
            Expect.equal (sum.dim ()) 0L "a 0-dim tensor"
            Expect.floatClose { absolute = 1e-4; relative = 1e-5 } (sum.item<float32> () |> float) expected "summed loss"
            sum.backward ()
            // d sum / d logits[b, t] = softmax - onehot(y) where the next label y is a target, 0 elsewhere.
            let grad = logits.grad
            let lastPosition = grad.narrow(1L, int64 time - 1L, 1L)
            Expect.equal (lastPosition.abs().max().item<float32> ()) 0.0f "the last position predicts nothing"
            Expect.equal (grad[0, 3].abs().max().item<float32> ()) 0.0f "position 3 of row 0 precedes a -100 label"
            Expect.isLessThan (grad.sum(-1L).abs().max().item<float32> ()) 1e-5f "softmax - onehot sums to 0"
            Expect.isGreaterThan (grad[2, 0].abs().max().item<float32> ()) 0.0f "a predicting position has a gradient"
        }

        test "bf16 logits are upcast: the sum is fp32 and equals the fp32 loss of the same values" {
            TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            use generator = new torch.Generator(5UL)
            let logits = torch.randn(2L, 4L, 7L, generator = generator).to_type(torch.ScalarType.BFloat16)
            let labels = labelsOf [| [| 1L; 2L; 3L; 4L |]; [| 5L; 6L |] |]
            let fromBf16 = Loss.causalLmSum logits labels
            let fromFp32 = Loss.causalLmSum (logits.to_type torch.ScalarType.Float32) labels
            Expect.equal fromBf16.dtype torch.ScalarType.Float32 "fp32"
            Expect.equal (fromBf16.item<float32> ()) (fromFp32.item<float32> ()) "the same fp32 computation"
        }

        test "predicted tokens are counted after the shift: rows of lengths 3 and 5 give 2 + 4" {
            TorchRuntime.ensure ()
            use labels = labelsOf [| [| 10L; 11L; 12L |]; [| 20L; 21L; 22L; 23L; 24L |] |]
            Expect.equal (Loss.predictedTokens labels) 6L "2 + 4 (HF's count before the shift would say 8)"
        }

        test "prompt labels masked with -100 are not counted" {
            TorchRuntime.ensure ()
            use labels = labelsOf [| [| -100L; -100L; 12L; 13L |] |]
            Expect.equal (Loss.predictedTokens labels) 2L "positions 2 and 3"
        }

        test "a row of only one real token contributes no token and no loss" {
            TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            let labels = labelsOf [| [| 7L |]; [| 1L; 2L; 3L |] |]
            let onlyLong = labelsOf [| [| 1L; 2L; 3L |] |]
            Expect.equal (Loss.predictedTokens labels) 2L "the short row adds 0"
            use generator = new torch.Generator(3UL)
            let logits = torch.randn(2L, 3L, 5L, generator = generator)
            let both = Loss.causalLmSum logits labels
            let longRow = Loss.causalLmSum (logits.narrow(0L, 1L, 1L)) onlyLong
            Expect.floatClose Accuracy.high (both.item<float32> () |> float) (longRow.item<float32> () |> float) "same loss"
        }

        test "a fully masked batch has sum 0 and count 0, not NaN" {
            TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            let labels = torch.tensor(Array.create 8 -100L).reshape(2L, 4L)
            let sum = Loss.causalLmSum (torch.randn(2L, 4L, 3L)) labels
            Expect.equal (sum.item<float32> ()) 0.0f "sum 0"
            Expect.equal (Loss.predictedTokens labels) 0L "count 0"
        }

        test "sequences of length 1 have nothing to predict" {
            TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            let labels = labelsOf [| [| 3L |]; [| 4L |] |]
            Expect.equal ((Loss.causalLmSum (torch.randn(2L, 1L, 6L)) labels).item<float32> ()) 0.0f "sum 0"
            Expect.equal (Loss.predictedTokens labels) 0L "count 0"
        }

        test "mismatched shapes are rejected naming the labels" {
            TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            let labels = labelsOf [| [| 1L; 2L; 3L |] |]
            let ex = Expect.throwsC (fun () -> Loss.causalLmSum (torch.randn(1L, 4L, 5L)) labels |> ignore) id
            Expect.equal (ex :?> ArgumentException).ParamName "labels" "names labels"
        }
    ]
