/// The chunked cross-entropy (ChunkedLoss.causalLmSum, --loss-chunk-size): the same loss and gradients as
/// Loss.causalLmSum on the full logits, for every chunk size, with ignored positions, in fp32 and bf16, in
/// the models, the trainer and the command line.
module Functional.Tests.ChunkedLossTests

open System
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Training
open Functional.Tests.TestUtil

/// Labels (B, T) int64 from rows of equal length.
let private labelsOf (rows: int64[][]) =
    torch.tensor(Array.concat rows).reshape(int64 rows.Length, int64 rows[0].Length)

/// The loss and the gradients wrt hidden and weight of loss(hidden, weight), on fresh leaf copies of the
/// given values (so both paths start from the same tensors): (loss, d hidden, d weight) as float64.
let private lossAndGradients (loss: torch.Tensor -> torch.Tensor -> torch.Tensor) (hidden: torch.Tensor) (weight: torch.Tensor) =
    use scope = torch.NewDisposeScope()
    let h = hidden.detach().clone().requires_grad_(true)
    let w = weight.detach().clone().requires_grad_(true)
    let sum = loss h w
    sum.backward ()
    Expect.equal sum.dtype torch.ScalarType.Float32 "an fp32 sum"
    Expect.equal (sum.dim ()) 0L "a 0-dim sum"
    Expect.equal h.grad.dtype hidden.dtype "the hidden gradient in the hidden dtype"
    Expect.equal w.grad.dtype weight.dtype "the weight gradient in the weight dtype"
    float (sum.item<float32> ()), values h.grad, values w.grad

/// The full path: logits = linear(hidden, weight), then Loss.causalLmSum.
let private full (labels: torch.Tensor) (h: torch.Tensor) (w: torch.Tensor) =
    use logits = torch.nn.functional.linear(h, w)
    Loss.causalLmSum logits labels

/// The largest absolute value of an array (1 for an empty or all-zero one, so tolerances stay meaningful).
let private scaleOf (xs: float[]) = if xs.Length = 0 then 1.0 else max 1e-12 (xs |> Array.map abs |> Array.max)

/// Checks the chunked loss against the full one: the sum within relative tolerance lossTolerance, each
/// gradient within gradTolerance times its largest element.
let private expectSame (lossTolerance: float) (gradTolerance: float) (chunk: int) (labels: torch.Tensor) (hidden: torch.Tensor) (weight: torch.Tensor) =
    let expectedLoss, expectedHidden, expectedWeight = lossAndGradients (full labels) hidden weight
    let loss, hiddenGrad, weightGrad = lossAndGradients (fun h w -> ChunkedLoss.causalLmSum chunk h w labels) hidden weight
    let what = sprintf "chunk %d, %A" chunk hidden.dtype
    Expect.floatClose { absolute = lossTolerance; relative = lossTolerance } loss expectedLoss (what + ": loss")
    let compare (name: string) (actual: float[]) (expected: float[]) =
        Expect.equal actual.Length expected.Length (sprintf "%s: %s gradient size" what name)
        let diff = Array.map2 (fun a e -> abs (a - e)) actual expected |> Array.fold max 0.0
        let allowed = gradTolerance * scaleOf expected
        Expect.isLessThanOrEqual diff allowed (sprintf "%s: %s gradient differs by %g (allowed %g)" what name diff allowed)
    compare "hidden" hiddenGrad expectedHidden
    compare "weight" weightGrad expectedWeight
    loss, hiddenGrad, weightGrad

/// Rows of a batch with every kind of ignored position: a row with -100 in the middle and at the end, a row
/// whose only targets are late, a row with no target at all, and a row with every target.
let private mixedLabels (vocab: int64) (time: int) =
    let ignored = Loss.IgnoreIndex
    let token i = int64 ((7 * i + 3) % int vocab)
    labelsOf
        [| Array.init time (fun i -> if i = 2 || i >= time - 2 then ignored else token i)
           Array.init time (fun i -> if i < time / 2 then ignored else token (i + 1))
           Array.create time ignored
           Array.init time (fun i -> token (i + 5)) |]

let private equality =
    testList "equals the full loss" [
        for dtype, lossTolerance, gradTolerance in [ torch.ScalarType.Float32, 1e-5, 1e-5; torch.ScalarType.BFloat16, 2e-3, 2e-2 ] do
            torchTest (sprintf "%A: chunks of 1, 3, 5 (uneven), 28 (one chunk of all positions) and 1000 (larger than B x T)" dtype) (fun () ->
                use scope = torch.NewDisposeScope()
                use generator = new torch.Generator(21UL)
                let batch, time, width, vocab = 4, 7, 6, 11
                let hidden = (torch.randn(int64 batch, int64 time, int64 width, generator = generator) * 2.0).to_type dtype
                let weight = torch.randn(int64 vocab, int64 width, generator = generator).to_type dtype
                let labels = mixedLabels (int64 vocab) time
                let results = [ for chunk in [ 1; 3; 5; 28; 1000 ] -> expectSame lossTolerance gradTolerance chunk labels hidden weight ]
                let loss, hiddenGrad, _ = results.Head
                Expect.isGreaterThan loss 0.0 "a positive loss"
                // Row 2 has no target: its hidden states get no gradient; so do the last positions of every row.
                let rowGradient row position = hiddenGrad[((row * time) + position) * width .. ((row * time) + position + 1) * width - 1]
                for t in 0 .. time - 1 do
                    Expect.isTrue (rowGradient 2 t |> Array.forall ((=) 0.0)) (sprintf "row 2 (all ignored), position %d: no gradient" t)
                for b in 0 .. batch - 1 do
                    Expect.isTrue (rowGradient b (time - 1) |> Array.forall ((=) 0.0)) (sprintf "row %d: the last position predicts nothing" b)
                Expect.isTrue (rowGradient 3 0 |> Array.exists ((<>) 0.0)) "a predicting position has a gradient")

        torchTest "every position ignored: 0 and zero gradients, as the full loss" (fun () ->
            use scope = torch.NewDisposeScope()
            let hidden = torch.randn(2L, 5L, 4L)
            let weight = torch.randn(9L, 4L)
            let labels = torch.full(2L, 5L, Loss.IgnoreIndex, dtype = torch.int64)
            let loss, hiddenGrad, weightGrad = expectSame 1e-6 1e-6 3 labels hidden weight
            Expect.equal loss 0.0 "sum 0"
            Expect.isTrue (Array.forall ((=) 0.0) hiddenGrad && Array.forall ((=) 0.0) weightGrad) "zero gradients")

        torchTest "one position per row (T = 1) predicts nothing" (fun () ->
            use scope = torch.NewDisposeScope()
            let loss, _, _ = expectSame 1e-6 1e-6 2 (labelsOf [| [| 3L |]; [| 1L |] |]) (torch.randn(2L, 1L, 3L)) (torch.randn(5L, 3L))
            Expect.equal loss 0.0 "sum 0")

        torchTest "the loss scales its gradients by the upstream gradient (the trainer's 1 / tokens)" (fun () ->
            use scope = torch.NewDisposeScope()
            use generator = new torch.Generator(3UL)
            let hidden = torch.randn(2L, 6L, 5L, generator = generator)
            let weight = torch.randn(13L, 5L, generator = generator)
            let labels = mixedLabels 13L 6 |> fun l -> l.narrow(0L, 0L, 2L)
            let scaled (loss: torch.Tensor -> torch.Tensor -> torch.Tensor) h w = loss h w * 0.125
            let _, h1, w1 = lossAndGradients (scaled (full labels)) hidden weight
            let _, h2, w2 = lossAndGradients (scaled (fun h w -> ChunkedLoss.causalLmSum 4 h w labels)) hidden weight
            expectClose 1e-6 (torch.tensor h2) (torch.tensor h1) "hidden gradient x 0.125"
            expectClose 1e-6 (torch.tensor w2) (torch.tensor w1) "weight gradient x 0.125")

        torchTest "a frozen weight gets no gradient, the hidden states still do" (fun () ->
            use scope = torch.NewDisposeScope()
            let hidden = torch.randn(2L, 4L, 3L).requires_grad_(true)
            let weight = torch.randn(7L, 3L)
            let labels = labelsOf [| [| 1L; 2L; 3L; 4L |]; [| 5L; 6L; 0L; -100L |] |]
            use sum = ChunkedLoss.causalLmSum 2 hidden weight labels
            sum.backward ()
            Expect.isTrue (isNull weight.grad) "no weight gradient"
            Expect.isGreaterThan (hidden.grad.abs().sum().item<float32> ()) 0.0f "a hidden gradient")

        torchTest "without gradients (evaluation) the loss is the same and keeps no graph" (fun () ->
            use scope = torch.NewDisposeScope()
            let hidden = torch.randn(3L, 5L, 4L)
            let weight = torch.randn(10L, 4L)
            let labels = mixedLabels 10L 5 |> fun l -> l.narrow(0L, 0L, 3L)
            use _ = torch.no_grad ()
            use chunked = ChunkedLoss.causalLmSum 2 hidden weight labels
            use expected = full labels hidden weight
            Expect.isFalse chunked.requires_grad "no graph"
            Expect.floatClose { absolute = 1e-5; relative = 1e-6 } (float (chunked.item<float32> ())) (float (expected.item<float32> ())) "the same sum")

        torchTest "bad arguments are refused" (fun () ->
            use scope = torch.NewDisposeScope()
            let hidden = torch.randn(2L, 4L, 3L)
            let labels = torch.zeros([| 2L; 4L |], dtype = torch.int64)
            Expect.throwsT<ArgumentOutOfRangeException> (fun () -> ChunkedLoss.causalLmSum 0 hidden (torch.randn(5L, 3L)) labels |> ignore) "chunk 0"
            Expect.throwsT<ArgumentException> (fun () -> ChunkedLoss.causalLmSum 2 hidden (torch.randn(5L, 4L)) labels |> ignore) "width mismatch"
            Expect.throwsT<ArgumentException> (fun () -> ChunkedLoss.causalLmSum 2 hidden (torch.randn(5L, 3L).to_type torch.bfloat16) labels |> ignore) "dtype mismatch"
            Expect.throwsT<ArgumentException> (fun () -> ChunkedLoss.causalLmSum 2 hidden (torch.randn(5L, 3L)) (torch.zeros([| 2L; 3L |], dtype = torch.int64)) |> ignore) "labels (B, T) mismatch")
    ]

/// Random shapes, chunk sizes and ignored positions.
let private shapes =
    gen {
        let! batch = Gen.choose (1, 3)
        let! time = Gen.choose (1, 6)
        let! width = Gen.choose (1, 5)
        let! vocab = Gen.choose (2, 9)
        let! chunk = Gen.choose (1, 20)
        let! seed = Gen.choose (0, 10000)
        let! labels = Gen.arrayOfLength (batch * time) (Gen.frequency [ 1, Gen.constant -100L; 3, Gen.choose (0, vocab - 1) |> Gen.map int64 ])
        return batch, time, width, vocab, chunk, seed, labels
    }
    |> Arb.fromGen

let private property =
    testList "property" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 60 } "random shapes, chunks and ignored positions: the full loss and gradients"
        <| Prop.forAll shapes (fun (batch, time, width, vocab, chunk, seed, labels) ->
            Functional.Runtime.TorchRuntime.ensure ()
            use scope = torch.NewDisposeScope()
            use generator = new torch.Generator(uint64 seed)
            let hidden = torch.randn(int64 batch, int64 time, int64 width, generator = generator)
            let weight = torch.randn(int64 vocab, int64 width, generator = generator)
            let labels = torch.tensor(labels).reshape(int64 batch, int64 time)
            // fp32 rounding of two formulations (softmax minus one-hot against autograd of log-softmax) reaches 1e-5
            // of the largest element on tiny shapes; an error in the gradient is of its own size.
            expectSame 1e-5 5e-5 chunk labels hidden weight |> ignore)
    ]

/// The golden tiny models: GPT-2 with a tied head, LLaMA with an untied one.
let private goldenModel (case: string) = HfModelFolder.load (Path.Combine(goldenDir case, "model")) 1L
let private goldenData (case: string) = loadTokenized (Path.Combine(goldenDir case, "data.jsonl"))

/// Every parameter's gradient after backward of lossSum on a fresh copy of the model, by name.
let private parameterGradients (case: string) (objective: Objective) (batch: MicroBatch) =
    let model = goldenModel case
    model.Module.train ()
    use sum = objective.LossSum model batch
    sum.backward ()
    float (sum.item<float32> ()), [ for struct (name, p) in model.Module.named_parameters () -> name, values p.grad ]

let private models =
    testList "models" [
        for case in [ "gpt2-cosine"; "llama-cosine" ] do
            torchTest (sprintf "%s: the objective's loss and every parameter's gradient equal the full logits' (chunks of 1, 7, 500)" case) (fun () ->
                use scope = torch.NewDisposeScope()
                let data = goldenData case
                let batch = Batching.collate 32 TrainingLoop.PadId data [| 0; 1; 2 |]
                let expectedLoss, expected = parameterGradients case Objective.causalLm batch
                for chunk in [ 1; 7; 500 ] do
                    let loss, actual = parameterGradients case (Objective.causalLmChunked chunk) batch
                    Expect.floatClose { absolute = 1e-5; relative = 1e-5 } loss expectedLoss (sprintf "chunk %d: loss" chunk)
                    for (name, g), (expectedName, e) in List.zip actual expected do
                        Expect.equal name expectedName "parameter order"
                        let diff = Array.map2 (fun a b -> abs (a - b)) g e |> Array.fold max 0.0
                        Expect.isLessThanOrEqual diff (1e-5 * scaleOf e) (sprintf "chunk %d: %s gradient differs by %g" chunk name diff))

        torchTest "evaluation with the chunked objective gives the full evaluation's loss" (fun () ->
            let model = goldenModel "llama-cosine"
            let data = goldenData "llama-cosine"
            let plain = Evaluation.evaluate model data 4 32 TrainingLoop.PadId
            let chunked = Evaluation.evaluateWith (Objective.causalLmChunked 5) model data 4 32 TrainingLoop.PadId
            Expect.floatClose { absolute = 1e-6; relative = 1e-6 } chunked.Loss plain.Loss "eval loss"
            Expect.equal chunked.Tokens plain.Tokens "the same tokens")

        torchTest "a prefix-tuned model is refused, naming loss_chunk_size" (fun () ->
            let model = goldenModel "llama-cosine"
            let prefixed = (Peft.PrefixTuning.create 2 model 1L).Model
            let batch = Batching.collate 16 TrainingLoop.PadId (goldenData "llama-cosine") [| 0 |]
            expectInvalidInput "--loss-chunk-size" "" [ "set it to 0" ] (fun () -> (Objective.causalLmChunked 4).LossSum prefixed batch |> ignore))

        test "the builder's UseLossChunkSize(-1) is refused, naming the builder call" {
            let builder = Functional.Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out").UseLossChunkSize(-1)
            let e = Expect.throwsC (fun () -> builder.Build() |> ignore) id
            match e with
            | :? InvalidInputException as e ->
                Expect.equal (e.Origin, e.Location) ("UseLossChunkSize", "positions") "the builder call and its argument"
                Expect.stringContains e.Message ">= 0" "says what is allowed"
            | other -> failtestf "expected InvalidInputException, got %O" other
            let plan = Functional.Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out").UseLossChunkSize(512).Build()
            Expect.equal (plan.ToFineTuneOptions().LossChunkSize) 512 "the setting reaches the options"
        }

        torchTest "causalLmWith 0 is the full objective; a negative chunk size fails validation, naming --loss-chunk-size" (fun () ->
            Expect.isTrue (obj.ReferenceEquals((Objective.causalLmWith 0).LossSum, Objective.causalLm.LossSum)) "0: the full logits"
            expectInvalidInput "--loss-chunk-size" "" [ "must be >= 0"; "-3" ] (fun () -> TrainOptions.validate { TrainOptions.defaults with LossChunkSize = -3 }))
    ]

let private benchmark =
    testList "benchmark" [
        torchTest "bench memory's loss section: both paths give the same loss and gradients, and a peak on Linux" (fun () ->
            let full, chunked = Functional.Benchmarks.LossMemoryBenchmark.measure 500 8 2 32 5 "fp32"
            Expect.equal (full.Path, chunked.Path) ("full logits", "chunked 5") "the paths"
            Expect.floatClose { absolute = 1e-4; relative = 1e-5 } chunked.Loss full.Loss "the same loss"
            Expect.isLessThan chunked.GradientDifference 1e-5 "the same gradients"
            if OperatingSystem.IsLinux() then
                Expect.isSome full.PeakBytes "a peak where /proc/self/clear_refs is writable"
            Expect.equal (Functional.Benchmarks.LossMemoryBenchmark.logitsBytes 128256 4 512) 1050673152L "4 x 512 x 128256 x 4 bytes")
    ]

/// A fine-tuning job of the golden LLaMA (an untied lm_head) with chunks of 4 positions.
let private job (output: string) : FineTuneRequest =
    let golden = goldenDir "llama-cosine"
    { ModelPath = Path.Combine(golden, "model")
      DataPath = Path.Combine(golden, "data.jsonl")
      OutputPath = output
      PublishedOutputPath = None
      OverwriteOutputDir = false
      Options = { TrainOptions.defaults with PerDeviceTrainBatchSize = 2; MaxSteps = 1; MaxSeqLen = 32; LossChunkSize = 4; ReportToTensorBoard = false }
      Data = FineTune.defaultData
      ResumeFromCheckpoint = None
      Lora = None
      Prefix = None
      GradientCheckpointing = false
      ModelHandling = FineTune.defaultModelHandling
      Distributed = FineTune.defaultDistributed
      Task = TrainingTask.CausalLm
      Plot = None }

let private jobs =
    testList "jobs" [
        torchTest "a job refuses --loss-chunk-size with prefix tuning, LoRA on lm_head and another task, before writing anything" (fun () ->
            use folder = new TempFolder()
            let output = folder.File "run"
            let plain = job output
            expectInvalidInput "--loss-chunk-size" "" [ "--prefix-tuning" ] (fun () ->
                FineTune.run { plain with Prefix = Some { NumPrefixTokens = 4; AdapterPath = None } } ignore |> ignore)
            let lora targets =
                Some { Config = { R = 2; Alpha = 4.0; Dropout = 0.0; TargetModules = targets; ModuleNameSubstring = None }; OnlyOptimizeLora = false; LearningRate = None; AdapterPath = None }
            expectInvalidInput "--loss-chunk-size" "" [ "lm_head"; "--lora-target-modules" ] (fun () ->
                FineTune.run { plain with Lora = lora [ "q_proj"; "lm_head" ] } ignore |> ignore)
            let classification = TrainingTask.SequenceClassification { TextField = "text"; LabelField = "label"; NumLabels = None; PadTokenId = None }
            expectInvalidInput "--loss-chunk-size" "" [ "causal language models only" ] (fun () ->
                FineTune.run { plain with Task = classification } ignore |> ignore)
            Expect.isFalse (Directory.Exists output) "nothing is written")

        torchTest "a job with LoRA on q_proj and --loss-chunk-size trains and evaluates with the full run's losses" (fun () ->
            use folder = new TempFolder()
            let lora = Some { Config = { R = 2; Alpha = 4.0; Dropout = 0.0; TargetModules = [ "q_proj" ]; ModuleNameSubstring = None }; OnlyOptimizeLora = true; LearningRate = None; AdapterPath = None }
            let run name chunk =
                let request = job (folder.File name)
                let options = { request.Options with LossChunkSize = chunk; MaxSteps = 2; EvalSteps = 1 }
                let data = { request.Data with EvalDataPath = Some request.DataPath }
                let result = FineTune.run { request with Options = options; Lora = lora; Data = data } ignore
                result.FinalLoss, result.After |> Option.map (fun e -> e.Eval.Loss)
            let chunkedLoss, chunkedEval = run "chunked" 4
            let plainLoss, plainEval = run "plain" 0
            Expect.floatClose { absolute = 1e-5; relative = 1e-5 } chunkedLoss plainLoss "the final training loss"
            Expect.isSome plainEval "an evaluation"
            Expect.floatClose { absolute = 1e-5; relative = 1e-5 } chunkedEval.Value plainEval.Value "the final evaluation loss")
    ]

/// The small runs of the trainer: 13 rows in micro-batches of 2, windows of 3.
let private trainLosses (case: string) (options: TrainOptions) =
    let data = goldenData case
    let plan = TrainingLoop.plan options data.Rows.Length
    let logs = ResizeArray<StepLog>()
    let result = TrainingLoop.train plan (goldenModel case) data None { OnLog = logs.Add; AfterStep = fun _ -> StepDecision.Continue }
    let weights = values result.Parameters.Values
    result.Parameters.Dispose()
    result.OptimizerState.Dispose()
    [ for l in logs -> l.Loss, l.GradNorm ], weights

let private small =
    { TrainOptions.defaults with
        PerDeviceTrainBatchSize = 2
        GradientAccumulationSteps = 3
        MaxSeqLen = 32
        MaxSteps = 4
        LearningRate = 1e-3
        Shuffle = false
        SaveStrategy = IntervalStrategy.No
        ReportToTensorBoard = false }

let private training =
    testList "trainer" [
        for case, precision, tolerance in [ "llama-cosine", Precision.Fp32, 1e-5; "gpt2-cosine", Precision.Fp32, 1e-5; "llama-cosine", Precision.Bf16, 2e-2 ] do
            torchTest (sprintf "%s %A: 4 steps with LossChunkSize 5 follow the full loss's trajectory" case precision) (fun () ->
                let options = { small with Precision = precision }
                let plain, plainWeights = trainLosses case options
                let chunked, chunkedWeights = trainLosses case { options with LossChunkSize = 5 }
                Expect.equal chunked.Length 4 "4 logged steps"
                for step, ((loss, norm), (expectedLoss, expectedNorm)) in List.indexed (List.zip chunked plain) do
                    Expect.floatClose { absolute = tolerance; relative = tolerance } loss expectedLoss (sprintf "step %d: loss" (step + 1))
                    Expect.floatClose { absolute = tolerance; relative = tolerance } norm expectedNorm (sprintf "step %d: gradient norm" (step + 1))
                let diff = Array.map2 (fun a b -> abs (a - b)) chunkedWeights plainWeights |> Array.fold max 0.0
                Expect.isLessThanOrEqual diff (if precision = Precision.Fp32 then 1e-5 else 1e-2) (sprintf "final weights differ by %g" diff))
    ]

/// `functional train --loss-chunk-size`: the same metrics as without, and a negative value refused.
let private commandLine =
    let trainArgs (folder: TempFolder) (output: string) =
        [ "train"; "--model"; folder.File "model"; "--data"; folder.File "data.jsonl"; "--output"; output
          "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; "3"
          "--max-seq-len"; "32"; "--learning-rate"; "1e-3"; "--seed"; "5" ]
    let scratch () =
        let folder = new TempFolder()
        copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (folder.File "model")
        File.Copy(Path.Combine(goldenDir "llama-cosine", "data.jsonl"), folder.File "data.jsonl")
        folder
    testList "cli" [
        test "train --loss-chunk-size 5 logs the losses of a run without it" {
            use folder = scratch ()
            let losses name extra =
                let output = folder.File name
                let run = runCli (trainArgs folder output @ extra)
                Expect.equal run.ExitCode 0 (sprintf "exit code 0 (stderr: %s)" run.Stderr)
                let lines = readJsonLines (Path.Combine(output, "metrics.jsonl"))
                [ for l in lines[.. lines.Length - 2] -> l.GetProperty("loss").GetDouble(), l.GetProperty("grad_norm").GetDouble() ]
            let plain = losses "plain" []
            let chunked = losses "chunked" [ "--loss-chunk-size"; "5" ]
            Expect.equal chunked.Length 3 "3 steps"
            for (loss, norm), (expectedLoss, expectedNorm) in List.zip chunked plain do
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } loss expectedLoss "loss"
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } norm expectedNorm "gradient norm"
        }
        test "a negative --loss-chunk-size is refused, naming the option" {
            use folder = scratch ()
            let run = runCli (trainArgs folder (folder.File "out") @ [ "--loss-chunk-size"; "-1" ])
            Expect.equal run.ExitCode 2 (sprintf "exit code 2 (stderr: %s)" run.Stderr)
            Expect.stringContains run.Stderr "--loss-chunk-size" "names the option"
            Expect.stringContains run.Stderr "must be >= 0" "says what is allowed"
            Expect.isFalse (Directory.Exists(folder.File "out")) "nothing written"
        }
    ]

[<Tests>]
let tests = testList "chunked cross-entropy" [ equality; property; models; benchmark; jobs; training; commandLine ]
