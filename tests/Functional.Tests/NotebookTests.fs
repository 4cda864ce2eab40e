/// Runs every Polyglot notebook and F# script of the repository without the .NET Interactive kernel
/// (which cannot be installed here): an F# notebook's code cells, joined in order, through `dotnet fsi`;
/// a C# notebook's code cells as a .NET 10 file-based program (`dotnet run --file`); each
/// notebooks/*.fsx through `dotnet fsi`. Any error fails the notebook's test with the output.
/// The scripts use the Release build of Functional.Core (and Functional for C#), which CI builds first.
module Functional.Tests.NotebookTests

open System
open System.IO
open System.Runtime.InteropServices
open System.Security.Cryptography
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open Expecto
open Functional.Tests.TestUtil
open Functional.Tests.ScriptTests

/// A notebook the runner cannot run, with the reason.
type NotebookRejectedException(message: string) =
    inherit Exception(message)

let private reject (path: string) (problem: string) : 'T =
    raise (NotebookRejectedException(sprintf "%s: %s" path problem))

/// One cell of a notebook.
type Cell =
    { /// "code", "markdown" or "raw".
      Kind: string
      /// The cell's text.
      Source: string
      /// The cell's kernel language (metadata.dotnet_interactive.language, else
      /// metadata.polyglot_notebook.kernelName), when it names one.
      Language: string option
      /// metadata.tags.
      Tags: string list }

/// What the runner reads of an .ipynb file.
type Notebook =
    { /// The file.
      Path: string
      /// nbformat.
      Format: int
      /// metadata.kernelspec.name, e.g. ".net-fsharp".
      KernelSpec: string option
      /// metadata.language_info.name, e.g. "fsharp".
      LanguageInfo: string option
      /// The cells in order.
      Cells: Cell list }

/// The languages the runner runs.
type NotebookLanguage =
    | FSharp
    | CSharp

/// The tag of a cell that only makes sense in the notebook (e.g. showing an image inline): it runs
/// like any other cell, but its .fsx script has no counterpart.
[<Literal>]
let NotebookOnlyTag = "notebook-only"

let private property (names: string list) (element: JsonElement) =
    names
    |> List.fold
        (fun (found: JsonElement option) name ->
            match found with
            | Some e when e.ValueKind = JsonValueKind.Object ->
                match e.TryGetProperty name with
                | true, child -> Some child
                | _ -> None
            | _ -> None)
        (Some element)

let private stringAt (names: string list) (element: JsonElement) =
    match property names element with
    | Some e when e.ValueKind = JsonValueKind.String -> Some(e.GetString())
    | _ -> None

/// A cell's source: nbformat allows one string or a list of lines.
let private sourceText (element: JsonElement option) =
    match element with
    | Some e when e.ValueKind = JsonValueKind.String -> e.GetString()
    | Some e when e.ValueKind = JsonValueKind.Array -> String.Join("", [ for line in e.EnumerateArray() -> line.GetString() ])
    | _ -> ""

/// Reads a notebook's JSON (path is for messages).
let parseNotebook (path: string) (json: string) : Notebook =
    let root =
        try JsonDocument.Parse(json).RootElement
        with :? JsonException as e -> reject path (sprintf "not valid JSON (%s)" e.Message)
    let cells =
        match property [ "cells" ] root with
        | Some cells when cells.ValueKind = JsonValueKind.Array ->
            [ for cell in cells.EnumerateArray() ->
                  { Kind = stringAt [ "cell_type" ] cell |> Option.defaultValue ""
                    Source = sourceText (property [ "source" ] cell)
                    Language =
                      stringAt [ "metadata"; "dotnet_interactive"; "language" ] cell
                      |> Option.orElse (stringAt [ "metadata"; "polyglot_notebook"; "kernelName" ] cell)
                    Tags =
                      match property [ "metadata"; "tags" ] cell with
                      | Some tags when tags.ValueKind = JsonValueKind.Array -> [ for t in tags.EnumerateArray() -> t.GetString() ]
                      | _ -> [] } ]
        | _ -> reject path "no \"cells\" array (expected an nbformat 4 notebook)"
    { Path = path
      Format =
        match property [ "nbformat" ] root with
        | Some v when v.ValueKind = JsonValueKind.Number -> v.GetInt32()
        | _ -> 0
      KernelSpec = stringAt [ "metadata"; "kernelspec"; "name" ] root
      LanguageInfo = stringAt [ "metadata"; "language_info"; "name" ] root
      Cells = cells }

/// The language a kernel name or language name stands for ("fsharp", "F#", ".net-fsharp", ...).
let languageOf (name: string) =
    match name.Trim().ToLowerInvariant() with
    | "fsharp" | "f#" | ".net-fsharp" -> Some FSharp
    | "csharp" | "c#" | ".net-csharp" -> Some CSharp
    | _ -> None

/// The code cells and their one language: each cell's own language, else the notebook's kernel.
/// Rejects a notebook without code cells, with a cell in a language the runner does not run, or
/// mixing F# and C#.
let codeCells (notebook: Notebook) : NotebookLanguage * Cell list =
    let cells = notebook.Cells |> List.filter (fun c -> c.Kind = "code" && not (String.IsNullOrWhiteSpace c.Source))
    if cells.IsEmpty then reject notebook.Path "the notebook has no code cells to run"
    let notebookLanguage = notebook.KernelSpec |> Option.orElse notebook.LanguageInfo
    let languages =
        cells
        |> List.mapi (fun i cell ->
            match cell.Language |> Option.orElse notebookLanguage with
            | None -> reject notebook.Path (sprintf "code cell %d names no kernel language and the notebook has no kernelspec" (i + 1))
            | Some name ->
                match languageOf name with
                | Some language -> language
                | None ->
                    reject notebook.Path
                        (sprintf "code cell %d is in the unknown kernel language \"%s\" (the runner runs fsharp and csharp)" (i + 1) name))
        |> List.distinct
    match languages with
    | [ language ] -> language, cells
    | _ -> reject notebook.Path "the notebook mixes F# and C# code cells; the runner runs one language per notebook"

/// Rejects .NET Interactive magic commands (#!...), which only the kernel understands.
let private rejectMagics (path: string) (cells: Cell list) =
    cells
    |> List.iteri (fun i cell ->
        for line in cell.Source.Split '\n' do
            if line.TrimStart().StartsWith "#!" then
                reject path (sprintf "code cell %d uses the magic command %s, which only the .NET Interactive kernel runs" (i + 1) (line.Trim())))

/// Stand-ins for the display helpers of the .NET Interactive F# kernel, which dotnet fsi lacks.
let private fsharpStandIns =
    """// Stand-ins for the .NET Interactive F# kernel's display helpers, which dotnet fsi lacks.
let HTML (html: string) = html
let display (value: obj) = printfn "display: %s" (let text = string value in if text.Length > 120 then text.Substring(0, 120) + "..." else text)
"""

/// The F# script that runs a notebook's code cells in order under dotnet fsi: the display stand-ins,
/// then each cell after a comment with its number (so an error's line is easy to place).
let fsharpProgram (path: string) (cells: Cell list) : string =
    rejectMagics path cells
    let text = StringBuilder(fsharpStandIns)
    cells |> List.iteri (fun i cell -> text.Append(sprintf "\n// ---- code cell %d ----\n%s\n" (i + 1) cell.Source) |> ignore)
    text.ToString()

let private nugetReference = Regex(@"^\s*#r\s+""nuget:\s*([^,""\s]+)\s*(?:,\s*([^""\s]+))?\s*""\s*$")
let private fileReference = Regex(@"^\s*#r\s+""([^""]+)""\s*$")
let private usingDirective =
    Regex(@"^\s*(global\s+)?using\s+((static\s+)?[A-Za-z_][\w.]*|[A-Za-z_]\w*\s*=\s*[^;]+)\s*;\s*$")

/// Stand-ins for the display helpers of the .NET Interactive C# kernel, which a program lacks.
let private csharpStandIns =
    """
/// <summary>Stand-ins for the .NET Interactive C# kernel's display helpers, which a program lacks.</summary>
static class NotebookStandIns
{
    public static void display(object? value)
    {
        var text = value?.ToString() ?? "null";
        Console.WriteLine("display: " + (text.Length > 120 ? text[..120] + "..." : text));
    }

    public static string HTML(string html) => html;
}
"""

/// The .NET 10 file-based program that runs a C# notebook's code cells in order, built for this
/// machine's runtime identifier: `#r "nuget: Name, Version"` becomes `#:package Name@Version`, `#r "file.dll"` (relative to the notebook's folder)
/// becomes `#:include` of its full path, using directives move to the top, and the rest of every cell
/// follows as top-level statements, each after a comment with its cell number. Other `#r`, `#i`,
/// `#load` and magic commands are rejected.
let csharpProgram (path: string) (cells: Cell list) : string =
    rejectMagics path cells
    let folder = Path.GetDirectoryName(Path.GetFullPath path)
    let directives = ResizeArray<string>()
    let usings = ResizeArray<string>()
    let body = StringBuilder()
    cells
    |> List.iteri (fun i cell ->
        body.Append(sprintf "// ---- code cell %d ----\n" (i + 1)) |> ignore
        for line in cell.Source.Replace("\r\n", "\n").Split '\n' do
            let nuget = nugetReference.Match line
            let file = fileReference.Match line
            if nuget.Success then
                let version = if nuget.Groups[2].Success then nuget.Groups[2].Value else "*"
                directives.Add(sprintf "#:package %s@%s" nuget.Groups[1].Value version)
            elif file.Success then
                directives.Add(sprintf "#:include %s" (Path.GetFullPath(Path.Combine(folder, file.Groups[1].Value))))
            elif Regex.IsMatch(line, @"^\s*#(r|i|load)\b") then
                reject path (sprintf "code cell %d has a directive the runner does not translate: %s" (i + 1) (line.Trim()))
            elif usingDirective.IsMatch line then
                usings.Add(line.Trim())
            else
                body.Append(line).Append('\n') |> ignore)
    let program = StringBuilder()
    program.Append("#!/usr/bin/env dotnet\n") |> ignore
    program.Append("#:property PublishAot=false\n") |> ignore
    // Only this platform's native libraries are copied (TorchSharp-cpu brings libtorch for three).
    program.Append(sprintf "#:property RuntimeIdentifier=%s\n" RuntimeInformation.RuntimeIdentifier) |> ignore
    for d in Seq.distinct directives do program.Append(d).Append('\n') |> ignore
    program.Append(sprintf "// Generated by the notebook tests from %s.\n" path) |> ignore
    for u in Seq.distinct usings do program.Append(u).Append('\n') |> ignore
    program.Append("using static NotebookStandIns;\n\n").Append(body).Append(csharpStandIns) |> ignore
    program.ToString()

/// A run's time limit: far more than any notebook needs, so a hang fails instead of blocking CI.
let private timeLimit = TimeSpan.FromMinutes 10.0

let private fingerprint (text: string) =
    Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes text)).Substring(0, 16).ToLowerInvariant()

/// Runs a notebook (F# or C#) or an F# script with $FUNCTIONAL_NOTEBOOK_OUTPUT set to a fresh temporary
/// folder, in the file's own folder (so relative paths resolve as they do for the notebook).
let run (path: string) : ProcessRun =
    let path = Path.GetFullPath path
    let folder = Path.GetDirectoryName path
    let name = Path.GetFileNameWithoutExtension path
    use output = new TempFolder()
    let environment = [ "FUNCTIONAL_NOTEBOOK_OUTPUT", output.Path ]
    if path.EndsWith ".fsx" then
        runProcess "dotnet" [ "fsi"; path ] folder environment timeLimit
    else
        match codeCells (parseNotebook path (File.ReadAllText path)) with
        | FSharp, cells ->
            // Beside the notebook, so #load "references.fsx" and relative paths resolve as for the notebook.
            let script = Path.Combine(folder, sprintf ".%s.%s.run.fsx" name (Guid.NewGuid().ToString "N"))
            File.WriteAllText(script, fsharpProgram path cells)
            try runProcess "dotnet" [ "fsi"; script ] folder environment timeLimit
            finally File.Delete script
        | CSharp, cells ->
            // Outside the repository (its Directory.Build.props would apply), at a path that stays the same
            // between runs of the same program, so dotnet reuses its build. The path follows the program's
            // text too: dotnet's up-to-date check of a file-based program misses a new #:include.
            let text = csharpProgram path cells
            let programFolder = Path.Combine(Path.GetTempPath(), "functional-notebooks", name + "-" + fingerprint (path + "\n" + text))
            Directory.CreateDirectory programFolder |> ignore
            let program = Path.Combine(programFolder, name + ".cs")
            File.WriteAllText(program, text)
            runProcess "dotnet" [ "run"; "--file"; program ] folder environment timeLimit

/// The cells of a literate F# script: `(**` ... `*)` blocks (each marker on its own line) are markdown
/// cells, the code between them a code cell (blank lines at either end dropped).
let literateCells (script: string) : (string * string) list =
    let cells = ResizeArray<string * string>()
    let code = ResizeArray<string>()
    let mutable markdown: ResizeArray<string> option = None
    let endCode () =
        let text = String.Join("\n", code).Trim('\n')
        if not (String.IsNullOrWhiteSpace text) then cells.Add("code", text)
        code.Clear()
    for line in script.Replace("\r\n", "\n").Split '\n' do
        match markdown with
        | Some block when line.Trim() = "*)" ->
            cells.Add("markdown", String.Join("\n", block).Trim('\n'))
            markdown <- None
        | Some block -> block.Add line
        | None when line.Trim() = "(**" ->
            endCode ()
            markdown <- Some(ResizeArray())
        | None -> code.Add line
    endCode ()
    List.ofSeq cells

// ---- discovery ----

/// notebooks/*.ipynb and *.fsx (not references.fsx, a library, nor hidden files) and the runner's
/// own samples in tests/Functional.Tests/notebook-samples, as paths relative to the root.
let discover (root: string) =
    let inFolder (folder: string) (pattern: string) =
        let full = Path.Combine(root, folder)
        if Directory.Exists full then
            Directory.GetFiles(full, pattern)
            |> Array.map Path.GetFileName
            |> Array.filter (fun f -> not (f.StartsWith ".") && f <> "references.fsx")
            |> Array.sort
            |> Array.map (fun f -> Path.Combine(folder, f))
            |> List.ofArray
        else []
    let samples = Path.Combine("tests", "Functional.Tests", "notebook-samples")
    inFolder "notebooks" "*.ipynb" @ inFolder "notebooks" "*.fsx" @ inFolder samples "*.ipynb" @ inFolder samples "*.fsx"

// ---- tests ----

/// A notebook's JSON from cells given as (kind, language, source); language "" leaves the cell's
/// metadata empty.
let private notebookJson (kernel: string) (cells: (string * string * string) list) =
    let cell (kind: string, language: string, source: string) =
        let metadata = JsonObject()
        if language <> "" then
            metadata["dotnet_interactive"] <- JsonObject(dict [ "language", JsonValue.Create language :> JsonNode ])
            metadata["polyglot_notebook"] <- JsonObject(dict [ "kernelName", JsonValue.Create language :> JsonNode ])
        let lines = source.Split '\n' |> Array.map (fun line -> JsonValue.Create(line + "\n") :> JsonNode)
        JsonObject(
            dict
                [ "cell_type", JsonValue.Create kind :> JsonNode
                  "metadata", metadata
                  "source", JsonArray(lines) ])
        :> JsonNode
    let notebook = JsonObject()
    notebook["cells"] <- JsonArray(cells |> List.map cell |> Array.ofList)
    notebook["metadata"] <- JsonObject(dict [ "kernelspec", JsonObject(dict [ "name", JsonValue.Create kernel :> JsonNode ]) :> JsonNode ])
    notebook["nbformat"] <- JsonValue.Create 4
    notebook.ToJsonString()

let private rejection (action: unit -> 'T) =
    try
        action () |> ignore
        failtest "expected the notebook to be rejected"
    with :? NotebookRejectedException as e -> e.Message

let private unitTests =
    [ test "a notebook without code cells is rejected with a message saying so" {
          let notebook = parseNotebook "empty.ipynb" (notebookJson ".net-fsharp" [ "markdown", "", "# Title" ])
          let message = rejection (fun () -> codeCells notebook)
          Expect.stringContains message "empty.ipynb" "the message names the notebook"
          Expect.stringContains message "no code cells" "and the problem"
      }
      test "a cell in an unknown kernel language is rejected with the language named" {
          let notebook = parseNotebook "python.ipynb" (notebookJson ".net-fsharp" [ "code", "fsharp", "1 + 1"; "code", "pwsh", "Get-Date" ])
          let message = rejection (fun () -> codeCells notebook)
          Expect.stringContains message "code cell 2" "the message names the cell"
          Expect.stringContains message "\"pwsh\"" "and the language"
      }
      test "a cell without language metadata takes the notebook's kernel" {
          let notebook = parseNotebook "plain.ipynb" (notebookJson ".net-csharp" [ "code", "", "var x = 1;" ])
          Expect.equal (fst (codeCells notebook)) CSharp "the kernelspec decides"
      }
      test "a notebook mixing F# and C# cells is rejected" {
          let notebook = parseNotebook "mixed.ipynb" (notebookJson ".net-fsharp" [ "code", "fsharp", "1"; "code", "csharp", "1;" ])
          Expect.stringContains (rejection (fun () -> codeCells notebook)) "mixes F# and C#" "the message says why"
      }
      test "F# cells run in order after the display stand-ins, each marked with its number" {
          let notebook =
              parseNotebook "f.ipynb" (notebookJson ".net-fsharp" [ "code", "fsharp", "let a = 1"; "markdown", "", "text"; "code", "fsharp", "printfn \"%d\" a" ])
          let program = fsharpProgram notebook.Path (snd (codeCells notebook))
          let first = program.IndexOf "// ---- code cell 1 ----\nlet a = 1"
          let second = program.IndexOf "// ---- code cell 2 ----\nprintfn \"%d\" a"
          Expect.isGreaterThan first (program.IndexOf "let HTML") "the stand-ins come first"
          Expect.isGreaterThan second first "cells keep their order; markdown is left out"
      }
      test "C# cells become a file-based program: #r lines turn into directives and using directives move up" {
          let notebook =
              parseNotebook "/repo/notebooks/c.ipynb"
                  (notebookJson ".net-csharp"
                      [ "code", "csharp", "#r \"nuget: TorchSharp-cpu, 0.107.0\"\n#r \"../lib/Functional.dll\"\nusing System.IO;\nusing Functional;\nvar a = 1;"
                        "code", "csharp", "using static System.Math;\nusing var stream = new MemoryStream();\nConsole.WriteLine(Abs(a));" ])
          let program = csharpProgram notebook.Path (snd (codeCells notebook))
          let lines = program.Split '\n' |> List.ofArray
          let index (line: string) =
              match List.tryFindIndex ((=) line) lines with
              | Some i -> i
              | None -> failtestf "the program lacks the line %s:\n%s" line program
          Expect.equal (index "#!/usr/bin/env dotnet") 0 "a file-based program's entry file starts with a shebang"
          let package = index "#:package TorchSharp-cpu@0.107.0"
          let dll = index "#:include /repo/lib/Functional.dll"
          let usings = [ index "using System.IO;"; index "using Functional;"; index "using static System.Math;" ]
          let statements = [ index "var a = 1;"; index "using var stream = new MemoryStream();"; index "Console.WriteLine(Abs(a));" ]
          Expect.isLessThan (max package dll) (List.min usings) "#: directives come before any C# code"
          Expect.isLessThan (List.max usings) (List.min statements) "using directives come before the statements"
          Expect.equal statements (List.sort statements) "statements keep their order (a using declaration stays a statement)"
      }
      test "a magic command is rejected with the cell named" {
          let notebook = parseNotebook "m.ipynb" (notebookJson ".net-csharp" [ "code", "csharp", "var a = 1;"; "code", "csharp", "#!time\nvar b = 2;" ])
          let message = rejection (fun () -> csharpProgram notebook.Path (snd (codeCells notebook)))
          Expect.stringContains message "code cell 2" "the cell"
          Expect.stringContains message "#!time" "and the command"
      }
      test "a literate script splits into markdown and code cells" {
          let script = "(**\n# Title\n*)\n#load \"references.fsx\"\n\nlet a = 1\n\n(**\ntext\n*)\nprintfn \"%d\" a\n"
          Expect.equal
              (literateCells script)
              [ "markdown", "# Title"; "code", "#load \"references.fsx\"\n\nlet a = 1"; "markdown", "text"; "code", "printfn \"%d\" a" ]
              "cells in order"
      } ]

let private failingRuns =
    [ test "an F# notebook whose cell throws fails its run, with the error in the output" {
          use folder = new TempFolder()
          let path = folder.File "throws.ipynb"
          File.WriteAllText(path, notebookJson ".net-fsharp" [ "code", "fsharp", "printfn \"first cell\""; "code", "fsharp", "failwith \"raised by cell 2\" |> ignore" ])
          let result = run path
          Expect.notEqual result.ExitCode 0 "the run fails"
          Expect.stringContains (describe result) "raised by cell 2" "the message holds the cell's error"
          Expect.isEmpty (Directory.GetFiles(folder.Path, "*.run.fsx")) "the temporary script is removed"
      }
      test "a C# notebook that does not compile fails its run, with the compiler's error" {
          use folder = new TempFolder()
          let path = folder.File "broken.ipynb"
          File.WriteAllText(path, notebookJson ".net-csharp" [ "code", "csharp", "using System;\nint count = \"not a number\";" ])
          let result = run path
          Expect.notEqual result.ExitCode 0 "the run fails"
          Expect.stringContains (describe result) "CS0029" "the message holds the compiler's error"
      } ]

/// Kernel metadata: the kernelspec and language_info of the notebook's language, and every code cell
/// naming it in metadata.dotnet_interactive.language and metadata.polyglot_notebook.kernelName.
let private metadataProblems (notebook: Notebook) =
    let language = notebook.KernelSpec |> Option.bind languageOf
    [ if notebook.Format <> 4 then yield sprintf "nbformat is %d, expected 4" notebook.Format
      match notebook.KernelSpec, language with
      | Some _, Some language ->
          let expected = if language = FSharp then "fsharp" else "csharp"
          if notebook.LanguageInfo <> Some expected then
              yield sprintf "metadata.language_info.name is %A, expected \"%s\"" notebook.LanguageInfo expected
      | spec, _ -> yield sprintf "metadata.kernelspec.name is %A, expected \".net-fsharp\" or \".net-csharp\"" spec
      let json = JsonDocument.Parse(File.ReadAllText notebook.Path).RootElement
      let cells = json.GetProperty("cells").EnumerateArray() |> List.ofSeq
      for i, cell in List.indexed cells do
          if stringAt [ "cell_type" ] cell = Some "code" then
              let kernel = stringAt [ "metadata"; "polyglot_notebook"; "kernelName" ] cell
              let dotnet = stringAt [ "metadata"; "dotnet_interactive"; "language" ] cell
              let expected = language |> Option.map (fun l -> if l = FSharp then "fsharp" else "csharp")
              if kernel.IsNone || kernel <> expected || dotnet <> expected then
                  yield
                      sprintf "cell %d: polyglot_notebook.kernelName %A and dotnet_interactive.language %A, expected %A" (i + 1) kernel dotnet expected ]

[<Tests>]
let tests =
    match (try Ok(repositoryRoot ()) with e -> Error e.Message) with
    | Error problem -> testList "notebooks" [ test "the repository is found" { failtest problem } ]
    | Ok root ->
        let files = discover root
        let notebooks = files |> List.filter (fun f -> f.EndsWith ".ipynb")
        testList "notebooks" [
            yield! unitTests
            yield testSequenced (testList "failing runs" failingRuns)
            yield test "every notebook has the .NET Interactive kernel metadata" {
                Expect.isNonEmpty notebooks "notebooks are found"
                let problems =
                    [ for file in notebooks do
                          for problem in metadataProblems (parseNotebook (Path.Combine(root, file)) (File.ReadAllText(Path.Combine(root, file)))) ->
                              file + ": " + problem ]
                Expect.isEmpty problems "kernel metadata"
            }
            yield test "every F# notebook in notebooks/ has a .fsx script holding the same cells" {
                let fsharpNotebooks =
                    notebooks
                    |> List.filter (fun f -> f.StartsWith "notebooks")
                    |> List.map (fun f -> f, parseNotebook (Path.Combine(root, f)) (File.ReadAllText(Path.Combine(root, f))))
                    |> List.filter (fun (_, nb) -> nb.KernelSpec |> Option.bind languageOf = Some FSharp)
                Expect.isNonEmpty fsharpNotebooks "F# notebooks are found"
                for file, notebook in fsharpNotebooks do
                    let script = Path.ChangeExtension(Path.Combine(root, file), ".fsx")
                    Expect.isTrue (File.Exists script) (sprintf "%s has a script %s" file script)
                    let fromNotebook =
                        notebook.Cells
                        |> List.filter (fun c -> not (List.contains NotebookOnlyTag c.Tags))
                        |> List.map (fun c -> c.Kind, c.Source.Replace("\r\n", "\n").Trim('\n'))
                    Expect.sequenceEqual fromNotebook (literateCells (File.ReadAllText script)) (sprintf "%s and its script hold the same cells" file)
            }
            yield
                testSequenced (
                    testList "run" [
                        for file in files ->
                            test (sprintf "%s runs without error" (file.Replace('\\', '/'))) {
                                expectSuccess (run (Path.Combine(root, file)))
                            }
                    ]
                )
        ]
