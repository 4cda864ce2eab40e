(**
# Data-parallel training on two processes

The same fine-tuning job twice: once on **two processes** started by Open MPI's `mpirun`, each with a
per-device batch of 2 rows, and once as **one process** with a batch of 4 rows. Process r of 2 reads rows
r, r + 2, ... of every epoch's order (torch's DistributedSampler), so each optimizer step of the two
processes trains on exactly the 4 rows the single process trains on: the same global batch, hence the same
losses, gradients and weights, up to the order of floating-point sums.

Both runs pass `--log-each-rank`: besides `metrics.jsonl` (written by process 0, with the loss over all
processes), every process writes `metrics-rank-R.jsonl` with its own loss over its own rows and their token
count. The chart shows both ranks' losses against the one process's loss.

It runs the command line as `mpirun` does in production (docs/distributed.md), on the tiny LLaMA of
`tests/golden/llama-cosine` (2 layers, width 32): about a minute on 2 cores. Build first
(`dotnet build Functional.sln -c Release`) and install Open MPI (`sh tools/install-mpi.sh`). The same code
runs as a script: `dotnet fsi notebooks/distributed-data-parallel.fsx`.
*)
#load "references.fsx"

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open References

let output = Repository.output "distributed-data-parallel"

// The command line built from this repository, and Open MPI's launcher.
let cli = Path.Combine(Repository.root, "facade-cs", "Functional.Cli", "bin", "Release", "net10.0", "Functional.Cli.dll")
if not (File.Exists cli) then
    failwithf "%s is missing: build first (dotnet build Functional.sln -c Release in %s)" cli Repository.root

let mpirun =
    (Environment.GetEnvironmentVariable "PATH" |> Option.ofObj |> Option.defaultValue "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
    |> Array.map (fun folder -> Path.Combine(folder, "mpirun"))
    |> Array.tryFind File.Exists
    |> Option.defaultWith (fun () ->
        failwith "mpirun (Open MPI) was not found on PATH: install it with sh tools/install-mpi.sh (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)")

printfn "command line: %s" cli
printfn "launcher:     %s" mpirun

(**
## The job

The golden LLaMA and the first 12 of its pre-tokenized rows (lengths 8 to 38): a multiple of the global
batch of 4, so the sampler repeats no row to even out the processes and every step holds 4 whole rows.
30 optimizer steps (10 epochs, reshuffled each epoch from the seed), a cosine schedule with 3 warmup steps,
weight decay and clipping. No checkpoints and no TensorBoard events: only the metrics matter here.
*)
let sample = Repository.golden "llama-cosine"
let data = Path.Combine(output, "data.jsonl")
File.WriteAllLines(data, File.ReadAllLines(Path.Combine(sample, "data.jsonl")) |> Array.take 12)

/// The arguments of `functional train` into OUTPUT/name with a per-process batch.
let trainArgs (name: string) (batch: int) =
    [ "train"; "--model"; Path.Combine(sample, "model"); "--data"; data; "--output"; Path.Combine(output, name)
      "--overwrite-output-dir"; "--per-device-train-batch-size"; string batch; "--max-steps"; "30"; "--max-seq-len"; "40"
      "--learning-rate"; "3e-3"; "--lr-scheduler-type"; "cosine"; "--num-warmup-steps"; "3"; "--weight-decay"; "0.1"
      "--max-grad-norm"; "0.5"; "--save-strategy"; "no"; "--report-to"; "none"; "--log-each-rank" ]

(**
## Launch

Two processes: `mpirun -np 2 --oversubscribe -x OMP_NUM_THREADS=1 dotnet Functional.Cli.dll train ...`
(`--oversubscribe` lets 2 processes share fewer cores; one intra-op thread each, so they do not fight over
the cores), plus Open MPI's two `OMPI_ALLOW_RUN_AS_ROOT` variables when running as root, as in
docs/distributed.md. `functional launch -n 2 -- train ...` does the same. The single process runs
`dotnet Functional.Cli.dll train ...` with one thread too.
*)
/// Runs `functional train` on `processes` processes (1: a plain process) and returns its standard output;
/// fails with everything it printed when it exits with another code than 0.
let train (processes: int) (args: string list) =
    let launcher, launch =
        if processes = 1 then "dotnet", [ cli ]
        else mpirun, [ "-np"; string processes; "--oversubscribe"; "-x"; "OMP_NUM_THREADS=1"; "dotnet"; cli ]
    let info = ProcessStartInfo(launcher, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    for a in launch @ args do info.ArgumentList.Add a
    info.Environment["OMP_NUM_THREADS"] <- "1"
    // Open MPI 4 prints terminal control codes unless TERM says there is no terminal.
    info.Environment["TERM"] <- "dumb"
    if Environment.IsPrivilegedProcess then
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT"] <- "1"
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] <- "1"
    let clock = Stopwatch.StartNew()
    use p = Process.Start info
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    if p.ExitCode <> 0 then
        failwithf "%s %s exited with %d\n%s\n%s" launcher (String.Join(" ", launch @ args)) p.ExitCode stdout.Result stderr.Result
    printfn "%d process(es): %.1f s" processes clock.Elapsed.TotalSeconds
    stdout.Result

let twoOut = train 2 (trainArgs "two-processes" 2)
let oneOut = train 1 (trainArgs "one-process" 4)

// Process 0 speaks for the run: its report ends with the metrics line.
for line in twoOut.Split('\n') do
    if line.StartsWith "metrics: " then printfn "two processes, %s" line

(**
## The metrics

`metrics.jsonl` holds one line per step with the global loss (every process's summed token losses / the
window's tokens over all processes) and `num_tokens`; `metrics-rank-R.jsonl` holds each rank's own loss and
tokens. For every step the ranks' figures add up to the global ones:
sum over r of loss_r * num_tokens_r / num_tokens = loss.
*)
/// One logged step: the step, its loss and its predicted tokens.
type Logged = { Step: int; Loss: float; Tokens: int64 }

/// The step lines of a metrics file (those with a "loss"; the summary line has train_loss instead).
let readSteps (path: string) =
    [ for line in File.ReadAllLines path do
          use json = JsonDocument.Parse line
          let root = json.RootElement
          match root.TryGetProperty "loss" with
          | true, loss -> yield { Step = root.GetProperty("step").GetInt32(); Loss = loss.GetDouble(); Tokens = root.GetProperty("num_tokens").GetInt64() }
          | _ -> () ]

let twoGlobal = readSteps (Path.Combine(output, "two-processes", "metrics.jsonl"))
let ranks = [ for r in 0 .. 1 -> readSteps (Path.Combine(output, "two-processes", Functional.Training.RunLog.rankFileName r)) ]
let single = readSteps (Path.Combine(output, "one-process", "metrics.jsonl"))
let singleRank = readSteps (Path.Combine(output, "one-process", Functional.Training.RunLog.rankFileName 0))

let relative (a: float) (b: float) = abs (a - b) / max (abs b) 1e-12

/// A small number in scientific notation, e.g. 1.48e-7.
let sci (x: float) = x.ToString("0.00e+0", Globalization.CultureInfo.InvariantCulture)

printfn "step  rank 0 loss (tokens)  rank 1 loss (tokens)  2 processes  1 process   rel. diff"
for i, g in List.indexed twoGlobal do
    let r0, r1, s = ranks[0][i], ranks[1][i], single[i]
    if g.Step % 3 = 0 || g.Step = 1 then
        printfn "%4d  %10.6f (%4d)     %10.6f (%4d)     %10.6f  %10.6f  %s" g.Step r0.Loss r0.Tokens r1.Loss r1.Tokens g.Loss s.Loss (sci (relative g.Loss s.Loss))

(**
## Do the two runs agree?

The largest relative difference of the global loss between the two processes and the one process over
all 30 steps (they differ only in the order of floating-point sums: expect about 1e-6 or less), and how
closely the ranks' own losses add up to the global one. With one process, `metrics-rank-0.jsonl` holds
the run's own loss and tokens.
*)
let largestDifference = List.map2 (fun (g: Logged) (s: Logged) -> relative g.Loss s.Loss) twoGlobal single |> List.max

let identityError =
    twoGlobal
    |> List.mapi (fun i g ->
        let parts = [ ranks[0][i]; ranks[1][i] ]
        if parts |> List.sumBy (fun p -> p.Tokens) <> g.Tokens then failwithf "step %d: the ranks' tokens do not add up" g.Step
        relative ((parts |> List.sumBy (fun p -> p.Loss * float p.Tokens)) / float g.Tokens) g.Loss)
    |> List.max

printfn "steps: %d with 2 processes, %d with 1" twoGlobal.Length single.Length
printfn "largest relative difference of the global loss, 2 processes vs 1: %s" (sci largestDifference)
printfn "largest relative error of sum(rank loss * rank tokens) / tokens vs the global loss: %s" (sci identityError)
printfn "one process: metrics-rank-0.jsonl equals metrics.jsonl: %b" (singleRank = single)
if largestDifference > 1e-5 then failwithf "the two runs differ: %g" largestDifference

(**
## Plot

Each rank's own loss (its 2 rows of every step) moves around the global loss, since the ranks see different
rows; the global loss of the two processes lies on the one process's loss.
*)
let chartPath = Path.Combine(output, "losses.png")

let steps (logged: Logged list) = [| for l in logged -> float l.Step |]
let chart = new ScottPlot.Plot()
for r in 0 .. 1 do
    let line = chart.Add.Scatter(steps ranks[r], [| for l in ranks[r] -> l.Loss |])
    line.LegendText <- sprintf "rank %d's own loss (2 processes)" r
    line.LineWidth <- 1.5f
    line.MarkerSize <- 4.0f
let globalLine = chart.Add.Scatter(steps twoGlobal, [| for l in twoGlobal -> l.Loss |])
globalLine.LegendText <- "global loss, 2 processes (metrics.jsonl)"
globalLine.LineWidth <- 3.0f
globalLine.MarkerSize <- 0.0f
let singleLine = chart.Add.Scatter(steps single, [| for l in single -> l.Loss |])
singleLine.LegendText <- "loss, 1 process with batch 4"
singleLine.LineWidth <- 0.0f
singleLine.MarkerSize <- 8.0f
singleLine.MarkerShape <- ScottPlot.MarkerShape.OpenCircle
chart.Title(sprintf "2 processes x batch 2 vs 1 process x batch 4 (largest relative difference %s)" (sci largestDifference))
chart.XLabel "optimizer step"
chart.YLabel "training loss"
chart.ShowLegend(ScottPlot.Alignment.UpperRight) |> ignore
chart.SavePng(chartPath, 900, 500) |> ignore
printfn "chart saved to %s" chartPath
