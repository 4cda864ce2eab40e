/// Checkpoints and exact resume, end to end through the command line: kill -9 at random moments,
/// SIGINT/SIGTERM, a resume that differs from the saved run, corrupt checkpoints, best model and
/// early stopping.
module Functional.Tests.ResumeTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open Expecto
open Functional.Checkpoint
open Functional.Tests.TestUtil

/// 40 optimizer steps of the golden LLaMA with shuffling and accumulation, a checkpoint every 3 steps.
let private runArgs (output: string) =
    let golden = goldenDir "llama-cosine"
    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl"); "--output"; output
      "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; "40"; "--max-seq-len"; "32"
      "--learning-rate"; "3e-3"; "--lr-scheduler-type"; "cosine"; "--num-warmup-steps"; "4"; "--save-steps"; "3"
      "--save-total-limit"; "2"; "--threads"; "2"; "--seed"; "7" ]

/// The arguments with an option set to value (replaced where present, else added).
let private setOption (name: string) (value: string) (args: string list) =
    match List.tryFindIndex ((=) name) args with
    | Some i -> List.updateAt (i + 1) value args
    | None -> args @ [ name; value ]

let private startCli (args: string list) =
    let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll"))
    for a in args do info.ArgumentList.Add a
    let p = Process.Start info
    p.OutputDataReceived.Add ignore
    p.ErrorDataReceived.Add ignore
    p.BeginOutputReadLine()
    p.BeginErrorReadLine()
    p

/// metrics.jsonl without its last line, the summary with timings.
let private deterministicMetrics (output: string) =
    let lines = File.ReadAllLines(Path.Combine(output, "metrics.jsonl"))
    lines[.. lines.Length - 2]

let private weights (output: string) = File.ReadAllBytes(Path.Combine(output, "final", "model.safetensors"))

let private waitFor (condition: unit -> bool) (timeout: TimeSpan) =
    let clock = Stopwatch.StartNew()
    while not (condition ()) && clock.Elapsed < timeout do Thread.Sleep 20

let private checkpointSteps (output: string) =
    if Directory.Exists output then
        Directory.GetDirectories(output, "checkpoint-*") |> Array.choose CheckpointFolder.stepOf
    else [||]

[<Tests>]
let tests =
    testSequenced <| testList "resume" [
        test "kill -9 at 10 random moments, then resume from latest: metrics.jsonl and final weights are bit-identical, no checkpoint is unusable" {
            use folder = new TempFolder()
            let reference = folder.File "reference"
            let baseline = runCli (runArgs reference)
            Expect.equal baseline.ExitCode 0 baseline.Stderr
            let random = Random 20261122
            for attempt in 1 .. 10 do
                let output = folder.File(sprintf "killed-%d" attempt)
                use p = startCli (runArgs output)
                waitFor (fun () -> checkpointSteps output |> Array.isEmpty |> not || p.HasExited) (TimeSpan.FromSeconds 60.0)
                Thread.Sleep(random.Next(0, 1200))
                if not p.HasExited then p.Kill()
                p.WaitForExit()
                for step in checkpointSteps output do
                    CheckpointFolder.verify (Path.Combine(output, sprintf "checkpoint-%d" step))
                let resumed = runCli (runArgs output @ [ "--resume-from-checkpoint"; "latest" ])
                Expect.equal resumed.ExitCode 0 (sprintf "attempt %d: resume exit code (stderr: %s)" attempt resumed.Stderr)
                Expect.equal (deterministicMetrics output) (deterministicMetrics reference) (sprintf "attempt %d: metrics.jsonl" attempt)
                Expect.equal (weights output) (weights reference) (sprintf "attempt %d: final weights" attempt)
        }
        for signal, code in [ "INT", 130; "TERM", 143 ] do
            test (sprintf "SIG%s finishes the step, saves a checkpoint and exits with %d" signal code) {
                use folder = new TempFolder()
                let output = folder.File "run"
                use p = startCli (runArgs output |> setOption "--max-steps" "4000" |> setOption "--save-steps" "100000")
                let metrics = Path.Combine(output, "metrics.jsonl")
                waitFor (fun () -> File.Exists metrics && File.ReadAllLines(metrics).Length >= 5 || p.HasExited) (TimeSpan.FromSeconds 60.0)
                sendSignal signal p.Id
                p.WaitForExit()
                Expect.equal p.ExitCode code "exit code"
                let steps = checkpointSteps output
                Expect.equal steps.Length 1 "one checkpoint"
                let lastLogged = File.ReadAllLines(metrics) |> Array.last |> fun l -> JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt32()
                Expect.equal steps[0] lastLogged "the checkpoint is the last finished step"
                Expect.isFalse (Directory.Exists(Path.Combine(output, "final"))) "no final model after an interruption"
                CheckpointFolder.verify (Path.Combine(output, sprintf "checkpoint-%d" steps[0]))
            }
        test "resuming with another accumulation, optimizer or model says what differs" {
            use folder = new TempFolder()
            let output = folder.File "run"
            let args = runArgs output |> setOption "--max-steps" "6"
            Expect.equal (runCli args).ExitCode 0 "first run"
            let before = snapshot output
            let resume name value = runCli (args |> setOption name value |> setOption "--resume-from-checkpoint" "latest")
            let accumulation = resume "--gradient-accumulation-steps" "4"
            Expect.equal accumulation.ExitCode 2 "bad input"
            Expect.stringContains accumulation.Stderr "--gradient-accumulation-steps: the checkpoint was trained with 2, this run has 4" "names the difference"
            let optimizer = resume "--optimizer" "sgd"
            Expect.stringContains optimizer.Stderr "--optimizer: the checkpoint was trained with AdamW, this run has Sgd" "names the optimizer"
            let otherModel = folder.File "other-model"
            copyFolder (Path.Combine(goldenDir "gpt2-cosine", "model")) otherModel
            let model = resume "--model" otherModel
            Expect.equal model.ExitCode 2 "bad input"
            Expect.stringContains model.Stderr "--model (config.json)" "names the model"
            Expect.equal (snapshot output) before "nothing was written"
        }
        test "load-best-model-at-end keeps the best checkpoint through rotation and saves its weights as final" {
            use folder = new TempFolder()
            let output = folder.File "run"
            let args =
                runArgs output
                |> setOption "--max-steps" "8" |> setOption "--save-steps" "2" |> setOption "--save-total-limit" "1"
                |> setOption "--eval-split-ratio" "0.3" |> setOption "--eval-strategy" "steps" |> setOption "--eval-steps" "2"
                |> fun a -> a @ [ "--load-best-model-at-end" ]
            let run = runCli args
            Expect.equal run.ExitCode 0 run.Stderr
            let evals =
                readJsonLines (Path.Combine(output, "metrics.jsonl"))
                |> Array.filter (fun l -> (l.TryGetProperty "eval_loss" |> fst) && not (l.TryGetProperty "train_runtime" |> fst))
                |> Array.map (fun l -> l.GetProperty("step").GetInt32(), l.GetProperty("eval_loss").GetDouble())
                |> Array.filter (fun (step, _) -> step > 0)
            let bestStep = evals |> Array.fold (fun (bs, bl) (s, l) -> if l < bl then (s, l) else (bs, bl)) (0, infinity) |> fst
            Expect.equal (checkpointSteps output |> Array.sort) (Array.distinct [| bestStep; 8 |] |> Array.sort) "the best and the newest are kept with a limit of 1"
            let state = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "checkpoint-8", "trainer_state.json"))).RootElement
            Expect.stringContains (state.GetProperty("best_model_checkpoint").GetString()) (sprintf "checkpoint-%d" bestStep) "trainer_state names the best"
            Expect.equal (File.ReadAllBytes(Path.Combine(output, "final", "model.safetensors"))) (File.ReadAllBytes(Path.Combine(output, sprintf "checkpoint-%d" bestStep, "model.safetensors"))) "final holds the best weights"
        }
        test "early stopping ends the run after patience evaluations without improvement" {
            use folder = new TempFolder()
            let output = folder.File "run"
            // With a learning rate of 0 the evaluation loss never improves after the first evaluation.
            let args =
                runArgs output
                |> setOption "--learning-rate" "0" |> setOption "--eval-split-ratio" "0.3" |> setOption "--eval-strategy" "steps"
                |> setOption "--eval-steps" "1" |> setOption "--early-stopping-patience" "2"
            let run = runCli args
            Expect.equal run.ExitCode 0 run.Stderr
            let last = File.ReadAllLines(Path.Combine(output, "metrics.jsonl")) |> Array.last |> fun l -> JsonDocument.Parse(l).RootElement
            Expect.equal (last.GetProperty("step").GetInt32()) 3 "one improving evaluation, then two without improvement"
        }
        test "LoRA with --only-optimize-lora: final/ holds the PEFT adapter, resume is exact, and export --merge-lora changes only the adapted projections" {
            use folder = new TempFolder()
            let lora output =
                runArgs output
                |> setOption "--max-steps" "6"
                |> fun a -> a @ [ "--lora-dim"; "4"; "--lora-target-modules"; "q_proj,v_proj"; "--only-optimize-lora"; "--lora-learning-rate"; "1e-2" ]
            let full = folder.File "full"
            let run = runCli (lora full)
            Expect.equal run.ExitCode 0 run.Stderr
            for file in [ "adapter_config.json"; "adapter_model.safetensors" ] do
                Expect.isTrue (File.Exists(Path.Combine(full, "final", file))) (file + " in final/")
                Expect.isTrue (File.Exists(Path.Combine(full, "checkpoint-3", file))) (file + " in the checkpoint")
            let killed = folder.File "resumed"
            copyFolder full killed
            for name in [ "checkpoint-6"; "final" ] do Directory.Delete(Path.Combine(killed, name), true)
            let resumed = runCli (lora killed @ [ "--resume-from-checkpoint"; "latest" ])
            Expect.equal resumed.ExitCode 0 resumed.Stderr
            Expect.equal (File.ReadAllBytes(Path.Combine(killed, "final", "adapter_model.safetensors"))) (File.ReadAllBytes(Path.Combine(full, "final", "adapter_model.safetensors"))) "the resumed adapter is identical"
            let merged = folder.File "merged"
            let baseModel = Path.Combine(goldenDir "llama-cosine", "model")
            let export = runCli [ "export"; "--model"; baseModel; "--lora-adapter"; Path.Combine(full, "final"); "--merge-lora"; "--output"; merged ]
            Expect.equal export.ExitCode 0 export.Stderr
            let before = Safetensors.load (Path.Combine(baseModel, "model.safetensors"))
            let after = Safetensors.load (Path.Combine(merged, "model.safetensors"))
            for KeyValue(name, t) in before do
                let changed = not (t.Equals after[name])
                let adapted = name.EndsWith "q_proj.weight" || name.EndsWith "v_proj.weight"
                Expect.equal changed adapted (sprintf "%s changes exactly when it is adapted" name)
        }
        test "a corrupt or incomplete checkpoint is never loaded" {
            use folder = new TempFolder()
            let output = folder.File "run"
            let args = runArgs output |> setOption "--max-steps" "6"
            Expect.equal (runCli args).ExitCode 0 "first run"
            let checkpoint = Path.Combine(output, "checkpoint-6")
            let weightsFile = Path.Combine(checkpoint, "model.safetensors")
            let bytes = File.ReadAllBytes weightsFile
            bytes[bytes.Length - 3] <- bytes[bytes.Length - 3] ^^^ 0x40uy
            File.WriteAllBytes(weightsFile, bytes)
            let corrupt = runCli (args @ [ "--resume-from-checkpoint"; checkpoint ])
            Expect.equal corrupt.ExitCode 2 "bad input"
            Expect.stringContains corrupt.Stderr "model.safetensors" "names the corrupt file"
            File.Delete(Path.Combine(checkpoint, CheckpointFolder.ManifestName))
            let incomplete = runCli (args @ [ "--resume-from-checkpoint"; checkpoint ])
            Expect.equal incomplete.ExitCode 2 "bad input"
            Expect.stringContains incomplete.Stderr "checkpoint-6" "names the checkpoint"
            Expect.equal (CheckpointFolder.latest output |> Option.map Path.GetFileName) (Some "checkpoint-3") "latest skips it"
        }
    ]
