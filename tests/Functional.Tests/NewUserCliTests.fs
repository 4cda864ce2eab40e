/// Issue 12's findings 5, 8 and 10, run as a new user would: unwritable outputs, flags copied from HF Trainer and
/// DeepSpeed(-Chat) scripts, free-text arguments, help, and paths of the wrong kind.
module Functional.Tests.NewUserCliTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Expecto
open Functional.Tests.TestUtil

/// A scratch copy of the golden LLaMA model (101 KB of weights) and its 13 pre-tokenized rows.
type private Scratch() =
    let root = new TempFolder()
    do
        copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (root.File "model")
        File.Copy(Path.Combine(goldenDir "llama-cosine", "data.jsonl"), root.File "data.jsonl")
    member _.Model = root.File "model"
    member _.Data = root.File "data.jsonl"
    member _.File name = root.File name
    interface IDisposable with
        member _.Dispose() = (root :> IDisposable).Dispose()

/// Arguments that train the golden LLaMA for a few steps into output.
let private trainArgs (s: Scratch) (output: string) =
    [ "train"; "--model"; s.Model; "--data"; s.Data; "--output"; output
      "--max-steps"; "2"; "--max-seq-len"; "32"; "--seed"; "7" ]

/// The arguments with an option's value replaced, or the option added.
let private setOption (name: string) (value: string) (args: string list) =
    match List.tryFindIndex ((=) name) args with
    | Some i -> List.updateAt (i + 1) value args
    | None -> args @ [ name; value ]

let private expectExit (code: int) (run: CliRun) =
    Expect.equal run.ExitCode code (sprintf "exit code %d (stdout: %s; stderr: %s)" code run.Stdout run.Stderr)

/// Exit code 2, one `error:` line holding every part, no stack trace, no "please report".
let private expectOneLineError (parts: string list) (run: CliRun) =
    expectExit 2 run
    let errors = run.Stderr.Split('\n') |> Array.filter (fun l -> l.StartsWith "error:")
    Expect.equal errors.Length 1 (sprintf "one error line (stderr: %s)" run.Stderr)
    for part in parts do
        Expect.stringContains errors[0] part "the message names the input and the problem"
    Expect.isFalse (run.Stderr.Contains "   at ") "no stack trace"
    Expect.isFalse (run.Stderr.Contains "please report") "not reported as an internal error"

let private finalWeights (output: string) = File.ReadAllBytes(Path.Combine(output, "final", "model.safetensors"))

let private metricsSteps (output: string) =
    readJsonLines (Path.Combine(output, "metrics.jsonl"))
    |> Array.filter (fun l -> l.TryGetProperty("loss") |> fst)
    |> Array.map (fun l -> l.GetProperty("step").GetInt32())
    |> List.ofArray

let private eventFiles (folder: string) =
    if Directory.Exists folder then Directory.GetFiles(folder, "events.out.tfevents.*") else [||]

/// Runs body with a tmpfs mounted at a fresh folder (mount options such as "ro" or "size=64k"), unmounting after;
/// skips the test where mounting is not permitted (not root, or a container without CAP_SYS_ADMIN).
let private withTmpfs (options: string) (body: string -> unit) =
    use folder = new TempFolder()
    let mountPoint = folder.File "mnt"
    Directory.CreateDirectory mountPoint |> ignore
    let run (program: string) (args: string list) =
        let info = ProcessStartInfo(program, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
        for a in args do info.ArgumentList.Add a
        try
            use p = Process.Start info
            let error = p.StandardError.ReadToEnd()
            p.WaitForExit()
            p.ExitCode, error
        with e -> -1, e.Message
    match run "mount" [ "-t"; "tmpfs"; "-o"; options; "tmpfs"; mountPoint ] with
    | 0, _ ->
        try body mountPoint
        finally run "umount" [ mountPoint ] |> ignore
    | _, error -> skiptestf "mounting a tmpfs is not permitted here (%s)" (error.Trim())

/// Runs a copy of the CLI's managed assemblies without TorchSharp.dll (and without the native libraries): a command
/// that starts TorchSharp fails there, one that needs no tensors runs.
let private runWithoutTorchSharp (args: string list) =
    use copy = new TempFolder()
    for file in Directory.GetFiles AppContext.BaseDirectory do
        let name = Path.GetFileName file
        if name.StartsWith "Functional" || name.StartsWith "FSharp" || name.StartsWith "Microsoft.ML" || name.StartsWith "System.CommandLine"
           || name.StartsWith "Spectre" || name.StartsWith "Google.Protobuf" then
            File.Copy(file, copy.File name)
    let info = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    info.ArgumentList.Add(copy.File "Functional.Cli.dll")
    for a in args do info.ArgumentList.Add a
    use p = Process.Start info
    let stdout = p.StandardOutput.ReadToEndAsync()
    let stderr = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    { ExitCode = p.ExitCode; Stdout = stdout.Result; Stderr = stderr.Result }

let private cl100k = lazy (Functional.Text.Tokenizers.fromEncoding "cl100k_base")

let private idsOf (text: string) = cl100k.Force().Encode text |> Seq.map string |> String.concat " "

let private finding5 =
    testList "finding 5" [
        test "finding 5: an output folder on a read-only file system stops the run before training: one line, exit 2" {
            use s = new Scratch()
            withTmpfs "ro,size=64k" (fun readOnly ->
                let run = runCli (trainArgs s (Path.Combine(readOnly, "out")))
                expectOneLineError [ Path.Combine(readOnly, "out"); "not writable"; "Read-only file system" ] run
                Expect.isFalse (run.Stdout.Contains "step 1/") "stopped before training")
        }
        test "finding 5: an output path below a regular file is one line naming the path, exit 2, and nothing is created" {
            use s = new Scratch()
            let output = Path.Combine(s.Data, "out")
            let run = runCli (trainArgs s output)
            expectOneLineError [ output; s.Data + " is a file" ] run
        }
        test "finding 5: a disk that fills up while the model is saved is one line with the reason, exit 2" {
            use s = new Scratch()
            // 64 KB take the probe and the metrics, not the 101 KB of final/model.safetensors.
            withTmpfs "size=64k" (fun small ->
                let run = runCli (trainArgs s (Path.Combine(small, "out")))
                expectOneLineError [ "No space left on device" ] run)
        }
        test "finding 5: an output folder in /proc, which takes no new folders, is one line saying so, exit 2" {
            use s = new Scratch()
            let output = sprintf "/proc/functional-test-%d" Environment.ProcessId
            expectOneLineError [ output; "cannot be created there" ] (runCli (trainArgs s output))
        }
        test "finding 5: the write probe leaves a new output folder absent when validation fails later" {
            use s = new Scratch()
            let output = s.File "fresh/out"
            let run = runCli (trainArgs s output @ [ "--lr-scheduler-type"; "cosine_wave" ])
            expectExit 2 run
            Expect.isFalse (Directory.Exists(s.File "fresh")) "no folder left behind by the probe"
        }
    ]

/// A DeepSpeed config as DeepSpeed-Chat and HF examples write them: "auto" values, ZeRO, a key with no effect.
let private deepSpeedConfig =
    """{
  "train_batch_size": 4,
  "train_micro_batch_size_per_gpu": 2,
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": 0.5,
  "steps_per_print": 10,
  "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 100, "hysteresis": 1, "min_loss_scale": 1},
  "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 1, "total_num_steps": 3, "warmup_max_lr": "auto"}},
  "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}
}"""

let private finding8 =
    testList "finding 8" [
        test "finding 8: HF and DeepSpeed flags with no effect here are accepted with a one-line note each" {
            use s = new Scratch()
            let flags =
                [ "--do_train"; "--dataloader_num_workers"; "4"; "--local_rank=0"; "--save_safetensors"; "--print_loss"
                  "--num_padding_at_beginning"; "1"; "--zero_stage"; "3"; "--offload" ]
            let run = runCli (trainArgs s (s.File "out") @ flags)
            expectExit 0 run
            for flag in [ "--do-train"; "--dataloader-num-workers"; "--local-rank"; "--save-safetensors"; "--print-loss"
                          "--num-padding-at-beginning"; "--zero-stage 3"; "--offload" ] do
                let notes = run.Stderr.Split('\n') |> Array.filter (fun l -> l.StartsWith("note: " + flag) && l.Contains "no effect")
                Expect.equal notes.Length 1 (sprintf "one note for %s (stderr: %s)" flag run.Stderr)
        }
        test "finding 8: flags that contradict what runs are refused: --local_rank 1, --save_safetensors false, --zero_stage 4" {
            use s = new Scratch()
            for flags, parts in
                [ [ "--local_rank"; "1" ], [ "--local-rank"; "distributed" ]
                  [ "--save_safetensors"; "false" ], [ "--save-safetensors"; "safetensors" ]
                  [ "--zero_stage"; "4" ], [ "--zero-stage"; "0, 1, 2 or 3" ]
                  [ "--reduce_bucket_size"; "0" ], [ "--reduce-bucket-size"; "from 1 to 2147483647" ]
                  [ "--allgather-bucket-size"; "3000000000" ], [ "--allgather-bucket-size"; "from 1 to 2147483647" ] ] do
                expectOneLineError parts (runCli (trainArgs s (s.File "out") @ flags))
                Expect.isFalse (Directory.Exists(s.File "out")) "nothing written"
        }
        test "finding 8: --report_to none writes no TensorBoard events; --logging_dir puts them in its folder" {
            use s = new Scratch()
            let none = runCli (trainArgs s (s.File "none") @ [ "--report_to"; "none" ])
            expectExit 0 none
            Expect.isEmpty (eventFiles (s.File "none")) "no event file with --report_to none"
            let logs = s.File "logs"
            let moved = runCli (trainArgs s (s.File "moved") @ [ "--report_to"; "tensorboard"; "--logging_dir"; logs ])
            expectExit 0 moved
            Expect.isEmpty (eventFiles (s.File "moved")) "no event file in the output folder"
            Expect.hasLength (eventFiles logs) 1 "the event file is in --logging_dir"
            let other = runCli (trainArgs s (s.File "wandb") @ [ "--report_to"; "wandb" ])
            expectExit 0 other
            Expect.stringContains other.Stderr "note: --report-to wandb: not available here" "a note for integrations not available here"
            Expect.isEmpty (eventFiles (s.File "wandb")) "TensorBoard is not among the integrations asked for"
        }
        test "finding 8: --logging_strategy epoch logs the end of each epoch and no logs only the last step" {
            use s = new Scratch()
            // 13 rows in micro-batches of 2: 7 steps per epoch.
            let train output strategy =
                let run = runCli (trainArgs s output |> setOption "--max-steps" "9" |> setOption "--per-device-train-batch-size" "2" |> setOption "--logging_strategy" strategy)
                expectExit 0 run
                metricsSteps output
            Expect.equal (train (s.File "epoch") "epoch") [ 7; 9 ] "epoch ends and the last step"
            Expect.equal (train (s.File "no") "no") [ 9 ] "only the last step"
            Expect.hasLength (train (s.File "steps") "steps") 9 "every step"
            expectOneLineError [ "--logging-strategy"; "no, steps or epoch" ] (runCli (trainArgs s (s.File "bad") @ [ "--logging_strategy"; "often" ]))
        }
        test "finding 8: --torch_dtype bfloat16 and --dtype bf16 train as --bf16; a contradicting precision is refused" {
            use s = new Scratch()
            let train output flags =
                let run = runCli (trainArgs s output @ flags)
                expectExit 0 run
                finalWeights output
            let bf16 = train (s.File "bf16") [ "--bf16" ]
            Expect.equal (train (s.File "torch") [ "--torch_dtype"; "bfloat16" ]) bf16 "--torch_dtype bfloat16 is --bf16"
            Expect.equal (train (s.File "dtype") [ "--dtype"; "bf16" ]) bf16 "--dtype bf16 is --bf16"
            Expect.notEqual (train (s.File "fp32") [ "--torch_dtype"; "float32" ]) bf16 "float32 is not bf16"
            expectOneLineError [ "--dtype"; "fp16"; "--bf16" ] (runCli (trainArgs s (s.File "x") @ [ "--bf16"; "--dtype"; "fp16" ]))
            expectOneLineError [ "--torch-dtype"; "int8"; "bfloat16, float16, float32" ] (runCli (trainArgs s (s.File "x") @ [ "--torch_dtype"; "int8" ]))
        }
        test "finding 8: --deepspeed ds.json trains exactly as the flags it stands for" {
            use s = new Scratch()
            File.WriteAllText(s.File "ds.json", deepSpeedConfig)
            let common = [ "train"; "--model"; s.Model; "--data"; s.Data; "--max-seq-len"; "32"; "--seed"; "7" ]
            let fromFile = runCli (common @ [ "--output"; s.File "ds"; "--deepspeed"; s.File "ds.json" ])
            expectExit 0 fromFile
            Expect.stringContains fromFile.Stderr "steps_per_print: no effect here" "keys with no effect are named"
            Expect.stringContains fromFile.Stderr "zero_optimization" "ZeRO has a note"
            let flags =
                [ "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-grad-norm"; "0.5"
                  "--fp16"; "--initial-scale-power"; "8"; "--loss-scale-window"; "100"; "--hysteresis"; "1"; "--min-loss-scale"; "1"
                  "--learning-rate"; "0.002"; "--adam-beta1"; "0.8"; "--adam-beta2"; "0.95"; "--adam-epsilon"; "1e-6"; "--weight-decay"; "0.1"
                  "--lr-scheduler-type"; "linear"; "--num-warmup-steps"; "1"; "--max-steps"; "3" ]
            expectExit 0 (runCli (common @ [ "--output"; s.File "flags" ] @ flags))
            Expect.equal (finalWeights (s.File "ds")) (finalWeights (s.File "flags")) "the same weights as the explicit flags"
            Expect.equal (metricsSteps (s.File "ds")) [ 1; 2; 3 ] "total_num_steps is --max-steps"
            let agreeing = runCli (common @ [ "--output"; s.File "agree"; "--deepspeed"; s.File "ds.json"; "--gradient-accumulation-steps"; "2"; "--fp16" ])
            expectExit 0 agreeing
        }
        test "finding 8: ds.json settings that contradict a flag, each other or DeepSpeed's batch rule are refused naming the file and field" {
            use s = new Scratch()
            let ds = s.File "ds.json"
            let refuses (json: string) (flags: string list) (parts: string list) =
                File.WriteAllText(ds, json)
                expectOneLineError parts (runCli (trainArgs s (s.File "out") @ [ "--deepspeed"; ds ] @ flags))
                Expect.isFalse (Directory.Exists(s.File "out")) "nothing written"
            refuses """{"gradient_clipping": 0.5}""" [ "--max-grad-norm"; "1.0" ] [ "--max-grad-norm"; ds; "gradient_clipping = 0.5" ]
            refuses """{"bf16": {"enabled": true}}""" [ "--fp16" ] [ ds + ":bf16.enabled"; "--fp16" ]
            refuses """{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}""" [] [ ds + ":train_batch_size"; "(2) x gradient accumulation (2)" ]
            refuses """{"optimizer": {"type": "Lamb"}}""" [] [ ds + ":optimizer.type"; "Lamb" ]
            refuses """{"optimizer": {"params": {"lr": 0.1}}, "scheduler": {"params": {"warmup_max_lr": 0.2}}}""" [] [ ds + ":scheduler.params.warmup_max_lr"; "optimizer.params.lr" ]
            refuses """{"gradient_clipping": "high"}""" [] [ ds + ":gradient_clipping"; "a number" ]
            refuses """{"zero_optimization": {"reduce_bucket_size": 1.5e0}}""" [] [ ds + ":zero_optimization.reduce_bucket_size"; "from 1 to 2147483647" ]
            refuses """{"zero_optimization": {"allgather_bucket_size": 5e8}}""" [ "--allgather-bucket-size"; "1000" ] [ "--allgather-bucket-size"; "zero_optimization.allgather_bucket_size = 500000000" ]
            refuses "{\n  \"train_batch_size\": 4,\n  \"fp16\": {\"enabled\": tru}\n}" [] [ ds + ":3:"; "not valid JSON" ]
        }
        test "finding 8: value errors name the option and say a number or an integer, not .NET types" {
            use s = new Scratch()
            for option, value, expected in
                [ "--learning-rate", "abc", "--learning-rate: expected a number, got 'abc'"
                  "--max-steps", "1.5", "--max-steps: expected an integer, got '1.5'"
                  "--save-total-limit", "two", "--save-total-limit: expected an integer, got 'two'"
                  "--warmup-ratio", "a tenth", "--warmup-ratio: expected a number, got 'a tenth'" ] do
                let run = runCli (trainArgs s (s.File "out") |> setOption option value)
                expectExit 2 run
                Expect.stringContains run.Stderr expected "plain words"
                Expect.isFalse (run.Stderr.Contains "System.") "no .NET type names"
        }
    ]

let private finding10 =
    testList "finding 10" [
        test "finding 10: a text argument starting with @ is tokenized as text, not read as a response file" {
            use folder = new TempFolder()
            File.WriteAllText(folder.File "dataclass", "--decode 1")
            let run = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "@" + folder.File "dataclass" ]
            expectExit 0 run
            Expect.equal (run.Stdout.Trim()) (idsOf ("@" + folder.File "dataclass")) "the ids of the text itself"
            let plain = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "@dataclass" ]
            expectExit 0 plain
            Expect.equal (plain.Stdout.Trim()) (idsOf "@dataclass") "the ids of @dataclass"
        }
        test "tokenize --file: one {\"ids\"} line per {\"text\"} line, --decode --file back, a bad line named by file and line" {
            use folder = new TempFolder()
            let texts = [ "Hello world!"; "中文分词：梯度累积"; ""; "𝟘𝟙 🤷🏽‍♀️ <|endoftext|>" ]
            File.WriteAllLines(folder.File "texts.jsonl", [ for t in texts -> JsonSerializer.Serialize(dict [ "text", t ]) ])
            let run = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--file"; folder.File "texts.jsonl" ]
            expectExit 0 run
            let lines = run.Stdout.TrimEnd('\n').Split('\n')
            Expect.equal lines.Length texts.Length "one line out per line in"
            let encoder = Functional.Text.Tokenizers.fromEncoding "cl100k_base"
            for text, line in List.zip texts (List.ofArray lines) do
                let ids = JsonDocument.Parse(line).RootElement.GetProperty("ids").EnumerateArray() |> Seq.map (fun e -> e.GetInt64()) |> Array.ofSeq
                Expect.equal ids (encoder.Encode text) (sprintf "the ids of %s" text)
            File.WriteAllLines(folder.File "ids.jsonl", lines)
            let back = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode"; "--file"; folder.File "ids.jsonl" ]
            expectExit 0 back
            let decoded = back.Stdout.TrimEnd('\n').Split('\n') |> Array.map (fun l -> JsonDocument.Parse(l).RootElement.GetProperty("text").GetString())
            Expect.equal (List.ofArray decoded) (texts |> List.map (fun t -> t.Replace("<|endoftext|>", ""))) "decoded back (special tokens skipped)"
            File.WriteAllLines(folder.File "bad.jsonl", [ "{\"text\": \"ok\"}"; "{\"txt\": \"typo\"}" ])
            expectOneLineError [ folder.File "bad.jsonl"; "line 2"; "\"text\"" ] (runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--file"; folder.File "bad.jsonl" ])
            File.WriteAllLines(folder.File "badids.jsonl", [ "{\"ids\": [1, -2]}" ])
            expectOneLineError [ folder.File "badids.jsonl"; "line 1"; "non-negative" ] (runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode"; "--file"; folder.File "badids.jsonl" ])
        }
        test "finding 10: -- ends the options, so a text that looks like an option is encoded" {
            let run = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--"; "--decode" ]
            expectExit 0 run
            Expect.equal (run.Stdout.Trim()) (idsOf "--decode") "the ids of --decode"
        }
        test "finding 10: --decode \"\" decodes no ids to the empty text, and an empty text encodes to no ids" {
            let decoded = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode"; "" ]
            expectExit 0 decoded
            Expect.equal decoded.Stdout Environment.NewLine "an empty line"
            let encoded = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "" ]
            expectExit 0 encoded
            Expect.equal encoded.Stdout Environment.NewLine "an empty line"
            let missing = runCli [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode" ]
            expectOneLineError [ "--decode"; "expected token ids" ] missing
        }
        test "finding 10: tokenize does not start TorchSharp (it runs where TorchSharp is absent), train does" {
            let run = runWithoutTorchSharp [ "tokenize"; "--tokenizer"; "cl100k_base"; "hello world" ]
            expectExit 0 run
            Expect.equal (run.Stdout.Trim()) (idsOf "hello world") "the ids"
            let decoded = runWithoutTorchSharp [ "tokenize"; "--tokenizer"; "cl100k_base"; "--decode"; "15339" ]
            expectExit 0 decoded
            Expect.equal (decoded.Stdout.Trim()) "hello" "decodes too"
            let train = runWithoutTorchSharp [ "train"; "--max-steps"; "1"; "--output"; Path.Combine(Path.GetTempPath(), "never") ]
            Expect.notEqual train.ExitCode 0 "train needs TorchSharp (so the copy really lacks it)"
            Expect.stringContains train.Stderr "TorchSharp" "TorchSharp is what is missing"
        }
        test "finding 10: functional alone prints the help, with usage named functional, and exits 0" {
            let run = runCli []
            expectExit 0 run
            Expect.stringContains run.Stdout "functional [command] [options]" "usage names functional"
            Expect.isFalse (run.Stdout.Contains "Functional.Cli") "not the assembly's name"
            Expect.stringContains run.Stdout "tokenize" "lists the commands"
        }
        test "finding 10: train --help names text data, the embedded default and the options fine-tuning requires" {
            let run = runCli [ "train"; "--help" ]
            expectExit 0 run
            Expect.stringContains run.Stdout "functional train [options]" "usage names functional"
            // The description as one line: help wraps it to the terminal's width.
            let flat = System.Text.RegularExpressions.Regex.Replace(run.Stdout, @"\s+", " ")
            Expect.stringContains flat "on text, prompt/answer or pre-tokenized data" "not pre-tokenized data only"
            Expect.stringContains flat "embedded default run" "the embedded default"
            Expect.stringContains flat "--model, --data and --output required" "says what fine-tuning requires"
            for option in [ "--model"; "--data"; "--output" ] do
                // The option's row, with the line after it (a long label puts the description there).
                let lines = run.Stdout.Split('\n')
                let at = lines |> Array.findIndex (fun l -> l.TrimStart().StartsWith(option + ","))
                let row = lines[at] + " " + lines[min (at + 1) (lines.Length - 1)]
                Expect.stringContains row "Required for fine-tuning" (sprintf "%s is marked required" option)
            for flag in [ "--deepspeed"; "--report-to"; "--torch-dtype"; "--zero-stage" ] do
                Expect.stringContains run.Stdout flag (sprintf "lists %s" flag)
        }
        test "finding 10: a model path that is a file, a config.json that is a folder and a data path that is a folder say what they are" {
            use s = new Scratch()
            expectOneLineError [ s.Data; "is a file; expected a model folder" ] (runCli (trainArgs s (s.File "out") |> List.map (fun a -> if a = s.Model then s.Data else a)))
            let folderAsData = s.File "rows"
            Directory.CreateDirectory folderAsData |> ignore
            expectOneLineError [ folderAsData; "is a folder; expected a data file" ] (runCli (trainArgs s (s.File "out") |> List.map (fun a -> if a = s.Data then folderAsData else a)))
            let config = Path.Combine(s.Model, "config.json")
            File.Delete config
            Directory.CreateDirectory config |> ignore
            expectOneLineError [ config; "is a folder; expected the model's config.json file" ] (runCli (trainArgs s (s.File "out")))
            expectOneLineError [ s.Data; "is a file; expected a model or tokenizer folder" ] (runCli [ "tokenize"; "--model"; s.Data; "hi" ])
        }
    ]

[<Tests>]
let tests = testList "new user (issue 12)" [ finding5; finding8; finding10 ]
