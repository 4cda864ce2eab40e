namespace Functional.Training

open System
open System.IO
open System.Text.Json
open Functional.Reporting

/// One logged optimizer step as metrics.jsonl records it (HF's names).
type StepRecord =
    { /// The optimizer step.
      Step: int
      /// Epochs done, fractional.
      Epoch: float
      /// The step's loss.
      Loss: float
      /// The learning rate the step used.
      LearningRate: float
      /// The gradient norm before clipping.
      GradNorm: float
      /// The window's predicted tokens.
      NumTokens: int64 }

/// One evaluation as metrics.jsonl records it (step 0: before training).
type EvalRecord =
    { /// The optimizer step it followed.
      Step: int
      /// The evaluation loss.
      Loss: float
      /// exp(Loss).
      Perplexity: float
      /// Exact-match accuracy, when scored.
      ExactMatch: float option
      /// A task's own figures in order, named without the eval_ prefix (sequence classification:
      /// accuracy, macro_f1; reward modelling: accuracy, mean_margin); empty for causal language
      /// modelling. A record with metrics writes them instead of eval_perplexity.
      Metrics: (string * float) list }

/// A line of a run's log history (metrics.jsonl, trainer_state.json's log_history).
type LogRecord =
    /// A training step.
    | Trained of StepRecord
    /// An evaluation.
    | Evaluated of EvalRecord
    /// A line this version does not model, kept as it was read.
    | Other of string

/// The closing metrics line of a finished run (HF's train() summary plus the final evaluation).
type RunSummary =
    { /// The run's last optimizer step (HF's global_step).
      Step: int
      /// Seconds in the training loop (train_runtime).
      TrainRuntime: float
      /// Samples this process trained per second (train_samples_per_second).
      SamplesPerSecond: float
      /// Steps this process trained per second (train_steps_per_second).
      StepsPerSecond: float
      /// HF's total_flos.
      TotalFlos: float
      /// The mean per-step loss of the whole run (train_loss).
      TrainLoss: float
      /// The closing evaluation, when there is an evaluation set.
      After: EvalRecord option }

/// A run's metrics: metrics.jsonl, TensorBoard events and the plot, written from typed records. Only the
/// main process writes; every process keeps the history.
[<RequireQualifiedAccess>]
module RunLog =

    let private jsonOptions =
        JsonSerializerOptions(NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)

    let private jsonLine (fields: (string * obj) list) =
        JsonSerializer.Serialize(Collections.Generic.Dictionary<string, obj>(dict fields), jsonOptions)

    let private evalFields (e: EvalRecord) =
        [ yield "eval_loss", box e.Loss
          if e.Metrics.IsEmpty then yield "eval_perplexity", box e.Perplexity
          for name, value in e.Metrics do yield "eval_" + name, box value
          match e.ExactMatch with
          | Some m -> yield "eval_exact_match", box m
          | None -> () ]

    /// The record of a logged step.
    let stepRecord (log: StepLog) : StepRecord =
        { Step = log.Step; Epoch = log.Epoch; Loss = log.Loss; LearningRate = log.LearningRate; GradNorm = log.GradNorm; NumTokens = log.PredictedTokens }

    /// A record as its metrics.jsonl line. Timings stay out of step lines, so the same seed gives the same
    /// file.
    let toJson (record: LogRecord) : string =
        match record with
        | Trained s ->
            jsonLine
                [ "step", box s.Step; "epoch", box s.Epoch; "loss", box s.Loss; "lr", box s.LearningRate
                  "grad_norm", box s.GradNorm; "num_tokens", box s.NumTokens ]
        | Evaluated e -> jsonLine (("step", box e.Step) :: evalFields e)
        | Other line -> line

    /// The summary as its metrics.jsonl line.
    let summaryJson (s: RunSummary) : string =
        jsonLine
            [ yield "step", box s.Step
              yield "train_runtime", box s.TrainRuntime
              yield "train_samples_per_second", box s.SamplesPerSecond
              yield "train_steps_per_second", box s.StepsPerSecond
              yield "total_flos", box s.TotalFlos
              yield "train_loss", box s.TrainLoss
              match s.After with
              | Some a -> yield! evalFields a
              | None -> () ]

    /// A metrics value: a JSON number, or "NaN" / "Infinity" / "-Infinity" as the lines write them.
    let private number (value: JsonElement) =
        if value.ValueKind = JsonValueKind.String then Double.Parse(value.GetString(), Globalization.CultureInfo.InvariantCulture)
        else value.GetDouble()

    /// Reads a history line a checkpoint holds (once, on resume) back into its record; a line of another
    /// shape stays Other, written back as it was.
    let ofJson (line: string) : LogRecord =
        let root =
            match Functional.JsonInput.tryParse line with
            | Ok root -> root
            | Error e -> invalidArg (nameof line) (sprintf "a history line that is not JSON (%s): %s" e.Reason line)
        let has (name: string) = fst (root.TryGetProperty name)
        let get (name: string) = number (root.GetProperty name)
        let names = [ for p in root.EnumerateObject() -> p.Name ]
        let round (record: LogRecord) = if toJson record = line then record else Other line
        if names = [ "step"; "epoch"; "loss"; "lr"; "grad_norm"; "num_tokens" ] then
            round (Trained
                { Step = root.GetProperty("step").GetInt32(); Epoch = get "epoch"; Loss = get "loss"; LearningRate = get "lr"
                  GradNorm = get "grad_norm"; NumTokens = root.GetProperty("num_tokens").GetInt64() })
        elif has "step" && has "eval_loss" && List.forall (fun (n: string) -> n = "step" || n.StartsWith "eval_") names then
            let known = [ "eval_loss"; "eval_perplexity"; "eval_exact_match" ]
            round (Evaluated
                { Step = root.GetProperty("step").GetInt32()
                  Loss = get "eval_loss"
                  Perplexity = (if has "eval_perplexity" then get "eval_perplexity" else exp (get "eval_loss"))
                  ExactMatch = if has "eval_exact_match" then Some(get "eval_exact_match") else None
                  Metrics = [ for n in names do if n.StartsWith "eval_" && not (List.contains n known) then yield n.Substring 5, get n ] })
        else Other line

    /// The name of process rank's own log in the output folder under --log-each-rank
    /// (DistributedSettings.LogEachRank): metrics-rank-R.jsonl.
    let rankFileName (rank: int) : string = sprintf "metrics-rank-%d.jsonl" rank

    /// A logged step as its line in process rank's own log: step, rank, that process's token-weighted loss
    /// over its rows of the window (StepLog.RankLoss; "NaN" when it predicted no token) and its predicted
    /// tokens (num_tokens). Summed over the processes, loss * num_tokens / metrics.jsonl's num_tokens is
    /// metrics.jsonl's loss.
    let rankJson (rank: int) (log: StepLog) : string =
        jsonLine [ "step", box log.Step; "rank", box rank; "loss", box log.RankLoss; "num_tokens", box log.RankTokens ]

    /// The evaluation before training (step 0) in a history.
    let before (history: LogRecord list) : EvalRecord option =
        history |> List.tryPick (function Evaluated e when e.Step = 0 -> Some e | _ -> None)

    /// The plot's series: (step, loss, learning rate) per step and (step, eval loss) per evaluation.
    let plotSeries (history: LogRecord list) =
        [ for r in history do match r with Trained s -> yield s.Step, s.Loss, s.LearningRate | _ -> () ],
        [ for r in history do match r with Evaluated e -> yield e.Step, e.Loss | _ -> () ]

/// The open log of a running job: metrics.jsonl (rewritten from the history a resume carries) and, when
/// asked, TensorBoard events. Written only by the main process.
type RunLogWriter(metricsPath: string, tensorBoardFolder: string option, isMainProcess: bool, history: LogRecord list) =
    let metrics = if isMainProcess then Some(new StreamWriter(metricsPath, false)) else None
    let events = if isMainProcess then tensorBoardFolder |> Option.map TensorBoard.create else None
    let mutable records = List.rev history
    let write (record: LogRecord) =
        records <- record :: records
        metrics |> Option.iter (fun m -> m.WriteLine(RunLog.toJson record); m.Flush())
    let scalars step values = events |> Option.iter (fun e -> TensorBoard.scalars e step values)
    do metrics |> Option.iter (fun m -> (for r in history do m.WriteLine(RunLog.toJson r)); m.Flush())

    /// The history so far, oldest first.
    member _.History: LogRecord list = List.rev records

    /// Logs a training step (metrics.jsonl, TensorBoard train/*).
    member _.Step(log: StepLog) =
        write (Trained(RunLog.stepRecord log))
        scalars (int64 log.Step) [ "train/loss", log.Loss; "train/learning_rate", log.LearningRate; "train/grad_norm", log.GradNorm ]

    /// Logs an evaluation (metrics.jsonl, TensorBoard eval/*).
    member _.Eval(record: EvalRecord) =
        write (Evaluated record)
        scalars (int64 record.Step)
            [ yield "eval/loss", record.Loss
              if record.Metrics.IsEmpty then yield "eval/perplexity", record.Perplexity
              for name, value in record.Metrics do yield "eval/" + name, value ]

    /// Closes metrics.jsonl and the event file.
    interface IDisposable with
        member _.Dispose() =
            metrics |> Option.iter (fun m -> m.Dispose())
            events |> Option.iter (fun e -> (e :> IDisposable).Dispose())

/// Process rank's own log under --log-each-rank (DistributedSettings.LogEachRank): path
/// (OUTPUT/metrics-rank-R.jsonl), one RunLog.rankJson line per logged step, written by every process. A run
/// that resumes from step startStep keeps the lines of an earlier file up to that step and drops the later
/// ones (as metrics.jsonl is rewritten from the checkpoint's history); a fresh run (startStep 0) starts it
/// empty.
type RankLogWriter(path: string, rank: int, startStep: int) =
    let earlier =
        if startStep > 0 && File.Exists path then
            [ for line in File.ReadAllLines path do
                  match Functional.JsonInput.tryParse line with
                  | Ok root when root.ValueKind = JsonValueKind.Object ->
                      match root.TryGetProperty "step" with
                      | true, step when step.ValueKind = JsonValueKind.Number && step.GetInt32() <= startStep -> yield line
                      | _ -> ()
                  | _ -> () ]
        else []
    let writer = new StreamWriter(path, false)
    do
        for line in earlier do writer.WriteLine line
        writer.Flush()

    /// Writes a logged step's line.
    member _.Step(log: StepLog) =
        writer.WriteLine(RunLog.rankJson rank log)
        writer.Flush()

    /// Closes the file.
    interface IDisposable with
        member _.Dispose() = writer.Dispose()

/// What is written once a run has finished.
[<RequireQualifiedAccess>]
module RunLogFinish =

    /// Appends the summary line to metrics.jsonl (main process only).
    let summary (isMainProcess: bool) (metricsPath: string) (s: RunSummary) =
        if isMainProcess then File.AppendAllLines(metricsPath, [ RunLog.summaryJson s ])

    /// Draws loss.png from the history's typed records with draw (main process only; None draws nothing).
    let plot (draw: (string -> (int * float * float) list -> (int * float) list -> unit) option) (isMainProcess: bool) (plotPath: string) (history: LogRecord list) =
        match draw with
        | Some draw when isMainProcess ->
            let steps, evals = RunLog.plotSeries history
            draw plotPath steps evals
        | _ -> ()
