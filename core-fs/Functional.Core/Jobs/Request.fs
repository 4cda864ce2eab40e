namespace Functional.Training

open Functional.Data

/// Where the data comes from and how it becomes token ids.
[<NoComparison>]
type DataSettings =
    { /// A separate evaluation file (same formats as the training data).
      EvalDataPath: string option
      /// Format, fields, completion-only training, packing, split, evaluation hold-out. MaxSeqLen and
      /// Seed are taken from the training options.
      Prompt: PromptDataOptions
      /// A tiktoken encoding name (cl100k_base, o200k_base); None uses the model folder's tokenizer files.
      TokenizerName: string option
      /// Folder of the tokenized-data cache; None turns the cache off.
      CachePath: string option
      /// Evaluation samples whose answers are generated (greedy) and scored by exact match before and
      /// after training; 0 turns scoring off.
      ExactMatchSamples: int
      /// Longest generated answer when scoring exact match, in tokens.
      ExactMatchMaxNewTokens: int }

/// LoRA for a fine-tuning job (DeepSpeed-Chat's --lora_dim, --only_optimize_lora, --lora_learning_rate;
/// PEFT's target modules).
[<NoComparison>]
type LoraSettings =
    { /// Rank, alpha, dropout and the projections to adapt.
      Config: Functional.Peft.LoraConfig
      /// Freeze the base model: only the adapters train.
      OnlyOptimizeLora: bool
      /// The adapters' own peak learning rate (default: the run's).
      LearningRate: float option
      /// Start from an existing PEFT adapter folder: its config and values.
      AdapterPath: string option }

/// Prefix tuning for a fine-tuning job (PaddleNLP's --prefix_tuning, PEFT's PREFIX_TUNING): learned
/// key/value prefixes for every layer train, the base model stays frozen, and final/ is the adapter.
[<NoComparison>]
type PrefixSettings =
    { /// N, the virtual tokens of the prefix (PaddleNLP's --num_prefix_tokens, default
      /// PrefixTuning.DefaultNumVirtualTokens = 128). With AdapterPath it must equal the adapter's
      /// num_virtual_tokens, or be 0: the run reads the adapter's.
      NumPrefixTokens: int
      /// Start from an existing PEFT prefix adapter folder: its values.
      AdapterPath: string option }

/// How a job changes the model it loads and how it saves final/ (DeepSpeed-Chat's --disable_dropout and
/// token-embedding resize, save_pretrained's max_shard_size).
[<NoComparison>]
type ModelSettings =
    { /// Build the model with every dropout probability at 0 (ModelFamily.withoutDropout); the saved
      /// config.json then holds 0, as DeepSpeed-Chat's does.
      DisableDropout: bool
      /// HF's resize_token_embeddings(len(tokenizer), pad_to_multiple_of = N) when N > 0 (DeepSpeed-Chat:
      /// 8); 0 resizes only when the tokenizer has more tokens than vocab_size, to len(tokenizer). See
      /// TokenEmbeddings.targetSize and TokenEmbeddings.resize.
      ResizeTokenEmbeddingsToMultipleOf: int
      /// The largest shard of final/'s weights in bytes (HF's max_shard_size; default 5 GB).
      /// Checkpoints keep one model.safetensors.
      MaxShardSize: int64 }
/// The sequence-classification task (HF's run_glue): rows of a text and a label.
[<NoComparison>]
type ClassificationTask =
    { /// The field holding the text (default "text").
      TextField: string
      /// The field holding the label: a name (mapped through label2id) or an integer id (default "label").
      LabelField: string
      /// num_labels when neither the model's config.json nor the label names decide it (ids in the data).
      NumLabels: int option
      /// Overrides config.json's pad_token_id (the id rows are padded with and pooled before).
      PadTokenId: int64 option }

/// The reward-model task (DeepSpeed-Chat step 2, TRL's RewardTrainer): rows of a prompt and a chosen
/// and a rejected answer.
[<NoComparison>]
type RewardTask =
    { /// The prompt field (default "prompt").
      PromptField: string
      /// The preferred answer's field (default "chosen").
      ChosenField: string
      /// The other answer's field (default "rejected").
      RejectedField: string
      /// Overrides config.json's pad_token_id.
      PadTokenId: int64 option }

/// What a fine-tuning job trains the model to do.
[<RequireQualifiedAccess; NoComparison>]
type TrainingTask =
    /// Next-token prediction on text (the default).
    | CausalLm
    /// A sequence classifier (HF's *ForSequenceClassification) on labelled texts.
    | SequenceClassification of ClassificationTask
    /// A reward model (a one-label sequence classifier) on preference pairs.
    | RewardModel of RewardTask

/// How a job runs over several processes: the processes (from the launcher by default) and DeepSpeed's
/// ZeRO stage.
[<NoComparison; NoEquality>]
type DistributedSettings =
    { /// DeepSpeed's ZeRO stage (zero_stage): 0 (default) every process holds all the training state; 1
      /// each keeps only its block of the optimizer state; 2 also reduce-scatters the gradients into that
      /// block; 3 also shards the parameters (gathered layer by layer). With one process every stage
      /// computes the same.
      ZeroStage: int
      /// The bucket sizes of the gradient reductions and parameter gathers in elements (DeepSpeed's
      /// zero_optimization reduce_bucket_size and allgather_bucket_size; CollectiveBuckets.defaults: 5e8 each).
      Buckets: Functional.Distributed.CollectiveBuckets
      /// The processes of the run; None (default): Communicator.fromEnvironment () (mpirun's, or
      /// torchrun's, variables; one process without them).
      Communicator: Functional.Distributed.ICommunicator option
      /// Every process writes OUTPUT/metrics-rank-R.jsonl (R its rank): per logged step, its own
      /// token-weighted loss over its rows of the window and their predicted tokens (StepLog.RankLoss and
      /// RankTokens), besides the global loss process 0 writes to metrics.jsonl (HF's log_on_each_node,
      /// Lightning's rank_zero_only=False). Default false: only process 0 logs.
      LogEachRank: bool
      /// Processes that split each layer of the model (PaddleNLP's tensor_parallel_degree; Megatron's
      /// layout, Distributed.TensorParallelLlama): LLaMA-family causal LMs for now; the rest of the processes
      /// are data parallel. Default 1: every process holds the whole model.
      TensorParallelDegree: int
      /// Stages the model's layers are divided into, one process each (PaddleNLP's
      /// pipeline_parallel_degree; Training.PipelineTraining, 1F1B over the accumulation window's
      /// micro-batches): every family's causal LM, with tensor parallelism too for the LLaMA families; the rest of
      /// the processes are data parallel. Default 1: every process runs every layer.
      PipelineParallelDegree: int }

/// A fine-tuning job: where the model, data and output are, and how to train.
[<NoComparison>]
type FineTuneRequest =
    { /// A Hugging Face model folder (config.json + model.safetensors, tokenizer files optional).
      ModelPath: string
      /// Training data: JSON or JSON Lines (prompt/answer shapes, text or input_ids).
      DataPath: string
      /// The output folder (metrics.jsonl, TensorBoard events, plot, final/).
      OutputPath: string
      /// Where the caller moves OutputPath once the job has finished, when it trains in a staging folder
      /// (the embedded default run): the checkpoint paths trainer_state.json records
      /// (best_model_checkpoint) name that place. None: OutputPath itself.
      PublishedOutputPath: string option
      /// Allow an output folder that is not empty.
      OverwriteOutputDir: bool
      /// The hyperparameters.
      Options: TrainOptions
      /// Data reading, evaluation and scoring.
      Data: DataSettings
      /// A checkpoint folder to resume from, or "latest" (the newest complete one in OutputPath).
      ResumeFromCheckpoint: string option
      /// LoRA adapters to train (None: plain fine-tuning).
      Lora: LoraSettings option
      /// A prefix to train instead of the model (None: no prefix). Excludes Lora, mixed precision and
      /// gradient checkpointing.
      Prefix: PrefixSettings option
      /// Recompute each transformer block in backward instead of keeping its activations (HF's
      /// gradient_checkpointing, PaddleNLP's recompute): less memory, the same gradients, more time.
      GradientCheckpointing: bool
      /// Dropout, vocabulary resize and the shard size of final/.
      ModelHandling: ModelSettings
      /// What the model learns (TrainingTask.CausalLm by default).
      Task: TrainingTask
      /// The processes and the ZeRO stage (FineTune.defaultDistributed: from the launcher, stage 0).
      Distributed: DistributedSettings
      /// Draws the run's chart when it has finished: the path (OutputPath/loss.png), the logged steps
      /// (optimizer step, training loss, learning rate) and the evaluations (step, loss). None draws
      /// nothing; Functional.Reporting's MetricsPlot.drawer draws it with ScottPlot (the facade and the
      /// command line pass it), so the core carries no plotting library.
      Plot: (string -> (int * float * float) list -> (int * float) list -> unit) option }

/// Evaluation figures at one point of a run.
[<NoComparison>]
type EvalFigures =
    { /// Token-weighted loss and perplexity on the evaluation set.
      Eval: EvalResult
      /// Fraction of scored evaluation samples whose generated answer equals the reference (0 to 1).
      ExactMatch: float option }

/// What a fine-tuning job tells its caller while it runs.
[<NoComparison; NoEquality>]
type FineTuneEvents =
    { /// After every logged optimizer step.
      OnStep: StepLog -> unit
      /// After every evaluation: the step (0: before training) and the figures (exact match only in the
      /// evaluation before training; the result's After holds the closing one).
      OnEvaluation: int -> EvalFigures -> unit
      /// A line for the user: the checkpoint a resume starts from, a newer one it skipped and why.
      OnMessage: string -> unit }

/// What a finished job wrote and measured.
[<NoComparison>]
type FineTuneOutcome =
    { /// Optimizer steps of the run done, counting those before a resume (HF's global_step).
      Steps: int
      /// The step this process started from: 0, or the step of the checkpoint it resumed from.
      StartStep: int
      /// The last step's loss.
      FinalLoss: float
      /// The mean of the per-step losses of the whole run, steps before a resume included (HF's
      /// train_loss); NaN when no step was trained.
      TrainLoss: float
      /// OUTPUT/metrics.jsonl.
      MetricsPath: string
      /// OUTPUT/final: config.json + model.safetensors in HF naming (+ tokenizer files).
      FinalModelPath: string
      /// OUTPUT/loss.png: loss and learning rate per step (drawn when the request has a Plot).
      PlotPath: string
      /// Evaluation before training, when there is an evaluation set.
      Before: EvalFigures option
      /// Evaluation after training, when there is an evaluation set.
      After: EvalFigures option
      /// Rows skipped as bad (--skip-bad-rows).
      SkippedRows: int
      /// Seconds spent in the training loop (HF's train_runtime).
      TrainRuntime: float
      /// The checkpoints left in OutputPath, oldest first.
      Checkpoints: string list
      /// The best checkpoint by the metric, when checkpoints were evaluated.
      BestCheckpoint: string option
      /// The checkpoint the run resumed from.
      ResumedFrom: string option
      /// Early stopping ended the run before its planned steps.
      StoppedEarly: bool
      /// Cancellation (SIGINT/SIGTERM) ended the run after saving a checkpoint; final/ was not written.
      Interrupted: bool
      /// Wall-clock seconds of the whole job.
      Seconds: float }

