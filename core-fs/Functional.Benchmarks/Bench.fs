namespace Functional.Benchmarks

open System
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Generation
open Functional.Models
open Functional.Training

/// One precision of `functional bench precision`.
[<NoComparison>]
type PrecisionRun =
    { /// "fp32" or "bf16".
      Precision: string
      /// Real tokens per second of the last logged step.
      TokensPerSecond: float
      /// The last step's loss.
      Loss: float }

/// The figures of `functional bench memory`.
[<NoComparison>]
type MemoryRun =
    { /// Parameters of the model.
      Parameters: int64
      /// A plain training step: activations kept and seconds.
      Plain: StepCost
      /// The same step with gradient checkpointing.
      Checkpointed: StepCost
      /// Parameters of LoRA adapters of the given rank on c_attn.
      AdapterParameters: int64 }

/// A model's family, depth, width and vocabulary, for the benchmark tables.
[<NoComparison>]
type BenchmarkModel =
    { Family: string
      Layers: int
      Width: int
      Vocabulary: int }

/// The figures of `functional bench generation`.
[<NoComparison>]
type GenerationRun =
    { /// One row per length.
      Rows: GenerationBenchmarkRow[]
      /// The table GenerationBenchmark.format prints.
      Table: string
      /// The model's HF config.json text (for the PyTorch reference).
      ConfigJson: string }

/// The benchmarks of the `functional bench` command for .NET callers: .NET types in (arrays, Action,
/// Nullable), records out, so the command only parses options and prints.
[<AbstractClass; Sealed>]
type Bench =

    /// A GPT-2 of the given depth and width with an 8192-token vocabulary (the configurations the
    /// performance issue compares with PyTorch).
    static member private Gpt2(layers: int, width: int) =
        CausalLm.create
            (ModelConfig.parse "bench"
                (sprintf """{"model_type": "gpt2", "vocab_size": 8192, "n_positions": 1024, "n_embd": %d, "n_layer": %d, "n_head": %d}""" width layers (width / 64)))
            1L

    /// Sets TorchSharp's intra-op threads when threads > 0 and returns the threads in force.
    static member SetThreads(threads: int) : int =
        Runtime.TorchRuntime.ensure ()
        if threads > 0 then torch.set_num_threads threads
        torch.get_num_threads ()

    /// `bench precision`: the same training of a GPT-2 (a learnable counting stream) in fp32 and in bf16
    /// (fp32 master weights); onRun hears each precision as it finishes.
    static member Precision
        (layers: int, width: int, batch: int, sequenceLength: int, steps: int, learningRate: float, warmupSteps: int, onRun: Action<PrecisionRun>)
        : PrecisionRun[] =
        Runtime.TorchRuntime.ensure ()
        // A learnable stream: each row counts up from a random start, modulo the vocabulary.
        let random = Random 7
        let rows =
            Array.init (batch * steps) (fun _ ->
                let start = random.Next 8192
                Array.init sequenceLength (fun i -> int64 ((start + i) % 8192)))
        let data = TokenizedDataset.ofRows "bench" rows
        [| for name, precision in [ "fp32", Precision.Fp32; "bf16", Precision.Bf16 ] ->
            let lm = Bench.Gpt2(layers, width)
            let options =
                { TrainOptions.defaults with
                    PerDeviceTrainBatchSize = batch
                    GradientAccumulationSteps = 1
                    LearningRate = learningRate
                    LrSchedulerType = (if warmupSteps > 0 then SchedulerKind.ConstantWithWarmup else SchedulerKind.Constant)
                    NumWarmupSteps = warmupSteps
                    WarmupRatio = 0.0
                    MaxSteps = steps
                    MaxSeqLen = sequenceLength
                    Shuffle = false
                    LoggingSteps = 1
                    Threads = torch.get_num_threads ()
                    SaveStrategy = IntervalStrategy.No
                    Precision = precision
                    ReportToTensorBoard = false }
            let plan = TrainingLoop.plan options rows.Length
            let mutable last = None
            let hooks = { OnLog = (fun log -> last <- Some log); AfterStep = fun _ -> StepDecision.Continue }
            (TrainingLoop.train plan lm data None hooks).Parameters.Dispose()
            let log = last.Value
            let run = { Precision = name; TokensPerSecond = log.TokensPerSecond; Loss = log.Loss }
            if not (isNull onRun) then onRun.Invoke run
            run |]

    /// `bench memory`: activation memory and step time of a GPT-2 with and without gradient
    /// checkpointing, and the parameters of LoRA adapters of rank loraDim on c_attn.
    static member Memory(layers: int, width: int, batch: int, sequenceLength: int, loraDim: int) : MemoryRun =
        Runtime.TorchRuntime.ensure ()
        let lm = Bench.Gpt2(layers, width)
        let parameters = CausalLm.parameterSpec lm |> List.sumBy (fun (_, shape) -> Array.fold (*) 1L shape)
        let plain, checkpointed =
            use ids = torch.randint(8192L, [| int64 batch; int64 sequenceLength |], dtype = torch.int64)
            ActivationCheckpointing.measure lm.Module ids
        use adapters =
            Peft.Lora.wrap { R = loraDim; Alpha = 16.0; Dropout = 0.0; TargetModules = [ "c_attn" ]; ModuleNameSubstring = None } lm 1L
        let adapterParameters = Peft.Lora.parameters adapters |> List.sumBy (fun (_, p) -> p.numel ())
        { Parameters = parameters; Plain = plain; Checkpointed = checkpointed; AdapterParameters = adapterParameters }

    /// `bench memory`'s vocabulary section: the peak memory of the causal-LM loss and its backward over
    /// final hidden states (batch, sequenceLength, width) and a head of vocabulary rows, with the full
    /// logits and with chunked cross-entropy (chunks of chunkSize positions), in each of the precisions
    /// ("fp32", "bf16"; LossMemoryBenchmark.measure): the full row, then the chunked row, per precision.
    static member LossMemory(vocabulary: int, width: int, batch: int, sequenceLength: int, chunkSize: int, precisions: string[]) : LossMemoryRow[] =
        [| for precision in precisions do
               let full, chunked = LossMemoryBenchmark.measure vocabulary width batch sequenceLength chunkSize precision
               yield full
               yield chunked |]

    /// The bytes of the fp32 logits the full path materializes (LossMemoryBenchmark.logitsBytes).
    static member LogitsBytes(vocabulary: int, batch: int, sequenceLength: int) : int64 =
        LossMemoryBenchmark.logitsBytes vocabulary batch sequenceLength

    /// A loss row's peak resident growth, or null where the system does not tell.
    static member LossPeakBytes(row: LossMemoryRow) : Nullable<int64> = Option.toNullable row.PeakBytes

    /// The `bench train` configurations: the preset of that name (or all of them for "all"), with the depth,
    /// width, rows per step and tokens per row given (> 0) instead of the preset's.
    static member TrainConfigs(name: string, layers: int, width: int, batch: int, sequenceLength: int) : BenchmarkConfig[] =
        let configs = if name = "all" then TrainingBenchmark.presets else [ TrainingBenchmark.preset name ]
        let resized (c: BenchmarkConfig) =
            if layers <= 0 && width <= 0 && batch <= 0 && sequenceLength <= 0 then c
            else
                let shape = ModelFamily.traits c.Model
                let orElse given fallback = if given > 0 then given else fallback
                TrainingBenchmark.resize (orElse layers shape.Depth) (orElse width shape.Width) (orElse batch c.BatchSize) (orElse sequenceLength c.SequenceLength) c
        configs |> List.map resized |> Array.ofList

    /// The family, depth, width and vocabulary of a benchmark's model.
    static member Describe(config: BenchmarkConfig) : BenchmarkModel =
        let shape = ModelFamily.traits config.Model
        { Family = shape.DisplayName; Layers = shape.Depth; Width = shape.Width; Vocabulary = shape.VocabSize }

    /// The model's HF config.json text (for the PyTorch reference and the figures file).
    static member ConfigJson(config: BenchmarkConfig) : string = ModelConfig.toJson config.Model

    /// `bench train` of one configuration (TrainingBenchmark.run) at a constant learning rate of 1e-3;
    /// onLine hears the progress lines.
    static member Train(config: BenchmarkConfig, precisions: string[], steps: int, warmupSteps: int, threads: int, onLine: Action<string>)
        : TrainingBenchmarkResult =
        let settings = { Steps = steps; WarmupSteps = warmupSteps; Threads = threads; LearningRate = 1e-3 }
        TrainingBenchmark.run config (List.ofArray precisions) settings (fun line -> if not (isNull onLine) then onLine.Invoke line)

    /// `bench train --packing-compare` of one configuration (TrainingBenchmark.packingComparison) at a
    /// constant learning rate of 1e-3; onLine hears the progress lines.
    static member PackingComparison(config: BenchmarkConfig, precision: string, steps: int, warmupSteps: int, threads: int, onLine: Action<string>)
        : PackingComparison =
        let settings = { Steps = steps; WarmupSteps = warmupSteps; Threads = threads; LearningRate = 1e-3 }
        TrainingBenchmark.packingComparison config precision settings (fun line -> if not (isNull onLine) then onLine.Invoke line)

    /// The table of a packing comparison (TrainingBenchmark.formatPackingComparison).
    static member FormatPackingComparison(comparison: PackingComparison) : string = TrainingBenchmark.formatPackingComparison comparison

    /// The peak resident bytes of a loop, or null where the system does not tell.
    static member PeakBytes(figures: LoopFigures) : Nullable<int64> = Option.toNullable figures.PeakResidentBytes

    /// `bench generation`: seconds per generated token with and without the key/value cache, on the model
    /// folder, or (modelPath null) a random model the size of the embedded default's.
    static member Generation(modelPath: string, lengths: int[]) : GenerationRun =
        Runtime.TorchRuntime.ensure ()
        let lm =
            if isNull modelPath then CausalLm.create (EmbeddedRun.modelConfig 512) 1L
            else HfModelFolder.load modelPath 1L
        let rows = GenerationBenchmark.run lm (List.ofArray lengths)
        { Rows = Array.ofList rows; Table = GenerationBenchmark.format rows; ConfigJson = ModelConfig.toJson lm.Config }

    /// Whether a launcher (mpirun, torchrun) started this process: its environment names a world size
    /// (Communicator.parseEnvironment), even a size of 1.
    static member LaunchedByLauncher() : bool =
        (Distributed.Communicator.parseEnvironment Environment.GetEnvironmentVariable).SizeVariable.IsSome

    /// Whether this process is rank 0 of the launch (or runs alone): the one that prints.
    static member IsMainProcess() : bool = (Distributed.Communicator.fromEnvironment ()).Rank = 0

    /// `bench distributed` on the processes of this launch (Communicator.fromEnvironment): each ZeRO stage
    /// of stages in turn (DistributedBenchmark.measure), threads intra-op threads per process, a constant
    /// learning rate of 1e-3; onLine hears the progress lines on rank 0.
    static member Distributed(config: BenchmarkConfig, stages: int[], steps: int, warmupSteps: int, threads: int, onLine: Action<string>)
        : DistributedRun =
        let communicator = Distributed.Communicator.fromEnvironment ()
        let settings = { Steps = steps; WarmupSteps = warmupSteps; Threads = threads; LearningRate = 1e-3 }
        let progress line = if communicator.Rank = 0 && not (isNull onLine) then onLine.Invoke line
        DistributedBenchmark.measure communicator config settings (List.ofArray stages) progress

    /// `bench distributed`'s reference: stage 0 in this process alone with threads intra-op threads.
    static member SingleProcess(config: BenchmarkConfig, steps: int, warmupSteps: int, threads: int, onLine: Action<string>) : DistributedRun =
        let settings = { Steps = steps; WarmupSteps = warmupSteps; Threads = threads; LearningRate = 1e-3 }
        DistributedBenchmark.measure Distributed.Communicator.singleProcess config settings [ 0 ] (fun line -> if not (isNull onLine) then onLine.Invoke line)

    /// The table of `bench distributed` (DistributedBenchmark.format) for runs of steps timed steps after
    /// warmupSteps.
    static member FormatDistributed(config: BenchmarkConfig, steps: int, warmupSteps: int, runs: DistributedRun[]) : string =
        let threads = if runs.Length > 0 then runs[0].ThreadsPerProcess else 1
        DistributedBenchmark.format config { Steps = steps; WarmupSteps = warmupSteps; Threads = threads; LearningRate = 1e-3 } (List.ofArray runs)

    /// `bench parallel` on the processes of this launch: data, tensor and pipeline parallelism (layouts:
    /// "dp", "tp", "pp") of the benchmark LLaMA (ModelParallelBenchmark.config) over them in turn, the same
    /// global batch each; returns the table (ModelParallelBenchmark.format), which rank 0 prints. onLine
    /// hears the progress lines on rank 0.
    static member Parallel
        (layers: int, width: int, vocabulary: int, globalRows: int, microBatch: int, sequenceLength: int, warmupSteps: int, steps: int, layouts: string[], onLine: Action<string>)
        : string =
        let world =
            match Distributed.Communicator.fromEnvironment () with
            | :? Distributed.ISplittableCommunicator as s when s.Size > 1 -> s
            | other -> InvalidInput.setting "processes" (sprintf "bench parallel needs at least 2 processes of a launcher that can be split, found %d" other.Size)
        let config = ModelParallelBenchmark.config layers width vocabulary
        let parsed =
            [ for l in layouts ->
                  match l.Trim().ToLowerInvariant() with
                  | "dp" -> ParallelLayout.Data
                  | "tp" -> ParallelLayout.Tensor
                  | "pp" -> ParallelLayout.Pipeline
                  | other -> InvalidInput.setting "layouts" (sprintf "expected dp, tp or pp separated by commas, found '%s'" other) ]
        let figures =
            [ for layout in parsed ->
                  if world.Rank = 0 && not (isNull onLine) then onLine.Invoke(sprintf "%s: %d + %d + 1 steps" (layout.Label world.Size) warmupSteps steps)
                  let f = ModelParallelBenchmark.measure world config layout globalRows microBatch sequenceLength warmupSteps steps
                  GC.Collect()
                  GC.WaitForPendingFinalizers()
                  f ]
        ModelParallelBenchmark.format config world.Size globalRows microBatch sequenceLength warmupSteps steps figures

    /// A run as JSON (DistributedBenchmark.toJson).
    static member DistributedJson(run: DistributedRun) : string = DistributedBenchmark.toJson run

    /// A run from DistributedJson's text.
    static member ReadDistributed(json: string) : DistributedRun = DistributedBenchmark.ofJson json
