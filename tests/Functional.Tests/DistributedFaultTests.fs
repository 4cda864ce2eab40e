/// Faults in multi-process runs (end to end, the list "mpi faults"; docs/distributed.md, "Faults"): a rank
/// killed by SIGKILL inside repeated collectives (of the test program or of `functional train`, on one host
/// or across two), a rank that raises while the other waits in a collective, and a host that goes silent
/// must end the whole mpirun run within 60 s, with a code other than 0 and a message naming the rank (or
/// host); the last complete checkpoint must stay usable. FaultModes holds the hidden modes of the test
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

/// A run of program (mpirun, or tools/two-hosts.sh) with arguments, its output gathered line by line.
type private MpiRun(program: string, arguments: string list) =
    let output = StringBuilder()
    let info = ProcessStartInfo(program, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    do
        for a in arguments do
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

    /// `mpirun --oversubscribe ARGUMENTS` on this machine; skips the test, saying why, without mpirun.
    static member Local(arguments: string list) =
        new MpiRun(DistributedTests.requireMpirun (), "--oversubscribe" :: arguments)

    /// `tools/two-hosts.sh run OPTIONS -- COMMAND`: one rank on each of the two hosts (TwoHosts), one
    /// intra-op thread each; the hosts must be up.
    static member AcrossHosts(options: string list, command: string list) =
        new MpiRun("bash", [ Path.Combine(ScriptTests.repositoryRoot (), "tools", "two-hosts.sh"); "run"; "-x"; "OMP_NUM_THREADS=1" ] @ options @ "--" :: command)

    /// The process id of mpirun (or of the script that became it).
    member _.Id = p.Id

    /// Whether mpirun has exited.
    member _.HasExited = p.HasExited

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

/// This test program with args, as a command for mpirun.
let private testCommand (args: string list) = [ "dotnet"; Path.Combine(AppContext.BaseDirectory, "Functional.Tests.dll") ] @ args

/// The arguments of mpirun for two processes of this test program with args.
let private testProgram (args: string list) = [ "-np"; "2" ] @ testCommand args

/// The functional command (Functional.Cli.dll beside the tests) and args, for mpirun.
let private functional (args: string list) = [ "dotnet"; Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll") ] @ args

/// The process id of rank among mpirun's children (the one whose environment has OMPI_COMM_WORLD_RANK=rank).
let private rankProcess (mpirun: int) (rank: int) =
    let parentOf (pid: string) =
        let stat = try File.ReadAllText(sprintf "/proc/%s/stat" pid) with _ -> ""
        // pid (name) state ppid ...: the name may hold spaces, so split after its closing parenthesis.
        match stat.LastIndexOf ')' with
        | -1 -> -1
        | i -> (stat.Substring(i + 2).Split ' ')[1] |> int
    let marker = sprintf "\000OMPI_COMM_WORLD_RANK=%d\000" rank
    Directory.GetDirectories "/proc"
    |> Array.map Path.GetFileName
    |> Array.filter (fun name -> name |> Seq.forall Char.IsDigit)
    |> Array.tryFind (fun pid ->
        parentOf pid = mpirun && ("\000" + (try File.ReadAllText(sprintf "/proc/%s/environ" pid) with _ -> "")).Contains marker)
    |> Option.map int

/// Whether a process with this id is still alive (not a zombie).
let private alive (pid: int) =
    try
        use p = Process.GetProcessById pid
        not p.HasExited && not ((try File.ReadAllText(sprintf "/proc/%d/stat" pid) with _ -> "").Contains ") Z ")
    with :? ArgumentException -> false

/// The bound the issue sets: mpirun must exit this soon after a rank died or raised.
let private bound = TimeSpan.FromSeconds 60.0

/// The number of complete checkpoints in a folder that a run is writing to. A checkpoint may vanish while
/// it is looked at (the rotation deletes the older ones): then it looks again.
let rec private completeCheckpoints (folder: string) =
    try (CheckpointFolder.list folder).Length with :? IOException -> completeCheckpoints folder

/// The exit code and output of a run, for failure messages.
let private describe (run: MpiRun) (code: int option) =
    sprintf "mpirun exit %s\noutput:\n%s" (match code with Some c -> string c | None -> "none (still running: killed)") run.Output

/// The golden LLaMA and 12 rows of its data (data.jsonl) in a temporary folder, and the arguments of a
/// ZeRO stage 2 run on 2 processes that saves a checkpoint every 2 steps and keeps the last 2.
type private TrainingSetup() =
    let root = new TestUtil.TempFolder()
    do
        TestUtil.copyFolder (Path.Combine(TestUtil.goldenDir "llama-cosine", "model")) (root.File "model")
        File.WriteAllLines(root.File "data.jsonl", File.ReadAllLines(Path.Combine(TestUtil.goldenDir "llama-cosine", "data.jsonl")) |> Array.take 12)
    member _.File name = root.File name
    member _.Args (data: string) (output: string) (steps: int) =
        [ "train"; "--model"; root.File "model"; "--data"; root.File data; "--output"; root.File output
          "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; string steps
          "--max-seq-len"; "40"; "--save-steps"; "2"; "--save-total-limit"; "2"; "--report-to"; "none"; "--zero-stage"; "2" ]
    interface IDisposable with
        member _.Dispose() = (root :> IDisposable).Dispose()

/// The process id that rank printed in `--collective-loop` (waiting up to 60 s for it).
let private loopProcess (run: MpiRun) (rank: int) =
    match run.WaitFor(Regex(sprintf "collective-loop rank %d of 2 pid ([0-9]+)" rank), TimeSpan.FromSeconds 60.0) with
    | Some m -> int m.Groups[1].Value
    | None -> failtestf "rank %d did not start\n%s" rank run.Output

/// Kills pid with SIGKILL, expects mpirun to exit with a code other than 0 within the bound, prints the
/// time it took (labelled what), and returns the run's description.
let private killAndWait (run: MpiRun) (pid: int) (what: string) =
    let killed = Stopwatch.StartNew()
    do
        use victim = Process.GetProcessById pid
        victim.Kill()
    let code = run.WaitForExit bound
    let seconds = killed.Elapsed.TotalSeconds
    let report = describe run code
    Expect.isSome code (sprintf "mpirun still ran %.0f s after rank 1 was killed\n%s" bound.TotalSeconds report)
    printfn "mpi faults (%s): mpirun exited %.1f s after the kill of rank 1, code %d" what seconds code.Value
    Expect.notEqual code.Value 0 report
    report

let private raiseTest (name: string) (leaving: string) (expectedLine: string) =
    test name {
        use run = MpiRun.Local(testProgram [ "--raise-on-rank"; "1"; "--leaving"; leaving ])
        let raised = run.WaitFor(Regex "raise-on-rank: rank 1 raises at ([0-9]+)", TimeSpan.FromSeconds 60.0)
        let raisedAt =
            match raised with
            | Some m -> DateTimeOffset.FromUnixTimeMilliseconds(int64 m.Groups[1].Value)
            | None -> failtestf "rank 1 did not get to raise\n%s" run.Output
        let code = run.WaitForExit bound
        let seconds = (DateTimeOffset.UtcNow - raisedAt).TotalSeconds
        let report = describe run code
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
            use run = MpiRun.Local(testProgram [ "--collective-loop"; "120"; "--checkpoints"; checkpoints ])
            let rank0, rank1 = loopProcess run 0, loopProcess run 1
            // Into the loop: wait for rank 0's first checkpoint.
            let watch = Stopwatch.StartNew()
            let mutable seen = 0
            while seen = 0 && watch.Elapsed.TotalSeconds < 30.0 do
                Threading.Thread.Sleep 100
                seen <- completeCheckpoints checkpoints
            Expect.isGreaterThan seen 0 ("rank 0 wrote no checkpoint in 30 s\n" + run.Output)
            Threading.Thread.Sleep 500
            let report = killAndWait run rank1 "kill -9"
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
        test "functional train: bad data on rank 1 alone ends the run with exit code 2, naming the rank" {
            use s = new TrainingSetup()
            File.WriteAllText(s.File "bad.jsonl", "this is not json\n")
            // Two commands (MPMD): rank 0 reads good data and waits for rank 1 at the job's first Barrier.
            let args data = s.Args data "out" 3000
            use run = MpiRun.Local([ "-np"; "1" ] @ functional (args "data.jsonl") @ [ ":"; "-np"; "1" ] @ functional (args "bad.jsonl"))
            let code = run.WaitForExit(TimeSpan.FromSeconds 90.0)
            let report = describe run code
            Expect.equal code (Some 2) report
            Expect.stringContains run.Output "rank 1 of 2 failed: " ("the line naming the rank\n" + report)
            Expect.isMatch run.Output "rank 1 of 2 failed: .*bad\\.jsonl:1: not valid JSON" ("the error\n" + report)
        }
        test "functional train: kill -9 of rank 1 after a checkpoint; the run resumes on 1 process and on 2 at stages 3 and 1 as if never stopped" {
            DistributedTests.requireMpirun () |> ignore
            use s = new DistributedTrainingTests.Setup()
            let args output batch stage = s.Args output batch |> DistributedTrainingTests.replace "--max-steps" "8" |> fun a -> a @ [ "--zero-stage"; string stage ]
            // The run that never stops: 2 processes at stage 2, 8 steps, a checkpoint every 2.
            DistributedTrainingTests.train 2 (args "whole" 2 2) |> ignore
            use run = MpiRun.Local([ "-np"; "2" ] @ functional (args "killed" 2 2))
            let watch = Stopwatch.StartNew()
            let rec ranks () =
                match rankProcess run.Id 0, rankProcess run.Id 1 with
                | Some r0, Some r1 -> r0, r1
                | _ when watch.Elapsed.TotalSeconds > 60.0 || run.HasExited -> failtestf "the ranks did not start\n%s" run.Output
                | _ ->
                    Threading.Thread.Sleep 10
                    ranks ()
            let rank0, rank1 = ranks ()
            let killed = s.File "killed"
            while completeCheckpoints killed = 0 && watch.Elapsed.TotalSeconds < 120.0 && not run.HasExited do
                Threading.Thread.Sleep 5
            // Both ranks are frozen the moment the first checkpoint is complete, so that the kill lands mid-run
            // however busy the machine is; then rank 1 dies as a crash would end it.
            for pid in [ rank0; rank1 ] do
                use stop = Process.Start("kill", [ "-STOP"; string pid ])
                stop.WaitForExit()
            Expect.isFalse (Directory.Exists(Path.Combine(killed, "final"))) ("the run had finished before the kill\n" + run.Output)
            let report = killAndWait run rank1 "functional train, kill -9 after a checkpoint"
            Expect.isMatch run.Output "rank 1 with PID [0-9]+ on node .* exited on signal 9" ("Open MPI names the rank\n" + report)
            Expect.isFalse (Directory.Exists(Path.Combine(killed, "final"))) ("no final/ after the kill\n" + report)
            let latest =
                match CheckpointFolder.latest killed with
                | Some folder -> folder
                | None -> failtestf "no checkpoint verifies after the kill: %A\n%s" (snd (CheckpointFolder.latestSkipping killed)) report
            let step = (CheckpointFolder.stepOf latest).Value
            Expect.isLessThan step 8 "the kill came before the last step"
            // The folder as the kill left it (metrics.jsonl may run past the checkpoint), resumed three ways.
            for name, processes, batch, stage in [ "one", 1, 4, 0; "stage3", 2, 2, 3; "stage1", 2, 2, 1 ] do
                TestUtil.copyFolder killed (s.File name)
                let out = DistributedTrainingTests.train processes (args name batch stage @ [ "--resume-from-checkpoint"; "latest" ])
                let what = sprintf "killed at step %d, resumed on %d processes at stage %d" step processes stage
                Expect.stringContains out "resuming from" what
                Expect.stringContains out (sprintf "checkpoint-%d" step) what
                DistributedTrainingTests.expectSameSteps (s.File name) (s.File "whole") what
                DistributedTrainingTests.expectSameWeights (Path.Combine(s.File name, "final")) (Path.Combine(s.File "whole", "final")) what
            printfn "mpi faults (kill and resume): killed after checkpoint-%d; resumed on 1 process and at stages 3 and 1 as the run that never stopped" step
        }
        test "two hosts (TCP): kill -9 of rank 1 inside repeated collectives ends mpirun, naming the rank and its host" {
            TwoHosts.withHosts (fun () ->
                use run = MpiRun.AcrossHosts([], testCommand [ "--collective-loop"; "120" ])
                let rank1 = loopProcess run 1
                loopProcess run 0 |> ignore
                Threading.Thread.Sleep 1000
                let report = killAndWait run rank1 "two hosts, kill -9"
                Expect.isMatch run.Output "rank 1 with PID [0-9]+ on node fnl-host1 exited on signal 9" ("Open MPI names the rank and host\n" + report))
        }
        test "two hosts (TCP): a host that goes silent (its link down) ends mpirun within 60 s with short keepalives" {
            TwoHosts.withHosts (fun () ->
                // Open MPI's defaults notice a silent host only after 300 + 9 x 20 s of keepalives: shortened here.
                let keepalive = [ "--mca"; "oob_tcp_keepalive_time"; "10"; "--mca"; "oob_tcp_keepalive_intvl"; "5"; "--mca"; "oob_tcp_keepalive_probes"; "3" ]
                use run = MpiRun.AcrossHosts(keepalive, testCommand [ "--collective-loop"; "120" ])
                let rank1 = loopProcess run 1
                loopProcess run 0 |> ignore
                Threading.Thread.Sleep 1000
                let silenced = Stopwatch.StartNew()
                let link = ScriptTests.runProcess "ip" [ "netns"; "exec"; fst TwoHosts.hosts[1]; "ip"; "link"; "set"; "fnl-veth1"; "down" ] "/" [] (TimeSpan.FromSeconds 10.0)
                ScriptTests.expectSuccess link
                let code = run.WaitForExit bound
                let report = describe run code
                Expect.isSome code (sprintf "mpirun still ran %.0f s after fnl-host1 went silent\n%s" bound.TotalSeconds report)
                printfn "mpi faults (two hosts, link down): mpirun exited %.1f s after fnl-host1 went silent, code %d" silenced.Elapsed.TotalSeconds code.Value
                Expect.notEqual code.Value 0 report
                Expect.stringContains run.Output "ORTE has lost communication with a remote daemon" report
                Expect.isMatch run.Output "Remote daemon: .* on node fnl-host1" ("names the host\n" + report)
                Threading.Thread.Sleep 1000
                Expect.isFalse (alive rank1) ("rank 1, on the silent host, was ended too\n" + report))
        }
    ]
