// References for the F# scripts and notebooks of this folder, which use the library built from this
// repository:
//   #load "references.fsx"
// Build the library first: dotnet build core-fs/Functional.Demo -c Release (the core, and the embedded
// demo's task and model, which lora-and-generation uses).
// The library's own package dependencies are listed here so that dotnet fsi (and the .NET Interactive
// F# kernel) resolve them.
#r "nuget: TorchSharp-cpu, 0.107.0"
#r "nuget: Microsoft.ML.Tokenizers, 2.0.1"
#r "nuget: Microsoft.ML.Tokenizers.Data.Cl100kBase, 2.0.1"
#r "nuget: Microsoft.ML.Tokenizers.Data.O200kBase, 2.0.1"
#r "nuget: ScottPlot, 5.1.59"
#r "../core-fs/Functional.Core/bin/Release/net10.0/Functional.Core.dll"
#r "../core-fs/Functional.Reporting/bin/Release/net10.0/Functional.Reporting.dll"
#r "../core-fs/Functional.Demo/bin/Release/net10.0/Functional.Demo.dll"

// Start TorchSharp's native libraries now (on systems with an older libstdc++ this loads a patched copy
// of libLibTorchSharp.so first), so that any first cell may touch torch directly, before any call into
// the library does it.
Functional.Runtime.TorchRuntime.ensure ()

/// The repository's folders that scripts and notebooks read from and write to.
[<RequireQualifiedAccess>]
module Repository =

    open System
    open System.IO

    /// The repository root (the parent of this folder).
    let root = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, ".."))

    /// A small PyTorch-made test case: tests/golden/NAME (model/ and data.jsonl).
    let golden (name: string) = Path.Combine(root, "tests", "golden", name)

    /// The folder a script or notebook writes into: runs/notebooks/NAME, or
    /// $FUNCTIONAL_NOTEBOOK_OUTPUT/NAME when that variable is set (the notebook tests set it to a
    /// temporary folder). The folder is created when missing.
    let output (name: string) =
        let parent =
            match Environment.GetEnvironmentVariable "FUNCTIONAL_NOTEBOOK_OUTPUT" with
            | null | "" -> Path.Combine(root, "runs", "notebooks")
            | folder -> folder
        Directory.CreateDirectory(Path.Combine(parent, name)).FullName
