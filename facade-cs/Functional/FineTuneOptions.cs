namespace Functional;

/// <summary>The optimizer of a fine-tuning run.</summary>
public enum OptimizerType
{
    /// <summary>torch.optim.AdamW: decoupled weight decay (the default).</summary>
    AdamW,
    /// <summary>torch.optim.SGD with optional momentum, dampening and Nesterov; weight decay is coupled (L2).</summary>
    Sgd,
    /// <summary>transformers' Adafactor as HF Trainer's optim="adafactor": factored second moments, no first
    /// moment, the scheduled learning rate.</summary>
    Adafactor,
    /// <summary>Lion (HF's optim="lion_32bit"): sign updates, decoupled weight decay, betas from
    /// <see cref="FineTuneOptions.AdamBeta1"/> and <see cref="FineTuneOptions.AdamBeta2"/>.</summary>
    Lion,
    /// <summary>torch.optim.RMSprop (alpha 0.99, eps 1e-8, not centered) with <see cref="FineTuneOptions.Momentum"/>;
    /// weight decay is coupled (L2).</summary>
    RmsProp,
}

/// <summary>
/// Everything a fine-tuning run needs: where the model, data and output are, and the hyperparameters,
/// named after Hugging Face's TrainingArguments and DeepSpeed-Chat's options. Every default is HF's.
/// </summary>
public sealed class FineTuneOptions
{
    /// <summary>An independent copy (every setting is a value or an immutable string).</summary>
    internal FineTuneOptions Clone() => (FineTuneOptions)MemberwiseClone();

    /// <summary>A Hugging Face model folder (config.json + model.safetensors). Required.</summary>
    public string ModelPath { get; set; } = "";

    /// <summary>Training data, JSON or JSON Lines: DeepSpeed-Chat prompt/chosen, phoenix from_human/from_gpt,
    /// Alpaca instruction/input/output, plain text, or pre-tokenized input_ids. Required.</summary>
    public string DataPath { get; set; } = "";

    /// <summary>A separate evaluation file (default none).</summary>
    public string? EvalDataPath { get; set; }

    /// <summary>auto (default: detected from the first row), deepspeed-chat, phoenix, alpaca, text or input-ids.</summary>
    public string DataFormat { get; set; } = "auto";

    /// <summary>Field holding the prompt, for data of another shape (default none).</summary>
    public string? PromptField { get; set; }

    /// <summary>Field holding the answer, for data of another shape (default none).</summary>
    public string? AnswerField { get; set; }

    /// <summary>Field holding plain text, for data of another shape (default none).</summary>
    public string? TextField { get; set; }

    /// <summary>"all" (default, DeepSpeed-Chat: loss on prompt and answer), "completion" (prompt tokens get label -100)
    /// or "assistant" (conversation rows: the assistant turns with their end-of-turn text only).</summary>
    public string TrainOn { get; set; } = "all";

    /// <summary>A Jinja chat template file for conversation rows instead of the model's own (default none).</summary>
    public string? ChatTemplate { get; set; }

    /// <summary>Pack several samples into each row of up to max-seq-len tokens, as <see cref="PackingAttention"/> says
    /// (default false).</summary>
    public bool Packing { get; set; }

    /// <summary>How packed rows attend: "isolated" (default: whole samples packed, positions restart and each sample
    /// attends only to itself, so the loss and gradients are those of the samples unpacked; completion-only training
    /// allowed) or "cross" (the eos-separated stream cut into rows of exactly max-seq-len, tokens attending across
    /// samples; every token trained on).</summary>
    public string PackingAttention { get; set; } = "isolated";

    /// <summary>Start every sample with the tokenizer's bos token: true (--add-bos), false (--no-add-bos) or null
    /// (default) for the tokenizer's own rule, as Hugging Face's tokenizer(text).</summary>
    public bool? AddBos { get; set; }

    /// <summary>Skip and count bad rows instead of stopping (default false).</summary>
    public bool SkipBadRows { get; set; }

    /// <summary>DeepSpeed-Chat data split such as "2,4,4": this phase trains on the first share (default none).</summary>
    public string? DataSplit { get; set; }

    /// <summary>Fraction of the training rows held out for evaluation when no evaluation file is given (default 0).</summary>
    public double EvalSplitRatio { get; set; }

    /// <summary>A tiktoken encoding (cl100k_base, o200k_base) instead of the model folder's tokenizer (default none).</summary>
    public string? Tokenizer { get; set; }

    /// <summary>Cache tokenized data on disk (default true; in $FUNCTIONAL_CACHE or ~/.cache/functional/data).</summary>
    public bool UseDataCache { get; set; } = true;

    /// <summary>Evaluation samples whose greedy answers are scored by exact match before and after training (default 0: off).</summary>
    public int ExactMatchSamples { get; set; }

    /// <summary>The output folder: metrics.jsonl and final/ (an HF model folder). Required.</summary>
    public string OutputPath { get; set; } = "";

    /// <summary>Allow writing into an output folder that is not empty (default false).</summary>
    public bool OverwriteOutputDir { get; set; }

    /// <summary>Rows per micro-batch (default 8).</summary>
    public int PerDeviceTrainBatchSize { get; set; } = 8;

    /// <summary>Micro-batches per optimizer step (default 1).</summary>
    public int GradientAccumulationSteps { get; set; } = 1;

    /// <summary>Peak learning rate (default 5e-5).</summary>
    public double LearningRate { get; set; } = 5e-5;

    /// <summary>Weight decay, skipped for biases and normalization weights (default 0).</summary>
    public double WeightDecay { get; set; }

    /// <summary>Adam's beta1 (default 0.9).</summary>
    public double AdamBeta1 { get; set; } = 0.9;

    /// <summary>Adam's beta2 (default 0.999).</summary>
    public double AdamBeta2 { get; set; } = 0.999;

    /// <summary>Adam's epsilon (default 1e-8).</summary>
    public double AdamEpsilon { get; set; } = 1e-8;

    /// <summary>AdamW (default), SGD, Adafactor, Lion or RMSprop.</summary>
    public OptimizerType Optimizer { get; set; } = OptimizerType.AdamW;

    /// <summary>SGD momentum (default 0).</summary>
    public double Momentum { get; set; }

    /// <summary>SGD Nesterov momentum (default false).</summary>
    public bool Nesterov { get; set; }

    /// <summary>SGD dampening of the momentum buffer after its first update, as torch.optim.SGD (default 0).</summary>
    public double Dampening { get; set; }

    /// <summary>AdamW's AMSGrad variant, as torch.optim.AdamW's amsgrad (default false).</summary>
    public bool Amsgrad { get; set; }

    /// <summary>AdamW maximizes the objective, as torch.optim.AdamW's maximize (default false).</summary>
    public bool Maximize { get; set; }

    /// <summary>RMSprop's smoothing constant, as torch.optim.RMSprop's alpha (default 0.99).</summary>
    public double RmsPropAlpha { get; set; } = 0.99;

    /// <summary>RMSprop's epsilon, as torch.optim.RMSprop's eps (default 1e-8).</summary>
    public double RmsPropEpsilon { get; set; } = 1e-8;

    /// <summary>Centered RMSprop, as torch.optim.RMSprop's centered (default false).</summary>
    public bool RmsPropCentered { get; set; }

    /// <summary>Adafactor's update clipping threshold, as transformers' clip_threshold (default 1.0).</summary>
    public double AdafactorClipThreshold { get; set; } = 1.0;

    /// <summary>Adafactor's second-moment decay exponent, as transformers' decay_rate (default -0.8).</summary>
    public double AdafactorDecayRate { get; set; } = -0.8;

    /// <summary>Adafactor scales each step by the parameter's RMS, as transformers' scale_parameter (default false,
    /// as HF Trainer makes it).</summary>
    public bool AdafactorScaleParameter { get; set; }

    /// <summary>HF's optim_args: the optimizer's constructor keywords as "key=value,key=value" (e.g.
    /// "alpha=0.9,centered=True" for RMSprop), applied over the settings above; null: none (default).</summary>
    public string? OptimArgs { get; set; }

    /// <summary>HF schedule name: linear (default), cosine, constant, constant_with_warmup, cosine_with_restarts,
    /// polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay.</summary>
    public string LrSchedulerType { get; set; } = "linear";

    /// <summary>Schedule parameters as HF's lr_scheduler_kwargs JSON, e.g. {"num_cycles": 2} (default none).</summary>
    public string? LrSchedulerKwargs { get; set; }

    /// <summary>Warmup steps; wins over WarmupRatio when &gt; 0 (default 0).</summary>
    public int NumWarmupSteps { get; set; }

    /// <summary>Warmup as a fraction of all optimizer steps, rounded up (default 0).</summary>
    public double WarmupRatio { get; set; }

    /// <summary>Epochs when MaxSteps is not set (default 3).</summary>
    public double NumTrainEpochs { get; set; } = 3.0;

    /// <summary>Total optimizer steps; -1 (default) lets NumTrainEpochs decide.</summary>
    public int MaxSteps { get; set; } = -1;

    /// <summary>Gradient clipping by global norm; 0 turns it off (default 1.0).</summary>
    public double MaxGradNorm { get; set; } = 1.0;

    /// <summary>Rows are truncated to this many tokens; 0 (default) uses the model's context (config.json's
    /// n_positions or max_position_embeddings, less a prefix's virtual tokens). A value above the context is
    /// refused.</summary>
    public int MaxSeqLen { get; set; }

    /// <summary>Seed of initialization, dropout and shuffling (default 42).</summary>
    public long Seed { get; set; } = 42;

    /// <summary>Keep the data in file order instead of shuffling each epoch (default false).</summary>
    public bool NoShuffle { get; set; }

    /// <summary>Write metrics every this many optimizer steps (default 1).</summary>
    public int LoggingSteps { get; set; } = 1;

    /// <summary>When steps are logged (HF's logging_strategy): "steps" (default: every LoggingSteps), "epoch" or "no"
    /// (only the last step). The last step is always logged.</summary>
    public string LoggingStrategy { get; set; } = "steps";

    /// <summary>Write TensorBoard events (HF's report_to "tensorboard"; default true).</summary>
    public bool ReportToTensorBoard { get; set; } = true;

    /// <summary>The folder of the TensorBoard event file (HF's logging_dir; default null: the output folder).</summary>
    public string? LoggingDir { get; set; }

    /// <summary>Intra-op threads; 0 (the default) adapts to the cores other programs leave free, or takes
    /// OMP_NUM_THREADS when it is set.</summary>
    public int Threads { get; set; }

    /// <summary>Evaluate every this many optimizer steps when there is an evaluation set; 0 evaluates only at the end (default 0).</summary>
    public int EvalSteps { get; set; }

    /// <summary>Rows per evaluation micro-batch (default 8).</summary>
    public int PerDeviceEvalBatchSize { get; set; } = 8;

    /// <summary>When to evaluate: "no", "steps" or "epoch" (default: steps when EvalSteps &gt; 0, else no).</summary>
    public string? EvalStrategy { get; set; }

    /// <summary>When to save checkpoints: "no", "steps" (default) or "epoch".</summary>
    public string SaveStrategy { get; set; } = "steps";

    /// <summary>Save a checkpoint every this many optimizer steps (default 500).</summary>
    public int SaveSteps { get; set; } = 500;

    /// <summary>Keep at most this many checkpoints; the best is never deleted (default null: keep all).</summary>
    public int? SaveTotalLimit { get; set; }

    /// <summary>The metric that picks the best checkpoint (default "eval_loss").</summary>
    public string MetricForBestModel { get; set; } = "eval_loss";

    /// <summary>Whether a greater metric is better (default null: false for losses, true otherwise).</summary>
    public bool? GreaterIsBetter { get; set; }

    /// <summary>Load the best checkpoint's weights at the end, before saving final/ (default false).</summary>
    public bool LoadBestModelAtEnd { get; set; }

    /// <summary>Stop after this many evaluations without improvement (default 0: off).</summary>
    public int EarlyStoppingPatience { get; set; }

    /// <summary>bf16 compute with fp32 master weights (default false).</summary>
    public bool Bf16 { get; set; }

    /// <summary>fp16 compute with fp32 master weights and dynamic loss scaling, as DeepSpeed (default false).</summary>
    public bool Fp16 { get; set; }

    /// <summary>fp16: a static loss scale; 0 (default) scales dynamically.</summary>
    public double LossScale { get; set; }

    /// <summary>fp16: the dynamic scale starts at 2^this (default 16).</summary>
    public int InitialScalePower { get; set; } = 16;

    /// <summary>fp16: overflow-free steps before the scale doubles (default 1000).</summary>
    public int LossScaleWindow { get; set; } = 1000;

    /// <summary>fp16: overflows tolerated before the scale halves (default 2).</summary>
    public int Hysteresis { get; set; } = 2;

    /// <summary>fp16: the smallest scale (default 1).</summary>
    public double MinLossScale { get; set; } = 1;

    /// <summary>Recompute each transformer block in backward instead of keeping its activations (default false).</summary>
    public bool GradientCheckpointing { get; set; }

    /// <summary>Compute the causal-LM loss and its gradient from the final hidden states in chunks of this many
    /// predicted positions, without the batch x positions x vocabulary logits (--loss-chunk-size); the same loss and
    /// gradients. 0 (default): the full logits.</summary>
    public int LossChunkSize { get; set; }

    /// <summary>Build the model with every dropout probability of its config at 0; the saved config.json holds 0 too
    /// (DeepSpeed-Chat's disable_dropout; default false).</summary>
    public bool DisableDropout { get; set; }

    /// <summary>Resize the token embeddings (and an untied LM head) to N * ceil(len(tokenizer) / N), as HF's
    /// resize_token_embeddings(len(tokenizer), pad_to_multiple_of=N) and DeepSpeed-Chat (N = 8). Default 0: resize only
    /// when the tokenizer has more tokens than vocab_size, to len(tokenizer).</summary>
    public int ResizeTokenEmbeddingsToMultipleOf { get; set; }

    /// <summary>DeepSpeed's ZeRO stage of a multi-process run (default 0: every process holds all the training
    /// state; 1: each keeps its block of the optimizer state; 2: also of the reduced gradients; 3: also of the parameters).
    /// With one process every stage computes the same.</summary>
    public int ZeroStage { get; set; }

    /// <summary>Elements per all-reduce or reduce-scatter of the gradients (DeepSpeed's zero_optimization.reduce_bucket_size;
    /// default 5e8): bounds a collective's staging memory and keeps each MPI call within its int count.</summary>
    public long ReduceBucketSize { get; set; } = Functional.Distributed.CollectiveBucketsModule.DefaultElements;

    /// <summary>Elements per all-gather of the parameters (DeepSpeed's zero_optimization.allgather_bucket_size; default 5e8).</summary>
    public long AllgatherBucketSize { get; set; } = Functional.Distributed.CollectiveBucketsModule.DefaultElements;

    /// <summary>Every process writes OUTPUT/metrics-rank-R.jsonl (R its rank): per logged step, its own token-weighted
    /// loss over its rows of the window and their predicted tokens (--log-each-rank; HF's log_on_each_node). Default
    /// false: only process 0 logs.</summary>
    public bool LogEachRank { get; set; }

    /// <summary>Processes that split each layer of the model (--tensor-parallel-degree; default 1).</summary>
    public int TensorParallelDegree { get; set; } = 1;

    /// <summary>Pipeline stages, one process each (--pipeline-parallel-degree; default 1).</summary>
    public int PipelineParallelDegree { get; set; } = 1;

    /// <summary>The processes of the run; null (default): from the launcher's environment (mpirun's or torchrun's
    /// variables; one process without them).</summary>
    public Functional.Distributed.ICommunicator? Communicator { get; set; }

    /// <summary>The largest shard of final/'s weights, in HF's spelling ("5GB" = 5e9 bytes, "2GiB", "500MB", or bytes;
    /// default "5GB", HF's max_shard_size).</summary>
    public string MaxShardSize { get; set; } = "5GB";

    /// <summary>LoRA rank (DeepSpeed-Chat's lora_dim; default 0: no LoRA).</summary>
    public int LoraDim { get; set; }

    /// <summary>LoRA alpha: the adapter's output is scaled by alpha / rank (default 8, as PEFT).</summary>
    public double LoraAlpha { get; set; } = 8;

    /// <summary>Dropout on the adapter's input (default 0).</summary>
    public double LoraDropout { get; set; }

    /// <summary>Adapt every projection whose name contains this text (DeepSpeed-Chat's lora_module_name; default none).</summary>
    public string? LoraModuleName { get; set; }

    /// <summary>Adapt the projections with these names, comma separated (PEFT's target_modules, e.g. "q_proj,v_proj"; default none).</summary>
    public string? LoraTargetModules { get; set; }

    /// <summary>Freeze the base model: only the adapters train (default false).</summary>
    public bool OnlyOptimizeLora { get; set; }

    /// <summary>The adapters' own peak learning rate (default: LearningRate).</summary>
    public double? LoraLearningRate { get; set; }

    /// <summary>Start from an existing PEFT adapter folder, its config and values (default none).</summary>
    public string? LoraAdapter { get; set; }

    /// <summary>Train a learned key/value prefix for every layer instead of the model, which stays frozen;
    /// final/ is a PEFT prefix adapter (PaddleNLP's prefix_tuning; default false).</summary>
    public bool PrefixTuning { get; set; }

    /// <summary>Virtual tokens of the prefix (PaddleNLP's num_prefix_tokens; default 128).</summary>
    public int NumPrefixTokens { get; set; } = Peft.PrefixTuning.DefaultNumVirtualTokens;

    /// <summary>Start prefix tuning from an existing PEFT prefix adapter folder, its values (default none).</summary>
    public string? PrefixAdapter { get; set; }

    /// <summary>A checkpoint folder to resume from, or "latest" for the newest complete one in OutputPath (default none).</summary>
    public string? ResumeFromCheckpoint { get; set; }

    /// <summary>What the model learns: "causal-lm" (default), "sequence-classification" (rows of <see cref="TextField"/>
    /// and <see cref="LabelField"/>; HF's *ForSequenceClassification) or "reward-model" (rows of
    /// <see cref="PromptField"/>, <see cref="ChosenField"/> and <see cref="RejectedField"/>; a one-label classifier).</summary>
    public string Task { get; set; } = "causal-lm";

    /// <summary>Classification: the label field (default "label"): a name mapped through label2id, or an id.</summary>
    public string? LabelField { get; set; }

    /// <summary>Reward model: the preferred answer's field (default "chosen").</summary>
    public string? ChosenField { get; set; }

    /// <summary>Reward model: the other answer's field (default "rejected").</summary>
    public string? RejectedField { get; set; }

    /// <summary>Classification: num_labels when neither config.json nor the label names decide it (default none).</summary>
    public int? NumLabels { get; set; }

    /// <summary>Classification and reward model: the pad id, over config.json's pad_token_id (default none).</summary>
    public long? PadTokenId { get; set; }
}
