namespace Functional.Distributed

open TorchSharp
open Functional
open Functional.Runtime

/// The elements of a flat buffer (the flat parameters, their gradients, an optimizer moment) one process
/// owns: Count elements from Offset.
[<Struct>]
type ShardRange =
    { /// The first owned element.
      Offset: int64
      /// The owned elements (0 when the buffer has fewer elements than processes ahead of this one).
      Count: int64 }

/// A part of one parameter in a process's optimizer state buffers (ZeRO stage 3, where a process's block
/// is not one range of the flat buffer): Count elements of Parameter from element First, at Offset of the
/// state buffers.
[<Struct>]
type StateFragment =
    { /// The parameter's name.
      Parameter: string
      /// The fragment's first element within the parameter (flattened).
      First: int64
      /// Where the fragment starts in the process's state buffers.
      Offset: int64
      /// The fragment's elements.
      Count: int64 }

/// DeepSpeed's ZeRO stages: what each process of a data-parallel run keeps of the training state.
[<RequireQualifiedAccess>]
module ZeroStage =

    /// The stages: 0 (plain data parallel: every process holds everything), 1 (optimizer state sharded),
    /// 2 (gradients reduce-scattered and kept only for the process's shard), 3 (parameters sharded too,
    /// gathered layer by layer).
    let all = [ 0; 1; 2; 3 ]

    /// Raises InvalidInputException naming zero_stage unless stage is 0, 1, 2 or 3.
    let validate (stage: int) =
        if stage < 0 || stage > 3 then InvalidInput.setting "zero_stage" (sprintf "expected 0, 1, 2 or 3, got %d" stage)

/// How ZeRO splits a flat buffer among the processes: in Size consecutive blocks of
/// ceil(total / Size) elements, process r owning block r (the last ones shorter, or empty). The
/// collectives over such a split pad the buffer to Size equal blocks where it is not a multiple.
[<RequireQualifiedAccess>]
module Sharding =

    /// The length of one block: ceil(total / size).
    let blockLength (total: int64) (size: int) : int64 =
        if size < 1 then invalidArg (nameof size) (sprintf "the world size must be at least 1, got %d" size)
        (total + int64 size - 1L) / int64 size

    /// Process rank's block of a buffer of total elements split among size processes.
    let block (total: int64) (size: int) (rank: int) : ShardRange =
        if rank < 0 || rank >= size then invalidArg (nameof rank) (sprintf "the rank must be in [0, %d), got %d" size rank)
        let length = blockLength total size
        let start = min total (int64 rank * length)
        { Offset = start; Count = min total (start + length) - start }

    /// The whole buffer as one range (a process that owns everything).
    let whole (total: int64) : ShardRange = { Offset = 0L; Count = total }

    /// A fresh view of range's elements of a 1-D buffer.
    let view (buffer: torch.Tensor) (range: ShardRange) : torch.Tensor = buffer.narrow(0L, range.Offset, range.Count)

    /// Sums the 1-D buffer input over all processes and writes this process's block of the sum into output
    /// (blockLength elements; the tail past the buffer's end, on the last processes, is zero).
    let reduceScatter (communicator: ICommunicator) (input: torch.Tensor) (output: torch.Tensor) : unit =
        let total = input.numel ()
        let length = blockLength total communicator.Size
        if output.numel () <> length then
            invalidArg (nameof output) (sprintf "the block of %d elements among %d processes has %d elements, got %d" total communicator.Size length (output.numel ()))
        if length * int64 communicator.Size = total then communicator.ReduceScatter(input, output)
        else
            use _ = torch.no_grad ()
            use padded = torch.zeros([| length * int64 communicator.Size |], dtype = input.dtype, device = input.device)
            use head = padded.narrow(0L, 0L, total)
            head.copy_ input |> ignore
            communicator.ReduceScatter(padded, output)

    /// Writes every process's block of a 1-D buffer of output's length into output: shard is this process's
    /// block (Sharding.block's Count elements; it may be a view into output itself).
    let allGather (communicator: ICommunicator) (shard: torch.Tensor) (output: torch.Tensor) : unit =
        let total = output.numel ()
        let size = communicator.Size
        let length = blockLength total size
        let own = block total size communicator.Rank
        if shard.numel () <> own.Count then
            invalidArg (nameof shard) (sprintf "process %d's block of %d elements has %d elements, got %d" communicator.Rank total own.Count (shard.numel ()))
        use _ = torch.no_grad ()
        // MPI's gather may not read a buffer it writes: the block is copied out first.
        use send = torch.zeros([| length |], dtype = output.dtype, device = output.device)
        use sendHead = send.narrow(0L, 0L, own.Count)
        sendHead.copy_ shard |> ignore
        if length * int64 size = total then communicator.AllGather(send, output)
        else
            use gathered = torch.empty([| length * int64 size |], dtype = output.dtype, device = output.device)
            communicator.AllGather(send, gathered)
            use head = gathered.narrow(0L, 0L, total)
            output.copy_ head |> ignore
