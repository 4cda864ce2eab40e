/// Process grids of tensor x pipeline x data parallel runs (ProcessGrid) and tensor parallelism's pieces
/// (TensorParallel) on one process; the multi-process checks are in the "mpi" list (DistributedTests).
module Functional.Tests.ProcessGridTests

open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Functional.Distributed
open Functional.Tests.TestUtil

/// Grids of up to 4 x 3 x 3 processes (tensor, pipeline, data degrees).
let private shapes =
    gen {
        let! t = Gen.choose (1, 4)
        let! p = Gen.choose (1, 3)
        let! d = Gen.choose (1, 3)
        return t, p, d
    }
    |> Arb.fromGen

let private config = { FsCheckConfig.defaultConfig with maxTest = 100 }

[<Tests>]
let tests =
    testList "process grid" [
        testPropertyWithConfig config "every rank has one place; each kind of group partitions the world; tensor groups are consecutive ranks"
            (Prop.forAll shapes (fun (t, p, d) ->
                let world = t * p * d
                let grids = [ for r in 0 .. world - 1 -> ProcessGrid.create world r t p ]
                let places = grids |> List.map (fun g -> g.PipelineRank, g.DataRank, g.TensorRank) |> set
                let partitions (groupOf: ProcessGrid -> int list) (size: int) =
                    let groups = grids |> List.map groupOf |> set
                    groups |> Set.forall (fun g -> g.Length = size)
                    && (groups |> Seq.concat |> Seq.sort |> List.ofSeq) = [ 0 .. world - 1 ]
                    && grids |> List.forall (fun g -> List.contains g.Rank (groupOf g))
                places.Count = world
                && grids |> List.forall (fun g -> g.DataDegree = d && ProcessGrid.rankAt g g.PipelineRank g.DataRank g.TensorRank = g.Rank)
                && partitions ProcessGrid.tensorGroup t
                && partitions ProcessGrid.pipelineGroup p
                && partitions ProcessGrid.dataGroup d
                && grids |> List.forall (fun g -> ProcessGrid.tensorGroup g = [ g.Rank - g.TensorRank .. g.Rank - g.TensorRank + t - 1 ])
                && grids |> List.forall (fun g -> (ProcessGrid.tensorGroup g)[g.TensorRank] = g.Rank && (ProcessGrid.pipelineGroup g)[g.PipelineRank] = g.Rank && (ProcessGrid.dataGroup g)[g.DataRank] = g.Rank)))
        test "degrees that do not divide the world, or below 1, are refused naming the setting" {
            expectInvalidInput "--tensor-parallel-degree" "" [ "2 x 2 = 4"; "6 processes" ] (fun () -> ProcessGrid.create 6 0 2 2 |> ignore)
            expectInvalidInput "--tensor-parallel-degree" "" [ "at least 1" ] (fun () -> ProcessGrid.create 2 0 0 1 |> ignore)
            expectInvalidInput "--pipeline-parallel-degree" "" [ "at least 1" ] (fun () -> ProcessGrid.create 2 0 1 0 |> ignore)
            let g = ProcessGrid.create 8 5 2 2
            Expect.equal (g.PipelineRank, g.DataRank, g.TensorRank, g.DataDegree) (1, 0, 1, 2) "rank 5 of 8 with TP 2, PP 2: stage 1, copy 0, tensor rank 1"
        }
        test "one process: every group is the single-process communicator" {
            let groups = ProcessGrid.groups (Communicator.singleProcess :?> ISplittableCommunicator) 1 1
            Expect.equal (groups.Tensor.Size, groups.Pipeline.Size, groups.Data.Size) (1, 1, 1) "sizes"
        }
        test "attention heads: query heads in blocks; key/value heads in blocks, or replicated when fewer than the ranks" {
            Expect.equal [ for r in 0 .. 1 -> TensorParallel.attentionHeads 8 4 r 2 ] [ 0, 4, 0, 2; 4, 4, 2, 2 ] "8 heads, 4 kv heads, 2 ranks"
            Expect.equal [ for r in 0 .. 3 -> TensorParallel.attentionHeads 8 2 r 4 ] [ 0, 2, 0, 1; 2, 2, 0, 1; 4, 2, 1, 1; 6, 2, 1, 1 ] "8 heads, 2 kv heads, 4 ranks: replicated"
            Expect.throws (fun () -> TensorParallel.attentionHeads 6 6 0 4 |> ignore) "6 heads over 4 ranks"
        }
        torchTest "column and row shards are the blocks of the weight; f and g are identities on one process" (fun () ->
            use w = torch.arange(24.0, dtype = torch.float32).reshape(4L, 6L)
            use c = TensorParallel.columnShard w 1 2
            use r = TensorParallel.rowShard w 1 2
            Expect.equal (c.data<float32>().ToArray()) [| 12.0f .. 23.0f |] "rows 2-3"
            Expect.equal (r.data<float32>().ToArray()) [| 3.0f; 4.0f; 5.0f; 9.0f; 10.0f; 11.0f; 15.0f; 16.0f; 17.0f; 21.0f; 22.0f; 23.0f |] "columns 3-5"
            Expect.throws (fun () -> TensorParallel.columnShard w 0 3 |> ignore) "4 rows over 3 ranks"
            let passed, line = TensorParallelCheck.check Communicator.singleProcess
            Expect.isTrue passed line)
    ]

let private scheduleShapes =
    gen {
        let! stages = Gen.choose (1, 6)
        let! microBatches = Gen.choose (1, 10)
        return stages, microBatches
    }
    |> Arb.fromGen

let private layerWeights =
    gen {
        let! n = Gen.choose (1, 12)
        let! weights = Gen.arrayOfLength n (Gen.choose (1, 1000))
        let! stages = Gen.choose (1, n)
        return Array.map int64 weights, stages
    }
    |> Arb.fromGen

/// The heaviest stage of every way to cut weights into `stages` contiguous runs, by brute force.
let rec private bestHeaviest (weights: int64 list) (stages: int) : int64 =
    if stages = 1 then List.sum weights
    else
        [ for cut in 1 .. weights.Length - stages + 1 ->
              max (List.sum (List.take cut weights)) (bestHeaviest (List.skip cut weights) (stages - 1)) ]
        |> List.min

[<Tests>]
let pipelineTests =
    testList "pipeline plans" [
        testPropertyWithConfig config "1F1B: every micro-batch forward then backward, in order, at most stages - stage in flight, and the stages never deadlock"
            (Prop.forAll scheduleShapes (fun (stages, m) ->
                let schedules = [| for s in 0 .. stages - 1 -> Pipeline.oneForwardOneBackward stages s m |]
                let stageOk (s: int) (steps: PipelineStep list) =
                    let forwards = steps |> List.choose (function PipelineStep.Forward i -> Some i | _ -> None)
                    let backwards = steps |> List.choose (function PipelineStep.Backward i -> Some i | _ -> None)
                    let inFlight =
                        steps |> List.scan (fun n step -> match step with PipelineStep.Forward _ -> n + 1 | PipelineStep.Backward _ -> n - 1) 0
                    forwards = [ 0 .. m - 1 ] && backwards = [ 0 .. m - 1 ]
                    && List.forall (fun n -> n >= 0 && n <= stages - s) inFlight
                    && [ 0 .. m - 1 ] |> List.forall (fun i -> List.findIndex ((=) (PipelineStep.Forward i)) steps < List.findIndex ((=) (PipelineStep.Backward i)) steps)
                schedules |> Array.mapi stageOk |> Array.forall id && (Pipeline.simulate schedules).IsSome))
        test "a schedule that waits for the wrong stage deadlocks in the simulation" {
            let first = [ PipelineStep.Forward 0; PipelineStep.Backward 0; PipelineStep.Forward 1; PipelineStep.Backward 1 ]
            let last = [ PipelineStep.Forward 0; PipelineStep.Forward 1; PipelineStep.Backward 1; PipelineStep.Backward 0 ]
            Expect.isNone (Pipeline.simulate [| first; last |]) "stage 0 waits for backward 0 before forward 1; stage 1 waits for forward 1 before backward 0"
            Expect.equal (Pipeline.simulate [| for s in 0 .. 1 -> Pipeline.oneForwardOneBackward 2 s 2 |]) (Some 6) "1F1B over 2 stages and 2 micro-batches: 6 rounds"
            Expect.equal (Pipeline.oneForwardOneBackward 4 0 6 |> List.take 5) [ PipelineStep.Forward 0; PipelineStep.Forward 1; PipelineStep.Forward 2; PipelineStep.Forward 3; PipelineStep.Backward 0 ] "warm-up of 3 forwards on the first of 4 stages, then one forward, one backward"
        }
        testPropertyWithConfig config "partition: contiguous non-empty stages covering every layer, the heaviest stage as light as any cut allows"
            (Prop.forAll layerWeights (fun (weights, stages) ->
                let plan = Pipeline.partition weights stages
                let contiguous = plan |> Array.pairwise |> Array.forall (fun ((a, n), (b, _)) -> a + n = b)
                let heaviest = plan |> Array.map (fun (a, n) -> Array.sum weights[a .. a + n - 1]) |> Array.max
                plan.Length = stages && fst plan[0] = 0 && (let a, n = plan[stages - 1] in a + n = weights.Length)
                && plan |> Array.forall (fun (_, n) -> n >= 1) && contiguous
                && heaviest = bestHeaviest (List.ofArray weights) stages))
        test "partition refuses more stages than layers, naming the setting" {
            expectInvalidInput "--pipeline-parallel-degree" "" [ "3 layers" ] (fun () -> Pipeline.partition [| 1L; 2L; 3L |] 4 |> ignore)
        }
    ]
