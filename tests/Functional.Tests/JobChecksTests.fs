module Functional.Tests.JobChecksTests

open System
open System.IO
open System.Threading
open Expecto
open Functional
open Functional.Training

/// Several processes of one mpirun check the same output folder at the same moment; threads stand in for
/// them here. Before the fix, one thread's clean-up removed the folder between another's mkdir and its
/// probe, and that thread reported "the file system takes no new folders" (CI run of 2026-12-02).
[<Tests>]
let tests =
    testList "job checks" [
        test "checkWritable: eight callers at once on one missing folder all pass and leave no probe behind" {
            let root = Path.Combine(Path.GetTempPath(), "functional-tests", "writable-" + Guid.NewGuid().ToString "N")
            Directory.CreateDirectory root |> ignore
            try
                for round in 1..40 do
                    let target = Path.Combine(root, sprintf "out-%d" round, "nested")
                    use start = new Barrier(8)
                    let errors = Collections.Concurrent.ConcurrentBag<string>()
                    let workers =
                        [| for _ in 1..8 ->
                               Thread(fun () ->
                                   start.SignalAndWait()
                                   try JobChecks.checkWritable target
                                   with e -> errors.Add e.Message) |]
                    workers |> Array.iter (fun t -> t.Start())
                    workers |> Array.iter (fun t -> t.Join())
                    Expect.isEmpty errors (sprintf "round %d: %s" round (String.Join(" | ", errors)))
                    // A folder one caller made while another's probe was in it may stay, but empty (no probes).
                    let made = Path.Combine(root, sprintf "out-%d" round)
                    if Directory.Exists made then
                        Expect.isEmpty (Directory.GetFiles(made, "*", SearchOption.AllDirectories)) "no probe file is left"
            finally
                Directory.Delete(root, true)
        }
        test "checkOutputFolder: eight callers at once on one missing output folder all pass (another's probe is not content)" {
            // CI run of 2026-12-03: rank 1 of an mpirun found rank 0's probe in the new output folder and refused
            // it as "already exists and is not empty".
            let root = Path.Combine(Path.GetTempPath(), "functional-tests", "output-" + Guid.NewGuid().ToString "N")
            Directory.CreateDirectory root |> ignore
            try
                for round in 1..40 do
                    let request = FineTune.request "model" "data.jsonl" (Path.Combine(root, sprintf "out-%d" round))
                    use start = new Barrier(8)
                    let errors = Collections.Concurrent.ConcurrentBag<string>()
                    let workers =
                        [| for _ in 1..8 ->
                               Thread(fun () ->
                                   start.SignalAndWait()
                                   try JobChecks.checkOutputFolder request
                                   with e -> errors.Add e.Message) |]
                    workers |> Array.iter (fun t -> t.Start())
                    workers |> Array.iter (fun t -> t.Join())
                    Expect.isEmpty errors (sprintf "round %d: %s" round (String.Join(" | ", errors)))
                // A real file still makes the folder not empty.
                let taken = Path.Combine(root, "taken")
                Directory.CreateDirectory taken |> ignore
                File.WriteAllText(Path.Combine(taken, ".write-probe-notes.txt.bak"), "x")
                File.WriteAllText(Path.Combine(taken, "metrics.jsonl"), "{}")
                let refused = try JobChecks.checkOutputFolder (FineTune.request "model" "data.jsonl" taken); None with :? InvalidInputException as e -> Some e.Message
                Expect.isSome refused "a folder with a file in it is refused"
            finally
                Directory.Delete(root, true)
        }
        test "checkWritable: a folder in /proc is refused, naming it, the same way every time" {
            let target = "/proc/functional-no-such-folder/out"
            for _ in 1..3 do
                match (try JobChecks.checkWritable target; None with :? InvalidInputException as e -> Some e.Message) with
                | Some message ->
                    Expect.stringContains message target "names the folder"
                    Expect.stringContains message "the file system takes no new folders" "says why"
                | None -> failtest "a folder in /proc was accepted"
        }
    ]
