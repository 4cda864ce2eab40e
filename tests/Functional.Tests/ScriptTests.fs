/// Running the repository's scripts and tools as child processes: the helpers the notebook and package
/// tests share, and the tests that pin how a failure is reported.
module Functional.Tests.ScriptTests

open System
open System.Diagnostics
open System.IO
open Expecto
open Functional.Tests.TestUtil

/// The repository root: the first folder above the test binary that holds Functional.sln.
let repositoryRoot () =
    let rec up (dir: DirectoryInfo) =
        if isNull dir then failwith "Functional.sln not found above the test binary"
        elif File.Exists(Path.Combine(dir.FullName, "Functional.sln")) then dir.FullName
        else up dir.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// What a finished child process printed.
type ProcessRun =
    { /// The command line, for messages.
      CommandLine: string
      /// The exit code (-1 when the process was killed for running too long).
      ExitCode: int
      /// Everything it wrote to stdout.
      Stdout: string
      /// Everything it wrote to stderr.
      Stderr: string
      /// Whether it was killed at the time limit.
      TimedOut: bool
      /// Wall-clock seconds.
      Seconds: float }

/// Runs program with arguments in workingDirectory, with extra environment variables, and waits at most
/// timeout; a process still running then is killed with its children. Builds it starts leave no
/// MSBuild or compiler server running behind them.
let runProcess (program: string) (arguments: string list) (workingDirectory: string) (environment: (string * string) list) (timeout: TimeSpan) =
    let info =
        ProcessStartInfo(
            program,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory)
    for a in arguments do info.ArgumentList.Add a
    let quiet =
        [ "DOTNET_CLI_TELEMETRY_OPTOUT", "1"
          "DOTNET_NOLOGO", "1"
          "MSBUILDDISABLENODEREUSE", "1"
          "DOTNET_CLI_USE_MSBUILD_SERVER", "0"
          "UseSharedCompilation", "false" ]
    for name, value in quiet @ environment do
        info.Environment[name] <- value
    let clock = Stopwatch.StartNew()
    use p = Process.Start info
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    let finished = p.WaitForExit(int timeout.TotalMilliseconds)
    if not finished then p.Kill true
    p.WaitForExit()
    { CommandLine = String.Join(" ", program :: arguments)
      ExitCode = if finished then p.ExitCode else -1
      Stdout = stdout.Result
      Stderr = stderr.Result
      TimedOut = not finished
      Seconds = clock.Elapsed.TotalSeconds }

/// The last maxLength characters of a text (what a failure message shows of a long output).
let tail (maxLength: int) (text: string) =
    if text.Length <= maxLength then text else "..." + text.Substring(text.Length - maxLength)

/// A failure message for a run: the command, exit code or time-out, and the end of both outputs.
let describe (run: ProcessRun) =
    sprintf "%s %s after %.0f s\n--- stdout ---\n%s\n--- stderr ---\n%s"
        run.CommandLine
        (if run.TimedOut then "timed out" else sprintf "exited with %d" run.ExitCode)
        run.Seconds
        (tail 6000 run.Stdout)
        (tail 6000 run.Stderr)

/// Fails the test unless the run exited with 0.
let expectSuccess (run: ProcessRun) =
    if run.TimedOut || run.ExitCode <> 0 then failtest (describe run)

[<Tests>]
let tests =
    testList "scripts" [
        test "a script that throws under dotnet fsi is reported with its exit code and its error" {
            use folder = new TempFolder()
            let script = folder.File "throws.fsx"
            File.WriteAllLines(script, [ "printfn \"before the error\""; "failwith \"the script's own error\" |> ignore" ])
            let run = runProcess "dotnet" [ "fsi"; script ] folder.Path [] (TimeSpan.FromMinutes 2.0)
            Expect.notEqual run.ExitCode 0 "dotnet fsi exits with a non-zero code"
            let message = describe run
            Expect.stringContains message "the script's own error" "the failure message holds the script's error"
            Expect.stringContains message "before the error" "and what it printed before"
        }
    ]
