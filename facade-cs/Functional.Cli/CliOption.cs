using System.CommandLine;

namespace Functional.Cli;

/// <summary>Options spelled in kebab-case that also accept the HF/DeepSpeed snake_case spellings.</summary>
internal static class CliOption
{
    /// <summary>An option named <paramref name="name"/> (e.g. --max-seq-len), with its snake_case alias
    /// (--max_seq_len) and any more aliases, a description and a default value.</summary>
    public static Option<T> Create<T>(string name, string description, T defaultValue, params string[] moreAliases)
    {
        var snake = "--" + name[2..].Replace('-', '_');
        var aliases = new[] { snake }.Concat(moreAliases).Where(a => a != name).Distinct().ToArray();
        return new Option<T>(name, aliases)
        {
            Description = description,
            DefaultValueFactory = _ => defaultValue,
        };
    }

    /// <summary>Whether the command line names the option (as opposed to its default applying).</summary>
    public static bool Given(ParseResult parse, Option option) => parse.GetResult(option) is { Implicit: false };
}
