namespace Functional.Benchmarks

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Functional
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Optim
open Functional.Training

/// What one process holds of the training state, in bytes.
[<NoComparison>]
type RankMemory =
    { /// The flat parameter values (TrainResult.Parameters.Values).
      Parameters: int64
      /// The gradient buffers: the flat gradients, plus at stage 2 the block they are reduce-scattered into.
      Gradients: int64
      /// The optimizer state tensors the process holds (Transform.stateTensors: AdamW's moments of its
      /// shard and the step counters).
      OptimizerState: int64 }

    /// The sum of the three.
    member this.Total = this.Parameters + this.Gradients + this.OptimizerState

/// What one ZeRO stage of `functional bench distributed` measured.
[<NoComparison>]
type StageFigures =
    { /// The ZeRO stage (TrainRun.ZeroStage).
      Stage: int
      /// Why the trainer refused the stage (its InvalidInputException's problem); None when the stage ran.
      Unavailable: string option
      /// Rank 0's memory (its block is the longest: Sharding.block).
      Memory: RankMemory
      /// Input tokens of all processes per second over the timed steps.
      TokensPerSecond: float
      /// Mean seconds of a timed step (the PhaseClock's phases added up), averaged over the processes.
      StepSeconds: float
      /// Mean seconds of a timed step charged to TrainingPhase.Communication, averaged over the processes.
      CommunicationSeconds: float
      /// The loss of every step, warm-up steps first.
      Losses: float list }

    /// The share of a step spent in the collectives.
    member this.CommunicationShare = if this.StepSeconds > 0.0 then this.CommunicationSeconds / this.StepSeconds else 0.0

/// One launch of the benchmark: its processes, their threads and one entry per stage measured.
[<NoComparison>]
type DistributedRun =
    { /// The processes of the run (the communicator's size).
      Processes: int
      /// The intra-op threads of each process.
      ThreadsPerProcess: int
      /// The parameters of the model.
      Parameters: int64
      /// One entry per stage, in the order measured.
      Stages: StageFigures list }

/// `functional bench distributed`: per-process memory of parameters, gradients and optimizer state for
/// each ZeRO stage, tokens/s of several processes against one process with as many threads, and the share
/// of a step spent communicating.
[<RequireQualifiedAccess>]
module DistributedBenchmark =

    let private bytes (tensor: torch.Tensor) = tensor.numel () * int64 tensor.ElementSize

    /// The bytes of the training state a process holds between steps of a run at stage over communicator:
    /// the parameters and gradients the trainer reports (TrainResult.ParameterBytes, GradientBytes: stage 2's
    /// reduced block included, stage 3's blocks only) and every optimizer state tensor.
    let rankMemory (communicator: ICommunicator) (stage: int) (result: TrainResult) : RankMemory =
        let state = Transform.stateTensors result.OptimizerState
        let optimizer = state |> List.sumBy (fun (_, t) -> bytes t)
        for _, t in state do t.Dispose()
        { Parameters = result.ParameterBytes; Gradients = result.GradientBytes; OptimizerState = optimizer }

    /// The parameters of a model.
    let private parameterCount (lm: CausalLm) : int64 =
        CausalLm.parameterSpec lm |> List.sumBy (fun (_, shape) -> Array.fold (*) 1L shape)

    let private checkSettings (processes: int) (config: BenchmarkConfig) (settings: BenchmarkSettings) =
        if settings.Steps < 1 then InvalidInput.setting "steps" (sprintf "expected at least 1 timed step, found %d" settings.Steps)
        if settings.WarmupSteps < 0 then InvalidInput.setting "warmup" (sprintf "expected 0 or more warm-up steps, found %d" settings.WarmupSteps)
        if settings.Threads < 1 then InvalidInput.setting "threads" (sprintf "expected at least 1 thread per process, found %d" settings.Threads)
        if config.BatchSize < processes || config.BatchSize % processes <> 0 then
            InvalidInput.setting "batch"
                (sprintf "the rows per step (over all processes) must be a multiple of the %d processes, found %d" processes config.BatchSize)

    /// Trains a fresh model of the configuration (seed 1) on communicator's processes at a ZeRO stage:
    /// the synthetic rows of TrainingBenchmark, config.BatchSize rows per step over all processes (each
    /// process its rank's share), AdamW at a constant learning rate, clipping 1.0, no weight decay, fp32;
    /// WarmupSteps untimed steps, then Steps timed ones. Every process must call it with the same
    /// arguments. A stage the trainer refuses (InvalidInputException naming zero_stage) gives figures with
    /// Unavailable set, on every process alike.
    let measureStage (communicator: ICommunicator) (config: BenchmarkConfig) (settings: BenchmarkSettings) (stage: int) : StageFigures =
        let processes = communicator.Size
        checkSettings processes config settings
        Runtime.TorchRuntime.ensure ()
        torch.set_num_threads settings.Threads
        let total = settings.WarmupSteps + settings.Steps
        let data = TrainingBenchmark.syntheticDataset (ModelConfig.vocabSize config.Model) (config.BatchSize * total) config.SequenceLength
        let options =
            { TrainingBenchmark.benchmarkOptions (config.BatchSize / processes) config.SequenceLength settings.LearningRate total settings.Threads with
                ReportToTensorBoard = false }
        let clock = PhaseClock()
        let plan = { TrainingLoop.planFor processes options data.Rows.Length with PhaseClock = Some clock }
        let lm = CausalLm.create config.Model 1L
        use _ = lm.Module
        let losses = ResizeArray()
        if settings.WarmupSteps = 0 then clock.Reset()
        let afterStep (context: StepContext) =
            losses.Add context.Log.Loss
            if context.Log.Step = settings.WarmupSteps then clock.Reset()
            if context.Log.Step = total then clock.Mark TrainingPhase.Other
            StepDecision.Continue
        let run = { TrainingLoop.setup plan lm data with Communicator = communicator; ZeroStage = stage }
        let outcome =
            try Ok(TrainingLoop.run run None { OnLog = ignore; AfterStep = afterStep })
            with :? InvalidInputException as e when e.Setting = "zero_stage" -> Error e.Problem
        match outcome with
        | Error reason ->
            { Stage = stage
              Unavailable = Some reason
              Memory = { Parameters = 0L; Gradients = 0L; OptimizerState = 0L }
              TokensPerSecond = 0.0
              StepSeconds = 0.0
              CommunicationSeconds = 0.0
              Losses = [] }
        | Ok result ->
            let memory = rankMemory communicator stage result
            result.Parameters.Dispose()
            let perStep (seconds: float) = Communicator.sumFloat communicator (seconds / float settings.Steps) / float processes
            let phases = [ TrainingPhase.Forward; TrainingPhase.Backward; TrainingPhase.Optimizer; TrainingPhase.Other; TrainingPhase.Communication ]
            let step = perStep (phases |> List.sumBy clock.Seconds)
            { Stage = stage
              Unavailable = None
              Memory = memory
              TokensPerSecond = float (config.BatchSize * config.SequenceLength) / step
              StepSeconds = step
              CommunicationSeconds = perStep (clock.Seconds TrainingPhase.Communication)
              Losses = List.ofSeq losses }

    /// "2 ranks x 1 thread", "1 process x 2 threads".
    let private label (processes: int) (threads: int) =
        let ranks = if processes = 1 then "1 process" else sprintf "%d ranks" processes
        let threadCount = if threads = 1 then "1 thread" else sprintf "%d threads" threads
        sprintf "%s x %s" ranks threadCount

    let private runLabel (run: DistributedRun) = label run.Processes run.ThreadsPerProcess

    /// measureStage for each stage in turn, with a fresh model each; progress hears one line per stage
    /// (call it on one process only to print it once).
    let measure
        (communicator: ICommunicator)
        (config: BenchmarkConfig)
        (settings: BenchmarkSettings)
        (stages: int list)
        (progress: string -> unit)
        : DistributedRun =
        checkSettings communicator.Size config settings
        stages |> List.iter ZeroStage.validate
        Runtime.TorchRuntime.ensure ()
        let parameters =
            let lm = CausalLm.create config.Model 1L
            use _ = lm.Module
            parameterCount lm
        let figures =
            [ for stage in stages ->
                  progress (sprintf "%s, %s, ZeRO stage %d: %d + %d steps" config.Name (label communicator.Size settings.Threads) stage settings.WarmupSteps settings.Steps)
                  let figures = measureStage communicator config settings stage
                  GC.Collect()
                  GC.WaitForPendingFinalizers()
                  figures ]
        { Processes = communicator.Size; ThreadsPerProcess = settings.Threads; Parameters = parameters; Stages = figures }

    /// The run as JSON (the driver reads what the ranks under mpirun measured with ofJson).
    let toJson (run: DistributedRun) : string =
        use stream = new MemoryStream()
        (use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
         w.WriteStartObject()
         w.WriteNumber("processes", run.Processes)
         w.WriteNumber("threads_per_process", run.ThreadsPerProcess)
         w.WriteNumber("parameters", run.Parameters)
         w.WriteStartArray "stages"
         for s in run.Stages do
             w.WriteStartObject()
             w.WriteNumber("stage", s.Stage)
             match s.Unavailable with
             | Some reason -> w.WriteString("unavailable", reason)
             | None -> w.WriteNull "unavailable"
             w.WriteNumber("parameter_bytes", s.Memory.Parameters)
             w.WriteNumber("gradient_bytes", s.Memory.Gradients)
             w.WriteNumber("optimizer_state_bytes", s.Memory.OptimizerState)
             w.WriteNumber("tokens_per_second", s.TokensPerSecond)
             w.WriteNumber("step_seconds", s.StepSeconds)
             w.WriteNumber("communication_seconds", s.CommunicationSeconds)
             w.WriteNumber("communication_share", s.CommunicationShare)
             w.WriteStartArray "losses"
             for loss in s.Losses do w.WriteNumberValue loss
             w.WriteEndArray()
             w.WriteEndObject()
         w.WriteEndArray()
         w.WriteEndObject())
        Encoding.UTF8.GetString(stream.ToArray())

    /// A run from toJson's text.
    let ofJson (text: string) : DistributedRun =
        use document = JsonDocument.Parse text
        let root = document.RootElement
        let stage (e: JsonElement) =
            let number (name: string) = e.GetProperty(name).GetDouble()
            let count (name: string) = e.GetProperty(name).GetInt64()
            { Stage = e.GetProperty("stage").GetInt32()
              Unavailable =
                match e.GetProperty "unavailable" with
                | u when u.ValueKind = JsonValueKind.String -> Some(u.GetString())
                | _ -> None
              Memory = { Parameters = count "parameter_bytes"; Gradients = count "gradient_bytes"; OptimizerState = count "optimizer_state_bytes" }
              TokensPerSecond = number "tokens_per_second"
              StepSeconds = number "step_seconds"
              CommunicationSeconds = number "communication_seconds"
              Losses = [ for l in e.GetProperty("losses").EnumerateArray() -> l.GetDouble() ] }
        { Processes = root.GetProperty("processes").GetInt32()
          ThreadsPerProcess = root.GetProperty("threads_per_process").GetInt32()
          Parameters = root.GetProperty("parameters").GetInt64()
          Stages = [ for e in root.GetProperty("stages").EnumerateArray() -> stage e ] }

    let private invariant (format: string) (value: float) = value.ToString(format, Globalization.CultureInfo.InvariantCulture)

    let private mb (value: int64) = invariant "F1" (float value / 1e6)

    /// The table of runs (rank 0's memory, throughput, the communication share), then each stage's
    /// memory against stage 0's and the tokens/s of the first run's stage 0 against every other run's.
    let format (config: BenchmarkConfig) (settings: BenchmarkSettings) (runs: DistributedRun list) : string =
        let text = StringBuilder()
        let line (s: string) = text.Append(s).Append('\n') |> ignore
        let shape = ModelFamily.traits config.Model
        let parameters = runs |> List.tryHead |> Option.map (fun r -> r.Parameters.ToString("N0", Globalization.CultureInfo.InvariantCulture)) |> Option.defaultValue "?"
        line (
            sprintf "%s: %s, %d layers, width %d, vocabulary %d, %s parameters; %d x %d tokens per step over all processes; %d warm-up + %d timed steps; AdamW, clip 1.0, constant lr %s, fp32"
                config.Name shape.DisplayName shape.Depth shape.Width shape.VocabSize parameters
                config.BatchSize config.SequenceLength settings.WarmupSteps settings.Steps (invariant "G" settings.LearningRate)
        )
        line "memory per rank (rank 0) in MB; step and communication in seconds per step, mean over ranks"
        line (sprintf "%-22s %5s %9s %9s %9s %9s %9s %8s %8s %7s %10s" "run" "stage" "params" "grads" "optim" "total" "tokens/s" "step s" "comm s" "comm %" "final loss")
        for run in runs do
            for s in run.Stages do
                match s.Unavailable with
                | Some reason -> line (sprintf "%-22s %5d   not available: %s" (runLabel run) s.Stage reason)
                | None ->
                    let m = s.Memory
                    let share = invariant "F1" (100.0 * s.CommunicationShare) + "%"
                    let finalLoss = s.Losses |> List.tryLast |> Option.map (invariant "F4") |> Option.defaultValue "-"
                    line (
                        sprintf "%-22s %5d %9s %9s %9s %9s %9s %8s %8s %7s %10s"
                            (runLabel run) s.Stage (mb m.Parameters) (mb m.Gradients) (mb m.OptimizerState) (mb m.Total)
                            (invariant "F0" s.TokensPerSecond) (invariant "F3" s.StepSeconds) (invariant "F3" s.CommunicationSeconds) share finalLoss
                    )
        match runs with
        | first :: others ->
            let ran = first.Stages |> List.filter (fun s -> s.Unavailable.IsNone)
            match ran |> List.tryFind (fun s -> s.Stage = 0) with
            | Some zero ->
                for s in ran |> List.filter (fun s -> s.Stage > 0) do
                    let ratio (a: int64) (b: int64) = if b = 0L then "-" else invariant "F2" (float a / float b)
                    line (
                        sprintf "stage %d per rank / stage 0 (%s): parameters %s, gradients %s, optimizer state %s (1 / world = %s)"
                            s.Stage (runLabel first) (ratio s.Memory.Parameters zero.Memory.Parameters) (ratio s.Memory.Gradients zero.Memory.Gradients)
                            (ratio s.Memory.OptimizerState zero.Memory.OptimizerState) (invariant "F2" (1.0 / float first.Processes))
                    )
                for other in others do
                    match other.Stages |> List.tryFind (fun s -> s.Stage = 0 && s.Unavailable.IsNone) with
                    | Some baseline ->
                        let ratio = invariant "F2" (zero.TokensPerSecond / baseline.TokensPerSecond)
                        line (sprintf "tokens/s at stage 0, %s / %s: %sx" (runLabel first) (runLabel other) ratio)
                    | None -> ()
            | None -> ()
        | [] -> ()
        text.ToString()
