using System.Globalization;
using System.Text;

namespace Functional.Cli;

/// <summary>
/// Shows the progress of a training run: step/total, a bar, loss, learning rate, tokens per second,
/// elapsed time and the estimated time left (elapsed / steps this process has done x steps left, elapsed
/// counted from construction; after a resume the steps before it do not count as done here). On an interactive terminal one status line is redrawn in place (carriage return and
/// ANSI erase-line); when output is redirected (CI, files, tests) it writes one plain line per reported
/// step, at most one per percent of the run plus the last step, so long runs stay readable in logs.
/// </summary>
public sealed class ProgressDisplay : IDisposable
{
    /// <summary>Redraws of the interactive line closer together than this are skipped (except the last step).</summary>
    private static readonly TimeSpan RedrawInterval = TimeSpan.FromMilliseconds(100);

    private const string EraseLine = "\u001b[K";

    private readonly int totalSteps;
    private readonly TextWriter output;
    private readonly bool interactive;
    private readonly int width;
    private readonly TimeProvider time;
    private readonly long startTimestamp;
    private readonly char filled;
    private readonly char empty;
    private readonly object gate = new();
    private string? statusLine;
    private long? lastDrawTimestamp;
    private int lastPrintedPercent = -1;
    private int lastThreads;
    private bool disposed;

    /// <summary>Progress on the console: in place when standard output is a terminal, plain lines otherwise.</summary>
    /// <param name="totalSteps">The optimizer steps of the whole run; 0 when not known yet. A report's own
    /// <see cref="TrainingProgress.TotalSteps"/> takes precedence when positive.</param>
    public ProgressDisplay(int totalSteps)
        : this(totalSteps, Console.Out, !Console.IsOutputRedirected, TerminalWidth(), TimeProvider.System)
    {
    }

    /// <summary>Progress written to any writer; for embedding the display and for tests.</summary>
    /// <param name="totalSteps">The optimizer steps of the whole run; 0 when not known yet. A report's own
    /// <see cref="TrainingProgress.TotalSteps"/> takes precedence when positive.</param>
    /// <param name="output">Where to write.</param>
    /// <param name="interactive">True: one line redrawn in place; false: plain lines.</param>
    /// <param name="width">The interactive line is cut to this many characters so it never wraps (at least 20).</param>
    /// <param name="time">The clock for elapsed time and ETA; null for the system clock.</param>
    public ProgressDisplay(int totalSteps, TextWriter output, bool interactive, int width = 120, TimeProvider? time = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(totalSteps);
        ArgumentNullException.ThrowIfNull(output);
        ArgumentOutOfRangeException.ThrowIfLessThan(width, 20);
        this.totalSteps = totalSteps;
        this.output = output;
        this.interactive = interactive;
        this.width = width;
        this.time = time ?? TimeProvider.System;
        startTimestamp = this.time.GetTimestamp();
        var unicode = output.Encoding.CodePage == Encoding.UTF8.CodePage;
        filled = unicode ? '█' : '#';
        empty = unicode ? '░' : '-';
    }

    /// <summary>Shows a logged optimizer step.</summary>
    public void Report(TrainingProgress p)
    {
        lock (gate)
        {
            ObjectDisposedException.ThrowIf(disposed, this);
            // The run starts with MaxThreads; the thread budget may change the count between logged steps.
            var previous = lastThreads > 0 ? lastThreads : p.MaxThreads;
            if (p.Threads > 0 && previous > 0 && p.Threads != previous)
            {
                Message(p.Threads < previous
                    ? $"threads: {previous} -> {p.Threads} (other programs keep cores busy; --threads N fixes the count)"
                    : $"threads: {previous} -> {p.Threads} (cores became free)");
            }
            lastThreads = p.Threads;
            var elapsed = time.GetElapsedTime(startTimestamp);
            var total = p.TotalSteps > 0 ? p.TotalSteps : Math.Max(totalSteps, 1);
            var step = Math.Clamp(p.Step, 0, total);
            var doneHere = step - Math.Clamp(p.StartStep, 0, step);
            var eta = doneHere > 0 ? elapsed / doneHere * (total - step) : (TimeSpan?)null;
            var percent = (int)(100L * step / total);
            if (interactive)
            {
                var now = time.GetTimestamp();
                statusLine = StatusLine(p, step, total, percent, elapsed, eta);
                if (step == total || lastDrawTimestamp is not { } last || time.GetElapsedTime(last, now) >= RedrawInterval)
                {
                    lastDrawTimestamp = now;
                    Redraw();
                }
            }
            else if (percent != lastPrintedPercent || step == total)
            {
                lastPrintedPercent = percent;
                output.WriteLine(PlainLine(p, step, total, percent, elapsed, eta));
                output.Flush();
            }
        }
    }

    /// <summary>Prints a line of text (a warning, an evaluation result) above the status line.</summary>
    public void Message(string text)
    {
        lock (gate)
        {
            ObjectDisposedException.ThrowIf(disposed, this);
            if (interactive)
            {
                output.Write("\r" + EraseLine);
                output.WriteLine(text);
                Redraw();
            }
            else
            {
                output.WriteLine(text);
                output.Flush();
            }
        }
    }

    /// <summary>Ends the status line so that later output starts on a line of its own.</summary>
    public void Dispose()
    {
        lock (gate)
        {
            if (disposed)
            {
                return;
            }
            disposed = true;
            if (interactive && statusLine is not null)
            {
                output.Write("\r" + EraseLine + statusLine);
                output.WriteLine();
                output.Flush();
            }
        }
    }

    private void Redraw()
    {
        if (statusLine is not null)
        {
            output.Write("\r" + EraseLine + statusLine);
        }
        output.Flush();
    }

    private string StatusLine(TrainingProgress p, int step, int total, int percent, TimeSpan elapsed, TimeSpan? eta)
    {
        var steps = step.ToString(CultureInfo.InvariantCulture).PadLeft(total.ToString(CultureInfo.InvariantCulture).Length);
        var head = $"step {steps}/{total} ";
        // Fields padded to fixed widths keep the bar from jittering as the numbers change.
        var tail = $" {percent,3}%  loss {Num(p.Loss, "F4"),8}  lr {Num(p.LearningRate, "0.00e+00")}  " +
                   $"{Num(p.TokensPerSecond, "N0"),9} tok/s  elapsed {Clock(elapsed)}  eta {(eta is { } left ? Clock(left) : "?")}";
        var barWidth = Math.Clamp(width - head.Length - tail.Length - 2, 0, 40);
        if (barWidth < 5)
        {
            var line = head + tail.TrimStart();
            return line.Length > width ? line[..width] : line;
        }
        var done = (int)((long)barWidth * step / total);
        return head + "[" + new string(filled, done) + new string(empty, barWidth - done) + "]" + tail;
    }

    private static string PlainLine(TrainingProgress p, int step, int total, int percent, TimeSpan elapsed, TimeSpan? eta) =>
        $"step {step}/{total} ({percent}%)  epoch {Num(p.Epoch, "F2")}  loss {Num(p.Loss, "F4")}  " +
        $"lr {Num(p.LearningRate, "0.00e+00")}  grad_norm {Num(p.GradNorm, "F3")}  tokens/s {Num(p.TokensPerSecond, "F0")}  " +
        $"elapsed {Clock(elapsed)}  eta {(eta is { } left ? Clock(left) : "?")}";

    /// <summary>h:mm:ss (hours grow past 24 rather than rolling into days).</summary>
    private static string Clock(TimeSpan t)
    {
        var seconds = (long)Math.Max(0, Math.Round(t.TotalSeconds));
        return $"{seconds / 3600}:{seconds / 60 % 60:00}:{seconds % 60:00}";
    }

    private static string Num(double value, string format) => value.ToString(format, CultureInfo.InvariantCulture);

    private static int TerminalWidth()
    {
        try
        {
            // A terminal that reports no size (width 0, e.g. under `script`) gets the default width.
            return Console.IsOutputRedirected || Console.WindowWidth <= 0 ? 120 : Math.Max(20, Console.WindowWidth - 1);
        }
        catch (IOException)
        {
            return 120;
        }
    }
}
