/// Runs notebooks in the real .NET Interactive kernel, headless: one `dotnet interactive stdio` process
/// per notebook (the local tool pinned in .config/dotnet-tools.json), started in the repository root
/// with --working-dir set to the notebook's folder, and one SubmitCode command per code cell, in
/// order, each sent only after the previous one finished. The first CommandFailed stops the run.
///
/// The stdio protocol: every line sent is a command envelope
///   {"token": "1", "commandType": "SubmitCode", "command": {"code": "...", "targetKernelName": "fsharp"}}
/// and every JSON line received is an event envelope
///   {"eventType": "...", "event": {...}, "command": {"token": "1", ...}}
/// whose command token names the command it belongs to (commands the kernel splits off get "1.1", ...).
/// A command ends with CommandSucceeded or CommandFailed (event.message holds the compiler's or the
/// exception's text; DiagnosticsProduced before it carries the compiler's codes and warnings). Lines that are not JSON (the kernel's welcome text) are skipped.
///
/// This file depends on nothing but the base library, so tools/run-notebooks.fsx loads it as well.
module Functional.Tests.NotebookKernel

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json
open System.Text.Json.Nodes

/// One output of a cell, as nbformat 4 writes it.
type CellOutput =
    /// Text the cell wrote to stdout ("stdout") or stderr ("stderr").
    | Stream of name: string * text: string
    /// A value shown with display (or a formatted value of another kind): mime type to text.
    | Display of data: (string * string) list
    /// The value of the cell's last expression.
    | ReturnValue of data: (string * string) list
    /// The cell's failure: the kernel's CommandFailed message.
    | Failed of message: string

/// What one code cell did.
type CellRun =
    { /// The cell's 1-based position among all cells of the notebook (markdown cells count too).
      Number: int
      /// The cell's nbformat id, when it has one.
      Id: string option
      /// The kernel the cell ran in ("fsharp", "csharp").
      Kernel: string
      /// Its outputs in the order they came.
      Outputs: CellOutput list
      /// The compiler warnings the kernel reported for it (code and message).
      Warnings: string list
      /// The CommandFailed message, when the cell failed.
      Failure: string option
      /// Wall-clock seconds.
      Seconds: float }

/// How a notebook run ended.
type NotebookRun =
    { /// The notebook file.
      Path: string
      /// The code cells that ran, in order; the last one is the failing one when the run failed.
      Cells: CellRun list
      /// Why the run failed, when it did: the notebook, the cell and the error, ready to show.
      Failure: string option
      /// What the kernel process wrote to stderr.
      KernelStderr: string }

/// The kernel process could not be started or stopped answering.
type KernelException(message: string) =
    inherit Exception(message)

/// A cell's kernel name: the cell's metadata (polyglot_notebook.kernelName, else
/// dotnet_interactive.language), else the notebook's default kernel.
let private kernelNameOf (defaultKernel: string) (cell: JsonNode) =
    let at (names: string list) =
        names
        |> List.fold (fun (node: JsonNode) name -> if isNull node || not (node :? JsonObject) then null else node[name]) cell
        |> function
            | :? JsonValue as v when v.GetValueKind() = JsonValueKind.String -> Some(v.GetValue<string>())
            | _ -> None
    at [ "metadata"; "polyglot_notebook"; "kernelName" ]
    |> Option.orElse (at [ "metadata"; "dotnet_interactive"; "language" ])
    |> Option.defaultValue defaultKernel

/// The notebook's default kernel: metadata.polyglot_notebook.kernelInfo.defaultKernelName, else what
/// metadata.kernelspec.name (".net-fsharp", ".net-csharp") stands for, else "csharp" (the kernel's own default).
let defaultKernelOf (notebook: JsonNode) =
    let text (node: JsonNode) =
        match node with
        | :? JsonValue as v when v.GetValueKind() = JsonValueKind.String -> Some(v.GetValue<string>())
        | _ -> None
    let metadata = notebook["metadata"]
    let fromPolyglot =
        let polyglot = if isNull metadata then null else metadata["polyglot_notebook"]
        let kernelInfo = if isNull polyglot then null else polyglot["kernelInfo"]
        if isNull kernelInfo then None else text (kernelInfo["defaultKernelName"])
    let fromSpec =
        if isNull metadata || isNull metadata["kernelspec"] then None
        else
            match text (metadata["kernelspec"]["name"]) with
            | Some ".net-fsharp" -> Some "fsharp"
            | Some ".net-csharp" -> Some "csharp"
            | _ -> None
    fromPolyglot |> Option.orElse fromSpec |> Option.defaultValue "csharp"

/// A cell's source: nbformat allows one string or a list of lines.
let sourceOf (cell: JsonNode) =
    match cell["source"] with
    | :? JsonArray as lines -> String.Join("", [ for line in lines -> line.GetValue<string>() ])
    | :? JsonValue as v -> v.GetValue<string>()
    | _ -> ""

/// One running `dotnet interactive stdio` process.
type KernelSession(root: string, workingDirectory: string, defaultKernel: string, environment: (string * string) list) =
    let info =
        ProcessStartInfo(
            "dotnet",
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = root,
            // No byte-order mark in front of the first command: the kernel would not parse it.
            StandardInputEncoding = UTF8Encoding(false),
            StandardOutputEncoding = UTF8Encoding(false))
    do
        for a in [ "interactive"; "stdio"; "--default-kernel"; defaultKernel; "--working-dir"; workingDirectory ] do
            info.ArgumentList.Add a
        for name, value in
            [ "DOTNET_CLI_TELEMETRY_OPTOUT", "1"
              "DOTNET_INTERACTIVE_CLI_TELEMETRY_OPTOUT", "1"
              "DOTNET_NOLOGO", "1" ]
            @ environment do
            info.Environment[name] <- value
    let proc =
        try Process.Start info
        with e -> raise (KernelException(sprintf "could not start `dotnet interactive stdio`: %s" e.Message))
    let events = new BlockingCollection<JsonElement>()
    let stderr = StringBuilder()
    let reader =
        Threading.Thread(
            (fun () ->
                // Ends when the kernel closes its stdout; nothing here may throw (it would end the process).
                try
                    let mutable line = proc.StandardOutput.ReadLine()
                    while not (isNull line) do
                        if line.StartsWith "{" then
                            try events.Add(JsonDocument.Parse(line).RootElement.Clone())
                            with :? JsonException -> ()
                        line <- proc.StandardOutput.ReadLine()
                with _ -> ()
                try events.CompleteAdding() with _ -> ()),
            IsBackground = true)
    do
        reader.Start()
        proc.ErrorDataReceived.Add(fun e -> if not (isNull e.Data) then lock stderr (fun () -> stderr.AppendLine e.Data |> ignore))
        proc.BeginErrorReadLine()
    let mutable token = 0

    /// What the kernel wrote to stderr so far.
    member _.Stderr = lock stderr (fun () -> stderr.ToString())

    /// Submits one cell's code to kernelName and waits for it to finish (at most timeout). Returns the
    /// outputs, the warnings and the CommandFailed message if any. Raises KernelException when the
    /// kernel exits or does not answer in time.
    member this.Submit(code: string, kernelName: string, timeout: TimeSpan) =
        token <- token + 1
        let id = string token
        let command = JsonObject()
        command["token"] <- JsonValue.Create id
        command["commandType"] <- JsonValue.Create "SubmitCode"
        command["command"] <- JsonObject(dict [ "code", JsonValue.Create code :> JsonNode; "targetKernelName", JsonValue.Create kernelName ])
        proc.StandardInput.WriteLine(command.ToJsonString())
        proc.StandardInput.Flush()
        let outputs = ResizeArray<CellOutput>()
        let warnings = ResizeArray<string>()
        let errors = ResizeArray<string>()
        let deadline = DateTime.UtcNow + timeout
        let data (event: JsonElement) =
            match event.TryGetProperty "formattedValues" with
            | true, values -> [ for v in values.EnumerateArray() -> v.GetProperty("mimeType").GetString(), v.GetProperty("value").GetString() ]
            | _ -> []
        let text (event: JsonElement) = data event |> List.map snd |> String.concat ""
        let rec wait () =
            let left = deadline - DateTime.UtcNow
            let mutable envelope = Unchecked.defaultof<JsonElement>
            if left <= TimeSpan.Zero then
                raise (KernelException(sprintf "the kernel did not finish the cell within %.0f s" timeout.TotalSeconds))
            elif not (events.TryTake(&envelope, left)) then
                if events.IsCompleted then
                    raise (
                        KernelException(
                            sprintf
                                "the kernel exited while running the cell (`dotnet interactive` is the local tool pinned in .config/dotnet-tools.json; `dotnet tool restore` in the repository root installs it)\n--- kernel stderr ---\n%s"
                                this.Stderr
                        )
                    )
                else wait ()
            else
                let owner =
                    match envelope.TryGetProperty "command" with
                    | true, c when c.ValueKind = JsonValueKind.Object ->
                        match c.TryGetProperty "token" with
                        | true, t when t.ValueKind = JsonValueKind.String -> t.GetString()
                        | _ -> ""
                    | _ -> ""
                if owner <> id && not (owner.StartsWith(id + ".")) then wait ()
                else
                    let kind = envelope.GetProperty("eventType").GetString()
                    let event = envelope.GetProperty "event"
                    match kind with
                    | "CommandSucceeded" when owner = id -> None
                    | "CommandFailed" when owner = id ->
                        let message = event.GetProperty("message").GetString()
                        // The compiler's error codes (FS0001, CS0029) come only with the diagnostics.
                        let message =
                            if errors.Count = 0 then message
                            else message + "\n" + String.Join("\n", errors)
                        outputs.Add(Failed message)
                        Some message
                    | "StandardOutputValueProduced" -> outputs.Add(Stream("stdout", text event)); wait ()
                    | "StandardErrorValueProduced" -> outputs.Add(Stream("stderr", text event)); wait ()
                    | "DisplayedValueProduced" -> outputs.Add(Display(data event)); wait ()
                    | "ReturnValueProduced" -> outputs.Add(ReturnValue(data event)); wait ()
                    | "DiagnosticsProduced" ->
                        for d in event.GetProperty("diagnostics").EnumerateArray() do
                            let line = d.GetProperty("linePositionSpan").GetProperty("start").GetProperty("line").GetInt32() + 1
                            let text = sprintf "line %d: %s %s" line (d.GetProperty("code").GetString()) (d.GetProperty("message").GetString())
                            match d.GetProperty("severity").GetString() with
                            | "warning" -> warnings.Add text
                            | "error" -> errors.Add text
                            | _ -> ()
                        wait ()
                    | _ -> wait ()
        let failure = wait ()
        List.ofSeq outputs, List.ofSeq warnings, failure

    interface IDisposable with
        member _.Dispose() =
            try
                if not proc.HasExited then
                    proc.StandardInput.Close()
                    if not (proc.WaitForExit 5000) then proc.Kill true
                proc.WaitForExit()
                reader.Join(TimeSpan.FromSeconds 10.0) |> ignore
            with _ -> ()
            proc.Dispose()
            events.Dispose()

/// Runs `dotnet tool restore` in root once per process, so that the pinned kernel is there on a fresh
/// clone. Raises KernelException with the tool's output when the restore fails.
let private restored = ConcurrentDictionary<string, Lazy<unit>>()

let restoreTools (root: string) =
    restored.GetOrAdd(
        root,
        fun root ->
            lazy
                (let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = root)
                 for a in [ "tool"; "restore" ] do info.ArgumentList.Add a
                 info.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] <- "1"
                 info.Environment["DOTNET_NOLOGO"] <- "1"
                 use p = Process.Start info
                 let out = p.StandardOutput.ReadToEndAsync()
                 let err = p.StandardError.ReadToEndAsync()
                 if not (p.WaitForExit(int (TimeSpan.FromMinutes 10.0).TotalMilliseconds)) then p.Kill true
                 p.WaitForExit()
                 if p.ExitCode <> 0 then
                     raise (KernelException(sprintf "`dotnet tool restore` in %s failed (exit %d); the notebooks need the .NET Interactive kernel pinned in .config/dotnet-tools.json\n%s\n%s" root p.ExitCode out.Result err.Result)))
    ).Force()

/// The time one cell may take: far more than any cell needs, so a hang fails instead of blocking CI.
let cellTimeLimit = TimeSpan.FromMinutes 10.0

/// Runs every code cell of the notebook at path in one fresh kernel, in order, stopping at the first
/// failing cell. root is the repository root (where the tool manifest is); environment is added to the
/// kernel's. The kernel's working directory is the notebook's folder, so relative paths resolve as
/// they do in an editor.
let runNotebook (root: string) (path: string) (environment: (string * string) list) : NotebookRun =
    let path = Path.GetFullPath path
    let name = Path.GetFileName path
    let notebook = JsonNode.Parse(File.ReadAllText path)
    let defaultKernel = defaultKernelOf notebook
    let cells =
        [ for i, cell in Seq.indexed (notebook["cells"].AsArray()) do
              if cell["cell_type"].GetValue<string>() = "code" && not (String.IsNullOrWhiteSpace(sourceOf cell)) then
                  let id =
                      match cell["id"] with
                      | :? JsonValue as v -> Some(v.GetValue<string>())
                      | _ -> None
                  yield i + 1, id, kernelNameOf defaultKernel cell, sourceOf cell ]
    let describeCell (number: int) (id: string option) =
        sprintf "cell %d%s" number (match id with Some id -> sprintf " (id %s)" id | None -> "")
    restoreTools root
    use kernel = new KernelSession(root, Path.GetDirectoryName path, defaultKernel, environment)
    let runs = ResizeArray<CellRun>()
    let mutable failure = None
    for number, id, kernelName, source in cells do
        if failure.IsNone then
            let clock = Stopwatch.StartNew()
            try
                let outputs, warnings, failed = kernel.Submit(source, kernelName, cellTimeLimit)
                runs.Add
                    { Number = number; Id = id; Kernel = kernelName; Outputs = outputs; Warnings = warnings
                      Failure = failed; Seconds = clock.Elapsed.TotalSeconds }
                match failed with
                | Some message -> failure <- Some(sprintf "%s: %s failed in the %s kernel:\n%s" name (describeCell number id) kernelName message)
                | None -> ()
            with :? KernelException as e ->
                runs.Add
                    { Number = number; Id = id; Kernel = kernelName; Outputs = [ Failed e.Message ]; Warnings = []
                      Failure = Some e.Message; Seconds = clock.Elapsed.TotalSeconds }
                failure <- Some(sprintf "%s: %s: %s" name (describeCell number id) e.Message)
    { Path = path; Cells = List.ofSeq runs; Failure = failure; KernelStderr = kernel.Stderr }

/// nbformat 4 output objects for a cell's outputs (execution_count goes on execute_result).
let private outputJson (executionCount: int) (output: CellOutput) : JsonNode =
    let bundle (data: (string * string) list) =
        let o = JsonObject()
        for mime, value in data do o[mime] <- JsonValue.Create value
        o
    match output with
    | Stream(name, text) ->
        JsonObject(dict [ "output_type", JsonValue.Create "stream" :> JsonNode; "name", JsonValue.Create name; "text", JsonValue.Create text ])
    | Display data ->
        JsonObject(dict [ "output_type", JsonValue.Create "display_data" :> JsonNode; "data", bundle data; "metadata", JsonObject() ])
    | ReturnValue data ->
        JsonObject(
            dict
                [ "output_type", JsonValue.Create "execute_result" :> JsonNode
                  "data", bundle data
                  "execution_count", JsonValue.Create executionCount
                  "metadata", JsonObject() ])
    | Failed message ->
        JsonObject(
            dict
                [ "output_type", JsonValue.Create "error" :> JsonNode
                  "ename", JsonValue.Create "CommandFailed"
                  "evalue", JsonValue.Create message
                  "traceback", JsonArray(JsonValue.Create message) ])

/// The notebook's JSON with each executed code cell's outputs and execution_count replaced by the
/// run's (cells that did not run get none). Consecutive stream outputs of the same name are merged.
let executedCopy (originalJson: string) (run: NotebookRun) : string =
    let notebook = JsonNode.Parse originalJson
    let byNumber = run.Cells |> List.mapi (fun i c -> c.Number, (i + 1, c)) |> Map.ofList
    for i, cell in Seq.indexed (notebook["cells"].AsArray()) do
        if cell["cell_type"].GetValue<string>() = "code" then
            match byNumber.TryFind(i + 1) with
            | Some(count, cellRun) ->
                let merged =
                    cellRun.Outputs
                    |> List.fold
                        (fun acc output ->
                            match output, acc with
                            | Stream(name, text), Stream(previous, earlier) :: rest when name = previous -> Stream(name, earlier + text) :: rest
                            | _ -> output :: acc)
                        []
                    |> List.rev
                cell["outputs"] <- JsonArray(merged |> List.map (outputJson count) |> Array.ofList)
                cell["execution_count"] <- JsonValue.Create count
            | None ->
                cell["outputs"] <- JsonArray()
                cell["execution_count"] <- null
    notebook.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"
