namespace Functional.Training

open System
open System.Diagnostics
open System.IO
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Distributed
open Functional.Generation
open Functional.Models
open Functional.Peft
open Functional.Runtime
open Functional.Text
open TorchSharp

/// A fine-tuning job with everything checked and loaded and nothing written yet: what Job.run trains.
[<NoComparison; NoEquality>]
type PreparedJob =
    { /// The request as given.
      Request: FineTuneRequest
      /// The request's options with MaxSeqLen resolved (the model's context when it was 0).
      Options: TrainOptions
      /// The base model (its weights restored when resuming).
      Model: CausalLm
      /// The model folder's config.json text, written again into checkpoints and final/.
      SourceConfig: string
      /// The tokenizer of the data and of exact-match scoring.
      Tokenizer: TextTokenizer
      /// The model folder's tokenizer files, copied into checkpoints and final/.
      TokenizerCopies: string list
      /// Training and evaluation rows, evaluation samples, skipped rows.
      Data: TrainAndEval
      /// Steps, accumulation and schedule.
      Plan: LoopPlan
      /// What training minimizes (the request's task: Objective.causalLm by default).
      Objective: Objective
      /// The evaluation of a model on a dataset of the job (the task's loss and metrics).
      Evaluate: CausalLm -> TokenizedDataset -> EvalResult
      /// The adapters (at most one kind), attached.
      Adapters: Adapter list
      /// What trains, evaluates and generates: the model behind its prefix when there is one.
      Trained: CausalLm
      /// The trained parameters, in the optimizer's order.
      Trainable: (string * TorchSharp.Modules.Parameter) list
      /// Each trained parameter's peak learning rate.
      LearningRate: string -> float
      /// What a resume must match.
      Signature: SignatureEntry list
      /// The checkpoint resumed from.
      Restored: RestoredCheckpoint option
      /// The step this process starts from.
      StartStep: int
      /// HF's floating_point_ops per input token.
      FlopsPerInputToken: float
      /// The evaluate, save, rotate and early-stop settings.
      Policy: PolicySettings
      /// True for the one process that writes files, logs and reports (rank 0).
      IsMainProcess: bool
      /// The processes of the run (one, or those of mpirun).
      Communicator: ICommunicator
      /// Under tensor or pipeline parallelism (DistributedSettings.TensorParallelDegree or
      /// PipelineParallelDegree > 1), this process's groups and hooks; None when every process trains the
      /// whole model.
      ModelParallel: ModelParallelJob option
      /// Started when the job was.
      Clock: Stopwatch }

/// What a tensor- or pipeline-parallel job adds. Tensor parallel: Trained is this process's part
/// (TensorParallelLlama.shard) and Model the whole model. Pipeline parallel: Trained is Model, of which
/// this process trains its stage's parameters (PipelineTraining). Either way Gather refreshes Model from
/// every process before a checkpoint or final/ is written, so both are in one process's layout.
and [<NoComparison; NoEquality>] ModelParallelJob =
    { /// The process grid's groups (the data group trains as the run's communicator).
      Groups: ParallelGroups
      /// The trainer's hooks (partial gradients, clip norm, the pipeline's window).
      Hooks: ModelParallelHooks
      /// Makes Model whole from every process's part (every process calls it: it all-gathers).
      Gather: unit -> unit
      /// Frees the memory of what of Model this process does not train (the whole model's copy under
      /// tensor parallelism, the other stages' parameters under pipeline parallelism) until the next Gather.
      Release: unit -> unit
      /// The whole model's optimizer tensors (TrainingCheckpoint.optimizerTensors' layout) from this
      /// process's (every process calls it).
      GatherOptimizer: (string * torch.Tensor) list -> (string * torch.Tensor) list
      /// This process's part of a checkpoint's whole optimizer tensors.
      OptimizerPart: Map<string, torch.Tensor> -> Map<string, torch.Tensor>
      /// After Model was loaded from a checkpoint: copies this process's blocks of it into its part.
      Scatter: unit -> unit
      /// Before an evaluation during training: what makes Trained evaluable (the pipeline joins the
      /// stages' parameters, every process evaluates the whole model; nothing under tensor parallelism,
      /// whose parts evaluate with the vocabulary-parallel loss).
      BeforeEvaluation: unit -> unit }

/// A fine-tuning job as a pipeline: prepare (check and load everything, write nothing), then run (train,
/// evaluate, save).
[<RequireQualifiedAccess>]
module Job =

    open JobChecks

    /// Exact-match accuracy of greedy answers to the first `count` samples: the generated text, trimmed,
    /// equals the reference answer, trimmed.
    let exactMatch (model: CausalLm) (tokenizer: TextTokenizer) (samples: Sample[]) (count: int) (maxNewTokens: int) =
        JobChecks.exactMatch model tokenizer samples count maxNewTokens

    let private metricOf (options: TrainOptions) (eval: EvalResult) =
        if metricName options = "eval_perplexity" then eval.Perplexity else eval.Loss

    // ---- prepare ----

    let private checkRequest (request: FineTuneRequest) =
        TrainOptions.validate request.Options
        checkPrefixCombinations request
        if request.ResumeFromCheckpoint.IsNone then checkOutputFolder request else checkWritable request.OutputPath
        match request.Options.LoggingDir with
        | Some folder when request.Options.ReportToTensorBoard -> checkWritable folder
        | _ -> ()

    let private loadData (request: FineTuneRequest) (options: TrainOptions) (model: CausalLm) tokenizer =
        let promptOptions = { request.Data.Prompt with MaxSeqLen = options.MaxSeqLen; Seed = options.Seed }
        let data =
            match request.Data.CachePath with
            | Some cache -> fst (DataCache.loadTrainAndEval cache request.DataPath request.Data.EvalDataPath promptOptions tokenizer)
            | None -> PromptDataset.loadTrainAndEval request.DataPath request.Data.EvalDataPath promptOptions tokenizer
        checkSettings request data.Eval.IsSome
        let vocabSize = ModelConfig.vocabSize model.Config
        TokenizedDataset.checkVocabulary vocabSize data.Train
        data.Eval |> Option.iter (TokenizedDataset.checkVocabulary vocabSize)
        data

    /// LoRA's adapter and its signature entry (version 1 text beside).
    let private loraAdapter (options: TrainOptions) (model: CausalLm) (lora: LoraSettings) =
        let adapters =
            match lora.AdapterPath with
            | Some path -> Lora.load path model
            | None -> Lora.wrap lora.Config model options.Seed
        // The chunked loss multiplies the final hidden states by the head's weight itself: an adapter's hook
        // on lm_head would not run.
        if options.LossChunkSize > 0 && adapters.Adapters |> List.exists (fun a -> a.ModuleName = "lm_head") then
            InvalidInput.setting "loss_chunk_size"
                "cannot be combined with a LoRA adapter on lm_head: the chunked loss computes the head's logits from its weight alone (leave lm_head out of {lora_target_modules}, or set {loss_chunk_size} 0)"
        let adapter = Lora.asAdapter adapters model lora.OnlyOptimizeLora lora.LearningRate options.LearningRate
        let rate = defaultArg lora.LearningRate options.LearningRate
        adapter, (adapter.Signature, sprintf "%A only=%b lr=%g" adapters.Config lora.OnlyOptimizeLora rate)

    let private prefixAdapter (options: TrainOptions) (model: CausalLm) (data: TrainAndEval) (settings: PrefixSettings) =
        let adapter =
            match settings.AdapterPath with
            | Some path ->
                let adapter = PrefixTuning.load path model
                if adapter.Config.NumVirtualTokens <> settings.NumPrefixTokens then
                    InvalidInput.setting "num_prefix_tokens"
                        (sprintf "is %d, but the prefix adapter %s has num_virtual_tokens = %d"
                            settings.NumPrefixTokens (Path.Combine(path, PrefixTuning.ConfigFileName)) adapter.Config.NumVirtualTokens)
                adapter
            | None -> PrefixTuning.create settings.NumPrefixTokens model options.Seed
        checkPrefixFits model adapter.Config.NumVirtualTokens options (data.Train :: Option.toList data.Eval)
        PrefixTuning.asAdapter adapter

    /// The request's adapters, attached (the base frozen where the adapter says so), and their signature.
    let private attachAdapters (request: FineTuneRequest) options model data =
        let lora = request.Lora |> Option.map (loraAdapter options model)
        let prefix = request.Prefix |> Option.map (prefixAdapter options model data)
        let adapters = (lora |> Option.map fst |> Option.toList) @ Option.toList prefix
        for a in adapters do if a.FreezesBase then Adapter.freezeBase model
        // What an adapter trains of the base model (a classifier's score, PEFT's modules_to_save) stays trainable.
        for a in adapters do for _, p in a.Parameters do p.requires_grad <- true
        adapters, TrainingCheckpoint.adapterSignature (lora |> Option.map snd) (prefix |> Option.map (fun p -> p.Signature))

    let private trainableParameters (model: CausalLm) (adapters: Adapter list) =
        let own = [ for struct (name, p) in model.Module.named_parameters () -> name, p ]
        let isOwn (p: TorchSharp.Modules.Parameter) = own |> List.exists (fun (_, q) -> obj.ReferenceEquals(p, q))
        [ if adapters |> List.forall (fun a -> not a.FreezesBase) then yield! own
          // A parameter of the model an adapter also trains (a classifier's score) appears once.
          for name, p in Adapter.parameters adapters do
              if adapters |> List.forall (fun a -> a.FreezesBase) || not (isOwn p) then yield name, p ]

    let private learningRates (options: TrainOptions) (adapters: Adapter list) =
        let rates = dict [ for a in adapters do for name, _ in a.Parameters -> name, defaultArg a.LearningRate options.LearningRate ]
        if rates.Values |> Seq.exists (fun r -> r <> options.LearningRate) && options.LearningRate = 0.0 then
            InvalidInput.setting "learning_rate" "must be > 0 when {lora_learning_rate} differs from it (the schedule scales both)"
        fun name -> match rates.TryGetValue name with | true, r -> r | _ -> options.LearningRate

    let private restore (request: FineTuneRequest) (observer: FineTuneEvents) model trainable (adapters: Adapter list) signature =
        request.ResumeFromCheckpoint
        |> Option.map (fun spec ->
            let skipped (folder: string) (problem: string) = observer.OnMessage(sprintf "skipped %s: %s" (Path.GetFileName folder) problem)
            let path = CheckpointFolder.resolveReporting request.OutputPath spec skipped
            let loadAdapters (folder: string) = for a in adapters do a.Load folder
            TrainingCheckpoint.restore path model (List.map fst trainable) loadAdapters signature)

    let private checkResume (options: TrainOptions) (plan: LoopPlan) (observer: FineTuneEvents) (restored: RestoredCheckpoint option) =
        let startStep = restored |> Option.map (fun r -> r.Resume.Accumulation.OptimizerStep) |> Option.defaultValue 0
        restored
        |> Option.iter (fun r ->
            if plan.TotalSteps < startStep then
                InvalidInput.failSetting (if options.MaxSteps > 0 then "{max_steps}" else "{num_train_epochs}")
                    (sprintf "makes a run of %d steps, but %s is at step %d: a resume may lengthen the run, not shorten it (give at least %d steps)"
                        plan.TotalSteps r.Path startStep startStep)
            observer.OnMessage(sprintf "resuming from %s (step %d of %d)" r.Path startStep plan.TotalSteps))
        startStep

    /// HF's floating_point_ops: 6 x the parameters outside embeddings x the input tokens.
    let private flopsPerInputToken (model: CausalLm) (adapters: Adapter list) =
        let embeddings =
            set [ for struct (name, m) in model.Module.named_modules () do
                      if m :? TorchSharp.Modules.Embedding then yield (if name = "" then "weight" else name + ".weight") ]
        let counted =
            [ for struct (name, p) in model.Module.named_parameters () do
                  if not (embeddings.Contains name) then yield name, p.numel ()
              for name, p in Adapter.parameters adapters -> name, p.numel () ]
            |> List.distinctBy fst
        6.0 * float (List.sumBy snd counted)

    let private policySettings (request: FineTuneRequest) (options: TrainOptions) (plan: LoopPlan) hasEval isMain =
        { EvalStrategy = TrainOptions.evalStrategy options
          EvalSteps = options.EvalSteps
          SaveStrategy = options.SaveStrategy
          SaveSteps = options.SaveSteps
          SaveTotalLimit = options.SaveTotalLimit
          Patience = options.EarlyStoppingPatience
          GreaterIsBetter = options.GreaterIsBetter |> Option.defaultValue (Rotation.defaultGreaterIsBetter (metricName options))
          TotalSteps = plan.TotalSteps
          HasEvalSet = hasEval
          IsMainProcess = isMain
          OutputFolder = Path.GetFullPath request.OutputPath }

    /// NumPrefixTokens 0 with a prefix adapter folder means the adapter's own size: read here, when the job
    /// is prepared, not when the request is made (a builder's Build reads no files).
    let private withAdapterPrefixSize (request: FineTuneRequest) =
        match request.Prefix with
        | Some({ AdapterPath = Some path; NumPrefixTokens = 0 } as prefix) ->
            { request with Prefix = Some { prefix with NumPrefixTokens = (PrefixTuning.loadConfig path).NumVirtualTokens } }
        | _ -> request

    /// Checks and loads everything a job needs, raising InvalidInputException before anything is written:
    /// options, output folder, model, tokenizer, data, adapters, learning rates and (when resuming) the
    /// checkpoint, whose weights, adapter values and signature it restores.
    /// A task other than causal language modelling takes no prefix (LoRA is PEFT's SEQ_CLS there), scores
    /// no generated answers and resizes no embeddings.
    let private checkTask (request: FineTuneRequest) =
        match request.Task with
        | TrainingTask.CausalLm -> ()
        | _ ->
            if request.Prefix.IsSome then InvalidInput.setting "prefix_tuning" "trains causal language models only; not with {task}"
            if request.Options.LossChunkSize > 0 then
                InvalidInput.setting "loss_chunk_size" "chunks the language-modelling head's cross-entropy of causal language models only; not with {task}"
            if request.Data.ExactMatchSamples > 0 then InvalidInput.setting "exact_match_samples" "scores generated answers of causal language models; not with {task}"
            match request.Task with
            | TrainingTask.SequenceClassification _ when request.Data.Prompt.DataSplit.IsSome ->
                InvalidInput.setting "data_split" "splits DeepSpeed-Chat's data among its three phases (step 2 is {task} reward-model); sequence classification is none of them"
            | _ -> ()
            if request.ModelHandling.ResizeTokenEmbeddingsToMultipleOf > 0 then
                InvalidInput.setting "resize_token_embeddings_to_multiple_of" "resizes a causal language model's embeddings and head; not with {task}"

    /// The model, options, tokenizer, data, objective, evaluation and task signature of the request's task.
    let private loadTask (request: FineTuneRequest) =
        let tokenizer = tokenizerFor request
        let handling = request.ModelHandling
        let adjust = if handling.DisableDropout then ModelFamily.withoutDropout else id
        let contextOptions (config: ModelConfig) prefixTokens =
            { request.Options with MaxSeqLen = TrainOptions.sequenceLength request.Options config prefixTokens }
        match request.Task with
        | TrainingTask.CausalLm ->
            let loaded = HfModelFolder.loadWith adjust request.ModelPath request.Options.Seed
            if (SequenceClassification.tryHead loaded).IsSome then
                InvalidInput.fail (Path.Combine(request.ModelPath, "config.json")) "architectures"
                    (sprintf "is %s, a sequence classifier: train it with {task} sequence-classification (or reward-model), or start from a causal LM" (SequenceClassification.architecture loaded.Config))
            // HF's resize_token_embeddings(len(tokenizer), pad_to_multiple_of): added tokens grow the embeddings.
            let model =
                let current = ModelConfig.vocabSize loaded.Config
                TokenEmbeddings.resize loaded (TokenEmbeddings.targetSize current tokenizer.VocabSize handling.ResizeTokenEmbeddingsToMultipleOf) request.Options.Seed
            let prefixTokens = request.Prefix |> Option.map (fun p -> p.NumPrefixTokens) |> Option.defaultValue 0
            // From here on MaxSeqLen is the row length of the run: the model's context when it was 0.
            let options = contextOptions model.Config prefixTokens
            let data = loadData request options model tokenizer
            // --loss-chunk-size: the chunked loss in training and evaluation alike (the same values, less memory).
            let objective = Objective.causalLmWith options.LossChunkSize
            let evaluate model eval = Evaluation.evaluateWith objective model eval options.PerDeviceEvalBatchSize options.MaxSeqLen TrainingLoop.PadId
            model, options, tokenizer, data, objective, evaluate, []
        | task ->
            let config = ModelConfig.load (Path.Combine(request.ModelPath, "config.json"))
            let options = contextOptions config 0
            let ratio = request.Data.Prompt.EvalSplitRatio
            let setup =
                match task with
                | TrainingTask.SequenceClassification c -> TaskJob.prepareClassification adjust request.ModelPath request.DataPath request.Data.EvalDataPath c options ratio tokenizer
                | TrainingTask.RewardModel r -> TaskJob.prepareReward adjust request.Data.Prompt.DataSplit request.ModelPath request.DataPath request.Data.EvalDataPath r options ratio tokenizer
                | TrainingTask.CausalLm -> invalidArg (nameof request) "handled above"
            checkSettings request setup.Data.Eval.IsSome
            setup.Model, options, tokenizer, setup.Data, setup.Objective, setup.Evaluate, setup.Signature

    /// Under --tensor-parallel-degree N > 1: the process grid's groups and hooks, this process's part of
    /// the whole model (TensorParallelLlama.shard) as the trained CausalLm, the parameters it trains (with
    /// --pipeline-parallel-degree above 1 too, those of its stage of the part: PipelineTraining), and the
    /// vocabulary-parallel objective and evaluation. What is not supported yet with it is refused, naming
    /// the setting: a task other than causal LM, a family other than LLaMA's, adapters,
    /// load_best_model_at_end, bf16/fp16, ZeRO, packing, the chunked loss, gradient checkpointing,
    /// exact-match scoring, and with pipelines tied embeddings. Checkpoints are those of one process (the
    /// whole model and optimizer state, gathered), so a run resumes on any layout.
    let private tensorParallelPart (request: FineTuneRequest) (options: TrainOptions) (world: ICommunicator) (model: CausalLm) (adapters: Adapter list) =
        let degree = request.Distributed.TensorParallelDegree
        if degree < 1 then InvalidInput.setting "tensor_parallel_degree" (sprintf "must be at least 1, got %d" degree)
        if degree = 1 then None
        else
            let refuse (what: string) = InvalidInput.setting "tensor_parallel_degree" (sprintf "is not supported with %s yet" what)
            let stages = request.Distributed.PipelineParallelDegree
            if stages < 1 then InvalidInput.setting "pipeline_parallel_degree" (sprintf "must be at least 1, got %d" stages)
            if request.Task <> TrainingTask.CausalLm then refuse "{task} other than causal-lm"
            if request.Prefix.IsSome then refuse "prefix tuning"
            match request.Lora with
            | Some lora when lora.Config.Dropout > 0.0 -> refuse "{lora_dropout} above 0 (the ranks would drop different elements of the inputs they share)"
            | Some lora when lora.AdapterPath.IsSome -> refuse "a LoRA adapter folder to start from"
            | Some _ when stages > 1 -> refuse "LoRA together with {pipeline_parallel_degree} above 1"
            | _ -> ()
            if options.LoadBestModelAtEnd then refuse "{load_best_model_at_end}"
            if options.Precision <> Precision.Fp32 then refuse "{bf16} or {fp16}"
            if request.Distributed.ZeroStage <> 0 then refuse "{zero_stage} above 0"
            if request.Data.Prompt.Packing then refuse "{packing}"
            if options.LossChunkSize > 0 then refuse "{loss_chunk_size}"
            if request.GradientCheckpointing then refuse "{gradient_checkpointing}"
            if request.Data.ExactMatchSamples > 0 then refuse "{exact_match_samples}"
            let config =
                match model.Config with
                | ModelConfig.Llama c -> c
                | _ -> refuse "this model family (LLaMA, Qwen2, Qwen3 and Mistral only)"
            let splittable =
                match world with
                | :? ISplittableCommunicator as s -> s
                | _ -> invalidArg (nameof world) "the run's communicator cannot be split into tensor-parallel groups"
            if stages > 1 && config.TieWordEmbeddings then
                InvalidInput.setting "pipeline_parallel_degree" "is not supported together with {tensor_parallel_degree} for tied embeddings (tie_word_embeddings) yet"
            let groups = ProcessGrid.groups splittable degree stages
            let whole = model.Module :?> CausalLmHead
            let part = TensorParallelLlama.shard groups.Tensor config whole
            let start = TensorParallelLlama.vocabStart config groups.Tensor.Rank groups.Tensor.Size
            let rank, size = groups.Tensor.Rank, groups.Tensor.Size
            let trained = CausalLm.ofModule model.Config part []
            // LoRA: the whole model's adapters (initialized as one process's) copied onto the part, each
            // factor narrowed to the rank's block (loraSplitDimension): B with a column-parallel projection's
            // rows, A with a row-parallel projection's columns, the other factor whole.
            let lora =
                match adapters with
                | [] -> None
                | [ adapter ] ->
                    let attached = adapter.AttachToCompute trained
                    let wholeFactors = dict adapter.Parameters
                    (use _ = torch.no_grad ()
                     for key, p in attached.Parameters do
                         p.set_(TensorParallelLlama.partOf config rank size key wholeFactors[key]) |> ignore)
                    if adapter.FreezesBase then for p in part.parameters () do p.requires_grad <- false
                    Some(adapter, attached, wholeFactors)
                | _ -> refuse "more than one adapter"
            let factors = lora |> Option.map (fun (_, attached, _) -> attached.Parameters) |> Option.defaultValue []
            let wholeFromParts () =
                let values = dict [ for name, p in whole.named_parameters () -> name, p ]
                use _ = torch.no_grad ()
                for name, t in TensorParallelLlama.gather groups.Tensor config part do
                    values[name].set_ t |> ignore
                    t.Dispose()
                match lora with
                | Some(_, attached, wholeFactors) ->
                    for key, p in attached.Parameters do
                        use joined = TensorParallelLlama.join groups.Tensor config key p
                        wholeFactors[key].copy_ joined |> ignore
                | None -> ()
            let releaseWhole () =
                use _ = torch.no_grad ()
                for _, p in whole.named_parameters () do
                    if p.numel () > 0L then p.set_(torch.empty([| yield 0L; yield! p.shape[1..] |], dtype = p.dtype, device = p.device)) |> ignore
            let tensorHooks =
                { ReduceGradients =
                    fun () ->
                        TensorParallelLlama.reducePartialGradients groups.Tensor config part
                        TensorParallelLlama.reduceLoraGradients groups.Tensor config factors
                  NormReduction = TensorParallelTraining.normReductionWith groups.Tensor config ([ for name, p in part.named_parameters () -> name, p ] @ factors)
                  RunWindow = None }
            let job =
                { Groups = groups
                  Hooks = tensorHooks
                  Gather = wholeFromParts
                  Release = releaseWhole
                  GatherOptimizer = TensorParallelLlama.gatherOptimizerTensors groups.Tensor config
                  OptimizerPart = TensorParallelLlama.optimizerBlocks config groups.Tensor.Rank groups.Tensor.Size
                  Scatter =
                    fun () ->
                        TensorParallelLlama.copyInto groups.Tensor config whole part
                        match lora with
                        | Some(_, attached, wholeFactors) ->
                            use _ = torch.no_grad ()
                            for key, p in attached.Parameters do
                                use block = TensorParallelLlama.partOf config rank size key wholeFactors[key]
                                p.copy_ block |> ignore
                        | None -> ()
                  BeforeEvaluation = ignore }
            let objective = TensorParallelTraining.objective groups.Tensor start
            let evaluate model eval = Evaluation.evaluateWith objective model eval options.PerDeviceEvalBatchSize options.MaxSeqLen TrainingLoop.PadId
            let partParameters = [ for name, p in part.named_parameters () -> name, p ]
            if stages = 1 then
                let trainable =
                    match lora with
                    | Some(adapter, attached, _) -> (if adapter.FreezesBase then [] else partParameters) @ attached.Parameters
                    | None -> partParameters
                Some(job, trained, trainable, Some(objective, evaluate))
            else
                // Tensor and pipeline parallel: this process trains its stage of its tensor part. The
                // stages' hidden states are whole on every rank of a tensor group (after g), so each rank
                // exchanges them with the same tensor rank of the neighbouring stages.
                let pipeline =
                    match groups.Pipeline with
                    | :? IPointToPoint as p -> p
                    | _ -> invalidArg (nameof world) "the run's communicator cannot send point to point between stages"
                let stage = PipelineTraining.stageOf part stages groups.Pipeline.Rank
                let loss (hidden: torch.Tensor) (batch: MicroBatch) =
                    use logits = torch.nn.functional.linear(part.HeadInput hidden, part.HeadWeight) // (B, T, V / N)
                    VocabParallel.causalLmSum groups.Tensor start logits batch.Labels
                let pipelineHooks = PipelineTraining.hooks pipeline part stage loss
                let joinStages () = PipelineTraining.gather groups.Pipeline part stage
                let parameters = dict [ for name, p in part.named_parameters () -> name, p ]
                Some(
                    { job with
                        Hooks =
                            { ReduceGradients = fun () -> tensorHooks.ReduceGradients(); pipelineHooks.ReduceGradients()
                              NormReduction = fun squared -> pipelineHooks.NormReduction(tensorHooks.NormReduction squared)
                              RunWindow = pipelineHooks.RunWindow }
                        Gather = fun () -> joinStages (); wholeFromParts ()
                        Release = fun () -> releaseWhole (); PipelineTraining.release part stage
                        GatherOptimizer =
                            fun tensors ->
                                TensorParallelLlama.gatherOptimizerTensors groups.Tensor config (PipelineTraining.gatherOptimizerTensors groups.Pipeline part stage tensors)
                        BeforeEvaluation = joinStages },
                    trained,
                    [ for name in stage.Trained -> name, parameters[name] ],
                    Some(objective, evaluate)
                )

    /// Under --pipeline-parallel-degree N > 1: the process grid's groups, and the parameters of this
    /// process's stage (PipelineTraining.stageOf) of the whole model, which every process holds and which
    /// trains (tensorParallelPart handles --tensor-parallel-degree above 1 with pipelines). Refused, naming
    /// the setting, as under tensor parallelism. Checkpoints are those of one process (the stages'
    /// parameters and optimizer state joined), so a run resumes on any layout.
    let private pipelineParallelPart (request: FineTuneRequest) (options: TrainOptions) (world: ICommunicator) (model: CausalLm) =
        let degree = request.Distributed.PipelineParallelDegree
        if degree < 1 then InvalidInput.setting "pipeline_parallel_degree" (sprintf "must be at least 1, got %d" degree)
        if degree = 1 then None
        else
            let refuse (what: string) = InvalidInput.setting "pipeline_parallel_degree" (sprintf "is not supported with %s yet" what)
            if request.Task <> TrainingTask.CausalLm then refuse "{task} other than causal-lm"
            if request.Lora.IsSome || request.Prefix.IsSome then refuse "LoRA or prefix tuning"
            if options.LoadBestModelAtEnd then refuse "{load_best_model_at_end}"
            if options.Precision <> Precision.Fp32 then refuse "{bf16} or {fp16}"
            if request.Distributed.ZeroStage <> 0 then refuse "{zero_stage} above 0"
            if request.Data.Prompt.Packing then refuse "{packing}"
            if request.GradientCheckpointing then refuse "{gradient_checkpointing}"
            if request.Data.ExactMatchSamples > 0 then refuse "{exact_match_samples}"
            if not (model.Module :? CausalLmHead) then refuse "this model (a causal LM of one of the families is needed)"
            let splittable =
                match world with
                | :? ISplittableCommunicator as s -> s
                | _ -> invalidArg (nameof world) "the run's communicator cannot be split into pipeline groups"
            let groups = ProcessGrid.groups splittable 1 degree
            let pipeline =
                match groups.Pipeline with
                | :? IPointToPoint as p -> p
                | _ -> invalidArg (nameof world) "the run's communicator cannot send point to point between stages"
            let head = model.Module :?> CausalLmHead
            let stage = PipelineTraining.stageOf head degree groups.Pipeline.Rank
            let gather () = PipelineTraining.gather groups.Pipeline head stage
            let job =
                { Groups = groups
                  Hooks = PipelineTraining.hooks pipeline head stage (PipelineTraining.causalLmLoss options.LossChunkSize head)
                  Gather = gather
                  Release = fun () -> PipelineTraining.release head stage
                  GatherOptimizer = PipelineTraining.gatherOptimizerTensors groups.Pipeline head stage
                  OptimizerPart = id
                  Scatter = ignore
                  BeforeEvaluation = gather }
            let parameters = dict [ for name, p in head.named_parameters () -> name, p ]
            Some(job, model, [ for name in stage.Trained -> name, parameters[name] ], None)

    /// The events of a process other than the main one: it reports nothing (rank 0 speaks for the run).
    let private quiet: FineTuneEvents = { OnStep = ignore; OnEvaluation = (fun _ _ -> ()); OnMessage = ignore }

    let prepare (request: FineTuneRequest) (observer: FineTuneEvents) : PreparedJob =
        let clock = Stopwatch.StartNew()
        let request = withAdapterPrefixSize request
        checkRequest request
        checkTask request
        ZeroStage.validate request.Distributed.ZeroStage
        CollectiveBuckets.validate request.Distributed.Buckets
        let communicator = request.Distributed.Communicator |> Option.defaultWith Communicator.fromEnvironment
        let model, options, tokenizer, data, objective, evaluate, taskSignature = loadTask request
        let adapters, adapterSignature = attachAdapters request options model data
        let modelParallel =
            match tensorParallelPart request options communicator model adapters with
            | Some part -> Some part
            | None -> pipelineParallelPart request options communicator model
        let dataProcesses = modelParallel |> Option.map (fun (t, _, _, _) -> t.Groups.Data.Size) |> Option.defaultValue communicator.Size
        let objective, evaluate =
            match modelParallel with
            | Some(_, _, _, Some(objective, evaluate)) -> objective, evaluate
            | _ -> objective, evaluate
        let plan = TrainingLoop.planFor dataProcesses options data.Train.Rows.Length
        let trained =
            match modelParallel with
            | Some(_, part, _, _) -> part
            | None -> adapters |> List.tryLast |> Option.map (fun a -> a.Model) |> Option.defaultValue model
        CausalLm.setGradientCheckpointing model request.GradientCheckpointing
        let trainable =
            match modelParallel with
            | Some(_, _, parameters, _) -> parameters
            | None -> trainableParameters model adapters
        let learningRate = learningRates options adapters
        let signature = TrainingCheckpoint.signatureFor dataProcesses plan model data.Train @ adapterSignature @ taskSignature
        let isMain = communicator.Rank = 0
        let observer = if isMain then observer else quiet
        let restored =
            match modelParallel with
            | Some(t, _, _, _) ->
                // A whole checkpoint (any layout's): the whole model, then this process's blocks of it and of
                // the optimizer state.
                let restored =
                    request.ResumeFromCheckpoint
                    |> Option.map (fun spec ->
                        let skipped (folder: string) (problem: string) = observer.OnMessage(sprintf "skipped %s: %s" (Path.GetFileName folder) problem)
                        let path = CheckpointFolder.resolveReporting request.OutputPath spec skipped
                        let loadAdapters (folder: string) = for a in adapters do a.Load folder
                        TrainingCheckpoint.restoreWith t.OptimizerPart path model (List.map fst trainable) loadAdapters signature)
                if restored.IsSome then t.Scatter()
                restored
            | None -> restore request observer model trainable adapters signature
        let startStep = checkResume options plan observer restored
        // A resumed reduce_lr_on_plateau goes on from the state its checkpoint stored.
        match restored, plan.Plateau with
        | Some r, Some plateau -> r.Record.Plateau |> Option.iter (fun state -> plateau.State <- state)
        | _ -> ()
        // Every process has checked everything before any writes (a process that failed has ended the run).
        communicator.Barrier()
        { Request = request
          Options = options
          Model = model
          SourceConfig = File.ReadAllText(Path.Combine(request.ModelPath, "config.json"))
          Tokenizer = tokenizer
          TokenizerCopies =
            if request.Data.TokenizerName.IsSome then []
            else tokenizerFiles |> List.map (fun f -> Path.Combine(request.ModelPath, f)) |> List.filter File.Exists
          Data = data
          Plan = plan
          Objective = objective
          Evaluate = evaluate
          Adapters = adapters
          Trained = trained
          Trainable = trainable
          LearningRate = learningRate
          Signature = signature
          Restored = restored
          StartStep = startStep
          FlopsPerInputToken = flopsPerInputToken model adapters
          Policy = policySettings request options plan data.Eval.IsSome isMain
          IsMainProcess = isMain
          Communicator = communicator
          ModelParallel = modelParallel |> Option.map (fun (t, _, _, _) -> t)
          Clock = clock }

    // ---- run ----

    /// What a run carries from step to step: the policy's state and the counters checkpoints record.
    [<NoComparison; NoEquality>]
    type private Progress =
        { Policy: PolicyState
          LastEval: (int * EvalResult) option
          TrainLoss: float * int
          InputTokensSeen: int64
          StoppedEarly: bool
          Interrupted: bool }

    let private startProgress (job: PreparedJob) =
        let record = job.Restored |> Option.map (fun r -> r.Record)
        { Policy =
            { CheckpointPolicy.start with
                Best = record |> Option.bind (fun r -> r.Best)
                EarlyStoppingCounter = record |> Option.map (fun r -> fst r.EarlyStopping) |> Option.defaultValue 0
                EarlyStoppingBest = record |> Option.bind (fun r -> snd r.EarlyStopping) }
          LastEval = None
          TrainLoss = record |> Option.map (fun r -> r.TrainLoss) |> Option.defaultValue (0.0, 0)
          InputTokensSeen = record |> Option.map (fun r -> r.InputTokensSeen) |> Option.defaultValue 0L
          StoppedEarly = false
          Interrupted = false }

    let private savedTokensAndFlos (job: PreparedJob) =
        job.Restored |> Option.map (fun r -> r.Record.InputTokensSeen, r.Record.TotalFlos) |> Option.defaultValue (0L, 0.0)

    let private totalFlos (job: PreparedJob) (progress: Progress) =
        let tokens, flos = savedTokensAndFlos job
        flos + job.FlopsPerInputToken * float (progress.InputTokensSeen - tokens)

    let private evaluate (job: PreparedJob) eval = job.Evaluate job.Trained eval

    /// The evaluation figures of the model now: eval is the evaluation loss, computed by the caller.
    let private figures (job: PreparedJob) (eval: EvalResult) =
        { Eval = eval
          ExactMatch =
            if job.Request.Data.ExactMatchSamples > 0 then
                exactMatch job.Trained job.Tokenizer job.Data.EvalSamples job.Request.Data.ExactMatchSamples job.Request.Data.ExactMatchMaxNewTokens
            else None }

    let private logEval (log: RunLogWriter) (observer: FineTuneEvents) step (f: EvalFigures) =
        log.Eval { Step = step; Loss = f.Eval.Loss; Perplexity = f.Eval.Perplexity; ExactMatch = f.ExactMatch; Metrics = f.Eval.Metrics }
        observer.OnEvaluation step f

    /// The evaluation before training: evaluated now, or (resuming) read from the history.
    let private evaluateBefore (job: PreparedJob) (log: RunLogWriter) observer =
        match job.Restored, job.Data.Eval with
        | Some _, _ ->
            RunLog.before log.History
            |> Option.map (fun e -> { Eval = { Loss = e.Loss; Perplexity = e.Perplexity; Tokens = 0L; Metrics = e.Metrics }; ExactMatch = e.ExactMatch })
        | None, Some eval ->
            let f = figures job (evaluate job eval)
            logEval log observer 0 f
            Some f
        | None, None -> None

    let private publish (job: PreparedJob) (path: string) =
        let published = Path.GetFullPath(job.Request.PublishedOutputPath |> Option.defaultValue job.Request.OutputPath)
        Path.Combine(published, Path.GetRelativePath(Path.GetFullPath job.Request.OutputPath, path))

    let private saveCheckpoint (job: PreparedJob) (log: RunLogWriter) (progress: Progress) (context: StepContext) =
        let record =
            { History = log.History |> List.map RunLog.toJson
              Best = progress.Policy.Best |> Option.map (fun (value, path) -> value, publish job path)
              EarlyStopping = progress.Policy.EarlyStoppingCounter, progress.Policy.EarlyStoppingBest
              InputTokensSeen = progress.InputTokensSeen
              TotalFlos = totalFlos job progress
              TrainLoss = progress.TrainLoss
              Plateau = job.Plan.Plateau |> Option.map (fun p -> p.State) }
        let adapterWriters =
            if job.Adapters.IsEmpty then []
            else [ PeftFolder.ConfigFileName, (fun (path: string) -> for a in job.Adapters do a.Save (Path.GetDirectoryName path) (Some job.Request.ModelPath)) ]
        let output = job.Request.OutputPath
        match job.ModelParallel with
        | Some t ->
            // The checkpoint of one process: the whole model and the whole optimizer state, gathered from
            // the parts on every process; process 0 of the world writes it.
            t.Gather()
            let tensors = t.GatherOptimizer(TrainingCheckpoint.optimizerTensors context.Parameters context.OptimizerState)
            let whole = { context with Communicator = job.Communicator }
            TrainingCheckpoint.saveWith (Some tensors) output job.Plan job.Model (Some job.SourceConfig) job.TokenizerCopies job.Signature adapterWriters whole record |> ignore
        | None ->
            TrainingCheckpoint.save output job.Plan job.Model (Some job.SourceConfig) job.TokenizerCopies job.Signature adapterWriters context record |> ignore
        for victim in CheckpointPolicy.toRotate job.Policy progress.Policy (CheckpointFolder.list output) do
            CheckpointFolder.delete victim

    /// One finished step: counters, evaluation, the policy's decision, the checkpoint it asks for.
    let private afterStep (job: PreparedJob) log observer (cancellation: Threading.CancellationToken) (progress: Progress) (context: StepContext) =
        let step = context.Log.Step
        // Under ZeRO stage 3 the parameters exist only while used: gathered (on every process alike) for an
        // evaluation or a checkpoint, and freed when the step's hook returns.
        let gathered = ref None
        let whole () = if gathered.Value.IsNone then gathered.Value <- Some(context.GatherParameters())
        use _ = { new IDisposable with member _.Dispose() = gathered.Value |> Option.iter (fun g -> g.Dispose()) }
        let savedTokens, _ = savedTokensAndFlos job
        let progress =
            { progress with
                TrainLoss = fst progress.TrainLoss + context.Log.Loss, snd progress.TrainLoss + 1
                InputTokensSeen = savedTokens + context.InputTokensSeen }
        let evaluated =
            match job.Data.Eval with
            | Some eval when CheckpointPolicy.shouldEvaluate job.Policy step context.EpochEnded ->
                whole ()
                job.ModelParallel |> Option.iter (fun t -> t.BeforeEvaluation())
                let result = evaluate job eval
                logEval log observer step { Eval = result; ExactMatch = None }
                Some result
            | _ -> None
        // reduce_lr_on_plateau steps with each evaluation's metric during the run, as HF's Trainer does in
        // its evaluation, so the next update uses the new rate and a checkpoint of this step stores it.
        match evaluated, job.Plan.Plateau with
        | Some result, Some plateau -> plateau.Observe(metricOf job.Options result)
        | _ -> ()
        let facts = { Step = step; EpochEnded = context.EpochEnded; Cancelled = cancellation.IsCancellationRequested; Metric = evaluated |> Option.map (metricOf job.Options) }
        let decision, policy = CheckpointPolicy.decide job.Policy progress.Policy facts
        let progress =
            { progress with
                Policy = policy
                LastEval = (match evaluated with Some r -> Some(step, r) | None -> progress.LastEval)
                Interrupted = decision.Interrupted
                StoppedEarly = decision.StopEarly }
        if decision.Checkpoint then
            whole ()
            TrainingLoop.ensureFinite job.Options step context.Parameters
            // Every process takes part (each may hold a block of the optimizer state); process 0 writes.
            saveCheckpoint job log progress context
        // What a model-parallel evaluation or checkpoint made whole goes back to this process's part.
        if decision.Checkpoint || evaluated.IsSome then job.ModelParallel |> Option.iter (fun t -> t.Release())
        progress, (if decision.Interrupted || decision.StopEarly then StepDecision.Stop else StepDecision.Continue)

    /// The one call into the trainer: the job's plan, model, adapters' compute attachment and parameters.
    let private train (job: PreparedJob) (hooks: TrainHooks) : TrainResult =
        // Under tensor or pipeline parallelism this process keeps only what it trains (Gather makes the
        // model whole for checkpoints, evaluations and final/).
        job.ModelParallel |> Option.iter (fun t -> t.Release())
        // Under bf16/fp16 the adapter is copied onto the low-precision compute copy.
        let attach =
            match job.Adapters with
            | [] -> MixedPrecision.attachNothing
            | [ adapter ] -> adapter.AttachToCompute
            | _ -> invalidArg (nameof job) "a job trains one adapter at a time"
        TrainingLoop.run
            { TrainingLoop.setup job.Plan job.Trained job.Data.Train with
                Attach = attach
                Objective = job.Objective
                Parameters = [ for name, p in job.Trainable -> struct (name, p) ]
                LearningRate = job.LearningRate
                Communicator = (match job.ModelParallel with Some t -> t.Groups.Data :> ICommunicator | None -> job.Communicator)
                ZeroStage = job.Request.Distributed.ZeroStage
                Buckets = job.Request.Distributed.Buckets
                ModelParallel = job.ModelParallel |> Option.map (fun t -> t.Hooks) }
            (job.Restored |> Option.map (fun r -> r.Resume))
            hooks

    /// The evaluation after training (of the best checkpoint when asked to load it).
    let private evaluateAfter (job: PreparedJob) (progress: Progress) =
        if job.Options.LoadBestModelAtEnd then
            progress.Policy.Best
            |> Option.iter (fun (_, path) ->
                if Directory.Exists path then
                    HfModelFolder.loadWeightsInto path job.Model
                    for a in job.Adapters do a.Load path)
        match job.Data.Eval, progress.LastEval with
        | Some eval, Some(_, final) ->
            Some(figures job (if job.Options.LoadBestModelAtEnd && progress.Policy.Best.IsSome then evaluate job eval else final))
        | _ -> None

    /// final/: the model in HF layout, or for an adapter run PEFT's adapter folder (plus the base model
    /// when it trained too) and the tokenizer files. Staged, then renamed; a failure leaves nothing behind.
    let private saveFinal (job: PreparedJob) (finalPath: string) =
        let format = { WeightsFormat.defaults with MaxShardSize = job.Request.ModelHandling.MaxShardSize }
        if job.Adapters.IsEmpty then HfModelFolder.saveAs finalPath job.Model (Some job.SourceConfig) job.TokenizerCopies format
        else
            let staging = StagedFolder.create finalPath
            try
                for a in job.Adapters do a.Save staging (Some job.Request.ModelPath)
                if job.Adapters |> List.exists (fun a -> not a.FreezesBase) then
                    File.WriteAllText(Path.Combine(staging, "config.json"), HfModelFolder.configJson job.Model (Some job.SourceConfig))
                    HfModelFolder.writeWeightsAs staging job.Model format |> ignore
                for file in job.TokenizerCopies do File.Copy(file, Path.Combine(staging, Path.GetFileName file), true)
                StagedFolder.commit staging finalPath
            with _ ->
                StagedFolder.discard staging
                reraise ()

    let private summary (job: PreparedJob) (result: TrainResult) (progress: Progress) runtime (after: EvalFigures option) =
        // Speeds measure the steps this process trained, in the time it trained them.
        let stepsHere = float (result.Steps - job.StartStep)
        let samples = stepsHere * float (job.Options.PerDeviceTrainBatchSize * job.Options.GradientAccumulationSteps)
        { Step = result.Steps
          TrainRuntime = runtime
          SamplesPerSecond = samples / runtime
          StepsPerSecond = stepsHere / runtime
          TotalFlos = totalFlos job progress
          TrainLoss = (if snd progress.TrainLoss = 0 then nan else fst progress.TrainLoss / float (snd progress.TrainLoss))
          After = after |> Option.map (fun a -> { Step = result.Steps; Loss = a.Eval.Loss; Perplexity = a.Eval.Perplexity; ExactMatch = a.ExactMatch; Metrics = a.Eval.Metrics }) }

    /// Trains a prepared job: metrics.jsonl and TensorBoard events as it goes, checkpoints as the policy
    /// decides, then (unless interrupted) the summary line and final/, and loss.png.
    let run (job: PreparedJob) (cancellation: Threading.CancellationToken) (observer: FineTuneEvents) : FineTuneOutcome =
        let output = job.Request.OutputPath
        // Process 0 speaks for the run.
        let observer = if job.IsMainProcess then observer else quiet
        // Everything is checked: from here on the output folder is written (by process 0).
        if job.IsMainProcess then
            Directory.CreateDirectory output |> ignore
            CheckpointFolder.cleanStale output
        job.Communicator.Barrier()
        let metricsPath, finalPath, plotPath = Path.Combine(output, "metrics.jsonl"), Path.Combine(output, "final"), Path.Combine(output, "loss.png")
        let history = job.Restored |> Option.map (fun r -> r.Record.History |> List.map RunLog.ofJson) |> Option.defaultValue []
        let board = if job.Options.ReportToTensorBoard then Some(defaultArg job.Options.LoggingDir output) else None
        let log = new RunLogWriter(metricsPath, board, job.IsMainProcess, history)
        // --log-each-rank: every process also logs its own loss and tokens.
        let rankLog =
            if job.Request.Distributed.LogEachRank then
                let rank = job.Communicator.Rank
                Some(new RankLogWriter(Path.Combine(output, RunLog.rankFileName rank), rank, job.StartStep))
            else None
        let trainClock = Stopwatch()
        let result, before, progress =
            use _ = log
            use _ = rankLog |> Option.map (fun r -> r :> IDisposable) |> Option.defaultValue { new IDisposable with member _.Dispose() = () }
            let before = evaluateBefore job log observer
            let progress = ref (startProgress job)
            let hooks =
                { OnLog = fun l -> log.Step l; rankLog |> Option.iter (fun r -> r.Step l); observer.OnStep l
                  AfterStep =
                    fun context ->
                        let next, decision = afterStep job log observer cancellation progress.Value context
                        progress.Value <- next
                        decision }
            trainClock.Start()
            let result = train job hooks
            trainClock.Stop()
            result, before, progress.Value
        let after = if progress.Interrupted then None else evaluateAfter job progress
        let runtime = trainClock.Elapsed.TotalSeconds
        let summary = summary job result progress runtime after
        if not progress.Interrupted then
            TrainingLoop.ensureFinite job.Options result.Steps result.Parameters
            // Tensor or pipeline parallel: the whole model from every process's part, for final/.
            job.ModelParallel |> Option.iter (fun t -> t.Gather())
            RunLogFinish.summary job.IsMainProcess metricsPath summary
            if job.IsMainProcess then saveFinal job finalPath
        RunLogFinish.plot job.Request.Plot job.IsMainProcess plotPath log.History
        // The run ends together: no process reports success before final/ is written.
        job.Communicator.Barrier()
        result.Parameters.Dispose()
        { Steps = result.Steps; StartStep = job.StartStep; FinalLoss = result.FinalLoss; TrainLoss = summary.TrainLoss
          MetricsPath = metricsPath; FinalModelPath = finalPath; PlotPath = plotPath; Before = before; After = after
          SkippedRows = job.Data.Skipped; TrainRuntime = runtime; Checkpoints = CheckpointFolder.list output |> List.map snd
          BestCheckpoint = progress.Policy.Best |> Option.map snd; ResumedFrom = job.Restored |> Option.map (fun r -> r.Path)
          StoppedEarly = progress.StoppedEarly; Interrupted = progress.Interrupted; Seconds = job.Clock.Elapsed.TotalSeconds }
