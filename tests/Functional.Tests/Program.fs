module Functional.Tests.Program

open System
open Expecto
open Expecto.Impl

/// The end-to-end tests: those that start processes (the functional command, the sample, notebooks and
/// scripts, packing, PyTorch), by the path of their test lists. Everything else is a fast unit or property
/// test of the library in this process.
let endToEnd =
    [ [ "cli" ]
      [ "cli help" ]
      [ "schedules cli" ]
      [ "resume" ]
      [ "embedded" ]
      [ "notebooks" ]
      [ "packages" ]
      [ "scripts" ]
      [ "benchmarks" ]
      [ "chunked cross-entropy"; "cli" ]
      [ "checkpoint signature" ]
      [ "new user (issue 12)" ]
      [ "new user: signals and resume" ]
      [ "new user: threads on a busy machine" ]
      [ "new user limits" ]
      [ "new user: training text"; "finding 9" ]
      [ "tokenizers"; "functional tokenize" ]
      [ "chat templates"; "chat-template command" ]
      [ "chat templates"; "chat cli" ]
      [ "builder"; "fit" ]
      [ "mixed precision"; "LoRA" ]
      [ "prefix tuning"; "bad input" ]
      [ "prefix tuning"; "generation" ]
      [ "interop cli" ]
      [ "heads cli" ]
      [ "mpi" ]
      [ "mpi faults" ]
      [ "distributed training" ]
      [ "two hosts" ]
      [ "launch" ]
      [ "distributed benchmark" ]
      [ "isolated packing"; "cli" ]
      [ "optimizer cli" ] ]

let private isEndToEnd (names: string list) =
    endToEnd |> List.exists (fun prefix -> List.length prefix <= List.length names && List.take prefix.Length names = prefix)

/// Runs the [<Tests>] values of this assembly: all of them, or with `--unit` only the fast unit and property
/// tests, with `--e2e` only the end-to-end ones (endToEnd). After Expecto's own summary it prints one plain
/// line, "tests: N passed, N failed, N skipped", that CI reads.
[<EntryPoint>]
let main argv =
    // `--launch-check`: the distributed self-check (LaunchCheck, docs/distributed.md) instead of the tests,
    // for `mpirun -np N dotnet Functional.Tests.dll --launch-check` (the test lists "mpi" and "two hosts"
    // start it; the latter has each rank record where it ran).
    // `--tensor-parallel-check`: TensorParallelCheck over all the processes of the launch (the "mpi" list).
    // `--pipeline-check`: PipelineCheck with every process of the launch a stage (the "mpi" list).
    // `--tensor-parallel-training-check`: TensorParallelTrainingCheck over every process of the launch.
    // `--pipeline-training-check`: PipelineTrainingCheck with every process of the launch a stage.
    if argv |> Array.contains "--pipeline-training-check" then
        exit (Functional.Training.PipelineTrainingCheck.run ())
    if argv |> Array.contains "--tensor-parallel-training-check" then
        exit (Functional.Training.TensorParallelTrainingCheck.run ())
    if argv |> Array.contains "--pipeline-check" then
        exit (Functional.Distributed.PipelineCheck.run ())
    if argv |> Array.contains "--tensor-parallel-check" then
        exit (Functional.Distributed.TensorParallelChecks.run ())
    if argv |> Array.contains "--launch-check" then
        TwoHosts.recordLaunch ()
        exit (Functional.Distributed.LaunchCheck.run ())
    // The modes the test list "mpi faults" starts under mpirun (DistributedFaultTests.FaultModes).
    let valueOf (flag: string) = argv |> Array.tryFindIndex ((=) flag) |> Option.map (fun i -> argv[i + 1])
    match valueOf "--collective-loop" with
    | Some seconds -> exit (DistributedFaultTests.FaultModes.collectiveLoop (float seconds) (valueOf "--checkpoints"))
    | None -> ()
    match valueOf "--raise-on-rank" with
    | Some rank ->
        let leaving =
            match valueOf "--leaving" with
            | None | Some "caught" -> DistributedFaultTests.FaultModes.Caught
            | Some "uncaught" -> DistributedFaultTests.FaultModes.Uncaught
            | Some "exit-code" -> DistributedFaultTests.FaultModes.ExitCode
            | Some other -> failwithf "--leaving: expected caught, uncaught or exit-code, got %s" other
        exit (DistributedFaultTests.FaultModes.raiseOnRank (int rank) leaving)
    | None -> ()
    let unitOnly = argv |> Array.contains "--unit"
    let e2eOnly = argv |> Array.contains "--e2e"
    let argv = argv |> Array.filter (fun a -> a <> "--unit" && a <> "--e2e")
    TestUtil.unitOnly <- unitOnly
    // Tests run in parallel and compare runs bit for bit: a fixed thread count (every core, libtorch's
    // default here) instead of the adaptive default, for this process and the commands it starts. The
    // tests of the adaptive budget remove the variable for their own runs.
    if String.IsNullOrEmpty(Environment.GetEnvironmentVariable "OMP_NUM_THREADS") then
        Environment.SetEnvironmentVariable("OMP_NUM_THREADS", string Environment.ProcessorCount)
    let mutable counts = None
    let printer = defaultConfig.printer
    let summary (cfg: ExpectoConfig) (s: TestRunSummary) =
        async {
            do! printer.summary cfg s
            counts <- Some(s.passed.Length, s.failed.Length + s.errored.Length, s.ignored.Length)
        }
    let tests =
        let all = testFromThisAssembly () |> Option.defaultValue (TestList([], Normal))
        if unitOnly then Test.filter "." (isEndToEnd >> not) all
        elif e2eOnly then Test.filter "." isEndToEnd all
        else all
    let exitCode =
        runTestsWithCLIArgs [ CLIArguments.Printer { printer with summary = summary }; CLIArguments.No_Spinner ] argv tests
    match counts with
    | Some(passed, failed, skipped) ->
        // Written to the raw stream: Expecto's console writer pads lines for its progress display.
        Console.Out.Flush()
        use stdout = Console.OpenStandardOutput()
        let line = sprintf "\ntests: %d passed, %d failed, %d skipped\n" passed failed skipped
        stdout.Write(Text.Encoding.UTF8.GetBytes line)
    | None -> ()
    exitCode
