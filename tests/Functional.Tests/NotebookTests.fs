/// Checks the repository's Polyglot notebooks and F# scripts: every notebook runs in the real .NET
/// Interactive kernel (NotebookKernel: `dotnet interactive stdio`, the local tool pinned in
/// .config/dotnet-tools.json), cell by cell, and fails on its first failing cell with the notebook, the
/// cell and the error; every notebooks/*.fsx runs under `dotnet fsi`. Notebooks carry nbformat 4.5 cell
/// ids and the kernel metadata, and each F# notebook holds the same cells as its script.
/// The notebooks use the Release build of the library, which CI builds first.
module Functional.Tests.NotebookTests

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open Expecto
open Functional.Tests.TestUtil
open Functional.Tests.ScriptTests

/// A notebook this repository does not accept (before the kernel runs it), with the reason.
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

/// What the checks read of an .ipynb file.
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

/// The languages of this repository's notebooks.
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
/// Rejects a notebook without code cells, with a cell in another language than F# and C#, or
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
                        (sprintf "code cell %d is in the unknown kernel language \"%s\" (this repository's notebooks use fsharp or csharp)" (i + 1) name))
        |> List.distinct
    match languages with
    | [ language ] -> language, cells
    | _ -> reject notebook.Path "the notebook mixes F# and C# code cells; this repository's notebooks use one language each (their metadata and .fsx twins assume it)"

/// A run's time limit: far more than any notebook needs, so a hang fails instead of blocking CI.
let private timeLimit = TimeSpan.FromMinutes 10.0

/// Runs an F# script under `dotnet fsi` with $FUNCTIONAL_NOTEBOOK_OUTPUT set to a fresh temporary folder,
/// in the script's own folder (so relative paths resolve as they do for the notebook).
let runScript (path: string) : ProcessRun =
    let path = Path.GetFullPath path
    use output = new TempFolder()
    runProcess "dotnet" [ "fsi"; path ] (Path.GetDirectoryName path) [ "FUNCTIONAL_NOTEBOOK_OUTPUT", output.Path ] timeLimit

/// Runs a notebook in the real .NET Interactive kernel (NotebookKernel.runNotebook) with
/// $FUNCTIONAL_NOTEBOOK_OUTPUT set to a fresh temporary folder.
let runInKernel (root: string) (path: string) : NotebookKernel.NotebookRun =
    use output = new TempFolder()
    NotebookKernel.runNotebook root path [ "FUNCTIONAL_NOTEBOOK_OUTPUT", output.Path ]

/// Fails the test with the notebook, cell and error of a failed kernel run (and the end of what the
/// kernel wrote to stderr), or with the compiler warnings of its cells.
let expectKernelSuccess (run: NotebookKernel.NotebookRun) =
    match run.Failure with
    | Some failure -> failtestf "%s\n--- kernel stderr ---\n%s" failure (tail 4000 run.KernelStderr)
    | None ->
        let warnings =
            [ for cell in run.Cells do
                  for w in cell.Warnings -> sprintf "%s cell %d: %s" (Path.GetFileName run.Path) cell.Number w ]
        Expect.isEmpty warnings "the notebook's cells compile without warnings"

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
    let cell (index: int) (kind: string, language: string, source: string) =
        let metadata = JsonObject()
        if language <> "" then
            metadata["dotnet_interactive"] <- JsonObject(dict [ "language", JsonValue.Create language :> JsonNode ])
            metadata["polyglot_notebook"] <- JsonObject(dict [ "kernelName", JsonValue.Create language :> JsonNode ])
        let lines = source.Split '\n' |> Array.map (fun line -> JsonValue.Create(line + "\n") :> JsonNode)
        JsonObject(
            dict
                [ "cell_type", JsonValue.Create kind :> JsonNode
                  "id", JsonValue.Create(sprintf "cell-%d" (index + 1))
                  "metadata", metadata
                  "source", JsonArray(lines) ])
        :> JsonNode
    let notebook = JsonObject()
    notebook["cells"] <- JsonArray(cells |> List.mapi cell |> Array.ofList)
    notebook["metadata"] <- JsonObject(dict [ "kernelspec", JsonObject(dict [ "name", JsonValue.Create kernel :> JsonNode ]) :> JsonNode ])
    notebook["nbformat"] <- JsonValue.Create 4
    notebook["nbformat_minor"] <- JsonValue.Create 5
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
      test "a literate script splits into markdown and code cells" {
          let script = "(**\n# Title\n*)\n#load \"references.fsx\"\n\nlet a = 1\n\n(**\ntext\n*)\nprintfn \"%d\" a\n"
          Expect.equal
              (literateCells script)
              [ "markdown", "# Title"; "code", "#load \"references.fsx\"\n\nlet a = 1"; "markdown", "text"; "code", "printfn \"%d\" a" ]
              "cells in order"
      } ]

/// Runs a notebook made of cells in the kernel, from a temporary folder.
let private runCells (root: string) (kernel: string) (cells: (string * string * string) list) =
    use folder = new TempFolder()
    let path = folder.File "broken.ipynb"
    File.WriteAllText(path, notebookJson kernel cells)
    runInKernel root path

let private failingRuns (root: string) =
    [ test "an F# notebook with a cell that does not compile fails at that cell, with the compiler's error" {
          let run =
              runCells root ".net-fsharp"
                  [ "markdown", "", "# A broken notebook"
                    "code", "fsharp", "printfn \"first cell\""
                    "code", "fsharp", "let count: int = \"not a number\""
                    "code", "fsharp", "printfn \"never runs\"" ]
          let failure = Expect.wantSome run.Failure "the run fails"
          Expect.stringContains failure "broken.ipynb" "the message names the notebook"
          Expect.stringContains failure "cell 3 (id cell-3)" "and the failing cell (markdown cells count)"
          Expect.stringContains failure "FS0001" "and holds the compiler's error"
          Expect.equal (run.Cells |> List.map (fun c -> c.Number)) [ 2; 3 ] "the run stops at the failing cell"
          Expect.contains (run.Cells[0].Outputs) (NotebookKernel.Stream("stdout", "first cell")) "the first cell ran in the kernel"
          Expect.throwsT<AssertException> (fun () -> expectKernelSuccess run) "the test of such a notebook fails"
      }
      test "a C# notebook whose cell throws fails at that cell, with the exception" {
          let run =
              runCells root ".net-csharp"
                  [ "code", "csharp", "var answer = 42;"
                    "code", "csharp", "throw new InvalidOperationException($\"raised by cell 2 after {answer}\");"
                    "code", "csharp", "Console.WriteLine(\"never runs\");" ]
          let failure = Expect.wantSome run.Failure "the run fails"
          Expect.stringContains failure "cell 2 (id cell-2)" "the message names the failing cell"
          Expect.stringContains failure "raised by cell 2 after 42" "and holds the exception's message (state from cell 1 is kept)"
          Expect.equal run.Cells.Length 2 "the run stops at the failing cell"
      }
      test "a notebook whose cells compile with a warning fails its test" {
          let run = runCells root ".net-fsharp" [ "code", "fsharp", "let f x = match x with 1 -> \"one\"\nf 1" ]
          Expect.isNone run.Failure "the cell runs"
          Expect.exists run.Cells[0].Warnings (fun w -> w.Contains "FS0025") "the kernel reports the incomplete match"
          Expect.throwsT<AssertException> (fun () -> expectKernelSuccess run) "and the test fails on it"
      }
      test "a first cell may use TorchSharp directly after loading references.fsx" {
          let references = Path.Combine(root, "notebooks", "references.fsx").Replace('\\', '/')
          let run =
              runCells root ".net-fsharp"
                  [ "code", "fsharp", sprintf "#load \"%s\"\nlet total = TorchSharp.torch.ones(3L).sum().item<float32>()\nprintfn \"total %%g\" total" references ]
          expectKernelSuccess run
          let printed =
              run.Cells[0].Outputs
              |> List.choose (function
                  | NotebookKernel.Stream("stdout", text) -> Some text
                  | _ -> None)
              |> String.concat ""
          Expect.stringContains printed "total 3" "the tensor was made and summed"
      }
      test "without the kernel's tool manifest the run fails (no fallback)" {
          // A root without .config/dotnet-tools.json: `dotnet interactive` does not exist there.
          use elsewhere = new TempFolder()
          let run = runCells elsewhere.Path ".net-fsharp" [ "code", "fsharp", "1 + 1" ]
          let failure = Expect.wantSome run.Failure "the run fails"
          Expect.stringContains failure "dotnet tool restore" "the message says how to install the kernel"
      }
      test "an executed copy carries each cell's outputs and execution count" {
          let original = notebookJson ".net-fsharp" [ "code", "fsharp", "printfn \"hello\""; "code", "fsharp", "failwith \"stop\"" ]
          use folder = new TempFolder()
          let path = folder.File "copy.ipynb"
          File.WriteAllText(path, original)
          let run = runInKernel root path
          let copy = JsonNode.Parse(NotebookKernel.executedCopy original run)
          let cells = copy["cells"].AsArray()
          let first, second = cells[0], cells[1]
          let count = first["execution_count"].GetValue<int>()
          Expect.equal count 1 "the first cell's execution count"
          let output = first["outputs"].AsArray()[0]
          let kind = output["output_type"].GetValue<string>()
          let text = output["text"].GetValue<string>()
          Expect.equal kind "stream" "a stream output"
          Expect.stringContains text "hello" "with the printed text"
          let second = second["outputs"].AsArray() |> Seq.map (fun o -> o["output_type"].GetValue<string>()) |> List.ofSeq
          Expect.contains second "error" "the failing cell gets an error output"
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
            yield testSequenced (testList "failing runs" (failingRuns root))
            yield test "every notebook has nbformat 4.5 cell ids, unique within it" {
                Expect.isNonEmpty notebooks "notebooks are found"
                let valid = Regex("^[a-zA-Z0-9_-]{1,64}$")
                let problems =
                    [ for file in notebooks do
                          let json = JsonNode.Parse(File.ReadAllText(Path.Combine(root, file)))
                          let minor = json["nbformat_minor"]
                          if isNull minor || minor.GetValue<int>() < 5 then yield sprintf "%s: nbformat_minor is below 5" file
                          let ids =
                              [ for i, cell in Seq.indexed (json["cells"].AsArray()) ->
                                    match cell["id"] with
                                    | :? JsonValue as id when id.GetValueKind() = JsonValueKind.String -> i, id.GetValue<string>()
                                    | _ -> i, "" ]
                          for i, id in ids do
                              if not (valid.IsMatch id) then yield sprintf "%s: cell %d has no valid id (%A)" file (i + 1) id
                          for id, count in ids |> List.countBy snd do
                              if count > 1 && id <> "" then yield sprintf "%s: the id %s is used %d times" file id count ]
                Expect.isEmpty problems "cell ids"
            }
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
                            if file.EndsWith ".ipynb" then
                                test (sprintf "%s runs in the .NET Interactive kernel without error" (file.Replace('\\', '/'))) {
                                    let path = Path.Combine(root, file)
                                    // Unknown kernel languages are refused with a clear message before the kernel starts.
                                    codeCells (parseNotebook path (File.ReadAllText path)) |> ignore
                                    expectKernelSuccess (runInKernel root path)
                                }
                            else
                                test (sprintf "%s runs under dotnet fsi without error" (file.Replace('\\', '/'))) {
                                    expectSuccess (runScript (Path.Combine(root, file)))
                                }
                    ]
                )
        ]
