/// Faults in multi-process runs (end to end, the list "mpi faults"): a rank killed by SIGKILL inside
/// repeated collectives, and a rank that raises while the other waits in a collective, must end the
/// whole mpirun run within a bounded time, with a code other than 0 and a message naming the rank;
/// the last complete checkpoint must stay usable. FaultModes holds the hidden modes of the test
/// program that these tests start under mpirun.
module Functional.Tests.DistributedFaultTests

open System
open System.Diagnostics
open System.IO
open System.Text
open System.Text.RegularExpressions
open Expecto
open TorchSharp
open Functional.Runtime
open Functional.Checkpoint
open Functional.Distributed

/// The hidden modes of the test program (Program.main) for `mpirun -np 2 dotnet Functional.Tests.dll ...`.
module FaultModes =

    let private say (line: string) =
        Console.Out.WriteLine line
        Console.Out.Flush()

    let private dispose (communicator: ICommunicator) =
        match communicator with
        | :? IDisposable as d -> d.Dispose()
        | _ -> ()

    /// `--collective-loop SECONDS [--checkpoints DIR]`: every rank prints "collective-loop rank R of N
    /// pid P", then all-reduces a 256 KiB tensor over and over for SECONDS; with DIR, rank 0 writes a
    /// 4 MiB checkpoint (CheckpointFolder.write) every 100 collectives and keeps the last three.
    let collectiveLoop (seconds: float) (checkpoints: string option) : int =
        let communicator = Communicator.fromEnvironment ()
        TorchRuntime.ensure ()
        let rank = communicator.Rank
        say (sprintf "collective-loop rank %d of %d pid %d" rank communicator.Size Environment.ProcessId)
        use tensor = torch.ones([| 65536L |], dtype = torch.ScalarType.Float32)
        use scale = torch.tensor (1.0f / float32 communicator.Size)
        let payload = Array.init (4 <<< 20) byte
        let watch = Stopwatch.StartNew()
        let mutable collectives = 0
        while watch.Elapsed.TotalSeconds < seconds do
            communicator.AllReduce tensor
            tensor.mul_ scale |> ignore
            collectives <- collectives + 1
            match checkpoints with
            | Some folder when rank = 0 && collectives % 100 = 0 ->
                CheckpointFolder.write folder collectives [ "weights.bin", (fun path -> File.WriteAllBytes(path, payload)) ] |> ignore
                let old = Path.Combine(folder, CheckpointFolder.folderName (collectives - 300))
                if Directory.Exists old then CheckpointFolder.delete old
            | _ -> ()
        communicator.Barrier()
        say (sprintf "collective-loop rank %d: %d collectives" rank collectives)
        dispose communicator
        0

    /// How the raising rank of `--raise-on-rank` leaves.
    type Leaving =
        /// It catches the exception, reports it and fails the run through Faults.abortRun (as the
        /// functional command's error handler does).
        | Caught
        /// The exception escapes Main (MpiCommunicator's unhandled-exception handler fails the run).
        | Uncaught
        /// It catches the exception and returns exit code 3 without failing the run (the exit handler
        /// does, instead of MPI_Finalize).
        | ExitCode

    /// `--raise-on-rank R [--leaving caught|uncaught|exit-code]`: every rank joins a first AllReduce;
    /// rank R then prints "rank R raises at UNIX-MILLISECONDS" and raises, while the others print that
    /// they wait and enter a second AllReduce that rank R never joins.
    let raiseOnRank (failingRank: int) (leaving: Leaving) : int =
        let communicator = Communicator.fromEnvironment ()
        TorchRuntime.ensure ()
        let rank = communicator.Rank
        let work () =
            use tensor = torch.ones([| 16L |], dtype = torch.ScalarType.Float32)
            communicator.AllReduce tensor
            if rank = failingRank then
                say (sprintf "raise-on-rank: rank %d raises at %d" rank (DateTimeOffset.UtcNow.ToUnixTimeMilliseconds()))
                raise (InvalidOperationException(sprintf "raised on purpose by --raise-on-rank %d" failingRank))
            say (sprintf "raise-on-rank: rank %d waits in a second collective" rank)
            communicator.AllReduce tensor
            dispose communicator
            0
        match leaving with
        | Uncaught -> work ()
        | Caught | ExitCode ->
            try work ()
            with e ->
                Console.Error.WriteLine("error: " + e.Message)
                if leaving = Caught then Faults.abortRun communicator 1 e.Message
                3

/// One `mpirun -np 2 --oversubscribe dotnet Functional.Tests.dll ARGS` run, its output gathered line by line.
type private MpiRun(arguments: string list) =
    let mpirun =
        match DistributedTests.findMpirun () with
        | Some path -> path
        | None -> skiptest "needs mpirun (Open MPI): sh tools/install-mpi.sh, or apt-get install openmpi-bin libopenmpi-dev; CI installs it"
    let output = StringBuilder()
    let info = ProcessStartInfo(mpirun, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    do
        for a in [ "-np"; "2"; "--oversubscribe"; "dotnet"; Path.Combine(AppContext.BaseDirectory, "Functional.Tests.dll") ] @ arguments do
            info.ArgumentList.Add a
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT"] <- "1"
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] <- "1"
        info.Environment["OMP_NUM_THREADS"] <- "1"
        info.Environment["TERM"] <- "dumb"
    let p = new Process(StartInfo = info)
    let gather (e: DataReceivedEventArgs) = if not (isNull e.Data) then lock output (fun () -> output.AppendLine e.Data |> ignore)
    do
        p.OutputDataReceived.Add gather
        p.ErrorDataReceived.Add gather
        p.Start() |> ignore
        p.BeginOutputReadLine()
        p.BeginErrorReadLine()

    /// Standard output and error so far, interleaved.
    member _.Output = lock output (fun () -> output.ToString())

    /// Waits up to timeout for a line matching pattern; its match, or None.
    member this.WaitFor(pattern: Regex, timeout: TimeSpan) =
        let watch = Stopwatch.StartNew()
        let rec poll () =
            match pattern.Matches this.Output |> Seq.tryHead with
            | Some m -> Some m
            | None when watch.Elapsed > timeout || p.HasExited -> None
            | None ->
                Threading.Thread.Sleep 50
                poll ()
        poll ()

    /// Waits up to timeout for mpirun to exit: Some exit code (all output read), or None (then mpirun
    /// and its processes are killed).
    member _.WaitForExit(timeout: TimeSpan) =
        if p.WaitForExit timeout then
            p.WaitForExit()
            Some p.ExitCode
        else
            p.Kill true
            None

    interface IDisposable with
        member _.Dispose() =
            if not p.HasExited then p.Kill true
            p.Dispose()

/// Whether a process with this id is still alive (not a zombie).
let private alive (pid: int) =
    try
        use p = Process.GetProcessById pid
        not p.HasExited && not ((try File.ReadAllText(sprintf "/proc/%d/stat" pid) with _ -> "").Contains ") Z ")
    with :? ArgumentException -> false

/// The bound the issue sets: mpirun must exit this soon after a rank died or raised.
let private bound = TimeSpan.FromSeconds 60.0

let private report (run: MpiRun) (code: int option) =
    sprintf "mpirun exit %s\noutput:\n%s" (match code with Some c -> string c | None -> "none (still running: killed)") run.Output

let private raiseTest (name: string) (leaving: string) (expectedLine: string) =
    test name {
        use run = new MpiRun([ "--raise-on-rank"; "1"; "--leaving"; leaving ])
        let raised = run.WaitFor(Regex "raise-on-rank: rank 1 raises at ([0-9]+)", TimeSpan.FromSeconds 60.0)
        let raisedAt =
            match raised with
            | Some m -> DateTimeOffset.FromUnixTimeMilliseconds(int64 m.Groups[1].Value)
            | None -> failtestf "rank 1 did not get to raise\n%s" run.Output
        let code = run.WaitForExit bound
        let seconds = (DateTimeOffset.UtcNow - raisedAt).TotalSeconds
        let report = report run code
        Expect.isSome code (sprintf "mpirun still ran %.0f s after rank 1 raised\n%s" bound.TotalSeconds report)
        printfn "mpi faults (%s): mpirun exited %.1f s after rank 1 raised, code %d" leaving seconds code.Value
        Expect.notEqual code.Value 0 report
        Expect.stringContains run.Output "raise-on-rank: rank 0 waits in a second collective" ("rank 0 was inside a collective\n" + report)
        Expect.stringContains run.Output expectedLine ("the line naming the rank\n" + report)
    }

[<Tests>]
let faultTests =
    testSequenced <| testList "mpi faults" [
        test "kill -9 of rank 1 inside repeated collectives ends mpirun, naming the rank; the last checkpoint verifies" {
            use folder = new TestUtil.TempFolder()
            let checkpoints = folder.File "out"
            use run = new MpiRun([ "--collective-loop"; "120"; "--checkpoints"; checkpoints ])
            let pidOf (rank: int) =
                match run.WaitFor(Regex(sprintf "collective-loop rank %d of 2 pid ([0-9]+)" rank), TimeSpan.FromSeconds 60.0) with
                | Some m -> int m.Groups[1].Value
                | None -> failtestf "rank %d did not start\n%s" rank run.Output
            let rank0, rank1 = pidOf 0, pidOf 1
            // Into the loop: wait for rank 0's first checkpoint.
            let watch = Stopwatch.StartNew()
            while (CheckpointFolder.list checkpoints).IsEmpty && watch.Elapsed.TotalSeconds < 30.0 do
                Threading.Thread.Sleep 100
            Expect.isNonEmpty (CheckpointFolder.list checkpoints) ("rank 0 wrote no checkpoint in 30 s\n" + run.Output)
            Threading.Thread.Sleep 500
            let killed = Stopwatch.StartNew()
            do
                use victim = Process.GetProcessById rank1
                victim.Kill()
            let code = run.WaitForExit bound
            let seconds = killed.Elapsed.TotalSeconds
            let report = report run code
            Expect.isSome code (sprintf "mpirun still ran %.0f s after rank 1 was killed\n%s" bound.TotalSeconds report)
            printfn "mpi faults (kill -9): mpirun exited %.1f s after the kill of rank 1, code %d" seconds code.Value
            Expect.notEqual code.Value 0 report
            Expect.isMatch run.Output "rank 1 with PID [0-9]+ on node .* exited on signal 9" ("Open MPI names the rank\n" + report)
            Expect.isFalse (alive rank0) ("rank 0 was ended too\n" + report)
            match CheckpointFolder.latest checkpoints with
            | Some latest -> CheckpointFolder.verify latest
            | None -> failtestf "no checkpoint verifies after the kill: %A\n%s" (snd (CheckpointFolder.latestSkipping checkpoints)) report
        }
        raiseTest "a rank that raises and fails the run (Faults.abortRun) ends mpirun, naming the rank" "caught"
            "rank 1 of 2 failed: raised on purpose by --raise-on-rank 1"
        raiseTest "an unhandled exception on a rank ends mpirun, naming the rank" "uncaught"
            "rank 1 of 2 failed: unhandled exception: System.InvalidOperationException: raised on purpose by --raise-on-rank 1"
        raiseTest "a rank that exits with code 3 without failing the run still ends mpirun (no MPI_Finalize)" "exit-code"
            "rank 1 of 2 failed: the process is exiting with code 3"
    ]
