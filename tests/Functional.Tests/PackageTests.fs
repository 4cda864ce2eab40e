/// The NuGet packages: `dotnet pack` of Functional.Core, Functional and the `functional` .NET tool
/// (Functional.Tool, packed for linux-x64 with libtorch inside), their contents, and the tool installed
/// from the local package folder into a temporary tool path, then run.
/// Needs the Release build of the solution (CI builds it first): the libraries are packed with
/// --no-build, the tool's linux-x64 build is made by its pack.
module Functional.Tests.PackageTests

open System
open System.IO
open System.IO.Compression
open System.Text.RegularExpressions
open Expecto
open Functional.Tests.ScriptTests

/// What packing produced.
type private Packed =
    { /// The folder holding the packages, the NuGet config and (later) the installed tool.
      Folder: string
      /// The packages, by file name.
      Packages: string list
      /// The package version (from the produced file names).
      Version: string }

let private timeLimit = TimeSpan.FromMinutes 10.0

/// Packs the three projects once into a temporary folder, deleted when the test process exits.
let private packed =
    lazy
        (let root = repositoryRoot ()
         let folder = Path.Combine(Path.GetTempPath(), "functional-tests", "packages-" + Guid.NewGuid().ToString "N")
         let packages = Path.Combine(folder, "packages")
         Directory.CreateDirectory packages |> ignore
         AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> try Directory.Delete(folder, true) with _ -> ())
         let pack (project: string) (extra: string list) =
             runProcess "dotnet" ([ "pack"; project; "-c"; "Release"; "--no-restore"; "-o"; packages ] @ extra) root [] timeLimit
         expectSuccess (pack "core-fs/Functional.Core" [ "--no-build" ])
         expectSuccess (pack "core-fs/Functional.Reporting" [ "--no-build" ])
         expectSuccess (pack "facade-cs/Functional" [ "--no-build" ])
         // The tool's linux-x64 build is made here; the libraries it references are used as built.
         expectSuccess (pack "facade-cs/Functional.Cli" [ "-p:BuildProjectReferences=false" ])
         let names = Directory.GetFiles packages |> Array.map Path.GetFileName |> Array.sort |> List.ofArray
         let version =
             names
             |> List.tryPick (fun n ->
                 let m = Regex.Match(n, @"^Functional\.Core\.(\d.*)\.nupkg$")
                 if m.Success then Some m.Groups[1].Value else None)
             |> Option.defaultWith (fun () -> failtestf "no Functional.Core package among %A" names)
         { Folder = folder; Packages = names; Version = version })

/// The entry names of a package.
let private entries (path: string) =
    use zip = ZipFile.OpenRead path
    [ for e in zip.Entries -> e.FullName ]

/// The text of a package's .nuspec.
let private nuspec (path: string) =
    use zip = ZipFile.OpenRead path
    let entry = zip.Entries |> Seq.find (fun e -> e.FullName.EndsWith ".nuspec")
    use reader = new StreamReader(entry.Open())
    reader.ReadToEnd()

[<Tests>]
let tests =
    testSequenced (
        testList "packages" [
            test "dotnet pack makes Functional.Core, Functional and Functional.Tool with README, license, XML docs and symbols" {
                let p = packed.Force()
                let file (name: string) =
                    let path = Path.Combine(p.Folder, "packages", sprintf "%s.%s.nupkg" name p.Version)
                    Expect.isTrue (File.Exists path) (sprintf "%s is packed (found %A)" path p.Packages)
                    path
                let hasMetadata (name: string) =
                    let path = file name
                    let content = entries path
                    Expect.contains content "README.md" (name + " holds the README")
                    Expect.contains content "LICENSE" (name + " holds the license text")
                    let spec = nuspec path
                    Expect.stringContains spec "<license type=\"expression\">MIT</license>" (name + " declares the MIT license")
                    Expect.stringContains spec "<readme>README.md</readme>" (name + " names its README")
                    content
                for library in [ "Functional.Core"; "Functional" ] do
                    let content = hasMetadata library
                    Expect.contains content (sprintf "lib/net10.0/%s.dll" library) (library + " holds the assembly")
                    Expect.contains content (sprintf "lib/net10.0/%s.xml" library) (library + " holds the XML docs")
                    Expect.contains p.Packages (sprintf "%s.%s.snupkg" library p.Version) (library + " has a symbol package")
                Expect.stringContains (nuspec (file "Functional")) "<dependency id=\"Functional.Core\"" "Functional depends on Functional.Core"
                let pointer = hasMetadata "Functional.Tool"
                Expect.contains pointer "tools/any/any/DotnetToolSettings.xml" "Functional.Tool is a tool package"
                let tool = hasMetadata "Functional.Tool.linux-x64"
                for binary in [ "Functional.Cli.dll"; "Functional.Core.dll"; "Functional.Demo.dll"; "Functional.Benchmarks.dll"; "TorchSharp.dll"; "libLibTorchSharp.so"; "libtorch_cpu.so" ] do
                    Expect.contains tool ("tools/net10.0/linux-x64/" + binary) (sprintf "the linux-x64 tool bundles %s" binary)
                Expect.isFalse (tool |> List.exists (fun e -> e.Contains "osx" || e.Contains "win-x64")) "no other platform's libraries"
                Expect.contains p.Packages (sprintf "Functional.Tool.linux-x64.%s.snupkg" p.Version) "the tool has a symbol package"
            }
            test "the tool installs from the local packages into a tool path and runs --help and a two-step training" {
                let p = packed.Force()
                let root = repositoryRoot ()
                // Only the local folder: the tool package carries all it needs, and no feed can shadow it.
                let config = Path.Combine(p.Folder, "nuget.config")
                File.WriteAllText(
                    config,
                    sprintf
                        """<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <clear />
    <add key="local" value="%s" />
  </packageSources>
</configuration>"""
                        (Path.Combine(p.Folder, "packages")))
                let tools = Path.Combine(p.Folder, "tools")
                let install =
                    runProcess "dotnet" [ "tool"; "install"; "--tool-path"; tools; "--configfile"; config; "Functional.Tool"; "--version"; p.Version ] p.Folder [] timeLimit
                expectSuccess install
                let functional = Path.Combine(tools, "functional")
                let help = runProcess functional [ "--help" ] p.Folder [] timeLimit
                expectSuccess help
                Expect.stringContains help.Stdout "train" "the help lists the train command"
                let golden = Path.Combine(root, "tests", "golden", "llama-cosine")
                let output = Path.Combine(p.Folder, "run")
                let train =
                    runProcess
                        functional
                        [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl")
                          "--output"; output; "--max-steps"; "2"; "--per-device-train-batch-size"; "2"; "--max-seq-len"; "32" ]
                        p.Folder [] timeLimit
                expectSuccess train
                Expect.isTrue (File.Exists(Path.Combine(output, "final", "model.safetensors"))) "the run wrote final/model.safetensors"
                Expect.isTrue (File.Exists(Path.Combine(output, "metrics.jsonl"))) "and metrics.jsonl"
            }
        ]
    )
