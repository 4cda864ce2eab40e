// Runs notebooks in the real .NET Interactive kernel and writes executed copies (with every cell's
// outputs) beside the originals' names in an output folder. Used through tools/run-notebooks, which
// restores the kernel first:
//   tools/run-notebooks [--out FOLDER] [NOTEBOOK.ipynb ...]
// Without notebooks it runs every notebooks/*.ipynb; the default folder is runs/notebooks/executed.
// The notebooks' own outputs (charts, checkpoints) go to runs/notebooks/NAME as usual. Exits with 1
// when a notebook fails (its copy then ends with the failing cell's error).
#load "../tests/Functional.Tests/NotebookKernel.fs"

open System
open System.IO
open Functional.Tests.NotebookKernel

let root = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, ".."))

let rec parse (args: string list) (out: string option) (notebooks: string list) =
    match args with
    | "--out" :: folder :: rest -> parse rest (Some folder) notebooks
    | ("-h" | "--help") :: _ ->
        printfn "usage: tools/run-notebooks [--out FOLDER] [NOTEBOOK.ipynb ...]"
        exit 0
    | option :: _ when option.StartsWith "--" ->
        eprintfn "unknown option %s (usage: tools/run-notebooks [--out FOLDER] [NOTEBOOK.ipynb ...])" option
        exit 2
    | path :: rest -> parse rest out (path :: notebooks)
    | [] -> out, List.rev notebooks

let out, requested = parse (List.ofArray fsi.CommandLineArgs |> List.tail) None []
let outFolder = Path.GetFullPath(defaultArg out (Path.Combine(root, "runs", "notebooks", "executed")))
let notebooks =
    match requested with
    | [] -> Directory.GetFiles(Path.Combine(root, "notebooks"), "*.ipynb") |> Array.sort |> List.ofArray
    | paths -> paths |> List.map Path.GetFullPath

for path in notebooks do
    if not (File.Exists path) then
        eprintfn "no such notebook: %s" path
        exit 2

Directory.CreateDirectory outFolder |> ignore
let mutable failed = 0
for path in notebooks do
    let clock = Diagnostics.Stopwatch.StartNew()
    let run = runNotebook root path []
    let copy = Path.Combine(outFolder, Path.GetFileName path)
    File.WriteAllText(copy, executedCopy (File.ReadAllText path) run)
    let warnings = run.Cells |> List.collect (fun c -> c.Warnings |> List.map (sprintf "cell %d: %s" c.Number))
    match run.Failure with
    | None -> printfn "%s: %d code cells ran in %.0f s -> %s" (Path.GetFileName path) run.Cells.Length clock.Elapsed.TotalSeconds copy
    | Some failure ->
        failed <- failed + 1
        eprintfn "%s\n(executed copy up to the failing cell: %s)" failure copy
    for w in warnings do eprintfn "%s: warning in %s" (Path.GetFileName path) w

exit (if failed = 0 then 0 else 1)
