/// Helpers shared by the test files: temporary folders, golden files, JSON reading.
module Functional.Tests.TestUtil

open System
open System.IO
open System.Diagnostics
open System.Text.Json

/// A fresh empty folder under the system temp folder, deleted on Dispose.
type TempFolder() =
    let path = Path.Combine(Path.GetTempPath(), "functional-tests", Guid.NewGuid().ToString("N"))
    do Directory.CreateDirectory path |> ignore
    /// The folder's full path.
    member _.Path = path
    /// A path inside the folder.
    member _.File(name: string) = Path.Combine(path, name)
    interface IDisposable with
        member _.Dispose() =
            try Directory.Delete(path, true) with _ -> ()

/// The golden files made by tools/reference/make_golden.py (copied next to the test binary).
let goldenDir (case: string) = Path.Combine(AppContext.BaseDirectory, "golden", case)

/// The golden cases.
let goldenCases = [ "gpt2-cosine"; "gpt2-linear"; "llama-cosine"; "llama-linear" ]

/// Reads each line of a JSON Lines file as a JsonElement.
let readJsonLines (path: string) =
    File.ReadAllLines path
    |> Array.filter (String.IsNullOrWhiteSpace >> not)
    |> Array.map (fun line -> JsonDocument.Parse(line).RootElement.Clone())

/// Every file below a folder with its bytes, for "nothing changed" checks.
let snapshot (folder: string) =
    if Directory.Exists folder then
        Directory.GetFiles(folder, "*", SearchOption.AllDirectories)
        |> Array.sort
        |> Array.map (fun f -> Path.GetRelativePath(folder, f), File.ReadAllBytes f)
        |> Map.ofArray
    else Map.empty

/// Copies a folder recursively.
let rec copyFolder (source: string) (target: string) =
    Directory.CreateDirectory target |> ignore
    for f in Directory.GetFiles source do
        File.Copy(f, Path.Combine(target, Path.GetFileName f), true)
    for d in Directory.GetDirectories source do
        copyFolder d (Path.Combine(target, Path.GetFileName d))

/// The result of one `functional` invocation.
type CliRun = { ExitCode: int; Stdout: string; Stderr: string }

/// True while only the fast unit and property tests run (`-- --unit`): a test that starts a functional
/// process then fails, naming the list it belongs to (Program.endToEnd).
let mutable unitOnly = false

/// Runs the built `functional` command (Functional.Cli.dll, copied next to the tests) with the given arguments and
/// environment changes (a variable with None is removed).
let runCliWith (environment: (string * string option) list) (args: string list) =
    if unitOnly then
        Expecto.Tests.failtest "this test starts a functional process: list it among the end-to-end tests (Program.endToEnd)"
    let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    info.StandardOutputEncoding <- Text.Encoding.UTF8
    for name, value in environment do
        match value with
        | Some v -> info.Environment[name] <- v
        | None -> info.Environment.Remove name |> ignore
    info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll"))
    for a in args do info.ArgumentList.Add a
    use p = Process.Start info
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    { ExitCode = p.ExitCode; Stdout = stdout.Result; Stderr = stderr.Result }

/// Runs the built `functional` command with the given arguments.
let runCli (args: string list) = runCliWith [] args

/// Sends a signal ("INT", "TERM", "KILL") to a process with kill(1).
let sendSignal (signal: string) (pid: int) =
    use kill = Process.Start("kill", [ "-" + signal; string pid ])
    kill.WaitForExit()

/// A clock that moves only when told to.
type ManualClock() =
    inherit TimeProvider()
    let mutable ticks = 0L
    member _.Advance(span: TimeSpan) = ticks <- ticks + span.Ticks
    override _.GetTimestamp() = ticks
    override _.TimestampFrequency = TimeSpan.TicksPerSecond


/// Reads a pre-tokenized JSON Lines file (such as a golden data.jsonl) the way the trainer does.
let loadTokenized (path: string) =
    let noTokenizer = Functional.Text.TextTokenizer.absent path "pre-tokenized data only"
    (Functional.Data.PromptDataset.load path Functional.Data.PromptDataset.defaults noTokenizer).Dataset

// ---- tensors in tests ----

open Expecto
open TorchSharp

/// The elements of a tensor as float64, row-major.
let values (t: torch.Tensor) : float[] =
    use f = t.detach().to_type(torch.float64).contiguous().cpu()
    f.data<float>().ToArray()

/// The largest absolute elementwise difference.
let maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) =
    Array.map2 (fun x y -> abs (x - y)) (values a) (values b) |> Array.max

/// Same shape, and no element further apart than tolerance.
let expectClose (tolerance: float) (actual: torch.Tensor) (expected: torch.Tensor) message =
    Expect.sequenceEqual actual.shape expected.shape (message + ": shape")
    let diff = maxAbsDiff actual expected
    Expect.isLessThanOrEqual diff tolerance (sprintf "%s: max abs difference %g" message diff)

/// A test that starts TorchSharp first.
let torchTest name (body: unit -> unit) =
    test name {
        Functional.Runtime.TorchRuntime.ensure ()
        body ()
    }

/// The error as the command line prints it: the settings it names spelled as the command line's options
/// (the core names a setting as learning_rate, the command line as --learning-rate).
let asCommandLine (e: Functional.InvalidInputException) = e.Render(System.Func<string, string> Functional.CommandLineFlags.Of)

/// An InvalidInputException as the command line prints it (asCommandLine), in a pattern:
/// `with :? InvalidInputException as (CommandLine e) -> ...`.
let (|CommandLine|) (e: Functional.InvalidInputException) = asCommandLine e

/// Runs action and expects an InvalidInputException with this origin and location whose message holds
/// every one of messageParts, read as the command line prints it (asCommandLine).
let expectInvalidInput (origin: string) (location: string) (messageParts: string list) (action: unit -> unit) =
    try
        action ()
        failtest "expected an InvalidInputException"
    with :? Functional.InvalidInputException as raised ->
        let e = asCommandLine raised
        Expect.equal e.Origin origin (sprintf "origin (message: %s)" e.Message)
        Expect.equal e.Location location (sprintf "location (message: %s)" e.Message)
        for part in messageParts do
            Expect.stringContains e.Message part "the message explains the problem"

// ---- tiny models ----

/// A tiny GPT-2 (2 layers, width 16, 2 heads, vocabulary 17, no dropout, tied head) that model-level
/// tests vary with `{ tinyGpt2 with ... }`.
let tinyGpt2 : Functional.Models.Gpt2Config =
    { VocabSize = 17
      NPositions = 32
      NEmbd = 16
      NLayer = 2
      NHead = 2
      NInner = 32
      ActivationFunction = Functional.Models.Activation.GeluNew
      ResidPdrop = 0.0
      EmbdPdrop = 0.0
      AttnPdrop = 0.0
      LayerNormEpsilon = 1e-5
      InitializerRange = 0.2
      ScaleAttnWeights = true
      TieWordEmbeddings = true }

/// A tiny LLaMA with grouped-query attention (4 query heads share 2 key/value heads, head_dim 4) that
/// model-level tests vary with `{ tinyLlama with ... }`.
let tinyLlama : Functional.Models.LlamaConfig =
    { VocabSize = 19
      HiddenSize = 16
      IntermediateSize = 24
      NumHiddenLayers = 2
      NumAttentionHeads = 4
      NumKeyValueHeads = 2
      HeadDim = 4
      HiddenAct = Functional.Models.Activation.Silu
      MaxPositionEmbeddings = 32
      RmsNormEps = 1e-6
      RopeTheta = 10000.0
      InitializerRange = 0.2
      TieWordEmbeddings = false
      AttentionBias = false
      MlpBias = false
      AttentionDropout = 0.0
      PadTokenId = None
      Variant = Functional.Models.LlamaVariant.llama }
