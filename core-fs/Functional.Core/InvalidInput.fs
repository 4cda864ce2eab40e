namespace Functional

open System

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
