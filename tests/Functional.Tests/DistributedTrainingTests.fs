/// End-to-end tests of data-parallel training under `mpirun -np 2` (the list "distributed training"): every
/// ZeRO stage gives the per-step figures and final weights of one process with the same global batch (the
/// resume of a killed 2-process run on 1 process and at other stages is in DistributedFaultTests).
module Functional.Tests.DistributedTrainingTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Expecto
open Functional
open Functional.Tests.TestUtil

/// The mpirun on PATH, or a skip saying how to get it.
let private mpirun () = DistributedTests.requireMpirun ()

/// Runs `functional args` under `mpirun -np processes` (one intra-op thread per process), or as one plain
/// process when processes is 1. Fails the test when it does not finish in 4 minutes.
let internal train (processes: int) (args: string list) =
    let info =
        if processes > 1 then DistributedTests.mpirunInfo processes "Functional.Cli.dll" args
        else
            let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
            for a in Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll") :: args do info.ArgumentList.Add a
            info.Environment["OMP_NUM_THREADS"] <- "1"
            info
    use p = Process.Start info
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit(TimeSpan.FromMinutes 4.0)) then
        p.Kill true
        failtestf "functional %s on %d processes did not finish in 4 minutes\n%s\n%s" (String.Join(" ", args)) processes stdout.Result stderr.Result
    let report = sprintf "functional %s on %d processes: exit %d\nstdout:\n%s\nstderr:\n%s" (String.Join(" ", args)) processes p.ExitCode stdout.Result stderr.Result
    Expect.equal p.ExitCode 0 report
    stdout.Result

/// The golden LLaMA and 12 of its rows (lengths 8 to 38): a multiple of the global micro-batch of 4, so
/// DistributedSampler repeats no row and one process with batch 4 sees the same rows per micro-step.
type internal Setup(case: string) =
    let root = new TempFolder()
    do
        copyFolder (Path.Combine(goldenDir case, "model")) (root.File "model")
        let rows = File.ReadAllLines(Path.Combine(goldenDir case, "data.jsonl")) |> Array.take 12
        File.WriteAllLines(root.File "data.jsonl", rows)
    new() = new Setup("llama-cosine")
    member _.File name = root.File name
    /// The arguments of a run into output with a per-process batch (the global batch is 4 with
    /// accumulation 2: 8 rows per optimizer step; 12 rows make an epoch of 1.5 steps).
    member _.Args (output: string) (batch: int) =
        [ "train"; "--model"; root.File "model"; "--data"; root.File "data.jsonl"; "--output"; root.File output
          "--per-device-train-batch-size"; string batch; "--gradient-accumulation-steps"; "2"; "--max-steps"; "5"
          "--max-seq-len"; "40"; "--learning-rate"; "3e-3"; "--lr-scheduler-type"; "cosine"; "--num-warmup-steps"; "1"
          "--weight-decay"; "0.1"; "--max-grad-norm"; "0.5"; "--save-steps"; "2"; "--report-to"; "none" ]
    interface IDisposable with
        member _.Dispose() = (root :> IDisposable).Dispose()

/// args with option's value replaced.
let internal replace (option: string) (value: string) (args: string list) =
    let i = List.findIndex ((=) option) args
    List.updateAt (i + 1) value args

/// The step records (step, loss, lr, grad_norm) of a run's metrics.jsonl.
let internal steps (output: string) =
    readJsonLines (Path.Combine(output, "metrics.jsonl"))
    |> Array.filter (fun (e: JsonElement) -> e.TryGetProperty("loss") |> fst && e.TryGetProperty("grad_norm") |> fst)
    |> Array.toList
    |> List.map (fun (e: JsonElement) ->
        e.GetProperty("step").GetInt32(), e.GetProperty("loss").GetDouble(), e.GetProperty("lr").GetDouble(), e.GetProperty("grad_norm").GetDouble())

let internal relative (a: float) (b: float) = abs (a - b) / max (abs b) 1e-12

/// Expects the same steps with loss and grad norm within tolerance (relative), lr within 1e-9.
let internal expectSameStepsWithin (tolerance: float) (actual: string) (expected: string) (what: string) =
    let a, e = steps actual, steps expected
    Expect.equal (a |> List.map (fun (s, _, _, _) -> s)) (e |> List.map (fun (s, _, _, _) -> s)) (what + ": the same steps")
    Expect.isNonEmpty e (what + ": steps were logged")
    for (step, loss, lr, norm), (_, loss', lr', norm') in List.zip a e do
        Expect.isLessThanOrEqual (relative loss loss') tolerance (sprintf "%s: step %d loss %.9g vs %.9g" what step loss loss')
        Expect.isLessThanOrEqual (relative lr lr') 1e-9 (sprintf "%s: step %d lr %.9g vs %.9g" what step lr lr')
        Expect.isLessThanOrEqual (relative norm norm') tolerance (sprintf "%s: step %d grad norm %.9g vs %.9g" what step norm norm')

/// Expects the same steps with loss and grad norm within 1e-5 (relative), lr within 1e-9.
let internal expectSameSteps = expectSameStepsWithin 1e-5

/// Expects every tensor of every safetensors file of expected's folder in actual's, with
/// ||a - b|| / ||b|| <= tolerance.
let internal expectSameWeightsWithin (tolerance: float) (actual: string) (expected: string) (what: string) =
    let files = Directory.GetFiles(expected, "*.safetensors") |> Array.map Path.GetFileName
    Expect.isNonEmpty files (what + ": weights were written")
    for file in files do
        let a = Functional.Checkpoint.Safetensors.load (Path.Combine(actual, file))
        let e = Functional.Checkpoint.Safetensors.load (Path.Combine(expected, file))
        Expect.equal (Set a.Keys) (Set e.Keys) (sprintf "%s: %s has the same tensors" what file)
        for KeyValue(name, b: TorchSharp.torch.Tensor) in e do
            use b64 = b.to_type TorchSharp.torch.float64
            use a64 = (a[name]: TorchSharp.torch.Tensor).to_type TorchSharp.torch.float64
            use diff = a64 - b64
            let error = diff.norm().item<float> () / max (b64.norm().item<float> ()) 1e-30
            // A key bias (GPT-2's c_attn.bias holds one, OPT's and Qwen's k_proj.bias, BLOOM's query_key_value.bias)
            // shifts all of a query's scores nearly alike: its true gradient is (nearly) zero, so it carries
            // rounding noise that Adam magnifies (the golden comparisons with PyTorch relax it alike).
            let keyBias = name.EndsWith "c_attn.bias" || name.EndsWith "k_proj.bias" || name.EndsWith "query_key_value.bias"
            // Without rotary positions (OPT) the true gradient is exactly zero: the values are noise around 0 and
            // are held to an absolute bound.
            use absolute = diff.abs().max()
            let within = error <= tolerance || (keyBias && (error <= 1e-3 || absolute.item<float> () <= 1e-4))
            Expect.isTrue within (sprintf "%s: %s %s relative error %g (largest difference %g)" what file name error (absolute.item<float> ()))

let internal expectSameWeights = expectSameWeightsWithin 1e-5

/// The step lines (step, loss, num_tokens) of a run's metrics.jsonl, or of process rank's
/// metrics-rank-R.jsonl (--log-each-rank).
let internal lossesAndTokens (output: string) (rank: int option) =
    let file = match rank with Some r -> sprintf "metrics-rank-%d.jsonl" r | None -> "metrics.jsonl"
    readJsonLines (Path.Combine(output, file))
    |> Array.filter (fun (e: JsonElement) -> e.TryGetProperty("loss") |> fst)
    |> Array.toList
    |> List.map (fun (e: JsonElement) ->
        e.GetProperty("step").GetInt32(), e.GetProperty("loss").GetDouble(), e.GetProperty("num_tokens").GetInt64())

[<Tests>]
let tests =
    testSequenced <| testList "distributed training" [
        test "--tensor-parallel-degree 2 on 2 processes, 2 x 2 (data x tensor) on 4, and 4 (the 2 key/value heads replicated) on 4 equal one process: every step's loss and grad norm, final weights" {
            mpirun () |> ignore
            use s = new Setup()
            let args output batch = replace "--save-steps" "1" (s.Args output batch) @ [ "--save-strategy"; "no" ]
            train 1 (args "single" 4) |> ignore
            for processes, batch, degree in [ 2, 4, 2; 4, 2, 2; 4, 4, 4 ] do
                let output = sprintf "tp%d-on-%d" degree processes
                let out = train processes (args output batch @ [ "--tensor-parallel-degree"; string degree ])
                let what = sprintf "TP %d on %d processes" degree processes
                expectSameSteps (s.File output) (s.File "single") what
                expectSameWeights (Path.Combine(s.File output, "final")) (Path.Combine(s.File "single", "final")) what
                Expect.equal (out.Split('\n') |> Array.filter (fun l -> l.StartsWith "metrics: ") |> Array.length) 1 (what + ": one final report\n" + out)
        }
        test "--pipeline-parallel-degree 2 on 2 processes, and TP 2 x PP 2 on 4, equal one process (every step, evaluations, checkpoint-2 with its optimizer state, final weights); PP 2's checkpoint resumes on 1 process" {
            mpirun () |> ignore
            use s = new Setup()
            // Evaluations during training join the stages and evaluate the whole model.
            let evaluating = [ "--eval-data"; s.File "data.jsonl"; "--eval-strategy"; "steps"; "--eval-steps"; "2" ]
            train 1 (s.Args "single" 4 @ evaluating) |> ignore
            let out = train 2 (s.Args "pp" 4 @ evaluating @ [ "--pipeline-parallel-degree"; "2" ])
            expectSameSteps (s.File "pp") (s.File "single") "PP 2"
            let evalLosses output =
                readJsonLines (Path.Combine(output, "metrics.jsonl"))
                |> Array.choose (fun (e: JsonElement) ->
                    match e.TryGetProperty "eval_loss" with
                    | true, v -> Some(e.GetProperty("step").GetInt32(), v.GetDouble())
                    | _ -> None)
                |> Array.toList
            let single, pipelined = evalLosses (s.File "single"), evalLosses (s.File "pp")
            Expect.equal (List.map fst pipelined) (List.map fst single) "PP 2 evaluates when one process does"
            Expect.containsAll (List.map fst pipelined) [ 0; 2; 4 ] "at steps 0, 2 and 4"
            for (step, a), (_, b) in List.zip pipelined single do
                Expect.isLessThanOrEqual (relative a b) 1e-5 (sprintf "PP 2's eval loss at step %d: %.9g vs %.9g" step a b)
            expectSameWeights (Path.Combine(s.File "pp", "final")) (Path.Combine(s.File "single", "final")) "PP 2"
            expectSameWeights (Path.Combine(s.File "pp", "checkpoint-2")) (Path.Combine(s.File "single", "checkpoint-2")) "PP 2's checkpoint-2 (model and optimizer state)"
            Expect.equal (out.Split('\n') |> Array.filter (fun l -> l.StartsWith "metrics: ") |> Array.length) 1 ("PP 2: one final report\n" + out)
            let output = s.File "pp-resumed"
            copyFolder (s.File "pp") output
            for name in [ "checkpoint-4"; "final" ] do Directory.Delete(Path.Combine(output, name), true)
            train 1 (s.Args "pp-resumed" 4 @ evaluating @ [ "--overwrite-output-dir"; "--resume-from-checkpoint"; Path.Combine(output, "checkpoint-2") ]) |> ignore
            expectSameWeights (Path.Combine(output, "final")) (Path.Combine(s.File "single", "final")) "PP 2's checkpoint on 1 process"
            // Tensor and pipeline parallel together: 2 stages of 2 tensor ranks on 4 processes.
            train 4 (s.Args "tp2-pp2" 4 @ evaluating @ [ "--tp"; "2"; "--pp"; "2" ]) |> ignore
            expectSameSteps (s.File "tp2-pp2") (s.File "single") "TP 2 x PP 2"
            expectSameWeights (Path.Combine(s.File "tp2-pp2", "final")) (Path.Combine(s.File "single", "final")) "TP 2 x PP 2"
            expectSameWeights (Path.Combine(s.File "tp2-pp2", "checkpoint-2")) (Path.Combine(s.File "single", "checkpoint-2")) "TP 2 x PP 2's checkpoint-2 (model and optimizer state)"
        }
        test "--pipeline-parallel-degree 2 with GPT-2 (learned positions), OPT (project_in/out) and BLOOM (ALiBi, an embedding norm), all tied, equals one process" {
            mpirun () |> ignore
            for case in [ "gpt2-cosine"; "opt-cosine"; "bloom-cosine" ] do
                use s = new Setup(case)
                let args output = s.Args output 4 @ [ "--save-strategy"; "no" ]
                train 1 (args "single") |> ignore
                train 2 (args "pp" @ [ "--pp"; "2" ]) |> ignore
                expectSameSteps (s.File "pp") (s.File "single") (case + " on PP 2")
                expectSameWeights (Path.Combine(s.File "pp", "final")) (Path.Combine(s.File "single", "final")) (case + " on PP 2")
        }
        test "a TP 2 run's checkpoints are one process's: it resumes on 1 process and on PP 2, and 1 process's checkpoint resumes on TP 2, to the same final weights" {
            mpirun () |> ignore
            use s = new Setup()
            train 1 (s.Args "single" 4) |> ignore
            train 2 (s.Args "tp" 4 @ [ "--tp"; "2" ]) |> ignore
            expectSameSteps (s.File "tp") (s.File "single") "TP 2 with checkpoints"
            expectSameWeights (Path.Combine(s.File "tp", "final")) (Path.Combine(s.File "single", "final")) "TP 2 with checkpoints"
            for rank in 0 .. 1 do
                Expect.isFalse (File.Exists(Path.Combine(s.File "tp", "checkpoint-2", sprintf "optimizer-rank-%05d-of-00002.safetensors" rank))) "no per-rank files"
            expectSameWeights (Path.Combine(s.File "tp", "checkpoint-2")) (Path.Combine(s.File "single", "checkpoint-2")) "TP 2's checkpoint-2 (model and optimizer state)"
            for source, target, processes, extra, what in
                [ "tp", "tp-on-1", 1, [], "TP 2's checkpoint on 1 process"
                  "tp", "tp-on-pp2", 2, [ "--pp"; "2" ], "TP 2's checkpoint on PP 2"
                  "single", "single-on-tp2", 2, [ "--tp"; "2" ], "1 process's checkpoint on TP 2" ] do
                let output = s.File target
                copyFolder (s.File source) output
                for name in [ "checkpoint-4"; "final" ] do Directory.Delete(Path.Combine(output, name), true)
                train processes (s.Args target 4 @ extra @ [ "--overwrite-output-dir"; "--resume-from-checkpoint"; Path.Combine(output, "checkpoint-2") ]) |> ignore
                expectSameWeights (Path.Combine(output, "final")) (Path.Combine(s.File "single", "final")) what
        }
        test "LoRA on every projection under TP 2 on 2 processes and TP 4 on 4 equals one process (steps, adapter and optimizer state of checkpoint-2, final adapter); TP 2's checkpoint resumes on 1 process" {
            mpirun () |> ignore
            use s = new Setup()
            let lora = [ "--lora-dim"; "4"; "--lora-target-modules"; "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"; "--only-optimize-lora" ]
            // A larger rate than the full fine-tuning runs': the adapters start from B = 0.
            let args output = replace "--learning-rate" "3e-2" (s.Args output 4) @ lora
            train 1 (args "single") |> ignore
            for processes in [ 2; 4 ] do
                let output = sprintf "lora-tp%d" processes
                train processes (args output @ [ "--tp"; string processes ]) |> ignore
                let what = sprintf "LoRA on TP %d" processes
                expectSameSteps (s.File output) (s.File "single") what
                expectSameWeights (Path.Combine(s.File output, "final")) (Path.Combine(s.File "single", "final")) what
                expectSameWeights (Path.Combine(s.File output, "checkpoint-2")) (Path.Combine(s.File "single", "checkpoint-2")) (what + ": checkpoint-2")
            let output = s.File "lora-tp2-resumed"
            copyFolder (s.File "lora-tp2") output
            for name in [ "checkpoint-4"; "final" ] do Directory.Delete(Path.Combine(output, name), true)
            train 1 (args "lora-tp2-resumed" @ [ "--overwrite-output-dir"; "--resume-from-checkpoint"; Path.Combine(output, "checkpoint-2") ]) |> ignore
            expectSameWeights (Path.Combine(output, "final")) (Path.Combine(s.File "single", "final")) "LoRA TP 2's checkpoint on 1 process"
        }
        test "--tensor-parallel-degree and --pipeline-parallel-degree refuse what they do not support yet, before writing anything" {
            use s = new Setup()
            let refused (extra: string list) (parts: string list) =
                let run = runCli (s.Args "refused" 4 @ extra)
                Expect.equal run.ExitCode 2 (sprintf "exit 2 for %A (stderr: %s)" extra run.Stderr)
                for part in parts do Expect.stringContains run.Stderr part (sprintf "the message for %A" extra)
                Expect.isFalse (Directory.Exists(s.File "refused")) "no output folder"
            refused [ "--tensor-parallel-degree"; "2"; "--gradient-checkpointing" ] [ "--tensor-parallel-degree"; "--gradient-checkpointing" ]
            refused [ "--tp"; "2"; "--save-strategy"; "no"; "--bf16" ] [ "--tensor-parallel-degree"; "--bf16" ]
            refused [ "--tp"; "2"; "--save-strategy"; "no" ] [ "--tensor-parallel-degree"; "must divide the 1 processes" ]
            refused [ "--pp"; "2"; "--save-strategy"; "no" ] [ "--pipeline-parallel-degree"; "must divide the 1 processes" ]
            refused [ "--pp"; "2"; "--save-strategy"; "no"; "--bf16" ] [ "--pipeline-parallel-degree"; "--bf16" ]
            refused [ "--pp"; "2"; "--tp"; "2"; "--save-strategy"; "no" ] [ "--pipeline-parallel-degree"; "--tensor-parallel-degree"; "(2 x 2 = 4) must divide the 1 processes" ]
            refused [ "--pp"; "0" ] [ "--pipeline-parallel-degree"; "at least 1" ]
            refused [ "--tp"; "2"; "--save-strategy"; "no"; "--lora-dim"; "4"; "--lora-dropout"; "0.1" ] [ "--tensor-parallel-degree"; "--lora-dropout" ]
        }
        test "ZeRO stages 0, 1, 2 and 3 on 2 processes equal one process with the same global batch" {
            mpirun () |> ignore
            use s = new Setup()
            train 1 (s.Args "single" 4) |> ignore
            for stage in [ 0; 1; 2; 3 ] do
                let output = sprintf "stage%d" stage
                let out = train 2 (s.Args output 2 @ [ "--zero-stage"; string stage ])
                let what = sprintf "stage %d" stage
                expectSameSteps (s.File output) (s.File "single") what
                expectSameWeights (Path.Combine(s.File output, "final")) (Path.Combine(s.File "single", "final")) what
                // Process 0 reports; the other process prints nothing of the run.
                Expect.equal (out.Split('\n') |> Array.filter (fun l -> l.StartsWith "metrics: ") |> Array.length) 1 (what + ": one final report\n" + out)
                if stage > 0 then
                    let checkpoint = Path.Combine(s.File output, "checkpoint-2")
                    for rank in 0 .. 1 do
                        Expect.isTrue (File.Exists(Path.Combine(checkpoint, sprintf "optimizer-rank-%05d-of-00002.safetensors" rank))) (sprintf "%s: rank %d's optimizer block" what rank)
                    Expect.isFalse (File.Exists(Path.Combine(checkpoint, "optimizer.safetensors"))) (what + ": no whole optimizer file")
        }
        test "--log-each-rank: each of 2 processes logs its own loss and tokens, which add up to the global loss; one process's equals it" {
            mpirun () |> ignore
            use s = new Setup()
            train 2 (s.Args "two" 2 @ [ "--log-each-rank"; "--zero-stage"; "2" ]) |> ignore
            train 2 (s.Args "plain" 2) |> ignore
            train 1 (s.Args "single" 4 @ [ "--log_each_rank" ]) |> ignore
            let ranks = [ for r in 0 .. 1 -> lossesAndTokens (s.File "two") (Some r) ]
            let global' = lossesAndTokens (s.File "two") None
            Expect.equal (global' |> List.map (fun (step, _, _) -> step)) [ 1 .. 5 ] "every step is logged"
            for r in 0 .. 1 do
                Expect.equal (ranks[r] |> List.map (fun (step, _, _) -> step)) [ 1 .. 5 ] (sprintf "rank %d logs every step" r)
                let line = File.ReadLines(Path.Combine(s.File "two", sprintf "metrics-rank-%d.jsonl" r)) |> Seq.head
                Expect.stringContains line (sprintf "\"rank\":%d" r) "each line names its rank"
            for i, (step, loss, tokens) in List.indexed global' do
                let parts = [ for r in 0 .. 1 -> ranks[r][i] ]
                Expect.equal (parts |> List.sumBy (fun (_, _, t) -> t)) tokens (sprintf "step %d: the ranks' tokens add up to the window's" step)
                Expect.isTrue (parts |> List.forall (fun (_, _, t) -> t > 0L)) (sprintf "step %d: both ranks predicted tokens" step)
                // sum over ranks of rank_loss * rank_tokens / total tokens = the global loss.
                let weighted = (parts |> List.sumBy (fun (_, l, t) -> l * float t)) / float tokens
                Expect.isLessThanOrEqual (relative weighted loss) 1e-9 (sprintf "step %d: token-weighted rank losses %.12g vs loss %.12g" step weighted loss)
                let l0, l1 = (let _, a, _ = parts[0] in a), (let _, b, _ = parts[1] in b)
                Expect.notEqual l0 l1 (sprintf "step %d: the ranks' own losses differ (different rows)" step)
            // The flag changes no figure of the run.
            expectSameSteps (s.File "two") (s.File "plain") "with and without --log-each-rank"
            Expect.isEmpty (Directory.GetFiles(s.File "plain", "metrics-rank-*")) "without the flag no rank file is written"
            Expect.equal (Directory.GetFiles(s.File "single", "metrics-rank-*") |> Array.map Path.GetFileName) [| "metrics-rank-0.jsonl" |] "one process writes rank 0's file"
            Expect.equal (lossesAndTokens (s.File "single") (Some 0)) (lossesAndTokens (s.File "single") None) "one process: rank 0's loss and tokens are the run's"
            // A resume keeps the lines up to its checkpoint and logs the later steps again, the same.
            let before = File.ReadAllLines(Path.Combine(s.File "two", "metrics-rank-1.jsonl"))
            train 2 (s.Args "two" 2 @ [ "--log-each-rank"; "--zero-stage"; "2"; "--resume-from-checkpoint"; Path.Combine(s.File "two", "checkpoint-2") ]) |> ignore
            Expect.sequenceEqual (File.ReadAllLines(Path.Combine(s.File "two", "metrics-rank-1.jsonl"))) before "the resumed run's rank file"
        }
        test "LoRA at stages 1 and 3 on 2 processes equals one process" {
            mpirun () |> ignore
            use s = new Setup()
            let lora = [ "--lora-dim"; "4"; "--only-optimize-lora" ]
            train 1 (s.Args "single" 4 @ lora) |> ignore
            for stage in [ 1; 3 ] do
                let output = sprintf "stage%d" stage
                train 2 (s.Args output 2 @ lora @ [ "--zero-stage"; string stage ]) |> ignore
                let what = sprintf "LoRA at stage %d" stage
                expectSameSteps (s.File output) (s.File "single") what
                expectSameWeights (Path.Combine(s.File output, "final")) (Path.Combine(s.File "single", "final")) what
        }
        test "buckets smaller than a layer (flags, or a DeepSpeed config) give the same run at stages 0, 2 and 3" {
            mpirun () |> ignore
            use s = new Setup()
            train 1 (s.Args "single" 4) |> ignore
            File.WriteAllText(s.File "ds.json", """{ "zero_optimization": { "stage": 2, "reduce_bucket_size": 999, "allgather_bucket_size": 1.234e3 } }""")
            for output, extra in
                [ "stage0", [ "--zero-stage"; "0"; "--reduce-bucket-size"; "1000" ]
                  "stage2", [ "--deepspeed"; s.File "ds.json" ]
                  "stage3", [ "--zero_stage"; "3"; "--reduce_bucket_size"; "777"; "--allgather_bucket_size"; "555" ] ] do
                train 2 (s.Args output 2 @ extra) |> ignore
                expectSameSteps (s.File output) (s.File "single") (output + " in small buckets")
                expectSameWeights (Path.Combine(s.File output, "final")) (Path.Combine(s.File "single", "final")) (output + " in small buckets")
        }
        test "every family at stage 3 with gradient checkpointing on 2 processes equals one process" {
            mpirun () |> ignore
            for case in [ "gpt2-cosine"; "opt-cosine"; "bloom-cosine"; "qwen2-linear"; "qwen3-cosine"; "mistral-cosine" ] do
                use s = new Setup(case)
                train 1 (s.Args "single" 4 @ [ "--gradient-checkpointing" ]) |> ignore
                train 2 (s.Args "two" 2 @ [ "--gradient-checkpointing"; "--zero-stage"; "3" ]) |> ignore
                expectSameSteps (s.File "two") (s.File "single") case
                expectSameWeights (Path.Combine(s.File "two", "final")) (Path.Combine(s.File "single", "final")) case
        }
        test "bf16 and fp16 (full and LoRA) at stage 3 on 2 processes equal stage 2" {
            mpirun () |> ignore
            use s = new Setup()
            // The processes round the same gradients the same way under stages 2 and 3 (stage 3 gathers each
            // unit's fp32 blocks and rounds them once, as stage 2 rounds its whole copy): only the order of
            // fp32 sums differs.
            for what, extra in [ "bf16", [ "--bf16" ]; "fp16 LoRA", [ "--fp16"; "--lora-dim"; "4"; "--only-optimize-lora" ] ] do
                let output stage = sprintf "%s-stage%d" (what.Replace(' ', '-')) stage
                for stage in [ 2; 3 ] do
                    train 2 (s.Args (output stage) 2 @ extra @ [ "--zero-stage"; string stage ]) |> ignore
                expectSameSteps (s.File(output 3)) (s.File(output 2)) (what + " at stage 3")
                expectSameWeights (Path.Combine(s.File(output 3), "final")) (Path.Combine(s.File(output 2), "final")) (what + " at stage 3")
        }
        test "bf16 at stage 2 on 2 processes equals one process whose micro-batches hold the same rows" {
            mpirun () |> ignore
            use s = new Setup()
            // bf16 rounds each micro-batch's gradient (8 significant bits), so the one-process reference must
            // group the rows as the processes do: unshuffled, process r reads rows r, r + 2, ... in
            // micro-batches of 2, so a file in the order 0 2 1 3 4 6 5 7 ... read in micro-batches of 2 with
            // accumulation 4 gives one process the processes' micro-batches, one after the other (the same
            // global batch of 8 rows per step). Only the order of the fp32 sums then differs.
            let rows = File.ReadAllLines(s.File "data.jsonl")
            File.WriteAllLines(s.File "interleaved.jsonl", [ for i in [ 0; 2; 1; 3; 4; 6; 5; 7; 8; 10; 9; 11 ] -> rows[i] ])
            let bf16 = [ "--bf16"; "--no-shuffle" ]
            train 1 (s.Args "single" 2 @ bf16 |> replace "--gradient-accumulation-steps" "4" |> replace "--data" (s.File "interleaved.jsonl")) |> ignore
            train 2 (s.Args "two" 2 @ bf16 @ [ "--zero-stage"; "2" ]) |> ignore
            expectSameSteps (s.File "two") (s.File "single") "bf16 at stage 2"
            expectSameWeights (Path.Combine(s.File "two", "final")) (Path.Combine(s.File "single", "final")) "bf16 at stage 2"
        }
        test "across two hosts (network namespaces): stages 0, 1, 2 and 3 equal one process" {
            use s = new Setup()
            train 1 (s.Args "single" 4) |> ignore
            TwoHosts.withHosts (fun () ->
                for stage in [ 0; 1; 2; 3 ] do
                    let output = sprintf "hosts-stage%d" stage
                    let command = [ "--"; "dotnet"; Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll") ] @ s.Args output 2 @ [ "--zero-stage"; string stage ]
                    let run = TwoHosts.runWithin (TimeSpan.FromMinutes 2.0) ([ "-np"; "2"; "-x"; "OMP_NUM_THREADS=1"; "-x"; "TERM=dumb" ] @ command)
                    Functional.Tests.ScriptTests.expectSuccess run
                    let what = sprintf "two hosts, stage %d" stage
                    expectSameSteps (s.File output) (s.File "single") what
                    expectSameWeights (Path.Combine(s.File output, "final")) (Path.Combine(s.File "single", "final")) what)
        }
    ]
