namespace Functional.Cli;

/// <summary>The closing report of a training run on the console.</summary>
internal static class Report
{
    private static string Percent(double? fraction) =>
        fraction is { } f ? Program.Num(100 * f, "F1") + "%" : "-";

    /// <summary>One evaluation as a line: "eval at step 200: loss 0.1234  perplexity 1.13  exact match 45.0%"
    /// (step 0: "eval before training").</summary>
    public static string EvaluationLine(EvaluationProgress e)
    {
        var when = e.Step == 0 ? "eval before training" : $"eval at step {e.Step}";
        var exact = e.ExactMatch is { } m ? $"  exact match {Percent(m)}" : "";
        if (e.Metrics.Count > 0)
        {
            var figures = string.Concat(e.Metrics.Select(m => $"  {m.Key.Replace('_', ' ')} {Program.Num(m.Value, "F4")}"));
            return $"{when}: loss {Program.Num(e.Loss, "F4")}{figures}";
        }
        return $"{when}: loss {Program.Num(e.Loss, "F4")}  perplexity {Program.Num(e.Perplexity, "F2")}{exact}";
    }

    /// <summary>Prints what the run measured and where its files are. The steps, time and speed are this process's:
    /// after a resume, the steps before it are not counted as trained here.</summary>
    public static void Print(FineTuneResult result)
    {
        Console.WriteLine();
        var trained = result.Steps - result.StartStep;
        var range = result.StartStep == 0 ? ""
            : trained > 0 ? $" (steps {result.StartStep + 1} to {result.Steps}, resumed from {result.ResumedFrom})"
            : $" (resumed from {result.ResumedFrom} at step {result.StartStep}, the run's last)";
        Console.WriteLine($"trained {trained} steps{range} in {Program.Num(result.TrainRuntime, "F1")} s (job {Program.Num(result.Seconds, "F1")} s); final training loss {Program.Num(result.FinalLoss, "F4")}, run average {Program.Num(result.TrainLoss, "F4")}");
        if (result.Before is { } before && result.After is { } after)
        {
            Console.WriteLine($"                 before     after");
            Console.WriteLine($"eval loss    {Program.Num(before.Loss, "F4"),10} {Program.Num(after.Loss, "F4"),9}");
            if (after.Metrics.Count == 0)
            {
                Console.WriteLine($"perplexity   {Program.Num(before.Perplexity, "F2"),10} {Program.Num(after.Perplexity, "F2"),9}");
            }
            foreach (var (name, value) in after.Metrics)
            {
                var earlier = before.Metrics.FirstOrDefault(m => m.Key == name).Value;
                Console.WriteLine($"{name.Replace('_', ' '),-12} {Program.Num(earlier, "F4"),10} {Program.Num(value, "F4"),9}");
            }
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
