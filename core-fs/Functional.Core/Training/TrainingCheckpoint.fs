namespace Functional.Training

open System
open System.IO
open System.Security.Cryptography
open System.Text.Json
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Distributed
open Functional.Models
open Functional.Optim

/// One setting a resumed run must share with the run that saved the checkpoint.
type SignatureEntry =
    { /// The setting's snake_case name: the key trainer_state.json stores the value under.
      Key: string
      /// How messages name the setting (and the key signature format version 1 stored it under).
      Label: string
      /// The value as plain text ("key=value key=value" for settings with parts).
      Value: string
      /// The value as signature format version 1 wrote it, to compare checkpoints written then.
      LegacyValue: string }

/// Everything a run writes into a checkpoint besides tensors.
[<NoComparison; NoEquality>]
type CheckpointRecord =
    { /// metrics.jsonl up to this step, line by line (HF's log_history).
      History: string list
      /// The best value of the metric so far and the checkpoint that had it.
      Best: (float * string) option
      /// Evaluations without improvement so far, and the best metric evaluated (early stopping).
      EarlyStopping: int * float option
      /// Input tokens trained on so far, padding included (HF's num_input_tokens_seen: the elements of
      /// every micro-batch's input_ids).
      InputTokensSeen: int64
      /// Floating-point operations so far (HF's total_flos: 6 x non-embedding parameters x input tokens,
      /// PreTrainedModel.floating_point_ops).
      TotalFlos: float
      /// The sum of the per-step losses so far and the steps it holds: the summary's train_loss is their
      /// mean (HF's average training loss of the run).
      TrainLoss: float * int
      /// With reduce_lr_on_plateau: the schedule's state after this step's evaluation (a resumed run goes
      /// on from it); None for the other schedules.
      Plateau: PlateauState option }

/// What a checkpoint gives back to resume a run.
[<NoComparison; NoEquality>]
type RestoredCheckpoint =
    { /// The checkpoint folder.
      Path: string
      /// Optimizer state, random state and data position.
      Resume: ResumePoint
      /// metrics.jsonl lines, best metric, early stopping counter.
      Record: CheckpointRecord }

/// Checkpoints of a training run: `OUTPUT/checkpoint-N/` holds the model in HF layout (config.json,
/// model.safetensors, tokenizer files), optimizer.safetensors (every optimizer buffer split per
/// parameter as "PARAMETER:STATE", e.g. "model.norm.weight:1.0.adam.exp_avg", and the counters such as
/// "1.0.adam.step"), rng_state.safetensors (torch's random state), and trainer_state.json with HF's
/// fields plus a "functional" section: the data position (epoch, micro-batch, optimizer step) and the
/// run's signature, which a resume must match.
[<RequireQualifiedAccess>]
module TrainingCheckpoint =

    let private jsonOptions =
        JsonSerializerOptions(NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)

    let private number (x: float) = x.ToString("R", Globalization.CultureInfo.InvariantCulture)

    /// A hash of the training rows, their prompt lengths, their train masks (when they have them) and, for rows
    /// packed in isolation, their segments.
    let dataFingerprint (dataset: TokenizedDataset) =
        use sha = IncrementalHash.CreateHash HashAlgorithmName.SHA256
        for row, prompt in Array.zip dataset.Rows dataset.PromptLengths do
            sha.AppendData(BitConverter.GetBytes row.Length)
            for id in row do sha.AppendData(BitConverter.GetBytes id)
            sha.AppendData(BitConverter.GetBytes prompt)
        for mask in dataset.TrainMasks do
            sha.AppendData(mask |> Array.map (fun kept -> if kept then 1uy else 0uy))
        // Rows packed in isolation also hash their samples' boundaries (unpacked data hashes as before).
        for segments in dataset.Segments do
            sha.AppendData(BitConverter.GetBytes segments.Length)
            for s in segments do
                sha.AppendData(BitConverter.GetBytes s.Length)
                sha.AppendData(BitConverter.GetBytes s.PromptLength)
        Convert.ToHexString(sha.GetHashAndReset()).ToLowerInvariant()

    /// The signature format this version writes: 2 stores each entry under its setting's snake_case key
    /// with plain "key=value" text; 1 (no "signature_version" field) stored entries under command-line
    /// labels with F#'s structural printing of records.
    [<Literal>]
    let SignatureVersion = 2

    let private scheduleKwargs (o: ScheduleOptions) =
        let shape (s: PhaseShape) =
            match s with
            | PhaseShape.Linear -> "linear"
            | PhaseShape.Cosine -> "cosine"
            | PhaseShape.OneMinusSqrt -> "1-sqrt"
        Peft.Adapter.signatureText
            [ match o.NumCycles with Some v -> "num_cycles", number v | None -> ()
              match o.LrEnd with Some v -> "lr_end", number v | None -> ()
              match o.Power with Some v -> "power", number v | None -> ()
              match o.Timescale with Some v -> "timescale", string v | None -> ()
              match o.MinLr with
              | Some(MinLearningRate.Absolute v) -> "min_lr", number v
              | Some(MinLearningRate.RatioOfBase v) -> "min_lr_rate", number v
              | None -> ()
              match o.NumDecaySteps with Some v -> "num_decay_steps", string v | None -> ()
              match o.NumStableSteps with Some v -> "num_stable_steps", string v | None -> ()
              match o.WarmupShape with Some v -> "warmup_type", shape v | None -> ()
              match o.DecayShape with Some v -> "decay_type", shape v | None -> ()
              match o.MinLrRatio with Some v -> "min_lr_ratio", number v | None -> ()
              match o.WarmupLrRate with Some v -> "warmup_lr_rate", number v | None -> ()
              match o.Mode with Some PlateauMode.Min -> "mode", "min" | Some PlateauMode.Max -> "mode", "max" | None -> ()
              match o.Factor with Some v -> "factor", number v | None -> ()
              match o.Patience with Some v -> "patience", string v | None -> ()
              match o.Threshold with Some v -> "threshold", number v | None -> ()
              match o.ThresholdMode with
              | Some ThresholdMode.Relative -> "threshold_mode", "rel"
              | Some ThresholdMode.Absolute -> "threshold_mode", "abs"
              | None -> ()
              match o.Cooldown with Some v -> "cooldown", string v | None -> ()
              match o.Eps with Some v -> "eps", number v | None -> () ]

    let private precisionName (p: Precision) =
        match p with
        | Precision.Fp32 -> "fp32"
        | Precision.Bf16 -> "bf16"
        | Precision.Fp16 c ->
            Peft.Adapter.signatureText
                [ "precision", "fp16"
                  "loss_scale", number c.LossScale
                  "initial_scale_power", string c.InitialScalePower
                  "loss_scale_window", string c.LossScaleWindow
                  "hysteresis", string c.Hysteresis
                  "consecutive_hysteresis", (if c.ConsecutiveHysteresis then "true" else "false")
                  "min_loss_scale", number c.MinLossScale ]

    /// Version 1 keyed its entries by their labels as the command line spells them (--learning-rate,
    /// --bf16 / --fp16): the label with each setting mention written as its option.
    let private legacyKey (label: string) = SettingText.render (fun name -> "--" + name.Replace('_', '-')) label

    let private entry key label value legacy = { Key = key; Label = label; Value = value; LegacyValue = legacy }

    /// ScheduleOptions as signature format version 1 knew it: its %A text is what those checkpoints hold
    /// (the fields added since, all None for a run that could have written one, are left out).
    type private ScheduleOptionsV1 =
        { NumCycles: float option
          LrEnd: float option
          Power: float option
          Timescale: int option
          MinLr: MinLearningRate option
          NumDecaySteps: int option
          NumStableSteps: int option
          WarmupShape: PhaseShape option
          DecayShape: PhaseShape option
          MinLrRatio: float option }

    let private legacyScheduleKwargs (o: ScheduleOptions) =
        sprintf "%A"
            { ScheduleOptionsV1.NumCycles = o.NumCycles
              LrEnd = o.LrEnd
              Power = o.Power
              Timescale = o.Timescale
              MinLr = o.MinLr
              NumDecaySteps = o.NumDecaySteps
              NumStableSteps = o.NumStableSteps
              WarmupShape = o.WarmupShape
              DecayShape = o.DecayShape
              MinLrRatio = o.MinLrRatio }
    let private same key label value = entry key label value value

    /// The optimizer's signature value: its kind, followed by its variants when any is on ("AdamW (amsgrad,
    /// maximize)", "Sgd (dampening 0.5)"), so checkpoints of runs without them keep their value.
    let private optimizerSignature (o: TrainOptions) =
        let variants =
            [ if o.Amsgrad then yield "amsgrad"
              if o.Maximize then yield "maximize"
              if o.Dampening <> 0.0 then yield sprintf "dampening %s" (number o.Dampening)
              if o.RmsPropAlpha <> 0.99 then yield sprintf "alpha %s" (number o.RmsPropAlpha)
              if o.RmsPropEpsilon <> 1e-8 then yield sprintf "eps %s" (number o.RmsPropEpsilon)
              if o.RmsPropCentered then yield "centered"
              if o.AdafactorClipThreshold <> 1.0 then yield sprintf "clip_threshold %s" (number o.AdafactorClipThreshold)
              if o.AdafactorDecayRate <> -0.8 then yield sprintf "decay_rate %s" (number o.AdafactorDecayRate)
              if o.AdafactorScaleParameter then yield "scale_parameter" ]
        if variants.IsEmpty then string o.Optimizer
        else sprintf "%O (%s)" o.Optimizer (String.Join(", ", variants))

    /// What a resumed run must share with the run that saved the checkpoint, one entry per setting. The
    /// run's length (max_steps / num_train_epochs) is not part of it: as with HF, a resume may train
    /// further than the saved run planned, the schedule (and a warmup_ratio's warmup) following the new
    /// total; FineTune refuses a total below the checkpoint's step.
    let rec signature (plan: LoopPlan) (model: CausalLm) (dataset: TokenizedDataset) : SignatureEntry list =
        signatureFor 1 plan model dataset

    /// signature of a run of worldSize processes: the batch entry is the rows of one micro-step over all
    /// processes (per_device_train_batch_size x worldSize, per_device_train_batch_size itself for one
    /// process), so a checkpoint resumes on another number of processes with the same global batch.
    and signatureFor (worldSize: int) (plan: LoopPlan) (model: CausalLm) (dataset: TokenizedDataset) : SignatureEntry list =
        let o = plan.Options
        [ same "model_config" "{model} (config.json)" (ModelConfig.toJson model.Config)
          same "optimizer" "{optimizer}" (optimizerSignature o)
          same "learning_rate" "{learning_rate}" (number o.LearningRate)
          same "weight_decay" "{weight_decay}" (number o.WeightDecay)
          same "adam_beta1" "{adam_beta1}" (number o.AdamBeta1)
          same "adam_beta2" "{adam_beta2}" (number o.AdamBeta2)
          same "adam_epsilon" "{adam_epsilon}" (number o.AdamEpsilon)
          same "momentum" "{momentum}" (number o.Momentum)
          same "nesterov" "{nesterov}" (string o.Nesterov)
          same "max_grad_norm" "{max_grad_norm}" (number o.MaxGradNorm)
          same "lr_scheduler_type" "{lr_scheduler_type}" (Schedule.name o.LrSchedulerType)
          entry "lr_scheduler_kwargs" "{lr_scheduler_kwargs}" (scheduleKwargs o.LrSchedulerOptions) (legacyScheduleKwargs o.LrSchedulerOptions)
          same "warmup" "{num_warmup_steps} / {warmup_ratio}" (sprintf "%d / %s" o.NumWarmupSteps (number o.WarmupRatio))
          same "per_device_train_batch_size" "{per_device_train_batch_size}" (string (o.PerDeviceTrainBatchSize * worldSize))
          same "gradient_accumulation_steps" "{gradient_accumulation_steps}" (string o.GradientAccumulationSteps)
          same "max_seq_len" "{max_seq_len}" (string o.MaxSeqLen)
          same "seed" "{seed}" (string o.Seed)
          same "no_shuffle" "{no_shuffle}" (string (not o.Shuffle))
          entry "precision" "{bf16} / {fp16}" (precisionName o.Precision) (sprintf "%A" o.Precision)
          same "data_fingerprint" "{data} (tokenized rows)" (dataFingerprint dataset) ]

    /// The signature entries of a job's adapters: LoRA's (legacyLora: the text version 1 wrote for it) and
    /// prefix tuning's, "none" for an adapter kind the run does not use.
    let adapterSignature (lora: (string * string) option) (prefix: string option) : SignatureEntry list =
        [ entry "lora" "{lora}-*" (lora |> Option.map fst |> Option.defaultValue "none") (lora |> Option.map snd |> Option.defaultValue "none")
          same "prefix_tuning" "{prefix_tuning} / {num_prefix_tokens}" (defaultArg prefix "none") ]

    let private oneLine (text: string) =
        let flat = text.Replace("\r", "").Replace("\n", " ")
        if flat.Length > 80 then flat.Substring(0, 77) + "..." else flat

    /// Raises InvalidInputException listing every signature entry that differs. saved holds the
    /// checkpoint's entries as written by signature format version (1: keyed by label with the legacy
    /// text; 2: keyed by setting); the message names each entry by its label.
    let checkSignature (checkpoint: string) (version: int) (saved: (string * string) list) (current: SignatureEntry list) =
        let savedMap = Map saved
        let differences =
            [ for e in current do
                  let key, value = if version < 2 then legacyKey e.Label, e.LegacyValue else e.Key, e.Value
                  match savedMap.TryFind key with
                  | Some old when old = value -> ()
                  | Some old -> yield sprintf "%s: the checkpoint was trained with %s, this run has %s" e.Label (oneLine old) (oneLine value)
                  | None -> yield sprintf "%s: the checkpoint does not record it" e.Label ]
        if not differences.IsEmpty then
            InvalidInput.fail checkpoint "trainer_state.json"
                ("the run differs from the one that saved this checkpoint: " + String.Join("; ", differences))

    /// Splits the optimizer's flat buffers per parameter; counters and other tensors keep their names.
    let optimizerTensors (flat: FlatParameters) (state: ITransformState) : (string * torch.Tensor) list =
        let total = flat.Values.numel ()
        [ for name, tensor in Transform.stateTensors state do
              if tensor.dim () = 1L && tensor.numel () = total then
                  for parameter in flat.Names do
                      yield parameter + ":" + name, FlatParameters.sliceOf flat tensor parameter
              else yield name, tensor ]

    /// The optimizer file of process rank of size under ZeRO stage 1 or 2: each process stores its block.
    let optimizerShardFile (rank: int) (size: int) = sprintf "optimizer-rank-%05d-of-%05d.safetensors" rank size

    let private shardFilePattern =
        Text.RegularExpressions.Regex(@"^optimizer-rank-([0-9]{5})-of-([0-9]{5})\.safetensors$", Text.RegularExpressions.RegexOptions.CultureInvariant)

    /// The parts of the parameters a block of the flat buffers holds: (parameter, first element within the
    /// parameter, first element within the block, elements).
    let private fragments (flat: FlatParameters) (shard: ShardRange) =
        [ for (name, offset), count in List.zip (List.zip flat.Names flat.Offsets) flat.Counts do
              let first = max offset shard.Offset
              let last = min (offset + count) (shard.Offset + shard.Count)
              if last > first then yield name, first - offset, first - shard.Offset, last - first ]

    /// What one process stores of a sharded optimizer state (its block shard of the flat buffers): each
    /// buffer's part of every parameter the block touches, as "PARAMETER:STATE" (1-D), counters under
    /// their names, and metadata "fragment:PARAMETER" = "first,count" (elements within the parameter).
    let rec optimizerShardTensors (flat: FlatParameters) (shard: ShardRange) (state: ITransformState) : (string * torch.Tensor) list * (string * string) list =
        optimizerFragmentTensors (fragments flat shard) shard.Count state

    /// optimizerShardTensors of a state whose buffers (of length elements) hold the given parameter parts
    /// (parameter, first element within it, first element in the buffers, elements).
    and private optimizerFragmentTensors (parts: (string * int64 * int64 * int64) list) (length: int64) (state: ITransformState) =
        [ for name, tensor in Transform.stateTensors state do
              if tensor.dim () = 1L && tensor.numel () = length then
                  for parameter, _, inBlock, count in parts do
                      yield parameter + ":" + name, tensor.narrow(0L, inBlock, count)
              else yield name, tensor ],
        [ for parameter, inParameter, _, count in parts -> "fragment:" + parameter, sprintf "%d,%d" inParameter count ]

    /// Reads the optimizer state of a checkpoint folder as optimizerTensors lays it out (whole
    /// "PARAMETER:STATE" tensors and counters), from optimizer.safetensors, or from the processes' block
    /// files (optimizer-rank-R-of-N.safetensors) joined: every file of 0 .. N-1 must be there and their
    /// fragments must cover every parameter exactly once.
    let private readOptimizerState (folder: string) : string * Map<string, torch.Tensor> =
        let single = Path.Combine(folder, "optimizer.safetensors")
        if File.Exists single then single, Safetensors.load single
        else
            let shards =
                [ for file in Directory.GetFiles folder do
                      let m = shardFilePattern.Match(Path.GetFileName file)
                      if m.Success then yield int m.Groups[1].Value, int m.Groups[2].Value, file ]
                |> List.sortBy (fun (rank, _, _) -> rank)
            match shards with
            | [] -> InvalidInput.fail single "" "missing: the checkpoint holds neither optimizer.safetensors nor the processes' optimizer-rank-R-of-N.safetensors files"
            | (_, size, _) :: _ ->
                for rank in 0 .. size - 1 do
                    match shards |> List.filter (fun (r, s, _) -> r = rank && s = size) with
                    | [ _ ] -> ()
                    | _ -> InvalidInput.fail (Path.Combine(folder, optimizerShardFile rank size)) "" (sprintf "missing: the checkpoint was saved by %d processes and needs the block file of each" size)
                match shards |> List.tryFind (fun (_, s, _) -> s <> size) with
                | Some(_, _, file) -> InvalidInput.fail file "" (sprintf "is from a run of another number of processes than %s" (optimizerShardFile 0 size))
                | None -> ()
                let pieces = Collections.Generic.Dictionary<string, (int64 * torch.Tensor) list>()
                let mutable counters = Map.empty
                for rank, _, file in shards do
                    let header = Safetensors.readHeader file
                    let tensors = Safetensors.load file
                    for KeyValue(key, tensor) in tensors do
                        match key.IndexOf ':' with
                        | -1 -> if rank = 0 then counters <- counters.Add(key, tensor)
                        | colon ->
                            let parameter = key.Substring(0, colon)
                            let first =
                                match header.Metadata.TryFind("fragment:" + parameter) with
                                | Some text ->
                                    match text.Split ',' with
                                    | [| a; _ |] ->
                                        match Int64.TryParse a with
                                        | true, v -> v
                                        | _ -> InvalidInput.fail file ("fragment:" + parameter) (sprintf "expected \"first,count\", got '%s'" text)
                                    | _ -> InvalidInput.fail file ("fragment:" + parameter) (sprintf "expected \"first,count\", got '%s'" text)
                                | None -> InvalidInput.fail file ("fragment:" + parameter) "missing from the metadata: where the block's part of the parameter starts"
                            let existing = match pieces.TryGetValue key with | true, l -> l | _ -> []
                            pieces[key] <- (first, tensor.reshape(-1L)) :: existing
                let joined =
                    [ for KeyValue(key, parts) in pieces ->
                          let ordered = parts |> List.sortBy fst
                          let mutable next = 0L
                          for first, t in ordered do
                              if first <> next then
                                  InvalidInput.fail folder key (sprintf "the processes' blocks do not join: a part starts at element %d where %d was expected" first next)
                              next <- first + t.numel ()
                          key, torch.cat(Collections.Generic.List(ordered |> List.map snd), 0L) ]
                Path.Combine(folder, optimizerShardFile 0 size), Map.ofList joined |> Map.fold (fun acc k v -> Map.add k v acc) counters

    /// Reassembles what optimizerTensors wrote into flat buffers, in the parameters' order.
    let private flatOptimizerTensors (path: string) (parameterNames: string list) (stored: Map<string, torch.Tensor>) =
        let perParameter, whole = stored |> Map.partition (fun name _ -> name.Contains ':')
        let buffers =
            perParameter
            |> Map.toList
            |> List.map (fun (name, _) -> name.Substring(name.IndexOf ':' + 1))
            |> List.distinct
        [ yield! Map.toList whole
          for buffer in buffers ->
              let pieces =
                  [ for parameter in parameterNames ->
                        match stored.TryFind(parameter + ":" + buffer) with
                        | Some t -> t.reshape(-1L)
                        | None -> InvalidInput.fail path (parameter + ":" + buffer) "missing from the optimizer state" ]
              buffer, torch.cat(Collections.Generic.List pieces, 0L) ]

    /// Writes OUTPUT/checkpoint-N atomically (see CheckpointFolder.write) and returns its path. Every
    /// process of the run (context.Communicator) calls it: process 0 writes the folder; when the optimizer
    /// state is sharded (ZeRO stage 1 or 2: context.OptimizerShard is a block), each other process first
    /// writes its block's optimizer-rank-R-of-N.safetensors into `.checkpoint-N.staging-rankR`, and process 0
    /// moves them into the checkpoint before its manifest (which lists every file) is written. Returns on
    /// every process once the checkpoint is complete.
    let rec save
        (outputDir: string)
        (plan: LoopPlan)
        (model: CausalLm)
        (sourceConfig: string option)
        (extraFiles: string list)
        (signature: SignatureEntry list)
        (extraWriters: (string * (string -> unit)) list)
        (context: StepContext)
        (record: CheckpointRecord)
        : string =
        saveWith None outputDir plan model sourceConfig extraFiles signature extraWriters context record

    /// save, with the optimizer tensors to write given (Some: optimizerTensors' layout, whole per parameter;
    /// a tensor-parallel run gathers its ranks' blocks into them) instead of taken from context's state.
    and saveWith
        (optimizerOverride: (string * torch.Tensor) list option)
        (outputDir: string)
        (plan: LoopPlan)
        (model: CausalLm)
        (sourceConfig: string option)
        (extraFiles: string list)
        (signature: SignatureEntry list)
        (extraWriters: (string * (string -> unit)) list)
        (context: StepContext)
        (record: CheckpointRecord)
        : string =
        let step = context.Log.Step
        let o = plan.Options
        let raw (value: obj) = JsonSerializer.Serialize(value, jsonOptions)
        let stepsPerEpoch = Accumulation.stepsPerEpoch plan.Accumulation
        let state =
            { Epoch = context.Log.Epoch
              GlobalStep = step
              MaxSteps = plan.TotalSteps
              // HF's Trainer: with max_steps, the epochs those steps reach (rounded up); else the epochs asked for.
              NumTrainEpochs =
                if o.MaxSteps > 0 then (plan.TotalSteps + stepsPerEpoch - 1) / stepsPerEpoch
                else int (Math.Ceiling o.NumTrainEpochs)
              LoggingSteps = o.LoggingSteps
              // HF's TrainingArguments: eval_steps defaults to logging_steps.
              EvalSteps = if o.EvalSteps > 0 then o.EvalSteps else o.LoggingSteps
              SaveSteps = o.SaveSteps
              TrainBatchSize = o.PerDeviceTrainBatchSize
              TotalFlos = record.TotalFlos
              NumInputTokensSeen = record.InputTokensSeen
              BestMetric = record.Best |> Option.map fst
              BestGlobalStep = record.Best |> Option.bind (snd >> CheckpointFolder.stepOf)
              BestModelCheckpoint = record.Best |> Option.map snd
              LogHistory = record.History
              Functional =
                Map
                    [ "data_position",
                      raw (dict [ "epoch", context.Accumulation.Epoch
                                  "micro_batch_in_epoch", context.Accumulation.MicroBatchInEpoch
                                  "optimizer_step", context.Accumulation.OptimizerStep ])
                      "signature_version", raw SignatureVersion
                      "signature", raw (dict [ for e in signature -> e.Key, e.Value ])
                      "loss_scaler", (match context.LossScale with Some state -> raw state | None -> "null")
                      "early_stopping_counter", raw (fst record.EarlyStopping)
                      "train_loss_sum", raw (fst record.TrainLoss)
                      "train_loss_steps", raw (snd record.TrainLoss)
                      "lr_scheduler_plateau", (match record.Plateau with Some state -> raw state | None -> "null")
                      "early_stopping_best", (match snd record.EarlyStopping with Some v -> raw v | None -> "null") ] }
        let communicator = context.Communicator
        let size = communicator.Size
        let shard = context.OptimizerShard
        let sharded = context.OptimizerFragments.IsSome || shard <> Sharding.whole (context.Parameters.Values.numel ())
        let root = Path.GetFullPath outputDir
        let rankFolder rank = Path.Combine(root, sprintf ".checkpoint-%d.staging-rank%d" step rank)
        let writeBlock (path: string) =
            let tensors, fragments =
                match context.OptimizerFragments with
                | Some parts ->
                    optimizerFragmentTensors [ for f in parts -> f.Parameter, f.First, f.Offset, f.Count ] (context.Parameters.Values.numel ()) context.OptimizerState
                | None -> optimizerShardTensors context.Parameters shard context.OptimizerState
            let metadata = Map([ "format", "pt"; "world_size", string size; "rank", string communicator.Rank ] @ fragments)
            Safetensors.save path metadata tensors
        if sharded && communicator.Rank <> 0 then
            let folder = rankFolder communicator.Rank
            if Directory.Exists folder then Directory.Delete(folder, true)
            Directory.CreateDirectory folder |> ignore
            writeBlock (Path.Combine(folder, optimizerShardFile communicator.Rank size))
        // The blocks are written; process 0 writes the checkpoint.
        if sharded then communicator.Barrier()
        if communicator.Rank <> 0 then
            communicator.Barrier()
            if Directory.Exists(rankFolder communicator.Rank) then Directory.Delete(rankFolder communicator.Rank, true)
            Path.Combine(root, sprintf "checkpoint-%d" step)
        else
        let optimizerWriters =
            if not sharded then
                [ "optimizer.safetensors", (fun (path: string) ->
                      let tensors = optimizerOverride |> Option.defaultWith (fun () -> optimizerTensors context.Parameters context.OptimizerState)
                      Safetensors.save path (Map [ "format", "pt" ]) tensors) ]
            else
                [ yield optimizerShardFile 0 size, writeBlock
                  for rank in 1 .. size - 1 ->
                      optimizerShardFile rank size, (fun (path: string) -> File.Move(Path.Combine(rankFolder rank, optimizerShardFile rank size), path)) ]
        let writers =
            [ yield "config.json", (fun (path: string) -> File.WriteAllText(path, HfModelFolder.configJson model sourceConfig))
              yield "model.safetensors", (fun path -> HfModelFolder.writeWeights path model)
              for file in extraFiles -> Path.GetFileName file, (fun path -> File.Copy(file, path, true))
              yield! optimizerWriters
              yield "rng_state.safetensors", (fun path ->
                  use rng = torch.get_rng_state ()
                  Safetensors.save path Map.empty [ "torch", rng ])
              yield "trainer_state.json", (fun path -> TrainerState.write path state)
              yield! extraWriters ]
        let written = CheckpointFolder.write outputDir step writers
        for rank in 1 .. size - 1 do
            if Directory.Exists(rankFolder rank) then Directory.Delete(rankFolder rank, true)
        communicator.Barrier()
        written

    let private functionalField (path: string) (state: TrainerState) (name: string) : JsonElement =
        match state.Functional.TryFind name with
        | Some value ->
            match JsonInput.tryParse value with
            | Ok root -> root
            | Error _ -> InvalidInput.fail path ("functional." + name) "not valid JSON"
        | None -> InvalidInput.fail path ("functional." + name) "missing: this checkpoint was not written by Functional"

    /// Reads a checkpoint folder (verified complete first) for a resume: checks the signature against the
    /// current run, loads the weights into the model (and, through loadExtra, e.g. LoRA adapters), and
    /// returns the optimizer state of the trainable parameters (in trainableNames' order), the random
    /// state and the data position.
    let rec restore
        (path: string)
        (model: CausalLm)
        (trainableNames: string list)
        (loadExtra: string -> unit)
        (signature: SignatureEntry list)
        : RestoredCheckpoint =
        restoreWith id path model trainableNames loadExtra signature

    /// restore, with the stored optimizer tensors (whole "PARAMETER:STATE" tensors and counters) passed
    /// through adjust before they become flat buffers: a tensor-parallel run keeps its blocks of them.
    and restoreWith
        (adjust: Map<string, torch.Tensor> -> Map<string, torch.Tensor>)
        (path: string)
        (model: CausalLm)
        (trainableNames: string list)
        (loadExtra: string -> unit)
        (signature: SignatureEntry list)
        : RestoredCheckpoint =
        CheckpointFolder.verify path
        let statePath = Path.Combine(path, "trainer_state.json")
        let state = TrainerState.read statePath
        let saved =
            [ for p in (functionalField statePath state "signature").EnumerateObject() -> p.Name, p.Value.GetString() ]
        let version =
            match state.Functional.TryFind "signature_version" with
            | Some _ ->
                let v = functionalField statePath state "signature_version"
                match v.ValueKind with
                | JsonValueKind.Number -> v.GetInt32()
                | _ -> InvalidInput.fail statePath "functional.signature_version" "expected an integer"
            | None -> 1
        if version > SignatureVersion then
            InvalidInput.fail statePath "functional.signature_version"
                (sprintf "version %d is newer than this version of Functional reads (%d)" version SignatureVersion)
        checkSignature path version saved signature
        HfModelFolder.loadWeightsInto path model
        loadExtra path
        let position = functionalField statePath state "data_position"
        let integer (name: string) =
            match position.TryGetProperty name with
            | true, v when v.ValueKind = JsonValueKind.Number -> v.GetInt32()
            | _ -> InvalidInput.fail statePath ("functional.data_position." + name) "expected an integer"
        let optimizerPath, stored = readOptimizerState path
        let optimizer = flatOptimizerTensors optimizerPath trainableNames (adjust stored)
        let rng = Safetensors.load (Path.Combine(path, "rng_state.safetensors"))
        { Path = path
          Resume =
            { Accumulation =
                { Accumulation.start with
                    Epoch = integer "epoch"
                    MicroBatchInEpoch = integer "micro_batch_in_epoch"
                    OptimizerStep = integer "optimizer_step" }
              OptimizerState = optimizer
              RandomState = rng["torch"]
              LossScale =
                match state.Functional.TryFind "loss_scaler" with
                | Some json when json <> "null" ->
                    let scaler = JsonSerializer.Deserialize<LossScalerState>(json, jsonOptions)
                    LossScaler.checkState statePath scaler
                    Some scaler
                | _ -> None }
          Record =
            { History = state.LogHistory
              // The best checkpoint is found beside this one, wherever the output folder is now.
              Best =
                Option.map2
                    (fun m (c: string) -> m, Path.Combine(Path.GetDirectoryName path, Path.GetFileName(Path.TrimEndingDirectorySeparator c)))
                    state.BestMetric state.BestModelCheckpoint
              InputTokensSeen = state.NumInputTokensSeen
              TotalFlos = state.TotalFlos
              // Checkpoints written before the sum was kept: the summary averages the steps trained since.
              TrainLoss =
                match state.Functional.TryFind "train_loss_sum", state.Functional.TryFind "train_loss_steps" with
                | Some _, Some _ ->
                    (functionalField statePath state "train_loss_sum").Deserialize<float>(jsonOptions),
                    (functionalField statePath state "train_loss_steps").GetInt32()
                | _ -> 0.0, 0
              Plateau =
                match state.Functional.TryFind "lr_scheduler_plateau" with
                | Some json when json <> "null" -> Some(JsonSerializer.Deserialize<PlateauState>(json, jsonOptions))
                | _ -> None
              EarlyStopping =
                (functionalField statePath state "early_stopping_counter").GetInt32(),
                (match (functionalField statePath state "early_stopping_best").ValueKind with
                 | JsonValueKind.Null -> None
                 | _ -> Some((functionalField statePath state "early_stopping_best").Deserialize<float>(jsonOptions))) } }
