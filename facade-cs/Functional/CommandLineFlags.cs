namespace Functional;

/// <summary>
/// The command line's vocabulary for the core's settings. The core names a setting in snake_case (its errors say
/// <c>learning_rate</c>, HF TrainingArguments' spelling); the <c>functional</c> command spells it as an option,
/// <c>--learning-rate</c>. This is the one place that maps one to the other.
/// </summary>
public static class CommandLineFlags
{
    /// <summary>The command-line option that sets a setting: <c>learning_rate</c> -> <c>--learning-rate</c>.</summary>
    public static string Of(string setting) => "--" + setting.Replace('_', '-');
}
