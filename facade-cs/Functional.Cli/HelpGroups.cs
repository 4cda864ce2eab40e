using System.CommandLine;
using System.CommandLine.Help;
using System.CommandLine.Invocation;
using System.Globalization;
using System.Runtime.CompilerServices;
using System.Text;

namespace Functional.Cli;

/// <summary>
/// Help that lists a command's options in named groups, each option with its default, in the grouping of the
/// README's option tables (a test compares the two). Commands without groups get System.CommandLine's own help.
/// </summary>
internal static class HelpGroups
{
    /// <summary>One group: its title (as the README's table heading) and its options, in order.</summary>
    internal sealed record Group(string Title, IReadOnlyList<Option> Options);

    private static readonly ConditionalWeakTable<Command, List<Group>> Groups = new();

    /// <summary>Adds a group of options to the command's help, after those added before.</summary>
    public static void Add(Command command, string title, params Option[] options)
    {
        Groups.GetOrCreateValue(command).Add(new Group(title, options));
    }

    /// <summary>The command's groups, or an empty list when its help is the default one.</summary>
    public static IReadOnlyList<Group> Of(Command command) =>
        Groups.TryGetValue(command, out var groups) ? groups : [];

    /// <summary>Gives every command below root that has no subcommands and no groups of its own one group,
    /// "Options", of its options in the order they were added.</summary>
    public static void GroupTheRest(Command root)
    {
        foreach (var command in root.Subcommands)
        {
            if (command.Subcommands.Count > 0)
            {
                GroupTheRest(command);
            }
            else if (Of(command).Count == 0)
            {
                Add(command, "Options", command.Options.Where(o => !o.Hidden).ToArray());
            }
        }
    }

    /// <summary>Makes the help option print grouped help for commands that have groups.</summary>
    public static void Install(HelpOption help)
    {
        help.Action = new GroupedHelpAction(help.Action);
    }

    /// <summary>The grouped help of a command: description, usage, arguments, then each group of options
    /// (options no group names come last, under "Other options").</summary>
    public static string Render(Command command, int width)
    {
        var text = new StringBuilder();
        if (!string.IsNullOrWhiteSpace(command.Description))
        {
            text.AppendLine("Description:");
            foreach (var line in Wrap(command.Description, width - 2))
            {
                text.Append("  ").AppendLine(line);
            }
            text.AppendLine();
        }
        var path = string.Join(" ", Path(command));
        var arguments = command.Arguments.Where(a => !a.Hidden).ToList();
        var usage = new StringBuilder(path);
        foreach (var argument in arguments)
        {
            usage.Append(' ').Append('<').Append(argument.Name).Append('>').Append(argument.Arity.MaximumNumberOfValues > 1 ? "..." : "");
        }
        usage.Append(" [options]");
        text.AppendLine("Usage:").Append("  ").AppendLine(usage.ToString()).AppendLine();
        var groups = Of(command);
        var listed = new HashSet<Option>(groups.SelectMany(g => g.Options));
        var visible = Visible(command).ToList();
        var others = visible.Where(o => !listed.Contains(o) && o is not HelpOption).ToList();
        var shown = groups
            .Append(new Group("Other options", others))
            .Append(new Group("Help", visible.OfType<HelpOption>().ToArray()))
            .Where(g => g.Options.Count > 0)
            .ToList();
        var labels = shown.SelectMany(g => g.Options).Select(Label).Concat(arguments.Select(a => $"<{a.Name}>"));
        var column = Math.Min(labels.Max(l => l.Length), Math.Max(20, width / 3));
        if (arguments.Count > 0)
        {
            text.AppendLine("Arguments:");
            WriteRows(text, arguments.Select(a => ($"<{a.Name}>", a.Description ?? "")).ToList(), column, width);
            text.AppendLine();
        }
        foreach (var group in shown)
        {
            text.Append(group.Title).AppendLine(":");
            WriteRows(text, group.Options.Select(o => (Label(o), Describe(o))).ToList(), column, width);
            text.AppendLine();
        }
        var snake = visible.FirstOrDefault(o => o.Name.Length > 2 && o.Name[2..].Contains('-', StringComparison.Ordinal) && o.Aliases.Contains("--" + o.Name[2..].Replace('-', '_')));
        if (snake is not null)
        {
            text.AppendLine($"Every option with a dash also takes its snake_case spelling ({snake.Name} as --{snake.Name[2..].Replace('-', '_')}).");
        }
        return text.ToString();
    }

    /// <summary>The options the command's help shows: its own and the recursive ones of its parents (help, version).</summary>
    internal static IEnumerable<Option> Visible(Command command)
    {
        var own = command.Options.Where(o => !o.Hidden);
        var inherited = Ancestors(command).SelectMany(c => c.Options).Where(o => o.Recursive && !o.Hidden && o is not VersionOption);
        return own.Concat(inherited).Distinct();
    }

    private static IEnumerable<Command> Ancestors(Command command)
    {
        for (var parent = command.Parents.OfType<Command>().FirstOrDefault(); parent is not null; parent = parent.Parents.OfType<Command>().FirstOrDefault())
        {
            yield return parent;
        }
    }

    private static IEnumerable<string> Path(Command command) =>
        Ancestors(command).Reverse().Select(c => c.Name).Append(command.Name);

    /// <summary>"--name, --alias &lt;N&gt;": the name, the aliases that are not just its snake_case spelling, and a value
    /// hint for options that take a value.</summary>
    internal static string Label(Option option)
    {
        var spellings = option.Aliases.Append(option.Name).ToHashSet();
        var aliases = option.Aliases.Where(a => !(a.Contains('_') && spellings.Contains(a.Replace('_', '-'))));
        var names = string.Join(", ", aliases.OrderBy(a => a.Length).Prepend(option.Name).Distinct());
        return option.Arity.MaximumNumberOfValues == 0 || option.ValueType == typeof(bool) ? names : names + " " + Hint(option);
    }

    private static string Hint(Option option)
    {
        if (!string.IsNullOrEmpty(option.HelpName))
        {
            return "<" + option.HelpName + ">";
        }
        var type = Nullable.GetUnderlyingType(option.ValueType) ?? option.ValueType;
        return type == typeof(int) || type == typeof(long) ? "<N>"
            : type == typeof(double) || type == typeof(float) ? "<X>"
            : type.IsArray ? "<VALUE>..."
            : "<VALUE>";
    }

    /// <summary>The option's description and, when it has one worth showing, its default: "[default: 8]".</summary>
    internal static string Describe(Option option)
    {
        var description = option.Description ?? "";
        return DefaultText(option) is { } value ? $"{description} [default:{NoBreak}{value}]" : description;
    }

    /// <summary>The option's default as help shows it, or null for none (no default, empty, false or an empty list).</summary>
    internal static string? DefaultText(Option option)
    {
        if (!option.HasDefaultValue || option is HelpOption)
        {
            return null;
        }
        return option.GetDefaultValue() switch
        {
            null => null,
            bool b => b ? "true" : null,
            string s => s.Length == 0 ? null : s,
            double d => d.ToString("R", CultureInfo.InvariantCulture).Replace("E", "e"),
            float f => f.ToString("R", CultureInfo.InvariantCulture).Replace("E", "e"),
            System.Collections.IEnumerable items and not string => items.Cast<object>().Any() ? string.Join(",", items.Cast<object>()) : null,
            IFormattable value => value.ToString(null, CultureInfo.InvariantCulture),
            var value => value.ToString(),
        };
    }

    /// <summary>Joins "[default:" to its value so that wrapping keeps them on one line.</summary>
    private const char NoBreak = '\u00A0';

    private static void WriteRows(StringBuilder text, IReadOnlyList<(string Label, string Description)> rows, int column, int width)
    {
        const int indent = 2;
        var descriptionWidth = Math.Max(30, width - indent - column - 2);
        foreach (var (label, description) in rows)
        {
            var lines = WrapLines(description, descriptionWidth).ToList();
            text.Append(' ', indent).Append(label);
            if (label.Length > column)
            {
                text.AppendLine();
                text.Append(' ', indent + column + 2);
            }
            else
            {
                text.Append(' ', column - label.Length + 2);
            }
            text.AppendLine(lines.Count > 0 ? lines[0] : "");
            foreach (var line in lines.Skip(1))
            {
                text.Append(' ', indent + column + 2).AppendLine(line);
            }
        }
    }

    private static IEnumerable<string> Wrap(string text, int width)
    {
        var line = new StringBuilder();
        foreach (var word in text.Split(' ', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.Length > 0 && line.Length + 1 + word.Length > width)
            {
                yield return line.ToString();
                line.Clear();
            }
            if (line.Length > 0)
            {
                line.Append(' ');
            }
            line.Append(word);
        }
        if (line.Length > 0)
        {
            yield return line.ToString();
        }
    }

    private static IEnumerable<string> WrapLines(string text, int width) => Wrap(text, width).Select(l => l.Replace(NoBreak, ' '));

    /// <summary>Prints grouped help for commands with groups, and System.CommandLine's help for the others.</summary>
    internal sealed class GroupedHelpAction(CommandLineAction? fallback) : SynchronousCommandLineAction
    {
        /// <inheritdoc />
        public override bool ClearsParseErrors => true;

        /// <inheritdoc />
        public override int Invoke(ParseResult parseResult)
        {
            var command = parseResult.CommandResult.Command;
            if (Of(command).Count == 0)
            {
                return fallback is SynchronousCommandLineAction action ? action.Invoke(parseResult) : new HelpAction().Invoke(parseResult);
            }
            var width = Console.IsOutputRedirected ? 110 : Math.Max(60, Console.WindowWidth);
            parseResult.InvocationConfiguration.Output.Write(Render(command, width));
            return 0;
        }
    }
}
