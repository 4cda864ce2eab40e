namespace Functional.Training

open System
open TorchSharp
open Functional
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Runtime

/// Training a LLaMA-family model split over a tensor-parallel group (TensorParallelLlama) with
/// TrainingLoop: the vocabulary-parallel loss, the partial gradients summed after the window, and the clip
/// norm of the whole model (the split parameters' squares summed over the group, the whole ones once).
/// The run's Communicator stays the data-parallel group (one process here: every rank of the group reads
/// every row). Not yet with packing, chunked loss, ZeRO, LoRA or mixed precision.
[<RequireQualifiedAccess>]
module TensorParallelTraining =

    /// Causal language modelling of a rank's part: VocabParallel.causalLmSum of its logits block.
    let objective (group: ICommunicator) (start: int64) : Objective =
        { Objective.causalLm with
            LossSum =
                fun model batch ->
                    if batch.Packed.IsSome then
                        InvalidInput.setting "tensor_parallel_degree" "is not supported with --packing yet"
                    use logits = model.Module.forward batch.InputIds // (B, T, V / size)
                    VocabParallel.causalLmSum group start logits batch.Labels }

    /// The squared norm of the whole model's gradient from a rank's squared norm: the squares of its whole
    /// (replicated) parameters' gradients are the same on every rank, so they are taken out of the sum over
    /// the group and counted once.
    /// A key/value projection replicated over the ranks that share its head (fewer key/value heads than
    /// ranks) counts once per head: its squares weigh 1 / replicas in the sum (TensorParallelLlama.normWeight).
    let rec normReduction (group: ICommunicator) (config: LlamaConfig) (part: CausalLmHead) : Optim.NormReduction =
        normReductionWith group config [ for name, p in part.named_parameters () -> name, p ]

    /// normReduction over the given parameters (a part's, and the LoRA factors on it, by PEFT key): each
    /// one's squares weigh TensorParallelLlama.normWeight (1 for a block, 1 / its copies for a replica) in
    /// the sum over the group.
    and normReductionWith (group: ICommunicator) (config: LlamaConfig) (parameters: (string * TorchSharp.Modules.Parameter) list) : Optim.NormReduction =
        let squares (p: TorchSharp.Modules.Parameter) =
            if isNull p.grad then 0.0
            else
                use s = p.grad.to_type(torch.float64).square().sum ()
                s.item<float> ()
        let weighted =
            [ for name, p in parameters do
                  let weight = TensorParallelLlama.normWeight config group.Size name
                  if weight < 1.0 then yield weight, p ]
        fun squared ->
            let excess = weighted |> List.sumBy (fun (weight, p) -> (1.0 - weight) * squares p)
            Communicator.sumFloat group (squared - excess)

    /// The run of a rank's part (TensorParallelLlama.shard of the whole model of config) on dataset as
    /// planned: TrainingLoop.setup with the vocabulary-parallel objective and the model-parallel hooks.
    let setup (plan: LoopPlan) (group: ICommunicator) (config: LlamaConfig) (part: CausalLmHead) (dataset: TokenizedDataset) : TrainRun =
        if plan.Options.LossChunkSize > 0 then
            InvalidInput.setting "tensor_parallel_degree" "is not supported with --loss-chunk-size yet (the vocabulary-parallel loss needs no full logits anyway)"
        if plan.Options.Precision <> Precision.Fp32 then
            InvalidInput.setting "tensor_parallel_degree" "is not supported with --bf16 or --fp16 yet"
        let model = CausalLm.ofModule (ModelConfig.Llama config) part []
        let start = TensorParallelLlama.vocabStart config group.Rank group.Size
        { TrainingLoop.setup plan model dataset with
            Objective = objective group start
            ModelParallel =
                Some
                    { ReduceGradients = fun () -> TensorParallelLlama.reducePartialGradients group config part
                      NormReduction = normReduction group config part
                      RunWindow = None } }

/// A self-check of TensorParallelTraining for `mpirun -np N`: a small LLaMA and a small Qwen3 trained for
/// 4 optimizer steps of 2 accumulated micro-batches (AdamW with weight decay, clipping at 1.0) split over
/// all N processes, and the same training of the whole model in each process: every step's loss and
/// gradient norm, and the final weights (gathered), must agree within 1e-5 relative.
[<RequireQualifiedAccess>]
module TensorParallelTrainingCheck =

    let private configOf (modelType: string) (kvHeads: int) (size: int) =
        let json =
            sprintf
                """{"model_type": "%s", "vocab_size": %d, "hidden_size": 16, "intermediate_size": %d, "num_hidden_layers": 2,
                    "num_attention_heads": %d, "num_key_value_heads": %d, "head_dim": 4, "max_position_embeddings": 32,
                    "tie_word_embeddings": false, "initializer_range": 0.2}"""
                modelType (10 * size) (12 * size) (2 * size) kvHeads
        match ModelConfig.parse "tensor-parallel training check" json with
        | ModelConfig.Llama c -> c
        | other -> failwithf "expected a LLaMA-family config, got %A" other

    let private checkVariant (group: ICommunicator) (modelType: string, kvHeads: int) : string list * float =
        use _ = torch.NewDisposeScope()
        let config = configOf modelType (if kvHeads = 0 then group.Size else kvHeads) group.Size
        let modelType = if kvHeads = 0 then modelType else sprintf "%s (%d key/value head)" modelType kvHeads
        let rng = Random 17
        let rows = Array.init 16 (fun _ -> Array.init (4 + rng.Next 6) (fun _ -> int64 (rng.Next config.VocabSize)))
        let dataset = TokenizedDataset.ofRows "tensor-parallel check" rows
        let options =
            { TrainOptions.defaults with
                PerDeviceTrainBatchSize = 2
                GradientAccumulationSteps = 2
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
        let whole = Llama.build config 21L
        let part = TensorParallelLlama.shard group config whole
        let wholeLogs = train (TrainingLoop.setup plan (CausalLm.ofModule (ModelConfig.Llama config) whole []) dataset)
        let partLogs = train (TensorParallelTraining.setup plan group config part dataset)
        let relative (a: float) (b: float) = abs (a - b) / max 1e-12 (abs b)
        let stepDifferences =
            [ for w, p in List.zip wholeLogs partLogs do
                  yield sprintf "step %d loss" w.Step, relative p.Loss w.Loss
                  yield sprintf "step %d grad norm" w.Step, relative p.GradNorm w.GradNorm ]
        let wholeValues = dict [ for name, p in whole.named_parameters () -> name, p.detach () ]
        let weightDifferences =
            [ for name, t in TensorParallelLlama.gather group config part ->
                  use d = (t - wholeValues[name]).abs().max ()
                  use m = wholeValues[name].abs().max ()
                  sprintf "final %s" name, float (d.item<float32> ()) / max 1e-12 (float (m.item<float32> ())) ]
        let checks = ("steps logged", if wholeLogs.Length = 4 && partLogs.Length = 4 then 0.0 else 1.0) :: stepDifferences @ weightDifferences
        [ for what, d in checks do if not (d <= 1e-5) then yield sprintf "%s %s differs by %g" modelType what d ],
        checks |> List.map snd |> List.max

    /// Runs the check over group (every process of it calls this); returns (passed, line).
    let check (group: ICommunicator) : bool * string =
        TorchRuntime.ensure ()
        // 0 key/value heads: as many as the processes; 1: fewer than the processes, replicated.
        let results = [ for variant in [ "llama", 0; "qwen3", 0; "llama", 1 ] -> checkVariant group variant ]
        let failures = results |> List.collect fst
        let largest = results |> List.map snd |> List.max
        let status =
            if failures.IsEmpty then
                sprintf "ok (LLaMA, Qwen3 and a LLaMA of 1 key/value head, 4 steps of 2 micro-batches split over %d processes: every step's loss and gradient norm and the final weights within %.1e of one process, relative)" group.Size largest
            else "FAILED: " + String.Join("; ", failures)
        failures.IsEmpty, sprintf "tensor-parallel-training-check rank %d of %d: %s" group.Rank group.Size status

    /// Runs check over this launch's processes as one tensor-parallel group; prints, finalizes MPI and
    /// returns 0 when it passed, 1 otherwise.
    let run () : int =
        let world = Communicator.fromEnvironment ()
        let result =
            match world with
            | :? ISplittableCommunicator as splittable -> check (ProcessGrid.groups splittable world.Size 1).Tensor
            | _ -> false, sprintf "tensor-parallel-training-check rank %d of %d: FAILED: the communicator cannot be split" world.Rank world.Size
        Communicator.finishCheck world result
