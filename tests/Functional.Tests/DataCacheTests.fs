/// The on-disk cache of tokenized data: hits skip the tokenizer, damaged entries are rebuilt, keys
/// follow content, tokenizer and options.
module Functional.Tests.DataCacheTests

open System.IO
open System.Text.Json
open Expecto
open Functional.Data
open Functional.Tests.TestUtil
open Functional.Tests.PromptDatasetTests

let private options = { PromptDataset.defaults with TrainOn = TrainOn.Completion; EvalSplitRatio = 0.3; Seed = 5L }

let private writeData (path: string) =
    let lines =
        [ for i in 1 .. 12 -> JsonSerializer.Serialize {| prompt = sprintf "Question %d: %s" i (fst pairs[i % 3]); chosen = snd pairs[i % 3] |} ]
    File.WriteAllLines(path, lines)

let private same (a: TrainAndEval) (b: TrainAndEval) =
    Expect.equal a.Train b.Train "train rows"
    Expect.equal a.Eval b.Eval "eval rows"
    Expect.equal a.EvalSamples b.EvalSamples "eval samples"
    Expect.equal a.Skipped b.Skipped "skipped"

/// Runs check with a data file, a cache folder and a cl100k tokenizer counting its calls.
let private withCache (check: string -> string -> int ref -> unit) =
    use folder = new TempFolder()
    let data = folder.File "data.jsonl"
    writeData data
    check data (folder.File "cache") (ref 0)

let private damaged (damage: byte[] -> byte[]) =
    withCache (fun data cache calls ->
        let tokenizer = cl100k calls None
        let fresh, _ = DataCache.loadTrainAndEval cache data None options tokenizer
        let entry = DataCache.entryPath cache (DataCache.key data None options tokenizer)
        File.WriteAllBytes(entry, damage (File.ReadAllBytes entry))
        calls.Value <- 0
        let rebuilt, hit = DataCache.loadTrainAndEval cache data None options tokenizer
        Expect.isFalse hit "a damaged entry is not a hit"
        Expect.isGreaterThan calls.Value 0 "tokenized again"
        same rebuilt fresh
        Expect.isTrue (snd (DataCache.loadTrainAndEval cache data None options tokenizer)) "the rebuilt entry is a hit")

let private flip (offset: byte[] -> int) (bytes: byte[]) =
    let copy = Array.copy bytes
    let i = offset bytes
    copy[i] <- copy[i] ^^^ 0x20uy
    copy

[<Tests>]
let tests =
    testList "data cache" [
        test "cached data equals freshly tokenized data, and the second load is a hit without tokenizer calls" {
            withCache (fun data cache calls ->
                let tokenizer = cl100k calls None
                let uncached = PromptDataset.loadTrainAndEval data None options tokenizer
                let first, firstHit = DataCache.loadTrainAndEval cache data None options tokenizer
                Expect.isFalse firstHit "the first load builds"
                same first uncached
                calls.Value <- 0
                let second, secondHit = DataCache.loadTrainAndEval cache data None options tokenizer
                Expect.isTrue secondHit "the second load is a hit"
                Expect.equal calls.Value 0 "no tokenizer call"
                same second uncached
                let loaded, hit = DataCache.load cache data options tokenizer
                Expect.isTrue hit "load shares the entry"
                Expect.equal loaded.Dataset uncached.Train "load gives the training rows"
                Expect.isEmpty (Directory.GetFiles(cache, "*.tmp")) "no temporary file is left")
        }
        test "a hit names the paths of this run" {
            withCache (fun data cache calls ->
                let tokenizer = cl100k calls None
                DataCache.loadTrainAndEval cache data None options tokenizer |> ignore
                let moved = Path.Combine(Path.GetDirectoryName data, "moved.jsonl")
                File.Copy(data, moved)
                let loaded, hit = DataCache.loadTrainAndEval cache moved None options tokenizer
                Expect.isTrue hit "same content, same entry"
                Expect.equal loaded.Train.Path moved "train path"
                Expect.equal loaded.Eval.Value.Path moved "eval path")
        }
        test "a payload byte flipped is rebuilt" { damaged (flip (fun b -> b.Length - 5)) }
        test "a header byte flipped is rebuilt" { damaged (flip (fun _ -> 20)) }
        test "a truncated entry is rebuilt" { damaged (fun b -> b[.. b.Length / 2]) }
        test "an empty entry is rebuilt" { damaged (fun _ -> [||]) }
        test "the key changes with the tokenizer fingerprint, every option and the file content" {
            withCache (fun data _ calls ->
                let tokenizer = cl100k calls None
                let key opts tok = DataCache.key data None opts tok
                let baseKey = key options tokenizer
                Expect.equal (key options tokenizer) baseKey "stable"
                Expect.notEqual (key options { tokenizer with Fingerprint = "other" }) baseKey "fingerprint"
                let variants =
                    [ "format", { options with Format = DataFormat.DeepSpeedChat }
                      "prompt field", { options with Fields = { PromptDataset.noFields with Prompt = Some "prompt"; Answer = Some "chosen" } }
                      "max-seq-len", { options with MaxSeqLen = 100 }
                      "train on", { options with TrainOn = TrainOn.All }
                      "packing", { options with Packing = true }
                      "packing attention", { options with PackingAttention = PackingAttention.Cross }
                      "bos", { options with AddBos = Some true }
                      "skip bad rows", { options with SkipBadRows = true }
                      "data split", { options with DataSplit = Some "2,4,4" }
                      "eval ratio", { options with EvalSplitRatio = 0.2 }
                      "seed", { options with Seed = 6L } ]
                for name, variant in variants do
                    Expect.notEqual (key variant tokenizer) baseKey name
                Expect.notEqual (DataCache.key data (Some data) options tokenizer) baseKey "an evaluation file"
                File.AppendAllText(data, JsonSerializer.Serialize {| prompt = "new"; chosen = "row" |} + "\n")
                Expect.notEqual (key options tokenizer) baseKey "file content")
        }
        test "changed file content is tokenized again" {
            withCache (fun data cache calls ->
                let tokenizer = cl100k calls None
                DataCache.loadTrainAndEval cache data None options tokenizer |> ignore
                File.AppendAllText(data, JsonSerializer.Serialize {| prompt = "new"; chosen = "row" |} + "\n")
                let loaded, hit = DataCache.loadTrainAndEval cache data None options tokenizer
                Expect.isFalse hit "a new key"
                Expect.equal (loaded.Train.Rows.Length + loaded.Eval.Value.Rows.Length) 13 "the new row is there")
        }
    ]
