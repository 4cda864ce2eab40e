using System.CommandLine;
using System.Globalization;
using Functional;

namespace Functional.Cli;

/// <summary>The `functional` command.</summary>
public static class Program
{
    /// <summary>Exit code for bad input (options, files, data): a clear message, no stack trace.</summary>
    public const int BadInput = 2;

    /// <summary>Runs the command line; returns the process exit code.</summary>
    public static int Main(string[] args)
    {
        var root = new RootCommand("Functional: train and fine-tune language models from .NET.")
        {
            TrainCommand.Create(),
            TokenizeCommand.Create(),
            GenerateCommand.Create(),
            BenchCommand.Create(),
            ExportCommand.Create(),
        };
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            foreach (var error in parsed.Errors)
            {
                Console.Error.WriteLine($"error: {error.Message}");
            }
            Console.Error.WriteLine("Run 'functional --help' for the commands and options.");
            return BadInput;
        }
        try
        {
            // Commands may touch TorchSharp directly (thread settings, benchmarks): start it first.
            Runtime.TorchRuntime.ensure();
            return parsed.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (InvalidInputException e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return BadInput;
        }
        catch (Exception e)
        {
            Console.Error.WriteLine($"error: the run failed unexpectedly; please report this with the details below.\n{e}");
            return 1;
        }
    }

    /// <summary>Formats a number for console output with the invariant culture.</summary>
    internal static string Num(double value, string format) => value.ToString(format, CultureInfo.InvariantCulture);
}
