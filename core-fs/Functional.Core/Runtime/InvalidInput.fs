namespace Functional

open System
open System.IO

/// The names of settings in messages. Core code names a setting, never a command-line flag or a builder
/// method: a message mentions one as {setting_name} (snake_case, HF TrainingArguments' spelling where HF
/// has the setting, e.g. {learning_rate}), and each face renders the mention in its own vocabulary (the
/// command line as --learning-rate, the C# builder as its method). Unrendered, a mention reads as the
/// plain name (learning_rate).
[<RequireQualifiedAccess>]
module SettingText =

    let private mentionPattern = Text.RegularExpressions.Regex(@"\{([a-z][a-z0-9_]*)\}", Text.RegularExpressions.RegexOptions.Compiled)

    /// The mention of a setting in a message: "{name}".
    let mention (name: string) = "{" + name + "}"

    /// text with every setting mention replaced by nameOf(setting).
    let render (nameOf: string -> string) (text: string) =
        if isNull text || not (text.Contains '{') then text
        else mentionPattern.Replace(text, fun m -> nameOf m.Groups[1].Value)

    /// text with every setting mention replaced by the setting's plain name.
    let plain (text: string) = render id text

    /// The setting a text names when it is exactly one mention ("{learning_rate}" -> Some "learning_rate").
    let named (text: string) : string option =
        if isNull text then None
        else
            let m = mentionPattern.Match text
            if m.Success && m.Length = text.Length then Some m.Groups[1].Value else None

/// Bad user input: a file or setting (Origin), where in it (Location: a line, field or byte offset;
/// empty when the whole input is at fault) and what was expected (Problem). The message reads
/// "origin:location: problem", the way compilers report errors. The command line prints it without a
/// stack trace and exits with code 2. Origin, location and problem may mention settings as
/// {setting_name} (SettingText); Origin, Location, Problem and Message give them as plain names, Render
/// in a face's own vocabulary.
type InvalidInputException(origin: string, location: string, problem: string) =
    inherit Exception(
        let origin, location, problem = SettingText.plain origin, SettingText.plain location, SettingText.plain problem
        if String.IsNullOrEmpty location then sprintf "%s: %s" origin problem
        else sprintf "%s:%s: %s" origin location problem)

    /// The exception for a setting whose value is wrong: origin is the setting (snake_case).
    static member ForSetting(setting: string, location: string, problem: string) =
        InvalidInputException(SettingText.mention setting, location, problem)

    /// The file path or setting name where the problem is.
    member _.Origin = SettingText.plain origin

    /// The setting the exception is about (its origin), or null when the origin is a file.
    member _.Setting: string = SettingText.named origin |> Option.toObj

    /// The line, field or byte offset within Origin; empty when the whole input is at fault.
    member _.Location = SettingText.plain location

    /// What is wrong and what was expected.
    member _.Problem = SettingText.plain problem

    /// The same error in a face's vocabulary: every setting mention of origin, location and problem
    /// replaced by nameOf(setting) (e.g. the command line's flag).
    member _.Render(nameOf: Func<string, string>) =
        let r = SettingText.render nameOf.Invoke
        InvalidInputException(r origin, r location, r problem)

/// Raising InvalidInputException from F# code.
[<RequireQualifiedAccess>]
module InvalidInput =

    /// Raises an InvalidInputException for origin (file or option), location (may be "") and problem.
    let fail origin location problem : 'T = raise (InvalidInputException(origin, location, problem))

    /// Raises for a setting (snake_case, e.g. "learning_rate") whose value is out of range.
    let setting (name: string) problem : 'T = raise (InvalidInputException.ForSetting(name, "", problem))

    /// Raises for the setting origin mentions ("{learning_rate}", SettingText.mention) or the file it names.
    let failSetting (origin: string) problem : 'T = fail origin "" problem

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
