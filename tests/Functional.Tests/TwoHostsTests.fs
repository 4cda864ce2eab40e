/// The launch check across two hosts on one machine (the list "two hosts", end to end): tools/two-hosts.sh
/// makes two network namespaces joined by a veth pair and mpirun starts one rank in each, over TCP.
module Functional.Tests.TwoHostsTests

open System
open System.IO
open Expecto
open Functional.Tests.TestUtil
open Functional.Tests.ScriptTests

/// The record rank-R.txt that `--launch-check` wrote (TwoHosts.recordLaunch), as a map of its "key: value" lines.
let private readRecord (folder: string) (rank: int) =
    let path = Path.Combine(folder, sprintf "rank-%d.txt" rank)
    Expect.isTrue (File.Exists path) (sprintf "rank %d wrote %s on the shared filesystem" rank path)
    File.ReadAllLines path
    |> Array.map (fun line -> let colon = line.IndexOf ": " in line.Substring(0, colon), line.Substring(colon + 2))
    |> Map.ofArray

[<Tests>]
let tests =
    testSequenced <| testList "two hosts" [
        test "the launch check passes with one rank on each host, each in its own network namespace" {
            use folder = new TempFolder()
            let testsDll = Path.Combine(AppContext.BaseDirectory, "Functional.Tests.dll")
            let run =
                TwoHosts.withHosts (fun () ->
                    // The agent passes on no variable of this process that run does not forward: the record
                    // folder reaches the ranks only through -x, as it would on other machines.
                    TwoHosts.runWithin (TimeSpan.FromMinutes 3.0)
                        [ "-np"; "2"; "-x"; "OMP_NUM_THREADS=1"; "-x"; sprintf "%s=%s" TwoHosts.recordVariable folder.Path
                          "--"; "dotnet"; testsDll; "--launch-check" ])
            let report = describe run
            Expect.equal run.ExitCode 0 report
            // Local rank 0 on both: mpirun placed each rank alone on a host.
            for rank in 0 .. 1 do
                Expect.stringContains run.Stdout (sprintf "launch-check rank %d of 2 (local rank 0): ok" rank) report
            Expect.isFalse (run.Stdout.Contains "FAILED") report
            let records = [ for rank in 0 .. 1 -> readRecord folder.Path rank ]
            let ours = FileInfo("/proc/self/ns/net").LinkTarget
            for rank, (host, address) in List.indexed TwoHosts.hosts do
                let record = records[rank]
                let addresses = (record["addresses"]).Split ' '
                let shown = sprintf "rank %d's record: %A" rank record
                Expect.equal record["rank"] (sprintf "%d of 2" rank) shown
                Expect.contains addresses address (sprintf "rank %d ran on %s (%s)" rank host address)
                for otherHost, other in TwoHosts.hosts |> List.filter (fun (h, _) -> h <> host) do
                    Expect.isFalse (Array.contains other addresses) (sprintf "rank %d does not see %s's address: %s" rank otherHost shown)
                Expect.notEqual record["network namespace"] ours (sprintf "rank %d ran outside the test's network namespace: %s" rank shown)
            Expect.notEqual records[0].["network namespace"] records[1].["network namespace"] "the ranks ran in different network namespaces"
        }
        test "functional launch --hostfile starts one rank on each host, launch after launch" {
            // Open MPI 4.1's daemon on another host dies at startup now and then (SIGSEGV mapping the shared
            // topology) and mpirun waits for it for ever: about 1 launch in 6 here without the setting
            // launch adds with a hostfile (OMPI_MCA_rtc_hwloc_vmhole=none). Eight launches in a row.
            let cli = Path.Combine(AppContext.BaseDirectory, "Functional.Cli.dll")
            TwoHosts.withHosts (fun () ->
                let folder = "/tmp/functional-hosts"
                // What tools/two-hosts.sh passes as options reaches mpirun here as its environment.
                let environment =
                    [ "OMPI_MCA_plm_rsh_agent", Path.Combine(folder, "agent")
                      "OMPI_MCA_plm_rsh_no_tree_spawn", "1"
                      "OMPI_MCA_pml", "ob1"
                      "OMPI_MCA_btl", "tcp,self"
                      "OMPI_MCA_btl_tcp_if_include", "10.231.0.0/24"
                      "OMPI_MCA_oob_tcp_if_include", "10.231.0.0/24" ]
                for attempt in 1..8 do
                    let run =
                        runProcess "ip"
                            [ "netns"; "exec"; fst TwoHosts.hosts[0]; "dotnet"; cli; "launch"; "-n"; "2"; "--hostfile"; Path.Combine(folder, "hostfile")
                              "--"; "tokenize"; "--tokenizer"; "cl100k_base"; "hi there" ]
                            "/" environment (TimeSpan.FromSeconds 60.0)
                    let report = sprintf "launch %d: %s" attempt (describe run)
                    Expect.equal run.ExitCode 0 report
                    Expect.equal (run.Stdout.Split('\n') |> Array.filter (fun l -> l.Trim() = "6151 1070") |> Array.length) 2 ("both ranks printed the ids\n" + report))
        }
        test "up and down are idempotent; run refuses while the hosts are down, saying how to bring them up" {
            TwoHosts.requireMpirun ()
            TwoHosts.up ()
            TwoHosts.up ()
            TwoHosts.down ()
            TwoHosts.down ()
            let run = TwoHosts.runWithin (TimeSpan.FromSeconds 30.0) [ "--"; "true" ]
            Expect.equal run.ExitCode 1 (describe run)
            Expect.stringContains run.Stderr "the hosts are not up: run 'tools/two-hosts.sh up' first" (describe run)
        }
    ]
