namespace Functional.Training

open System
open System.Globalization
open System.IO
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Text

/// What a classification or reward job trains and evaluates with, prepared from its files.
[<NoComparison; NoEquality>]
type TaskSetup =
    { /// The sequence classifier (the base folder's backbone; its score loaded or initialized).
      Model: CausalLm
      /// Training and evaluation rows (EvalSamples empty: nothing is generated).
      Data: TrainAndEval
      /// The objective training and evaluation share.
      Objective: Objective
      /// Evaluates a model on a dataset of this setup (batch size and row length fixed by the job).
      Evaluate: CausalLm -> TokenizedDataset -> EvalResult
      /// What a resume must match besides the usual signature: the task, its labels and targets.
      Signature: SignatureEntry list }

/// The sequence-classification and reward-model tasks: labels, heads, data, objectives and evaluation.
[<RequireQualifiedAccess>]
module TaskJob =

    let private isInteger (value: float) = Double.IsFinite value && Math.Floor value = value

    let private integerText (text: string) =
        match Int64.TryParse(text.Trim(), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture) with
        | true, v -> Some v
        | _ -> None

    let private isIdLike (label: RawLabel) =
        match label with
        | RawLabel.Number n -> isInteger n
        | RawLabel.Text t -> (integerText t).IsSome

    /// The labels of the head a run trains: the base config's names when it names them or is a
    /// classifier already (its score fixes num_labels); else the sorted distinct label names of the
    /// training rows (HF's run_glue) when they are names; else ids: numLabels, or the largest id + 1;
    /// non-integer numbers (or numLabels 1) make a regression head.
    let labelsFor (configPath: string) (baseHead: ClassificationHead) (isClassifier: bool) (numLabels: int option) (train: LabeledRecord[]) : string[] * ProblemType =
        let fixedBy (labels: string[]) (problem: ProblemType) (why: string) =
            match numLabels with
            | Some n when n <> labels.Length ->
                InvalidInput.setting "num_labels" (sprintf "is %d, but %s %s has %d label(s)" n configPath why labels.Length)
            | _ -> labels, problem
        if isClassifier then fixedBy baseHead.Labels baseHead.ProblemType "(a sequence classifier)"
        elif not (SequenceClassification.hasDefaultNames baseHead.Labels) then fixedBy baseHead.Labels baseHead.ProblemType "(id2label)"
        elif train |> Array.exists (fun r -> not (isIdLike r.Label)) && (train |> Array.forall (fun r -> match r.Label with RawLabel.Text _ -> true | _ -> false)) then
            let names = train |> Array.map (fun r -> match r.Label with RawLabel.Text t -> t | RawLabel.Number _ -> "") |> Array.distinct |> Array.sortWith (fun a b -> String.CompareOrdinal(a, b))
            match numLabels with
            | Some n when n <> names.Length ->
                InvalidInput.setting "num_labels" (sprintf "is %d, but the training data holds %d distinct label names" n names.Length)
            | _ -> names, ProblemType.SingleLabel
        elif numLabels = Some 1 || train |> Array.exists (fun r -> match r.Label with RawLabel.Number n -> not (isInteger n) | _ -> false) then
            [| SequenceClassification.defaultLabel 0 |], ProblemType.Regression
        else
            let ids = train |> Array.map (fun r -> match r.Label with RawLabel.Number n -> int64 n | RawLabel.Text t -> integerText t |> Option.defaultValue 0L)
            let n = match numLabels with Some n -> n | None -> int (Array.max ids) + 1 |> max 2
            Array.init n SequenceClassification.defaultLabel, ProblemType.SingleLabel

    /// The target of each row under the head: a class id (a label name through label2id, or an id in
    /// [0, num_labels)) or a regression value. An unknown name or an id out of range raises
    /// InvalidInputException naming the file, line and field.
    let targets (head: ClassificationHead) (path: string) (labelField: string) (records: LabeledRecord[]) : float[] =
        let index = head.Labels |> Array.indexed |> Array.map (fun (i, l) -> l, i) |> dict
        let n = head.NumLabels
        let bad (r: LabeledRecord) problem : float = InvalidInput.fail path (sprintf "%d: %s" r.Line labelField) problem
        let byId (r: LabeledRecord) (id: int64) =
            if id < 0L || id >= int64 n then bad r (sprintf "label id %d is out of range; expected 0 .. %d (num_labels %d)" id (n - 1) n)
            else float id
        let known () = String.Join(", ", head.Labels |> Array.truncate 10 |> Array.map (sprintf "\"%s\""))
        records
        |> Array.map (fun r ->
            match head.ProblemType, r.Label with
            | ProblemType.Regression, RawLabel.Number v -> v
            | ProblemType.Regression, RawLabel.Text t ->
                match Double.TryParse(t, NumberStyles.Float, CultureInfo.InvariantCulture) with
                | true, v -> v
                | _ -> bad r (sprintf "expected a number (the model is a regression head), found \"%s\"" t)
            | ProblemType.SingleLabel, RawLabel.Text t ->
                match index.TryGetValue t with
                | true, i -> float i
                | _ ->
                    match integerText t with
                    | Some id -> byId r id
                    | None -> bad r (sprintf "unknown label \"%s\"; the model's labels are %s" t (known ()))
            | ProblemType.SingleLabel, RawLabel.Number v ->
                if isInteger v then byId r (int64 v) else bad r (sprintf "expected a label id (an integer), found %g" v))

    let private fingerprint (values: float[]) =
        let bytes = values |> Array.collect (fun v -> BitConverter.GetBytes v)
        Convert.ToHexString(Security.Cryptography.SHA256.HashData bytes).Substring(0, 16)

    let private entry key label value = { Key = key; Label = label; Value = value; LegacyValue = value }

    /// The evaluation rows: the evaluation file, else a hold-out of round(ratio * n) training rows (the
    /// first positions of Sampler.shuffled seed 1 n, as PromptDataset holds them out), else none.
    let private split (ratio: float) (seed: int64) (records: 'T[]) (evalRecords: 'T[] option) =
        match evalRecords with
        | Some e -> records, Some e
        | None when ratio > 0.0 ->
            let n = records.Length
            if n < 2 then InvalidInput.setting "eval_split_ratio" (sprintf "holding out evaluation rows needs at least 2 rows, found %d" n)
            let count = int (Math.Round(ratio * float n)) |> max 1 |> min (n - 1)
            let held = Array.zeroCreate n
            Sampler.shuffled seed 1 n |> Array.take count |> Array.iter (fun i -> held[i] <- true)
            let pick want = records |> Array.indexed |> Array.filter (fun (i, _) -> held[i] = want) |> Array.map snd
            pick false, Some(pick true)
        | None -> records, None

    let private configOf (modelPath: string) =
        let configPath = Path.Combine(modelPath, "config.json")
        let config = ModelConfig.load configPath
        let text = File.ReadAllText configPath
        configPath, config, text

    /// The padding id of the head: the task's, else config.json's; without either, batches of more than
    /// one row are refused (naming config.json's pad_token_id) before anything trains.
    let private padFor (configPath: string) (given: int64 option) (baseHead: ClassificationHead) (batchSizes: int list) (vocabSize: int) =
        let pad = given |> Option.orElse baseHead.PadTokenId
        match pad with
        | Some p when p >= int64 vocabSize -> InvalidInput.setting "pad_token_id" (sprintf "%d is outside the model's vocabulary (vocab_size %d)" p vocabSize)
        | Some _ -> pad
        | None when batchSizes |> List.exists (fun b -> b > 1) ->
            InvalidInput.fail configPath "pad_token_id"
                "is not set: a sequence classifier pools each row at its last token before padding, so batches of more than one row need a pad_token_id; set it in config.json (often the eos id), give {pad_token_id}, or use batch size 1"
        | None -> None

    let private refuseIds (dataset: TokenizedDataset) vocabSize = TokenizedDataset.checkVocabulary vocabSize dataset

    /// Prepares a sequence-classification job: reads the rows (text and label fields), decides the head
    /// (labelsFor; problem_type written), loads the model folder (its config changed by adjust, e.g.
    /// ModelFamily.withoutDropout) as that classifier (a causal-LM
    /// checkpoint's backbone with a new score, or a classifier's score too), tokenizes (HF's
    /// tokenizer(text), cut to maxSeqLen) and maps the labels (targets).
    let prepareClassification (adjust: ModelConfig -> ModelConfig) (modelPath: string) (dataPath: string) (evalPath: string option) (task: ClassificationTask) (options: TrainOptions) (evalSplitRatio: float) (tokenizer: TextTokenizer) : TaskSetup =
        let configPath, config, text = configOf modelPath
        let baseHead = SequenceClassification.readHead configPath text
        let isClassifier = SequenceClassification.isClassifierConfig text
        let trainRecords = TaskData.readLabeled dataPath task.TextField task.LabelField
        let evalRecords = evalPath |> Option.map (fun p -> TaskData.readLabeled p task.TextField task.LabelField)
        let trainRecords, evalRecords = split evalSplitRatio options.Seed trainRecords evalRecords
        let labels, problem = labelsFor configPath baseHead isClassifier task.NumLabels trainRecords
        let vocabSize = ModelConfig.vocabSize config
        let pad = padFor configPath task.PadTokenId baseHead [ options.PerDeviceTrainBatchSize; options.PerDeviceEvalBatchSize ] vocabSize
        let head = { baseHead with Labels = labels; ProblemType = problem; ProblemTypeWritten = true; PadTokenId = pad }
        let evalFile = defaultArg evalPath dataPath
        let trainSet = TaskData.labeledDataset dataPath tokenizer options.MaxSeqLen task.TextField trainRecords
        let evalSet = evalRecords |> Option.map (TaskData.labeledDataset evalFile tokenizer options.MaxSeqLen task.TextField)
        refuseIds trainSet vocabSize
        evalSet |> Option.iter (fun e -> refuseIds e vocabSize)
        let trainTargets = targets head dataPath task.LabelField trainRecords
        let evalTargets = Option.map2 (fun (_: TokenizedDataset) r -> targets head evalFile task.LabelField r) evalSet evalRecords
        let known = (trainSet, trainTargets) :: (Option.map2 (fun a b -> a, b) evalSet evalTargets |> Option.toList)
        let targetsOf (d: TokenizedDataset) =
            match known |> List.tryFind (fun (x, _) -> obj.ReferenceEquals(x.Rows, d.Rows)) with
            | Some(_, t) -> t
            | None -> invalidArg "dataset" "a dataset this classification job did not read"
        let objective = Objective.sequenceClassification head targetsOf
        let model = HfModelFolder.loadClassifierWith adjust modelPath head options.Seed
        let problemName = match problem with ProblemType.SingleLabel -> "single_label_classification" | ProblemType.Regression -> "regression"
        { Model = model
          Data = { Train = trainSet; Eval = evalSet; EvalSamples = [||]; Skipped = 0 }
          Objective = objective
          Evaluate = fun m d -> Evaluation.evaluateClassification objective m d options.PerDeviceEvalBatchSize options.MaxSeqLen
          Signature =
            [ entry "task" "{task}" (sprintf "sequence-classification labels=%s problem_type=%s pad_token_id=%s" (String.Join("|", labels)) problemName (pad |> Option.map string |> Option.defaultValue "none"))
              entry "targets" "{data} (labels)" (fingerprint trainTargets) ] }

    /// Prepares a reward-model job: reads the preference rows (prompt, chosen, rejected fields; with a
    /// data split, DeepSpeed-Chat's second share, PromptDataset.phaseIndices), loads
    /// the model folder (its config changed by adjust) as a one-label classifier (a classifier checkpoint must have one label) and
    /// tokenizes prompt + chosen and prompt + rejected (TaskData.pairDataset).
    let prepareReward (adjust: ModelConfig -> ModelConfig) (dataSplit: string option) (modelPath: string) (dataPath: string) (evalPath: string option) (task: RewardTask) (options: TrainOptions) (evalSplitRatio: float) (tokenizer: TextTokenizer) : TaskSetup =
        let configPath, config, text = configOf modelPath
        let baseHead = SequenceClassification.readHead configPath text
        let isClassifier = SequenceClassification.isClassifierConfig text
        if isClassifier && baseHead.NumLabels <> 1 then
            InvalidInput.fail configPath "id2label" (sprintf "a reward model scores with one label; this classifier has %d" baseHead.NumLabels)
        // DeepSpeed-Chat's step 2 trains on the second share of its data split, of the train and eval files alike.
        let phase (records: 'T[]) =
            match dataSplit with
            | Some split -> PromptDataset.phaseIndices split 1 options.Seed records.Length |> Array.map (fun i -> records[i])
            | None -> records
        let read path = TaskData.readPairs path task.PromptField task.ChosenField task.RejectedField |> phase
        let trainRecords, evalRecords = split evalSplitRatio options.Seed (read dataPath) (evalPath |> Option.map read)
        let vocabSize = ModelConfig.vocabSize config
        let pad = padFor configPath task.PadTokenId baseHead [ options.PerDeviceTrainBatchSize; options.PerDeviceEvalBatchSize; 2 ] vocabSize
        let head =
            { baseHead with
                Labels = (if isClassifier then baseHead.Labels else [| SequenceClassification.defaultLabel 0 |])
                ProblemType = ProblemType.Regression
                ProblemTypeWritten = isClassifier && baseHead.ProblemTypeWritten
                PadTokenId = pad }
        let evalFile = defaultArg evalPath dataPath
        let trainSet = TaskData.pairDataset dataPath tokenizer options.MaxSeqLen trainRecords
        let evalSet = evalRecords |> Option.map (TaskData.pairDataset evalFile tokenizer options.MaxSeqLen)
        refuseIds trainSet vocabSize
        evalSet |> Option.iter (fun e -> refuseIds e vocabSize)
        let objective = Objective.reward head
        let model = HfModelFolder.loadClassifierWith adjust modelPath head options.Seed
        { Model = model
          Data = { Train = trainSet; Eval = evalSet; EvalSamples = [||]; Skipped = 0 }
          Objective = objective
          Evaluate = fun m d -> Evaluation.evaluateReward objective m d options.PerDeviceEvalBatchSize options.MaxSeqLen
          Signature = [ entry "task" "{task}" (sprintf "reward-model pad_token_id=%s" (pad |> Option.map string |> Option.defaultValue "none")) ] }

    /// The options of a standalone evaluation: batchSize rows per micro-batch, rows cut to maxSeqLen
    /// (0: the model's context).
    let private evalOptions (modelPath: string) (batchSize: int) (maxSeqLen: int) =
        let _, config, _ = configOf modelPath
        let maxSeqLen = if maxSeqLen > 0 then maxSeqLen else ModelConfig.contextLength config
        { TrainOptions.defaults with PerDeviceTrainBatchSize = 1; PerDeviceEvalBatchSize = batchSize; MaxSeqLen = maxSeqLen }

    /// Evaluates a trained classifier folder on a labelled file (functional eval): loss, accuracy and
    /// macro_f1 as the job's evaluation lines report them. The folder's head decides the labels; rows
    /// cut to maxSeqLen (0: the model's context); texts encoded by tokenizer.
    let evaluateClassificationFile (modelPath: string) (dataPath: string) (task: ClassificationTask) (batchSize: int) (maxSeqLen: int) (tokenizer: TextTokenizer) : EvalResult =
        let options = evalOptions modelPath batchSize maxSeqLen
        let setup = prepareClassification id modelPath dataPath None { task with NumLabels = None } options 0.0 tokenizer
        setup.Evaluate setup.Model setup.Data.Train

    /// Evaluates a trained reward model folder on a preference file (functional eval): loss, accuracy and
    /// mean_margin as the job's evaluation lines report them.
    let evaluateRewardFile (modelPath: string) (dataPath: string) (task: RewardTask) (batchSize: int) (maxSeqLen: int) (tokenizer: TextTokenizer) : EvalResult =
        let options = evalOptions modelPath batchSize maxSeqLen
        let setup = prepareReward id None modelPath dataPath None task options 0.0 tokenizer
        setup.Evaluate setup.Model setup.Data.Train
