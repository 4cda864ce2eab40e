namespace Functional.Benchmarks

open System
open System.Diagnostics
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open Functional
open Functional.Data
open Functional.Models
open Functional.Training

/// A model and batch shape that `functional bench train` measures.
[<NoComparison>]
type BenchmarkConfig =
    { /// The name the command line and the tables use ("gpt2-small", "gpt2-base", "llama").
      Name: string
      /// The architecture (no dropout, so that runs are deterministic and match the PyTorch reference).
      Model: ModelConfig
      /// Rows per optimizer step (one micro-batch, no accumulation).
      BatchSize: int
      /// Tokens per row.
      SequenceLength: int }

/// How a benchmark trains.
[<NoComparison>]
type BenchmarkSettings =
    { /// Optimizer steps timed.
      Steps: int
      /// Optimizer steps run before timing starts (excluded from every figure but the losses).
      WarmupSteps: int
      /// Intra-op threads (torch.set_num_threads).
      Threads: int
      /// The constant AdamW learning rate.
      LearningRate: float }

/// Mean seconds per timed step, split by phase (see TrainingPhase).
[<NoComparison>]
type StepSplit =
    { /// Forward and loss.
      Forward: float
      /// Backward (and moving bf16 gradients to the fp32 master).
      Backward: float
      /// Clipping, the optimizer update, refreshing a bf16 compute copy, zeroing the gradients.
      Optimizer: float
      /// Everything else.
      Other: float }

    /// The whole step.
    member this.Total = this.Forward + this.Backward + this.Optimizer + this.Other

/// What one training loop measured.
[<NoComparison>]
type LoopFigures =
    { /// Input tokens (batch x sequence length) per second over the timed steps.
      TokensPerSecond: float
      /// Mean seconds per timed step, by phase.
      Split: StepSplit
      /// The process's resident high-water mark (VmHWM) during the timed steps; None where
      /// /proc/self/clear_refs cannot reset it.
      PeakResidentBytes: int64 option
      /// The loss of every step, warm-up steps first.
      Losses: float list }

/// What training is expected to hold in memory (bytes).
[<NoComparison>]
type MemoryEstimate =
    { /// fp32 weights (4 bytes per parameter), plus the 2-byte bf16 compute copy under bf16.
      Weights: int64
      /// Gradients, sized as the weights.
      Gradients: int64
      /// AdamW's two fp32 moments (8 bytes per parameter).
      OptimizerState: int64
      /// The activations of a step: the resident high-water mark over one forward and backward of the
      /// plain loop above what was resident before it (glibc's freed heap returned to the system first),
      /// so the tensors kept for backward, the logits and the gradients flowing back through them, which
      /// backward holds while it frees the activations (the parameters' gradients already exist then).
      Activations: int64 }

    /// The sum of the four.
    member this.Total = this.Weights + this.Gradients + this.OptimizerState + this.Activations

/// One precision of a training benchmark.
[<NoComparison>]
type PrecisionFigures =
    { /// "fp32" or "bf16" (bf16 compute copy, fp32 master weights and optimizer).
      Precision: string
      /// Our Trainer (TrainingLoop.train with AdamW, clipping 1.0, constant learning rate).
      Trainer: LoopFigures
      /// The plain hand-written TorchSharp loop on the same model and data.
      PlainLoop: LoopFigures
      /// Model FLOPs per second of the trainer (FlopsPerToken x tokens/s).
      ModelFlopsPerSecond: float
      /// The trainer's model FLOPs utilization against the fp32 matmul peak measured in the same process.
      MfuFp32Peak: float
      /// The same against the bf16 matmul peak.
      MfuBf16Peak: float
      /// The memory the trainer is expected to need.
      Memory: MemoryEstimate
      /// Resident memory of the process before the model was built (runtime, libraries, data).
      BaselineResidentBytes: int64 }

/// A training benchmark of one configuration.
[<NoComparison>]
type TrainingBenchmarkResult =
    { /// The configuration measured.
      Config: BenchmarkConfig
      /// The settings it ran with.
      Settings: BenchmarkSettings
      /// All parameters of the model.
      Parameters: int64
      /// N of the FLOPs formula: the parameters that take part in matmuls (see TrainingBenchmark.matmulParameters).
      MatmulParameters: int64
      /// Model FLOPs of one trained token: 6 N + 12 L T d.
      FlopsPerToken: float
      /// The fp32 matmul peak (FLOP/s) measured in this process.
      PeakFp32: float
      /// The bf16 matmul peak (FLOP/s) measured in this process.
      PeakBf16: float
      /// One entry per precision measured, in the order asked.
      Precisions: PrecisionFigures list }

/// One way of batching variable-length samples in `bench train --packing-compare`.
[<NoComparison>]
type PackingRun =
    { /// "padded" (one sample per row, right-padded to the longest of its micro-batch) or "packed"
      /// (isolated packing: whole samples packed into rows of up to the sequence length).
      Mode: string
      /// Rows of the epoch.
      Rows: int
      /// Optimizer steps of the epoch (one micro-batch each).
      Steps: int
      /// Steps timed (after the warm-up).
      TimedSteps: int
      /// Real (non-padding) tokens of the timed steps.
      RealTokens: int64
      /// Input tokens of the timed steps, padding included (rows x longest row of each micro-batch).
      InputTokens: int64
      /// Seconds of the timed steps.
      Seconds: float
      /// Seconds of the whole epoch (every sample trained on once), warm-up steps included.
      EpochSeconds: float
      /// The token-weighted loss of the first step.
      FirstLoss: float }

    /// Real tokens per second over the timed steps.
    member this.RealTokensPerSecond = float this.RealTokens / max this.Seconds 1e-9

    /// The share of the input tokens that are padding.
    member this.PaddingShare = 1.0 - float this.RealTokens / float (max 1L this.InputTokens)

/// `bench train --packing-compare`: the same variable-length samples trained on padded and packed.
[<NoComparison>]
type PackingComparison =
    { /// The configuration (its batch size and sequence length: rows per step and the packed rows' length).
      Config: BenchmarkConfig
      /// "fp32" or "bf16".
      Precision: string
      /// The samples of the epoch.
      Samples: int
      /// The shortest sample's tokens.
      MinLength: int
      /// The longest sample's tokens (the sequence length).
      MaxLength: int
      /// One sample per row, right-padded.
      Padded: PackingRun
      /// Rows packed in isolation.
      Packed: PackingRun }

/// `functional bench train`: our trainer's throughput, step split, MFU and memory against a plain
/// TorchSharp loop (and, from the CLI, PyTorch: tools/reference/bench_torch.py).
[<RequireQualifiedAccess>]
module TrainingBenchmark =

    /// The vocabulary of every preset.
    [<Literal>]
    let Vocabulary = 8192

    let private gpt2Model name layers width heads =
        ModelConfig.parse name
            (sprintf """{"model_type": "gpt2", "vocab_size": %d, "n_positions": 1024, "n_embd": %d, "n_layer": %d, "n_head": %d, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}"""
                Vocabulary width layers heads)

    let private llamaModel name layers width heads intermediate =
        ModelConfig.parse name
            (sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": %d, "intermediate_size": %d, "num_hidden_layers": %d, "num_attention_heads": %d, "max_position_embeddings": 1024}"""
                Vocabulary width intermediate layers heads)

    let private gpt2 name layers width heads batch length =
        { Name = name; Model = gpt2Model name layers width heads; BatchSize = batch; SequenceLength = length }

    let private llamaConfig name layers width heads intermediate batch length =
        { Name = name; Model = llamaModel name layers width heads intermediate; BatchSize = batch; SequenceLength = length }

    /// GPT-2, 6 layers, width 384, 6 heads; batch 8 x 128 tokens.
    let gpt2Small = gpt2 "gpt2-small" 6 384 6 8 128

    /// GPT-2, 12 layers, width 768, 12 heads; batch 4 x 256 tokens.
    let gpt2Base = gpt2 "gpt2-base" 12 768 12 4 256

    /// LLaMA, 12 layers, width 768, 12 heads, intermediate 2048; batch 4 x 256 tokens.
    let llama = llamaConfig "llama" 12 768 12 2048 4 256

    /// The presets, in the order `--config all` runs them.
    let presets = [ gpt2Small; gpt2Base; llama ]

    /// The preset of that name; raises InvalidInputException naming --config otherwise.
    let preset (name: string) : BenchmarkConfig =
        match presets |> List.tryFind (fun c -> c.Name = name) with
        | Some config -> config
        | None ->
            InvalidInput.setting "config"
                (sprintf "expected one of %s or all, found '%s'" (presets |> List.map (fun c -> c.Name) |> String.concat ", ") name)

    /// The configuration with another depth, width and batch shape (heads: width / 64, at least 1; the rest as
    /// ModelFamily.resize); for quick and test runs.
    let resize (layers: int) (width: int) (batchSize: int) (sequenceLength: int) (config: BenchmarkConfig) : BenchmarkConfig =
        let heads = max 1 (width / 64)
        let resized = ModelFamily.resize layers width heads config.Model
        // Written and parsed again, so a width the heads do not divide is refused as in a config.json.
        { config with
            Model = ModelConfig.parse config.Name (ModelConfig.toJson resized)
            BatchSize = batchSize
            SequenceLength = sequenceLength }

    /// Token `position` of synthetic row `row`: (row * 7919 + position * 31) % vocabulary. The same
    /// formula as tools/reference/bench_torch.py, so both sides train on the same data.
    let syntheticToken (vocabulary: int) (row: int) (position: int) : int64 =
        (int64 row * 7919L + int64 position * 31L) % int64 vocabulary

    /// Rows firstRow .. firstRow + rows - 1 of the synthetic data, each `length` tokens.
    let syntheticRows (vocabulary: int) (firstRow: int) (rows: int) (length: int) : int64[][] =
        Array.init rows (fun r -> Array.init length (syntheticToken vocabulary (firstRow + r)))

    /// A training set of count synthetic rows of length tokens (syntheticRows from the first row), as a dataset.
    let syntheticDataset (vocabulary: int) (count: int) (length: int) : TokenizedDataset =
        TokenizedDataset.ofRows "synthetic" (syntheticRows vocabulary 0 count length)

    /// count synthetic samples whose lengths are drawn uniformly from [minLength, maxLength] by a
    /// generator seeded with seed; sample r's tokens are syntheticToken's for row r.
    let variableLengthDataset (vocabulary: int) (count: int) (minLength: int) (maxLength: int) (seed: int) : TokenizedDataset =
        let random = Random seed
        Array.init count (fun r -> Array.init (random.Next(minLength, maxLength + 1)) (syntheticToken vocabulary r))
        |> TokenizedDataset.ofRows "synthetic variable-length"

    let private lookupOnly (lm: CausalLm) (name: string) =
        (ModelFamily.traits lm.Config).LookupOnly |> List.contains name

    /// N of the FLOPs formula: every parameter that takes part in a matmul, i.e. all parameters but the
    /// lookup-only embeddings (GPT-2: all but wpe, the tied wte counted once as the head; LLaMA: all but
    /// embed_tokens, lm_head counted). Norm weights and biases are counted too (negligible).
    let matmulParameters (lm: CausalLm) : int64 =
        CausalLm.parameterSpec lm
        |> List.filter (fun (name, _) -> not (lookupOnly lm name))
        |> List.sumBy (fun (_, shape) -> Array.fold (*) 1L shape)

    let private depthAndWidth (config: ModelConfig) =
        let traits = ModelFamily.traits config
        traits.Depth, traits.Width

    /// Model FLOPs of one trained token (forward and backward) at sequence length T: 6 N + 12 L T d
    /// (PaLM, appendix B: 6 N for the matmuls with weights, 12 L T d for attention's scores and
    /// weighted values over the full T x T square), with N = matmulParameters.
    let flopsPerToken (lm: CausalLm) (sequenceLength: int) : float =
        let layers, width = depthAndWidth lm.Config
        6.0 * float (matmulParameters lm) + 12.0 * float layers * float sequenceLength * float width

    /// The best FLOP/s of several 1024 x 1024 x 1024 matmuls (2 * 1024^3 FLOPs each) in dtype.
    let matmulPeak (dtype: torch.ScalarType) : float =
        Runtime.TorchRuntime.ensure ()
        use _ = torch.NewDisposeScope()
        use generator = new torch.Generator(3UL)
        let a = torch.randn([| 1024L; 1024L |], generator = generator).to_type dtype
        let b = torch.randn([| 1024L; 1024L |], generator = generator).to_type dtype
        torch.mm(a, b).Dispose()
        let mutable best = Double.MaxValue
        for _ in 1..10 do
            let clock = Stopwatch.StartNew()
            use product = torch.mm(a, b)
            best <- min best clock.Elapsed.TotalSeconds
        2.0 * 1024.0 ** 3.0 / best

    [<DllImport("libc", EntryPoint = "malloc_trim")>]
    extern int private mallocTrim(unativeint pad)

    /// Resident bytes after a full GC with glibc's freed heap returned to the system.
    let residentBytes () =
        GC.Collect()
        GC.WaitForPendingFinalizers()
        try
            mallocTrim 0un |> ignore
        with
        | :? DllNotFoundException
        | :? EntryPointNotFoundException -> ()
        use p = Process.GetCurrentProcess()
        p.WorkingSet64

    /// Resets the resident high-water mark (writing 5 to /proc/self/clear_refs); false where refused.
    let resetPeak () =
        try
            File.WriteAllText("/proc/self/clear_refs", "5")
            true
        with
        | :? IOException
        | :? UnauthorizedAccessException -> false

    /// VmHWM of /proc/self/status in bytes.
    let peakResident () =
        File.ReadAllLines "/proc/self/status"
        |> Array.tryFind (fun line -> line.StartsWith "VmHWM:")
        |> Option.map (fun line -> 1024L * int64 (line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]))

    /// Synthetic rows firstRow .. firstRow + batch - 1 as a (batch, length) int64 tensor.
    let private batchTensor (vocabulary: int) (firstRow: int) (batch: int) (length: int) =
        let ids = Array.concat (syntheticRows vocabulary firstRow batch length)
        torch.tensor(ids, ReadOnlySpan<int64>([| int64 batch; int64 length |]))

    let private split (clock: PhaseClock) (steps: int) =
        let perStep phase = clock.Seconds phase / float steps
        { Forward = perStep TrainingPhase.Forward
          Backward = perStep TrainingPhase.Backward
          Optimizer = perStep TrainingPhase.Optimizer
          Other = perStep TrainingPhase.Other }

    let private precisionOf (name: string) =
        match name with
        | "fp32" -> Precision.Fp32
        | "bf16" -> Precision.Bf16
        | other -> InvalidInput.setting "precision" (sprintf "expected fp32, bf16 or both, found '%s'" other)

    let private checkSettings (settings: BenchmarkSettings) =
        if settings.Steps < 1 then InvalidInput.setting "steps" (sprintf "expected at least 1 timed step, found %d" settings.Steps)
        if settings.WarmupSteps < 0 then InvalidInput.setting "warmup" (sprintf "expected 0 or more warm-up steps, found %d" settings.WarmupSteps)
        if settings.Threads < 1 then InvalidInput.setting "threads" (sprintf "expected at least 1 thread, found %d" settings.Threads)

    /// The options the training benchmarks train with: AdamW with clipping 1.0 (the defaults), a constant
    /// learning rate, rows in order, no checkpoints, steps micro-batches of batch rows of sequenceLength.
    let benchmarkOptions (batch: int) (sequenceLength: int) (learningRate: float) (steps: int) threads : TrainOptions =
        { TrainOptions.defaults with
            PerDeviceTrainBatchSize = batch
            LearningRate = learningRate
            LrSchedulerType = SchedulerKind.Constant
            MaxSteps = steps
            MaxSeqLen = sequenceLength
            Shuffle = false
            Threads = threads
            SaveStrategy = IntervalStrategy.No }

    /// Trains a fresh model of the configuration (seed 1) with our Trainer (TrainingLoop.plan and TrainingLoop.train:
    /// AdamW, clipping 1.0, constant learning rate, no weight decay, rows in order, one micro-batch per
    /// step) in "fp32" or "bf16", on the synthetic rows, timing the steps after the warm-up.
    let runTrainer (config: BenchmarkConfig) (precision: string) (settings: BenchmarkSettings) : LoopFigures =
        checkSettings settings
        Runtime.TorchRuntime.ensure ()
        torch.set_num_threads settings.Threads
        let total = settings.WarmupSteps + settings.Steps
        let data = syntheticDataset (ModelConfig.vocabSize config.Model) (config.BatchSize * total) config.SequenceLength
        let options =
            { benchmarkOptions config.BatchSize config.SequenceLength settings.LearningRate total settings.Threads with
                Precision = precisionOf precision }
        let clock = PhaseClock()
        let plan = { TrainingLoop.plan options data.Rows.Length with PhaseClock = Some clock }
        let lm = CausalLm.create config.Model 1L
        use _ = lm.Module
        let losses = ResizeArray()
        let mutable peakReset = false
        let mutable figures = None
        let startTiming () =
            peakReset <- resetPeak ()
            clock.Reset()
        if settings.WarmupSteps = 0 then startTiming ()
        let afterStep (context: StepContext) =
            losses.Add context.Log.Loss
            if context.Log.Step = settings.WarmupSteps then startTiming ()
            if context.Log.Step = total then
                clock.Mark TrainingPhase.Other
                let split = split clock settings.Steps
                figures <-
                    Some
                        { TokensPerSecond = float (config.BatchSize * config.SequenceLength) / split.Total
                          Split = split
                          PeakResidentBytes = if peakReset then peakResident () else None
                          Losses = [] }
            StepDecision.Continue
        let result = TrainingLoop.train plan lm data None { OnLog = ignore; AfterStep = afterStep }
        result.Parameters.Dispose()
        match figures with
        | Some f -> { f with Losses = List.ofSeq losses }
        | None -> invalidOp "the trainer ended before its last step"

    /// Trains a fresh model of the configuration (seed 1) with a plain hand-written TorchSharp loop:
    /// forward, mean cross entropy of the shifted tokens, backward, torch.nn.utils.clip_grad_norm_ (1.0),
    /// TorchSharp's torch.optim.AdamW step (betas 0.9/0.999, eps 1e-8, no weight decay), zero_grad. In
    /// bf16 the forward and backward run on a bf16 copy of the model whose gradients are copied to the fp32
    /// master before clipping, and which is refreshed from the master after the step. Returns the figures
    /// and the activation bytes of one extra, untimed step (MemoryEstimate.Activations).
    let runPlainLoop (config: BenchmarkConfig) (precision: string) (settings: BenchmarkSettings) : LoopFigures * int64 =
        checkSettings settings
        Runtime.TorchRuntime.ensure ()
        torch.set_num_threads settings.Threads
        let vocabulary = ModelConfig.vocabSize config.Model
        let total = settings.WarmupSteps + settings.Steps
        let master = CausalLm.create config.Model 1L
        use _ = master.Module
        let low = precisionOf precision = Precision.Bf16
        let compute =
            if low then
                let copy = CausalLm.create config.Model 1L
                copy.Module.``to`` torch.bfloat16 |> ignore
                copy
            else master
        use _ = if low then compute.Module :> IDisposable else { new IDisposable with member _.Dispose() = () }
        let masterParameters = master.Module.parameters () |> Array.ofSeq
        let computeParameters = compute.Module.parameters () |> Array.ofSeq
        master.Module.train ()
        compute.Module.train ()
        use optimizer = torch.optim.AdamW(masterParameters, settings.LearningRate, 0.9, 0.999, 1e-8, 0.0)
        let clock = PhaseClock()
        let losses = ResizeArray()
        let mutable peakReset = false
        let step (index: int) =
            use _ = torch.NewDisposeScope()
            use ids = batchTensor vocabulary (index * config.BatchSize) config.BatchSize config.SequenceLength
            clock.Mark TrainingPhase.Other
            let shifted = int64 config.SequenceLength - 1L
            let logits = compute.Module.forward ids // (B, T, V)
            let predictions = logits.narrow(1L, 0L, shifted).reshape(-1L, int64 vocabulary).to_type torch.float32
            let loss = torch.nn.functional.cross_entropy(predictions, ids.narrow(1L, 1L, shifted).reshape(-1L))
            clock.Mark TrainingPhase.Forward
            loss.backward ()
            if low then
                use _ = torch.no_grad ()
                for m, c in Array.zip masterParameters computeParameters do
                    let g = c.grad
                    if isNull m.grad then m.grad <- g.to_type(torch.float32).DetachFromDisposeScope()
                    else m.grad.copy_ g |> ignore
                    g.zero_ () |> ignore
            clock.Mark TrainingPhase.Backward
            torch.nn.utils.clip_grad_norm_(masterParameters, 1.0) |> ignore
            optimizer.step () |> ignore
            optimizer.zero_grad ()
            if low then
                use _ = torch.no_grad ()
                for m, c in Array.zip masterParameters computeParameters do
                    c.copy_ m |> ignore
            clock.Mark TrainingPhase.Optimizer
            losses.Add(loss.item<float32> () |> float)
        for index in 0 .. total - 1 do
            if index = settings.WarmupSteps then
                peakReset <- resetPeak ()
                clock.Reset()
            step index
        clock.Mark TrainingPhase.Other
        let split = split clock settings.Steps
        let figures =
            { TokensPerSecond = float (config.BatchSize * config.SequenceLength) / split.Total
              Split = split
              PeakResidentBytes = if peakReset then peakResident () else None
              Losses = List.ofSeq losses }
        let activations =
            use _ = torch.NewDisposeScope()
            use ids = batchTensor vocabulary 0 config.BatchSize config.SequenceLength
            let before = residentBytes ()
            let reset = resetPeak ()
            let logits = compute.Module.forward ids
            let loss = torch.nn.functional.cross_entropy(logits.reshape(-1L, int64 vocabulary).to_type torch.float32, ids.reshape(-1L))
            let afterForward = residentBytes ()
            loss.backward ()
            let after = if reset then peakResident () |> Option.defaultValue afterForward else afterForward
            optimizer.zero_grad ()
            for c in computeParameters do
                if not (isNull c.grad) then c.grad.zero_ () |> ignore
            max 0L (after - before)
        figures, activations

    /// The memory the trainer is expected to need for a model of `parameters` parameters in "fp32" or
    /// "bf16", given the activations measured: weights and gradients 4 bytes each per parameter (6 with
    /// the bf16 compute copy), AdamW's two fp32 moments 8 bytes.
    let memoryEstimate (parameters: int64) (precision: string) (activations: int64) : MemoryEstimate =
        let perParameter = if precisionOf precision = Precision.Bf16 then 6L else 4L
        { Weights = perParameter * parameters
          Gradients = perParameter * parameters
          OptimizerState = 8L * parameters
          Activations = activations }

    /// How many times each loop runs per configuration and precision, alternating ours and the plain
    /// loop; each reports its faster run. Whichever loop ran first in a process was up to 25% slower
    /// through all its steps on gpt2-small, whatever the warm-up steps, so one round would favour the
    /// plain loop, which runs second.
    [<Literal>]
    let Rounds = 2

    /// Runs the benchmark of one configuration: the matmul peaks, then for each precision ("fp32",
    /// "bf16") Rounds rounds of our trainer and the plain loop, keeping each loop's faster round and
    /// the first round's memory figures (our peak, the resident memory just before it, the plain loop's
    /// activations); progress (one line per loop) goes to `progress`.
    let run (config: BenchmarkConfig) (precisions: string list) (settings: BenchmarkSettings) (progress: string -> unit) : TrainingBenchmarkResult =
        checkSettings settings
        Runtime.TorchRuntime.ensure ()
        torch.set_num_threads settings.Threads
        precisions |> List.iter (precisionOf >> ignore)
        let peakFp32 = matmulPeak torch.float32
        let peakBf16 = matmulPeak torch.bfloat16
        let parameters, matmul, perToken =
            let lm = CausalLm.create config.Model 1L
            use _ = lm.Module
            CausalLm.parameterSpec lm |> List.sumBy (fun (_, shape) -> Array.fold (*) 1L shape),
            matmulParameters lm,
            flopsPerToken lm config.SequenceLength
        let faster (a: LoopFigures) (b: LoopFigures) = if b.TokensPerSecond > a.TokensPerSecond then b else a
        let measure precision =
            let round k =
                let baseline = residentBytes ()
                progress (sprintf "%s %s, round %d of %d: trainer, %d + %d steps" config.Name precision k Rounds settings.WarmupSteps settings.Steps)
                let trainer = runTrainer config precision settings
                progress (sprintf "%s %s, round %d of %d: plain loop, %d + %d steps" config.Name precision k Rounds settings.WarmupSteps settings.Steps)
                let plain, activations = runPlainLoop config precision settings
                baseline, trainer, plain, activations
            let rounds = List.init Rounds (fun k -> round (k + 1))
            // Speed: each loop's faster round. Memory: the first round, where our trainer runs first in
            // the process, as a training run does; later rounds start from a heap the plain loop left
            // fragmented (up to 20% more growth measured on gpt2-small).
            let trainer = rounds |> List.map (fun (_, t, _, _) -> t) |> List.reduce faster
            let plain = rounds |> List.map (fun (_, _, p, _) -> p) |> List.reduce faster
            let baseline, first, _, activations = List.head rounds
            let trainer = { trainer with PeakResidentBytes = first.PeakResidentBytes }
            let flops = perToken * trainer.TokensPerSecond
            { Precision = precision
              Trainer = trainer
              PlainLoop = plain
              ModelFlopsPerSecond = flops
              MfuFp32Peak = flops / peakFp32
              MfuBf16Peak = flops / peakBf16
              Memory = memoryEstimate parameters precision activations
              BaselineResidentBytes = baseline }
        { Config = config
          Settings = settings
          Parameters = parameters
          MatmulParameters = matmul
          FlopsPerToken = perToken
          PeakFp32 = peakFp32
          PeakBf16 = peakBf16
          Precisions = List.map measure precisions }

    /// One epoch of our Trainer over data (rows in order, batch rows per step, one micro-batch per step)
    /// on a fresh model of the configuration (seed 1), timing the steps after the warm-up (at most all
    /// but the last).
    let private packingRun (config: BenchmarkConfig) (precision: string) (settings: BenchmarkSettings) (mode: string) (data: TokenizedDataset) : PackingRun =
        let batch = config.BatchSize
        let chunks = Batching.microBatches batch (Sampler.sequential data.Rows.Length)
        let steps = chunks.Length
        let warmup = min settings.WarmupSteps (steps - 1)
        let options =
            { benchmarkOptions batch config.SequenceLength settings.LearningRate steps settings.Threads with
                Precision = precisionOf precision }
        let plan = TrainingLoop.plan options data.Rows.Length
        let lm = CausalLm.create config.Model 1L
        use _ = lm.Module
        let real (chunk: int[]) = chunk |> Array.sumBy (fun i -> int64 (min data.Rows[i].Length config.SequenceLength))
        let input (chunk: int[]) = int64 chunk.Length * (chunk |> Array.map (fun i -> int64 (min data.Rows[i].Length config.SequenceLength)) |> Array.max)
        let epoch = Stopwatch.StartNew()
        let timed = Stopwatch()
        let mutable firstLoss = nan
        let afterStep (context: StepContext) =
            if context.Log.Step = 1 then firstLoss <- context.Log.Loss
            if context.Log.Step = warmup then timed.Start()
            if context.Log.Step = steps then
                timed.Stop()
                epoch.Stop()
            StepDecision.Continue
        if warmup = 0 then timed.Start()
        let result = TrainingLoop.train plan lm data None { OnLog = ignore; AfterStep = afterStep }
        result.Parameters.Dispose()
        let timedChunks = chunks[warmup..]
        { Mode = mode
          Rows = data.Rows.Length
          Steps = steps
          TimedSteps = timedChunks.Length
          RealTokens = timedChunks |> Array.sumBy real
          InputTokens = timedChunks |> Array.sumBy input
          Seconds = timed.Elapsed.TotalSeconds
          EpochSeconds = epoch.Elapsed.TotalSeconds
          FirstLoss = firstLoss }

    /// `bench train --packing-compare`: batch x (warm-up + timed steps) synthetic samples of uniformly
    /// random lengths between min(16, T) and T (the configuration's sequence length), trained on for one
    /// epoch twice by our Trainer in the precision: one sample per row, right-padded to the longest of
    /// its micro-batch, then packed in isolation into rows of up to T tokens (fewer steps over the same
    /// samples). Each run reports real tokens per second (padding excluded) over its steps after the
    /// warm-up, and the seconds of its whole epoch; both run Rounds times, alternating, and each keeps
    /// its faster round (whichever runs first in a process is slower). progress hears one line per run.
    let packingComparison (config: BenchmarkConfig) (precision: string) (settings: BenchmarkSettings) (progress: string -> unit) : PackingComparison =
        checkSettings settings
        Runtime.TorchRuntime.ensure ()
        torch.set_num_threads settings.Threads
        precisionOf precision |> ignore
        let maxLength = config.SequenceLength
        let minLength = min 16 maxLength
        let count = config.BatchSize * (settings.WarmupSteps + settings.Steps)
        let samples = variableLengthDataset (ModelConfig.vocabSize config.Model) count minLength maxLength 11
        let packed = TokenizedDataset.packIsolated maxLength samples
        let faster (a: PackingRun) (b: PackingRun) = if b.RealTokensPerSecond > a.RealTokensPerSecond then b else a
        let rounds =
            List.init Rounds (fun k ->
                progress (sprintf "%s %s, round %d of %d: padded, %d samples in %d rows" config.Name precision (k + 1) Rounds count samples.Rows.Length)
                let padded = packingRun config precision settings "padded" samples
                progress (sprintf "%s %s, round %d of %d: packed (isolated), %d samples in %d rows" config.Name precision (k + 1) Rounds count packed.Rows.Length)
                padded, packingRun config precision settings "packed" packed)
        let padded = rounds |> List.map fst |> List.reduce faster
        let packedRun = rounds |> List.map snd |> List.reduce faster
        { Config = config
          Precision = precision
          Samples = count
          MinLength = minLength
          MaxLength = maxLength
          Padded = padded
          Packed = packedRun }

    /// The table of a packing comparison: per run its rows, steps, padding share, real tokens/s and the
    /// seconds of the epoch, and the packed run's speed-up in both.
    let formatPackingComparison (c: PackingComparison) : string =
        let b = Text.StringBuilder()
        let line (text: string) = b.Append(text).Append('\n') |> ignore
        line (sprintf "%s %s: %d samples of %d to %d tokens, %d rows per step, packed rows of up to %d tokens"
                  c.Config.Name c.Precision c.Samples c.MinLength c.MaxLength c.Config.BatchSize c.MaxLength)
        line (sprintf "%-8s %6s %6s %9s %16s %14s" "batching" "rows" "steps" "padding" "real tokens/s" "epoch seconds")
        for r in [ c.Padded; c.Packed ] do
            line (sprintf "%-8s %6d %6d %8.1f%% %16.0f %14.2f" r.Mode r.Rows r.Steps (100.0 * r.PaddingShare) r.RealTokensPerSecond r.EpochSeconds)
        line (sprintf "packed / padded: %.2fx real tokens/s, %.2fx epoch time"
                  (c.Packed.RealTokensPerSecond / max c.Padded.RealTokensPerSecond 1e-9) (c.Packed.EpochSeconds / max c.Padded.EpochSeconds 1e-9))
        b.ToString()
