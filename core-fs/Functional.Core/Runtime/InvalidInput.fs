namespace Functional

open System
open System.IO

/// Bad user input: a file or option (Origin), where in it (Location: a line, field or byte offset;
/// empty when the whole input is at fault) and what was expected (Problem). The message reads
/// "origin:location: problem", the way compilers report errors. The command line prints it without a
/// stack trace and exits with code 2.
type InvalidInputException(origin: string, location: string, problem: string) =
    inherit Exception(
        if String.IsNullOrEmpty location then sprintf "%s: %s" origin problem
        else sprintf "%s:%s: %s" origin location problem)

    /// The file path or option name where the problem is.
    member _.Origin = origin

    /// The line, field or byte offset within Origin; empty when the whole input is at fault.
    member _.Location = location

    /// What is wrong and what was expected.
    member _.Problem = problem

/// Raising InvalidInputException from F# code.
[<RequireQualifiedAccess>]
module InvalidInput =

    /// Raises an InvalidInputException for origin (file or option), location (may be "") and problem.
    let fail origin location problem : 'T = raise (InvalidInputException(origin, location, problem))

    /// Raises for a command-line option whose value is out of range.
    let option name problem : 'T = fail name "" problem

    /// Raises unless path is an existing file: problem `missing` when nothing is there, "is a folder;
    /// expected ..." when a folder is.
    let requireFile (path: string) (missing: string) (expected: string) =
        if Directory.Exists path then fail path "" (sprintf "is a folder; expected %s" expected)
        elif not (File.Exists path) then fail path "" missing

    /// Raises unless path is an existing folder: problem `missing` when nothing is there, "is a file;
    /// expected ..." when a file is.
    let requireFolder (path: string) (missing: string) (expected: string) =
        if File.Exists path then fail path "" (sprintf "is a file; expected %s" expected)
        elif not (Directory.Exists path) then fail path "" missing
