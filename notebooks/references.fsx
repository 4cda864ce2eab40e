// References for F# scripts and notebooks that use the library built from this repository:
//   #load "references.fsx"
// Build the library first: dotnet build core-fs/Functional.Core -c Release
// The library's own package dependencies are listed here so that dotnet fsi resolves them.
#r "nuget: TorchSharp-cpu, 0.107.0"
#r "nuget: Microsoft.ML.Tokenizers, 2.0.1"
#r "nuget: Microsoft.ML.Tokenizers.Data.Cl100kBase, 2.0.1"
#r "nuget: Microsoft.ML.Tokenizers.Data.O200kBase, 2.0.1"
#r "nuget: ScottPlot, 5.1.59"
#r "../core-fs/Functional.Core/bin/Release/net10.0/Functional.Core.dll"
