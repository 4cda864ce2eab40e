namespace Functional.Runtime

open System
open System.Diagnostics
open System.IO
open TorchSharp

/// CPU time counters read from Linux's /proc, in clock ticks (USER_HZ).
[<NoComparison>]
type CpuSample =
    { /// Ticks of every CPU together, busy or idle (/proc/stat's cpu line: user to steal).
      TotalTicks: int64
      /// Busy ticks of every CPU together (everything but idle and iowait).
      BusyTicks: int64
      /// Ticks this process has used, user and system, all its threads (/proc/self/stat).
      OwnTicks: int64
      /// The CPUs /proc/stat lists (cpu0, cpu1, ...).
      Cpus: int }

/// How many intra-op threads a training loop uses.
[<NoComparison>]
type ThreadBudget =
    { /// The most threads the budget hands out: a fixed count, or libtorch's own default (the cores).
      Maximum: int
      /// The threads in use now.
      Threads: int
      /// Whether the count follows the load of the machine (--threads 0 without OMP_NUM_THREADS).
      Adaptive: bool
      /// The counters at the last decision, and when it was taken (Stopwatch timestamp).
      Last: (CpuSample * int64) option
      /// Decisions taken so far.
      Checks: int }

/// The thread count of training. libtorch's OpenMP threads wait for each other at the end of every
/// parallel operation, so when another program keeps a core busy, one of them is descheduled for a
/// whole time slice at almost every operation: on 2 cores with one busy, 200 steps of the embedded
/// default took 33.2 s with 2 threads and 12.4 s with 1 (9.2 s alone; OMP_WAIT_POLICY=PASSIVE gave 14.7 s
/// busy but 19.4 s alone, GOMP_SPINCOUNT 1000 to 100000 was worse). So by default (--threads 0) the budget
/// measures, after FirstCheck and then every CheckInterval, how many cores other processes keep busy
/// (the machine's busy time minus this process's own, from /proc) and uses the cores that are left, at
/// least one and at most libtorch's default. OMP_NUM_THREADS, as with PyTorch, or an explicit count fixes the number instead. Results
/// can differ in the last bits between thread counts: give a count for runs that must repeat bit for bit.
[<RequireQualifiedAccess>]
module ThreadBudget =

    /// How often the adaptive budget looks at the load again.
    let CheckInterval = TimeSpan.FromSeconds 2.0

    /// When the adaptive budget first looks at the load, after the run started (a busy machine is told
    /// apart within the first steps).
    let FirstCheck = TimeSpan.FromSeconds 0.5

    let private readInt64 (s: string) =
        match Int64.TryParse s with
        | true, v -> Some v
        | _ -> None

    /// Parses /proc/stat and /proc/self/stat; None when a field is missing or not a number.
    let parse (procStat: string) (selfStat: string) : CpuSample option =
        let lines = procStat.Split('\n')
        let cpuLine = lines |> Array.tryFind (fun l -> l.StartsWith "cpu ")
        let cpus = lines |> Array.filter (fun l -> l.StartsWith "cpu" && l.Length > 3 && Char.IsDigit l[3]) |> Array.length
        // After the command name in parentheses: field 3 (state) onwards; utime and stime are fields 14 and 15.
        let afterName = selfStat.Substring(selfStat.LastIndexOf ')' + 1).Split(' ', StringSplitOptions.RemoveEmptyEntries)
        match cpuLine with
        | Some line when cpus > 0 && afterName.Length >= 13 ->
            let fields = line.Split(' ', StringSplitOptions.RemoveEmptyEntries) |> Array.skip 1 |> Array.map readInt64
            match fields |> Array.truncate 8 |> Array.choose id, readInt64 afterName[11], readInt64 afterName[12] with
            | counters, Some utime, Some stime when counters.Length = 8 ->
                // user nice system idle iowait irq softirq steal
                let total = Array.sum counters
                Some
                    { TotalTicks = total
                      BusyTicks = total - counters[3] - counters[4]
                      OwnTicks = utime + stime
                      Cpus = cpus }
            | _ -> None
        | _ -> None

    /// The counters now, or None where /proc is not there.
    let sample () : CpuSample option =
        try parse (File.ReadAllText "/proc/stat") (File.ReadAllText "/proc/self/stat")
        with
        | :? IOException
        | :? UnauthorizedAccessException -> None

    /// The cores other processes kept busy between two samples (0 to Cpus); None when no time passed.
    let othersBusy (before: CpuSample) (after: CpuSample) : float option =
        let total = after.TotalTicks - before.TotalTicks
        if total <= 0L || after.Cpus <> before.Cpus then None
        else
            let wallPerCpu = float total / float after.Cpus
            let others = float (after.BusyTicks - before.BusyTicks - (after.OwnTicks - before.OwnTicks)) / wallPerCpu
            Some(Math.Clamp(others, 0.0, float after.Cpus))

    /// The threads to use when other processes keep `others` of the machine's cores busy: the cores left
    /// over, rounded to the nearest whole core, at least 1 and at most maximum.
    let choose (maximum: int) (cores: int) (others: float) : int =
        Math.Clamp(int (Math.Round(float cores - others, MidpointRounding.AwayFromZero)), 1, max 1 maximum)

    let private defaultThreads = lazy (torch.get_num_threads ())

    let private apply (budget: ThreadBudget) =
        if torch.get_num_threads () <> budget.Threads then torch.set_num_threads budget.Threads
        budget

    let private fixedCount (threads: int) =
        { Maximum = threads; Threads = threads; Adaptive = false; Last = None; Checks = 0 } |> apply

    /// The budget for a run asking for `requested` threads (0: adaptive) and sets libtorch's count.
    /// OMP_NUM_THREADS fixes the count of an adaptive request, as it does for PyTorch. Adapting needs
    /// /proc and a process that may use every CPU the machine has (no affinity mask or CPU quota
    /// narrower than the machine); elsewhere libtorch's default stays.
    let create (requested: int) : ThreadBudget =
        TorchRuntime.ensure ()
        let maximum = defaultThreads.Force()
        if requested > 0 then fixedCount requested
        else
            match Environment.GetEnvironmentVariable "OMP_NUM_THREADS" |> Option.ofObj |> Option.bind readInt64 with
            | Some n when n > 0L -> fixedCount (int n)
            | _ ->
                match sample () with
                | Some s when s.Cpus = Environment.ProcessorCount ->
                    { Maximum = maximum; Threads = maximum; Adaptive = true; Last = Some(s, Stopwatch.GetTimestamp()); Checks = 0 } |> apply
                | _ -> fixedCount maximum

    /// Called between optimizer steps: once FirstCheck (then CheckInterval) has passed since the last decision, an
    /// adaptive budget measures the load again and changes libtorch's count when the cores left over
    /// changed. A fixed budget stays as it is.
    let adjust (budget: ThreadBudget) : ThreadBudget =
        match budget.Last with
        | Some(before, at) when
            budget.Adaptive && Stopwatch.GetElapsedTime at >= (if budget.Checks = 0 then FirstCheck else CheckInterval) ->
            match sample () with
            | Some now ->
                let threads =
                    othersBusy before now
                    |> Option.map (choose budget.Maximum now.Cpus)
                    |> Option.defaultValue budget.Threads
                { budget with Threads = threads; Last = Some(now, Stopwatch.GetTimestamp()); Checks = budget.Checks + 1 } |> apply
            | None -> budget
        | _ -> budget
