namespace Functional.Training

open System
open System.IO
open System.Text.Json
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Models
open Functional.Text

/// A standalone evaluation of a model folder on a data file (the `functional eval` command).
[<NoComparison>]
type EvalRequest =
    { /// The model folder (config.json + weights, tokenizer files unless TokenizerName is given).
      ModelPath: string
      /// The data: the same formats as training data; every row is evaluated.
      DataPath: string
      /// Where the metrics JSON is written; None: MODEL/eval_results.json (HF Trainer's file name).
      OutputPath: string option
      /// How the data becomes rows (format, fields, completion-only loss, bos); its MaxSeqLen is replaced
      /// by MaxSeqLen below.
      Prompt: PromptDataOptions
      /// Rows are cut to this many tokens; 0: the model's context (n_positions, max_position_embeddings).
      MaxSeqLen: int
      /// A tiktoken encoding name; None: the model folder's tokenizer.
      TokenizerName: string option
      /// Rows per evaluation micro-batch.
      BatchSize: int
      /// What the folder is evaluated as. None: its config.json decides: a causal LM, or a
      /// *ForSequenceClassification folder as a reward model when it has one label and no problem_type (how
      /// a reward model is saved), else as a sequence classifier on "text" and "label" fields.
      Task: TrainingTask option }

/// What an evaluation measured and where it wrote it.
[<NoComparison>]
type EvalReport =
    { /// What the model was evaluated as: "causal-lm", "sequence-classification" or "reward-model".
      Task: string
      /// The metrics in the names of training's evaluation lines (eval_loss, eval_perplexity), then
      /// eval_samples (rows) and eval_tokens (what the loss was averaged over), as written.
      Metrics: (string * float) list
      /// The metrics file.
      OutputPath: string }

/// What a model folder is evaluated as; read from config.json's "architectures" (the HF class).
[<RequireQualifiedAccess>]
type EvalTask =
    /// *ForCausalLM, *LMHeadModel (or no architectures): loss and perplexity of the next token.
    | CausalLm
    /// *ForSequenceClassification: a classifier's loss, accuracy and macro-F1, or a reward model's loss,
    /// pairwise accuracy and mean margin.
    | SequenceClassification

/// Evaluating a model folder on a data file. The one dispatch point on the model's task is
/// Evaluate.run's match on EvalTask: a head with metrics of its own (classification accuracy, reward
/// accuracy) adds a case to EvalTask, to taskOf, and there.
[<RequireQualifiedAccess>]
module Evaluate =

    /// HF Trainer's file of evaluation metrics, written beside the model when no output is given.
    let defaultFileName = "eval_results.json"

    /// The task of a model folder's config.json: its "architectures" entry; causal LM when absent.
    let taskOf (configPath: string) : EvalTask =
        let root =
            match JsonInput.tryParse (try File.ReadAllText configPath with :? IOException as e -> InvalidInput.fail configPath "" e.Message) with
            | Ok root -> root
            | Error e -> InvalidInput.fail configPath "" (sprintf "invalid JSON: %s" e.Message)
        let architectures =
            match root.ValueKind, (if root.ValueKind = JsonValueKind.Object then root.TryGetProperty "architectures" else (false, Unchecked.defaultof<_>)) with
            | JsonValueKind.Object, (true, list) when list.ValueKind = JsonValueKind.Array ->
                [ for a in list.EnumerateArray() do if a.ValueKind = JsonValueKind.String then yield a.GetString() ]
            | _ -> []
        match architectures with
        | [] -> EvalTask.CausalLm
        | name :: _ when name.EndsWith("ForCausalLM", StringComparison.Ordinal) || name.EndsWith("LMHeadModel", StringComparison.Ordinal) ->
            EvalTask.CausalLm
        | name :: _ when name.EndsWith("ForSequenceClassification", StringComparison.Ordinal) -> EvalTask.SequenceClassification
        | name :: _ ->
            InvalidInput.fail configPath "architectures"
                (sprintf "%s cannot be evaluated yet; expected a causal LM (...ForCausalLM, ...LMHeadModel) or a sequence classifier (...ForSequenceClassification)" name)

    let private tokenizerOf (request: EvalRequest) : TextTokenizer =
        match request.TokenizerName with
        | Some name -> Tokenizers.fromEncoding name
        | None when JobChecks.hasTokenizer request.ModelPath -> Tokenizers.fromFolder request.ModelPath
        | None ->
            TextTokenizer.absent request.DataPath
                (sprintf "the data holds text, but the model folder %s has no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model): pass {tokenizer} NAME or pre-tokenized {\"input_ids\": [...]} rows" request.ModelPath)

    /// The rows of the data under the model's context: MaxSeqLen 0 means the context; more is refused.
    let private rows (request: EvalRequest) (config: ModelConfig) (tokenizer: TextTokenizer) =
        let context = ModelConfig.contextLength config
        if request.MaxSeqLen < 0 then InvalidInput.setting "max_seq_len" (sprintf "must be >= 0 (0: the model's context), got %d" request.MaxSeqLen)
        if request.MaxSeqLen > context then
            InvalidInput.setting "max_seq_len"
                (sprintf "%d is more than the model's context (%s %d)" request.MaxSeqLen (ModelConfig.contextField config) context)
        let maxSeqLen = if request.MaxSeqLen = 0 then context else request.MaxSeqLen
        let loaded = PromptDataset.load request.DataPath { request.Prompt with MaxSeqLen = maxSeqLen } tokenizer
        TokenizedDataset.checkVocabulary (ModelConfig.vocabSize config) loaded.Dataset
        loaded.Dataset, maxSeqLen

    /// The metrics JSON: keys sorted, indented as HF Trainer's eval_results.json.
    let private metricsJson (metrics: (string * float) list) =
        use stream = new MemoryStream()
        do
            use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
            w.WriteStartObject()
            for name, value in metrics |> List.sortWith (fun (a, _) (b, _) -> String.CompareOrdinal(a, b)) do
                if Double.IsFinite value && value = Math.Round value && abs value < 9e15 && (name = "eval_samples" || name = "eval_tokens") then
                    w.WriteNumber(name, int64 value)
                elif Double.IsFinite value then w.WriteNumber(name, value)
                else w.WriteString(name, string value)
            w.WriteEndObject()
        Text.Encoding.UTF8.GetString(stream.ToArray()) + "\n"

    /// One line of the metrics, compact, in the order of the report (what the command prints).
    let metricsLine (report: EvalReport) : string =
        let fields =
            [ for name, value in report.Metrics ->
                  let text =
                      if name = "eval_samples" || name = "eval_tokens" then string (int64 value)
                      else value.ToString("R", Globalization.CultureInfo.InvariantCulture)
                  sprintf "\"%s\": %s" name text ]
        "{" + String.Join(", ", fields) + "}"

    /// Checks and loads the model folder and the data (naming the file, line and what was expected
    /// when something is wrong, before anything is written), evaluates every row in eval mode without
    /// gradients, and writes the metrics (written aside, then renamed over the file).
    let run (request: EvalRequest) : EvalReport =
        Functional.Runtime.TorchRuntime.ensure ()
        InvalidInput.requireFolder request.ModelPath "the model folder does not exist" "a model folder (config.json + model.safetensors)"
        if request.BatchSize <= 0 then InvalidInput.setting "per_device_eval_batch_size" (sprintf "must be positive, got %d" request.BatchSize)
        let output = request.OutputPath |> Option.defaultValue (Path.Combine(request.ModelPath, defaultFileName))
        if Directory.Exists output then InvalidInput.fail output "" "is a folder; expected the metrics file to write"
        let configPath = Path.Combine(request.ModelPath, "config.json")
        let taskMetrics (result: EvalResult) =
            ("eval_loss", result.Loss) :: [ for name, value in result.Metrics -> "eval_" + name, value ]
            @ [ "eval_samples", float result.Tokens ]
        let task, metrics =
            match taskOf configPath, request.Task with
            | EvalTask.CausalLm, Some task when task <> TrainingTask.CausalLm ->
                InvalidInput.fail configPath "architectures" "is a causal LM; {task} needs a sequence classifier folder (...ForSequenceClassification)"
            | EvalTask.SequenceClassification, Some TrainingTask.CausalLm ->
                InvalidInput.fail configPath "architectures" "is a sequence classifier; evaluate it with {task} sequence-classification or reward-model"
            | EvalTask.SequenceClassification, task ->
                let task =
                    match task with
                    | Some task -> task
                    | None ->
                        let head = SequenceClassification.readHead configPath (File.ReadAllText configPath)
                        if head.NumLabels = 1 && not head.ProblemTypeWritten then
                            TrainingTask.RewardModel { PromptField = "prompt"; ChosenField = "chosen"; RejectedField = "rejected"; PadTokenId = None }
                        else
                            TrainingTask.SequenceClassification { TextField = "text"; LabelField = "label"; NumLabels = None; PadTokenId = None }
                match task with
                | TrainingTask.RewardModel r ->
                    "reward-model", taskMetrics (TaskJob.evaluateRewardFile request.ModelPath request.DataPath r request.BatchSize request.MaxSeqLen (tokenizerOf request))
                | TrainingTask.SequenceClassification c ->
                    "sequence-classification", taskMetrics (TaskJob.evaluateClassificationFile request.ModelPath request.DataPath c request.BatchSize request.MaxSeqLen (tokenizerOf request))
                | TrainingTask.CausalLm -> invalidArg (nameof request) "handled above"
            | EvalTask.CausalLm, _ ->
                let model = HfModelFolder.load request.ModelPath 0L
                let data, maxSeqLen = rows request model.Config (tokenizerOf request)
                let result = Evaluation.evaluate model data request.BatchSize maxSeqLen TrainingLoop.PadId
                if result.Tokens = 0L then
                    InvalidInput.fail request.DataPath "" "no row has a token to predict (every row is empty or fully masked): nothing to evaluate"
                "causal-lm",
                [ "eval_loss", result.Loss
                  "eval_perplexity", result.Perplexity
                  "eval_samples", float data.Rows.Length
                  "eval_tokens", float result.Tokens ]
        let full = Path.GetFullPath output
        Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
        let staging = Path.Combine(Path.GetDirectoryName full, sprintf ".%s.%d.tmp" (Path.GetFileName full) Environment.ProcessId)
        try
            File.WriteAllText(staging, metricsJson metrics)
            File.Move(staging, full, true)
        with _ ->
            (try File.Delete staging with _ -> ())
            reraise ()
        { Task = task; Metrics = metrics; OutputPath = full }
