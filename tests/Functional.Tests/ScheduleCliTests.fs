/// End-to-end tests of the learning-rate schedules through `functional train`: the "lr" that metrics.jsonl
/// records for each optimizer step against Hugging Face's expected learning rates for the same settings
/// (transformers' tests/optimization/test_optimization.py: 10 steps, warmup 2, learning rate 10, compared
/// to 1e-2 as there), and HF's strictness about schedule arguments.
module Functional.Tests.ScheduleCliTests

open System.IO
open Expecto
open Functional
open Functional.Tests.TestUtil

/// Trains the small golden LLaMA for 10 optimizer steps of one row each with a schedule and returns the
/// per-step "lr" of metrics.jsonl (the summary line left out), or fails with the run's stderr.
let private trainLrs (root: TempFolder) (name: string) (extra: string list) =
    let output = root.File name
    let run =
        runCli (
            [ "train"; "--model"; Path.Combine(goldenDir "llama-cosine", "model")
              "--data"; Path.Combine(goldenDir "llama-cosine", "data.jsonl"); "--output"; output
              "--per-device-train-batch-size"; "1"; "--max-steps"; "10"; "--max-seq-len"; "16"
              "--save-strategy"; "no"; "--report-to"; "none"; "--threads"; "1" ]
            @ extra)
    Expect.equal run.ExitCode 0 (sprintf "%s: exit code 0 (stderr: %s)" name run.Stderr)
    let lines = readJsonLines (Path.Combine(output, "metrics.jsonl"))
    lines
    |> Array.filter (fun l -> fst (l.TryGetProperty "lr"))
    |> Array.map (fun l -> l.GetProperty("lr").GetDouble())

/// The exit code and stderr of a run that must be refused.
let private refused (root: TempFolder) (name: string) (extra: string list) (parts: string list) =
    let run =
        runCli (
            [ "train"; "--model"; Path.Combine(goldenDir "llama-cosine", "model")
              "--data"; Path.Combine(goldenDir "llama-cosine", "data.jsonl"); "--output"; root.File name
              "--max-steps"; "10"; "--max-seq-len"; "16"; "--report-to"; "none" ]
            @ extra)
    Expect.equal run.ExitCode 2 (sprintf "%s: exit code 2 (stderr: %s)" name run.Stderr)
    for part in parts do
        Expect.stringContains run.Stderr part (sprintf "%s: the message names %s" name part)
    Expect.isFalse (run.Stderr.Contains "   at ") "no stack trace"
    Expect.isFalse (Directory.Exists(root.File name) && File.Exists(Path.Combine(root.File name, "metrics.jsonl"))) "nothing trained"

let private expectLrs (name: string) (tolerance: float) (expected: float list) (actual: float[]) =
    Expect.equal actual.Length expected.Length (sprintf "%s: one lr per step" name)
    List.iteri
        (fun i e ->
            Expect.isLessThanOrEqual (abs (actual[i] - e)) tolerance
                (sprintf "%s: step %d lr %g, HF expects %g (all: %A)" name (i + 1) actual[i] e actual))
        expected

/// HF's test_schedulers cases: name, extra arguments, expected learning rates of the 10 updates.
let private hfCases =
    let common = [ "--learning-rate"; "10"; "--num-warmup-steps"; "2" ]
    [ "constant", common, List.replicate 10 10.0
      "constant_with_warmup", [ "--learning-rate"; "10"; "--num-warmup-steps"; "4" ],
      [ 0.0; 2.5; 5.0; 7.5; 10.0; 10.0; 10.0; 10.0; 10.0; 10.0 ]
      "linear", common, [ 0.0; 5.0; 10.0; 8.75; 7.5; 6.25; 5.0; 3.75; 2.5; 1.25 ]
      "cosine", common, [ 0.0; 5.0; 10.0; 9.61; 8.53; 6.91; 5.0; 3.08; 1.46; 0.38 ]
      "cosine_with_restarts", common @ [ "--lr-scheduler-kwargs"; """{"num_cycles": 2}""" ],
      [ 0.0; 5.0; 10.0; 8.53; 5.0; 1.46; 10.0; 8.53; 5.0; 1.46 ]
      "polynomial", common @ [ "--lr-scheduler-kwargs"; """{"power": 2.0, "lr_end": 1e-7}""" ],
      [ 0.0; 5.0; 10.0; 7.656; 5.625; 3.906; 2.5; 1.406; 0.625; 0.156 ]
      "inverse_sqrt", common, [ 0.0; 5.0; 10.0; 8.165; 7.071; 6.325; 5.774; 5.345; 5.0; 4.714 ]
      "warmup_stable_decay", common @ [ "--lr-scheduler-kwargs"; """{"num_decay_steps": 2, "min_lr_ratio": 0.0}""" ],
      [ 0.0; 5.0; 10.0; 10.0; 10.0; 10.0; 10.0; 10.0; 10.0; 5.0 ]
      // HF's cosine list lifted to a floor of 0.1 by HF's formula c (1 - 0.1) + 0.1.
      "cosine_with_min_lr", common @ [ "--lr-scheduler-kwargs"; """{"min_lr_rate": 0.1}""" ],
      [ 0.0; 5.0; 10.0; 9.649; 8.677; 7.219; 5.5; 3.772; 2.314; 1.342 ] ]

/// Trains the golden LLaMA 12 steps with reduce_lr_on_plateau (patience 0, factor 0.5), evaluating every 2
/// steps and saving at step 6; extra adds arguments (e.g. a resume). Returns metrics.jsonl's lines.
let private plateauRun (root: TempFolder) (name: string) (extra: string list) =
    let g = goldenDir "llama-cosine"
    let run =
        runCli (
            [ "train"; "--model"; Path.Combine(g, "model"); "--data"; Path.Combine(g, "data.jsonl")
              "--eval-data"; Path.Combine(g, "data.jsonl"); "--output"; root.File name
              "--per-device-train-batch-size"; "1"; "--max-steps"; "12"; "--max-seq-len"; "16"; "--learning-rate"; "0.05"
              "--lr-scheduler-type"; "reduce_lr_on_plateau"; "--lr-scheduler-kwargs"; """{"patience": 0, "factor": 0.5}"""
              "--eval-steps"; "2"; "--save-steps"; "6"; "--report-to"; "none"; "--threads"; "1" ]
            @ extra)
    Expect.equal run.ExitCode 0 (sprintf "%s: exit code 0 (stderr: %s)" name run.Stderr)
    readJsonLines (Path.Combine(root.File name, "metrics.jsonl"))

let private has (field: string) (l: System.Text.Json.JsonElement) = fst (l.TryGetProperty field)

let private stepLrs (lines: System.Text.Json.JsonElement[]) =
    lines |> Array.filter (has "lr") |> Array.map (fun l -> l.GetProperty("step").GetInt32(), l.GetProperty("lr").GetDouble())

[<Tests>]
let tests =
    testList "schedules cli" [
        test "every HF schedule logs HF's expected learning rate at each step" {
            use root = new TempFolder()
            for name, extra, expected in hfCases do
                trainLrs root name ([ "--lr-scheduler-type"; name ] @ extra) |> expectLrs name 1e-2 expected
        }
        test "cosine_warmup_with_min_lr follows HF's trainer test (lr 0.2, warmup 2, min_lr 1e-5)" {
            use root = new TempFolder()
            let lrs =
                trainLrs root "cwml"
                    [ "--lr-scheduler-type"; "cosine_warmup_with_min_lr"; "--lr-scheduler-kwargs"; """{"min_lr": 1e-5}"""
                      "--learning-rate"; "0.2"; "--warmup-steps"; "2" ]
            Expect.equal lrs.Length 10 "ten steps"
            Expect.floatClose Accuracy.veryHigh lrs[0] 0.1 "HF: step_lrs[0] == 0.1"
            Expect.floatClose Accuracy.veryHigh lrs[1] 0.2 "HF: step_lrs[1] == 0.2"
            Expect.floatClose Accuracy.veryHigh lrs[9] 1e-5 "HF: step_lrs[-1] == 1e-05"
            Expect.isTrue (Array.pairwise lrs[1..] |> Array.forall (fun (a, b) -> b < a)) "the decay falls at every step"
        }
        test "--warmup-steps 0.3 is a ratio of the run's steps (HF v5)" {
            use root = new TempFolder()
            let lrs = trainLrs root "ratio" [ "--lr-scheduler-type"; "linear"; "--learning-rate"; "10"; "--warmup-steps"; "0.3" ]
            expectLrs "warmup 0.3" 1e-9 [ 0.0; 10.0 / 3.0; 20.0 / 3.0; 10.0; 60.0 / 7.0; 50.0 / 7.0; 40.0 / 7.0; 30.0 / 7.0; 20.0 / 7.0; 10.0 / 7.0 ] lrs
        }
        test "reduce_lr_on_plateau steps with each evaluation during the run, as torch's ReduceLROnPlateau" {
            use root = new TempFolder()
            let lines = plateauRun root "plateau" []
            let evals =
                lines |> Array.filter (fun l -> has "eval_loss" l && not (has "train_runtime" l)) |> Array.map (fun l -> l.GetProperty("step").GetInt32(), l.GetProperty("eval_loss").GetDouble())
            Expect.equal (Array.map fst evals) [| 0; 2; 4; 6; 8; 10; 12 |] "evaluated before training and every 2 steps"
            let options = { PlateauOptions.Defaults with Patience = 0; Factor = 0.5 }
            // The evaluation before training does not step the schedule; step s + 1 uses the rate after the
            // evaluations of steps <= s.
            let expected =
                [ for s in 1 .. 12 ->
                    evals
                    |> Array.filter (fun (at, _) -> at >= 1 && at < s)
                    |> Array.fold (fun state (_, loss) -> Functional.Plateau.step options state loss) (Functional.Plateau.init options 0.05)
                    |> fun state -> s, state.LearningRate ]
            Expect.sequenceEqual (stepLrs lines) expected "the logged lr of every step"
            Expect.isLessThan (snd (List.last expected)) 0.05 "this run reduces the rate"
        }
        test "a resumed reduce_lr_on_plateau run goes on from its checkpoint's state" {
            use root = new TempFolder()
            let whole = plateauRun root "whole" []
            let resumedOutput = root.File "resumed"
            Directory.CreateDirectory resumedOutput |> ignore
            copyFolder (Path.Combine(root.File "whole", "checkpoint-6")) (Path.Combine(resumedOutput, "checkpoint-6"))
            let resumed = plateauRun root "resumed" [ "--resume-from-checkpoint"; Path.Combine(resumedOutput, "checkpoint-6") ]
            let after (lines: System.Text.Json.JsonElement[]) = stepLrs lines |> Array.filter (fun (s, _) -> s > 6)
            Expect.equal (after resumed |> Array.map fst) [| 7 .. 12 |] "steps 7 to 12 trained after the resume"
            Expect.sequenceEqual (after resumed) (after whole) "the same rates as the uninterrupted run"
            let firstAfter = (after whole).[0]
            Expect.isLessThan (snd firstAfter) 0.05 "the rate was already reduced at the checkpoint"
        }
        test "schedule arguments are checked as strictly as HF does" {
            use root = new TempFolder()
            refused root "a" [ "--lr-scheduler-type"; "linear"; "--lr-scheduler-kwargs"; """{"num_cycles": 2}""" ]
                [ "num_cycles"; "linear does not take" ]
            refused root "b"
                [ "--lr-scheduler-type"; "cosine_warmup_with_min_lr"; "--lr-scheduler-kwargs"; """{"min_lr": 1e-5, "min_lr_rate": 0.1}""" ]
                [ "min_lr and min_lr_rate" ]
            refused root "c" [ "--lr-scheduler-type"; "cosine_with_min_lr" ] [ "min_lr or min_lr_rate" ]
            refused root "d" [ "--warmup-steps"; "2.5" ] [ "--num-warmup-steps"; "whole number" ]
            refused root "e" [ "--warmup-steps"; "0.3"; "--warmup-ratio"; "0.1" ] [ "--num-warmup-steps"; "--warmup-ratio" ]
            refused root "f" [ "--lr-scheduler-type"; "reduce_lr_on_plateau" ] [ "--lr-scheduler-type"; "--eval-strategy" ]
            refused root "g"
                [ "--lr-scheduler-type"; "reduce_lr_on_plateau"; "--eval-steps"; "2"; "--eval-data"; Path.Combine(goldenDir "llama-cosine", "data.jsonl")
                  "--lr-scheduler-kwargs"; """{"min_lr_rate": 0.1}""" ]
                [ "min_lr_rate"; "reduce_lr_on_plateau does not take" ]
            refused root "h"
                [ "--lr-scheduler-type"; "reduce_lr_on_plateau"; "--eval-steps"; "2"; "--eval-data"; Path.Combine(goldenDir "llama-cosine", "data.jsonl")
                  "--lr-scheduler-kwargs"; """{"factor": 1.5}""" ]
                [ "factor" ]
        }
    ]
