/// `functional bench train` and its parts: correctness only, never a timing.
module Functional.Tests.BenchmarkTests

open System.Diagnostics
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Functional.Benchmarks
open Functional.Tests.TestUtil

/// A tiny version of a preset: 2 layers, width 64 (one head), batch 2 x 16 tokens, vocabulary 8192.
let private tiny (preset: BenchmarkConfig) = TrainingBenchmark.resize 2 64 2 16 preset

/// Skips the calling test where Debian's PyTorch is missing (.ci/run installs it through
/// tools/reference/install-deps.sh; the README's test command alone then skips these tests, saying why).
let private requirePyTorch () =
    let hasTorch =
        File.Exists "/usr/bin/python3"
        && (let info = ProcessStartInfo("/usr/bin/python3", "-c \"import torch\"", RedirectStandardError = true, UseShellExecute = false)
            use p = Process.Start info
            p.StandardError.ReadToEnd() |> ignore
            p.WaitForExit()
            p.ExitCode = 0)
    if not hasTorch then skiptest "needs /usr/bin/python3 with PyTorch (sh tools/reference/install-deps.sh)"

/// Runs tools/reference/bench_torch.py with the given arguments; returns its stdout.
let private runPython (args: string list) =
    requirePyTorch ()
    let info = ProcessStartInfo("/usr/bin/python3", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    info.ArgumentList.Add(Path.Combine(ScriptTests.repositoryRoot (), "tools", "reference", "bench_torch.py"))
    for a in args do info.ArgumentList.Add a
    use p = Process.Start info
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    Expect.equal p.ExitCode 0 (sprintf "bench_torch.py exit code (stderr: %s)" stderr.Result)
    stdout.Result

let private losses (model: BenchmarkConfig) =
    // The thread count in force: the benchmark sets it, and tests share the process.
    let settings = { Steps = 3; WarmupSteps = 0; Threads = torch.get_num_threads (); LearningRate = 1e-3 }
    let trainer = TrainingBenchmark.runTrainer model "fp32" settings
    let plain, _ = TrainingBenchmark.runPlainLoop model "fp32" settings
    trainer.Losses, plain.Losses

[<Tests>]
let tests =
    testList "benchmarks" [
        test "synthetic rows follow (row * 7919 + position * 31) % vocabulary" {
            let rows = TrainingBenchmark.syntheticRows 8192 0 3 4
            Expect.equal rows [| [| 0L; 31L; 62L; 93L |]; [| 7919L; 7950L; 7981L; 8012L |]; [| 7646L; 7677L; 7708L; 7739L |] |] "first rows"
            Expect.equal (TrainingBenchmark.syntheticToken 8192 1 9) 6L "wraps around the vocabulary: (7919 + 279) % 8192"
        }
        test "the Python reference generates the same synthetic rows" {
            let printed = runPython [ "print-data"; "--first-row"; "5"; "--rows"; "3"; "--seq-len"; "40"; "--vocab"; "8192" ]
            let python =
                JsonDocument.Parse(printed).RootElement.EnumerateArray()
                |> Seq.map (fun row -> row.EnumerateArray() |> Seq.map (fun v -> v.GetInt64()) |> Array.ofSeq)
                |> Array.ofSeq
            Expect.equal python (TrainingBenchmark.syntheticRows 8192 5 3 40) "rows 5..7, 40 tokens"
        }
        torchTest "FLOPs per token are 6N + 12LTd with N the parameters in matmuls (gpt2-small)" (fun () ->
            let lm = Functional.Models.CausalLm.create TrainingBenchmark.gpt2Small.Model 1L
            use _ = lm.Module
            // Per layer 12 d^2 + 13 d (c_attn, attention c_proj, c_fc, MLP c_proj, two LayerNorms), the tied
            // wte as the head, ln_f; not wpe.
            let n = 6L * (12L * 384L * 384L + 13L * 384L) + 8192L * 384L + 2L * 384L
            Expect.equal (TrainingBenchmark.matmulParameters lm) n "N"
            Expect.equal (TrainingBenchmark.flopsPerToken lm 128) (6.0 * float n + 12.0 * 6.0 * 128.0 * 384.0) "FLOPs per token"
            Expect.equal (TrainingBenchmark.flopsPerToken lm 128) 86298624.0 "the figure")
        torchTest "FLOPs per token of a LLaMA count lm_head but not the untied embedding" (fun () ->
            let config = tiny TrainingBenchmark.llama
            let lm = Functional.Models.CausalLm.create config.Model 1L
            use _ = lm.Module
            // Width 64, intermediate 176: q, k, v, o 4 d^2, gate/up/down 3 d i, two RMSNorms; lm_head; final norm.
            let n = 2L * (4L * 64L * 64L + 3L * 64L * 176L + 2L * 64L) + 8192L * 64L + 64L
            Expect.equal (TrainingBenchmark.matmulParameters lm) n "N"
            Expect.equal (TrainingBenchmark.flopsPerToken lm 16) (6.0 * float n + 12.0 * 2.0 * 16.0 * 64.0) "FLOPs per token")
        torchTest "the plain TorchSharp loop and our trainer give the same losses for 3 steps (GPT-2, fp32)" (fun () ->
            let ours, plain = losses (tiny TrainingBenchmark.gpt2Small)
            Expect.hasLength ours 3 "three losses"
            Expect.isLessThan (abs (ours[0] - log 8192.0)) 0.1 "the first loss is about ln(vocabulary)"
            for i in 0..2 do
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } ours[i] plain[i] (sprintf "loss of step %d" (i + 1)))
        torchTest "the plain TorchSharp loop and our trainer give the same losses for 3 steps (LLaMA, fp32)" (fun () ->
            let ours, plain = losses (tiny TrainingBenchmark.llama)
            for i in 0..2 do
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } ours[i] plain[i] (sprintf "loss of step %d" (i + 1)))
        test "bench train prints every figure for us, the plain loop and PyTorch, and writes them as JSON" {
            requirePyTorch ()
            use folder = new TempFolder()
            let json = folder.File "figures.json"
            let run =
                runCli
                    [ "bench"; "train"; "--config"; "llama"; "--layers"; "1"; "--width"; "64"; "--batch"; "2"; "--seq-len"; "16"
                      "--steps"; "2"; "--warmup"; "1"; "--threads"; "1"; "--pytorch"; "--json"; json ]
            Expect.equal run.ExitCode 0 (sprintf "exit code (stderr: %s)" run.Stderr)
            for text in
                [ "6N + 12LTd"; "matmul peak"; "tokens/s"; "fwd s"; "bwd s"; "opt s"; "other s"; "MFU/f32"; "MFU/b16"; "peak MB"
                  "fp32  ours"; "fp32  plain"; "fp32  pytorch"; "bf16  ours"; "bf16  plain"; "bf16  pytorch"
                  "our overhead"; "ours / pytorch"; "optimizer"; "memory fp32: estimate"; "memory bf16: estimate"; "bf16 / fp32" ] do
                Expect.stringContains run.Stdout text (sprintf "prints %s" text)
            let figures = JsonDocument.Parse(File.ReadAllText json).RootElement[0]
            let pytorch = figures.GetProperty "pytorch"
            Expect.equal (pytorch.GetProperty("flops_per_token").GetDouble()) (figures.GetProperty("flops_per_token").GetDouble())
                "both sides count the same model FLOPs"
            Expect.equal (pytorch.GetProperty("matmul_parameters").GetInt64()) (figures.GetProperty("matmul_parameters").GetInt64())
                "both sides build the same model"
            for run in figures.GetProperty("runs").EnumerateArray() do
                for loop in [ "ours"; "plain" ] do
                    let figures = run.GetProperty loop
                    for field in [ "tokens_per_second"; "forward_seconds"; "backward_seconds"; "optimizer_seconds"; "other_seconds" ] do
                        Expect.isGreaterThan (figures.GetProperty(field).GetDouble()) 0.0 (sprintf "%s %s" loop field)
                Expect.isGreaterThan (run.GetProperty("memory_estimate").GetProperty("total").GetInt64()) 0L "memory estimate"
        }
        test "bench memory --section loss prints the peak of the full logits and of the chunked loss" {
            let run =
                runCli
                    [ "bench"; "memory"; "--section"; "loss"; "--vocab"; "3000"; "--loss-width"; "16"; "--loss-batch"; "2"
                      "--loss-seq-len"; "64"; "--loss-chunk-size"; "16"; "--loss-precision"; "fp32,bf16"; "--threads"; "1" ]
            Expect.equal run.ExitCode 0 (sprintf "exit code (stderr: %s)" run.Stderr)
            for text in [ "vocabulary 3,000"; "the full fp32 logits alone are 2 MB"; "peak MB"; "fp32       full logits"; "fp32       chunked 16"
                          "bf16       full logits"; "bf16       chunked 16"; "fp32: chunked peak"; "bf16: chunked peak" ] do
                Expect.stringContains run.Stdout text (sprintf "prints %s" text)
            let bad = runCli [ "bench"; "memory"; "--section"; "loss"; "--loss-chunk-size"; "0" ]
            Expect.equal bad.ExitCode 2 "a chunk size of 0 is refused"
            Expect.stringContains bad.Stderr "--loss-chunk-size" "naming the option"
        }
        test "a training run's last metrics line carries HF's train_runtime and throughput fields" {
            use folder = new TempFolder()
            let model = folder.File "model"
            copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) model
            let output = folder.File "out"
            let run =
                runCli
                    [ "train"; "--model"; model; "--data"; Path.Combine(goldenDir "llama-cosine", "data.jsonl"); "--output"; output
                      "--per-device-train-batch-size"; "2"; "--max-steps"; "2"; "--max-seq-len"; "32" ]
            Expect.equal run.ExitCode 0 (sprintf "exit code (stderr: %s)" run.Stderr)
            let last = (readJsonLines (Path.Combine(output, "metrics.jsonl")) |> Array.last)
            for field in [ "train_runtime"; "train_samples_per_second"; "train_steps_per_second" ] do
                Expect.isGreaterThan (last.GetProperty(field).GetDouble()) 0.0 field
            Expect.stringContains run.Stdout "trained 2 steps in" "the console reports the run's time"
        }
    ]
