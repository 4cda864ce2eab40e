/// `functional train` with no arguments (the embedded default run) and `functional generate` on its
/// output, end to end through the command line.
module Functional.Tests.EmbeddedTests

open System.IO
open System.Text.Json
open Expecto
open Functional.Training
open Functional.Tests.TestUtil

let private heldOutPrompts () = EmbeddedTask.samples (EmbeddedRun.defaults.Seed + 1) 5 true

[<Tests>]
let tests =
    testSequenced <| testList "embedded" [
        test "the embedded default learns the task: held-out exact match >= 50% from near 0%, and generate answers held-out prompts" {
            use folder = new TempFolder()
            let output = folder.File "runs/embedded"
            let run = runCli [ "train"; "--output"; output ]
            Expect.equal run.ExitCode 0 (sprintf "exit code 0 (stderr: %s)" run.Stderr)
            let lines = readJsonLines (Path.Combine(output, "metrics.jsonl"))
            let before, last = lines[0], lines[lines.Length - 1]
            Expect.equal (before.GetProperty("step").GetInt32()) 0 "the first line is the evaluation before training"
            let exact = last.GetProperty("eval_exact_match").GetDouble()
            Expect.isGreaterThanOrEqual exact 0.5 "held-out exact match after training"
            Expect.isLessThanOrEqual exact 1.0 "a fraction"
            Expect.isLessThan (last.GetProperty("eval_perplexity").GetDouble()) (before.GetProperty("eval_perplexity").GetDouble()) "perplexity falls"
            Expect.floatClose Accuracy.high (last.GetProperty("eval_perplexity").GetDouble()) (exp (last.GetProperty("eval_loss").GetDouble())) "perplexity = exp(eval_loss)"
            Expect.stringContains run.Stdout "exact match        0.0%" "the report shows exact match before training"
            for file in [ "loss.png"; "final/config.json"; "final/model.safetensors"; "final/vocab.json"; "final/merges.txt"; "data/train.jsonl"; "data/eval.jsonl" ] do
                Expect.isTrue (File.Exists(Path.Combine(output, file))) (file + " is written")
            Expect.isNonEmpty (Directory.GetFiles(output, "events.out.tfevents.*")) "a TensorBoard event file is written"
            Expect.isEmpty (Directory.GetDirectories(folder.File "runs") |> Array.filter (fun d -> Path.GetFileName(d).StartsWith ".")) "no staging folder is left"
            let samples = heldOutPrompts ()
            let args = [ "generate"; "--model"; Path.Combine(output, "final"); "--greedy"; "--max-new-tokens"; "16" ] @ [ for s in samples do yield "--prompt"; yield s.Prompt ]
            let generated = runCli args
            Expect.equal generated.ExitCode 0 generated.Stderr
            let answers = generated.Stdout.TrimEnd('\n').Split('\n')
            let correct = Array.map2 (fun (s: TaskSample) (a: string) -> a.Trim() = s.Answer.Trim()) samples answers |> Array.filter id
            Expect.isGreaterThanOrEqual correct.Length 3 (sprintf "generate answers most held-out prompts: %A" answers)
            let sampled () = runCli [ "generate"; "--model"; Path.Combine(output, "final"); "--prompt"; samples[0].Prompt; "--seed"; "9"; "--temperature"; "2.0"; "--threads"; "1" ]
            Expect.equal (sampled ()).Stdout (sampled ()).Stdout "with a fixed seed the sampled text is the same every run"
        }
        test "a failing embedded run leaves the previous output untouched" {
            use folder = new TempFolder()
            let output = folder.File "runs/embedded"
            Directory.CreateDirectory output |> ignore
            File.WriteAllText(Path.Combine(output, "metrics.jsonl"), "{\"step\": 1}\n")
            let before = snapshot output
            let run = runCli [ "train"; "--output"; output; "--max-steps"; "0" ]
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "--max-steps" "names the option"
            Expect.equal (snapshot output) before "untouched"
        }
        test "options of a fine-tuning run are refused without --model and --data" {
            let run = runCli [ "train"; "--learning-rate"; "0.1" ]
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "--learning-rate" "names the option"
        }
    ]
