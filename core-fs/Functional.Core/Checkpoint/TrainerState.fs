namespace Functional.Checkpoint

open System
open System.IO
open System.Text.Json
open Functional

/// The contents of `trainer_state.json`, with the fields of HF's TrainerState (trainer_callback.py)
/// under HF's names, plus a "functional" section for what exact resuming needs beyond them.
type TrainerState =
    { /// "epoch": epochs done, the fraction being the part of the current epoch done.
      Epoch: float
      /// "global_step": optimizer updates done.
      GlobalStep: int
      /// "max_steps": optimizer updates the run does in total.
      MaxSteps: int
      /// "num_train_epochs": epochs the run goes through.
      NumTrainEpochs: int
      /// "logging_steps": updates between training log entries.
      LoggingSteps: int
      /// "eval_steps": updates between evaluations.
      EvalSteps: int
      /// "save_steps": updates between checkpoints.
      SaveSteps: int
      /// "train_batch_size": examples per micro-batch.
      TrainBatchSize: int
      /// "total_flos": floating-point operations so far (0 when not counted; 0 when absent on read).
      TotalFlos: float
      /// "num_input_tokens_seen": input tokens trained on so far (0 when absent on read).
      NumInputTokensSeen: int64
      /// "best_metric": the best value of the metric for the best model so far (null: none yet).
      BestMetric: float option
      /// "best_global_step": the step of the best evaluation (null: none yet; None when absent on read).
      BestGlobalStep: int option
      /// "best_model_checkpoint": the folder of the best checkpoint (null: none yet).
      BestModelCheckpoint: string option
      /// "log_history": one JSON object text per log entry, written and read back byte for byte (the
      /// text of each entry, without surrounding whitespace, is stored verbatim).
      LogHistory: string list
      /// "functional": our own section, key -> JSON value text, kept verbatim (absent on read: empty).
      Functional: Map<string, string> }

/// Writing and reading `trainer_state.json` with System.Text.Json. The file is laid out like HF's
/// (keys sorted, 2-space indentation; is_local_process_zero and is_world_process_zero true,
/// is_hyper_param_search false, trial_name and trial_params null) so HF tools can read it. Non-finite
/// floats (epoch, total_flos, best_metric) are written as the strings "NaN", "Infinity" and
/// "-Infinity", the convention of JsonNumberHandling.AllowNamedFloatingPointLiterals that our metrics
/// lines use too; Python's json writes bare NaN tokens instead, which are not JSON and which this
/// reader rejects.
[<RequireQualifiedAccess>]
module TrainerState =

    /// The file's usual name inside a checkpoint folder.
    [<Literal>]
    let FileName = "trainer_state.json"

    /// The trimmed text of a JSON value, after checking that it parses (and is an object when required).
    let private checkedJson (what: string) (objectOnly: bool) (text: string) =
        let trimmed = text.Trim()
        let kind =
            match JsonInput.tryParse trimmed with
            | Ok root -> root.ValueKind
            | Error e -> invalidArg what (sprintf "not a JSON value (%s): %s" e.Message text)
        if objectOnly && kind <> JsonValueKind.Object then invalidArg what (sprintf "expected a JSON object: %s" text)
        trimmed

    let private writeFloat (w: Utf8JsonWriter) (name: string) (value: float) =
        if Double.IsFinite value then w.WriteNumber(name, value)
        elif Double.IsNaN value then w.WriteString(name, "NaN")
        elif value > 0.0 then w.WriteString(name, "Infinity")
        else w.WriteString(name, "-Infinity")

    /// The file's bytes for a state.
    let private serialize (state: TrainerState) =
        let logHistory = state.LogHistory |> List.map (checkedJson "LogHistory" true)
        let functional = state.Functional |> Map.map (fun key text -> checkedJson ("Functional." + key) false text)
        use buffer = new MemoryStream()
        do
            use w = new Utf8JsonWriter(buffer, JsonWriterOptions(Indented = true))
            let optional (name: string) (value: 'T option) (write: string -> 'T -> unit) =
                match value with
                | Some v -> write name v
                | None -> w.WriteNull name
            // The keys in ordinal order, as Python's json.dumps(sort_keys=True) writes them.
            w.WriteStartObject()
            optional "best_global_step" state.BestGlobalStep (fun n v -> w.WriteNumber(n, v))
            optional "best_metric" state.BestMetric (writeFloat w)
            optional "best_model_checkpoint" state.BestModelCheckpoint (fun n v -> w.WriteString(n, v))
            writeFloat w "epoch" state.Epoch
            w.WriteNumber("eval_steps", state.EvalSteps)
            w.WriteStartObject "functional"
            for KeyValue(key, text) in functional do
                w.WritePropertyName key
                w.WriteRawValue text
            w.WriteEndObject()
            w.WriteNumber("global_step", state.GlobalStep)
            w.WriteBoolean("is_hyper_param_search", false)
            w.WriteBoolean("is_local_process_zero", true)
            w.WriteBoolean("is_world_process_zero", true)
            w.WriteStartArray "log_history"
            for entry in logHistory do
                w.WriteRawValue entry
            w.WriteEndArray()
            w.WriteNumber("logging_steps", state.LoggingSteps)
            w.WriteNumber("max_steps", state.MaxSteps)
            w.WriteNumber("num_input_tokens_seen", state.NumInputTokensSeen)
            w.WriteNumber("num_train_epochs", state.NumTrainEpochs)
            w.WriteNumber("save_steps", state.SaveSteps)
            writeFloat w "total_flos" state.TotalFlos
            w.WriteNumber("train_batch_size", state.TrainBatchSize)
            w.WriteNull "trial_name"
            w.WriteNull "trial_params"
            w.WriteEndObject()
        buffer.WriteByte(byte '\n')
        buffer.ToArray()

    /// Writes a state to path (through a temporary file beside it, renamed over path once flushed to
    /// disk). Raises ArgumentException when a LogHistory entry is not a JSON object or a Functional
    /// value is not JSON.
    let write (path: string) (state: TrainerState) : unit =
        let bytes = serialize state
        let temporary = path + ".tmp"
        do
            use stream = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None)
            stream.Write(bytes, 0, bytes.Length)
            stream.Flush true
        File.Move(temporary, path, true)

    /// Reads a state written by write (or by HF, when it holds no bare NaN). Raises
    /// InvalidInputException naming the file and the field that is missing or of the wrong type.
    let read (path: string) : TrainerState =
        if not (File.Exists path) then InvalidInput.fail path "" "the trainer state file does not exist"
        let root =
            match JsonInput.tryParseBytes (ReadOnlyMemory(File.ReadAllBytes path)) with
            | Ok root -> root
            | Error e -> InvalidInput.fail path "" (sprintf "not valid JSON (%s)" e.Message)
        if root.ValueKind <> JsonValueKind.Object then InvalidInput.fail path "" "expected a JSON object"
        let fail field problem : 'T = InvalidInput.fail path field problem
        let describe (value: JsonElement) =
            match value.ValueKind with
            | JsonValueKind.String -> sprintf "the string %s" (value.GetRawText())
            | kind -> sprintf "%s %s" (string kind) (value.GetRawText())
        let tryField name =
            match root.TryGetProperty(name: string) with
            | true, value -> Some value
            | _ -> None
        let required name =
            match tryField name with
            | Some value -> value
            | None -> fail name "missing"
        let asInt name (value: JsonElement) =
            let mutable n = 0
            if value.ValueKind = JsonValueKind.Number && value.TryGetInt32(&n) then n
            else fail name (sprintf "expected an integer, found %s" (describe value))
        let asInt64 name (value: JsonElement) =
            let mutable n = 0L
            if value.ValueKind = JsonValueKind.Number && value.TryGetInt64(&n) then n
            else fail name (sprintf "expected an integer, found %s" (describe value))
        let asFloat name (value: JsonElement) =
            match value.ValueKind with
            | JsonValueKind.Number -> value.GetDouble()
            | JsonValueKind.String when value.GetString() = "NaN" -> Double.NaN
            | JsonValueKind.String when value.GetString() = "Infinity" -> Double.PositiveInfinity
            | JsonValueKind.String when value.GetString() = "-Infinity" -> Double.NegativeInfinity
            | _ -> fail name (sprintf "expected a number, found %s" (describe value))
        let nullable name (convert: string -> JsonElement -> 'T) =
            match tryField name with
            | None -> None
            | Some value when value.ValueKind = JsonValueKind.Null -> None
            | Some value -> Some(convert name value)
        let intField name = asInt name (required name)
        let floatField name = asFloat name (required name)
        let logHistory =
            let value = required "log_history"
            if value.ValueKind <> JsonValueKind.Array then
                fail "log_history" (sprintf "expected a list of objects, found %s" (describe value))
            value.EnumerateArray()
            |> Seq.mapi (fun i entry ->
                if entry.ValueKind <> JsonValueKind.Object then
                    fail (sprintf "log_history[%d]" i) (sprintf "expected an object, found %s" (describe entry))
                entry.GetRawText())
            |> List.ofSeq
        let functional =
            match tryField "functional" with
            | None -> Map.empty
            | Some value when value.ValueKind = JsonValueKind.Object ->
                value.EnumerateObject() |> Seq.map (fun p -> p.Name, p.Value.GetRawText()) |> Map.ofSeq
            | Some value -> fail "functional" (sprintf "expected an object, found %s" (describe value))
        { Epoch = floatField "epoch"
          GlobalStep = intField "global_step"
          MaxSteps = intField "max_steps"
          NumTrainEpochs = intField "num_train_epochs"
          LoggingSteps = intField "logging_steps"
          EvalSteps = intField "eval_steps"
          SaveSteps = intField "save_steps"
          TrainBatchSize = intField "train_batch_size"
          TotalFlos = nullable "total_flos" asFloat |> Option.defaultValue 0.0
          NumInputTokensSeen = nullable "num_input_tokens_seen" asInt64 |> Option.defaultValue 0L
          BestMetric = nullable "best_metric" asFloat
          BestGlobalStep = nullable "best_global_step" asInt
          BestModelCheckpoint =
            nullable "best_model_checkpoint" (fun name value ->
                if value.ValueKind = JsonValueKind.String then value.GetString()
                else fail name (sprintf "expected a string or null, found %s" (describe value)))
          LogHistory = logHistory
          Functional = functional }

