/// Tests of the distributed runtime's launch: the parsing of the launcher's environment (unit) and the
/// MPI communicator's collectives under `mpirun -np 2` (end to end, the list "mpi").
module Functional.Tests.DistributedTests

open System
open System.Diagnostics
open System.IO
open Expecto
open Functional
open Functional.Distributed

let private parse (variables: (string * string) list) =
    let map = Map.ofList variables
    Communicator.parseEnvironment (fun name -> match Map.tryFind name map with Some v -> v | None -> null)

/// The message of the InvalidInputException that parsing variables raises.
let private parseError (variables: (string * string) list) =
    try
        parse variables |> ignore
        failtest "expected an InvalidInputException"
    with :? InvalidInputException as e -> e.Message

[<Tests>]
let environmentTests =
    testList "distributed environment" [
        test "no launcher variables: one process, rank 0" {
            let e = parse []
            Expect.equal (e.Size, e.Rank, e.LocalRank, e.SizeVariable) (1, 0, 0, None) "single process"
        }
        test "Open MPI's variables" {
            let e = parse [ "OMPI_COMM_WORLD_SIZE", "4"; "OMPI_COMM_WORLD_RANK", "3"; "OMPI_COMM_WORLD_LOCAL_RANK", "1" ]
            Expect.equal (e.Size, e.Rank, e.LocalRank, e.SizeVariable) (4, 3, 1, Some "OMPI_COMM_WORLD_SIZE") "Open MPI"
        }
        test "PMI (MPICH, Slurm) variables" {
            let e = parse [ "PMI_SIZE", "2"; "PMI_RANK", "1" ]
            Expect.equal (e.Size, e.Rank, e.LocalRank, e.SizeVariable) (2, 1, 0, Some "PMI_SIZE") "PMI"
        }
        test "torchrun's variables" {
            let e = parse [ "WORLD_SIZE", "8"; "RANK", "5"; "LOCAL_RANK", "1" ]
            Expect.equal (e.Size, e.Rank, e.LocalRank, e.SizeVariable) (8, 5, 1, Some "WORLD_SIZE") "torchrun"
        }
        test "Open MPI's variables win over torchrun's" {
            let e = parse [ "WORLD_SIZE", "8"; "OMPI_COMM_WORLD_SIZE", "2"; "RANK", "5"; "OMPI_COMM_WORLD_RANK", "1"; "LOCAL_RANK", "3"; "OMPI_COMM_WORLD_LOCAL_RANK", "0" ]
            Expect.equal (e.Size, e.Rank, e.LocalRank) (2, 1, 0) "Open MPI first"
        }
        test "empty values count as unset" {
            let e = parse [ "OMPI_COMM_WORLD_SIZE", ""; "WORLD_SIZE", "3"; "RANK", " 2 " ]
            Expect.equal (e.Size, e.Rank) (3, 2) "falls through to WORLD_SIZE"
        }
        test "a size that is not a number names the variable" {
            let message = parseError [ "WORLD_SIZE", "two" ]
            Expect.stringContains message "WORLD_SIZE" "names the variable"
            Expect.stringContains message "'two'" "shows the value"
        }
        test "a size of 0 is refused" {
            Expect.stringContains (parseError [ "PMI_SIZE", "0" ]) "at least 1" "size 0"
        }
        test "a rank outside the size is refused" {
            let message = parseError [ "WORLD_SIZE", "2"; "RANK", "2" ]
            Expect.stringContains message "RANK" "names the variable"
        }
        test "size 1 gives the single-process communicator without MPI" {
            // fromEnvironment reads this process's variables: in the test process no launcher set any
            // (the "mpi" list starts its own processes).
            if String.IsNullOrEmpty(Environment.GetEnvironmentVariable "OMPI_COMM_WORLD_SIZE") then
                Expect.isTrue (Object.ReferenceEquals(Communicator.fromEnvironment (), Communicator.singleProcess)) "single process"
        }
    ]

/// The mpirun on PATH, or None.
let findMpirun () =
    (Environment.GetEnvironmentVariable "PATH").Split(':', StringSplitOptions.RemoveEmptyEntries)
    |> Array.map (fun d -> Path.Combine(d, "mpirun"))
    |> Array.tryFind File.Exists

/// The mpirun on PATH; skips the calling test, saying why, without it (as the PyTorch comparisons: the
/// README's test command alone skips, .ci/run installs it).
let requireMpirun () : string =
    match findMpirun () with
    | Some path -> path
    | None -> skiptest "needs mpirun (Open MPI): sh tools/install-mpi.sh, or apt-get install openmpi-bin libopenmpi-dev; CI installs it"

/// `mpirun -np processes --oversubscribe dotnet ASSEMBLY arguments` (an assembly next to the tests), with
/// stdout and stderr redirected, Open MPI's root variables, one intra-op thread per process and TERM=dumb.
let mpirunInfo (processes: int) (assembly: string) (arguments: string list) : ProcessStartInfo =
    let info = ProcessStartInfo(requireMpirun (), RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    for a in [ "-np"; string processes; "--oversubscribe"; "dotnet"; Path.Combine(AppContext.BaseDirectory, assembly) ] @ arguments do
        info.ArgumentList.Add a
    info.Environment["OMPI_ALLOW_RUN_AS_ROOT"] <- "1"
    info.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] <- "1"
    info.Environment["OMP_NUM_THREADS"] <- "1"
    info.Environment["TERM"] <- "dumb"
    info

/// Runs a self-check of this test assembly (--launch-check, --tensor-parallel-check, --pipeline-check)
/// under `mpirun -np processes`: its exit code, standard output and error.
let private runCheck (processes: int) (check: string) =
    use p = Process.Start(mpirunInfo processes "Functional.Tests.dll" [ check ])
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit(TimeSpan.FromMinutes 3.0)) then
        p.Kill true
        failtestf "mpirun -np %d did not finish in 3 minutes\n%s\n%s" processes stdout.Result stderr.Result
    p.ExitCode, stdout.Result, stderr.Result

[<Tests>]
let mpiTests =
    testSequenced <| testList "mpi" [
        test "mpirun -np 2: every collective on float32, float64 and int64 on both ranks" {
            let code, out, err = runCheck 2 "--launch-check"
            let report = sprintf "exit %d\nstdout:\n%s\nstderr:\n%s" code out err
            Expect.equal code 0 report
            for rank in 0 .. 1 do
                Expect.stringContains out (sprintf "launch-check rank %d of 2 (local rank %d): ok" rank rank) report
            Expect.isFalse (out.Contains "FAILED") report
        }
        for processes in [ 2; 3 ] do
            for check, what, lines in
                [ "--tensor-parallel-check", "a SwiGLU MLP, a LLaMA and a Qwen3 split over the tensor-parallel group equal the whole ones on every rank",
                  [ "tensor-parallel-check"; "tensor-parallel-model-check" ]
                  "--tensor-parallel-training-check", "4 accumulated AdamW steps of a LLaMA and a Qwen3 split over the tensor-parallel group equal one process (loss, grad norm, final weights)",
                  [ "tensor-parallel-training-check" ]
                  "--pipeline-check", "a LLaMA in pipeline stages under 1F1B gives the whole model's loss and each stage's gradients", [ "pipeline-check" ]
                  "--pipeline-training-check", "4 steps of 4 accumulated micro-batches of a LLaMA (untied and tied) in 1F1B pipeline stages equal one process (loss, grad norm, final weights)",
                  [ "pipeline-training-check" ] ] do
                test (sprintf "mpirun -np %d: %s" processes what) {
                    let code, out, err = runCheck processes check
                    let report = sprintf "exit %d\nstdout:\n%s\nstderr:\n%s" code out err
                    Expect.equal code 0 report
                    for rank in 0 .. processes - 1 do
                        for line in lines do
                            Expect.stringContains out (sprintf "%s rank %d of %d: ok" line rank processes) report
                }
        test "mpirun -np 1: the single-process communicator, MPI not loaded" {
            let code, out, err = runCheck 1 "--launch-check"
            let report = sprintf "exit %d\nstdout:\n%s\nstderr:\n%s" code out err
            Expect.equal code 0 report
            Expect.stringContains out "launch-check rank 0 of 1 (local rank 0): ok" report
        }
    ]

/// A communicator that claims two processes but does nothing: every collective result is wrong.
type private SilentPair() =
    interface ICommunicator with
        member _.Rank = 0
        member _.Size = 2
        member _.LocalRank = 0
        member _.AllReduce _ = ()
        member _.ReduceScatter(_, _) = ()
        member _.AllGather(_, _) = ()
        member _.Broadcast(_, _) = ()
        member _.Barrier() = ()

[<Tests>]
let launchCheckTests =
    testList "distributed launch check" [
        test "passes on the single-process communicator" {
            let passed, line = LaunchCheck.check Communicator.singleProcess
            Expect.isTrue passed line
            Expect.stringContains line "rank 0 of 1 (local rank 0): ok" "the line"
        }
        test "a communicator whose results are wrong fails, naming each collective" {
            let passed, line = LaunchCheck.check (SilentPair())
            Expect.isFalse passed line
            for what in [ "float32 AllReduce"; "int64 ReduceScatter"; "float64 AllGather"; "float32 Broadcast"; "AllReduce accepted a float16 tensor" ] do
                Expect.stringContains line what "names the failed check"
        }
    ]
