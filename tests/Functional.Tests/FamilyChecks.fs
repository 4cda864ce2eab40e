/// Checks every causal-LM family passes, written once: each family's test file (BloomTests, OptTests,
/// GenerationTests, LlamaVariantTests) calls them with its own tiny configs and model factories. The key/
/// value cache against the full forward (chunked prefill and left padding), greedy and batched generation
/// with and without the cache, LoRA training that moves only the adapters, bf16 training against fp32 and
/// an exact resume from a checkpoint.
module Functional.Tests.FamilyChecks

open System
open System.IO
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Generation
open Functional.Models
open Functional.Peft
open Functional.Training
open Functional.Tests.TestUtil

let private ids (data: int64[]) = torch.tensor(data, ReadOnlySpan [| 1L; int64 data.Length |])

let private ones (rows: int64) (columns: int64) = torch.ones(rows, columns, dtype = torch.int64)

let private greedy newTokens = { GenerationOptions.defaults with MaxNewTokens = newTokens }

/// Greedy decoding by a full forward over the whole sequence every step: the reference the cache must match.
let greedyByFullForwards (lm: CausalLm) (prompt: int64[]) (newTokens: int) =
    use _ = torch.no_grad ()
    let sequence = ResizeArray prompt
    for _ in 1 .. newTokens do
        use input = ids (sequence.ToArray())
        use all = lm.Module.forward input // (1, T, V)
        use last = all[0L, -1L]
        sequence.Add(last.argmax().item<int64> ())
    sequence.ToArray()[prompt.Length ..]

/// The prompt the greedy-generation checks start from.
let prompt = [| 1L; 4L; 2L; 8L |]

/// Prompts of lengths 1, 5 and 3 for the batched-generation checks (left padded in the batch).
let prompts = [| [| 5L |]; [| 3L; 1L; 4L; 1L; 5L |]; [| 9L; 2L; 6L |] |]

// ---------------------------------------------------------------- key/value cache

/// label: cached incremental logits (a prefill of 4, then 1, 1, 2 and 1 new positions on a batch of 2)
/// equal the full forward's at every position, and the cache ends holding all 9 positions.
let cachedLogits (label: string) (model: unit -> CausalLm) =
    torchTest (sprintf "%s: cached incremental logits equal the full forward's at every position" label) (fun () ->
        let lm = model ()
        use _ = torch.no_grad ()
        use g = new torch.Generator(5UL)
        use input = torch.randint(int64 (ModelConfig.vocabSize lm.Config), [| 2L; 9L |], dtype = torch.int64, generator = g)
        use full = lm.Module.forward input // (2, 9, V)
        let mutable cache = None
        let pieces =
            [ for start, length in [ 0L, 4L; 4L, 1L; 5L, 1L; 6L, 2L; 8L, 1L ] do
                  use mask = ones 2L (start + length)
                  use chunk = input.narrow(1L, start, length)
                  let out, next = CausalLm.forwardCached lm chunk mask cache
                  cache |> Option.iter (fun (c: KvCache) -> (c :> IDisposable).Dispose())
                  cache <- Some next
                  yield out ]
        use cached = torch.cat(List.toArray pieces, 1L)
        expectClose 1e-5 cached full "prefill of 4, then 1, 1, 2 and 1 new positions"
        Expect.equal (cache |> Option.map (fun c -> c.Length)) (Some 9L) "the cache holds every position"
        cache |> Option.iter (fun c -> (c :> IDisposable).Dispose()))

/// label: a batch of a 6-token prompt (`long`) and a 3-token one behind 3 `pad` tokens, prefilled and
/// stepped once through the cache, gives each row the logits of its prompt run alone; `how` says what
/// makes the padded row right (shown in the test name).
let paddedRows (label: string) (how: string) (model: unit -> CausalLm) (pad: int64) (long: int64[]) =
    torchTest (sprintf "%s: left-padded batch rows equal the same prompt run alone (%s)" label how) (fun () ->
        let lm = model ()
        use _ = torch.no_grad ()
        let short = [| 2L; 6L; 5L |]
        let next = [| 8L; 10L |]
        use batch = torch.tensor(Array.append long (Array.append [| pad; pad; pad |] short), ReadOnlySpan [| 2L; 6L |])
        use mask = torch.tensor([| 1L; 1L; 1L; 1L; 1L; 1L; 0L; 0L; 0L; 1L; 1L; 1L |], ReadOnlySpan [| 2L; 6L |])
        let prefill, cache = CausalLm.forwardCached lm batch mask None
        use prefill = prefill
        use cache = cache
        use newTokens = torch.tensor(next, ReadOnlySpan [| 2L; 1L |])
        use grownMask = torch.cat([| mask; ones 2L 1L |], 1L)
        let step, grown = CausalLm.nextTokenLogits lm newTokens grownMask (Some cache)
        use step = step // (2, V)
        use grown = grown
        use longAlone = lm.Module.forward (ids (Array.append long [| next[0] |])) // (1, 7, V)
        use shortAlone = lm.Module.forward (ids (Array.append short [| next[1] |])) // (1, 4, V)
        expectClose 1e-5 (prefill.narrow(0L, 0L, 1L)) (longAlone.narrow(1L, 0L, 6L)) "unpadded row, prompt"
        expectClose 1e-5 (prefill.narrow(0L, 1L, 1L).narrow(1L, 3L, 3L)) (shortAlone.narrow(1L, 0L, 3L)) "padded row, prompt"
        expectClose 1e-5 (step.narrow(0L, 0L, 1L)) (longAlone[0L, -1L].unsqueeze 0L) "unpadded row, next step"
        expectClose 1e-5 (step.narrow(0L, 1L, 1L)) (shortAlone[0L, -1L].unsqueeze 0L) "padded row, next step"
        Expect.equal grown.Length 7L "the grown cache holds the padded prompt and the new token")

// ---------------------------------------------------------------- generation

/// label: greedy generation of `newTokens` from `start` with the cache, and without it, equals greedy
/// decoding by full forwards token for token; the reference takes more than `distinct` different tokens
/// (the tiny model is not stuck on one).
let greedyMatches (label: string) (model: unit -> CausalLm) (start: int64[]) (newTokens: int) (distinct: int) =
    torchTest (sprintf "%s: greedy generation with the cache equals generation without it and by full forwards, %d new tokens" label newTokens) (fun () ->
        let lm = model ()
        let expected = greedyByFullForwards lm start newTokens
        let cached = Generator.generate lm [| start |] (greedy newTokens)
        let uncached = Generator.generate lm [| start |] { greedy newTokens with UseCache = false }
        Expect.equal cached[0] expected "with the cache"
        Expect.equal uncached[0] expected "without the cache"
        Expect.isGreaterThan (Set.count (Set.ofArray expected)) distinct "the reference moves between tokens")

/// label: a left-padded batch of prompts of different lengths generates, with and without the cache,
/// what each prompt generates alone (with the cache and by full forwards).
let batchedMatches (label: string) (model: unit -> CausalLm) (batch: int64[][]) (newTokens: int) =
    torchTest (sprintf "%s: a left-padded batch generates what each prompt generates alone, with and without the cache" label) (fun () ->
        let lm = model ()
        let cached = Generator.generate lm batch (greedy newTokens)
        let uncached = Generator.generate lm batch { greedy newTokens with UseCache = false }
        Expect.equal uncached cached "the batch without the cache"
        for i, p in Array.indexed batch do
            let alone = Generator.generate lm [| p |] (greedy newTokens)
            Expect.equal cached[i] alone[0] (sprintf "prompt %d" i)
            Expect.equal cached[i] (greedyByFullForwards lm p newTokens) (sprintf "prompt %d by full forwards" i))

// ---------------------------------------------------------------- training

/// Trains only the adapters of `lm` (wrapped by `adapters`, its base frozen here) on `dir`/data.jsonl for
/// options.MaxSteps steps, then expects every base parameter bit-identical to `dir`/model's and every
/// adapter parameter moved. Returns the untouched base loaded again from `dir`/model (seed 1).
let expectOnlyAdaptersTrain (dir: string) (lm: CausalLm) (adapters: LoraAdapters) (options: TrainOptions) =
    let initial = [ for _, p in Lora.parameters adapters -> p.detach().clone() ]
    Lora.freezeBase lm
    let data = loadTokenized (Path.Combine(dir, "data.jsonl"))
    let plan = TrainingLoop.plan options data.Rows.Length
    TrainingLoop.run
        { TrainingLoop.setup plan lm data with
            Attach = (Lora.asAdapter adapters lm true None options.LearningRate).AttachToCompute
            Parameters = [ for name, p in Lora.parameters adapters -> struct (name, p) ] }
        None
        { OnLog = ignore; AfterStep = fun _ -> StepDecision.Continue }
    |> ignore
    let original = HfModelFolder.load (Path.Combine(dir, "model")) 1L
    let trained = dict [ for struct (name, p) in lm.Module.named_parameters () -> name, p ]
    for struct (name, p) in original.Module.named_parameters () do
        Expect.isTrue (trained[name].Equals p) (sprintf "base %s bit-identical" name)
    for (name, p), p0 in List.zip (Lora.parameters adapters) initial do
        Expect.isFalse (p.Equals p0) (sprintf "adapter %s trained" name)
    original

/// The step logs of training `dir`/model (loaded with seed 1) on `dir`/data.jsonl.
let trainLogs (dir: string) (options: TrainOptions) =
    let lm = HfModelFolder.load (Path.Combine(dir, "model")) 1L
    let data = loadTokenized (Path.Combine(dir, "data.jsonl"))
    let logs = ResizeArray<StepLog>()
    let plan = TrainingLoop.plan options data.Rows.Length
    TrainingLoop.train plan lm data None { OnLog = logs.Add; AfterStep = fun _ -> StepDecision.Continue } |> ignore
    List.ofSeq logs

/// Trains `dir`'s model in fp32 and in bf16 and expects every one of options.MaxSteps steps logged and
/// each bf16 loss within `tolerance` (relative) of the fp32 one. Returns both curves (fp32, bf16).
let expectBf16FollowsFp32 (dir: string) (options: TrainOptions) (tolerance: float) =
    let fp32 = trainLogs dir { options with Precision = Precision.Fp32 }
    let bf16 = trainLogs dir { options with Precision = Precision.Bf16 }
    Expect.equal bf16.Length options.MaxSteps "every step logged"
    for a, b in List.zip fp32 bf16 do
        Expect.isLessThan (abs (a.Loss - b.Loss) / a.Loss) tolerance (sprintf "step %d: fp32 loss %g, bf16 loss %g" a.Step a.Loss b.Loss)
    fp32, bf16

/// The relative L2 error ||actual - expected|| / ||expected||, in float64.
let relativeL2 (actual: torch.Tensor) (expected: torch.Tensor) =
    use a = actual.to_type torch.float64
    use e = expected.to_type torch.float64
    use diff = a - e
    use num = diff.norm ()
    use den = e.norm ()
    num.item<float> () / den.item<float> ()

/// A causal-LM fine-tune of the model folder on the data file into `output`, everything else default.
let fineTuneRequest (modelPath: string) (dataPath: string) (output: string) (options: TrainOptions) =
    { ModelPath = modelPath
      DataPath = dataPath
      OutputPath = output
      PublishedOutputPath = None
      OverwriteOutputDir = false
      Options = options
      Data = FineTune.defaultData
      ResumeFromCheckpoint = None
      Lora = None
      Prefix = None
      GradientCheckpointing = false
      ModelHandling = FineTune.defaultModelHandling
      Distributed = FineTune.defaultDistributed
      Task = TrainingTask.CausalLm
      Plot = None }

/// The (step, loss) of every optimizer step a run logged to its metrics file.
let losses (r: FineTuneOutcome) =
    readJsonLines r.MetricsPath
    |> Array.filter (fun l -> l.TryGetProperty("grad_norm") |> fst)
    |> Array.map (fun l -> l.GetProperty("step").GetInt32(), l.GetProperty("loss").GetDouble())

/// Fine-tunes the model folder on the data file for options.MaxSteps steps (options.SaveSteps apart),
/// then again resumed from the first checkpoint, and expects the resumed run to end at the same step with
/// the same model.safetensors, byte for byte, and the same per-step losses.
let expectResumeMatches (modelPath: string) (dataPath: string) (options: TrainOptions) =
    use output = new TempFolder()
    let request path = fineTuneRequest modelPath dataPath path options
    let full = FineTune.run (request (output.File "full")) ignore
    let checkpoint = Path.Combine(output.File "full", sprintf "checkpoint-%d" options.SaveSteps)
    let resumed = FineTune.run { request (output.File "resumed") with ResumeFromCheckpoint = Some checkpoint } ignore
    Expect.equal resumed.Steps options.MaxSteps (sprintf "the resumed run ends at step %d" options.MaxSteps)
    let weights (r: FineTuneOutcome) = File.ReadAllBytes(Path.Combine(r.FinalModelPath, "model.safetensors"))
    Expect.isTrue (weights resumed = weights full) "the same final weights, bit for bit"
    Expect.equal (losses resumed) (losses full) "the same per-step losses"
    Expect.equal (losses full).Length options.MaxSteps "every step logged"
