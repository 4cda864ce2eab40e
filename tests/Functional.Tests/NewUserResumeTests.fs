/// Issue 12, findings 6 and 7 and part of 10: Ctrl-C on the embedded default, stale staging folders, what a
/// resume says and counts, a resume that lengthens the run, trainer_state.json as HF fills it, and evaluation
/// lines on the console. End to end through the command line, except where a field has no option.
module Functional.Tests.NewUserResumeTests

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open Expecto
open Functional
open Functional.Checkpoint
open Functional.Cli
open Functional.Runtime
open Functional.Training
open Functional.Tests.TestUtil

let private golden = goldenDir "llama-cosine"

/// Fine-tuning the golden LLaMA: micro-batches of 2 rows accumulated in pairs, every step logged, a
/// checkpoint every 3 steps.
let private runArgs (output: string) (maxSteps: int) =
    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl"); "--output"; output
      "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; string maxSteps
      "--max-seq-len"; "32"; "--learning-rate"; "3e-3"; "--lr-scheduler-type"; "cosine"; "--num-warmup-steps"; "4"
      "--save-steps"; "3"; "--logging-steps"; "1"; "--threads"; "2"; "--seed"; "7" ]

let private resumeLatest args = args @ [ "--resume-from-checkpoint"; "latest" ]

let private expectExit (code: int) (run: CliRun) =
    Expect.equal run.ExitCode code (sprintf "exit code (stdout: %s, stderr: %s)" run.Stdout run.Stderr)

let private trainerState (checkpoint: string) =
    JsonDocument.Parse(File.ReadAllText(Path.Combine(checkpoint, TrainerState.FileName))).RootElement.Clone()

/// The training lines of metrics.jsonl (those with a loss and a learning rate), by step.
let private stepLines (output: string) =
    readJsonLines (Path.Combine(output, "metrics.jsonl"))
    |> Array.filter (fun l -> fst (l.TryGetProperty "lr"))
    |> Array.map (fun l -> l.GetProperty("step").GetInt32(), l)

let private summary (output: string) =
    readJsonLines (Path.Combine(output, "metrics.jsonl")) |> Array.last

/// A process id that no process has now: the id of a process that has just exited.
let private deadProcessId () =
    use p = Process.Start("true")
    p.WaitForExit()
    p.Id

/// The CLI started with its output lines collected as they come.
type private RunningCli(args: string list) =
    let lines = ConcurrentQueue<string>()
    let errors = ConcurrentQueue<string>()
    let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    do
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll"))
        for a in args do info.ArgumentList.Add a
    let p = Process.Start info
    do
        p.OutputDataReceived.Add(fun e -> if not (isNull e.Data) then lines.Enqueue e.Data)
        p.ErrorDataReceived.Add(fun e -> if not (isNull e.Data) then errors.Enqueue e.Data)
        p.BeginOutputReadLine()
        p.BeginErrorReadLine()
    member _.Process = p
    member _.Stdout = String.Join("\n", lines)
    member _.Stderr = String.Join("\n", errors)
    /// Waits until a line of standard output satisfies condition or the process exits.
    member _.WaitForLine(condition: string -> bool, timeout: TimeSpan) =
        let clock = Stopwatch.StartNew()
        while not (lines |> Seq.exists condition) && not p.HasExited && clock.Elapsed < timeout do Thread.Sleep 50
    interface IDisposable with
        member _.Dispose() =
            if not p.HasExited then p.Kill true
            p.WaitForExit()
            p.Dispose()

[<Tests>]
let tests =
    testSequenced <| testList "new user: signals and resume" [
        test "finding 6: the next run removes staging folders of dead processes, puts back a replaced output whose replacement never arrived, and never touches a live process's folder" {
            use folder = new TempFolder()
            let target = folder.File "embedded"
            let leftover (tag: string) (pid: int) =
                let path = folder.File(sprintf ".embedded.%s-%d" tag pid)
                Directory.CreateDirectory path |> ignore
                File.WriteAllText(Path.Combine(path, "metrics.jsonl"), tag)
                path
            let dead = deadProcessId ()
            let staleStaging = leftover "staging" dead
            let staleOld = leftover "old" (dead + 1000000)
            // This test's own process is running and started before the folder was made.
            let live = leftover "staging" Environment.ProcessId
            let actions = StagedFolder.cleanStale target
            Expect.isFalse (Directory.Exists staleStaging) "the dead process's staging folder is removed"
            Expect.equal (File.ReadAllText(Path.Combine(target, "metrics.jsonl"))) "old" "the replaced output is back in place"
            Expect.isFalse (Directory.Exists staleOld) "moved back"
            Expect.isTrue (Directory.Exists live) "a running process's folder is kept"
            Expect.equal (actions |> List.map fst |> List.sort) (List.sort [ staleStaging; staleOld ]) "reports what it did"
            let second = leftover "old" dead
            StagedFolder.cleanStale target |> ignore
            Expect.isFalse (Directory.Exists second) "with the output in place, a replaced one is removed"
            Expect.equal (File.ReadAllText(Path.Combine(target, "metrics.jsonl"))) "old" "the output is untouched"
        }

        for signal, code in [ "INT", 130; "TERM", 143 ] do
            test (sprintf "finding 6: SIG%s stops the embedded default after the current step with exit %d, leaves no staging folder and the earlier output untouched" signal code) {
                use folder = new TempFolder()
                let runs = folder.File "runs"
                let output = Path.Combine(runs, "embedded")
                Directory.CreateDirectory(Path.Combine(output, "final")) |> ignore
                File.WriteAllText(Path.Combine(output, "metrics.jsonl"), "{\"step\": 1}\n")
                File.WriteAllText(Path.Combine(output, "final", "config.json"), "{}")
                let earlier = snapshot output
                let stale = Path.Combine(runs, sprintf ".embedded.staging-%d" (deadProcessId ()))
                Directory.CreateDirectory stale |> ignore
                File.WriteAllText(Path.Combine(stale, "metrics.jsonl"), "")
                use cli = new RunningCli([ "train"; "--output"; output; "--max-steps"; "400" ])
                cli.WaitForLine((fun line -> line.StartsWith "step "), TimeSpan.FromMinutes 8.0)
                Expect.isFalse cli.Process.HasExited (sprintf "training started (stdout: %s, stderr: %s)" cli.Stdout cli.Stderr)
                Expect.isFalse (Directory.Exists stale) "the staging folder of a dead process was removed when the run started"
                sendSignal signal cli.Process.Id
                Expect.isTrue (cli.Process.WaitForExit(TimeSpan.FromMinutes 3.0)) "the run stops"
                Expect.equal cli.Process.ExitCode code (sprintf "exit code (stderr: %s)" cli.Stderr)
                Expect.stringContains cli.Stderr (sprintf "SIG%s: stopping after the current step without saving" signal) "the signal is acknowledged"
                Expect.stringContains cli.Stdout (sprintf "interrupted by SIG%s after step" signal) "one line says what happened"
                Expect.stringContains cli.Stdout "is unchanged" "and that the earlier output is kept"
                Expect.stringContains cli.Stdout "eval before training: loss" "finding 10: the first evaluation is printed"
                Expect.stringContains cli.Stdout "exact match 0.0%" "with its exact match"
                Expect.equal (snapshot output) earlier "the earlier output is untouched"
                Expect.equal (Directory.GetDirectories runs |> Array.map Path.GetFileName) [| "embedded" |] "no staging folder is left"
            }

        test "finding 7: resuming from latest names the checkpoint it used and each newer one it skipped, with why" {
            use folder = new TempFolder()
            let output = folder.File "run"
            expectExit 0 (runCli (runArgs output 6))
            let weightsFile = Path.Combine(output, "checkpoint-6", "model.safetensors")
            let bytes = File.ReadAllBytes weightsFile
            bytes[bytes.Length - 3] <- bytes[bytes.Length - 3] ^^^ 0x40uy
            File.WriteAllBytes(weightsFile, bytes)
            let resumed = runCli (resumeLatest (runArgs output 6))
            expectExit 0 resumed
            let said = resumed.Stdout.Split('\n')
            let skipped = said |> Array.tryFind (fun l -> l.StartsWith "skipped checkpoint-6: ")
            Expect.isSome skipped (sprintf "the skipped checkpoint is named (stdout: %s)" resumed.Stdout)
            Expect.stringContains skipped.Value "model.safetensors" "with the file that does not match"
            Expect.stringContains skipped.Value "SHA-256" "and why"
            Expect.contains said (sprintf "resuming from %s (step 3 of 6)" (Path.Combine(output, "checkpoint-3"))) "the checkpoint used"
            Expect.stringContains resumed.Stdout "trained 3 steps (steps 4 to 6, resumed from" "counts this process's steps"
        }

        test "finding 7: a finished run continues with a larger --max-steps on the new total's schedule; a smaller one is refused before anything is written" {
            use folder = new TempFolder()
            let reference = folder.File "reference"
            expectExit 0 (runCli (runArgs reference 9))
            let output = folder.File "run"
            expectExit 0 (runCli (runArgs output 6))
            let longer = runCli (resumeLatest (runArgs output 9))
            expectExit 0 longer
            Expect.stringContains longer.Stdout (sprintf "resuming from %s (step 6 of 9)" (Path.Combine(output, "checkpoint-6"))) "says where it starts"
            Expect.stringContains longer.Stdout "trained 3 steps (steps 7 to 9" "counts the steps of this process"
            let rate (lines: (int * JsonElement)[]) step = (snd (lines |> Array.find (fst >> (=) step))).GetProperty("lr").GetDouble()
            let continued, fresh = stepLines output, stepLines reference
            for step in 7 .. 9 do
                Expect.equal (rate continued step) (rate fresh step) (sprintf "step %d: the learning rate of a 9-step schedule" step)
            let finalState = trainerState (Path.Combine(output, "checkpoint-9"))
            Expect.equal (finalState.GetProperty("max_steps").GetInt32()) 9 "max_steps is the new total"
            let before = snapshot output
            let shorter = runCli (resumeLatest (runArgs output 5))
            expectExit 2 shorter
            Expect.stringContains shorter.Stderr "--max-steps" "names the option"
            Expect.stringContains shorter.Stderr "checkpoint-9 is at step 9" "names the checkpoint's step"
            Expect.equal (snapshot output) before "nothing was written"
        }

        test "finding 7: trainer_state.json fills num_train_epochs, total_flos, num_input_tokens_seen and eval_steps as HF does, and train_loss is the run's mean step loss, the same after a resume" {
            use folder = new TempFolder()
            let full = folder.File "full"
            expectExit 0 (runCli (runArgs full 7))
            let state = trainerState (Path.Combine(full, "checkpoint-6"))
            let history = [ for entry in state.GetProperty("log_history").EnumerateArray() -> entry ]
            let stepsPerEpoch =
                history
                |> List.find (fun e -> fst (e.TryGetProperty "epoch") && e.GetProperty("epoch").GetDouble() >= 1.0)
                |> fun e -> e.GetProperty("step").GetInt32()
            Expect.equal stepsPerEpoch 4 "7 micro-batches per epoch: 4 optimizer steps"
            Expect.equal (state.GetProperty("num_train_epochs").GetInt32()) 2 "7 steps reach into the second epoch: HF's max_steps // steps_per_epoch, plus 1 for the partial one"
            Expect.equal (state.GetProperty("eval_steps").GetInt32()) 1 "HF's eval_steps defaults to logging_steps"
            // A step is at most 2 micro-batches of 2 rows, each padded to its longest row (at most 32 tokens).
            let tokens = state.GetProperty("num_input_tokens_seen").GetInt64()
            let predicted = history |> List.filter (fun e -> fst (e.TryGetProperty "num_tokens")) |> List.sumBy (fun e -> e.GetProperty("num_tokens").GetInt64())
            Expect.isGreaterThan tokens predicted "input tokens, padding included, outnumber the predicted ones"
            Expect.isLessThanOrEqual tokens (6L * 2L * 2L * 32L) "at most 6 x 2 micro-batches of 2 x 32"
            let weights = Safetensors.load (Path.Combine(golden, "model", "model.safetensors"))
            let nonEmbedding = weights |> Map.toList |> List.filter (fun (name, _) -> not (name.Contains "embed_tokens")) |> List.sumBy (fun (_, t) -> t.numel ())
            weights |> Map.iter (fun _ t -> t.Dispose())
            Expect.equal (state.GetProperty("total_flos").GetDouble()) (6.0 * float nonEmbedding * float tokens) "HF's 6 x non-embedding parameters x input tokens"
            let losses = stepLines full |> Array.map (fun (_, l) -> l.GetProperty("loss").GetDouble())
            Expect.hasLength losses 7 "every step logged"
            let trainLoss = (summary full).GetProperty("train_loss").GetDouble()
            Expect.floatClose Accuracy.veryHigh trainLoss (Array.average losses) "train_loss is the mean step loss"
            Expect.notEqual trainLoss losses[6] "not the last step's loss"
            let resumed = folder.File "resumed"
            copyFolder full resumed
            for name in [ "checkpoint-6"; "final" ] do Directory.Delete(Path.Combine(resumed, name), true)
            expectExit 0 (runCli (resumeLatest (runArgs resumed 7)))
            Expect.equal ((summary resumed).GetProperty("train_loss").GetDouble()) trainLoss "the resumed run's train_loss covers the whole run"
            let again = trainerState (Path.Combine(resumed, "checkpoint-6"))
            for field in [ "num_input_tokens_seen"; "total_flos"; "num_train_epochs" ] do
                Expect.equal (again.GetProperty(field).GetRawText()) (state.GetProperty(field).GetRawText()) (field + " continues across the resume")
        }

        test "finding 7: best_model_checkpoint names the checkpoint where the output is published, not the staging folder it was trained in" {
            use folder = new TempFolder()
            let staging = folder.File ".run.staging-1"
            let published = folder.File "run"
            let request =
                { FineTune.request (Path.Combine(golden, "model")) (Path.Combine(golden, "data.jsonl")) staging with
                    PublishedOutputPath = Some published
                    Options =
                        { TrainOptions.defaults with
                            PerDeviceTrainBatchSize = 2
                            MaxSteps = 6
                            MaxSeqLen = 32
                            SaveSteps = 3
                            EvalSteps = 3 }
                    Data = { FineTune.defaultData with EvalDataPath = Some(Path.Combine(golden, "data.jsonl")) } }
            let result = FineTune.run request ignore
            let best = (trainerState (Path.Combine(staging, "checkpoint-6"))).GetProperty("best_model_checkpoint").GetString()
            Expect.equal (Path.GetDirectoryName best) published "the published folder"
            Expect.equal (Path.GetFileName best) (Path.GetFileName result.BestCheckpoint.Value) "the best checkpoint's name"
        }

        test "finding 7: after a resume the ETA counts only the steps this process trained" {
            use writer = new StringWriter()
            let clock = ManualClock()
            do
                use display = new ProgressDisplay(0, writer, false, 120, clock)
                clock.Advance(TimeSpan.FromSeconds 10.0)
                // Resumed at step 400 of 500, 10 steps done here in 10 s: the 90 left take 90 s (not 90/410 x 10 s).
                display.Report(TrainingProgress(410, 500, 0.8, 2.0, 1e-4, 0.5, 100.0, 400))
            Expect.stringContains (writer.ToString()) "elapsed 0:00:10  eta 0:01:30" "the pace of this process's steps"
        }

        test "finding 10: evaluation results are printed during training" {
            use folder = new TempFolder()
            let output = folder.File "run"
            let run = runCli (runArgs output 6 @ [ "--eval-split-ratio"; "0.3"; "--eval-steps"; "3" ])
            expectExit 0 run
            let said = run.Stdout.Split('\n')
            let evals = readJsonLines (Path.Combine(output, "metrics.jsonl")) |> Array.filter (fun l -> fst (l.TryGetProperty "eval_loss") && not (fst (l.TryGetProperty "train_runtime")))
            for line in evals do
                let step = line.GetProperty("step").GetInt32()
                let expected =
                    sprintf "%s: loss %s  perplexity %s"
                        (if step = 0 then "eval before training" else sprintf "eval at step %d" step)
                        (line.GetProperty("eval_loss").GetDouble().ToString("F4", Globalization.CultureInfo.InvariantCulture))
                        (line.GetProperty("eval_perplexity").GetDouble().ToString("F2", Globalization.CultureInfo.InvariantCulture))
                Expect.contains said expected (sprintf "step %d's evaluation is a line of its own (stdout: %s)" step run.Stdout)
            Expect.hasLength evals 3 "before training, at step 3 and at step 6"
            let evalLine = said |> Array.findIndex (fun l -> l.StartsWith "eval at step 3:")
            Expect.isTrue (said[evalLine - 1].StartsWith "step 3/6") "printed right after the step it follows"
        }
    ]
