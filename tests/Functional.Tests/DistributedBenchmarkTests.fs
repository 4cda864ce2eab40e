/// `functional bench distributed`: the per-rank memory it counts (the list "distributed benchmark table") and
/// the command's table under mpirun (end to end, the list "distributed benchmark"). Figures, never timings, are
/// checked.
module Functional.Tests.DistributedBenchmarkTests

open System.IO
open System.Text.Json
open Expecto
open Functional.Benchmarks
open Functional.Distributed
open Functional.Tests.TestUtil

/// A tiny GPT-2: 1 layer, width 64 (one head), 4 rows of 16 tokens per step, vocabulary 8192.
let private tiny = TrainingBenchmark.resize 1 64 4 16 TrainingBenchmark.gpt2Small

let private settings = { Steps = 1; WarmupSteps = 1; Threads = 1; LearningRate = 1e-3 }

[<Tests>]
let unitTests =
    testList "distributed benchmark table" [
        torchTest "one process at stage 0 holds 4 bytes per parameter of values and of gradients, and AdamW's two moments" (fun () ->
            let run = DistributedBenchmark.measure Communicator.singleProcess tiny settings [ 0 ] ignore
            let stage = List.exactlyOne run.Stages
            Expect.isNone stage.Unavailable "stage 0 runs"
            Expect.equal stage.Memory.Parameters (4L * run.Parameters) "fp32 values"
            Expect.equal stage.Memory.Gradients (4L * run.Parameters) "fp32 gradients"
            // Two fp32 moments per parameter, plus the step counters (0-dimensional int64 tensors).
            let counters = stage.Memory.OptimizerState - 8L * run.Parameters
            Expect.isTrue (counters >= 0L && counters <= 64L) (sprintf "the moments and a few counters: %d bytes beyond 8 per parameter" counters)
            Expect.hasLength stage.Losses 2 "a loss per step, the warm-up step included")
        test "the table shows a refused stage as not available and compares stages and runs" {
            let figures stage optimizer tokens =
                { Stage = stage
                  Unavailable = None
                  Memory = { Parameters = 4000L; Gradients = 4000L; OptimizerState = optimizer }
                  TokensPerSecond = tokens
                  StepSeconds = 0.5
                  CommunicationSeconds = 0.1
                  Losses = [ 9.0; 8.5 ] }
            let refused = { figures 3 0L 0.0 with Unavailable = Some "3 is not available yet" }
            let ranks = { Processes = 2; ThreadsPerProcess = 1; Parameters = 1000L; Stages = [ figures 0 8000L 300.0; figures 1 4000L 290.0; refused ] }
            let single = { Processes = 1; ThreadsPerProcess = 2; Parameters = 1000L; Stages = [ figures 0 8000L 200.0 ] }
            let table = DistributedBenchmark.format tiny settings [ ranks; DistributedBenchmark.ofJson (DistributedBenchmark.toJson single) ]
            for text in
                [ "1,000 parameters"; "params"; "grads"; "optim"; "tokens/s"; "comm %"; "20.0%"
                  sprintf "%-22s %5d   not available: 3 is not available yet" "2 ranks x 1 thread" 3
                  sprintf "%-22s %5d " "1 process x 2 threads" 0
                  "stage 1 per rank / stage 0 (2 ranks x 1 thread): parameters 1.00, gradients 1.00, optimizer state 0.50 (1 / world = 0.50)"
                  "tokens/s at stage 0, 2 ranks x 1 thread / 1 process x 2 threads: 1.50x" ] do
                Expect.stringContains table text (sprintf "the table shows %s\n%s" text table)
        }
        test "a run's figures survive the JSON hand-over from the ranks" {
            let run =
                { Processes = 2
                  ThreadsPerProcess = 1
                  Parameters = 12345L
                  Stages =
                    [ { Stage = 2
                        Unavailable = None
                        Memory = { Parameters = 1L; Gradients = 2L; OptimizerState = 3L }
                        TokensPerSecond = 1.5
                        StepSeconds = 0.25
                        CommunicationSeconds = 0.125
                        Losses = [ 9.5; 9.25 ] }
                      { Stage = 3
                        Unavailable = Some "not yet"
                        Memory = { Parameters = 0L; Gradients = 0L; OptimizerState = 0L }
                        TokensPerSecond = 0.0
                        StepSeconds = 0.0
                        CommunicationSeconds = 0.0
                        Losses = [] } ] }
            let back = DistributedBenchmark.ofJson (DistributedBenchmark.toJson run)
            Expect.equal back run "the same run"
        }
    ]

[<Tests>]
let tests =
    testList "distributed benchmark" [
        test "bench distributed prints per-rank memory, tokens/s and the communication share of 2 ranks and 1 process; stage 1 halves the optimizer state" {
            LaunchTests.requireMpirun ()
            use folder = new TempFolder()
            let json = folder.File "figures.json"
            let run =
                runCli
                    [ "bench"; "distributed"; "--layers"; "1"; "--width"; "64"; "--batch"; "4"; "--seq-len"; "16"; "--steps"; "1"; "--warmup"; "1"
                      "--json"; json ]
            let report = sprintf "exit %d\nstdout:\n%s\nstderr:\n%s" run.ExitCode run.Stdout run.Stderr
            Expect.equal run.ExitCode 0 report
            let lines = run.Stdout.Split('\n')
            Expect.isTrue (lines |> Array.exists (fun l -> l.StartsWith "run " && l.Contains "stage" && l.Contains "optim" && l.Contains "comm %")) ("the header\n" + report)
            for stage in 0..3 do
                let row = lines |> Array.filter (fun l -> l.StartsWith(sprintf "%-22s %5d " "2 ranks x 1 thread" stage))
                Expect.hasLength row 1 (sprintf "one row for stage %d\n%s" stage report)
            Expect.hasLength (lines |> Array.filter (fun l -> l.StartsWith(sprintf "%-22s %5d " "1 process x 2 threads" 0))) 1 ("the single-process row\n" + report)
            Expect.stringContains run.Stdout "stage 1 per rank / stage 0 (2 ranks x 1 thread)" "stage 1 against stage 0"
            Expect.stringContains run.Stdout "tokens/s at stage 0, 2 ranks x 1 thread / 1 process x 2 threads" "the two launches compared"
            let figures = JsonDocument.Parse(File.ReadAllText json).RootElement
            let runs = figures.GetProperty("runs").EnumerateArray() |> Array.ofSeq
            Expect.hasLength runs 2 "2 ranks, then 1 process"
            let stages = runs[0].GetProperty("stages").EnumerateArray() |> Array.ofSeq
            Expect.equal (stages |> Array.map (fun s -> s.GetProperty("stage").GetInt32())) [| 0; 1; 2; 3 |] "every stage"
            let bytes (s: JsonElement) (field: string) = float (s.GetProperty(field).GetInt64())
            let ratio = bytes stages[1] "optimizer_state_bytes" / bytes stages[0] "optimizer_state_bytes"
            Expect.isTrue (abs (ratio - 0.5) < 0.01) (sprintf "stage 1's optimizer state per rank is half of stage 0's: %g" ratio)
            Expect.equal (bytes stages[1] "parameter_bytes") (bytes stages[0] "parameter_bytes") "stage 1 keeps every parameter"
            if stages[3].GetProperty("unavailable").ValueKind = JsonValueKind.Null then
                let parameters = bytes stages[3] "parameter_bytes" / bytes stages[0] "parameter_bytes"
                Expect.isTrue (abs (parameters - 0.5) < 0.05) (sprintf "stage 3's parameters per rank are about half of stage 0's: %g" parameters)
            else
                Expect.stringContains run.Stdout "not available" "a refused stage says so"
            // The same rows and updates at every stage: the same losses.
            let losses (s: JsonElement) = s.GetProperty("losses").EnumerateArray() |> Seq.map (fun l -> l.GetDouble()) |> Array.ofSeq
            for s in stages |> Array.filter (fun s -> s.GetProperty("unavailable").ValueKind = JsonValueKind.Null) do
                let stage = s.GetProperty("stage").GetInt32()
                for a, b in Array.zip (losses s) (losses stages[0]) do
                    Expect.floatClose { absolute = 1e-5; relative = 1e-5 } a b (sprintf "stage %d's losses equal stage 0's" stage)
                let share = s.GetProperty("communication_share").GetDouble()
                Expect.isTrue (share >= 0.0 && share <= 1.0) (sprintf "stage %d's communication share is a share: %g" stage share)
        }
        test "bench parallel prints each rank's memory for DP 2, TP 2 and PP 2: TP 2 and PP 2 hold half the parameters, gradients and optimizer state, TP 2 half the logits; every layout trains alike" {
            LaunchTests.requireMpirun ()
            let run =
                runCli [ "bench"; "parallel"; "--layers"; "2"; "--width"; "256"; "--vocab"; "1024"; "--batch"; "4"; "--micro-batch"; "1"; "--seq-len"; "16"; "--steps"; "1"; "--warmup"; "0" ]
            let report = sprintf "exit %d\nstdout:\n%s\nstderr:\n%s" run.ExitCode run.Stdout run.Stderr
            Expect.equal run.ExitCode 0 report
            let lines = run.Stdout.Split('\n')
            let rows layout =
                lines
                |> Array.filter (fun l -> l.StartsWith(layout + " "))
                |> Array.map (fun l -> l.Split(' ', System.StringSplitOptions.RemoveEmptyEntries))
                |> Array.filter (fun cells -> cells.Length > 2 && fst (System.Int32.TryParse cells.[2]))
            for layout in [ "DP"; "TP"; "PP" ] do
                Expect.hasLength (rows layout) 2 (sprintf "%s 2: a row per rank\n%s" layout report)
            // Columns: layout, degree, rank, params, grads, optim, state, step, logits, tokens/s, final loss.
            let column layout (rank: int) (index: int) =
                let cells = (rows layout).[rank]
                float cells.[index]
            for layout in [ "TP"; "PP" ] do
                for rank in 0 .. 1 do
                    for index, what in [ 3, "parameters"; 4, "gradients"; 5, "optimizer state" ] do
                        let ratio = column layout rank index / column "DP" rank index
                        Expect.isTrue (ratio > 0.4 && ratio < 0.6) (sprintf "%s 2 rank %d holds about half DP 2's %s: %g\n%s" layout rank what ratio report)
            Expect.equal (column "PP" 0 8) 0.0 ("the first stage computes no logits\n" + report)
            Expect.equal (column "TP" 0 10) (column "DP" 0 10) ("TP 2 trains as DP 2 (the final loss)\n" + report)
            Expect.equal (column "PP" 0 10) (column "DP" 0 10) ("PP 2 trains as DP 2 (the final loss)\n" + report)
            Expect.stringContains run.Stdout "TP 2 / DP 2, largest rank: parameters 0.50, gradients 0.50, optimizer state 0.50, logits 0.50;" report
        }
        test "bench distributed refuses rows per step the processes do not share evenly, before starting them (exit 2)" {
            let run = runCli [ "bench"; "distributed"; "--layers"; "1"; "--width"; "64"; "--batch"; "3" ]
            Expect.equal run.ExitCode 2 (sprintf "exit code (stderr: %s)" run.Stderr)
            Expect.stringContains run.Stderr "--batch: the rows per step (over all processes) must be a multiple of the 2 processes, found 3" "names the option"
        }
    ]
