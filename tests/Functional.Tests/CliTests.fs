/// End-to-end tests of the `functional` command, run as a separate process like a user would.
module Functional.Tests.CliTests

open System
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json
open Expecto
open Functional.Tests.TestUtil

/// Arguments that train the small golden LLaMA for two steps.
let private trainArgs (model: string) (data: string) (output: string) =
    [ "train"; "--model"; model; "--data"; data; "--output"; output
      "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; "2"
      "--max-seq-len"; "32"; "--learning-rate"; "1e-3" ]

/// A scratch copy of the golden LLaMA model and data, plus an output folder that already holds an
/// earlier run's files (so "untouched" is checked against real content).
type private Scratch() =
    let root = new TempFolder()
    do
        copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (root.File "model")
        File.Copy(Path.Combine(goldenDir "llama-cosine", "data.jsonl"), root.File "data.jsonl")
        Directory.CreateDirectory(root.File "out/final") |> ignore
        File.WriteAllText(root.File "out/metrics.jsonl", "{\"step\": 1, \"loss\": 1.0}\n")
        File.WriteAllText(root.File "out/final/config.json", "{\"earlier\": true}")
    member _.Model = root.File "model"
    member _.Data = root.File "data.jsonl"
    member _.Output = root.File "out"
    member _.File name = root.File name
    interface IDisposable with
        member _.Dispose() = (root :> IDisposable).Dispose()

/// Runs a bad-input case: exit code 2, a message naming what is wrong, no stack trace, output untouched.
let private rejects (name: string) (breakIt: Scratch -> string list -> string list) (expectedInMessage: Scratch -> string list) =
    test name {
        use s = new Scratch()
        let before = snapshot s.Output
        let args = breakIt s (trainArgs s.Model s.Data s.Output @ [ "--overwrite-output-dir" ])
        let run = runCli args
        Expect.equal run.ExitCode 2 (sprintf "exit code 2 (stderr: %s)" run.Stderr)
        for part in expectedInMessage s do
            Expect.stringContains run.Stderr part "the message names the input and the problem"
        Expect.isFalse (run.Stderr.Contains "   at ") "no stack trace"
        Expect.equal (snapshot s.Output) before "the existing output folder is exactly as it was"
    }

let private replaceOption (name: string) (value: string) (args: string list) =
    let i = List.findIndex ((=) name) args
    List.updateAt (i + 1) value args

let private writeSafetensorsHeader (path: string) (headerLength: uint64) (header: string) (dataBytes: int) =
    use f = File.Create path
    let write (bytes: byte[]) = f.Write(bytes, 0, bytes.Length)
    write (BitConverter.GetBytes headerLength)
    write (Encoding.UTF8.GetBytes header)
    write (Array.zeroCreate<byte> dataBytes)

let private badInput =
    testList "bad input" [
        rejects "missing config.json" (fun s a -> File.Delete(Path.Combine(s.Model, "config.json")); a)
            (fun s -> [ "config.json"; "not found" ])
        rejects "malformed config.json" (fun s a -> File.WriteAllText(Path.Combine(s.Model, "config.json"), "{\"model_type\": \"llama\",\n  \"vocab_size\": }"); a)
            (fun s -> [ "config.json"; "JSON" ])
        rejects "safetensors with a truncated header" (fun s a ->
            writeSafetensorsHeader (Path.Combine(s.Model, "model.safetensors")) 4096UL "{\"a\":" 0; a)
            (fun s -> [ "model.safetensors"; "header" ])
        rejects "safetensors with offsets past the end" (fun s a ->
            let header = "{\"model.norm.weight\":{\"dtype\":\"F32\",\"shape\":[32],\"data_offsets\":[0,128]}}"
            writeSafetensorsHeader (Path.Combine(s.Model, "model.safetensors")) (uint64 header.Length) header 16; a)
            (fun s -> [ "model.safetensors"; "model.norm.weight" ])
        rejects "safetensors with an unknown dtype" (fun s a ->
            let header = "{\"model.norm.weight\":{\"dtype\":\"Q4\",\"shape\":[32],\"data_offsets\":[0,128]}}"
            writeSafetensorsHeader (Path.Combine(s.Model, "model.safetensors")) (uint64 header.Length) header 128; a)
            (fun s -> [ "model.safetensors"; "Q4" ])
        rejects "weights whose shapes disagree with the config" (fun s a ->
            let config = Path.Combine(s.Model, "config.json")
            File.WriteAllText(config, File.ReadAllText(config).Replace("\"intermediate_size\": 64", "\"intermediate_size\": 48")); a)
            (fun s -> [ "model.safetensors"; "mlp" ])
        rejects "a JSONL line that is not JSON" (fun s a ->
            File.AppendAllText(s.Data, "{\"input_ids\": [1, 2,\n"); a)
            (fun s -> [ s.Data + ":14"; "JSON" ])
        rejects "a JSONL line without input_ids" (fun s a ->
            let lines = File.ReadAllLines s.Data
            lines[2] <- "{\"text\": \"hello\"}"
            File.WriteAllLines(s.Data, lines); a)
            (fun s -> [ s.Data + ":3"; "input_ids" ])
        rejects "an empty dataset" (fun s a -> File.WriteAllText(s.Data, ""); a)
            (fun s -> [ s.Data; "no samples" ])
        rejects "batch size 0" (fun _ a -> replaceOption "--per-device-train-batch-size" "0" a)
            (fun _ -> [ "--per-device-train-batch-size"; "at least 1" ])
        rejects "accumulation 0" (fun _ a -> replaceOption "--gradient-accumulation-steps" "0" a)
            (fun _ -> [ "--gradient-accumulation-steps"; "at least 1" ])
        rejects "a negative learning rate" (fun _ a -> replaceOption "--learning-rate" "-0.1" a)
            (fun _ -> [ "--learning-rate"; ">= 0" ])
        rejects "warmup longer than the run" (fun _ a -> a @ [ "--num-warmup-steps"; "5" ])
            (fun _ -> [ "--num-warmup-steps"; "longer than the run" ])
        rejects "an unknown scheduler name" (fun _ a -> a @ [ "--lr-scheduler-type"; "cosine_wave" ])
            (fun _ -> [ "--lr-scheduler-type"; "cosine_wave" ])
        rejects "a token id outside the vocabulary" (fun s a -> File.AppendAllText(s.Data, "{\"input_ids\": [1, 96]}\n"); a)
            (fun s -> [ s.Data + ":14"; "vocab" ])
        test "a non-empty output folder without --overwrite-output-dir is refused" {
            use s = new Scratch()
            let before = snapshot s.Output
            let run = runCli (trainArgs s.Model s.Data s.Output)
            Expect.equal run.ExitCode 2 "exit code 2"
            Expect.stringContains run.Stderr "--overwrite-output-dir" "says how to proceed"
            Expect.equal (snapshot s.Output) before "untouched"
        }
    ]

/// A small LLaMA folder with a byte-level BPE tokenizer trained on the task's text, and task data as
/// DeepSpeed-Chat JSON Lines (prompt/chosen).
type private TextScratch() =
    let root = new TempFolder()
    let samples = Functional.Training.EmbeddedTask.samples 5 40 false
    do
        let model = root.File "model"
        Functional.Text.BpeTraining.trainToFolder [ for s in samples -> s.Prompt + s.Answer ] 40 model
        let vocab = (Functional.Text.Tokenizers.fromFolder model).VocabSize
        let config =
            sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": true}""" vocab
        let lm = Functional.Models.CausalLm.create (Functional.Models.ModelConfig.parse "test" config) 1L
        let weights = root.File "weights"
        Functional.Checkpoint.HfModelFolder.save weights lm None []
        for f in Directory.GetFiles weights do File.Copy(f, Path.Combine(model, Path.GetFileName f))
        File.WriteAllLines(root.File "data.jsonl", [ for s in samples -> JsonSerializer.Serialize(dict [ "prompt", s.Prompt; "chosen", s.Answer ]) ])
    member _.Model = root.File "model"
    member _.Data = root.File "data.jsonl"
    member _.File name = root.File name
    interface IDisposable with
        member _.Dispose() = (root :> IDisposable).Dispose()

let private textArgs (s: TextScratch) output =
    [ "train"; "--model"; s.Model; "--data"; s.Data; "--output"; output; "--per-device-train-batch-size"; "4"
      "--gradient-accumulation-steps"; "2"; "--max-steps"; "4"; "--max-seq-len"; "32"; "--learning-rate"; "1e-3"; "--no-data-cache" ]

let private textData =
    testList "text data" [
        test "prompt/chosen data trains on completions, holds out an evaluation split and scores exact match" {
            use s = new TextScratch()
            let output = s.File "out"
            let run = runCli (textArgs s output @ [ "--train-on"; "completion"; "--eval-split-ratio"; "0.25"; "--exact-match-samples"; "4"; "--eval-steps"; "2" ])
            Expect.equal run.ExitCode 0 (sprintf "exit code 0 (stderr: %s)" run.Stderr)
            let lines = readJsonLines (Path.Combine(output, "metrics.jsonl"))
            let evalSteps = lines |> Array.filter (fun l -> l.TryGetProperty("eval_loss") |> fst) |> Array.map (fun l -> l.GetProperty("step").GetInt32())
            Expect.equal evalSteps [| 0; 2; 4; 4 |] "evaluation before training, every 2 steps, and in the summary"
            let exact = lines[lines.Length - 1].GetProperty("eval_exact_match").GetDouble()
            Expect.isTrue (exact >= 0.0 && exact <= 1.0) "exact match is a fraction"
            for file in [ "vocab.json"; "merges.txt"; "tokenizer_config.json" ] do
                Expect.isTrue (File.Exists(Path.Combine(output, "final", file))) (file + " is copied to final/")
        }
        test "a prompt with nothing left to train on stops the run, or is skipped and counted with --skip-bad-rows" {
            use s = new TextScratch()
            File.AppendAllText(s.Data, JsonSerializer.Serialize(dict [ "prompt", String.replicate 40 " Human:"; "chosen", " a" ]) + "\n")
            let failed = runCli (textArgs s (s.File "a") @ [ "--train-on"; "completion" ])
            Expect.equal failed.ExitCode 2 "bad input"
            Expect.stringContains failed.Stderr (s.Data + ":41") "names file and line"
            Expect.stringContains failed.Stderr "nothing left to train on" "says what is wrong"
            Expect.isFalse (Directory.Exists(s.File "a")) "nothing is written"
            let skipped = runCli (textArgs s (s.File "b") @ [ "--train-on"; "completion"; "--skip-bad-rows" ])
            Expect.equal skipped.ExitCode 0 skipped.Stderr
            Expect.stringContains skipped.Stdout "skipped 1 bad rows" "the skip is counted"
        }
        test "an unknown tokenizer file names the file" {
            use s = new TextScratch()
            for f in [ "vocab.json"; "merges.txt" ] do File.Delete(Path.Combine(s.Model, f))
            File.WriteAllText(Path.Combine(s.Model, "tokenizer.json"), "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}")
            let run = runCli (textArgs s (s.File "out"))
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "tokenizer.json" "names the file"
        }
        test "text data for a model folder without a tokenizer asks for one" {
            use s = new TextScratch()
            for f in [ "vocab.json"; "merges.txt"; "tokenizer_config.json"; "special_tokens_map.json" ] do File.Delete(Path.Combine(s.Model, f))
            let run = runCli (textArgs s (s.File "out"))
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "--tokenizer" "says how to proceed"
        }
    ]

[<Tests>]
let tests =
    testList "cli" [
        textData
        test "functional doctor prints the versions, the backend, threads, the libstdc++ workaround, MPI and the cache folder" {
            use folder = new TempFolder()
            let run = runCliWith [ "FUNCTIONAL_CACHE", Some(folder.File "cache") ] [ "doctor" ]
            Expect.equal run.ExitCode 0 run.Stderr
            for name in [ "functional:"; ".NET:"; "TorchSharp:"; "libtorch:"; "backend:"; "threads:"; "libstdc++ workaround:"; "malloc tuning:"; "MPI library:"; "mpirun:"; "data cache:" ] do
                Expect.stringContains run.Stdout name (sprintf "a %s line" name)
            Expect.stringContains run.Stdout (folder.File "cache") "the cache folder $FUNCTIONAL_CACHE names"
            Expect.stringContains run.Stdout "cpu" "the backend"
            let version = runCli [ "--version" ]
            Expect.equal version.ExitCode 0 version.Stderr
            Expect.stringContains run.Stdout (version.Stdout.Trim().Split('+')[0]) "doctor's version is --version's"
        }
        test "shell completion: [suggest] prints what may follow the line typed so far" {
            let suggest line =
                let run = runCli [ "[suggest]"; line ]
                Expect.equal run.ExitCode 0 run.Stderr
                run.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.map (fun s -> s.Trim()) |> Set.ofArray
            Expect.equal (suggest "functional tr") (set [ "train" ]) "a command"
            Expect.isTrue (Set.isSubset (set [ "--lr-scheduler-type"; "--lr-scheduler-kwargs" ]) (suggest "functional train --lr-sch")) "options"
            Expect.isTrue (Set.isSubset (set [ "memory"; "train"; "generation" ]) (suggest "functional bench ")) "subcommands after a space"
        }
        test "train writes metrics.jsonl and an HF model folder; snake_case aliases work" {
            use s = new Scratch()
            let output = s.File "fresh"
            let args =
                [ "train"; "--model_name_or_path"; s.Model; "--data"; s.Data; "--output_dir"; output
                  "--per_device_train_batch_size"; "2"; "--gradient_accumulation_steps"; "2"; "--max_steps"; "3"
                  "--max_seq_len"; "32"; "--lr_scheduler_type"; "cosine"; "--num_warmup_steps"; "1"; "--seed"; "7" ]
            let run = runCli args
            Expect.equal run.ExitCode 0 (sprintf "exit code 0 (stderr: %s)" run.Stderr)
            let lines = readJsonLines (Path.Combine(output, "metrics.jsonl"))
            Expect.equal (lines |> Array.map (fun l -> l.GetProperty("step").GetInt32())) [| 1; 2; 3; 3 |] "one line per step, then the summary"
            Expect.isTrue (lines[3].TryGetProperty("train_runtime") |> fst) "the summary has train_runtime"
            let lines = lines[..2]
            for l in lines do
                for field in [ "loss"; "lr"; "grad_norm" ] do
                    Expect.isTrue (l.TryGetProperty(field) |> fst) (sprintf "metrics carry %s" field)
            Expect.equal (lines[0].GetProperty("lr").GetDouble()) 0.0 "the first update uses lr 0 with warmup"
            Expect.isTrue (File.Exists(Path.Combine(output, "final", "config.json"))) "final/config.json"
            Expect.isTrue (File.Exists(Path.Combine(output, "final", "model.safetensors"))) "final/model.safetensors"
        }
        test "same seed, same result; shuffled runs differ from file order" {
            use s = new Scratch()
            let go name extra =
                let output = s.File name
                let run = runCli (trainArgs s.Model s.Data output @ extra)
                Expect.equal run.ExitCode 0 run.Stderr
                // The last line holds timings (train_runtime, ...); every line before it is deterministic.
                let lines = File.ReadAllLines(Path.Combine(output, "metrics.jsonl"))
                File.ReadAllBytes(Path.Combine(output, "final", "model.safetensors")), lines[.. lines.Length - 2]
            let a = go "a" [ "--seed"; "5" ]
            let b = go "b" [ "--seed"; "5" ]
            let c = go "c" [ "--seed"; "5"; "--no-shuffle" ]
            Expect.equal (fst a) (fst b) "identical weights"
            Expect.equal (snd a) (snd b) "identical metrics"
            Expect.notEqual (fst a) (fst c) "shuffling changes the result"
        }
        test "--help lists the train command" {
            let run = runCli [ "--help" ]
            Expect.equal run.ExitCode 0 "exit code 0"
            Expect.stringContains run.Stdout "train" "mentions train"
        }
        badInput
    ]
