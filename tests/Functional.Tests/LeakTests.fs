/// Memory discipline of the training loop: one dispose scope per optimizer step.
module Functional.Tests.LeakTests

open System.IO
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Training
open Functional.Tests.TestUtil

[<Tests>]
let tests =
    testList "leaks" [
        test "200 training steps keep the live tensor count flat" {
            let dir = goldenDir "llama-cosine"
            let model = HfModelFolder.load (Path.Combine(dir, "model")) 1L
            let data = TokenizedDataset.load (Path.Combine(dir, "data.jsonl"))
            let options =
                { TrainOptions.defaults with
                    PerDeviceTrainBatchSize = 2
                    GradientAccumulationSteps = 2
                    MaxSteps = 200
                    MaxSeqLen = 32
                    LearningRate = 1e-3
                    LrSchedulerType = SchedulerKind.Cosine
                    NumWarmupSteps = 10 }
            let live = Array.zeroCreate<int64> 201
            Trainer.train options model data (fun log ->
                live[log.Step] <- DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount)
            |> ignore
            Expect.isGreaterThan live[10] 0L "the count is read"
            let after = live[10..200] |> Array.distinct
            Expect.equal after [| live[10] |] (sprintf "live tensors at every step from 10 to 200 equal step 10's (%d)" live[10])
        }
    ]
