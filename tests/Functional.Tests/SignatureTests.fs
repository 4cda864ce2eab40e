/// Checkpoint signatures: version 2 (snake_case keys, plain text) is written, and checkpoints written
/// before it (version 1, keyed by command-line labels, tests/golden/checkpoint-v1) still resume.
module Functional.Tests.SignatureTests

open System.IO
open System.Text.Json
open Expecto
open Functional.Tests.TestUtil

/// The pre-change run's arguments (tests/golden/checkpoint-v1/README.md), into output.
let private args (lora: bool) (output: string) =
    let golden = goldenDir "gpt2-cosine"
    [ "train"; "--model"; Path.Combine(golden, "model"); "--data"; Path.Combine(golden, "data.jsonl"); "--output"; output
      "--per-device-train-batch-size"; "2"; "--gradient-accumulation-steps"; "2"; "--max-steps"; "6"; "--max-seq-len"; "32"
      "--learning-rate"; "3e-3"; "--lr-scheduler-type"; "cosine"; "--num-warmup-steps"; "2"; "--save-steps"; "3"
      "--threads"; "1"; "--seed"; "7" ]
    @ (if lora then [ "--lora-dim"; "4"; "--lora-target-modules"; "c_attn"; "--only-optimize-lora"; "--lora-learning-rate"; "1e-2" ] else [])

/// A fresh output folder holding a copy of the golden version-1 checkpoint-3.
let private withV1Checkpoint (folder: TempFolder) (case: string) =
    let output = folder.File case
    copyFolder (Path.Combine(goldenDir "checkpoint-v1", case, "checkpoint-3")) (Path.Combine(output, "checkpoint-3"))
    output

let private stepLines (output: string) =
    File.ReadAllLines(Path.Combine(output, "metrics.jsonl")) |> Array.filter (fun l -> not (l.Contains "train_runtime"))

/// The resumed run's metric lines against the pre-change run's: the lines of the steps the checkpoint
/// carries (its log_history) byte for byte; the recomputed steps field by field, step, epoch, lr and
/// num_tokens exactly and loss and grad_norm to 1e-5 relative. The pre-change numbers were recorded on
/// another CPU, whose float32 kernels sum in another order (~1e-7 apart); the same machine repeats a
/// run bit for bit (the resume tests check that).
let private expectSameSteps (actual: string[]) (expected: string[]) (carried: int) =
    Expect.equal actual.Length expected.Length "one line per step"
    for i, (a, e) in Array.indexed (Array.zip actual expected) do
        if i < carried then Expect.equal a e (sprintf "step %d, restored from the checkpoint, byte for byte" (i + 1))
        else
            let a, e = JsonDocument.Parse(a).RootElement, JsonDocument.Parse(e).RootElement
            let names (j: JsonElement) = [ for p in j.EnumerateObject() -> p.Name ]
            Expect.equal (names a) (names e) (sprintf "step %d: the same fields" (i + 1))
            for name in names e do
                let x, y = a.GetProperty(name).GetDouble(), e.GetProperty(name).GetDouble()
                if name = "loss" || name = "grad_norm" then
                    Expect.isLessThanOrEqual (abs (x - y) / abs y) 1e-5 (sprintf "step %d: %s %.17g vs %.17g" (i + 1) name x y)
                else Expect.equal x y (sprintf "step %d: %s" (i + 1) name)

let private functionalSection (checkpoint: string) =
    JsonDocument.Parse(File.ReadAllText(Path.Combine(checkpoint, "trainer_state.json"))).RootElement.GetProperty("functional").Clone()

[<Tests>]
let tests =
    testSequenced <| testList "checkpoint signature" [
        for case, lora, finalLoss in [ "full", false, 4.4430010114397325; "lora", true, 4.55945783342634 ] do
            test (sprintf "a version-1 checkpoint (%s) written before the change resumes to the uninterrupted run's metrics and final loss" case) {
                use folder = new TempFolder()
                let output = withV1Checkpoint folder case
                let run = runCli (args lora output @ [ "--resume-from-checkpoint"; "latest" ])
                Expect.equal run.ExitCode 0 run.Stderr
                let expected = File.ReadAllLines(Path.Combine(goldenDir "checkpoint-v1", case, "metrics-steps.jsonl"))
                expectSameSteps (stepLines output) expected 3
                let last = JsonDocument.Parse(Array.last (stepLines output)).RootElement
                Expect.isLessThanOrEqual (abs (last.GetProperty("loss").GetDouble() - finalLoss) / finalLoss) 1e-5 "the final loss of the pre-change run"
                // The checkpoint this run wrote is version 2: snake_case keys, plain text.
                let written = functionalSection (Path.Combine(output, "checkpoint-6"))
                Expect.equal (written.GetProperty("signature_version").GetInt32()) 2 "signature_version"
                let signature = written.GetProperty "signature"
                Expect.equal (signature.GetProperty("learning_rate").GetString()) "0.003" "keyed by setting"
                Expect.equal (signature.GetProperty("precision").GetString()) "fp32" "plain text"
                Expect.isFalse (signature.TryGetProperty "--learning-rate" |> fst) "no command-line keys"
                if lora then
                    Expect.equal (signature.GetProperty("lora").GetString())
                        "r=4 lora_alpha=8 lora_dropout=0 target_modules=c_attn module_name_substring= only_optimize_lora=true learning_rate=0.01"
                        "LoRA's key=value text"
            }
        test "a version-1 checkpoint resumed with another learning rate names the difference as before" {
            use folder = new TempFolder()
            let output = withV1Checkpoint folder "full"
            let run = runCli ((args false output |> List.map (fun a -> if a = "3e-3" then "4e-3" else a)) @ [ "--resume-from-checkpoint"; "latest" ])
            Expect.equal run.ExitCode 2 "bad input"
            Expect.stringContains run.Stderr "--learning-rate: the checkpoint was trained with 0.003, this run has 0.004" "names the difference"
        }
        test "a version-2 checkpoint resumed with another LoRA rank names the difference by its label" {
            use folder = new TempFolder()
            let output = folder.File "run"
            Expect.equal (runCli (args true output)).ExitCode 0 "first run"
            let resumed =
                runCli (args true output |> List.map (fun a -> if a = "4" then "2" else a) |> fun a -> a @ [ "--resume-from-checkpoint"; "latest" ])
            Expect.equal resumed.ExitCode 2 "bad input"
            Expect.stringContains resumed.Stderr "--lora-*: the checkpoint was trained with r=4 " "names LoRA by its label"
        }
        test "a checkpoint of a newer signature version is refused, naming the field" {
            use folder = new TempFolder()
            let output = folder.File "run"
            Expect.equal (runCli (args false output)).ExitCode 0 "first run"
            let checkpoint = Path.Combine(output, "checkpoint-6")
            let state = Path.Combine(checkpoint, "trainer_state.json")
            File.WriteAllText(state, File.ReadAllText(state).Replace("\"signature_version\": 2", "\"signature_version\": 3"))
            // Rewrite the manifest's hash of trainer_state.json so that only the version is at fault.
            let manifest = Path.Combine(checkpoint, "checkpoint.json")
            let bytes = File.ReadAllBytes state
            let hash = System.Convert.ToHexString(System.Security.Cryptography.SHA256.HashData bytes).ToLowerInvariant()
            let json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText manifest)
            for f in json["files"].AsArray() do
                if f["name"].GetValue<string>() = "trainer_state.json" then
                    f["sha256"] <- System.Text.Json.Nodes.JsonValue.Create hash
                    f["size"] <- System.Text.Json.Nodes.JsonValue.Create bytes.LongLength
            File.WriteAllText(manifest, json.ToJsonString())
            let resumed = runCli (args false output |> List.map (fun a -> if a = "6" then "8" else a) |> fun a -> a @ [ "--resume-from-checkpoint"; checkpoint ])
            Expect.equal resumed.ExitCode 2 resumed.Stderr
            Expect.stringContains resumed.Stderr "functional.signature_version" "names the field"
        }
    ]
