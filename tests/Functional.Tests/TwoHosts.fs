/// Two hosts on this machine for end-to-end tests of multi-machine runs: tools/two-hosts.sh makes two
/// network namespaces joined by a veth pair and runs mpirun across them (docs/distributed.md, "Several
/// machines"). The test list "two hosts" uses it for the launch check; a test can run any command the same way:
///
///     TwoHosts.withHosts (fun () ->
///         TwoHosts.run [ "-np"; "2"; "-x"; "OMP_NUM_THREADS=1"; "--"; "dotnet"; cliDll; "train"; ... ])
module Functional.Tests.TwoHosts

open System
open System.IO
open System.Net.NetworkInformation
open System.Net.Sockets
open Expecto
open Functional.Distributed
open Functional.Tests.ScriptTests

/// The hosts in rank order (`run` places rank r on host r mod 2): namespace name and IPv4 address.
let hosts = [ "fnl-host0", "10.231.0.1"; "fnl-host1", "10.231.0.2" ]

/// The exit code of tools/two-hosts.sh when this machine cannot make the hosts (not root, no iproute2,
/// network namespaces not permitted, no mpirun); its message says which.
let unavailableExitCode = 3

/// The variable that makes `--launch-check` record where each rank ran (recordLaunch).
let recordVariable = "FUNCTIONAL_LAUNCH_CHECK_RECORD"

let private script (arguments: string list) (timeout: TimeSpan) =
    if TestUtil.unitOnly then
        failtest "this test starts tools/two-hosts.sh: list it among the end-to-end tests (Program.endToEnd)"
    let root = repositoryRoot ()
    runProcess "bash" (Path.Combine(root, "tools", "two-hosts.sh") :: arguments) root [] timeout

/// Skips the calling test, saying why, when mpirun is not on PATH.
let requireMpirun () = DistributedTests.requireMpirun () |> ignore

/// Fails the test with the script's output unless it exited with 0; skips it, with the script's reason,
/// when the script says this machine cannot make the hosts.
let private expectDone (run: ProcessRun) =
    if run.ExitCode = unavailableExitCode then
        skiptest (run.Stderr.Trim())
    expectSuccess run

/// Brings the two hosts up (`tools/two-hosts.sh up`, idempotent): skips the calling test when this
/// machine cannot make them (not root, network namespaces not permitted), fails on any other error.
let up () = script [ "up" ] (TimeSpan.FromSeconds 30.0) |> expectDone

/// Removes the two hosts (`tools/two-hosts.sh down`, idempotent).
let down () = script [ "down" ] (TimeSpan.FromSeconds 30.0) |> expectDone

/// Runs `tools/two-hosts.sh run ARGUMENTS` (mpirun options, then `--` and the command; `-np 2` by default,
/// one rank per host) and returns what it printed, killing it after timeout. Only PATH, the dotnet
/// variables and OMP_NUM_THREADS reach the ranks from this process's environment; pass others with -x.
let runWithin (timeout: TimeSpan) (arguments: string list) = script ("run" :: arguments) timeout

/// runWithin with a limit of five minutes.
let run (arguments: string list) = runWithin (TimeSpan.FromMinutes 5.0) arguments

/// The hosts are one pair per machine, and test lists run in parallel: one user at a time.
let private hostsGate = obj ()

/// Brings the hosts up, runs action, and removes them again, also when action fails. Callers in this
/// process take turns (the lists "two hosts", "distributed training" and "mpi faults" run in parallel).
let withHosts (action: unit -> 'T) : 'T =
    requireMpirun ()
    lock hostsGate (fun () ->
        up ()
        try action () finally down ())

/// In a `--launch-check` process whose environment names a folder in FUNCTIONAL_LAUNCH_CHECK_RECORD,
/// writes rank-R.txt there, one "key: value" line each: the rank, the host name, the network namespace and the IPv4 addresses of
/// the process (for checking that ranks ran on different hosts and wrote to the shared filesystem).
let recordLaunch () =
    let folder = Environment.GetEnvironmentVariable recordVariable
    if not (String.IsNullOrEmpty folder) then
        let launch = Communicator.parseEnvironment Environment.GetEnvironmentVariable
        let addresses =
            NetworkInterface.GetAllNetworkInterfaces()
            |> Array.collect (fun i -> i.GetIPProperties().UnicastAddresses |> Seq.toArray)
            |> Array.filter (fun a -> a.Address.AddressFamily = AddressFamily.InterNetwork)
            |> Array.map (fun a -> string a.Address)
            |> Array.sort
        let networkNamespace = FileInfo("/proc/self/ns/net").LinkTarget
        File.WriteAllLines(
            Path.Combine(folder, sprintf "rank-%d.txt" launch.Rank),
            [ sprintf "rank: %d of %d" launch.Rank launch.Size
              sprintf "host: %s" Environment.MachineName
              sprintf "network namespace: %s" networkNamespace
              sprintf "addresses: %s" (String.Join(" ", addresses)) ])
