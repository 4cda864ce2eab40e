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
            let data = loadTokenized (Path.Combine(dir, "data.jsonl"))
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
            TrainingLoop.train (TrainingLoop.plan options data.Rows.Length) model data None
                { OnLog = fun log -> live[log.Step] <- DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount
                  AfterStep = fun _ -> StepDecision.Continue }
            |> ignore
            // The count is read inside the step's scope, which holds that window's micro-batches; windows
            // repeat every 4 steps (7 micro-batches per epoch in windows of 2, 2, 2, 1), so compare those.
            Expect.isGreaterThan live[8] 0L "the count is read"
            let after = [| for step in 8 .. 4 .. 200 -> live[step] |] |> Array.distinct
            Expect.equal after [| live[8] |] (sprintf "live tensors every 4th step from 8 to 200 equal step 8's (%d)" live[8])
        }
    ]
