/// F# scripts that reference the built library run under `dotnet fsi` (TorchSharp starts there too).
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

[<Tests>]
let tests =
    testList "scripts" [
        test "notebooks/fine-tune.fsx trains and saves a model through dotnet fsi" {
            use output = new TempFolder()
            let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
            for a in [ "fsi"; Path.Combine(repositoryRoot (), "notebooks", "fine-tune.fsx"); output.File "run" ] do
                info.ArgumentList.Add a
            use p = Process.Start info
            let stdout = p.StandardOutput.ReadToEndAsync()
            let stderr = p.StandardError.ReadToEndAsync()
            p.WaitForExit()
            Expect.equal p.ExitCode 0 (sprintf "dotnet fsi exit code (stdout: %s, stderr: %s)" stdout.Result stderr.Result)
            Expect.stringContains stdout.Result "step 10/10" "the script trained ten steps"
            Expect.isTrue (File.Exists(output.File "run/final/model.safetensors")) "the script saved the model"
        }
    ]
