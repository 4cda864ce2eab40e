using System.Diagnostics;

namespace Functional.Cli;

/// <summary>Starting this program on several processes through Open MPI's mpirun (`functional launch`,
/// `functional bench distributed`).</summary>
internal static class Mpirun
{
    /// <summary>What to do when mpirun is missing.</summary>
    public const string InstallHint =
        "mpirun (Open MPI) was not found on PATH: install it with sh tools/install-mpi.sh (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)";

    /// <summary>The mpirun on PATH, or null.</summary>
    public static string? Find()
    {
        var path = Environment.GetEnvironmentVariable("PATH") ?? "";
        foreach (var folder in path.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            var candidate = Path.Combine(folder, "mpirun");
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }
        return null;
    }

    /// <summary>The cores Open MPI counts as this machine's slots: distinct (physical id, core id) pairs of
    /// /proc/cpuinfo, so hardware threads of one core count once; the logical processors where it does not
    /// tell.</summary>
    public static int Cores()
    {
        try
        {
            var cores = new HashSet<(string, string)>();
            string socket = "", core = "";
            foreach (var line in File.ReadLines("/proc/cpuinfo"))
            {
                var colon = line.IndexOf(':');
                if (colon < 0)
                {
                    continue;
                }
                var (key, value) = (line[..colon].Trim(), line[(colon + 1)..].Trim());
                if (key == "processor")
                {
                    (socket, core) = ("", "");
                }
                else if (key == "physical id")
                {
                    socket = value;
                }
                else if (key == "core id")
                {
                    core = value;
                    cores.Add((socket, core));
                }
            }
            return cores.Count > 0 ? cores.Count : Environment.ProcessorCount;
        }
        catch (IOException)
        {
            return Environment.ProcessorCount;
        }
    }

    /// <summary>The host that runs this program's managed code: the dotnet running it now, else the dotnet on
    /// PATH.</summary>
    private static string DotnetHost() =>
        Environment.ProcessPath is { } host && Path.GetFileNameWithoutExtension(host) == "dotnet" ? host : "dotnet";

    /// <summary>This program's Functional.Cli.dll.</summary>
    private static string ProgramDll() => typeof(Program).Assembly.Location;

    /// <summary>Whether this process runs as root (Open MPI then refuses to start without its two
    /// OMPI_ALLOW_RUN_AS_ROOT variables).</summary>
    private static bool IsRoot() => Environment.IsPrivilegedProcess;

    /// <summary>`mpirun -np processes [--oversubscribe] [--hostfile hostfile] dotnet Functional.Cli.dll arguments`:
    /// --oversubscribe when there is no hostfile and the processes exceed this machine's cores (with a hostfile,
    /// its slots decide); as root, OMPI_ALLOW_RUN_AS_ROOT and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM; TERM=dumb (Open MPI
    /// 4 prints terminal control codes otherwise). Output is not redirected.</summary>
    public static ProcessStartInfo StartInfo(string mpirun, int processes, string? hostfile, IEnumerable<string> arguments)
    {
        var info = new ProcessStartInfo(mpirun) { UseShellExecute = false };
        info.ArgumentList.Add("-np");
        info.ArgumentList.Add($"{processes}");
        if (hostfile is null && processes > Cores())
        {
            info.ArgumentList.Add("--oversubscribe");
        }
        if (hostfile is not null)
        {
            info.ArgumentList.Add("--hostfile");
            info.ArgumentList.Add(hostfile);
            // Open MPI 4.1's daemon on another machine (orted) maps the shared hardware topology into the
            // "biggest" hole of its address space; now and then that lands on its stack and it dies at startup
            // (SIGSEGV in hwloc_shmem_topology_write), and mpirun waits for it for ever: about 1 launch in 10
            // here. Without the shared topology every daemon reads its own (docs/distributed.md).
            info.Environment["OMPI_MCA_rtc_hwloc_vmhole"] = "none";
        }
        info.ArgumentList.Add(DotnetHost());
        info.ArgumentList.Add(ProgramDll());
        foreach (var argument in arguments)
        {
            info.ArgumentList.Add(argument);
        }
        if (IsRoot())
        {
            info.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
            info.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        }
        info.Environment["TERM"] = "dumb";
        return info;
    }

    /// <summary>The mpirun on PATH; raises the InvalidInputException naming mpirun and tools/install-mpi.sh when
    /// there is none (exit code 2).</summary>
    public static string Require(string option) =>
        Find() ?? throw new InvalidInputException(option, "", InstallHint);
}
