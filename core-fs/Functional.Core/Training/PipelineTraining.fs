namespace Functional.Training

open System
open TorchSharp
open Functional
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Runtime

/// One process's stage of a pipeline: which of the model's layers it runs, and which parameters it trains.
[<NoComparison; NoEquality>]
type PipelineStage =
    { /// This stage, from 0.
      Stage: int
      /// The stages of the pipeline (pipeline_parallel_degree).
      Stages: int
      /// The first of the stage's layers.
      FirstLayer: int
      /// How many consecutive layers the stage runs.
      LayerCount: int
      /// The parameters the stage trains, by name, in the model's order: its layers'; the token embedding on
      /// the first stage; the final norm and the LM head on the last; a tied embedding on every stage (its
      /// gradient is the sum of the first stage's and the last stage's, PipelineTraining.hooks).
      Trained: string list
      /// The parameter this stage is the one source of, when every stage's copies are joined
      /// (PipelineTraining.gather): its Trained, but a tied embedding only on the first stage.
      Owned: Set<string>
      /// The parameters every stage trains (a tied embedding), whose gradients are summed over the
      /// pipeline and whose squares count once in the clip norm.
      Shared: string list
      /// Every parameter's shape in the whole model (what gather restores after release).
      Shapes: Map<string, int64[]>
      /// The width of the hidden states between stages (the embedding's stream: OPT's project_in makes it
      /// the hidden size, not the embedding's).
      Width: int64 }

/// Pipeline parallelism in TrainingLoop (PaddleNLP's pipeline_parallel_degree, DeepSpeed's PipelineModule,
/// Megatron's 1F1B): the layers of a causal LM divided into contiguous stages balanced by parameter count
/// (Pipeline.partition), one process per stage; a window's micro-batches run the 1F1B schedule
/// (Pipeline.oneForwardOneBackward), the hidden states sent forward and their gradients backward point to
/// point (non-blocking sends). Every stage collates the same micro-batches (the stages of a pipeline are
/// one data-parallel rank); the last computes each loss, which every stage then receives, so the
/// token-weighted normalization, the logged loss and the optimizer step mean what they mean on one process.
///
/// Each process keeps the whole model's structure (it loads the whole checkpoint, and joins the stages'
/// parameters for checkpoints and final/) but trains, and holds gradients and optimizer state for, only its
/// stage's parameters. Every family's causal LM: outside the layers, what Embed reads (the token embedding,
/// learned positions, OPT's project_in, BLOOM's embedding norm; found by the gradient of one token's stream)
/// goes to the first stage, the rest (the final norm, OPT's project_out, the LM head) to the last, and stages
/// after the first take the layers' extras from DecoderBackbone.LayerExtras. fp32, without packing, ZeRO,
/// adapters or gradient checkpointing for now.
[<RequireQualifiedAccess>]
module PipelineTraining =

    // A parameter is known by its memory: TorchSharp may give one parameter several wrappers (handles).
    let private identity (t: torch.Tensor) = Optim.TensorMemory.address t

    let private handles (m: torch.nn.Module) = m.parameters () |> Seq.map identity |> Set.ofSeq

    /// The parameters outside the layers that Embed reads (the token embedding, learned positions, an
    /// embedding norm), by memory: those with a gradient of the stream of one token, taken in eval mode (no
    /// dropout drawn) without touching any parameter's .grad.
    /// Also returns the stream's width.
    let private embeddingParameters (model: CausalLmHead) (inLayers: Set<nativeint>) : Set<nativeint> * int64 =
        use _ = torch.NewDisposeScope()
        let outer = [ for p in model.parameters () do if not (inLayers.Contains(identity p)) && p.requires_grad then yield p ]
        let training = model.training
        model.eval ()
        try
            let device = model.Backbone.TokenEmbedding.weight.device
            let x, _ = model.Backbone.Embed(torch.zeros([| 1L; 1L |], dtype = torch.int64, device = device), torch.zeros([| 1L |], dtype = torch.int64, device = device))
            let width = x.shape[2]
            if outer.IsEmpty then Set.empty, width
            else
                let grads = torch.autograd.grad([| x.sum () |], [| for p in outer -> p :> torch.Tensor |], allow_unused = true)
                let used (g: torch.Tensor) = not (isNull g) && (try g.numel () >= 0L with _ -> false)
                (Seq.zip outer grads |> Seq.filter (fun (_, g) -> used g) |> Seq.map (fun (p, _) -> identity p) |> Set.ofSeq), width
        finally
            if training then model.train ()

    /// Stage `stage` of `stages` of model: the layers of Pipeline.partition by parameter count and the
    /// parameters it trains. Raises InvalidInputException naming {pipeline_parallel_degree} when there are
    /// more stages than layers.
    let stageOf (model: CausalLmHead) (stages: int) (stage: int) : PipelineStage =
        let backbone = model.Backbone
        let layers = backbone.Layers
        let weights = [| for block, _ in layers -> block.parameters () |> Seq.sumBy (fun p -> p.numel ()) |]
        let plan = Pipeline.partition weights stages
        let first, count = plan[stage]
        let layerOf =
            Map [ for index, (block, _) in Array.indexed layers do
                      for h in handles block -> h, index ]
        let embedding = identity backbone.TokenEmbedding.weight
        let tied = model.LmHead.IsNone
        let last = stage = stages - 1
        let named = [ for name, p in model.named_parameters () -> name, identity p ]
        let embedSide, width = embeddingParameters model (Set.ofSeq (Map.keys layerOf))
        let trains (handle: nativeint) =
            match layerOf.TryFind handle with
            | Some index -> index >= first && index < first + count
            | None when handle = embedding -> stage = 0 || tied
            | None when embedSide.Contains handle -> stage = 0 // positions, an embedding norm
            | None -> last // the final norm and the LM head
        let trained = [ for name, h in named do if trains h then yield name ]
        let shared = if tied then [ for name, h in named do if h = embedding then yield name ] else []
        { Stage = stage
          Stages = stages
          FirstLayer = first
          LayerCount = count
          Trained = trained
          Owned = trained |> List.filter (fun name -> stage = 0 || not (List.contains name shared)) |> Set.ofList
          Shared = shared
          Shapes = Map [ for name, p in model.named_parameters () -> name, p.shape ]
          Width = width }

    /// The squares of the shared parameters' gradients (the same on every stage after ReduceGradients).
    let private sharedSquares (model: CausalLmHead) (stage: PipelineStage) =
        [ for name, p in model.named_parameters () do
              if List.contains name stage.Shared && not (isNull p.grad) then
                  use s = p.grad.to_type(torch.float64).square().sum ()
                  yield s.item<float> () ]
        |> List.sum

    /// The last stage's loss of a micro-batch from the final hidden states (B, T, C): the head and the
    /// causal-LM loss sum, the full logits (lossChunkSize 0) or ChunkedLoss.causalLmSum.
    let causalLmLoss (lossChunkSize: int) (model: CausalLmHead) : torch.Tensor -> MicroBatch -> torch.Tensor =
        fun hidden batch ->
            if lossChunkSize > 0 then ChunkedLoss.causalLmSum lossChunkSize hidden model.HeadWeight batch.Labels
            else
                use logits = torch.nn.functional.linear(hidden, model.HeadWeight)
                Loss.causalLmSum logits batch.Labels

    /// Runs a window's micro-batches through this stage in 1F1B order: the first stage embeds, every stage
    /// runs its layers, the last applies the final norm and loss (causalLmLoss, or under tensor parallelism
    /// the vocabulary-parallel loss), scaled by scale before backward. Hidden states go to the next stage and
    /// their gradients come back from it; the losses go from the last stage to all. Returns each
    /// micro-batch's loss sum.
    let runWindow
        (group: IPointToPoint)
        (model: CausalLmHead)
        (stage: PipelineStage)
        (loss: torch.Tensor -> MicroBatch -> torch.Tensor)
        (window: MicroBatch list)
        (scale: float)
        : float list =
        let batches = Array.ofList window
        let n = batches.Length
        let backbone = model.Backbone
        let first, last = stage.Stage = 0, stage.Stage = stage.Stages - 1
        let inputs = Array.create n (null: torch.Tensor)
        let outputs = Array.create n (null: torch.Tensor)
        let losses = Array.zeroCreate<float> n
        let sends = Collections.Generic.List<IDisposable>()
        let send (t: torch.Tensor) (destination: int) =
            // The tensor stays referenced until its send has finished (at the window's end).
            let message = t.detach().contiguous ()
            sends.Add(group.StartSend(message, destination))
            sends.Add message
        let hiddenShape (batch: MicroBatch) = [| batch.InputIds.shape[0]; batch.InputIds.shape[1]; stage.Width |]
        try
            for step in Pipeline.oneForwardOneBackward stage.Stages stage.Stage n do
                match step with
                | PipelineStep.Forward i ->
                    let batch = batches[i]
                    let T = batch.InputIds.shape[1]
                    // The first stage checks the length (the others see the same batches, and may hold no
                    // position table).
                    if first then backbone.CheckLength(T, false)
                    let positions = torch.arange(T, dtype = torch.int64, device = batch.InputIds.device)
                    let x, extras =
                        if first then backbone.Embed(batch.InputIds, positions)
                        else
                            // The layers' extras only (rotary angles, ALiBi; the embeddings may be released):
                            // the hidden state comes from the previous stage.
                            let extras = (use _ = torch.no_grad () in backbone.LayerExtras(batch.InputIds, positions))
                            let received = torch.empty(hiddenShape batch, dtype = torch.float32, device = batch.InputIds.device)
                            group.Receive(received, stage.Stage - 1)
                            inputs[i] <- received.requires_grad_ true
                            received, extras
                    let mutable y = x
                    for index in stage.FirstLayer .. stage.FirstLayer + stage.LayerCount - 1 do
                        y <- (snd backbone.Layers[index]).Forward(y, extras)
                    if last then
                        use hidden = backbone.FinalNorm y
                        use lossSum = loss hidden batch
                        losses[i] <- lossSum.item<float32> () |> float
                        outputs[i] <- lossSum * scale
                    else
                        outputs[i] <- y
                        send y (stage.Stage + 1)
                | PipelineStep.Backward i ->
                    if last then outputs[i].backward ()
                    else
                        use gradient = torch.empty(outputs[i].shape, dtype = outputs[i].dtype, device = outputs[i].device)
                        group.Receive(gradient, stage.Stage + 1)
                        torch.autograd.backward([| outputs[i] |], [| gradient |])
                    if not first then send inputs[i].grad (stage.Stage - 1)
                    outputs[i].Dispose()
                    outputs[i] <- null
        finally
            for s in sends do s.Dispose()
        use all = torch.tensor(losses, dtype = torch.float64)
        group.Broadcast(all, stage.Stages - 1)
        [ for i in 0 .. n - 1 -> all[i].item<float> () ]

    /// The trainer's hooks of a stage: runWindow with loss, the shared (tied) gradients summed over the
    /// pipeline, and the clip norm of the whole model (the stages' squares summed, the shared ones once).
    let hooks (group: IPointToPoint) (model: CausalLmHead) (stage: PipelineStage) (loss: torch.Tensor -> MicroBatch -> torch.Tensor) : ModelParallelHooks =
        { ReduceGradients =
            fun () ->
                if not stage.Shared.IsEmpty then
                    use _ = torch.no_grad ()
                    for name, p in model.named_parameters () do
                        if List.contains name stage.Shared then group.AllReduce p.grad
          NormReduction =
            fun squared ->
                let shared = sharedSquares model stage
                Communicator.sumFloat group (squared - shared) + shared
          RunWindow = Some(runWindow group model stage loss) }

    /// Frees the memory of every parameter the stage does not train (what the other stages hold): each
    /// becomes an empty tensor of its trailing dimensions ([0; C] for the embedding), until gather makes the
    /// model whole again.
    let release (model: CausalLmHead) (stage: PipelineStage) : unit =
        let trained = Set.ofList stage.Trained
        use _ = torch.no_grad ()
        for name, p in model.named_parameters () do
            if not (trained.Contains name) && p.numel () > 0L then
                p.set_(torch.empty([| yield 0L; yield! p.shape[1..] |], dtype = p.dtype, device = p.device)) |> ignore

    /// Makes every stage's model whole (also after release): each parameter takes the value of the stage
    /// that owns it (an all-reduce of the owner's value and the others' zeros, exact). Every stage calls it.
    let gather (group: ICommunicator) (model: CausalLmHead) (stage: PipelineStage) : unit =
        let trained = Set.ofList stage.Trained
        use _ = torch.no_grad ()
        for name, p in model.named_parameters () do
            let value =
                if stage.Owned.Contains name then p.detach().contiguous().clone ()
                else torch.zeros(stage.Shapes[name], dtype = p.dtype, device = p.device)
            group.AllReduce value
            // A trained parameter aliases the trainer's flat buffer: its memory stays, its values are copied.
            if trained.Contains name then
                p.copy_ value |> ignore
                value.Dispose()
            else p.set_ value |> ignore

    /// The optimizer tensors of one process's checkpoint (TrainingCheckpoint.optimizerTensors' layout:
    /// "PARAMETER:STATE" and counters) from a stage's (of its Trained parameters): every parameter's state
    /// from the stage that owns it. Every stage calls it.
    let gatherOptimizerTensors (group: ICommunicator) (model: CausalLmHead) (stage: PipelineStage) (tensors: (string * torch.Tensor) list) : (string * torch.Tensor) list =
        let local = Map tensors
        let states = [ for key, _ in tensors do match key.IndexOf ':' with -1 -> () | colon -> yield key.Substring(colon + 1) ] |> List.distinct
        [ for key, t in tensors do if key.IndexOf ':' < 0 then yield key, t
          for name, p in model.named_parameters () do
              for state in states ->
                  let key = name + ":" + state
                  let value =
                      match local.TryFind key with
                      | Some t when stage.Owned.Contains name -> t.detach().contiguous().clone ()
                      | _ -> torch.zeros(stage.Shapes[name], dtype = torch.float32)
                  group.AllReduce value
                  key, value ]

/// A self-check of PipelineTraining for `mpirun -np N`: a small LLaMA (untied, and tied) trained for 4
/// optimizer steps of 4 accumulated micro-batches (AdamW with weight decay, clipping at 1.0) as an N-stage
/// pipeline, and the same training of the whole model in each process: every step's loss and gradient
/// norm, and the final weights (joined), must agree within 1e-5 relative.
[<RequireQualifiedAccess>]
module PipelineTrainingCheck =

    let private checkVariant (group: ISplittableCommunicator) (tied: bool) : string list * float =
        use _ = torch.NewDisposeScope()
        let json =
            sprintf
                """{"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": %d,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
                    "tie_word_embeddings": %b, "initializer_range": 0.2}"""
                (2 * group.Size + 1) tied
        let config =
            match ModelConfig.parse "pipeline training check" json with
            | ModelConfig.Llama c -> c
            | other -> failwithf "expected a LLaMA config, got %A" other
        let rng = Random 23
        let rows = Array.init 32 (fun _ -> Array.init (4 + rng.Next 9) (fun _ -> int64 (rng.Next config.VocabSize)))
        let dataset = TokenizedDataset.ofRows "pipeline check" rows
        let options =
            { TrainOptions.defaults with
                PerDeviceTrainBatchSize = 2
                GradientAccumulationSteps = 4
                LearningRate = 1e-2
                WeightDecay = 0.01
                MaxGradNorm = 1.0
                MaxSteps = 4
                MaxSeqLen = 16
                SaveStrategy = IntervalStrategy.No
                Threads = 1 }
        let plan = TrainingLoop.plan options rows.Length
        let train (run: TrainRun) =
            let logs = Collections.Generic.List<StepLog>()
            TrainingLoop.run run None { OnLog = logs.Add; AfterStep = fun _ -> StepDecision.Continue } |> ignore
            List.ofSeq logs
        let whole = Llama.build config 29L
        let wholeLogs = train (TrainingLoop.setup plan (CausalLm.ofModule (ModelConfig.Llama config) whole []) dataset)
        let model = Llama.build config 29L
        let stage = PipelineTraining.stageOf model group.Size group.Rank
        let parameters = dict [ for name, p in model.named_parameters () -> name, p ]
        PipelineTraining.release model stage
        let p2p = group :?> IPointToPoint
        let stageLogs =
            train
                { TrainingLoop.setup plan (CausalLm.ofModule (ModelConfig.Llama config) model []) dataset with
                    Parameters = [ for name in stage.Trained -> struct (name, parameters[name]) ]
                    ModelParallel = Some(PipelineTraining.hooks p2p model stage (PipelineTraining.causalLmLoss 0 model)) }
        PipelineTraining.gather group model stage
        let relative (a: float) (b: float) = abs (a - b) / max 1e-12 (abs b)
        let stepDifferences =
            [ for w, p in List.zip wholeLogs stageLogs do
                  yield sprintf "step %d loss" w.Step, relative p.Loss w.Loss
                  yield sprintf "step %d grad norm" w.Step, relative p.GradNorm w.GradNorm ]
        let wholeValues = dict [ for name, p in whole.named_parameters () -> name, p.detach () ]
        let weightDifferences =
            [ for name, p in model.named_parameters () ->
                  use d = (p.detach () - wholeValues[name]).abs().max ()
                  use m = wholeValues[name].abs().max ()
                  sprintf "final %s" name, float (d.item<float32> ()) / max 1e-12 (float (m.item<float32> ())) ]
        let checks = ("steps logged", if wholeLogs.Length = 4 && stageLogs.Length = 4 then 0.0 else 1.0) :: stepDifferences @ weightDifferences
        [ for what, d in checks do if not (d <= 1e-5) then yield sprintf "%s %s differs by %g" (if tied then "tied" else "untied") what d ],
        checks |> List.map snd |> List.max

    /// Runs the check over group (every process of it a stage); returns (passed, line).
    let check (group: ISplittableCommunicator) : bool * string =
        TorchRuntime.ensure ()
        let results = [ for tied in [ false; true ] -> checkVariant group tied ]
        let failures = results |> List.collect fst
        let largest = results |> List.map snd |> List.max
        let status =
            if failures.IsEmpty then
                sprintf "ok (LLaMA untied and tied, 4 steps of 4 micro-batches 1F1B over %d stages: every step's loss and gradient norm and the final weights within %.1e of one process, relative)" group.Size largest
            else "FAILED: " + String.Join("; ", failures)
        failures.IsEmpty, sprintf "pipeline-training-check rank %d of %d: %s" group.Rank group.Size status

    /// Runs check over this launch's processes as the stages of one pipeline; prints, finalizes MPI and
    /// returns 0 when it passed, 1 otherwise.
    let run () : int =
        let world = Communicator.fromEnvironment ()
        let result =
            match world with
            | :? ISplittableCommunicator as splittable when world.Size > 1 -> check (ProcessGrid.groups splittable 1 world.Size).Pipeline
            | _ -> false, sprintf "pipeline-training-check rank %d of %d: FAILED: a pipeline needs at least 2 processes that can be split" world.Rank world.Size
        Communicator.finishCheck world result
