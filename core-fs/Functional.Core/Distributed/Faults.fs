namespace Functional.Distributed

/// Failing a multi-process run so that no process waits forever for one that failed. A process that
/// raises and leaves normally would otherwise leave its peers inside a collective it never joins, or
/// wait itself in MPI_Finalize for peers that are still in one: both hang. Failing the run writes one
/// line naming the rank ("rank 1 of 2 failed: ...") and ends every process with MPI_Abort, so mpirun
/// exits with a code other than 0. A process that dies (a signal, the out-of-memory killer) needs
/// nothing from here: mpirun notices it and ends the others. See docs/distributed.md, "Faults".
[<RequireQualifiedAccess>]
module Faults =

    /// Fails the run communicator belongs to with exit code (1 when code is 0): with several MPI
    /// processes, writes "rank R of N failed: message" to standard error and aborts the run (MPI_Abort;
    /// mpirun ends the other processes and exits with code); this does not return and MPI is not
    /// finalized. With the single-process communicator (or any other one) it does nothing and returns:
    /// the caller reports the error and exits as usual.
    let abortRun (communicator: ICommunicator) (code: int) (message: string) : unit =
        match communicator with
        | :? MpiCommunicator as mpi when communicator.Size > 1 -> mpi.Fail(code, message)
        | _ -> ()

    /// The communicator of this process's multi-process run (the one MpiCommunicator.Start returned,
    /// e.g. through Communicator.fromEnvironment), or None when this process started no MPI run.
    let active () : ICommunicator option =
        MpiCommunicator.Current |> Option.filter (fun c -> (c :> ICommunicator).Size > 1) |> Option.map (fun c -> c :> ICommunicator)

    /// abortRun on this process's multi-process run, for a top-level error handler that does not hold
    /// the communicator (the functional command's): does nothing when there is none.
    let abortActiveRun (code: int) (message: string) : unit =
        match active () with
        | Some communicator -> abortRun communicator code message
        | None -> ()
