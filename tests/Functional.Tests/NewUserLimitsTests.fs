/// Issue 12, findings 3 and 4: non-finite weights and losses stop a run before anything non-finite is
/// saved; the limits a model sets (its context) are checked before anything is written, in training and
/// in generation; a run that fails mid-way leaves nothing that blocks the next one.
module Functional.Tests.NewUserLimitsTests

open System
open System.IO
open System.Text.Json
open Expecto
open Functional
open Functional.Models
open Functional.Training
open Functional.Tests.TestUtil

let private gpt2 = goldenDir "gpt2-cosine"
let private llama = goldenDir "llama-cosine"

/// The arguments of a CLI run on a golden model (64 positions, 96 ids), with extra options.
let private trainArgs (golden: string) (data: string) (output: string) (extra: string list) =
    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; data; "--output"; output
      "--per-device-train-batch-size"; "2"; "--no-data-cache" ]
    @ extra

/// The golden data with a 100-token row first (longer than the golden models' 64 positions).
let private writeLongData (golden: string) (path: string) =
    let longRow = JsonSerializer.Serialize {| input_ids = [ for i in 0..99 -> i % 90 ] |}
    File.WriteAllLines(path, Array.append [| longRow |] (File.ReadAllLines(Path.Combine(golden, "data.jsonl"))))

let private expectExit (code: int) (run: CliRun) =
    Expect.equal run.ExitCode code (sprintf "exit code %d (stderr: %s)" code run.Stderr)
    if code = 2 then Expect.isFalse (run.Stderr.Contains "   at ") "no stack trace"

let private expectMessage (run: CliRun) (parts: string list) =
    for part in parts do
        Expect.stringContains run.Stderr part "the message explains the problem"

/// A copy of a golden model whose weight file holds a NaN in its token embedding.
let private nanModel (golden: string) (target: string) =
    copyFolder (Path.Combine(golden, "model")) target
    let file = Path.Combine(target, "model.safetensors")
    let bytes = File.ReadAllBytes file
    let headerLength = int (BitConverter.ToUInt64(bytes, 0))
    use header = JsonDocument.Parse(ReadOnlyMemory(bytes, 8, headerLength))
    let name = "transformer.wte.weight"
    let offsets = header.RootElement.GetProperty(name).GetProperty("data_offsets")
    let start = offsets[0].GetInt32()
    BitConverter.GetBytes(Single.NaN).CopyTo(bytes, 8 + headerLength + start + 4 * 3)
    File.WriteAllBytes(file, bytes)
    file

/// A small LLaMA folder with a byte-level BPE tokenizer trained on a few sentences, so `generate` runs.
let private llamaWithTokenizer (folder: string) (contextLength: int) =
    let texts = [ "the cat sat on the mat"; "a dog ran in the park"; "the sun is hot" ]
    let vocabulary = Functional.Text.BpeTraining.train texts 12
    let config =
        sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": %d}""" vocabulary.Tokens.Length contextLength
    let lm = CausalLm.create (ModelConfig.parse "test" config) 2L
    Functional.Checkpoint.HfModelFolder.save folder lm None []
    Functional.Text.BpeTraining.save vocabulary folder

[<Tests>]
let tests =
    testSequenced
    <| testList
        "new user limits"
        [ test "finding 3: a NaN weight is refused at load, naming the file and the tensor, with exit 2 and nothing written" {
              use folder = new TempFolder()
              let file = nanModel gpt2 (folder.File "model")
              let output = folder.File "out"
              let run =
                  runCli
                      [ "train"; "--model"; folder.File "model"; "--data"; Path.Combine(gpt2, "data.jsonl"); "--output"; output
                        "--max-steps"; "2"; "--no-data-cache" ]
              expectExit 2 run
              expectMessage run [ file + ":transformer.wte.weight"; "1 NaN or infinite value(s)" ]
              Expect.isFalse (Directory.Exists output) "nothing is written"
          }

          test "finding 3: --learning-rate 1e30 stops at the first non-finite step with exit 2, a hint, and no final model" {
              use folder = new TempFolder()
              let output = folder.File "out"
              let run = runCli (trainArgs gpt2 (Path.Combine(gpt2, "data.jsonl")) output [ "--max-steps"; "6"; "--learning-rate"; "1e30" ])
              expectExit 2 run
              expectMessage run [ "step 2: the loss is NaN"; "--learning-rate (1e+30 now)" ]
              Expect.isFalse (Directory.Exists output) "the new output folder is removed: no final/, no metrics.jsonl"
          }

          test "finding 3: weights that an update makes infinite are caught on the first step, whatever the loss" {
              use folder = new TempFolder()
              let output = folder.File "out"
              let run = runCli (trainArgs llama (Path.Combine(llama, "data.jsonl")) output [ "--max-steps"; "2"; "--learning-rate"; "1e39" ])
              expectExit 2 run
              expectMessage run [ "step 1: the weights hold NaN or infinite values after the update" ]
              Expect.isFalse (Directory.Exists output) "nothing is left"
          }

          test "finding 3: a diverged run keeps the checkpoints saved before it and writes no final/ nor a non-finite checkpoint" {
              use folder = new TempFolder()
              let output = folder.File "out"
              let run =
                  runCli (trainArgs gpt2 (Path.Combine(gpt2, "data.jsonl")) output [ "--max-steps"; "6"; "--learning-rate"; "1e30"; "--save-steps"; "1" ])
              expectExit 2 run
              Expect.isTrue (Directory.Exists(Path.Combine(output, "checkpoint-1"))) "the checkpoint of the finite step 1 stays"
              Expect.isFalse (Directory.Exists(Path.Combine(output, "checkpoint-2"))) "no checkpoint of the diverged step"
              Expect.isFalse (Directory.Exists(Path.Combine(output, "final"))) "no final/"
              let weights = Functional.Checkpoint.Safetensors.load (Path.Combine(output, "checkpoint-1", "model.safetensors"))
              for KeyValue(name, tensor) in weights do
                  use finite = TorchSharp.torch.isfinite tensor
                  use all = finite.all ()
                  Expect.isTrue (all.item<bool> ()) (sprintf "%s of checkpoint-1 is finite" name)
                  tensor.Dispose()
          }

          test "finding 3: TrainingLoop.ensureFinite refuses a NaN in the flat parameters, naming the step" {
              Functional.Runtime.TorchRuntime.ensure ()
              use p = new TorchSharp.Modules.Parameter(TorchSharp.torch.ones(3L))
              let flat = Functional.Optim.FlatParameters.create [ struct ("w", p) ]
              TrainingLoop.ensureFinite TrainOptions.defaults 7 flat
              do
                  use _ = TorchSharp.torch.no_grad ()
                  flat.Values[1L].fill_(Double.NaN) |> ignore
              expectInvalidInput "step 7" "" [ "the weights hold NaN or infinite values"; "--learning-rate" ] (fun () ->
                  TrainingLoop.ensureFinite TrainOptions.defaults 7 flat)
              flat.Dispose()
          }

          test "finding 4: a GPT-2 row longer than n_positions trains by default, cut to the model's context, end to end" {
              use folder = new TempFolder()
              let data = folder.File "long.jsonl"
              writeLongData gpt2 data
              let output = folder.File "out"
              let run = runCli (trainArgs gpt2 data output [ "--no-shuffle"; "--max-steps"; "1" ])
              expectExit 0 run
              Expect.isTrue (Directory.Exists(Path.Combine(output, "final"))) "final/ is written"
              let rows = readJsonLines data
              let second = rows[1].GetProperty("input_ids").GetArrayLength()
              let step = (readJsonLines (Path.Combine(output, "metrics.jsonl")))[0]
              Expect.equal (step.GetProperty("num_tokens").GetInt64()) (int64 (63 + second - 1)) "the long row is cut to 64 tokens (63 predicted)"
          }

          test "finding 4: --max-seq-len above n_positions or max_position_embeddings is refused before anything is written" {
              use folder = new TempFolder()
              let data = folder.File "long.jsonl"
              writeLongData gpt2 data
              for golden, value, field in [ gpt2, "512", "n_positions = 64"; llama, "100", "max_position_embeddings = 64" ] do
                  let output = folder.File "out"
                  let run = runCli (trainArgs golden data output [ "--max-steps"; "2"; "--max-seq-len"; value ])
                  expectExit 2 run
                  expectMessage run [ "--max-seq-len: " + value + " exceeds the model's context"; field ]
                  Expect.isFalse (Directory.Exists output) "nothing is written"
          }

          test "finding 4: LLaMA's rows default to max_position_embeddings, less a prefix's tokens" {
              let config = ModelConfig.load (Path.Combine(llama, "model", "config.json"))
              Expect.equal (TrainOptions.sequenceLength TrainOptions.defaults config 0) 64 "the model's context"
              Expect.equal (TrainOptions.sequenceLength TrainOptions.defaults config 10) 54 "the positions a prefix leaves"
              Expect.equal (TrainOptions.sequenceLength { TrainOptions.defaults with MaxSeqLen = 32 } config 0) 32 "an explicit value that fits"
              expectInvalidInput "--num-prefix-tokens" "" [ "max_position_embeddings" ] (fun () ->
                  TrainOptions.sequenceLength TrainOptions.defaults config 63 |> ignore)
          }

          test "finding 4: LLaMA prefix tuning counts the prefix against max_position_embeddings before anything is written" {
              use folder = new TempFolder()
              let data = folder.File "long.jsonl"
              writeLongData llama data
              let output = folder.File "out"
              let request =
                  { FineTune.request (Path.Combine(llama, "model")) data output with
                      Options = { TrainOptions.defaults with MaxSteps = 1; MaxSeqLen = 64 }
                      Prefix = Some { NumPrefixTokens = 8; AdapterPath = None } }
              expectInvalidInput "--num-prefix-tokens" "" [ "need 72 positions"; "max_position_embeddings = 64" ] (fun () ->
                  FineTune.run request ignore |> ignore)
              Expect.isFalse (Directory.Exists output) "nothing is written"
          }

          test "finding 4: generate refuses a LLaMA prompt longer than the context, naming the prompt, its tokens and the limit" {
              use folder = new TempFolder()
              let model = folder.File "model"
              llamaWithTokenizer model 16
              let long = String.replicate 10 "the cat sat on the mat "
              let run = runCli [ "generate"; "--model"; model; "--prompt"; "the cat"; "--prompt"; long; "--greedy" ]
              expectExit 2 run
              expectMessage run [ "prompts:prompt 2: has "; "max_position_embeddings = 16"; "at most 16 fit" ]
          }

          test "finding 4: generate stops at the model's context and says so in one line" {
              use folder = new TempFolder()
              let model = folder.File "model"
              llamaWithTokenizer model 16
              let run = runCli [ "generate"; "--model"; model; "--prompt"; "the cat"; "--greedy"; "--max-new-tokens"; "64" ]
              expectExit 0 run
              let notes = run.Stderr.Split('\n') |> Array.filter (fun line -> line.StartsWith "note: generation stops at the model's context")
              Expect.equal notes.Length 1 (sprintf "one note (stderr: %s)" run.Stderr)
              Expect.stringContains notes[0] "max_position_embeddings = 16" "the note names the limit"
              Expect.stringContains notes[0] "instead of --max-new-tokens 64" "and the option it overrides"
          }

          test "finding 4: exact-match scoring leaves out prompts longer than the context instead of failing after training" {
              use folder = new TempFolder()
              let model = folder.File "model"
              llamaWithTokenizer model 16
              let lm = Functional.Checkpoint.HfModelFolder.load model 1L
              let tokenizer = Functional.Text.Tokenizers.fromFolder model
              let long: Functional.Data.Sample = { Prompt = String.replicate 10 "the cat sat on the mat "; Answer = "x"; Line = 1 }
              let short: Functional.Data.Sample = { long with Prompt = "the cat"; Line = 2 }
              Expect.isNone (FineTune.exactMatch lm tokenizer [| long |] 5 4) "nothing fits: no score"
              Expect.isSome (FineTune.exactMatch lm tokenizer [| long; short |] 5 4) "the prompt that fits is scored"
          }

          test "finding 4: a run that fails mid-way in an empty output folder leaves it empty, so the next run is not blocked" {
              use folder = new TempFolder()
              let output = folder.File "out"
              Directory.CreateDirectory output |> ignore
              let failed = runCli (trainArgs gpt2 (Path.Combine(gpt2, "data.jsonl")) output [ "--max-steps"; "6"; "--learning-rate"; "1e30" ])
              expectExit 2 failed
              Expect.isTrue (Directory.Exists output) "the user's folder stays"
              Expect.isEmpty (Directory.GetFileSystemEntries output) "no metrics.jsonl, events or plot left behind"
              let next = runCli (trainArgs gpt2 (Path.Combine(gpt2, "data.jsonl")) output [ "--max-steps"; "2" ])
              expectExit 0 next
              Expect.isTrue (Directory.Exists(Path.Combine(output, "final"))) "the next run writes its final/"
          } ]
