namespace Functional.Benchmarks

open System
open System.Diagnostics
open System.Text
open TorchSharp
open Functional
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Optim
open Functional.Training

/// How the processes of `functional bench parallel` share the model.
[<RequireQualifiedAccess>]
type ParallelLayout =
    /// Every process holds the whole model and trains on its share of the rows.
    | Data
    /// Every layer split over the processes (TensorParallelLlama), the vocabulary too.
    | Tensor
    /// The layers divided into one stage per process (PipelineTraining).
    | Pipeline

    /// "DP 2", "TP 2", "PP 2".
    member this.Label(processes: int) =
        match this with
        | Data -> sprintf "DP %d" processes
        | Tensor -> sprintf "TP %d" processes
        | Pipeline -> sprintf "PP %d" processes

/// What one process held and did in one layout.
[<NoComparison>]
type ParallelRankFigures =
    { /// The process's rank.
      Rank: int
      /// The bytes of every parameter the process holds (its model's parameters, what it does not train
      /// released: PipelineTraining.release, or the part alone under tensor parallelism).
      Parameters: int64
      /// The bytes of its gradient buffers (the trainer's flat gradients).
      Gradients: int64
      /// The bytes of its optimizer state (AdamW's moments and counters).
      OptimizerState: int64
      /// The growth of its resident memory during one optimizer step over the memory between steps
      /// (VmHWM after the step, reset before it, less the resident bytes before it): activations, their
      /// gradients and the step's temporaries. None where /proc cannot tell.
      StepPeak: int64 option
      /// The bytes of the largest logits tensor one micro-batch's forward makes on this process (micro-batch
      /// rows x positions x the vocabulary it holds: V / N under tensor parallelism, none on a pipeline stage
      /// without the head).
      Logits: int64 }

/// One layout of `functional bench parallel`.
[<NoComparison>]
type ParallelLayoutFigures =
    { /// The layout.
      Layout: ParallelLayout
      /// Every process's figures, by rank.
      Ranks: ParallelRankFigures list
      /// Tokens of every process per second over the timed steps (the global batch's input tokens).
      TokensPerSecond: float
      /// The loss of every step.
      Losses: float list }

/// `functional bench parallel`: for data, tensor and pipeline parallelism over the same processes, the same
/// LLaMA model and the same global batch of micro-batches, each process's parameter, gradient, optimizer and
/// step memory, and tokens/s.
[<RequireQualifiedAccess>]
module ModelParallelBenchmark =

    let private bytes (t: torch.Tensor) = t.numel () * int64 t.ElementSize

    /// The LLaMA of the benchmark: layers x width (heads of 64, half as many key/value heads), a SwiGLU of
    /// 8/3 width rounded to 64, vocabulary entries (untied).
    let config (layers: int) (width: int) (vocabulary: int) : LlamaConfig =
        if width < 128 || width % 128 <> 0 then InvalidInput.setting "width" (sprintf "expected a multiple of 128 (heads of 64, pairs of them), found %d" width)
        if layers < 1 then InvalidInput.setting "layers" (sprintf "expected at least 1 layer, found %d" layers)
        let heads = width / 64
        let intermediate = (8 * width / 3 + 63) / 64 * 64
        let json =
            sprintf
                """{"model_type": "llama", "vocab_size": %d, "hidden_size": %d, "intermediate_size": %d, "num_hidden_layers": %d,
                    "num_attention_heads": %d, "num_key_value_heads": %d, "max_position_embeddings": 4096, "tie_word_embeddings": false}"""
                vocabulary width intermediate layers heads (heads / 2)
        match ModelConfig.parse "bench parallel" json with
        | ModelConfig.Llama c -> c
        | other -> failwithf "expected a LLaMA config, got %A" other

    /// Trains the model of config in layout over world's processes (every process calls it with the same
    /// arguments): `global` rows per optimizer step of sequenceLength tokens in micro-batches of microBatch
    /// rows (accumulated: global / microBatch windows' micro-batches under tensor and pipeline parallelism,
    /// global / (microBatch x N) per process under data parallelism), AdamW at 1e-3, clipping 1.0; warmup
    /// untimed steps, steps timed ones, then one more whose memory is measured.
    let measure
        (world: ISplittableCommunicator)
        (config: LlamaConfig)
        (layout: ParallelLayout)
        (globalRows: int)
        (microBatch: int)
        (sequenceLength: int)
        (warmup: int)
        (steps: int)
        : ParallelLayoutFigures =
        let n = world.Size
        let dataDegree = if layout = ParallelLayout.Data then n else 1
        if microBatch < 1 || globalRows % (microBatch * dataDegree) <> 0 then
            InvalidInput.setting "batch" (sprintf "the %d rows per step must be a multiple of the micro-batch (%d) x the data-parallel processes (%d)" globalRows microBatch dataDegree)
        Runtime.TorchRuntime.ensure ()
        use _ = torch.NewDisposeScope()
        let total = warmup + steps + 1
        let data = TrainingBenchmark.syntheticDataset config.VocabSize (globalRows * total) sequenceLength
        let options =
            { TrainingBenchmark.benchmarkOptions microBatch sequenceLength 1e-3 total 1 with
                GradientAccumulationSteps = globalRows / (microBatch * dataDegree)
                MaxGradNorm = 1.0
                ReportToTensorBoard = false }
        let plan = TrainingLoop.planFor dataDegree options data.Rows.Length
        let model = ModelConfig.Llama config
        let held, run, logitsWidth =
            match layout with
            | ParallelLayout.Data ->
                let lm = CausalLm.create model 1L
                lm.Module :> torch.nn.Module, { TrainingLoop.setup plan lm data with Communicator = world }, int64 config.VocabSize
            | ParallelLayout.Tensor ->
                let groups = ProcessGrid.groups world n 1
                let whole = Llama.build config 1L
                let part = TensorParallelLlama.shard groups.Tensor config whole
                whole.Dispose()
                part :> torch.nn.Module, TensorParallelTraining.setup plan groups.Tensor config part data, int64 (config.VocabSize / n)
            | ParallelLayout.Pipeline ->
                let groups = ProcessGrid.groups world 1 n
                let head = Llama.build config 1L
                let stage = PipelineTraining.stageOf head n groups.Pipeline.Rank
                PipelineTraining.release head stage
                let parameters = dict [ for name, p in head.named_parameters () -> name, p ]
                let p2p = groups.Pipeline :?> IPointToPoint
                head :> torch.nn.Module,
                { TrainingLoop.setup plan (CausalLm.ofModule model head []) data with
                    Parameters = [ for name in stage.Trained -> struct (name, parameters[name]) ]
                    ModelParallel = Some(PipelineTraining.hooks p2p head stage (PipelineTraining.causalLmLoss 0 head)) },
                (if stage.Stage = n - 1 then int64 config.VocabSize else 0L)
        let losses = ResizeArray()
        let clock = Stopwatch()
        let mutable baseline = 0L
        let mutable peakReset = false
        let mutable stepPeak = None
        let afterStep (context: StepContext) =
            losses.Add context.Log.Loss
            let step = context.Log.Step
            if step = warmup then clock.Restart()
            if step = warmup + steps then
                clock.Stop()
                baseline <- TrainingBenchmark.residentBytes ()
                peakReset <- TrainingBenchmark.resetPeak ()
            if step = total && peakReset then
                stepPeak <- TrainingBenchmark.peakResident () |> Option.map (fun peak -> max 0L (peak - baseline))
            StepDecision.Continue
        if warmup = 0 then clock.Start()
        let result = TrainingLoop.run run None { OnLog = ignore; AfterStep = afterStep }
        let state = Transform.stateTensors result.OptimizerState
        let mine =
            [| float (held.parameters () |> Seq.sumBy bytes)
               float result.GradientBytes
               float (state |> List.sumBy (fun (_, t) -> bytes t))
               (match stepPeak with Some b -> float b | None -> -1.0)
               float (int64 microBatch * int64 sequenceLength * logitsWidth * 4L) |]
        result.Parameters.Dispose()
        use all = torch.zeros([| int64 n; 5L |], dtype = torch.float64)
        (use row = all[int64 world.Rank] in row.copy_(torch.tensor(mine, dtype = torch.float64)) |> ignore)
        world.AllReduce all
        let seconds = Communicator.sumFloat world clock.Elapsed.TotalSeconds / float n
        { Layout = layout
          Ranks =
            [ for r in 0 .. n - 1 ->
                  let v (i: int) = all[int64 r, int64 i].item<float> ()
                  { Rank = r
                    Parameters = int64 (v 0)
                    Gradients = int64 (v 1)
                    OptimizerState = int64 (v 2)
                    StepPeak = (if v 3 < 0.0 then None else Some(int64 (v 3)))
                    Logits = int64 (v 4) } ]
          TokensPerSecond = float (globalRows * sequenceLength * steps) / max seconds 1e-9
          Losses = List.ofSeq losses }

    let private mb (value: int64) = (float value / 1e6).ToString("F1", Globalization.CultureInfo.InvariantCulture)

    /// The table: a row per layout and rank, then each layout's largest rank against data parallelism's.
    let format (config: LlamaConfig) (processes: int) (globalRows: int) (microBatch: int) (sequenceLength: int) (warmup: int) (steps: int) (layouts: ParallelLayoutFigures list) : string =
        let text = StringBuilder()
        let line (s: string) = text.Append(s).Append('\n') |> ignore
        let parameters =
            use m = Llama.build config 1L
            (m.parameters () |> Seq.sumBy (fun p -> p.numel ())).ToString("N0", Globalization.CultureInfo.InvariantCulture)
        line (
            sprintf "LLaMA, %d layers, width %d, %d heads (%d key/value), vocabulary %d, %s parameters; %d processes; %d rows x %d tokens per step in micro-batches of %d; %d warm-up + %d timed steps; AdamW, clip 1.0, fp32"
                config.NumHiddenLayers config.HiddenSize config.NumAttentionHeads config.NumKeyValueHeads config.VocabSize parameters
                processes globalRows sequenceLength microBatch warmup steps
        )
        line "memory per rank in MB (step: resident growth during one optimizer step; logits: one micro-batch's, computed)"
        line (sprintf "%-6s %4s %9s %9s %9s %9s %9s %9s %10s %10s" "layout" "rank" "params" "grads" "optim" "state" "step" "logits" "tokens/s" "final loss")
        for l in layouts do
            for r in l.Ranks do
                let stepPeak = r.StepPeak |> Option.map mb |> Option.defaultValue "-"
                let finalLoss = l.Losses |> List.tryLast |> Option.map (fun x -> x.ToString("F4", Globalization.CultureInfo.InvariantCulture)) |> Option.defaultValue "-"
                line (
                    sprintf "%-6s %4d %9s %9s %9s %9s %9s %9s %10s %10s"
                        (l.Layout.Label processes) r.Rank (mb r.Parameters) (mb r.Gradients) (mb r.OptimizerState) (mb (r.Parameters + r.Gradients + r.OptimizerState))
                        stepPeak (mb r.Logits) (if r.Rank = 0 then l.TokensPerSecond.ToString("F0", Globalization.CultureInfo.InvariantCulture) else "") (if r.Rank = 0 then finalLoss else "")
                )
        match layouts |> List.tryFind (fun l -> l.Layout = ParallelLayout.Data) with
        | Some data ->
            let largest (l: ParallelLayoutFigures) (f: ParallelRankFigures -> int64) = l.Ranks |> List.map f |> List.max
            let ratio (a: int64) (b: int64) = if b = 0L then "-" else (float a / float b).ToString("F2", Globalization.CultureInfo.InvariantCulture)
            for l in layouts |> List.filter (fun l -> l.Layout <> ParallelLayout.Data) do
                line (
                    sprintf "%s / %s, largest rank: parameters %s, gradients %s, optimizer state %s, logits %s; tokens/s %s"
                        (l.Layout.Label processes) (data.Layout.Label processes)
                        (ratio (largest l (fun r -> r.Parameters)) (largest data (fun r -> r.Parameters)))
                        (ratio (largest l (fun r -> r.Gradients)) (largest data (fun r -> r.Gradients)))
                        (ratio (largest l (fun r -> r.OptimizerState)) (largest data (fun r -> r.OptimizerState)))
                        (ratio (largest l (fun r -> r.Logits)) (largest data (fun r -> r.Logits)))
                        ((l.TokensPerSecond / data.TokensPerSecond).ToString("F2", Globalization.CultureInfo.InvariantCulture))
                )
        | None -> ()
        text.ToString()
