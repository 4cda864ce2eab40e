/// Issue 12, finding 2: training on a machine that other work keeps busy. The thread budget's arithmetic
/// (properties), its reading of /proc, and the embedded default giving a core back when another program
/// keeps one busy.
module Functional.Tests.NewUserThreadsTests

open System
open System.Diagnostics
open System.IO
open Expecto
open FsCheck
open TorchSharp
open Functional.Runtime
open Functional.Tests.TestUtil

let private procStat (user: int64) (system: int64) (idle: int64) (iowait: int64) (steal: int64) =
    sprintf "cpu  %d 0 %d %d %d 0 0 %d 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n" user system idle iowait steal

let private selfStat (utime: int64) (stime: int64) =
    // pid (comm with spaces) state ppid ... utime (14) stime (15) ...
    sprintf "4242 (dotnet (x) y) R 1 4242 1 0 -1 4194304 101 0 0 0 %d %d 0 0 20 0 1 0 102642 3133440 406" utime stime

/// A CPU-bound process that keeps one core busy until disposed (and at most two minutes).
type private BusyCore() =
    let p = Process.Start(ProcessStartInfo("timeout", "120 sh -c \"while :; do :; done\"", UseShellExecute = false))
    interface IDisposable with
        member _.Dispose() =
            try p.Kill true with _ -> ()
            p.WaitForExit()
            p.Dispose()

[<Tests>]
let tests =
    testList "new user: threads on a busy machine" [
        testProperty "finding 2: the budget hands out between 1 and the maximum threads, fewer as other work grows" (fun (NonNegativeInt extra) (NormalFloat a) (NormalFloat b) ->
            let cores = 1 + extra % 64
            let maximum = 1 + (extra / 7) % 64
            let load x = Math.Clamp(abs x, 0.0, float cores)
            let lighter, heavier = min (load a) (load b), max (load a) (load b)
            let t1 = ThreadBudget.choose maximum cores lighter
            let t2 = ThreadBudget.choose maximum cores heavier
            t1 >= 1 && t1 <= maximum && t2 >= 1 && t2 <= maximum && t2 <= t1)

        test "finding 2: one busy core of two leaves one thread; an idle machine keeps every core" {
            Expect.equal (ThreadBudget.choose 2 2 1.0) 1 "the other program's core is left to it"
            Expect.equal (ThreadBudget.choose 2 2 0.67) 1 "two thirds of a core (3 threads on 2 cores) already count as busy"
            Expect.equal (ThreadBudget.choose 2 2 0.1) 2 "background noise keeps both threads"
            Expect.equal (ThreadBudget.choose 16 16 2.0) 14 "on 16 cores two busy ones leave 14"
            Expect.equal (ThreadBudget.choose 8 16 0.0) 8 "never more than the maximum (libtorch's default)"
            Expect.equal (ThreadBudget.choose 2 2 2.0) 1 "at least one thread"
        }

        test "finding 2: the load of other processes is the machine's busy time minus this process's own" {
            let before = ThreadBudget.parse (procStat 1000L 100L 5000L 10L 0L) (selfStat 400L 50L)
            let after = ThreadBudget.parse (procStat 1300L 150L 5140L 20L 0L) (selfStat 550L 60L)
            match before, after with
            | Some b, Some a ->
                Expect.equal b.Cpus 2 "two cpuN lines"
                Expect.equal b.OwnTicks 450L "utime + stime, read after the command name even when it holds spaces and parentheses"
                Expect.equal b.BusyTicks 1100L "user + system (+ steal), without idle and iowait"
                // 500 ticks of 2 CPUs = 250 per CPU; busy 350 ticks, ours 160: others 190 ticks = 0.76 of a core.
                let others = ThreadBudget.othersBusy b a
                Expect.isSome others "time passed"
                Expect.floatClose Accuracy.high others.Value 0.76 "0.76 cores used by others"
                Expect.isNone (ThreadBudget.othersBusy a a) "no time passed: no figure"
            | _ -> failtest "the samples parse"
            Expect.isNone (ThreadBudget.parse "intr 1 2 3\n" (selfStat 1L 1L)) "no cpu line: no sample"
            Expect.isNone (ThreadBudget.parse (procStat 1L 1L 1L 1L 1L) "4242 (x) R 1") "a short self stat: no sample"
        }

        test "finding 2: this machine's /proc gives a sample with every CPU and this process's time" {
            if not (File.Exists "/proc/stat") then skiptest "no /proc on this system"
            match ThreadBudget.sample () with
            | Some s ->
                Expect.equal s.Cpus Environment.ProcessorCount "the CPUs /proc/stat lists"
                Expect.isGreaterThan s.OwnTicks 0L "this process has used CPU time"
                Expect.isLessThan s.BusyTicks s.TotalTicks "busy is part of the total"
            | None -> failtest "a sample of /proc"
        }

        torchTest "finding 2: a thread count or OMP_NUM_THREADS fixes the number (runs repeat bit for bit)" (fun () ->
            // The count libtorch has now, so that tests running beside this one keep theirs.
            let current = torch.get_num_threads ()
            let given = ThreadBudget.create current
            Expect.equal (given.Threads, given.Adaptive) (current, false) "an explicit count is fixed"
            Expect.equal (ThreadBudget.adjust given) given "a fixed budget never changes"
            // The test process sets OMP_NUM_THREADS (Program.fs): 0 then means that count.
            let fromEnvironment = ThreadBudget.create 0
            Expect.equal fromEnvironment.Adaptive false "OMP_NUM_THREADS fixes the adaptive default"
            Expect.equal (string fromEnvironment.Threads) (Environment.GetEnvironmentVariable "OMP_NUM_THREADS") "the count it names")

        test "finding 2: with another program keeping a core busy, the embedded default gives that core back" {
            if Environment.ProcessorCount < 2 || not (File.Exists "/proc/stat") then skiptest "needs 2 cores and /proc"
            use output = new TempFolder()
            use _busy = new BusyCore()
            let run = runCliWith [ "OMP_NUM_THREADS", None ] [ "train"; "--output"; output.File "run"; "--max-steps"; "80" ]
            Expect.equal run.ExitCode 0 (sprintf "the run finishes (stderr: %s)" run.Stderr)
            Expect.stringContains run.Stdout (sprintf "threads: %d -> " Environment.ProcessorCount) "the budget started with every core"
            Expect.stringContains run.Stdout "(other programs keep cores busy; --threads N fixes the count)" "and dropped threads, saying so"
            Expect.isTrue (File.Exists(output.File "run/final/model.safetensors")) "the model saved"
        }
    ]
