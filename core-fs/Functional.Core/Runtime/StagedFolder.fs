namespace Functional.Runtime

open System
open System.Diagnostics
open System.IO
open System.Text.RegularExpressions

/// Writing a folder so that readers see either the old one or the complete new one: files go to a
/// staging folder beside the target, which replaces the target only when everything is written.
[<RequireQualifiedAccess>]
module StagedFolder =

    let private sibling (target: string) (tag: string) =
        let full = Path.GetFullPath target
        Path.Combine(Path.GetDirectoryName full, sprintf ".%s.%s-%d" (Path.GetFileName full) tag Environment.ProcessId)

    /// A fresh, empty staging folder beside target (a leftover one of this process is removed).
    let create (target: string) : string =
        let staging = sibling target "staging"
        if Directory.Exists staging then Directory.Delete(staging, true)
        Directory.CreateDirectory staging |> ignore
        staging

    /// Puts the staging folder in target's place. An existing target is moved aside first and deleted
    /// only after the staging folder has taken its place.
    let commit (staging: string) (target: string) =
        let full = Path.GetFullPath target
        Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
        if Directory.Exists full then
            let old = sibling target "old"
            if Directory.Exists old then Directory.Delete(old, true)
            Directory.Move(full, old)
            Directory.Move(staging, full)
            Directory.Delete(old, true)
        else
            Directory.Move(staging, full)

    /// Removes a staging folder after a failure (nothing happens when it is gone already).
    let discard (staging: string) =
        if Directory.Exists staging then Directory.Delete(staging, true)

    /// Clock differences between a process's start time (kept by the kernel in ticks since boot) and a
    /// folder's time stamp that are still taken as "at the same moment".
    let private clockTolerance = TimeSpan.FromSeconds 2.0

    /// Whether the process that wrote a leftover folder named after it may still be running: a process
    /// with that id exists and started before the folder was last written. A process with the id that
    /// started later is another one that reused the id (the writer was alive, with that id, when it
    /// wrote the folder).
    let private ownerAlive (pid: int) (folder: string) =
        try
            use p = Process.GetProcessById pid
            p.StartTime.ToUniversalTime() <= Directory.GetLastWriteTimeUtc(folder) + clockTolerance
        with
        | :? ArgumentException
        | :? InvalidOperationException -> false
        | :? ComponentModel.Win32Exception
        | :? NotSupportedException -> true

    /// Removes what writers of target that are no longer running left beside it: their staging folders
    /// (`.NAME.staging-PID`) are deleted, and a replaced target (`.NAME.old-PID`, moved aside by commit)
    /// is put back in target's place when the replacement never arrived (no target), else deleted.
    /// Folders of a process that is still running (the id exists and the process started before the
    /// folder was last written) are never touched. Returns the folders removed or put back, with what
    /// was done ("removed", "restored to TARGET").
    let cleanStale (target: string) : (string * string) list =
        let full = Path.TrimEndingDirectorySeparator(Path.GetFullPath target)
        let parent = Path.GetDirectoryName full
        if not (Directory.Exists parent) then []
        else
            let pattern =
                Regex(sprintf @"^\.%s\.(staging|old)-([0-9]+)$" (Regex.Escape(Path.GetFileName full)), RegexOptions.CultureInvariant)
            [ for folder in Directory.GetDirectories parent do
                  let m = pattern.Match(Path.GetFileName folder)
                  match Int32.TryParse m.Groups[2].Value with
                  | true, pid when m.Success && not (ownerAlive pid folder) ->
                      if m.Groups[1].Value = "old" && not (Directory.Exists full) then
                          Directory.Move(folder, full)
                          yield folder, sprintf "restored to %s" full
                      else
                          Directory.Delete(folder, true)
                          yield folder, "removed"
                  | _ -> () ]
