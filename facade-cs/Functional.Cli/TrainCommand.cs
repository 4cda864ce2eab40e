using System.CommandLine;
using Functional.Training;

namespace Functional.Cli;

/// <summary>`functional train`: fine-tunes an HF model folder through the facade's <see cref="TrainerBuilder"/>, or runs
/// the embedded default when neither --model nor --data is given.</summary>
internal static class TrainCommand
{
    public static Command Create()
    {
        var d = new FineTuneOptions();
        var model = CliOption.Create("--model", "Required for fine-tuning: a Hugging Face model folder (config.json + model.safetensors).", "", "--model_name_or_path", "--model-name-or-path");
        var data = CliOption.Create("--data", "Required for fine-tuning: training data, JSON or JSON Lines: prompt/chosen (DeepSpeed-Chat), from_human/from_gpt, instruction/input/output (Alpaca), text, or input_ids.", "", "--data_path", "--data-path", "--train_file", "--train-file");
        var evalData = CliOption.Create<string?>("--eval-data", "Evaluation data file (same formats).", null, "--validation_file", "--validation-file");
        var dataFormat = CliOption.Create("--data-format", "auto, deepspeed-chat, phoenix, alpaca, text, input-ids or conversation (messages / ShareGPT conversations).", d.DataFormat);
        var promptField = CliOption.Create<string?>("--prompt-field", "Field holding the prompt (data of another shape).", null);
        var answerField = CliOption.Create<string?>("--answer-field", "Field holding the answer (data of another shape).", null);
        var textField = CliOption.Create<string?>("--text-field", "Field holding plain text (data of another shape).", null);
        var trainOn = CliOption.Create("--train-on", "all (loss on prompt and answer), completion (loss on the answer only) or assistant (conversations: the assistant turns, each with its end-of-turn token).", d.TrainOn);
        var chatTemplate = CliOption.Create<string?>("--chat-template", "A Jinja chat template file for conversation rows instead of the model's own (chat_template.jinja or tokenizer_config.json).", null, "--chat_template");
        var task = CliOption.Create("--task", "causal-lm (default), sequence-classification (rows of --text-field and --label-field) or reward-model (rows of --prompt-field, --chosen-field, --rejected-field).", d.Task);
        var labelField = CliOption.Create<string?>("--label-field", "Classification: the label field (default label): a name or an integer id.", null);
        var chosenField = CliOption.Create<string?>("--chosen-field", "Reward model: the preferred answer's field (default chosen).", null);
        var rejectedField = CliOption.Create<string?>("--rejected-field", "Reward model: the other answer's field (default rejected).", null);
        var numLabels = CliOption.Create<int?>("--num-labels", "Classification: num_labels when config.json names no labels and the labels are ids.", null, "--num_labels");
        var padTokenId = CliOption.Create<long?>("--pad-token-id", "Classification and reward model: the pad id (over config.json's pad_token_id).", null, "--pad_token_id");
        var packing = CliOption.Create("--packing", "Pack several samples into each row of up to --max-seq-len tokens (how they attend: --packing-attention).", false);
        var packingAttention = CliOption.Create("--packing-attention",
            "With --packing: isolated (default: whole samples packed, positions restart, each attends only to itself; the loss and gradients of the samples unpacked) "
            + "or cross (the eos-separated stream cut into rows of exactly --max-seq-len, attention across samples).", d.PackingAttention);
        var addBos = CliOption.Create("--add-bos", "Start every sample with the tokenizer's bos token (default: the tokenizer's own rule, as HF: LLaMA's adds it, GPT-2's does not).", false);
        var noAddBos = CliOption.Create("--no-add-bos", "Start no sample with bos, whatever the tokenizer's rule.", false);
        var skipBadRows = CliOption.Create("--skip-bad-rows", "Skip (and count) bad rows instead of stopping.", false);
        var dataSplit = CliOption.Create<string?>("--data-split", "DeepSpeed-Chat split such as 2,4,4: this phase trains on the first share.", null);
        var evalSplitRatio = CliOption.Create("--eval-split-ratio", "Hold out this fraction of the training rows for evaluation.", d.EvalSplitRatio);
        var tokenizer = CliOption.Create<string?>("--tokenizer", "A tiktoken encoding (cl100k_base, o200k_base) instead of the model folder's tokenizer.", null, "--tokenizer_name", "--tokenizer-name");
        var noDataCache = CliOption.Create("--no-data-cache", "Tokenize again instead of using the cache of tokenized data.", false);
        var exactMatch = CliOption.Create("--exact-match-samples", "Score this many evaluation samples by exact match of greedy answers, before and after training.", d.ExactMatchSamples);
        var evalSteps = CliOption.Create("--eval-steps", "Evaluate every N optimizer steps (0: only at the end).", d.EvalSteps);
        var evalBatch = CliOption.Create("--per-device-eval-batch-size", "Rows per evaluation micro-batch.", d.PerDeviceEvalBatchSize);
        var evalStrategy = CliOption.Create<string?>("--eval-strategy", "no, steps or epoch (default: steps when --eval-steps is given, else no).", null, "--evaluation_strategy", "--evaluation-strategy");
        var saveStrategy = CliOption.Create("--save-strategy", "When to save checkpoints: no, steps or epoch.", d.SaveStrategy);
        var saveSteps = CliOption.Create("--save-steps", "Save a checkpoint every N optimizer steps.", d.SaveSteps);
        var saveTotalLimit = CliOption.Create<int?>("--save-total-limit", "Keep at most N checkpoints (the best is never deleted).", null);
        var metric = CliOption.Create("--metric-for-best-model", "eval_loss or eval_perplexity.", d.MetricForBestModel);
        var greaterIsBetter = CliOption.Create<bool?>("--greater-is-better", "Whether a greater metric is better (default: false for losses).", null);
        var loadBest = CliOption.Create("--load-best-model-at-end", "Save the best checkpoint's weights as final/.", false);
        var patience = CliOption.Create("--early-stopping-patience", "Stop after N evaluations without improvement (0: off).", d.EarlyStoppingPatience);
        var bf16 = CliOption.Create("--bf16", "bf16 compute with fp32 master weights.", false);
        var fp16 = CliOption.Create("--fp16", "fp16 compute with fp32 master weights and dynamic loss scaling (DeepSpeed).", false);
        var lossScale = CliOption.Create("--loss-scale", "fp16: a static loss scale (0: dynamic).", d.LossScale);
        var scalePower = CliOption.Create("--initial-scale-power", "fp16: the dynamic scale starts at 2^N.", d.InitialScalePower);
        var scaleWindow = CliOption.Create("--loss-scale-window", "fp16: overflow-free steps before the scale doubles.", d.LossScaleWindow);
        var hysteresis = CliOption.Create("--hysteresis", "fp16: overflows tolerated before the scale halves.", d.Hysteresis);
        var minScale = CliOption.Create("--min-loss-scale", "fp16: the smallest scale.", d.MinLossScale);
        var recompute = CliOption.Create("--gradient-checkpointing", "Recompute each block in backward: less activation memory, same gradients.", false, "--recompute");
        var lossChunkSize = CliOption.Create("--loss-chunk-size", "Compute the loss and its gradient in chunks of N predicted positions, without the batch x positions x vocabulary logits: the same values, far less memory for large vocabularies (0: the full logits).", d.LossChunkSize);
        var disableDropout = CliOption.Create("--disable-dropout", "Build the model with every dropout probability at 0 (DeepSpeed-Chat); the saved config.json holds 0.", false);
        var resizeMultiple = CliOption.Create("--resize-token-embeddings-to-multiple-of", "Resize the embeddings to N * ceil(len(tokenizer) / N) (HF's pad_to_multiple_of; DeepSpeed-Chat: 8). 0: only for added tokens.", d.ResizeTokenEmbeddingsToMultipleOf);
        var maxShardSize = CliOption.Create("--max-shard-size", "The largest weight shard of final/ (HF's max_shard_size: 5GB = 5e9 bytes, 2GiB, 500MB).", d.MaxShardSize);
        var loraDim = CliOption.Create("--lora-dim", "LoRA rank (0: no LoRA).", d.LoraDim, "--lora-r", "--lora_r");
        var loraAlpha = CliOption.Create("--lora-alpha", "LoRA alpha (scale alpha / rank).", d.LoraAlpha);
        var loraDropout = CliOption.Create("--lora-dropout", "Dropout on the adapters' input.", d.LoraDropout);
        var loraModuleName = CliOption.Create<string?>("--lora-module-name", "Adapt projections whose name contains this text (DeepSpeed-Chat).", null);
        var loraTargets = CliOption.Create<string?>("--lora-target-modules", "Adapt these projections, comma separated (PEFT), e.g. q_proj,v_proj.", null);
        var onlyLora = CliOption.Create("--only-optimize-lora", "Freeze the base model; train only the adapters.", false);
        var loraLr = CliOption.Create<double?>("--lora-learning-rate", "The adapters' own learning rate.", null);
        var loraAdapter = CliOption.Create<string?>("--lora-adapter", "Start from this PEFT adapter folder.", null);
        var prefixTuning = CliOption.Create("--prefix-tuning", "Train learned key/value prefixes for every layer; the model stays frozen, final/ is the adapter (PaddleNLP, PEFT).", false);
        var numPrefixTokens = CliOption.Create("--num-prefix-tokens", "Virtual tokens of the prefix.", d.NumPrefixTokens);
        var prefixAdapter = CliOption.Create<string?>("--prefix-adapter", "Start prefix tuning from this PEFT prefix adapter folder.", null);
        var resume = CliOption.Create<string?>("--resume-from-checkpoint", "A checkpoint folder, or latest (the newest complete one in --output).", null);
        var output = CliOption.Create("--output", "Required for fine-tuning: the output folder (metrics.jsonl, TensorBoard events, checkpoints, final/); the embedded default run writes to runs/embedded without it.", "", "--output_dir", "--output-dir");
        var overwrite = CliOption.Create("--overwrite-output-dir", "Write into an output folder that is not empty.", false);
        var batch = CliOption.Create("--per-device-train-batch-size", "Rows per micro-batch.", d.PerDeviceTrainBatchSize);
        var accumulation = CliOption.Create("--gradient-accumulation-steps", "Micro-batches per optimizer step.", d.GradientAccumulationSteps);
        var lr = CliOption.Create("--learning-rate", "Peak learning rate.", d.LearningRate);
        var weightDecay = CliOption.Create("--weight-decay", "Weight decay (not applied to biases and norm weights).", d.WeightDecay);
        var beta1 = CliOption.Create("--adam-beta1", "Adam beta1.", d.AdamBeta1);
        var beta2 = CliOption.Create("--adam-beta2", "Adam beta2.", d.AdamBeta2);
        var epsilon = CliOption.Create("--adam-epsilon", "Adam epsilon.", d.AdamEpsilon);
        var optimizer = CliOption.Create("--optimizer", "HF optim name: " + string.Join(", ", OptimizerKindModule.names.Select(n => n.Item1)) + ".", "adamw", "--optim");
        var momentum = CliOption.Create("--momentum", "SGD or RMSprop momentum.", d.Momentum);
        var nesterov = CliOption.Create("--nesterov", "SGD Nesterov momentum.", false);
        var dampening = CliOption.Create("--dampening", "SGD dampening of the momentum buffer (torch.optim.SGD's).", d.Dampening, "--sgd-dampening");
        var amsgrad = CliOption.Create("--amsgrad", "AdamW's AMSGrad variant (torch.optim.AdamW's amsgrad).", false);
        var maximize = CliOption.Create("--maximize", "AdamW maximizes the objective (torch.optim.AdamW's maximize).", false);
        var optimArgs = CliOption.Create<string?>("--optim-args",
            "HF's optim_args: the optimizer's constructor keywords as key=value pairs, e.g. \"alpha=0.9,centered=True\" "
            + "(adamw: amsgrad, maximize; sgd: dampening, nesterov; rmsprop: alpha, eps, centered; adafactor: clip_threshold, decay_rate, scale_parameter).", null);
        var scheduler = CliOption.Create("--lr-scheduler-type", "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay or reduce_lr_on_plateau (needs evaluations).", d.LrSchedulerType);
        var schedulerKwargs = CliOption.Create<string?>("--lr-scheduler-kwargs", "Schedule parameters as JSON, e.g. {\"num_cycles\": 2}.", null);
        var warmupSteps = CliOption.Create("--num-warmup-steps", "Warmup optimizer steps; a value below 1 is a ratio of all steps, rounded up (HF v5's warmup_steps).", (double)d.NumWarmupSteps, "--warmup_steps", "--warmup-steps");
        var warmupRatio = CliOption.Create("--warmup-ratio", "Warmup as a fraction of all steps (rounded up).", d.WarmupRatio);
        var epochs = CliOption.Create("--num-train-epochs", "Epochs (when --max-steps is not set).", d.NumTrainEpochs);
        var maxSteps = CliOption.Create("--max-steps", "Total optimizer steps (-1: use epochs).", d.MaxSteps);
        var maxGradNorm = CliOption.Create("--max-grad-norm", "Clip gradients to this global norm (0: off).", d.MaxGradNorm);
        var maxSeqLen = CliOption.Create("--max-seq-len", "Truncate rows to this many tokens (0: the model's context, n_positions or max_position_embeddings; more is refused).", d.MaxSeqLen, "--max_seq_length", "--max-seq-length");
        var seed = CliOption.Create("--seed", "Random seed.", d.Seed);
        var noShuffle = CliOption.Create("--no-shuffle", "Keep rows in file order.", false);
        var loggingSteps = CliOption.Create("--logging-steps", "Write metrics every N optimizer steps.", d.LoggingSteps);
        var tensorParallel = CliOption.Create("--tensor-parallel-degree", "Processes that split each layer (PaddleNLP's tensor_parallel_degree; Megatron's layout) under mpirun: LLaMA-family causal LMs, fp32; checkpoints are one process's (gathered), so they resume on any layout; the other processes are data parallel.", 1, "--tp");
        var pipelineParallel = CliOption.Create("--pipeline-parallel-degree", "Pipeline stages, one process each (PaddleNLP's pipeline_parallel_degree): the layers divided by parameter count, 1F1B over the accumulation window; every family, fp32; with --tp too (LLaMA families, each stage split).", 1, "--pp");
        var logEachRank = CliOption.Create("--log-each-rank", "Every process writes OUTPUT/metrics-rank-R.jsonl: per logged step its own loss over its rows and their token count (HF's log_on_each_node); by default only process 0 logs.", false);
        var threads = CliOption.Create("--threads", "Intra-op threads (0: adapt to the cores other programs leave free, or OMP_NUM_THREADS).", d.Threads);
        var hf = new HfFlags();

        var command = new Command("train",
            "Fine-tune a GPT-2, LLaMA, Qwen2, Qwen3, Mistral, OPT or BLOOM model folder (--model, --data and --output required) on text, prompt/answer or pre-tokenized data. "
            + "Without --model and --data: the embedded default run, a small LLaMA trained from scratch to reverse and sort letters "
            + "(only --output, --seed, --threads and --max-steps apply). HF Trainer and DeepSpeed flags are accepted in their snake_case spelling.")
        {
            model, data, output, overwrite, batch, accumulation, lr, weightDecay, beta1, beta2, epsilon, optimizer,
            momentum, nesterov, dampening, amsgrad, maximize, optimArgs, scheduler, schedulerKwargs, warmupSteps, warmupRatio, epochs, maxSteps, maxGradNorm,
            maxSeqLen, seed, noShuffle, loggingSteps, logEachRank, tensorParallel, pipelineParallel, threads, evalData, dataFormat, promptField, answerField, textField,
            trainOn, chatTemplate, packing, packingAttention, addBos, noAddBos, skipBadRows, dataSplit, evalSplitRatio, tokenizer, noDataCache, exactMatch, evalSteps, evalBatch,
            evalStrategy, saveStrategy, saveSteps, saveTotalLimit, metric, greaterIsBetter, loadBest, patience, resume,
            loraDim, loraAlpha, loraDropout, loraModuleName, loraTargets, onlyLora, loraLr, loraAdapter, recompute, lossChunkSize,
            prefixTuning, numPrefixTokens, prefixAdapter, disableDropout, resizeMultiple, maxShardSize,
            task, labelField, chosenField, rejectedField, numLabels, padTokenId,
            bf16, fp16, lossScale, scalePower, scaleWindow, hysteresis, minScale,
        };
        foreach (var option in hf.Options)
        {
            command.Add(option);
        }
        // The help's groups are the README's option tables of `functional train` (a test keeps them equal).
        HelpGroups.Add(command, "Model and task", model, task, labelField, chosenField, rejectedField, numLabels, padTokenId, tokenizer, disableDropout, resizeMultiple);
        HelpGroups.Add(command, "Data", data, evalData, dataFormat, promptField, answerField, textField, trainOn, chatTemplate, packing, packingAttention,
            addBos, noAddBos, maxSeqLen, dataSplit, evalSplitRatio, skipBadRows, noShuffle, noDataCache);
        HelpGroups.Add(command, "Batch, steps, seed and threads", batch, accumulation, epochs, maxSteps, seed, threads);
        HelpGroups.Add(command, "Optimizer", optimizer, lr, weightDecay, beta1, beta2, epsilon, amsgrad, maximize, momentum, nesterov, dampening, optimArgs, maxGradNorm);
        HelpGroups.Add(command, "Learning-rate schedule", scheduler, schedulerKwargs, warmupSteps, warmupRatio);
        HelpGroups.Add(command, "Evaluation and early stopping", evalStrategy, evalSteps, evalBatch, exactMatch, metric, greaterIsBetter, loadBest, patience);
        HelpGroups.Add(command, "Output, checkpoints and resume", output, overwrite, saveStrategy, saveSteps, saveTotalLimit, resume, maxShardSize);
        HelpGroups.Add(command, "Precision and memory", [bf16, fp16, .. hf.PrecisionFlags, lossScale, scalePower, scaleWindow, hysteresis, minScale, recompute, lossChunkSize]);
        HelpGroups.Add(command, "LoRA and prefix tuning", loraDim, loraAlpha, loraDropout, loraTargets, loraModuleName, onlyLora, loraLr, loraAdapter, prefixTuning, numPrefixTokens, prefixAdapter);
        HelpGroups.Add(command, "Logging", [loggingSteps, .. hf.Logging]);
        HelpGroups.Add(command, "Distributed and DeepSpeed", [.. hf.Distributed, logEachRank, tensorParallel, pipelineParallel]);
        HelpGroups.Add(command, "Accepted from HF and DeepSpeed-Chat scripts, no effect here", hf.Inert);
        command.SetAction(parse =>
        {
            if (!CliOption.Given(parse, model) && !CliOption.Given(parse, data)
                && parse.GetValue(task)!.Trim().Equals("sequence-classification", StringComparison.OrdinalIgnoreCase))
            {
                return EmbeddedCommand.RunClassification(parse, output, seed, threads, maxSteps, task);
            }
            if (!CliOption.Given(parse, model) && !CliOption.Given(parse, data))
            {
                return EmbeddedCommand.Run(parse, output, seed, threads, maxSteps);
            }
            if (parse.GetValue(addBos) && parse.GetValue(noAddBos))
            {
                throw new InvalidInputException("--add-bos", "", "cannot be combined with --no-add-bos");
            }
            var values = hf.Resolve(parse, bf16, fp16, batch, accumulation);
            var optimizerName = values.Get(optimizer)!;
            var builder = Trainer.CreateCommandLineBuilder()
                .UseModel(parse.GetValue(model)!)
                .UseData(parse.GetValue(data)!, o =>
                {
                    o.Format = parse.GetValue(dataFormat)!;
                    o.PromptField = parse.GetValue(promptField);
                    o.AnswerField = parse.GetValue(answerField);
                    o.TextField = parse.GetValue(textField);
                    o.TrainOn = parse.GetValue(trainOn)!;
                    o.ChatTemplate = parse.GetValue(chatTemplate);
                    o.Packing = parse.GetValue(packing);
                    o.PackingAttention = parse.GetValue(packingAttention)!;
                    o.AddBos = parse.GetValue(addBos) ? true : parse.GetValue(noAddBos) ? false : null;
                    o.SkipBadRows = parse.GetValue(skipBadRows);
                    o.DataSplit = parse.GetValue(dataSplit);
                    o.EvalSplitRatio = parse.GetValue(evalSplitRatio);
                    o.MaxSequenceLength = parse.GetValue(maxSeqLen);
                    o.Shuffle = !parse.GetValue(noShuffle);
                    o.UseCache = !parse.GetValue(noDataCache);
                })
                .UseOutput(parse.GetValue(output)!, parse.GetValue(overwrite))
                .UseEvaluation(parse.GetValue(evalSteps), o =>
                {
                    o.Strategy = parse.GetValue(evalStrategy);
                    o.BatchSize = parse.GetValue(evalBatch);
                    o.ExactMatchSamples = parse.GetValue(exactMatch);
                })
                .UseSchedule(o =>
                {
                    o.Name = values.Get(scheduler)!;
                    o.Kwargs = parse.GetValue(schedulerKwargs);
                    var warmup = Functional.Training.TrainOptionsModule.warmupOfSteps(values.Get(warmupSteps), parse.GetValue(warmupRatio));
                    o.WarmupSteps = warmup.Item1;
                    o.WarmupRatio = warmup.Item2;
                })
                .UseCheckpoints(parse.GetValue(saveSteps), o =>
                {
                    o.Strategy = parse.GetValue(saveStrategy)!;
                    o.TotalLimit = parse.GetValue(saveTotalLimit);
                    o.Metric = parse.GetValue(metric)!;
                    o.GreaterIsBetter = parse.GetValue(greaterIsBetter);
                    o.LoadBestModelAtEnd = parse.GetValue(loadBest);
                    o.EarlyStoppingPatience = parse.GetValue(patience);
                })
                .UseBatchSize(values.Get(batch))
                .AccumulateGradients(values.Get(accumulation))
                .ClipGradients(values.Get(maxGradNorm))
                .TrainForEpochs(parse.GetValue(epochs))
                .UseSeed(parse.GetValue(seed))
                .UseLogging(parse.GetValue(loggingSteps), hf.LoggingStrategy(parse))
                .UseTensorBoard(hf.TensorBoard(parse), hf.LoggingDir(parse))
                .UseThreads(parse.GetValue(threads));
            var optimizerKind = OptimizerKindModule.parse("--optim", optimizerName);
            _ = optimizerKind.Tag switch
            {
                OptimizerKind.Tags.AdamW => builder.UseAdamW(values.Get(lr), o =>
                {
                    o.Beta1 = values.Get(beta1);
                    o.Beta2 = values.Get(beta2);
                    o.Epsilon = values.Get(epsilon);
                    o.WeightDecay = values.Get(weightDecay);
                    o.Amsgrad = parse.GetValue(amsgrad);
                    o.Maximize = parse.GetValue(maximize);
                }),
                OptimizerKind.Tags.Sgd => builder.UseSgd(values.Get(lr), o =>
                {
                    o.Momentum = parse.GetValue(momentum);
                    o.Nesterov = parse.GetValue(nesterov);
                    o.Dampening = parse.GetValue(dampening);
                    o.WeightDecay = values.Get(weightDecay);
                }),
                OptimizerKind.Tags.Lion => builder.UseLion(values.Get(lr), values.Get(beta1), values.Get(beta2), values.Get(weightDecay)),
                OptimizerKind.Tags.Adafactor => builder.UseAdafactor(values.Get(lr), values.Get(weightDecay)),
                _ => builder.UseRmsProp(values.Get(lr), parse.GetValue(momentum), values.Get(weightDecay)),
            };
            builder.UseOptimizerArgs(parse.GetValue(optimArgs));
            if (optimizerKind.Tag != OptimizerKind.Tags.AdamW && (parse.GetValue(amsgrad) || parse.GetValue(maximize)))
            {
                throw new InvalidInputException(parse.GetValue(amsgrad) ? "--amsgrad" : "--maximize", "", "applies to the adamw optimizers only");
            }
            if (optimizerKind.Tag != OptimizerKind.Tags.Sgd && parse.GetValue(dampening) != 0.0)
            {
                throw new InvalidInputException("--dampening", "", "applies to the sgd optimizer only");
            }
            if (values.Get(maxSteps) != -1)
            {
                builder.TrainForSteps(values.Get(maxSteps));
            }
            if (parse.GetValue(evalData) is { } evalFile)
            {
                builder.UseEvalData(evalFile);
            }
            if (parse.GetValue(tokenizer) is { } encoding)
            {
                builder.UseTokenizer(encoding);
            }
            if (parse.GetValue(resume) is { } checkpoint)
            {
                builder.ResumeFrom(checkpoint);
            }
            if (parse.GetValue(recompute))
            {
                builder.UseGradientCheckpointing();
            }
            if (CliOption.Given(parse, lossChunkSize))
            {
                builder.UseLossChunkSize(parse.GetValue(lossChunkSize));
            }
            if (parse.GetValue(disableDropout))
            {
                builder.DisableDropout();
            }
            if (CliOption.Given(parse, resizeMultiple))
            {
                builder.ResizeTokenEmbeddingsToMultipleOf(parse.GetValue(resizeMultiple));
            }
            if (CliOption.Given(parse, maxShardSize))
            {
                builder.UseMaxShardSize(parse.GetValue(maxShardSize)!);
            }
            if (values.ZeroStage != 0
                || values.ReduceBucketSize != Functional.Distributed.CollectiveBucketsModule.DefaultElements
                || values.AllgatherBucketSize != Functional.Distributed.CollectiveBucketsModule.DefaultElements
                || parse.GetValue(logEachRank)
                || parse.GetValue(tensorParallel) != 1
                || parse.GetValue(pipelineParallel) != 1)
            {
                builder.UseDistributed(d =>
                {
                    d.ZeroStage = values.ZeroStage;
                    d.ReduceBucketSize = values.ReduceBucketSize;
                    d.AllgatherBucketSize = values.AllgatherBucketSize;
                    d.LogEachRank = parse.GetValue(logEachRank);
                    d.TensorParallelDegree = parse.GetValue(tensorParallel);
                    d.PipelineParallelDegree = parse.GetValue(pipelineParallel);
                });
            }
            if (values.Precision == "bf16")
            {
                builder.UseBf16();
            }
            if (values.Precision == "fp16")
            {
                builder.UseFp16(o =>
                {
                    o.StaticScale = values.Get(lossScale);
                    o.InitialScalePower = values.Get(scalePower);
                    o.Window = values.Get(scaleWindow);
                    o.Hysteresis = values.Get(hysteresis);
                    o.MinScale = values.Get(minScale);
                });
            }
            if (parse.GetValue(loraAdapter) is { } adapter)
            {
                builder.UseLoraAdapter(adapter, o =>
                {
                    o.OnlyOptimizeLora = parse.GetValue(onlyLora);
                    o.LearningRate = parse.GetValue(loraLr);
                });
            }
            else
            {
                // Rank 0 is no LoRA; the facade refuses the other LoRA options without a rank.
                builder.UseLora(parse.GetValue(loraDim), o =>
                {
                    o.Alpha = parse.GetValue(loraAlpha);
                    o.Dropout = parse.GetValue(loraDropout);
                    o.ModuleName = parse.GetValue(loraModuleName);
                    o.TargetModules = parse.GetValue(loraTargets)?.Split(',') ?? [];
                    o.OnlyOptimizeLora = parse.GetValue(onlyLora);
                    o.LearningRate = parse.GetValue(loraLr);
                });
            }
            builder.UseTask(parse.GetValue(task)!, o =>
            {
                o.LabelField = parse.GetValue(labelField);
                o.ChosenField = parse.GetValue(chosenField);
                o.RejectedField = parse.GetValue(rejectedField);
                o.NumLabels = parse.GetValue(numLabels);
                o.PadTokenId = parse.GetValue(padTokenId);
            });
            if (parse.GetValue(prefixTuning))
            {
                builder.UsePrefixTuning(parse.GetValue(numPrefixTokens));
            }
            else if (CliOption.Given(parse, numPrefixTokens))
            {
                builder.UsePrefixTokenCount(parse.GetValue(numPrefixTokens));
            }
            if (parse.GetValue(prefixAdapter) is { } prefixFolder)
            {
                builder.UsePrefixAdapter(prefixFolder);
            }
            FineTuneResult result;
            using (var signals = new StopOnSignal("finishing the current step and saving a checkpoint"))
            using (var progress = new ProgressDisplay(0))
            {
                result = builder
                    .OnProgress(progress.Report)
                    .OnEvaluation(e => progress.Message(Report.EvaluationLine(e)))
                    .OnMessage(progress.Message)
                    .Build()
                    .Fit(signals.Token);
                if (result.Interrupted)
                {
                    progress.Message($"interrupted by {signals.Received}: saved {result.Checkpoints.LastOrDefault()}");
                    return signals.ExitCode;
                }
            }
            // Under mpirun process 0 reports for the run.
            if (Functional.Distributed.Communicator.fromEnvironment().Rank == 0)
            {
                Report.Print(result);
            }
            return 0;
        });
        return command;
    }
}
