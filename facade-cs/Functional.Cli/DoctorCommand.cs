using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;

namespace Functional.Cli;

/// <summary>`functional doctor`: what this installation runs on, in the lines a bug report needs.</summary>
internal static class DoctorCommand
{
    public static Command Create()
    {
        var command = new Command("doctor", "Print the versions and settings a bug report needs: .NET, TorchSharp and libtorch, the backend, threads, the libstdc++ workaround, MPI and the cache folder.")
        {
        };
        command.SetAction(_ =>
        {
            foreach (var (name, value) in Report())
            {
                Console.WriteLine($"{name + ":",-22} {value}");
            }
            return 0;
        });
        return command;
    }

    /// <summary>The report's lines: a name and its value.</summary>
    internal static IReadOnlyList<(string Name, string Value)> Report()
    {
        var start = Runtime.TorchRuntime.startInfo();
        var lines = new List<(string, string)>
        {
            ("functional", typeof(Program).Assembly.GetName().Version?.ToString(3) ?? "unknown"),
            (".NET", $"{RuntimeInformation.FrameworkDescription} ({RuntimeInformation.RuntimeIdentifier})"),
            ("OS", $"{RuntimeInformation.OSDescription} ({RuntimeInformation.OSArchitecture})"),
            ("cores", Environment.ProcessorCount.ToString(CultureInfo.InvariantCulture)),
            ("TorchSharp", typeof(TorchSharp.torch).Assembly.GetName().Version?.ToString(3) ?? "unknown"),
            ("libtorch", $"{TorchSharp.torch.__version__}" + (start.LibTorchPackages.IsEmpty ? "" : $" ({string.Join(", ", start.LibTorchPackages)})")),
            ("backend", TorchSharp.torch.cuda.is_available() ? $"cuda ({TorchSharp.torch.cuda.device_count()} devices)" : "cpu (CUDA not available)"),
            ("threads", $"{TorchSharp.torch.get_num_threads()} intra-op (OMP_NUM_THREADS={Environment.GetEnvironmentVariable("OMP_NUM_THREADS") ?? "unset"}); training's --threads 0 follows the free cores"),
            ("libstdc++ workaround", start.PatchedVersions.IsEmpty
                ? "not needed (the system's libstdc++ has every version libLibTorchSharp.so needs)"
                : $"active: a patched copy of libLibTorchSharp.so is loaded (the system's libstdc++ lacks {string.Join(", ", start.PatchedVersions)})"),
            ("malloc tuning", start.MallocTuned
                ? $"on (mmap threshold {Runtime.TorchRuntime.MmapThreshold >> 20} MB, trim threshold {Runtime.TorchRuntime.TrimThreshold >> 20} MB; {Runtime.TorchRuntime.MallocTuningVariable}=0 turns it off)"
                : $"off ({Runtime.TorchRuntime.MallocTuningVariable}=0)"),
            ("MPI library", NativeLibrary.TryLoad("libmpi.so.40", out var mpi) ? Loaded(mpi) : "libmpi.so.40 not found (multi-process training needs Open MPI: sh tools/install-mpi.sh)"),
            ("mpirun", Mpirun.Find() is { } mpirun ? $"{mpirun} ({MpirunVersion(mpirun)})" : "not on PATH"),
            ("data cache", Folder(Training.FineTune.defaultCachePath())),
        };
        return lines;
    }

    private static string Loaded(IntPtr handle)
    {
        NativeLibrary.Free(handle);
        return "libmpi.so.40 loads";
    }

    /// <summary>The first line of `mpirun --version` ("mpirun (Open MPI) 4.1.4"), or why not.</summary>
    private static string MpirunVersion(string mpirun)
    {
        try
        {
            var info = new ProcessStartInfo(mpirun, "--version") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            using var process = Process.Start(info)!;
            var first = process.StandardOutput.ReadLine() ?? "";
            process.StandardError.ReadToEnd();
            if (!process.WaitForExit(10_000))
            {
                process.Kill(true);
                return "no answer to --version";
            }
            return first.Trim();
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or IOException)
        {
            return $"cannot run: {e.Message}";
        }
    }

    private static string Folder(string path)
    {
        if (!Directory.Exists(path))
        {
            return $"{path} (not created yet; $FUNCTIONAL_CACHE moves it)";
        }
        var files = new DirectoryInfo(path).GetFiles("*.bin");
        var bytes = files.Sum(f => f.Length);
        return $"{path} ({files.Length} entries, {bytes / (1024.0 * 1024.0):F1} MB; $FUNCTIONAL_CACHE moves it)";
    }
}
