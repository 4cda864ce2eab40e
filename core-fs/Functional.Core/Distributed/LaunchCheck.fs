namespace Functional.Distributed

open System
open TorchSharp
open Functional.Runtime

/// A self-check of a communicator on known tensors, for checking that a launch (mpirun -np N ...)
/// works: every process runs AllReduce, ReduceScatter, AllGather and Broadcast on float32, float64 and
/// int64 tensors whose results are known in closed form, then a Barrier, and reports one line.
[<RequireQualifiedAccess>]
module LaunchCheck =

    let private dtypes = [ "float32", torch.ScalarType.Float32; "float64", torch.ScalarType.Float64; "int64", torch.ScalarType.Int64 ]

    /// The elements per process of the checked tensors.
    let private width = 5

    /// Runs every collective on the three dtypes and returns (passed, line): line names the rank, the
    /// size, the local rank and each check that failed (the expected and received values).
    let check (communicator: ICommunicator) : bool * string =
        TorchRuntime.ensure ()
        use _ = torch.NewDisposeScope()
        let r, n = communicator.Rank, communicator.Size
        let k = int64 width
        let failures = Collections.Generic.List<string>()
        let expect (what: string) (actual: torch.Tensor) (expected: torch.Tensor) =
            let a = actual.to_type(torch.ScalarType.Float64)
            let e = expected.to_type(torch.ScalarType.Float64)
            if not (a.Equals e) then
                failures.Add(sprintf "%s: expected %A, got %A" what (e.data<float>().ToArray()) (a.data<float>().ToArray()))
        let range (count: int64) = torch.arange(count, dtype = torch.ScalarType.Float64)
        for name, dtype in dtypes do
            // AllReduce: every process holds r + 1, the sum is n (n + 1) / 2.
            let t = (torch.zeros([| k |], dtype = torch.ScalarType.Float64) + float (r + 1)).to_type dtype
            communicator.AllReduce t
            expect (name + " AllReduce") t (torch.zeros([| k |], dtype = torch.ScalarType.Float64) + float (n * (n + 1) / 2))
            // ReduceScatter: input i holds i + r; part r of the sum holds n (r k + j) + n (n - 1) / 2.
            let input = (range (int64 n * k) + float r).to_type dtype
            let output = torch.zeros([| k |], dtype = dtype)
            communicator.ReduceScatter(input, output)
            expect (name + " ReduceScatter") output ((range k + float r * float k) * float n + float (n * (n - 1) / 2))
            // AllGather: process p contributes 10 p + j.
            let mine = (range k + 10.0 * float r).to_type dtype
            let all = torch.zeros([| int64 n * k |], dtype = dtype)
            communicator.AllGather(mine, all)
            let expected = torch.cat([| for p in 0 .. n - 1 -> range k + 10.0 * float p |], 0L)
            expect (name + " AllGather") all expected
            // Broadcast from the last rank: 3 j there, zeros elsewhere before the call.
            let root = n - 1
            let b = if r = root then (range k * 3.0).to_type dtype else torch.zeros([| k |], dtype = dtype)
            communicator.Broadcast(b, root)
            expect (name + " Broadcast") b (range k * 3.0)
        // What a multi-process communicator refuses: other dtypes, non-contiguous memory.
        if n > 1 then
            let refuses (what: string) (t: torch.Tensor) =
                try
                    communicator.AllReduce t
                    failures.Add(sprintf "AllReduce accepted %s" what)
                with :? ArgumentException -> ()
            refuses "a float16 tensor" (torch.zeros([| k |], dtype = torch.ScalarType.Float16))
            refuses "a non-contiguous tensor" (torch.zeros([| 2L; 3L |], dtype = torch.ScalarType.Float32).t())
        communicator.Barrier()
        let passed = failures.Count = 0
        let status = if passed then "ok (AllReduce, ReduceScatter, AllGather, Broadcast on float32, float64, int64; Barrier)" else "FAILED: " + String.Join("; ", failures)
        passed, sprintf "launch-check rank %d of %d (local rank %d): %s" r n communicator.LocalRank status

    /// Checks the communicator of this process's launch (Communicator.fromEnvironment), prints the
    /// line on standard output, finalizes MPI, and returns the exit code: 0 when every check passed, 1
    /// otherwise.
    let run () : int =
        let communicator = Communicator.fromEnvironment ()
        Communicator.finishCheck communicator (check communicator)
