module Functional.Tests.CheckpointFolderTests

open System
open System.IO
open System.Security.Cryptography
open System.Text
open System.Text.Json
open Expecto
open Functional
open Functional.Checkpoint
open Functional.Tests.TestUtil

/// A writer that puts these bytes at the path it is given.
let private bytesWriter (bytes: byte[]) = fun (path: string) -> File.WriteAllBytes(path, bytes)

/// A writer that puts this text at the path it is given.
let private textWriter (text: string) = bytesWriter (Encoding.UTF8.GetBytes text)

/// A small checkpoint: two files whose contents depend on the step.
let private writeSample (outputDir: string) (step: int) =
    CheckpointFolder.write outputDir step [
        "model.bin", bytesWriter (Array.init 1000 (fun i -> byte (i * 7 + step)))
        "trainer_state.json", textWriter (sprintf "{\"global_step\": %d}" step)
    ]

/// Asserts that f raises InvalidInputException with this origin and a message holding every fragment.
let private expectInvalid (origin: string) (fragments: string list) (f: unit -> unit) =
    try
        f ()
        failtest "expected an InvalidInputException"
    with :? InvalidInputException as (TestUtil.CommandLine e) ->
        Expect.equal e.Origin origin "the origin names the folder or file at fault"
        for fragment in fragments do
            Expect.stringContains e.Message fragment "the message says what is wrong"

/// The names of the entries of a folder, sorted.
let private entries (folder: string) =
    Directory.GetFileSystemEntries folder |> Array.map Path.GetFileName |> Array.sort |> List.ofArray

let private flipByte (path: string) (offset: int) =
    let bytes = File.ReadAllBytes path
    bytes[offset] <- bytes[offset] ^^^ 0xFFuy
    File.WriteAllBytes(path, bytes)

let private writing =
    testList "writing" [
        test "write returns OUTPUT/checkpoint-N holding the files and a manifest with their sizes and SHA-256" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 5
            Expect.equal folder (Path.Combine(temp.Path, "checkpoint-5")) "the final path"
            Expect.equal (entries folder) [ "checkpoint.json"; "model.bin"; "trainer_state.json" ] "files and manifest"
            CheckpointFolder.verify folder
            use manifest = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, CheckpointFolder.ManifestName)))
            let root = manifest.RootElement
            Expect.equal (root.GetProperty("step").GetInt32()) 5 "step"
            Expect.equal (root.GetProperty("version").GetInt32()) CheckpointFolder.FormatVersion "version"
            let listed =
                [ for f in root.GetProperty("files").EnumerateArray() ->
                      f.GetProperty("name").GetString(), f.GetProperty("size").GetInt64(), f.GetProperty("sha256").GetString() ]
            let expected =
                [ for name in [ "model.bin"; "trainer_state.json" ] ->
                      let bytes = File.ReadAllBytes(Path.Combine(folder, name))
                      name, int64 bytes.Length, Convert.ToHexStringLower(SHA256.HashData bytes) ]
            Expect.equal listed expected "each file's size and hash"
            Expect.equal (entries temp.Path) [ "checkpoint-5" ] "no staging folder left"
        }

        test "a writer may create a folder of files: each one is listed and verified" {
            use temp = new TempFolder()
            let folder =
                CheckpointFolder.write temp.Path 3 [
                    "model", (fun path ->
                        Directory.CreateDirectory path |> ignore
                        File.WriteAllText(Path.Combine(path, "config.json"), "{}")
                        File.WriteAllBytes(Path.Combine(path, "model.safetensors"), Array.create 64 1uy))
                    "optimizer/state.bin", bytesWriter [| 1uy; 2uy; 3uy |]
                ]
            CheckpointFolder.verify folder
            let text = File.ReadAllText(Path.Combine(folder, CheckpointFolder.ManifestName))
            for name in [ "model/config.json"; "model/model.safetensors"; "optimizer/state.bin" ] do
                Expect.stringContains text (sprintf "\"%s\"" name) "listed with '/' separators"
            let shard = Path.Combine(folder, "model", "model.safetensors")
            flipByte shard 10
            expectInvalid shard [ "SHA-256" ] (fun () -> CheckpointFolder.verify folder)
        }

        test "writing checkpoint-N again replaces it" {
            use temp = new TempFolder()
            writeSample temp.Path 4 |> ignore
            let folder =
                CheckpointFolder.write temp.Path 4 [ "other.bin", bytesWriter [| 9uy |] ]
            CheckpointFolder.verify folder
            Expect.equal (entries folder) [ "checkpoint.json"; "other.bin" ] "only the new files"
            Expect.equal (entries temp.Path) [ "checkpoint-4" ] "no staging or old folder left"
        }

        test "a writer that throws leaves no checkpoint-N and no staging folder, and an existing checkpoint-N intact" {
            use temp = new TempFolder()
            let failing = [ "a.bin", bytesWriter [| 1uy |]; "b.bin", (fun (_: string) -> failwith "disk full") ]
            Expect.throwsT<Exception> (fun () -> CheckpointFolder.write temp.Path 8 failing |> ignore) "the writer's exception"
            Expect.isEmpty (entries temp.Path) "nothing left in the output folder"
            let existing = writeSample temp.Path 8
            let before = snapshot existing
            Expect.throwsT<Exception> (fun () -> CheckpointFolder.write temp.Path 8 failing |> ignore) "the writer's exception"
            Expect.equal (entries temp.Path) [ "checkpoint-8" ] "only the old checkpoint"
            Expect.equal (snapshot existing) before "its files unchanged"
            CheckpointFolder.verify existing
        }

        test "a writer that creates nothing fails the write" {
            use temp = new TempFolder()
            Expect.throwsT<InvalidOperationException>
                (fun () -> CheckpointFolder.write temp.Path 1 [ "lazy.bin", ignore ] |> ignore)
                "nothing at the path"
            Expect.isEmpty (entries temp.Path) "no checkpoint, no staging folder"
        }

        test "file names must be relative, inside the folder, distinct and not the manifest's" {
            use temp = new TempFolder()
            for bad in [ [ "../escape.bin" ]; [ "/abs.bin" ]; [ CheckpointFolder.ManifestName ]; [ "a.bin"; "a.bin" ]; [ "" ] ] do
                let writers = bad |> List.map (fun name -> name, bytesWriter [| 0uy |])
                Expect.throwsT<ArgumentException> (fun () -> CheckpointFolder.write temp.Path 1 writers |> ignore) (sprintf "%A" bad)
            Expect.isEmpty (entries temp.Path) "nothing written"
        }
    ]

let private verification =
    testList "verification" [
        test "a folder without manifest is incomplete: verify names the folder, list and latest skip it" {
            use temp = new TempFolder()
            let complete = writeSample temp.Path 1
            let incomplete = Path.Combine(temp.Path, "checkpoint-2")
            Directory.CreateDirectory incomplete |> ignore
            File.WriteAllText(Path.Combine(incomplete, "model.bin"), "partial")
            expectInvalid incomplete [ "incomplete" ] (fun () -> CheckpointFolder.verify incomplete)
            Expect.equal (CheckpointFolder.list temp.Path) [ 1, complete ] "only the complete one"
            Expect.equal (CheckpointFolder.latest temp.Path) (Some complete) "latest skips it"
        }

        test "a flipped byte fails verify naming the file, and latest falls back to the older checkpoint" {
            use temp = new TempFolder()
            let older = writeSample temp.Path 1
            let newer = writeSample temp.Path 2
            let file = Path.Combine(newer, "model.bin")
            flipByte file 500
            expectInvalid file [ "SHA-256"; "corrupt" ] (fun () -> CheckpointFolder.verify newer)
            Expect.equal (CheckpointFolder.latest temp.Path) (Some older) "the newest complete one"
        }

        test "a truncated file fails verify naming the file and both sizes; list leaves it out" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 6
            let file = Path.Combine(folder, "model.bin")
            File.WriteAllBytes(file, (File.ReadAllBytes file)[.. 399])
            expectInvalid file [ "400 bytes"; "1000"; "truncated" ] (fun () -> CheckpointFolder.verify folder)
            Expect.isEmpty (CheckpointFolder.list temp.Path) "left out"
        }

        test "a missing file fails verify naming it" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 6
            let file = Path.Combine(folder, "trainer_state.json")
            File.Delete file
            expectInvalid file [ "missing" ] (fun () -> CheckpointFolder.verify folder)
        }

        test "an unreadable manifest fails verify naming the manifest" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 6
            let manifest = Path.Combine(folder, CheckpointFolder.ManifestName)
            File.WriteAllText(manifest, "{\"format\": \"functional-checkpoint\", \"version\": 1, \"step\": 6, \"files\": [")
            expectInvalid manifest [ "not valid JSON" ] (fun () -> CheckpointFolder.verify folder)
            File.WriteAllText(manifest, "{\"format\": \"functional-checkpoint\", \"version\": 1, \"step\": 6, \"files\": [{\"name\": \"model.bin\", \"size\": \"big\"}]}")
            try
                CheckpointFolder.verify folder
                failtest "expected an InvalidInputException"
            with :? InvalidInputException as (TestUtil.CommandLine e) ->
                Expect.equal e.Origin manifest "the manifest"
                Expect.equal e.Location "files[0].size" "the field"
            Expect.isEmpty (CheckpointFolder.list temp.Path) "left out"
        }

        test "a checkpoint folder renamed to another step fails verify" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 1
            let renamed = Path.Combine(temp.Path, "checkpoint-2")
            Directory.Move(folder, renamed)
            expectInvalid (Path.Combine(renamed, CheckpointFolder.ManifestName)) [ "step 1"; "checkpoint-2" ]
                (fun () -> CheckpointFolder.verify renamed)
            Expect.isEmpty (CheckpointFolder.list temp.Path) "left out"
        }
    ]

let private finding =
    testList "listing and resolving" [
        test "list sorts by step as a number and ignores other folders" {
            use temp = new TempFolder()
            let folders = [ 100; 9; 10 ] |> List.map (fun step -> step, writeSample temp.Path step)
            Directory.CreateDirectory(Path.Combine(temp.Path, "checkpoint-final")) |> ignore
            Directory.CreateDirectory(Path.Combine(temp.Path, "runs")) |> ignore
            Expect.equal (CheckpointFolder.list temp.Path) (List.sortBy fst folders) "9, 10, 100"
            Expect.isEmpty (CheckpointFolder.list (Path.Combine(temp.Path, "absent"))) "no output folder"
        }

        test "latest picks the highest complete step even when a higher incomplete one exists" {
            use temp = new TempFolder()
            writeSample temp.Path 10 |> ignore
            let twenty = writeSample temp.Path 20
            Directory.CreateDirectory(Path.Combine(temp.Path, "checkpoint-30")) |> ignore
            Expect.equal (CheckpointFolder.latest temp.Path) (Some twenty) "checkpoint-20"
            Expect.equal (CheckpointFolder.resolve temp.Path "latest") twenty "resolve latest"
        }

        test "resolve \"latest\" without any complete checkpoint raises naming --resume-from-checkpoint" {
            use temp = new TempFolder()
            Directory.CreateDirectory(Path.Combine(temp.Path, "checkpoint-3")) |> ignore
            expectInvalid "--resume-from-checkpoint" [ "no complete checkpoint"; temp.Path ]
                (fun () -> CheckpointFolder.resolve temp.Path "latest" |> ignore)
            Expect.isNone (CheckpointFolder.latest (Path.Combine(temp.Path, "absent"))) "no output folder"
        }

        test "resolve with a path returns it when it verifies and raises naming the fault otherwise" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 7
            Expect.equal (CheckpointFolder.resolve temp.Path (folder + string Path.DirectorySeparatorChar)) folder
                "the full path, without a trailing separator"
            let file = Path.Combine(folder, "model.bin")
            flipByte file 0
            expectInvalid file [ "SHA-256" ] (fun () -> CheckpointFolder.resolve temp.Path folder |> ignore)
            let absent = Path.Combine(temp.Path, "checkpoint-99")
            expectInvalid absent [ "does not exist" ] (fun () -> CheckpointFolder.resolve temp.Path absent |> ignore)
        }
    ]

let private cleaning =
    testList "deleting and cleaning" [
        test "delete removes the folder and leaves nothing behind" {
            use temp = new TempFolder()
            let keep = writeSample temp.Path 1
            let gone = writeSample temp.Path 2
            CheckpointFolder.delete gone
            Expect.equal (entries temp.Path) [ "checkpoint-1" ] "only the other checkpoint"
            CheckpointFolder.delete gone
            CheckpointFolder.verify keep
        }

        test "a staging folder left by a crash is ignored by list and latest and removed by cleanStale" {
            use temp = new TempFolder()
            let complete = writeSample temp.Path 5
            let staging = Path.Combine(temp.Path, ".checkpoint-7.staging-123")
            Directory.CreateDirectory staging |> ignore
            File.WriteAllBytes(Path.Combine(staging, "model.bin"), Array.create 100 3uy)
            let deleting = Path.Combine(temp.Path, ".checkpoint-2.deleting-123")
            Directory.CreateDirectory deleting |> ignore
            Expect.equal (CheckpointFolder.list temp.Path) [ 5, complete ] "list ignores them"
            Expect.equal (CheckpointFolder.latest temp.Path) (Some complete) "latest ignores them"
            CheckpointFolder.cleanStale temp.Path
            Expect.equal (entries temp.Path) [ "checkpoint-5" ] "leftovers removed"
            CheckpointFolder.verify complete
        }

        test "cleanStale puts back a replaced checkpoint whose replacement never arrived, and drops one that was replaced" {
            use temp = new TempFolder()
            let folder = writeSample temp.Path 3
            let before = snapshot folder
            // A crash between StagedFolder.commit's two renames: the old checkpoint moved aside, the new one not in place.
            Directory.Move(folder, Path.Combine(temp.Path, ".checkpoint-3.old-123"))
            Expect.isNone (CheckpointFolder.latest temp.Path) "hidden while aside"
            CheckpointFolder.cleanStale temp.Path
            Expect.equal (entries temp.Path) [ "checkpoint-3" ] "renamed back"
            Expect.equal (snapshot folder) before "unchanged"
            // A crash after the second rename: the new checkpoint is in place, the old one still aside.
            copyFolder folder (Path.Combine(temp.Path, ".checkpoint-3.old-456"))
            CheckpointFolder.cleanStale temp.Path
            Expect.equal (entries temp.Path) [ "checkpoint-3" ] "the old copy removed"
            CheckpointFolder.verify folder
        }
    ]

[<Tests>]
let tests = testList "checkpoint folder" [ writing; verification; finding; cleaning ]
