namespace Functional.Distributed

open System
open TorchSharp
open Functional
open Functional.Runtime
open Functional.Models

/// One step of a pipeline stage's schedule: the forward or the backward of a micro-batch (from 0).
[<RequireQualifiedAccess>]
type PipelineStep =
    | Forward of microBatch: int
    | Backward of microBatch: int

/// Pipeline parallelism's plans: contiguous stages balanced by parameter count, and the 1F1B schedule
/// (PipeDream-Flush, as Megatron and DeepSpeed run it) of the micro-batches of an accumulation window.
[<RequireQualifiedAccess>]
module Pipeline =

    /// Divides items (the layers, each weighing its parameter count) into `stages` contiguous, non-empty
    /// runs whose heaviest run is as light as possible (the linear partition, by dynamic programming); ties
    /// go to the earliest cut. Returns each stage's (first item, item count). Raises
    /// InvalidInputException naming {pipeline_parallel_degree} when there are fewer items than stages.
    let partition (weights: int64[]) (stages: int) : (int * int)[] =
        let n = weights.Length
        if stages < 1 then InvalidInput.setting "pipeline_parallel_degree" (sprintf "must be at least 1, got %d" stages)
        if n < stages then
            InvalidInput.setting "pipeline_parallel_degree" (sprintf "(%d) must not exceed the %d layers to divide" stages n)
        let prefix = Array.scan (+) 0L weights
        let sum i j = prefix[j] - prefix[i] // items i .. j - 1
        // best[k][j]: the lightest heaviest run of items 0 .. j - 1 in k runs; cut[k][j]: where the last run starts.
        let best = Array2D.create (stages + 1) (n + 1) Int64.MaxValue
        let cut = Array2D.zeroCreate (stages + 1) (n + 1)
        best[0, 0] <- 0L
        for k in 1 .. stages do
            for j in k .. n - (stages - k) do
                for i in k - 1 .. j - 1 do
                    if best[k - 1, i] < Int64.MaxValue then
                        let heaviest = max best[k - 1, i] (sum i j)
                        if heaviest < best[k, j] then
                            best[k, j] <- heaviest
                            cut[k, j] <- i
        let ends = Array.zeroCreate stages
        let mutable j = n
        for k in stages .. -1 .. 1 do
            ends[k - 1] <- j
            j <- cut[k, j]
        [| for k in 0 .. stages - 1 ->
               let start = if k = 0 then 0 else ends[k - 1]
               start, ends[k] - start |]

    /// The 1F1B schedule of one stage (from 0) of `stages` over microBatches micro-batches: a warm-up of
    /// min(stages - stage - 1, microBatches) forwards, then alternately one forward and one backward, then
    /// the remaining backwards. Micro-batches go forward and backward in order; at most stages - stage
    /// forwards await their backward at any time, which bounds the stage's stored activations.
    let oneForwardOneBackward (stages: int) (stage: int) (microBatches: int) : PipelineStep list =
        if stages < 1 || stage < 0 || stage >= stages then invalidArg (nameof stage) (sprintf "expected a stage below %d, got %d" stages stage)
        if microBatches < 1 then invalidArg (nameof microBatches) (sprintf "expected at least one micro-batch, got %d" microBatches)
        let warmup = min (stages - stage - 1) microBatches
        [ for i in 0 .. warmup - 1 do
              yield PipelineStep.Forward i
          for i in warmup .. microBatches - 1 do
              yield PipelineStep.Forward i
              yield PipelineStep.Backward(i - warmup)
          for i in microBatches - warmup .. microBatches - 1 do
              yield PipelineStep.Backward i ]

    /// Runs every stage's schedule with blocking receives and buffered sends (a send returns at once, as
    /// MPI's eager sends of small messages and non-blocking sends do): a forward of micro-batch i on stage
    /// s waits for its forward on s - 1, a backward for its own forward and its backward on s + 1. Each
    /// round every stage whose next step is ready takes it. Returns the number of rounds until every stage
    /// finished, or None when the schedules deadlock.
    let simulate (schedules: PipelineStep list[]) : int option =
        let stages = schedules.Length
        let remaining = Array.copy schedules
        let forwardDone = Collections.Generic.HashSet<int * int>()
        let backwardDone = Collections.Generic.HashSet<int * int>()
        let ready s step =
            match step with
            | PipelineStep.Forward i -> s = 0 || forwardDone.Contains(s - 1, i)
            | PipelineStep.Backward i -> forwardDone.Contains(s, i) && (s = stages - 1 || backwardDone.Contains(s + 1, i))
        let rec loop rounds =
            if remaining |> Array.forall List.isEmpty then Some rounds
            else
                let moved =
                    [ for s in 0 .. stages - 1 do
                          match remaining[s] with
                          | step :: _ when ready s step -> yield s, step
                          | _ -> () ]
                if moved.IsEmpty then None
                else
                    for s, step in moved do
                        remaining[s] <- List.tail remaining[s]
                        match step with
                        | PipelineStep.Forward i -> forwardDone.Add((s, i)) |> ignore
                        | PipelineStep.Backward i -> backwardDone.Add((s, i)) |> ignore
                    loop (rounds + 1)
        loop 0

/// A self-check of pipeline parallelism for `mpirun -np N`: a small LLaMA divided into N stages by
/// Pipeline.partition runs the 1F1B schedule of 4 micro-batches, the activations and their gradients
/// sent from stage to stage (IPointToPoint), and must give the loss of the whole model and, on every
/// stage, the whole model's gradients of the stage's parameters (its layers; the embedding on the first,
/// the final norm and the head on the last).
[<RequireQualifiedAccess>]
module PipelineCheck =

    let private relative (a: torch.Tensor) (b: torch.Tensor) =
        use d = (a - b).abs().max ()
        use m = b.abs().max ()
        float (d.item<float32> ()) / max 1e-12 (float (m.item<float32> ()))

    /// Runs the check over the processes of group (each one a stage); returns (passed, line).
    let check (group: IPointToPoint) : bool * string =
        TorchRuntime.ensure ()
        use _ = torch.NewDisposeScope()
        let stages, stage = group.Size, group.Rank
        let layers = 2 * stages + 1
        let json =
            sprintf
                """{"model_type": "llama", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": %d,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, "initializer_range": 0.2}"""
                layers
        let config =
            match ModelConfig.parse "pipeline check" json with
            | ModelConfig.Llama c -> c
            | other -> failwithf "expected a LLaMA config, got %A" other
        let microBatches, rows, T = 4, 2L, 6L
        use generator = new torch.Generator(3UL)
        let ids = [| for _ in 1 .. microBatches -> torch.randint(0L, int64 config.VocabSize, [| rows; T |], generator = generator, dtype = torch.int64) |]
        // The whole model: the summed loss of every micro-batch, and its gradients.
        let whole = Llama.build config 13L
        let wholeLoss = ids |> Array.map (fun i -> Loss.causalLmSum (whole.forward i) i) |> Array.reduce (+)
        wholeLoss.backward ()
        // This stage's part of a second copy of the same model.
        let model = Llama.build config 13L
        let backbone = model.Backbone
        let weights = [| for block, _ in backbone.Layers -> block.parameters () |> Seq.sumBy (fun p -> p.numel ()) |]
        let plan = Pipeline.partition weights stages
        let first, count = plan[stage]
        let last = stage = stages - 1
        let positions = torch.arange(T, dtype = torch.int64)
        let hidden = [| rows; T; int64 config.HiddenSize |]
        let inputs = Array.create microBatches (null: torch.Tensor)
        let outputs = Array.create microBatches (null: torch.Tensor)
        let mutable lossSum = 0.0
        for step in Pipeline.oneForwardOneBackward stages stage microBatches do
            match step with
            | PipelineStep.Forward i ->
                let x, extras = backbone.Embed(ids[i], positions)
                let x =
                    if stage = 0 then x
                    else
                        let received = torch.empty(hidden, dtype = torch.float32)
                        group.Receive(received, stage - 1)
                        inputs[i] <- received.requires_grad_ true
                        received
                let mutable y = x
                for index in first .. first + count - 1 do
                    y <- (snd backbone.Layers[index]).Forward(y, extras)
                if last then
                    let logits = torch.nn.functional.linear(backbone.FinalNorm y, model.HeadWeight)
                    outputs[i] <- Loss.causalLmSum logits ids[i]
                    lossSum <- lossSum + float (outputs[i].item<float32> ())
                else
                    outputs[i] <- y
                    group.Send(y.detach().contiguous (), stage + 1)
            | PipelineStep.Backward i ->
                if last then outputs[i].backward ()
                else
                    let gradient = torch.empty(hidden, dtype = torch.float32)
                    group.Receive(gradient, stage + 1)
                    torch.autograd.backward([| outputs[i] |], [| gradient |])
                if stage > 0 then group.Send(inputs[i].grad.contiguous (), stage - 1)
        // The loss travels from the last stage to every stage.
        use total = torch.tensor (if last then lossSum else 0.0)
        group.AllReduce total
        let wholeGrads = dict [ for name, p in whole.named_parameters () -> name, p.grad ]
        let owned (name: string) =
            let prefix = "model.layers."
            if name.StartsWith prefix then
                let index = int (name.Substring(prefix.Length).Split('.')[0])
                index >= first && index < first + count
            else (stage = 0 && name = "model.embed_tokens.weight") || (last && (name = "model.norm.weight" || name = "lm_head.weight"))
        let differences =
            [ yield "loss", abs (total.item<float> () - float (wholeLoss.item<float32> ())) / abs (float (wholeLoss.item<float32> ()))
              for name, p in model.named_parameters () do
                  if owned name then yield name, relative p.grad wholeGrads[name] ]
        let failures = [ for what, d in differences do if not (d <= 1e-5) then yield sprintf "%s differs by %g" what d ]
        let largest = differences |> List.map snd |> List.max
        let status =
            if failures.IsEmpty then
                sprintf "ok (stage %d of %d holds layers %d-%d of %d; 1F1B over %d micro-batches: the loss and the stage's %d gradients within %.1e of the whole model, relative)"
                    stage stages first (first + count - 1) layers microBatches (differences.Length - 1) largest
            else "FAILED: " + String.Join("; ", failures)
        failures.IsEmpty, sprintf "pipeline-check rank %d of %d: %s" stage stages status

    /// Checks the processes of this launch as the stages of one pipeline; prints the line, finalizes
    /// MPI, and returns 0 when it passed, 1 otherwise.
    let run () : int =
        let world = Communicator.fromEnvironment ()
        let passed, line =
            match world with
            | :? IPointToPoint as p when world.Size > 1 -> check p
            | _ -> false, sprintf "pipeline-check rank %d of %d: FAILED: a pipeline needs at least 2 processes" world.Rank world.Size
        Communicator.finishCheck world (passed, line)
