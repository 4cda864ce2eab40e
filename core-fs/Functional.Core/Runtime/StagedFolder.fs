namespace Functional.Runtime

open System
open System.IO

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
