module Functional.Tests.Program

open System
open Expecto
open Expecto.Impl

/// Runs every [<Tests>] value in this assembly. After Expecto's own summary it prints one plain
/// line, "tests: N passed, N failed, N skipped", that CI reads.
[<EntryPoint>]
let main argv =
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
    let exitCode =
        runTestsInAssemblyWithCLIArgs
            [ CLIArguments.Printer { printer with summary = summary }; CLIArguments.No_Spinner ]
            argv
    match counts with
    | Some(passed, failed, skipped) ->
        // Written to the raw stream: Expecto's console writer pads lines for its progress display.
        Console.Out.Flush()
        use stdout = Console.OpenStandardOutput()
        let line = sprintf "\ntests: %d passed, %d failed, %d skipped\n" passed failed skipped
        stdout.Write(Text.Encoding.UTF8.GetBytes line)
    | None -> ()
    exitCode
