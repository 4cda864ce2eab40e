/// Reading pre-tokenized JSON Lines, samplers and micro-batch collation.
module Functional.Tests.DataTests

open System.IO
open System.Text
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional
open Functional.Data
open Functional.Runtime
open Functional.Tests.TestUtil

let private config = { FsCheckConfig.defaultConfig with maxTest = 200 }

let private withFile (content: byte[]) (check: string -> unit) =
    use folder = new TempFolder()
    let path = folder.File "data.jsonl"
    File.WriteAllBytes(path, content)
    check path

let private expectInvalid (location: string) (problem: string) (content: string) =
    withFile (Encoding.UTF8.GetBytes content) (fun path ->
        try
            loadTokenized path |> ignore
            failtest "expected InvalidInputException"
        with :? InvalidInputException as (TestUtil.CommandLine e) ->
            Expect.equal e.Origin path "names the file"
            Expect.equal e.Location location "names the line"
            Expect.stringContains e.Problem problem "says what is wrong")

let private rows =
    Gen.choose (1, 12)
    |> Gen.bind (fun n -> Gen.arrayOfLength n (Gen.choose (0, 40) |> Gen.bind (fun len -> Gen.arrayOfLength len (Gen.choose (0, 95) |> Gen.map int64))))
    |> Arb.fromGen

[<Tests>]
let tests =
    testList "data" [
        test "rows keep their line numbers across blank lines and CRLF endings" {
            withFile (Encoding.UTF8.GetBytes "{\"input_ids\": [1, 2, 3]}\r\n\r\n{\"input_ids\": []}\n{\"input_ids\": [7], \"other\": 1}\n") (fun path ->
                let d = loadTokenized path
                Expect.equal d.Rows [| [| 1L; 2L; 3L |]; [||]; [| 7L |] |] "rows"
                Expect.equal d.Lines [| 1; 3; 4 |] "line numbers")
        }
        test "a line that is not an object names its line" { expectInvalid "2" "JSON object" "{\"input_ids\": [1]}\n[1, 2]\n" }
        test "input_ids that is not an array names its line" { expectInvalid "1" "array" "{\"input_ids\": \"1 2\"}\n" }
        test "a negative or fractional id names line and index" {
            expectInvalid "1" "input_ids[1]: expected a non-negative integer" "{\"input_ids\": [1, -2]}\n"
            expectInvalid "1" "input_ids[0]: expected a non-negative integer" "{\"input_ids\": [1.5]}\n"
        }
        test "invalid UTF-8 names its line" {
            withFile (Array.concat [ Encoding.UTF8.GetBytes "{\"input_ids\": [1]}\n{\"input_ids\": [2]} "; [| 0xC3uy; 0x28uy |]; Encoding.UTF8.GetBytes "\n" ]) (fun path ->
                try
                    loadTokenized path |> ignore
                    failtest "expected InvalidInputException"
                with :? InvalidInputException as (TestUtil.CommandLine e) ->
                    Expect.equal e.Location "2" "line 2"
                    Expect.stringContains e.Problem "UTF-8" "says UTF-8")
        }
        test "a file of blank lines holds no samples" { expectInvalid "" "no samples" "\n  \n" }
        test "ids outside the vocabulary name line and index" {
            withFile (Encoding.UTF8.GetBytes "{\"input_ids\": [1]}\n{\"input_ids\": [3, 96]}\n") (fun path ->
                let d = loadTokenized path
                try
                    TokenizedDataset.checkVocabulary 96 d
                    failtest "expected InvalidInputException"
                with :? InvalidInputException as (TestUtil.CommandLine e) -> Expect.equal e.Location "2: input_ids[1]" "line and index")
        }
        testPropertyWithConfig config "the shuffled order is a permutation, fixed by seed and epoch" <| Prop.forAll (Arb.fromGen (Gen.zip3 (Gen.choose (0, 500)) (Gen.choose (0, 1000)) (Gen.choose (0, 20)))) (fun (n, seed, epoch) ->
            let order = Sampler.shuffled (int64 seed) epoch n
            Array.sort (Array.copy order) = Array.init n id && order = Sampler.shuffled (int64 seed) epoch n)
        test "different epochs and seeds shuffle differently" {
            let a = Sampler.shuffled 42L 0 100
            Expect.notEqual a (Sampler.shuffled 42L 1 100) "epoch 0 vs 1"
            Expect.notEqual a (Sampler.shuffled 43L 0 100) "seed 42 vs 43"
            Expect.notEqual a (Sampler.sequential 100) "not file order"
        }
        testPropertyWithConfig config "micro-batches cover the order in consecutive groups of the batch size" <| Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (0, 60)) (Gen.choose (1, 9)))) (fun (n, b) ->
            let batches = Batching.microBatches b (Array.init n id)
            Array.concat batches = Array.init n id
            && batches |> Array.forall (fun m -> m.Length >= 1 && m.Length <= b)
            && batches.Length = (n + b - 1) / b)
        testPropertyWithConfig config "collate truncates, right-pads and labels padding and prompts -100; counts match the loss's count" <| Prop.forAll (Arb.zip (rows, Arb.fromGen (Gen.zip (Gen.choose (2, 24)) (Gen.choose (0, 1000))))) (fun (rows, (maxSeqLen, seed)) ->
            TorchRuntime.ensure ()
            let random = System.Random seed
            let prompts = rows |> Array.map (fun r -> random.Next(0, r.Length + 2))
            let dataset = { Path = "mem"; Rows = rows; Lines = Array.init rows.Length ((+) 1); PromptLengths = prompts; Segments = [||]; TrainMasks = [||] }
            use batch = Batching.collate maxSeqLen 0L dataset (Array.init rows.Length id)
            let width = int batch.InputIds.shape[1]
            let ids = batch.InputIds.data<int64>().ToArray()
            let labels = batch.Labels.data<int64>().ToArray()
            let lengths = rows |> Array.map (fun r -> min r.Length maxSeqLen)
            width = max 1 (Array.max lengths)
            && rows |> Array.indexed |> Array.forall (fun (r, row) ->
                [ 0 .. width - 1 ] |> List.forall (fun t ->
                    let label = labels[r * width + t]
                    if t < lengths[r] then ids[r * width + t] = row[t] && label = (if t < prompts[r] then Loss.IgnoreIndex else row[t])
                    else ids[r * width + t] = 0L && label = Loss.IgnoreIndex))
            && batch.PredictedTokens = Loss.predictedTokens batch.Labels
            && batch.Tokens = Array.sumBy int64 lengths)
    ]
