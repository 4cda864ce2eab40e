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

/// The bucket sizes of the collectives over flat buffers, in elements (DeepSpeed's zero_optimization
/// reduce_bucket_size and allgather_bucket_size): a buffer is reduced or gathered that many elements at a
/// time, which bounds the staging memory of a collective and keeps every MPI call within its int count.
[<Struct>]
type CollectiveBuckets =
    { /// Elements per all-reduce or reduce-scatter of gradients (reduce_bucket_size).
      Reduce: int64
      /// Elements per all-gather of parameters (allgather_bucket_size).
      Allgather: int64 }

/// Bucket sizes: DeepSpeed's defaults and their bounds.
[<RequireQualifiedAccess>]
module CollectiveBuckets =

    /// DeepSpeed's default of both sizes: 5e8 elements.
    [<Literal>]
    let DefaultElements = 500000000L

    /// Both sizes at DeepSpeed's default.
    let defaults: CollectiveBuckets = { Reduce = DefaultElements; Allgather = DefaultElements }

    /// Raises InvalidInputException naming setting unless 1 <= elements <= Int32.MaxValue (an MPI count).
    let check (setting: string) (elements: int64) =
        if elements < 1L || elements > int64 System.Int32.MaxValue then
            InvalidInput.setting setting (sprintf "expected a number of elements from 1 to %d, got %d" System.Int32.MaxValue elements)

    /// Checks both sizes (check).
    let validate (buckets: CollectiveBuckets) =
        check "reduce_bucket_size" buckets.Reduce
        check "allgather_bucket_size" buckets.Allgather

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

    /// Zeroes t in place (releasing the handle TorchSharp's zero_ may return).
    let private zero (t: torch.Tensor) =
        let zeroed = t.zero_ ()
        if not (obj.ReferenceEquals(zeroed, t)) then zeroed.Dispose()

    /// Sums the 1-D contiguous buffer over all processes, in place, in consecutive buckets of at most
    /// bucket elements (one AllReduce each: DeepSpeed's reduce_bucket_size).
    let allReduce (communicator: ICommunicator) (bucket: int64) (buffer: torch.Tensor) : unit =
        CollectiveBuckets.check "reduce_bucket_size" bucket
        let total = buffer.numel ()
        if total <= bucket then communicator.AllReduce buffer
        else
            let mutable offset = 0L
            while offset < total do
                use part = buffer.narrow(0L, offset, min bucket (total - offset))
                communicator.AllReduce part
                offset <- offset + bucket

    /// Sums the 1-D buffer input over all processes and writes this process's block of the sum into output
    /// (blockLength elements; the tail past the buffer's end, on the last processes, is zero). The blocks
    /// are reduced bucket elements of each at a time (DeepSpeed's reduce_bucket_size): one ReduceScatter
    /// per bucket over a staging buffer of Size buckets, or straight from input when it is Size whole
    /// blocks of at most a bucket each.
    let reduceScatter (communicator: ICommunicator) (bucket: int64) (input: torch.Tensor) (output: torch.Tensor) : unit =
        CollectiveBuckets.check "reduce_bucket_size" bucket
        let total = input.numel ()
        let size = int64 communicator.Size
        let length = blockLength total communicator.Size
        if output.numel () <> length then
            invalidArg (nameof output) (sprintf "the block of %d elements among %d processes has %d elements, got %d" total communicator.Size length (output.numel ()))
        if length * size = total && length <= bucket then communicator.ReduceScatter(input, output)
        elif length > 0L then
            use _ = torch.no_grad ()
            let chunk = min bucket length
            use staging = torch.empty([| chunk * size |], dtype = input.dtype, device = input.device)
            let mutable offset = 0L
            while offset < length do
                let n = min chunk (length - offset)
                use parts = staging.narrow(0L, 0L, n * size)
                for r in 0L .. size - 1L do
                    let from = r * length + offset
                    let available = max 0L (min n (total - from))
                    use target = parts.narrow(0L, r * n, n)
                    if available > 0L then
                        use source = input.narrow(0L, from, available)
                        use head = target.narrow(0L, 0L, available)
                        head.copy_ source |> ignore
                    if available < n then
                        use tail = target.narrow(0L, available, n - available)
                        zero tail
                use reduced = output.narrow(0L, offset, n)
                communicator.ReduceScatter(parts, reduced)
                offset <- offset + n

    /// Writes every process's block of a 1-D buffer of output's length into output: shard is this process's
    /// block (Sharding.block's Count elements; it may be a view into output itself). The blocks are
    /// gathered bucket elements of each at a time (DeepSpeed's allgather_bucket_size), through staging
    /// buffers of one bucket and Size buckets (straight into output when it is Size whole blocks of at
    /// most a bucket each).
    let allGather (communicator: ICommunicator) (bucket: int64) (shard: torch.Tensor) (output: torch.Tensor) : unit =
        CollectiveBuckets.check "allgather_bucket_size" bucket
        let total = output.numel ()
        let size = communicator.Size
        let length = blockLength total size
        let own = block total size communicator.Rank
        if shard.numel () <> own.Count then
            invalidArg (nameof shard) (sprintf "process %d's block of %d elements has %d elements, got %d" communicator.Rank total own.Count (shard.numel ()))
        use _ = torch.no_grad ()
        if length * int64 size = total && length <= bucket then
            // MPI's gather may not read a buffer it writes: the block is copied out first.
            use send = shard.clone ()
            communicator.AllGather(send, output)
        elif length > 0L then
            let chunk = min bucket length
            use send = torch.empty([| chunk |], dtype = output.dtype, device = output.device)
            use gathered = torch.empty([| chunk * int64 size |], dtype = output.dtype, device = output.device)
            let mutable offset = 0L
            while offset < length do
                let n = min chunk (length - offset)
                use sendPart = send.narrow(0L, 0L, n)
                let mine = max 0L (min n (own.Count - offset))
                if mine > 0L then
                    use source = shard.narrow(0L, offset, mine)
                    use head = sendPart.narrow(0L, 0L, mine)
                    head.copy_ source |> ignore
                if mine < n then
                    use tail = sendPart.narrow(0L, mine, n - mine)
                    zero tail
                use gatheredPart = gathered.narrow(0L, 0L, n * int64 size)
                communicator.AllGather(sendPart, gatheredPart)
                for r in 0L .. int64 size - 1L do
                    let from = r * length + offset
                    let available = max 0L (min n (total - from))
                    if available > 0L then
                        use source = gatheredPart.narrow(0L, r * n, available)
                        use target = output.narrow(0L, from, available)
                        target.copy_ source |> ignore
                offset <- offset + n
