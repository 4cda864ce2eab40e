/// `functional COMMAND --help`: options listed in named groups with their defaults, and the same groups as the
/// README's option tables (between `<!-- options: COMMAND -->` and `<!-- /options -->`), so that neither can
/// drift from the other.
module Functional.Tests.HelpTests

open System
open System.IO
open System.Text.RegularExpressions
open Expecto
open Functional.Tests.TestUtil

/// Every command that runs something, as typed after `functional`.
let private commands =
    [ "train"; "generate"; "chat-template"; "tokenize"; "eval"; "export"; "launch"
      "bench generation"; "bench memory"; "bench precision"; "bench train"; "bench distributed"; "bench parallel" ]

/// One option row of the help: its spellings as shown and its text.
type private HelpRow = { Names: string list; Text: string }

/// The groups of a command's help, in order, without the Help group: (title, rows).
let private helpGroups (output: string) : (string * HelpRow list) list =
    let groups = Collections.Generic.List<string * Collections.Generic.List<HelpRow>>()
    let mutable current: Collections.Generic.List<HelpRow> option = None
    for line in output.Split('\n') |> Array.map (fun l -> l.TrimEnd '\r') do
        let heading = Regex.Match(line, @"^(\S.*):$")
        if heading.Success then
            match heading.Groups[1].Value with
            | "Description" | "Usage" | "Arguments" -> current <- None
            | title ->
                let rows = Collections.Generic.List<HelpRow>()
                groups.Add((title, rows))
                current <- Some rows
        else
            match current with
            | Some rows when line.StartsWith "  -" ->
                let label = Regex.Split(line.Trim(), @"  +| <")[0]
                rows.Add { Names = [ for n in label.Split(',') -> n.Trim() ]; Text = line.Trim().Substring(label.Length).Trim() }
            | Some rows when line.StartsWith "   " && rows.Count > 0 ->
                let last = rows[rows.Count - 1]
                rows[rows.Count - 1] <- { last with Text = last.Text + " " + line.Trim() }
            | _ -> ()
    [ for title, rows in groups do
          if title <> "Help" then yield title, List.ofSeq rows ]

/// The README's option tables of a command: (title, the option spellings of each table's first column).
let private readmeGroups (readme: string) (command: string) : (string * string list) list =
    let start = readme.IndexOf(sprintf "<!-- options: %s -->" command, StringComparison.Ordinal)
    if start < 0 then failtestf "README.md has no <!-- options: %s --> block" command
    let finish = readme.IndexOf("<!-- /options -->", start, StringComparison.Ordinal)
    let block = readme.Substring(start, finish - start)
    [ for m in Regex.Matches(block, @"\*\*(.+?)\*\*\s*\n\s*\n((?:\|.*\n?)+)") do
          let rows = m.Groups[2].Value.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.skip 2
          let names =
              [ for row in rows do
                    let first = row.Split('|')[1]
                    for t in Regex.Matches(first, @"`(--?[a-z0-9-]+)`") -> t.Groups[1].Value ]
          yield m.Groups[1].Value, names ]

let private readme = lazy (File.ReadAllText(Path.Combine(ScriptTests.repositoryRoot (), "README.md")))

let private help (command: string) =
    let run = runCli (command.Split(' ') |> List.ofArray |> fun path -> path @ [ "--help" ])
    Expect.equal run.ExitCode 0 (sprintf "%s --help exits 0 (stderr: %s)" command run.Stderr)
    run.Stdout

[<Tests>]
let tests =
    testList "cli help" [
        for command in commands do
            test (sprintf "functional %s --help has the groups and options of the README's tables" command) {
                let shown = helpGroups (help command)
                Expect.isNonEmpty shown (command + ": the help has option groups")
                let documented = readmeGroups readme.Value command
                Expect.equal (List.map fst documented) (List.map fst shown) (command + ": the README's tables are the help's groups, in order")
                for (title, rows), (_, names) in List.zip shown documented do
                    let spellings = rows |> List.collect (fun r -> r.Names) |> set
                    for name in names do
                        Expect.isTrue (spellings.Contains name) (sprintf "%s, %s: the README's %s is an option of this group" command title name)
                    for row in rows do
                        Expect.isTrue (row.Names |> List.exists (fun n -> List.contains n names))
                            (sprintf "%s, %s: %s is in the README's table" command title row.Names.Head)
            }
        test "help shows each option's default and the snake_case note; a required option does not block help" {
            let train = help "train"
            for expected in [ "Optimizer:"; "[default: 8]"; "[default: adamw]"; "[default: 5e-05]"; "--optim-args"; "takes its snake_case spelling (--overwrite-output-dir as --overwrite_output_dir)" ] do
                Expect.stringContains train expected "train --help"
            let rows = helpGroups train |> List.collect snd
            let batch = rows |> List.find (fun r -> r.Names.Head = "--per-device-train-batch-size")
            Expect.stringContains batch.Text "[default: 8]" "the batch size's default"
            Expect.isFalse (rows |> List.exists (fun r -> r.Names |> List.exists (fun n -> n.Contains '_'))) "snake_case spellings are not listed one by one"
            let launch = help "launch"
            Expect.stringContains launch "-n, --np, --nproc" "launch's required -n is listed, and help works without it"
        }
    ]
