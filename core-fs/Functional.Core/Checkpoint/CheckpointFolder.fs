namespace Functional.Checkpoint

open System
open System.IO
open System.Runtime.InteropServices
open System.Security.Cryptography
open System.Text.Json
open System.Text.RegularExpressions
open Functional
open Functional.Runtime

/// fsync for directories and read-only files, which .NET's FileStream cannot open for writing.
module private Posix =

    [<DllImport("libc", EntryPoint = "open", SetLastError = true)>]
    extern int openPath(string path, int flags)

    [<DllImport("libc", EntryPoint = "fsync", SetLastError = true)>]
    extern int fsync(int descriptor)

    [<DllImport("libc", EntryPoint = "close", SetLastError = true)>]
    extern int close(int descriptor)

    /// O_RDONLY, the same value on every Unix.
    let readOnly = 0

/// One file listed by a checkpoint's manifest.
type private CheckpointFile =
    { /// The path relative to the checkpoint folder, with '/' separators.
      Name: string
      /// The length in bytes.
      Size: int64
      /// The SHA-256 of the content, lowercase hexadecimal.
      Sha256: string }

/// Checkpoint folders `OUTPUT/checkpoint-N/` (N = the global step, HF's layout) written atomically and
/// verifiable: files are written into a hidden staging folder beside the target, flushed to disk, then a
/// manifest (`checkpoint.json`: format version, step, each file's size and SHA-256) is written last, and
/// the staging folder is renamed to `checkpoint-N`. A folder named `checkpoint-N` therefore either is
/// complete or, after a crash while an older `checkpoint-N` was being replaced, absent (cleanStale puts
/// the older one back). Durability: files are fsynced through FileStream.Flush(true); on Linux and macOS
/// the staging folder and the output folder are fsynced too (through libc, since .NET cannot open a
/// directory), on Windows directory entries are left to the NTFS journal.
[<RequireQualifiedAccess>]
module CheckpointFolder =

    /// The manifest's file name, written last into every checkpoint folder.
    [<Literal>]
    let ManifestName = "checkpoint.json"

    /// The manifest format this code writes and reads.
    [<Literal>]
    let FormatVersion = 1

    [<Literal>]
    let private formatName = "functional-checkpoint"

    let private folderPattern = Regex(@"^checkpoint-([0-9]+)$", RegexOptions.CultureInvariant)

    let private leftoverPattern =
        Regex(@"^\.checkpoint-([0-9]+)\.(staging|old|deleting)-(rank)?[0-9]+$", RegexOptions.CultureInvariant)

    let private bufferSize = 1 <<< 20

    /// The folder name of the checkpoint of a step: "checkpoint-N".
    let folderName (step: int) : string = sprintf "checkpoint-%d" step

    /// The step of a folder named "checkpoint-N" (HF's `^checkpoint-(\d+)$`), or None.
    let stepOf (path: string) : int option =
        let m = folderPattern.Match(Path.GetFileName(Path.TrimEndingDirectorySeparator path))
        if not m.Success then None
        else
            match Int32.TryParse m.Groups[1].Value with
            | true, step -> Some step
            | _ -> None

    /// fsync of a directory, so that the entries created or renamed in it survive a power loss.
    /// Best effort: skipped on Windows and where libc is unavailable, and a failing fsync is ignored
    /// (some file systems refuse to sync directories); visibility and atomicity do not depend on it.
    let private syncDirectory (path: string) =
        if not (OperatingSystem.IsWindows()) then
            try
                let descriptor = Posix.openPath(path, Posix.readOnly)
                if descriptor >= 0 then
                    try Posix.fsync descriptor |> ignore
                    finally Posix.close descriptor |> ignore
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> ()

    let private sha256Hex (stream: Stream) = Convert.ToHexStringLower(SHA256.HashData stream)

    /// Hashes a freshly written file and flushes it to disk; a read-only file is synced through its
    /// descriptor on Unix (and left to the OS on Windows).
    let private hashAndSync (path: string) =
        try
            use stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.Read, bufferSize)
            let hash = sha256Hex stream
            stream.Flush true
            stream.Length, hash
        with :? UnauthorizedAccessException ->
            use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize)
            let hash = sha256Hex stream
            if not (OperatingSystem.IsWindows()) then
                try Posix.fsync (int (stream.SafeFileHandle.DangerousGetHandle())) |> ignore
                with
                | :? DllNotFoundException
                | :? EntryPointNotFoundException -> ()
            stream.Length, hash

    /// Checks a writer's file name: relative, inside the folder, not the manifest's name.
    let private checkName (name: string) =
        let parts = name.Split([| '/'; '\\' |])
        if String.IsNullOrWhiteSpace name || Path.IsPathRooted name
           || parts |> Array.exists (fun p -> p = "" || p = "." || p = "..") then
            invalidArg "writers" (sprintf "a checkpoint file name must be a relative path inside the folder: %A" name)
        if String.Equals(name, ManifestName, StringComparison.OrdinalIgnoreCase) then
            invalidArg "writers" (sprintf "%s is the manifest's name and written by CheckpointFolder itself" ManifestName)

    let private writeManifest (path: string) (step: int) (files: CheckpointFile list) =
        do
            use stream = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None)
            do
                use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
                w.WriteStartObject()
                w.WriteString("format", formatName)
                w.WriteNumber("version", FormatVersion)
                w.WriteNumber("step", step)
                w.WriteStartArray "files"
                for f in files do
                    w.WriteStartObject()
                    w.WriteString("name", f.Name)
                    w.WriteNumber("size", f.Size)
                    w.WriteString("sha256", f.Sha256)
                    w.WriteEndObject()
                w.WriteEndArray()
                w.WriteEndObject()
            stream.Flush true

    /// Writes the checkpoint of `step` to `outputDir/checkpoint-N` and returns its full path. Each writer
    /// receives the full path of its name inside a staging folder (`.checkpoint-N.staging-<pid>` beside
    /// the target; a name may hold '/' subfolders, which are created) and must create a file, or a folder
    /// of files, there. Then every file is hashed and flushed to disk, the manifest is written last and
    /// flushed, the staging folder is synced and renamed to `checkpoint-N` (an existing one is moved
    /// aside first and deleted after, as StagedFolder.commit does), and the output folder is synced.
    /// When a writer throws, the staging folder is removed and the exception propagates: no
    /// `checkpoint-N` appears and an existing one is left untouched. Raises ArgumentException for a
    /// negative step or a name that is absolute, leaves the folder, repeats, or is the manifest's.
    let write (outputDir: string) (step: int) (writers: (string * (string -> unit)) list) : string =
        if step < 0 then invalidArg "step" (sprintf "the step must be 0 or more, got %d" step)
        writers |> List.iter (fst >> checkName)
        let names = writers |> List.map (fun (name, _) -> name.Replace('\\', '/'))
        if List.length (List.distinct names) <> List.length names then
            invalidArg "writers" (sprintf "checkpoint file names repeat: %A" names)
        let root = Path.GetFullPath outputDir
        Directory.CreateDirectory root |> ignore
        let target = Path.Combine(root, folderName step)
        let staging = StagedFolder.create target
        try
            for name, writer in writers do
                let path = Path.GetFullPath(Path.Combine(staging, name))
                Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
                writer path
                if not (File.Exists path || Directory.Exists path) then
                    invalidOp (sprintf "the writer of checkpoint file %s created nothing at %s" name path)
            let files =
                Directory.GetFiles(staging, "*", SearchOption.AllDirectories)
                |> Array.map (fun f -> f, Path.GetRelativePath(staging, f).Replace(Path.DirectorySeparatorChar, '/'))
                |> Array.sortWith (fun (_, a) (_, b) -> String.CompareOrdinal(a, b))
                |> Array.map (fun (full, name) ->
                    let size, hash = hashAndSync full
                    { Name = name; Size = size; Sha256 = hash })
                |> List.ofArray
            for folder in Directory.GetDirectories(staging, "*", SearchOption.AllDirectories) do
                syncDirectory folder
            writeManifest (Path.Combine(staging, ManifestName)) step files
            syncDirectory staging
            StagedFolder.commit staging target
            syncDirectory root
            target
        with _ ->
            StagedFolder.discard staging
            reraise ()

    /// Reads and checks a folder's manifest: its format, version, step and file list. Raises
    /// InvalidInputException naming the folder when there is none (an incomplete checkpoint) and the
    /// manifest's field when it is unreadable.
    let private readManifest (folder: string) : int * CheckpointFile list =
        let path = Path.Combine(folder, ManifestName)
        if not (Directory.Exists folder) then InvalidInput.fail folder "" "the checkpoint folder does not exist"
        if not (File.Exists path) then
            InvalidInput.fail folder "" (sprintf "no %s: the checkpoint is incomplete (its writing did not finish)" ManifestName)
        let root =
            match JsonInput.tryParseBytes (ReadOnlyMemory(File.ReadAllBytes path)) with
            | Ok root -> root
            | Error e -> InvalidInput.fail path "" (sprintf "unreadable manifest, not valid JSON (%s)" e.Message)
        if root.ValueKind <> JsonValueKind.Object then InvalidInput.fail path "" "unreadable manifest: expected a JSON object"
        let field (element: JsonElement) (location: string) (key: string) (kind: JsonValueKind) =
            match element.TryGetProperty key with
            | true, value when value.ValueKind = kind -> value
            | true, value ->
                InvalidInput.fail path (location + key) (sprintf "expected %O, found %O" kind value.ValueKind)
            | _ -> InvalidInput.fail path (location + key) "missing"
        let format = (field root "" "format" JsonValueKind.String).GetString()
        if format <> formatName then InvalidInput.fail path "format" (sprintf "expected \"%s\", found \"%s\"" formatName format)
        let version = field root "" "version" JsonValueKind.Number
        match version.TryGetInt32() with
        | true, FormatVersion -> ()
        | _ -> InvalidInput.fail path "version" (sprintf "expected %d, found %s" FormatVersion (version.GetRawText()))
        let step =
            match (field root "" "step" JsonValueKind.Number).TryGetInt32() with
            | true, s when s >= 0 -> s
            | _ -> InvalidInput.fail path "step" "expected a non-negative integer"
        let files =
            (field root "" "files" JsonValueKind.Array).EnumerateArray()
            |> Seq.mapi (fun i entry ->
                let location = sprintf "files[%d]." i
                if entry.ValueKind <> JsonValueKind.Object then
                    InvalidInput.fail path (sprintf "files[%d]" i) "expected an object"
                let name = (field entry location "name" JsonValueKind.String).GetString()
                let parts = name.Split '/'
                if name = "" || Path.IsPathRooted name || parts |> Array.exists (fun p -> p = "" || p = "." || p = "..") then
                    InvalidInput.fail path (location + "name") (sprintf "expected a relative path inside the folder, found %A" name)
                let size =
                    match (field entry location "size" JsonValueKind.Number).TryGetInt64() with
                    | true, s when s >= 0L -> s
                    | _ -> InvalidInput.fail path (location + "size") "expected a non-negative integer"
                let hash = (field entry location "sha256" JsonValueKind.String).GetString()
                if hash.Length <> 64 || not (hash |> Seq.forall Uri.IsHexDigit) then
                    InvalidInput.fail path (location + "sha256") "expected 64 hexadecimal digits"
                { Name = name; Size = size; Sha256 = hash.ToLowerInvariant() })
            |> List.ofSeq
        match stepOf folder with
        | Some named when named <> step ->
            InvalidInput.fail path "step" (sprintf "the manifest says step %d but the folder is named %s" step (folderName named))
        | _ -> ()
        step, files

    /// Checks the manifest and every listed file's presence and size (hashes too when fullCheck);
    /// returns the manifest's step.
    let private check (fullCheck: bool) (folder: string) : int =
        let step, files = readManifest folder
        for f in files do
            let path = Path.Combine(folder, f.Name)
            if not (File.Exists path) then
                InvalidInput.fail path "" (sprintf "missing: %s lists it, the checkpoint is corrupt" ManifestName)
            let size = FileInfo(path).Length
            if size <> f.Size then
                InvalidInput.fail path ""
                    (sprintf "%d bytes, %s says %d: the file is corrupt or truncated" size ManifestName f.Size)
            if fullCheck then
                let hash =
                    use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize)
                    sha256Hex stream
                if hash <> f.Sha256 then
                    InvalidInput.fail path "" (sprintf "SHA-256 %s differs from %s's %s: the file is corrupt" hash ManifestName f.Sha256)
        step

    /// Checks a checkpoint folder completely: its manifest is present and readable, its step matches the
    /// folder's name (for a folder named checkpoint-N), and every file it lists exists with the listed
    /// size and SHA-256. Raises InvalidInputException naming the folder (no manifest: incomplete), the
    /// manifest and field (unreadable), or the file (missing, of another size, or another hash: corrupt).
    let verify (path: string) : unit = check true (Path.TrimEndingDirectorySeparator(Path.GetFullPath path)) |> ignore

    /// The checkpoints `checkpoint-N` of outputDir that pass a cheap check (manifest readable, step
    /// matching the name, every listed file present with its size; no hashing), sorted by step. Folders
    /// without a manifest, leftovers of interrupted writes and other names are left out. Empty when
    /// outputDir does not exist.
    let list (outputDir: string) : (int * string) list =
        let root = Path.GetFullPath outputDir
        if not (Directory.Exists root) then []
        else
            Directory.GetDirectories root
            |> Array.choose (fun folder ->
                match stepOf folder with
                | Some step ->
                    try
                        check false folder |> ignore
                        Some(step, folder)
                    with :? InvalidInputException -> None
                | None -> None)
            |> Array.sortBy fst
            |> List.ofArray

    /// The newest checkpoint of outputDir that verifies completely (see verify), or None, and the newer
    /// `checkpoint-N` folders passed over on the way, newest first, each with why (the problem verify
    /// found: no manifest, a missing file, a size or SHA-256 that differs from the manifest).
    let latestSkipping (outputDir: string) : string option * (string * string) list =
        let root = Path.GetFullPath outputDir
        let candidates =
            if not (Directory.Exists root) then []
            else
                Directory.GetDirectories root
                |> Array.choose (fun folder -> stepOf folder |> Option.map (fun step -> step, folder))
                |> Array.sortByDescending fst
                |> List.ofArray
        let rec search skipped candidates =
            match candidates with
            | [] -> None, List.rev skipped
            | (_, folder) :: older ->
                match (try verify folder; None with :? InvalidInputException as e -> Some e.Message) with
                | None -> Some folder, List.rev skipped
                | Some problem -> search ((folder, problem) :: skipped) older
        search [] candidates

    /// The newest checkpoint of outputDir that verifies completely (see verify), or None. Incomplete or
    /// corrupt ones are passed over (latestSkipping says which and why): an older complete one is
    /// returned instead.
    let latest (outputDir: string) : string option = fst (latestSkipping outputDir)

    /// The checkpoint a --resume-from-checkpoint value names: "latest" (any case) is the newest complete
    /// checkpoint of outputDir (InvalidInputException with the setting resume_from_checkpoint as origin when there
    /// is none; onSkip hears each newer checkpoint passed over and why); anything else is a folder path
    /// that must verify. Returns the full path.
    let resolveReporting (outputDir: string) (spec: string) (onSkip: string -> string -> unit) : string =
        if String.Equals(spec, "latest", StringComparison.OrdinalIgnoreCase) then
            let found, skipped = latestSkipping outputDir
            for folder, problem in skipped do onSkip folder problem
            match found with
            | Some folder -> folder
            | None ->
                InvalidInput.setting "resume_from_checkpoint"
                    (sprintf "\"latest\" found no complete checkpoint-N folder in %s" (Path.GetFullPath outputDir))
        else
            if String.IsNullOrWhiteSpace spec then
                InvalidInput.setting "resume_from_checkpoint" "expected \"latest\" or a checkpoint folder, found nothing"
            let folder = Path.TrimEndingDirectorySeparator(Path.GetFullPath spec)
            verify folder
            folder

    /// resolveReporting without hearing about skipped checkpoints.
    let resolve (outputDir: string) (spec: string) : string = resolveReporting outputDir spec (fun _ _ -> ())

    /// Deletes a checkpoint folder so that no half-deleted folder keeps its name: it is renamed to a
    /// hidden `.checkpoint-N.deleting-<pid>` first (the rename synced), then removed. Nothing happens
    /// when the folder does not exist.
    let delete (path: string) : unit =
        let full = Path.TrimEndingDirectorySeparator(Path.GetFullPath path)
        if Directory.Exists full then
            let parent = Path.GetDirectoryName full
            let hidden = Path.Combine(parent, sprintf ".%s.deleting-%d" (Path.GetFileName full) Environment.ProcessId)
            if Directory.Exists hidden then Directory.Delete(hidden, true)
            Directory.Move(full, hidden)
            syncDirectory parent
            Directory.Delete(hidden, true)

    /// Removes what interrupted writes and deletes left in outputDir: staging folders
    /// (`.checkpoint-N.staging-<pid>`, and `.checkpoint-N.staging-rank<R>` where process R of a ZeRO run
    /// wrote its block of the optimizer state), folders being deleted (`.checkpoint-N.deleting-<pid>`) and
    /// replaced checkpoints (`.checkpoint-N.old-<pid>`). A replaced checkpoint whose replacement never
    /// arrived (no `checkpoint-N`) and that verifies is renamed back to `checkpoint-N` instead. Call it
    /// before training starts, while no other process writes checkpoints to outputDir.
    let cleanStale (outputDir: string) : unit =
        let root = Path.GetFullPath outputDir
        if Directory.Exists root then
            for folder in Directory.GetDirectories root do
                let m = leftoverPattern.Match(Path.GetFileName folder)
                if m.Success then
                    let restoreTo =
                        match m.Groups[2].Value, Int32.TryParse m.Groups[1].Value with
                        | "old", (true, step) ->
                            let target = Path.Combine(root, folderName step)
                            let complete =
                                try check true folder = step
                                with :? InvalidInputException -> false
                            if complete && not (Directory.Exists target) then Some target else None
                        | _ -> None
                    match restoreTo with
                    | Some target -> Directory.Move(folder, target)
                    | None -> Directory.Delete(folder, true)
            syncDirectory root
