using System.CommandLine;
using System.CommandLine.Help;
using System.Globalization;
using System.Text.RegularExpressions;
using Functional;

namespace Functional.Cli;

/// <summary>The `functional` command.</summary>
public static partial class Program
{
    /// <summary>Exit code for bad input (options, files, data) and failed file-system operations: a clear message, no
    /// stack trace.</summary>
    public const int BadInput = 2;

    /// <summary>The commands that compute with tensors: TorchSharp's native libraries start only for these (tokenize
    /// needs none, so it answers without the 2-3 s start).</summary>
    private static readonly HashSet<string> TensorCommands = ["train", "generate", "bench", "export", "eval", "doctor"];

    /// <summary>The command tree. The root is a plain command named `functional` (a RootCommand would be named after
    /// the executable, Functional.Cli), with help and --version; alone, it prints the help.</summary>
    internal static Command CreateRoot()
    {
        var help = new HelpOption();
        HelpGroups.Install(help);
        var root = new Command("functional", "Functional: train and fine-tune language models from .NET.")
        {
            TrainCommand.Create(),
            TokenizeCommand.Create(),
            ChatTemplateCommand.Create(),
            GenerateCommand.Create(),
            BenchCommand.Create(),
            ExportCommand.Create(),
            EvalCommand.Create(),
            LaunchCommand.Create(),
            DoctorCommand.Create(),
            help,
            new VersionOption(),
        };
        root.SetAction(parse => new HelpAction().Invoke(parse));
        HelpGroups.GroupTheRest(root);
        return root;
    }

    /// <summary>Runs the command line; returns the process exit code.</summary>
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0].StartsWith("[suggest", StringComparison.Ordinal))
        {
            return Suggest(args.Length > 1 ? args[1] : "");
        }
        // No response files: a text argument such as "@dataclass" is text, not a file to expand.
        var parsed = CreateRoot().Parse(args, new ParserConfiguration { ResponseFileTokenReplacer = null });
        if (parsed.Errors.Count > 0)
        {
            foreach (var error in parsed.Errors)
            {
                Console.Error.WriteLine($"error: {Plain(error.Message)}");
            }
            Console.Error.WriteLine("Run 'functional --help' for the commands and options.");
            return BadInput;
        }
        try
        {
            if (TensorCommands.Contains(parsed.CommandResult.Command.Name) && parsed.Action is not (HelpAction or HelpGroups.GroupedHelpAction))
            {
                // These commands touch TorchSharp directly (thread settings, benchmarks): start it first.
                Runtime.TorchRuntime.ensure();
            }
            return parsed.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (InvalidInputException e)
        {
            var message = e.Render(CommandLineFlags.Of).Message;
            Console.Error.WriteLine($"error: {message}");
            return Fail(BadInput, message);
        }
        catch (Exception e) when (FileSystemProblem(e) is { } problem)
        {
            Console.Error.WriteLine($"error: {problem}");
            return Fail(BadInput, problem);
        }
        catch (Exception e)
        {
            Console.Error.WriteLine($"error: the run failed unexpectedly; please report this with the details below.\n{e}");
            return Fail(1, $"{e.GetType().FullName}: {e.Message.ReplaceLineEndings(" ")}");
        }
    }

    /// <summary>Shell completion: `functional "[suggest]" "LINE"` prints, one per line, what may follow LINE (the
    /// command line typed so far, starting with the program's name): commands, options and option values. The
    /// shells' hooks (README) call it on every Tab.</summary>
    private static int Suggest(string line)
    {
        var tokens = System.CommandLine.Parsing.CommandLineParser.SplitCommandLine(line).ToList();
        if (tokens.Count > 0 && Path.GetFileNameWithoutExtension(tokens[0]) is "functional" or "Functional.Cli")
        {
            tokens.RemoveAt(0);
        }
        var endsInSpace = line.Length > 0 && char.IsWhiteSpace(line[^1]);
        var parsed = CreateRoot().Parse(endsInSpace ? [.. tokens, ""] : tokens, new ParserConfiguration { ResponseFileTokenReplacer = null });
        foreach (var completion in parsed.GetCompletions())
        {
            Console.WriteLine(completion.Label);
        }
        return 0;
    }

    /// <summary>Ends a failed command with code. In a multi-process (mpirun) run this process's peers would wait
    /// for it forever inside a collective, so the whole run is aborted first: one line naming the rank ("rank 1 of 2
    /// failed: message") and MPI_Abort, which does not return; mpirun then ends the other processes and exits with
    /// code. In a single-process run it just returns code. (An exception that escapes Main, on any thread, aborts
    /// the run the same way: the MPI communicator installs that handler when it starts.)</summary>
    private static int Fail(int code, string message)
    {
        Distributed.Faults.abortActiveRun(code, message);
        return code;
    }

    /// <summary>One line for a failed file-system operation (a read-only file system, a full disk, no permission, a
    /// path that cannot be created), found in the exception or its causes; null when the failure is something else.
    /// .NET's messages name the path ("Read-only file system : '/x/metrics.jsonl'").</summary>
    internal static string? FileSystemProblem(Exception e)
    {
        for (var current = e; current is not null; current = current.InnerException)
        {
            // A missing assembly is an installation fault, not the user's path.
            if (current is IOException or UnauthorizedAccessException && !current.Message.Contains("Could not load file or assembly"))
            {
                return $"{current.Message.ReplaceLineEndings(" ").Trim()} (a file-system operation failed; check the path, its permissions and the free space)";
            }
        }
        return null;
    }

    /// <summary>A parse error in plain words: System.CommandLine names .NET types ("as expected type
    /// 'System.Double'"); this says "--learning-rate: expected a number, got 'abc'".</summary>
    private static string Plain(string message)
    {
        var match = TypeError().Match(message);
        if (!match.Success)
        {
            return message;
        }
        var type = match.Groups["type"].Value.Replace("System.Nullable`1[", "").TrimEnd(']');
        var expected = type switch
        {
            "System.Int32" or "System.Int64" or "System.Int16" => "an integer",
            "System.Double" or "System.Single" or "System.Decimal" => "a number",
            "System.Boolean" => "true or false",
            _ => "a value of another kind",
        };
        return $"{match.Groups["option"].Value}: expected {expected}, got '{match.Groups["value"].Value}'";
    }

    [GeneratedRegex("Cannot parse argument '(?<value>.*)' for (option|command|argument) '(?<option>[^']*)' as expected type '(?<type>[^']*)'")]
    private static partial Regex TypeError();

    /// <summary>Formats a number for console output with the invariant culture.</summary>
    internal static string Num(double value, string format) => value.ToString(format, CultureInfo.InvariantCulture);
}
