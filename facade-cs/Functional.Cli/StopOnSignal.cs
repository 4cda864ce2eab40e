using System.Runtime.InteropServices;

namespace Functional.Cli;

/// <summary>
/// Turns SIGINT (Ctrl-C) and SIGTERM into a cancellation: training finishes its current optimizer step and
/// stops (fine-tuning saves a checkpoint; the embedded default discards its unfinished run); the process then exits
/// with 130 (SIGINT) or 143 (SIGTERM), as shells expect. A second signal is left to the runtime's default handling
/// (immediate exit).
/// </summary>
internal sealed class StopOnSignal : IDisposable
{
    private readonly CancellationTokenSource source = new();
    private readonly PosixSignalRegistration interrupt;
    private readonly PosixSignalRegistration terminate;
    private readonly string stopping;

    /// <summary>Listens for SIGINT and SIGTERM until disposed.</summary>
    /// <param name="stopping">What the first signal makes the run do, printed after the signal's name, e.g.
    /// "finishing the current step and saving a checkpoint".</param>
    public StopOnSignal(string stopping)
    {
        this.stopping = stopping;
        interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle);
        terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle);
    }

    /// <summary>Cancelled by the first signal.</summary>
    public CancellationToken Token => source.Token;

    /// <summary>The signal received ("SIGINT" or "SIGTERM"), or null.</summary>
    public string? Received { get; private set; }

    /// <summary>128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.</summary>
    public int ExitCode => Received == "SIGTERM" ? 143 : 130;

    private void Handle(PosixSignalContext context)
    {
        if (Received is not null)
        {
            return;
        }
        context.Cancel = true;
        Received = context.Signal == PosixSignal.SIGTERM ? "SIGTERM" : "SIGINT";
        Console.Error.WriteLine($"{Received}: {stopping} (send it again to stop at once)");
        source.Cancel();
    }

    public void Dispose()
    {
        interrupt.Dispose();
        terminate.Dispose();
        source.Dispose();
    }
}
