/// The training step's seams: the communicator it reduces through (three all-reduces per step, the
/// rank's rows), the objective it minimizes, the norm reduction of clipping, and the typed queries into
/// the optimizer state.
module Functional.Tests.StepTests

open System
open System.IO
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Optim
open Functional.Training
open Functional.Tests.TestUtil

/// size processes as threads of this one (the test stand-in for mpirun): Run gives each thread a
/// communicator whose collectives meet the others' at barriers and sum or copy their tensors, as MPI does.
/// LargestPart is the most elements any process contributed to one call (a reduce-scatter's input part
/// or an all-gather's input).
type private LocalGroup(size: int) =
    let barrier = new Threading.Barrier(size)
    let posted: torch.Tensor[] = Array.zeroCreate size
    let mutable largest = 0L
    let note (elements: int64) = lock posted (fun () -> largest <- max largest elements)
    let meet (rank: int) (tensor: torch.Tensor) (finish: unit -> unit) =
        posted[rank] <- tensor
        barrier.SignalAndWait()
        finish ()
        barrier.SignalAndWait()
    let sumOf (part: torch.Tensor -> torch.Tensor) =
        let parts = posted |> Array.map part
        let total = parts |> Array.reduce (fun a b -> a + b)
        total
    member _.LargestPart = largest
    member _.Run(body: ICommunicator -> 'T) : 'T[] =
        let communicator rank =
            { new ICommunicator with
                member _.Rank = rank
                member _.Size = size
                member _.LocalRank = rank
                member _.AllReduce tensor =
                    note (tensor.numel ())
                    use copy = tensor.clone ()
                    let mutable sum = None
                    meet rank copy (fun () -> sum <- Some(sumOf id))
                    use result = sum.Value
                    tensor.copy_ result |> ignore
                    barrier.SignalAndWait()
                member _.ReduceScatter(input, output) =
                    let length = output.numel ()
                    note length
                    meet rank input (fun () ->
                        use result = sumOf (fun t -> t.narrow(0L, int64 rank * length, length))
                        output.copy_ result |> ignore)
                member _.AllGather(input, output) =
                    let length = input.numel ()
                    note length
                    meet rank input (fun () ->
                        for r in 0 .. size - 1 do
                            use target = output.narrow(0L, int64 r * length, length)
                            target.copy_ posted[r] |> ignore)
                member _.Broadcast(tensor, root) =
                    meet rank tensor (fun () -> if rank <> root then tensor.copy_ posted[root] |> ignore)
                member _.Barrier() = barrier.SignalAndWait() }
        let results = Array.zeroCreate size
        let threads =
            [| for rank in 0 .. size - 1 ->
                   Threading.Thread(fun () ->
                       use _ = torch.NewDisposeScope()
                       results[rank] <- Some(body (communicator rank))) |]
        for t in threads do t.Start()
        for t in threads do t.Join()
        results |> Array.map (fun r -> r |> Option.defaultWith (fun () -> failwith "a process of the group failed"))

/// A communicator that passes every operation to inner and records each AllReduce as (dtype, elements);
/// Size and Rank can be overridden to pose as one process of several.
type private Recording(inner: ICommunicator, size: int, rank: int) =
    let calls = ResizeArray<torch.ScalarType * int64>()
    new(inner) = Recording(inner, inner.Size, inner.Rank)
    member _.Calls = calls

    /// The calls recorded since the last Take, forgotten.
    member _.Take() =
        let taken = List.ofSeq calls
        calls.Clear()
        taken

    interface ICommunicator with
        member _.Rank = rank
        member _.Size = size
        member _.LocalRank = rank
        member _.AllReduce tensor =
            calls.Add((tensor.dtype, tensor.numel ()))
            inner.AllReduce tensor
        member _.ReduceScatter(input, output) = inner.ReduceScatter(input, output)
        member _.AllGather(input, output) = inner.AllGather(input, output)
        member _.Broadcast(tensor, root) = inner.Broadcast(tensor, root)
        member _.Barrier() = inner.Barrier()

let private dir = goldenDir "llama-cosine"
let private model () = HfModelFolder.load (Path.Combine(dir, "model")) 1L
let private data () = loadTokenized (Path.Combine(dir, "data.jsonl"))

/// 13 rows in micro-batches of 2, windows of 3 micro-batches.
let private small =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 3
        MaxSeqLen = 32
        LearningRate = 1e-3
        Shuffle = false }

let private flatValues (result: TrainResult) =
    use values = result.Parameters.Values.detach().clone()
    values |> TestUtil.values

/// Trains run for its plan, returning the logs, the final flat values and what AfterStep saw.
let private train (run: TrainRun) (afterStep: StepContext -> unit) =
    let logs = ResizeArray<StepLog>()
    let result =
        TrainingLoop.run run None
            { OnLog = logs.Add
              AfterStep = fun context -> afterStep context; StepDecision.Continue }
    let values = flatValues result
    result.Parameters.Dispose()
    result.OptimizerState.Dispose()
    List.ofSeq logs, values

let private figures (logs: StepLog list) = logs |> List.map (fun l -> l.Step, l.Loss, l.GradNorm, l.PredictedTokens, l.LearningRate)

let private communicatorTests =
    testList "communicator" [
        torchTest "the step all-reduces three times: the window's count, the flat gradients in one call, the loss sum" (fun () ->
            let options = { small with MaxSteps = 4 }
            let dataset = data ()
            let plan = TrainingLoop.plan options dataset.Rows.Length
            let recording = Recording(Communicator.singleProcess)
            let perStep = ResizeArray()
            let gradients = ref 0L
            let logs, values =
                let m = model ()
                train { TrainingLoop.setup plan m dataset with Communicator = recording } (fun context ->
                    gradients.Value <- context.Parameters.Grads.numel ()
                    perStep.Add(recording.Take()))
            Expect.equal perStep.Count 4 "four steps"
            for calls in perStep do
                Expect.equal calls
                    [ torch.ScalarType.Int64, 1L; torch.ScalarType.Float32, gradients.Value; torch.ScalarType.Float64, 1L ]
                    "count (int64), gradients (the whole flat buffer), loss sum (float64), in that order"
            // Reducing through one process changes nothing: the same run without the recorder is bit-identical.
            let plainLogs, plainValues = train (TrainingLoop.setup plan (model ()) dataset) ignore
            Expect.equal (figures logs) (figures plainLogs) "same logs"
            Expect.isTrue (values = plainValues) "bit-identical weights")

        torchTest "a communicator of size 2 makes each rank train on its own rows, as Sampler.distributed deals them" (fun () ->
            let dataset = data ()
            let options = { small with MaxSteps = 3 }
            for rank in 0..1 do
                let plan = TrainingLoop.planFor 2 options dataset.Rows.Length
                Expect.equal plan.Accumulation.MicroBatchesPerEpoch 4 "7 of the 13 rows per rank, in micro-batches of 2"
                // Reductions that stay local: what this rank trains on alone.
                let rankOf = Recording(Communicator.singleProcess, 2, rank)
                let logs, values = train { TrainingLoop.setup plan (model ()) dataset with Communicator = rankOf } ignore
                let rows = Sampler.distributed rank 2 false options.Seed 0 dataset.Rows.Length
                Expect.equal rows.Length 7 "ceil(13 / 2) rows"
                let subset =
                    { dataset with
                        Rows = rows |> Array.map (fun i -> dataset.Rows[i])
                        Lines = rows |> Array.map (fun i -> dataset.Lines[i])
                        PromptLengths = rows |> Array.map (fun i -> dataset.PromptLengths[i])
                        TrainMasks = if dataset.TrainMasks.Length = 0 then [||] else rows |> Array.map (fun i -> dataset.TrainMasks[i])
                        Segments = [||] }
                let alone = TrainingLoop.plan options subset.Rows.Length
                let subsetLogs, subsetValues = train (TrainingLoop.setup alone (model ()) subset) ignore
                Expect.equal (figures logs) (figures subsetLogs) (sprintf "rank %d: the logs of one process on the rank's rows" rank)
                Expect.isTrue (values = subsetValues) (sprintf "rank %d: bit-identical weights" rank))

        torchTest "shuffled, each rank's windows hold the rows of its share of the (seed, epoch) order" (fun () ->
            let dataset = data ()
            let options = { small with MaxSteps = 5; Shuffle = true; Seed = 7L }
            let plan = TrainingLoop.planFor 2 options dataset.Rows.Length
            let predicted rank =
                [ for epoch in 0..2 do
                      let order = Sampler.distributed rank 2 true options.Seed epoch dataset.Rows.Length
                      let batches = Batching.microBatches options.PerDeviceTrainBatchSize order
                      for window in Array.chunkBySize options.GradientAccumulationSteps batches ->
                          window
                          |> Array.concat
                          |> Array.sumBy (fun i -> Batching.predictedTokens options.MaxSeqLen dataset.PromptLengths[i] dataset.Rows[i]) ]
                |> List.take 5
            let logged rank =
                let rankOf = Recording(Communicator.singleProcess, 2, rank)
                let logs, _ = train { TrainingLoop.setup plan (model ()) dataset with Communicator = rankOf } ignore
                logs |> List.map (fun l -> l.PredictedTokens)
            for rank in 0..1 do
                Expect.equal (logged rank) (predicted rank) (sprintf "rank %d's windows" rank)
            Expect.notEqual (predicted 0) (predicted 1) "the ranks see different rows")

        torchTest "a plan made for another number of processes is refused" (fun () ->
            let dataset = data ()
            let plan = TrainingLoop.plan { small with MaxSteps = 1 } dataset.Rows.Length
            let twoRanks = Recording(Communicator.singleProcess, 2, 0)
            Expect.throwsT<ArgumentException>
                (fun () -> TrainingLoop.run { TrainingLoop.setup plan (model ()) dataset with Communicator = twoRanks } None { OnLog = ignore; AfterStep = fun _ -> StepDecision.Continue } |> ignore)
                "planFor 2 is needed")

        torchTest "one process: sums are the values, scatter and gather copy, broadcast needs root 0" (fun () ->
            let single = Communicator.singleProcess
            Expect.equal (single.Size, single.Rank, single.LocalRank) (1, 0, 0) "rank 0 of 1"
            Expect.equal (Communicator.sumInt64 single 1234567890123L) 1234567890123L "int64 sum"
            Expect.equal (Communicator.sumFloat single 0.1) 0.1 "float sum, exactly"
            use input = torch.arange(6L, dtype = torch.float32)
            use output = torch.zeros(6L)
            single.ReduceScatter(input, output)
            Expect.equal (values output) (values input) "reduce-scatter of one part"
            output.zero_() |> ignore
            single.AllGather(input, output)
            Expect.equal (values output) (values input) "all-gather of one part"
            use short = torch.zeros(5L)
            Expect.throwsT<ArgumentException> (fun () -> single.AllGather(input, short)) "a wrong output size is refused"
            Expect.throwsT<ArgumentException> (fun () -> single.Broadcast(input, 1)) "no rank 1"
            single.AllReduce input
            single.Broadcast(input, 0)
            single.Barrier()
            Expect.equal (values input) [| 0.0 .. 5.0 |] "all-reduce and broadcast leave the tensor as it is")
    ]

let private objectiveTests =
    testList "objective" [
        torchTest "the trainer and evaluation run the objective they are given" (fun () ->
            let dataset = data ()
            let options = { small with MaxSteps = 2 }
            let plan = TrainingLoop.plan options dataset.Rows.Length
            let calls = ref 0
            let doubled =
                { Objective.causalLm with
                    LossSum =
                        fun m batch ->
                            calls.Value <- calls.Value + 1
                            use sum = Objective.causalLm.LossSum m batch
                            sum * 2.0 }
            let logs, _ = train { TrainingLoop.setup plan (model ()) dataset with Objective = doubled } ignore
            Expect.equal calls.Value 6 "one loss per micro-batch: 2 windows of 3"
            let plainLogs, _ = train (TrainingLoop.setup plan (model ()) dataset) ignore
            Expect.floatClose Accuracy.high logs.Head.Loss (2.0 * plainLogs.Head.Loss) "the first step's loss is the doubled objective's"
            let m = model ()
            let plain = Evaluation.evaluate m dataset 4 32 TrainingLoop.PadId
            let twice = Evaluation.evaluateWith doubled m dataset 4 32 TrainingLoop.PadId
            Expect.floatClose Accuracy.high twice.Loss (2.0 * plain.Loss) "evaluation's loss is the doubled objective's"
            Expect.equal twice.Tokens plain.Tokens "counted by the objective's Count")
    ]

/// AdamW at a constant rate, betas 0.9/0.999, eps 1e-8, no weight decay, clipping at 1 with the local norm.
let private adamW (rate: float) (mask: torch.Tensor) : AdamWConfig =
    { Schedule = fun _ -> rate
      Beta1 = 0.9
      Beta2 = 0.999
      Epsilon = 1e-8
      WeightDecay = 0.0
      DecayMask = mask
      MaxGradNorm = 1.0
      NormReduction = Transform.localNorm
      Factors = None
      Amsgrad = false
      Maximize = false }

let private normTests =
    testList "norm reduction" [
        torchTest "an injected reduction that doubles the sum of squares scales the norm by sqrt 2 and clips by it" (fun () ->
            let g = [| 3.0f; 4.0f; 0.0f; 12.0f |] // norm 13
            use parameters = torch.zeros 4L
            let clip = Transform.clipByGlobalNormWith (fun sumOfSquares -> 2.0 * sumOfSquares) 1.0
            use gradient = torch.tensor g
            let updates, state = clip.Update gradient (clip.Init parameters) parameters
            let norm = 13.0 * sqrt 2.0
            Expect.floatClose Accuracy.veryHigh (Transform.lastGradNorm state) norm "the reduced norm is reported"
            let coefficient = 1.0 / (norm + 1e-6)
            Expect.sequenceEqual (values updates |> Array.map (fun x -> Math.Round(x, 6))) (g |> Array.map (fun x -> Math.Round(float x * coefficient, 6))) "clipped by maxNorm / (reduced norm + 1e-6)"
            let local = Transform.clipByGlobalNorm 1.0
            use again = torch.tensor g
            let _, localState = local.Update again (local.Init parameters) parameters
            Expect.equal (Transform.lastGradNorm localState) 13.0 "the local norm, exactly")

        torchTest "the fused AdamW clips by the injected reduction as the unfused chain does" (fun () ->
            let make () = FlatParameters.create [ struct ("w", new Modules.Parameter(torch.linspace(-1.0, 1.0, 64L))) ]
            use fusedFlat = make ()
            use plainFlat = make ()
            use mask = FlatParameters.uniform fusedFlat 1.0f
            let config =
                { adamW 1e-2 mask with NormReduction = fun sumOfSquares -> 4.0 * sumOfSquares }
            let fused = Optimizer.fusedAdamW config
            let plain = Optimizer.unfused fused.Transform
            use gradient = torch.linspace(2.0, -3.0, 64L)
            fusedFlat.Grads.copy_ gradient |> ignore
            plainFlat.Grads.copy_ gradient |> ignore
            use fusedState = fused.Step fusedFlat (fused.Transform.Init fusedFlat.Values) None
            use plainState = plain.Step plainFlat (plain.Transform.Init plainFlat.Values) None
            let local = Transform.globalNorm gradient
            Expect.floatClose Accuracy.high (Transform.lastGradNorm fusedState) (2.0 * local) "fused: twice the local norm"
            Expect.floatClose Accuracy.high (Transform.lastGradNorm plainState) (2.0 * local) "chain: twice the local norm"
            expectClose 1e-6 fusedFlat.Values plainFlat.Values "same update")
    ]

let private queryTests =
    testList "optimizer state queries" [
        torchTest "applied updates and state members are found by type, whatever the nesting" (fun () ->
            use values = torch.zeros 8L
            use mask = torch.ones 8L
            let config = { adamW 1e-3 mask with Factors = Some mask }
            let transform = Optimizer.adamWChain config
            let mutableFree = transform.Init values
            Expect.equal (Optimizer.appliedUpdates mutableFree) 0 "a fresh state has applied none"
            Expect.equal mutableFree.Names
                [ "1.0.adam.exp_avg"; "1.0.adam.exp_avg_sq"; "1.0.adam.step"; "1.2.learning_rate.count" ]
                "checkpoint names of the trainer's AdamW chain"
            let counted =
                Transform.tryReplaceState (fun (s: Transform.LearningRateState) -> { s with Count = 5 }) mutableFree
                |> Option.get
            Expect.equal (Optimizer.appliedUpdates counted) 5 "the count, by type"
            Expect.equal counted.Names mutableFree.Names "the shape is kept"
            Expect.isNone (Transform.tryReplaceState (fun (s: Transform.TraceState) -> s) counted) "no momentum in AdamW"
            Expect.isSome (Transform.tryFindState<Transform.AdamState> counted) "Adam's moments"
            counted.Dispose())
    ]

/// ZeRO stages in one process (every block is the whole buffer) and Sharding's arithmetic. The collectives
/// between processes are compared with one process under mpirun in the list "distributed training".
let private zeroTests =
    testList "zero stages" [
        torchTest "stages 1, 2 and 3 in one process train as stage 0: the same losses, norms and weights" (fun () ->
            let options = { small with MaxSteps = 4; WeightDecay = 0.1; MaxGradNorm = 0.5 }
            let dataset = data ()
            let plan = TrainingLoop.plan options dataset.Rows.Length
            let baseLogs, baseValues = train (TrainingLoop.setup plan (model ()) dataset) ignore
            for stage in [ 1; 2; 3 ] do
                let logs, values = train { TrainingLoop.setup plan (model ()) dataset with ZeroStage = stage } ignore
                for (s, loss, norm, _, lr), (_, loss', norm', _, lr') in List.zip (figures logs) (figures baseLogs) do
                    Expect.floatClose Accuracy.medium loss loss' (sprintf "stage %d step %d loss" stage s)
                    Expect.floatClose Accuracy.medium norm norm' (sprintf "stage %d step %d grad norm" stage s)
                    Expect.equal lr lr' (sprintf "stage %d step %d lr" stage s)
                let worst = Array.map2 (fun (a: float) b -> abs (a - b)) values baseValues |> Array.max
                Expect.isLessThan worst 1e-6 (sprintf "stage %d: largest weight difference %g" stage worst))

        torchTest "stage 3 keeps live tensors flat over the steps and gathers the whole model only on request" (fun () ->
            let options = { small with MaxSteps = 7 }
            let dataset = data ()
            let plan = TrainingLoop.plan options dataset.Rows.Length
            let m = model ()
            let live = ResizeArray<int64>()
            let weight = m.Module.named_parameters () |> Seq.pick (fun struct (n, p) -> if n.EndsWith "q_proj.weight" then Some p else None)
            let sizes = ResizeArray<int64 * int64>()
            let _ =
                train { TrainingLoop.setup plan m dataset with ZeroStage = 3 } (fun context ->
                    let freed = weight.numel ()
                    use _ = context.GatherParameters()
                    sizes.Add((freed, weight.numel ()))
                    live.Add(DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount))
            for freed, gathered in sizes do
                Expect.equal freed 0L "a layer's parameter is freed between its uses"
                Expect.isGreaterThan gathered 0L "GatherParameters makes it whole"
            // Windows of 3, 3 and 1 micro-batches repeat every 3 steps: steps 4 and 7 hold the same.
            Expect.equal live[6] live[3] (sprintf "live tensors after each step: %A" (List.ofSeq live))
            Expect.isGreaterThan (weight.numel ()) 0L "after the run the parameters are whole")

        testProperty "Sharding.block: the blocks of every process cover the buffer once, in order" (fun (total: uint16) (size: byte) ->
            let total, size = int64 total, int size % 16 + 1
            let blocks = [ for r in 0 .. size - 1 -> Sharding.block total size r ]
            let mutable next = 0L
            for b in blocks do
                Expect.equal b.Offset next "consecutive"
                Expect.isLessThanOrEqual b.Count (Sharding.blockLength total size) "at most one block length"
                next <- b.Offset + b.Count
            Expect.equal next total "covers the buffer")

        torchTest "Sharding's collectives on one process: reduce-scatter and all-gather of a buffer copy it" (fun () ->
            use x = torch.arange(7L, dtype = torch.float32)
            use block = torch.zeros([| 7L |])
            Sharding.reduceScatter Communicator.singleProcess 3L x block
            Expect.equal (TestUtil.values block) (TestUtil.values x) "the one block is the buffer"
            use back = torch.zeros([| 7L |])
            Sharding.allGather Communicator.singleProcess 3L block back
            Expect.equal (TestUtil.values back) (TestUtil.values x) "gathered back")

        testProperty "Sharding's collectives in buckets equal the whole sums and gathers, with no call above a bucket" (fun (total: byte) (size: byte) (bucket: byte) (seed: int) ->
            let total, size, bucket = int64 total, int size % 4 + 1, int64 (bucket % 40uy) + 1L
            Functional.Runtime.TorchRuntime.ensure ()
            let generator = Random seed
            // Small integers: every order of summation gives the same floats.
            let inputs = Array.init size (fun _ -> Array.init (int total) (fun _ -> float32 (generator.Next(-50, 50))))
            let sum = Array.init (int total) (fun i -> inputs |> Array.sumBy (fun row -> float row[i]))
            let length = Sharding.blockLength total size
            let group = new LocalGroup(size)
            let results =
                group.Run(fun communicator ->
                    let rank = communicator.Rank
                    use input = torch.tensor inputs[rank]
                    use reduced = torch.zeros([| length |])
                    Sharding.reduceScatter communicator bucket input reduced
                    let own = Sharding.block total size rank
                    use mine = reduced.narrow(0L, 0L, own.Count)
                    use gathered = torch.zeros([| total |])
                    Sharding.allGather communicator bucket mine gathered
                    use summed = torch.tensor inputs[rank]
                    Sharding.allReduce communicator bucket summed
                    TestUtil.values reduced, TestUtil.values gathered, TestUtil.values summed)
            for rank, (reduced, gathered, summed) in Array.indexed results do
                let expected = Array.init (int length) (fun i -> let at = int64 rank * length + int64 i in if at < total then sum[int at] else 0.0)
                Expect.equal reduced expected (sprintf "rank %d's block of the sum (zero past the end)" rank)
                Expect.equal gathered sum (sprintf "rank %d gathered the whole sum" rank)
                Expect.equal summed sum (sprintf "rank %d all-reduced the sum" rank)
            Expect.isLessThanOrEqual group.LargestPart bucket (sprintf "no process's part of a call exceeds the bucket of %d" bucket))

        testCase "Sharding refuses a bucket outside 1 to 2^31 - 1 elements, naming it" (fun () ->
            use x = torch.zeros([| 4L |])
            let refusal (action: unit -> unit) =
                try
                    action ()
                    failtest "expected an InvalidInputException"
                with :? InvalidInputException as e -> e.Origin + ": " + e.Message
            Expect.stringContains (refusal (fun () -> Sharding.allReduce Communicator.singleProcess 0L x)) "reduce_bucket_size" "0 elements: names the setting"
            Expect.stringContains (refusal (fun () -> Sharding.allGather Communicator.singleProcess 3000000000L x x)) "allgather_bucket_size" "above an MPI count: names the setting")
    ]

[<Tests>]
let tests = testList "step" [ communicatorTests; objectiveTests; normTests; queryTests; zeroTests ]
