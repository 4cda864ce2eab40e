/// End-to-end tests of the learning-rate schedules through `functional train`: the "lr" that metrics.jsonl
/// records for each optimizer step against Hugging Face's expected learning rates for the same settings
/// (transformers' tests/optimization/test_optimization.py: 10 steps, warmup 2, learning rate 10, compared
/// to 1e-2 as there), and HF's strictness about schedule arguments.
module Functional.Tests.ScheduleCliTests

open System.IO
open Expecto
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
        }
    ]
