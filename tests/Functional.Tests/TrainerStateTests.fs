module Functional.Tests.TrainerStateTests

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional
open Functional.Checkpoint
open Functional.Tests.TestUtil

/// A metrics line serialized the way the trainer writes metrics.jsonl (named literals for NaN and infinities).
let private metricsLine (fields: (string * obj) list) =
    let options = JsonSerializerOptions(NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)
    JsonSerializer.Serialize(Dictionary<string, obj>(dict fields), options)

let private sample =
    { Epoch = 1.25
      GlobalStep = 50
      MaxSteps = 200
      NumTrainEpochs = 5
      LoggingSteps = 10
      EvalSteps = 25
      SaveSteps = 25
      TrainBatchSize = 8
      TotalFlos = 0.0
      NumInputTokensSeen = 123456789012L
      BestMetric = Some 2.3456789012345678
      BestGlobalStep = Some 25
      BestModelCheckpoint = Some "out/checkpoint-25"
      LogHistory =
        [ metricsLine [ "step", box 10; "epoch", box 0.25; "loss", box 3.5; "lr", box 1e-4; "grad_norm", box 0.1 ]
          metricsLine [ "step", box 20; "epoch", box 0.5; "loss", box nan; "lr", box 2e-4; "grad_norm", box infinity ]
          metricsLine [ "step", box 25; "eval_loss", box 2.3456789012345678; "note", box "caf\u00e9 \"q\"" ] ]
      Functional =
        Map [ "accumulation", "{\"micro_step\": 3, \"tokens\": [1, 2, 3]}"
              "run_signature", "\"sha256:abc\""
              "sampler_epoch", "2" ] }

/// Asserts that reading path raises InvalidInputException naming it and this field.
let private expectFieldError (path: string) (field: string) (fragment: string) =
    try
        TrainerState.read path |> ignore
        failtest "expected an InvalidInputException"
    with :? InvalidInputException as (TestUtil.CommandLine e) ->
        Expect.equal e.Origin path "the file"
        Expect.equal e.Location field "the field"
        Expect.stringContains e.Problem fragment "what was found"

/// The JSON written for a state, with one top-level field replaced (None removes it).
let private withField (temp: TempFolder) (state: TrainerState) (field: string) (value: string option) =
    let written = temp.File "written.json"
    TrainerState.write written state
    let node = Nodes.JsonNode.Parse(File.ReadAllText written).AsObject()
    match value with
    | Some text -> node[field] <- Nodes.JsonNode.Parse text
    | None -> node.Remove field |> ignore
    node.ToJsonString()

let private roundTrips =
    testList "round trip" [
        test "every field comes back" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            TrainerState.write path sample
            let back = TrainerState.read path
            Expect.equal back sample "the same state"
            Expect.isFalse (File.Exists(path + ".tmp")) "no temporary file left"
        }

        test "absent values are written as null and read back as None" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            let state = { sample with BestMetric = None; BestGlobalStep = None; BestModelCheckpoint = None; LogHistory = []; Functional = Map.empty }
            TrainerState.write path state
            let text = File.ReadAllText path
            for key in [ "best_metric"; "best_global_step"; "best_model_checkpoint" ] do
                Expect.stringContains text (sprintf "\"%s\": null" key) key
            Expect.equal (TrainerState.read path) state "the same state"
        }

        test "NaN and infinities are written as the strings \"NaN\", \"Infinity\", \"-Infinity\" and read back" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            TrainerState.write path { sample with BestMetric = Some nan; Epoch = infinity; TotalFlos = -infinity }
            let text = File.ReadAllText path
            Expect.stringContains text "\"best_metric\": \"NaN\"" "NaN"
            Expect.stringContains text "\"epoch\": \"Infinity\"" "infinity"
            Expect.stringContains text "\"total_flos\": \"-Infinity\"" "-infinity"
            let back = TrainerState.read path
            Expect.isTrue (back.BestMetric |> Option.exists Double.IsNaN) "NaN back"
            Expect.equal back.Epoch infinity "infinity back"
            Expect.equal back.TotalFlos -infinity "-infinity back"
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 100 } "log_history lines and functional values come back byte for byte"
        <| Prop.forAll (ArbMap.defaults |> ArbMap.arbitrary<(int * float * string) list>) (fun rows ->
            let lines =
                rows |> List.map (fun (step, loss, note) -> metricsLine [ "step", box step; "loss", box loss; "note", box note ])
            let functional = rows |> List.mapi (fun i (_, loss, _) -> sprintf "key%d" i, metricsLine [ "v", box loss ]) |> Map.ofList
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            TrainerState.write path { sample with LogHistory = lines; Functional = functional }
            let back = TrainerState.read path
            back.LogHistory = lines && back.Functional = functional)

        test "the file is laid out like HF's: keys sorted, process flags, trial fields null" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            TrainerState.write path sample
            use document = JsonDocument.Parse(File.ReadAllText path)
            let keys = [ for p in document.RootElement.EnumerateObject() -> p.Name ]
            Expect.equal keys (List.sortWith (fun a b -> String.CompareOrdinal(a, b)) keys) "sorted"
            let root = document.RootElement
            Expect.isTrue (root.GetProperty("is_local_process_zero").GetBoolean()) "is_local_process_zero"
            Expect.isTrue (root.GetProperty("is_world_process_zero").GetBoolean()) "is_world_process_zero"
            Expect.isFalse (root.GetProperty("is_hyper_param_search").GetBoolean()) "is_hyper_param_search"
            Expect.equal (root.GetProperty("trial_name").ValueKind) JsonValueKind.Null "trial_name"
            Expect.equal (root.GetProperty("log_history").GetArrayLength()) 3 "log_history"
            Expect.stringContains (File.ReadAllText path) "\n  \"global_step\": 50," "2-space indentation"
        }

        test "a file written by HF without our fields reads with their defaults" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            let hfText =
                [ "{"
                  "  \"best_metric\": 0.5,"
                  "  \"best_model_checkpoint\": \"out/checkpoint-10\","
                  "  \"epoch\": 2.0,"
                  "  \"eval_steps\": 10,"
                  "  \"global_step\": 20,"
                  "  \"is_hyper_param_search\": false,"
                  "  \"is_local_process_zero\": true,"
                  "  \"is_world_process_zero\": true,"
                  "  \"log_history\": ["
                  "    {"
                  "      \"epoch\": 1.0,"
                  "      \"eval_loss\": 0.5,"
                  "      \"step\": 10"
                  "    }"
                  "  ],"
                  "  \"logging_steps\": 5,"
                  "  \"max_steps\": 20,"
                  "  \"num_train_epochs\": 2,"
                  "  \"save_steps\": 10,"
                  "  \"stateful_callbacks\": {},"
                  "  \"total_flos\": 1234.0,"
                  "  \"train_batch_size\": 4,"
                  "  \"trial_name\": null,"
                  "  \"trial_params\": null"
                  "}"
                  "" ]
            File.WriteAllText(path, String.Join("\n", hfText))
            let state = TrainerState.read path
            Expect.equal state.GlobalStep 20 "global_step"
            Expect.equal state.BestMetric (Some 0.5) "best_metric"
            Expect.equal state.BestGlobalStep None "best_global_step absent"
            Expect.equal state.NumInputTokensSeen 0L "num_input_tokens_seen absent"
            Expect.equal state.TotalFlos 1234.0 "total_flos"
            Expect.isEmpty state.Functional "no functional section"
            Expect.equal state.LogHistory [ "{\n      \"epoch\": 1.0,\n      \"eval_loss\": 0.5,\n      \"step\": 10\n    }" ]
                "the entry's text as it stands"
        }
    ]

let private errors =
    testList "errors" [
        test "a missing field is named" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            File.WriteAllText(path, withField temp sample "global_step" None)
            expectFieldError path "global_step" "missing"
        }

        test "a mistyped field is named with what was found" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            for field, value, fragment in
                [ "max_steps", "\"ten\"", "expected an integer"
                  "train_batch_size", "2.5", "expected an integer"
                  "epoch", "\"one\"", "expected a number"
                  "best_metric", "true", "expected a number"
                  "best_model_checkpoint", "3", "expected a string"
                  "log_history", "{}", "expected a list"
                  "functional", "[]", "expected an object" ] do
                File.WriteAllText(path, withField temp sample field (Some value))
                expectFieldError path field fragment
        }

        test "a log_history entry that is not an object is named by its index" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            File.WriteAllText(path, withField temp sample "log_history" (Some "[{\"step\": 1}, 2]"))
            expectFieldError path "log_history[1]" "expected an object"
        }

        test "a file that is not JSON, or absent, is named" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            File.WriteAllText(path, "{\"global_step\": NaN}")
            expectFieldError path "" "not valid JSON"
            expectFieldError (temp.File "absent.json") "" "does not exist"
        }

        test "write refuses a log_history entry that is not a JSON object and a functional value that is not JSON" {
            use temp = new TempFolder()
            let path = temp.File TrainerState.FileName
            Expect.throwsT<ArgumentException> (fun () -> TrainerState.write path { sample with LogHistory = [ "[1]" ] }) "an array"
            Expect.throwsT<ArgumentException>
                (fun () -> TrainerState.write path { sample with Functional = Map [ "k", "{oops" ] }) "not JSON"
            Expect.isFalse (File.Exists path) "nothing written"
        }
    ]

[<Tests>]
let tests = testList "trainer state" [ roundTrips; errors ]
