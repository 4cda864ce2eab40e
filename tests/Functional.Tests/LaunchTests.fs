/// `functional launch -n N -- COMMAND...` (end to end, the list "launch"): the command runs on N processes
/// through mpirun, its exit code comes back, and what cannot be launched is refused with exit code 2.
module Functional.Tests.LaunchTests

open System
open System.IO
open Expecto
open Functional.Tests.TestUtil

/// Skips the calling test, saying how to get it, where mpirun is not on PATH.
let requireMpirun () =
    let found =
        (Environment.GetEnvironmentVariable "PATH").Split(':', StringSplitOptions.RemoveEmptyEntries)
        |> Array.exists (fun d -> File.Exists(Path.Combine(d, "mpirun")))
    if not found then
        skiptest "needs mpirun (Open MPI): sh tools/install-mpi.sh, or apt-get install openmpi-bin libopenmpi-dev; CI installs it"

/// One intra-op thread per rank, as the processes share the machine's cores.
let private oneThread = [ "OMP_NUM_THREADS", Some "1" ]

/// The arguments of a short training run of the golden LLaMA into output.
let private trainArgs (folder: TempFolder) (output: string) =
    let model = folder.File "model"
    if not (Directory.Exists model) then copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) model
    [ "train"; "--model"; model; "--data"; Path.Combine(goldenDir "llama-cosine", "data.jsonl"); "--output"; folder.File output
      "--per-device-train-batch-size"; "2"; "--max-steps"; "2"; "--max-seq-len"; "32"; "--report-to"; "none" ]

let private report (run: CliRun) = sprintf "exit %d\nstdout:\n%s\nstderr:\n%s" run.ExitCode run.Stdout run.Stderr

[<Tests>]
let tests =
    testSequenced <| testList "launch" [
        test "launch -n 2 -- train runs the training on 2 processes and exits 0 with a final model" {
            requireMpirun ()
            use folder = new TempFolder()
            let run = runCliWith oneThread ([ "launch"; "-n"; "2"; "--" ] @ trainArgs folder "out")
            Expect.equal run.ExitCode 0 (report run)
            Expect.isTrue (File.Exists(Path.Combine(folder.File "out", "final", "config.json"))) ("final/ holds the model\n" + report run)
            let reports = run.Stdout.Split('\n') |> Array.filter (fun l -> l.StartsWith "metrics: ")
            Expect.hasLength reports 1 ("process 0 reports once\n" + report run)
        }
        test "launch passes the ranks' exit code on: bad input on every rank gives 2" {
            requireMpirun ()
            use folder = new TempFolder()
            let args = trainArgs folder "out" |> List.map (fun a -> if a = "32" then "-5" else a)
            let run = runCliWith oneThread ([ "launch"; "-n"; "2"; "--" ] @ args)
            Expect.equal run.ExitCode 2 (report run)
            Expect.stringContains run.Stderr "max-seq-len" "the ranks' message names the flag"
        }
        test "launch -n 0 is refused with exit code 2" {
            let run = runCli [ "launch"; "-n"; "0"; "--"; "train" ]
            Expect.equal run.ExitCode 2 (report run)
            Expect.stringContains run.Stderr "-n: expected at least 1 process, got 0" "names the option"
        }
        test "launch with nothing after -- is refused with exit code 2" {
            let run = runCli [ "launch"; "-n"; "2" ]
            Expect.equal run.ExitCode 2 (report run)
            Expect.stringContains run.Stderr "nothing to run" "says what is missing"
        }
        test "launch without mpirun on PATH exits 2 naming mpirun and tools/install-mpi.sh" {
            use folder = new TempFolder()
            let run = runCliWith [ "PATH", Some folder.Path ] [ "launch"; "-n"; "2"; "--"; "train" ]
            Expect.equal run.ExitCode 2 (report run)
            Expect.stringContains run.Stderr "mpirun" "names mpirun"
            Expect.stringContains run.Stderr "tools/install-mpi.sh" "says how to install it"
        }
    ]
