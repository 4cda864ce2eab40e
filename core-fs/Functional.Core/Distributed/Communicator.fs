namespace Functional.Distributed

open System
open TorchSharp
open Functional.Runtime

/// The collective operations of a data-parallel (or sharded, ZeRO) run over tensors, as a
/// torch.distributed process group offers them. Every process of the run calls the same operations in
/// the same order, each with tensors of the same shape and dtype; an operation returns on a process once
/// that process's part of the result is in place. Sums work in place, on the given tensors.
type ICommunicator =
    /// This process's index in the run, from 0 (torch's RANK).
    abstract Rank: int

    /// The number of processes in the run (torch's WORLD_SIZE), at least 1.
    abstract Size: int

    /// This process's index among the processes on its machine (torch's LOCAL_RANK): which accelerator
    /// it drives.
    abstract LocalRank: int

    /// Sums tensor over all processes, in place: afterwards every process holds the same sum.
    abstract AllReduce: tensor: torch.Tensor -> unit

    /// Sums input over all processes and leaves in output this process's part of the sum: input is
    /// Size parts of output's length, one after the other, and process r receives part r.
    abstract ReduceScatter: input: torch.Tensor * output: torch.Tensor -> unit

    /// Writes every process's input into output, part r (of input's length) from process r, so that
    /// afterwards every process holds all the parts.
    abstract AllGather: input: torch.Tensor * output: torch.Tensor -> unit

    /// Overwrites tensor on every process with the one of process root.
    abstract Broadcast: tensor: torch.Tensor * root: int -> unit

    /// Returns once every process has called it.
    abstract Barrier: unit -> unit

/// A communicator whose processes can be divided into sub-communicators (MPI_Comm_split): the process
/// groups of tensor, pipeline and data parallelism (ProcessGrid).
type ISplittableCommunicator =
    inherit ICommunicator

    /// Divides the processes by color: those that pass the same color get one new communicator, ranked by
    /// key (ties by their rank here). Every process calls it, in the same order as every other collective;
    /// returns this process's sub-communicator, itself splittable.
    abstract Split: color: int * key: int -> ISplittableCommunicator

/// Point-to-point messages between two processes of a communicator (pipeline parallelism's activations
/// and their gradients).
type IPointToPoint =
    inherit ICommunicator

    /// Sends tensor (contiguous) to process destination; returns when the tensor may be reused. Each Send
    /// is matched by one Receive of destination with this process as source, of the same size and dtype.
    abstract Send: tensor: torch.Tensor * destination: int -> unit

    /// Receives into tensor (contiguous, of the sent size and dtype) what process source sends.
    abstract Receive: tensor: torch.Tensor * source: int -> unit

    /// Starts sending tensor (contiguous) to process destination and returns at once (MPI_Isend): the
    /// tensor must stay alive and unchanged until the returned request's Dispose, which waits for the
    /// send to finish. A pipeline stage sends this way so that two neighbours that send to each other
    /// (an activation forward, a gradient backward) never wait on each other.
    abstract StartSend: tensor: torch.Tensor * destination: int -> IDisposable

/// The communicator of a run with one process (rank 0 of 1): every sum is the tensor itself, so
/// AllReduce, Broadcast and Barrier leave everything as it is, and ReduceScatter and AllGather copy
/// input into output (the one part). Shapes are checked as a real communicator would check them.
[<Sealed>]
type SingleProcess() =
    static let check (input: torch.Tensor) (output: torch.Tensor) (operation: string) =
        if input.numel () <> output.numel () then
            invalidArg (nameof output)
                (sprintf "%s with one process needs an output of the input's %d elements, got %d" operation (input.numel ()) (output.numel ()))

    static let copy (input: torch.Tensor) (output: torch.Tensor) =
        if not (Object.ReferenceEquals(input, output)) then
            use _ = torch.no_grad ()
            use source = input.reshape output.shape
            output.copy_ source |> ignore

    interface ICommunicator with
        member _.Rank = 0
        member _.Size = 1
        member _.LocalRank = 0
        member _.AllReduce _ = ()

        member _.ReduceScatter(input, output) =
            check input output "ReduceScatter"
            copy input output

        member _.AllGather(input, output) =
            check input output "AllGather"
            copy input output

        member _.Broadcast(_, root) =
            if root <> 0 then invalidArg (nameof root) (sprintf "the root must be rank 0 of a single process, got %d" root)

        member _.Barrier() = ()

    interface ISplittableCommunicator with
        member this.Split(_, _) = this :> ISplittableCommunicator

// The Communicator module (singleProcess, fromEnvironment, the sums) is in Mpi.fs, after the MPI communicator.
