namespace Functional.Cli;

/// <summary>The closing report of a training run on the console.</summary>
internal static class Report
{
    private static string Percent(double? fraction) =>
        fraction is { } f ? Program.Num(100 * f, "F1") + "%" : "-";

    /// <summary>Prints what the run measured and where its files are.</summary>
    public static void Print(FineTuneResult result)
    {
        Console.WriteLine();
        Console.WriteLine($"trained {result.Steps} steps in {Program.Num(result.TrainRuntime, "F1")} s (job {Program.Num(result.Seconds, "F1")} s); final training loss {Program.Num(result.FinalLoss, "F4")}");
        if (result.Before is { } before && result.After is { } after)
        {
            Console.WriteLine($"                 before     after");
            Console.WriteLine($"eval loss    {Program.Num(before.Loss, "F4"),10} {Program.Num(after.Loss, "F4"),9}");
            Console.WriteLine($"perplexity   {Program.Num(before.Perplexity, "F2"),10} {Program.Num(after.Perplexity, "F2"),9}");
            if (before.ExactMatch is not null || after.ExactMatch is not null)
            {
                Console.WriteLine($"exact match  {Percent(before.ExactMatch),10} {Percent(after.ExactMatch),9}");
            }
        }
        if (result.SkippedRows > 0)
        {
            Console.WriteLine($"skipped {result.SkippedRows} bad rows");
        }
        Console.WriteLine($"metrics: {result.MetricsPath}");
        Console.WriteLine($"plot:    {result.PlotPath}");
        Console.WriteLine($"model:   {result.FinalModelPath}");
    }
}
