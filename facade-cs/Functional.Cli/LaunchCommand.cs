using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Functional.Cli;

/// <summary>`functional launch -n N [--hostfile F] -- COMMAND...`: runs a functional command on N processes through
/// Open MPI's mpirun (Mpirun.StartInfo), waits for it and exits with its exit code. `mpirun -np N functional
/// COMMAND...` does the same by hand.</summary>
internal static class LaunchCommand
{
    [DllImport("libc", EntryPoint = "kill")]
    private static extern int Kill(int pid, int signal);

    private const int SigTerm = 15;

    public static Command Create()
    {
        var processes = new Option<int>("-n", "--nproc", "--np")
        {
            Description = "Processes to start (mpirun -np).",
            Required = true,
        };
        var hostfile = CliOption.Create<string?>("--hostfile",
            "Open MPI hostfile: the machines and their slots (docs/distributed.md, Several machines). Without it every process runs here.", null);
        var command = new Argument<string[]>("command")
        {
            Description = "The functional command to run on every process, after --: e.g. -- train --model m --data d.jsonl --output out --zero-stage 1.",
            Arity = ArgumentArity.ZeroOrMore,
        };
        var launch = new Command("launch",
            "Run a functional command on N processes through mpirun (Open MPI): functional launch -n 2 -- train ... " +
            "Adds --oversubscribe beyond this machine's cores, and what Open MPI needs as root.")
        {
            processes, hostfile, command,
        };
        launch.SetAction(parse => Run(parse.GetValue(processes), parse.GetValue(hostfile), parse.GetValue(command) ?? []));
        return launch;
    }

    private static int Run(int processes, string? hostfile, string[] command)
    {
        if (processes < 1)
        {
            throw new InvalidInputException("-n", "", $"expected at least 1 process, got {processes}");
        }
        if (command.Length == 0)
        {
            throw new InvalidInputException("launch", "", "nothing to run: give the functional command after --, e.g. functional launch -n 2 -- train --model m --data d.jsonl --output out");
        }
        if (command[0] == "launch")
        {
            throw new InvalidInputException("launch", "", "a launch cannot start launches: give the command every process runs, e.g. -- train ...");
        }
        if (hostfile is not null && !File.Exists(hostfile))
        {
            throw new InvalidInputException("--hostfile", "", $"{hostfile} was not found");
        }
        var mpirun = Mpirun.Require("launch");
        using var process = Process.Start(Mpirun.StartInfo(mpirun, processes, hostfile, command))
            ?? throw new InvalidOperationException($"{mpirun} did not start");
        // Ctrl-C reaches mpirun too (the terminal signals the whole foreground group): wait for it to stop the
        // ranks. A SIGTERM sent to this process alone is passed on to mpirun, which stops the ranks.
        using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, context => context.Cancel = true);
        using var terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, context =>
        {
            context.Cancel = true;
            Kill(process.Id, SigTerm);
        });
        process.WaitForExit();
        return process.ExitCode;
    }
}
