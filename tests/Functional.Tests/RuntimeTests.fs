module Functional.Tests.RuntimeTests

open Expecto
open TorchSharp
open Functional.Runtime

[<Tests>]
let tests =
    testList "runtime" [
        test "TorchSharp starts and computes a matmul" {
            TorchRuntime.ensure ()
            use a = torch.ones(2L, 3L)
            use b = torch.ones(3L, 4L)
            use c = torch.matmul(a, b)
            Expect.equal (c.sum().item<float32>()) 24.0f "2x3 ones times 3x4 ones: eight entries of 3"
        }
    ]
