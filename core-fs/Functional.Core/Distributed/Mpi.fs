namespace Functional.Distributed

open System
open System.Runtime.InteropServices
open TorchSharp
open Functional.Runtime
open Functional
open Functional.Optim

/// The MPI entry points the communicator uses, bound at run time from the system's libmpi (Open MPI's
/// libmpi.so.40). Open MPI's handles (communicators, datatypes, operations) are the addresses of
/// exported globals such as ompi_mpi_comm_world; every handle here is such an address.
module internal MpiNative =

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Init = delegate of nativeint * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type NoArgs = delegate of unit -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Flag = delegate of int byref -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type CommInt = delegate of nativeint * int byref -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Allreduce = delegate of nativeint * nativeint * int * nativeint * nativeint * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Allgather = delegate of nativeint * int * nativeint * nativeint * int * nativeint * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Bcast = delegate of nativeint * int * nativeint * int * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Barrier = delegate of nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type CommSplit = delegate of nativeint * int * int * nativeint byref -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Send = delegate of nativeint * int * nativeint * int * int * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Recv = delegate of nativeint * int * nativeint * int * int * nativeint * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Isend = delegate of nativeint * int * nativeint * int * int * nativeint * nativeint byref -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Wait = delegate of nativeint byref * nativeint -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type Abort = delegate of nativeint * int -> int

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type ErrorString = delegate of int * nativeint * int byref -> int

    /// dlopen, to load libmpi with RTLD_GLOBAL: Open MPI's plugins resolve libmpi's symbols globally.
    [<DllImport("libc", EntryPoint = "dlopen")>]
    extern nativeint dlopen(string path, int flags)

    [<DllImport("libc", EntryPoint = "dlerror")>]
    extern nativeint dlerror()

    /// _exit: ends the process at once, without exit handlers (no MPI_Finalize).
    [<DllImport("libc", EntryPoint = "_exit")>]
    extern void exitNow(int code)

/// What to do when the MPI library is missing: the message names the library and the packages.
[<RequireQualifiedAccess>]
module internal MpiHelp =
    let install =
        "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev, or run tools/install-mpi.sh) "
        + "and start the processes with mpirun"

/// A binding of the MPI calls the communicator needs, over the system's Open MPI (libmpi.so.40).
/// MPICH (libmpi.so.12, integer handles) is detected and refused with a clear error for now.
[<Sealed>]
type MpiLibrary private (handle: nativeint, path: string) =
    static let mutable loaded: MpiLibrary option = None
    static let gate = obj ()

    let export (name: string) =
        match NativeLibrary.TryGetExport(handle, name) with
        | true, address -> address
        | _ -> failwithf "%s has no export %s (an Open MPI libmpi.so.40 is needed; %s)" path name MpiHelp.install

    let call (name: string) = export name

    do
        match NativeLibrary.TryGetExport(handle, "ompi_mpi_comm_world") with
        | true, _ -> ()
        | _ ->
            failwithf
                "%s is not Open MPI (no ompi_mpi_comm_world export; MPICH's integer handles are not supported yet): %s"
                path MpiHelp.install

    let init = Marshal.GetDelegateForFunctionPointer<MpiNative.Init>(call "MPI_Init")
    let finalize = Marshal.GetDelegateForFunctionPointer<MpiNative.NoArgs>(call "MPI_Finalize")
    let initialized = Marshal.GetDelegateForFunctionPointer<MpiNative.Flag>(call "MPI_Initialized")
    let finalized = Marshal.GetDelegateForFunctionPointer<MpiNative.Flag>(call "MPI_Finalized")
    let commRank = Marshal.GetDelegateForFunctionPointer<MpiNative.CommInt>(call "MPI_Comm_rank")
    let commSize = Marshal.GetDelegateForFunctionPointer<MpiNative.CommInt>(call "MPI_Comm_size")
    let allreduce = Marshal.GetDelegateForFunctionPointer<MpiNative.Allreduce>(call "MPI_Allreduce")
    let reduceScatterBlock = Marshal.GetDelegateForFunctionPointer<MpiNative.Allreduce>(call "MPI_Reduce_scatter_block")
    let allgather = Marshal.GetDelegateForFunctionPointer<MpiNative.Allgather>(call "MPI_Allgather")
    let bcast = Marshal.GetDelegateForFunctionPointer<MpiNative.Bcast>(call "MPI_Bcast")
    let barrier = Marshal.GetDelegateForFunctionPointer<MpiNative.Barrier>(call "MPI_Barrier")
    let commSplit = Marshal.GetDelegateForFunctionPointer<MpiNative.CommSplit>(call "MPI_Comm_split")
    let send = Marshal.GetDelegateForFunctionPointer<MpiNative.Send>(call "MPI_Send")
    let recv = Marshal.GetDelegateForFunctionPointer<MpiNative.Recv>(call "MPI_Recv")
    let isend = Marshal.GetDelegateForFunctionPointer<MpiNative.Isend>(call "MPI_Isend")
    let wait = Marshal.GetDelegateForFunctionPointer<MpiNative.Wait>(call "MPI_Wait")
    let abort = Marshal.GetDelegateForFunctionPointer<MpiNative.Abort>(call "MPI_Abort")
    let errorString = Marshal.GetDelegateForFunctionPointer<MpiNative.ErrorString>(call "MPI_Error_string")
    let commWorld = export "ompi_mpi_comm_world"
    let mutable aborting = false
    let opSum = export "ompi_mpi_op_sum"
    let float32Type = export "ompi_mpi_float"
    let float64Type = export "ompi_mpi_double"
    let int64Type = export "ompi_mpi_long_long_int"

    /// The names tried, in order: Open MPI's soname, then the unversioned development link.
    static member Candidates = [ "libmpi.so.40"; "libmpi.so" ]

    /// Loads the system's libmpi once (RTLD_NOW | RTLD_GLOBAL) and binds its entry points; raises with
    /// the library's name and how to install it when it is missing.
    static member Load() : MpiLibrary =
        lock gate (fun () ->
            match loaded with
            | Some library -> library
            | None ->
                let tried =
                    MpiLibrary.Candidates
                    |> List.tryPick (fun name ->
                        let h = MpiNative.dlopen (name, 0x102)
                        if h = 0n then None else Some(h, name))
                match tried with
                | None ->
                    let reason = MpiNative.dlerror () |> Marshal.PtrToStringAnsi
                    failwithf
                        "the run has more than one process but no MPI library could be loaded (tried %s: %s): %s"
                        (String.Join(", ", MpiLibrary.Candidates)) reason MpiHelp.install
                | Some(h, name) ->
                    let library = MpiLibrary(h, name)
                    loaded <- Some library
                    library)

    /// The library's file name as loaded.
    member _.Path = path

    /// MPI's text for an error code.
    member _.ErrorText(code: int) =
        let buffer = Marshal.AllocHGlobal 512
        try
            let mutable length = 0
            if errorString.Invoke(code, buffer, &length) = 0 then Marshal.PtrToStringAnsi(buffer, length)
            else sprintf "MPI error %d" code
        finally
            Marshal.FreeHGlobal buffer

    member this.Check (operation: string) (code: int) =
        if code <> 0 then failwithf "MPI_%s failed: %s" operation (this.ErrorText code)

    /// Whether MPI_Init has been called in this process.
    member _.IsInitialized =
        let mutable flag = 0
        initialized.Invoke(&flag) |> ignore
        flag <> 0

    /// Whether MPI_Finalize has been called in this process.
    member _.IsFinalized =
        let mutable flag = 0
        finalized.Invoke(&flag) |> ignore
        flag <> 0

    /// MPI_Init (with no arguments), unless it has been called.
    member this.Init() =
        if not this.IsInitialized then this.Check "Init" (init.Invoke(0n, 0n))

    /// MPI_Finalize, once, if MPI was started, is not yet finalized and no Abort has begun (after one,
    /// MPI_Finalize would wait for the processes the abort is ending).
    member this.FinalizeMpi() =
        if not aborting && this.IsInitialized && not this.IsFinalized then this.Check "Finalize" (finalize.Invoke())

    /// The world communicator's handle (ompi_mpi_comm_world).
    member _.World = commWorld

    /// This process's rank in the communicator comm.
    member this.RankIn(comm: nativeint) =
        let mutable r = 0
        this.Check "Comm_rank" (commRank.Invoke(comm, &r))
        r

    /// The number of processes of the communicator comm.
    member this.SizeOf(comm: nativeint) =
        let mutable s = 0
        this.Check "Comm_size" (commSize.Invoke(comm, &s))
        s

    member this.Rank = this.RankIn commWorld

    member this.Size = this.SizeOf commWorld

    /// MPI_Comm_split of comm by color and key: the new communicator's handle (it lives until MPI is
    /// finalized).
    member this.Split(comm: nativeint, color: int, key: int) =
        let mutable created = 0n
        this.Check "Comm_split" (commSplit.Invoke(comm, color, key, &created))
        created

    /// The MPI datatype handle of a tensor dtype (float32, float64, int64).
    member _.Datatype(dtype: torch.ScalarType) =
        match dtype with
        | torch.ScalarType.Float32 -> float32Type
        | torch.ScalarType.Float64 -> float64Type
        | torch.ScalarType.Int64 -> int64Type
        | other -> invalidArg "dtype" (sprintf "the MPI communicator handles float32, float64 and int64 tensors, got %O" other)

    member this.AllreduceSumInPlace(comm: nativeint, buffer: nativeint, count: int, datatype: nativeint) =
        // Open MPI's MPI_IN_PLACE is (void*)1.
        this.Check "Allreduce" (allreduce.Invoke(1n, buffer, count, datatype, opSum, comm))

    member this.ReduceScatterBlockSum(comm: nativeint, send: nativeint, receive: nativeint, count: int, datatype: nativeint) =
        this.Check "Reduce_scatter_block" (reduceScatterBlock.Invoke(send, receive, count, datatype, opSum, comm))

    member this.Allgather(comm: nativeint, send: nativeint, receive: nativeint, count: int, datatype: nativeint) =
        this.Check "Allgather" (allgather.Invoke(send, count, datatype, receive, count, datatype, comm))

    member this.Bcast(comm: nativeint, buffer: nativeint, count: int, datatype: nativeint, root: int) =
        this.Check "Bcast" (bcast.Invoke(buffer, count, datatype, root, comm))

    member this.Barrier(comm: nativeint) = this.Check "Barrier" (barrier.Invoke comm)

    member this.Send(comm: nativeint, buffer: nativeint, count: int, datatype: nativeint, destination: int) =
        this.Check "Send" (send.Invoke(buffer, count, datatype, destination, 0, comm))

    /// MPI_Isend with tag 0: the request handle to pass to Wait.
    member this.StartSend(comm: nativeint, buffer: nativeint, count: int, datatype: nativeint, destination: int) =
        let mutable request = 0n
        this.Check "Isend" (isend.Invoke(buffer, count, datatype, destination, 0, comm, &request))
        request

    /// MPI_Wait on a request with MPI_STATUS_IGNORE (Open MPI's is a null pointer).
    member this.Wait(request: nativeint) =
        let mutable handle = request
        this.Check "Wait" (wait.Invoke(&handle, 0n))

    /// MPI_Recv with tag 0 and MPI_STATUS_IGNORE (Open MPI's is a null pointer).
    member this.Receive(comm: nativeint, buffer: nativeint, count: int, datatype: nativeint, source: int) =
        this.Check "Recv" (recv.Invoke(buffer, count, datatype, source, 0, comm, 0n))

    /// MPI_Abort on the world communicator: ends every process of the run with code (mpirun exits
    /// with it). From here on FinalizeMpi does nothing.
    member _.Abort(code: int) =
        aborting <- true
        abort.Invoke(commWorld, code) |> ignore

/// The collectives of ICommunicator over one MPI communicator handle: the world communicator
/// (MpiCommunicator) or a sub-communicator split from it (ISplittableCommunicator.Split).
///
/// CPU ONLY for now: every tensor must be a contiguous CPU tensor of float32, float64 or int64, and MPI
/// reads and writes its memory directly (no staging copy). Tensors on other devices raise; a NCCL
/// communicator will sit behind the same ICommunicator seam.
[<Sealed>]
type MpiGroup internal (library: MpiLibrary, comm: nativeint, localRank: int) =
    let rank = library.RankIn comm
    let size = library.SizeOf comm
    let plain (operation: string) (name: string) (t: torch.Tensor) =
        if t.device_type <> DeviceType.CPU then
            invalidArg name
                (sprintf "%s: the MPI communicator works on CPU tensors only (got one on %O); move it to the CPU (a NCCL communicator for GPUs is not there yet)"
                    operation t.device)
        if not (t.is_contiguous ()) then
            invalidArg name (sprintf "%s: the MPI communicator needs a contiguous tensor" operation)
        if t.numel () > int64 Int32.MaxValue then
            invalidArg name (sprintf "%s: the MPI communicator handles at most %d elements per call, got %d" operation Int32.MaxValue (t.numel ()))

    let datatype (t: torch.Tensor) = library.Datatype t.dtype

    /// Checks the two tensors of ReduceScatter or AllGather: plain, one dtype, and whole (named by
    /// wholeLabel) holding size parts of part's length (part named by partName).
    let parts (operation: string) (input: torch.Tensor) (output: torch.Tensor) (wholeLabel: string) (partName: string) (whole: torch.Tensor) (part: torch.Tensor) =
        plain operation (nameof input) input
        plain operation (nameof output) output
        if input.dtype <> output.dtype then invalidArg (nameof output) (sprintf "%s needs input and output of one dtype" operation)
        if whole.numel () <> part.numel () * int64 size then
            invalidArg (nameof output)
                (sprintf "%s with %d processes needs %s of %d x the %s's %d elements, got %d" operation size wholeLabel size partName (part.numel ()) (whole.numel ()))

    /// Checks a point-to-point message: a plain tensor, and another rank of the group (role names it).
    let peer (operation: string) (tensor: torch.Tensor) (other: int) (role: string) =
        plain operation (nameof tensor) tensor
        if other < 0 || other >= size || other = rank then
            invalidArg role (sprintf "%s: the %s must be another rank below %d, got %d" operation role size other)

    /// The MPI communicator handle.
    member internal _.Handle = comm

    interface ICommunicator with
        member _.Rank = rank
        member _.Size = size
        member _.LocalRank = localRank

        member _.AllReduce tensor =
            plain "AllReduce" (nameof tensor) tensor
            if tensor.numel () > 0L then
                library.AllreduceSumInPlace(comm, TensorMemory.address tensor, int (tensor.numel ()), datatype tensor)

        member _.ReduceScatter(input, output) =
            parts "ReduceScatter" input output "an input" "output" input output
            library.ReduceScatterBlockSum(comm, TensorMemory.address input, TensorMemory.address output, int (output.numel ()), datatype output)

        member _.AllGather(input, output) =
            parts "AllGather" input output "an output" "input" output input
            library.Allgather(comm, TensorMemory.address input, TensorMemory.address output, int (input.numel ()), datatype input)

        member _.Broadcast(tensor, root) =
            plain "Broadcast" (nameof tensor) tensor
            if root < 0 || root >= size then invalidArg (nameof root) (sprintf "the root must be a rank below %d, got %d" size root)
            if tensor.numel () > 0L then
                library.Bcast(comm, TensorMemory.address tensor, int (tensor.numel ()), datatype tensor, root)

        member _.Barrier() = library.Barrier comm

    interface ISplittableCommunicator with
        member _.Split(color, key) =
            if color < 0 then invalidArg (nameof color) (sprintf "a split's color must be >= 0, got %d" color)
            MpiGroup(library, library.Split(comm, color, key), localRank) :> ISplittableCommunicator

    interface IPointToPoint with
        member _.Send(tensor, destination) =
            peer "Send" tensor destination "destination"
            if tensor.numel () > 0L then
                library.Send(comm, TensorMemory.address tensor, int (tensor.numel ()), datatype tensor, destination)

        member _.Receive(tensor, source) =
            peer "Receive" tensor source "source"
            if tensor.numel () > 0L then
                library.Receive(comm, TensorMemory.address tensor, int (tensor.numel ()), datatype tensor, source)

        member _.StartSend(tensor, destination) =
            peer "StartSend" tensor destination "destination"
            if tensor.numel () = 0L then { new IDisposable with member _.Dispose() = () }
            else
                let request = library.StartSend(comm, TensorMemory.address tensor, int (tensor.numel ()), datatype tensor, destination)
                let mutable waited = false
                { new IDisposable with
                    member _.Dispose() =
                        if not waited then
                            waited <- true
                            library.Wait request }

/// A communicator over MPI's world communicator (Open MPI, loaded at run time); its collectives are
/// MpiGroup's (CPU tensors only for now), Split divides it into sub-communicators. Dispose finalizes MPI.
///
/// Faults: a process that fails must not leave its peers waiting inside a collective or in
/// MPI_Finalize. Fail (Faults.abortRun) writes one line naming the rank and ends the whole run with
/// MPI_Abort. Start arranges the same for a process that leaves through an unhandled exception, or that
/// exits with a failing code without calling Fail; a process that exits with 0 finalizes MPI.
[<Sealed>]
type MpiCommunicator private (library: MpiLibrary, localRank: int) =
    static let mutable current: MpiCommunicator option = None
    let world = MpiGroup(library, library.World, localRank)
    let rank = library.Rank
    let size = library.Size
    let gate = obj ()
    let mutable failing = false

    /// The line a failing process writes before it aborts the run: "rank R of N failed: message".
    static member FailureLine(rank: int, size: int, message: string) =
        sprintf "rank %d of %d failed: %s" rank size message

    /// Starts MPI (MPI_Init) in this process, which mpirun (or another MPI launcher) started, and
    /// returns the world communicator (also MpiCommunicator.Current from then on); localRank is this
    /// process's index on its machine. At process exit MPI is finalized when the exit code is 0 (or says
    /// the process was stopped by a signal), and the run is failed (Fail) otherwise; an unhandled
    /// exception fails the run too.
    static member Start(localRank: int) =
        let library = MpiLibrary.Load()
        library.Init()
        let communicator = new MpiCommunicator(library, localRank)
        current <- Some communicator
        // A process that leaves without MPI_Finalize makes mpirun report the run as failed. One that
        // finalizes while a peer waits for it in a collective hangs both: a failing exit aborts instead.
        AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> communicator.Exit())
        AppDomain.CurrentDomain.UnhandledException.Add(fun e ->
            communicator.Fail(1, sprintf "unhandled exception: %O" e.ExceptionObject))
        communicator

    /// The communicator Start returned in this process, or None when MPI was not started.
    static member Current: MpiCommunicator option = current

    /// The MPI library in use.
    member _.Library = library

    /// At process exit: fails the run when the exit code says this process failed (or a failure is under
    /// way on another thread), finalizes MPI otherwise. Codes 0 and 129-192 (128 + a signal's number: the
    /// run was asked to stop, e.g. 130 after SIGINT, 143 after SIGTERM, and every process stops alike)
    /// finalize; any other code fails the run, since this process may be leaving alone.
    member private this.Exit() =
        let code = Environment.ExitCode
        let stopped = code > 128 && code <= 128 + 64
        if failing || (code <> 0 && not stopped) then this.Fail(code, sprintf "the process is exiting with code %d" code)
        else try library.FinalizeMpi() with _ -> ()

    /// Ends every process of the run (MPI_Abort) with code.
    member _.Abort(code: int) = library.Abort code

    /// Fails the run: writes FailureLine (this rank, the size, message) to standard error, then ends
    /// every process of the run with MPI_Abort(code): mpirun kills the other processes and exits with
    /// a code other than 0. Does not return; MPI is not finalized. A second call (another thread, or the
    /// exit handler after a failure) only waits for the first to end the process.
    member _.Fail(code: int, message: string) : unit =
        let code = if code = 0 then 1 else code
        let first = lock gate (fun () -> if failing then false else (failing <- true; true))
        if first then
            try
                Console.Out.Flush()
                Console.Error.WriteLine(MpiCommunicator.FailureLine(rank, size, message))
                Console.Error.Flush()
            with _ -> ()
            if not library.IsFinalized then library.Abort code
            // MPI_Abort ends this process; should it come back (or MPI be finalized already), leave at
            // once, without exit handlers: mpirun then ends the run as it does for a process that died.
            MpiNative.exitNow code
        else
            Threading.Thread.Sleep(Threading.Timeout.Infinite)

    interface ICommunicator with
        member _.Rank = (world :> ICommunicator).Rank
        member _.Size = (world :> ICommunicator).Size
        member _.LocalRank = localRank
        member _.AllReduce tensor = (world :> ICommunicator).AllReduce tensor
        member _.ReduceScatter(input, output) = (world :> ICommunicator).ReduceScatter(input, output)
        member _.AllGather(input, output) = (world :> ICommunicator).AllGather(input, output)
        member _.Broadcast(tensor, root) = (world :> ICommunicator).Broadcast(tensor, root)
        member _.Barrier() = (world :> ICommunicator).Barrier()

    interface ISplittableCommunicator with
        member _.Split(color, key) = (world :> ISplittableCommunicator).Split(color, key)

    interface IPointToPoint with
        member _.Send(tensor, destination) = (world :> IPointToPoint).Send(tensor, destination)
        member _.Receive(tensor, source) = (world :> IPointToPoint).Receive(tensor, source)
        member _.StartSend(tensor, destination) = (world :> IPointToPoint).StartSend(tensor, destination)

    interface IDisposable with
        member _.Dispose() = library.FinalizeMpi()

/// Where a run's processes come from, as the launcher's environment variables say.
type LaunchEnvironment =
    { /// The number of processes (OMPI_COMM_WORLD_SIZE, PMI_SIZE or WORLD_SIZE; 1 when none is set).
      Size: int
      /// This process's index (OMPI_COMM_WORLD_RANK, PMI_RANK or RANK; 0 when none is set).
      Rank: int
      /// This process's index on its machine (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID or LOCAL_RANK; 0 when none is set).
      LocalRank: int
      /// The variable the size was read from, or None for a single process with nothing set.
      SizeVariable: string option }

/// Communicators and the reductions of plain numbers the trainer needs.
[<RequireQualifiedAccess>]
module Communicator =

    /// The communicator of a run with one process.
    let singleProcess: ICommunicator = SingleProcess()

    /// The sum of value over all processes (an all-reduce of one int64): e.g. a window's predicted
    /// tokens, so that every process normalizes its loss by the tokens of the whole window.
    let sumInt64 (communicator: ICommunicator) (value: int64) : int64 =
        TorchRuntime.ensure ()
        use tensor = torch.tensor value
        communicator.AllReduce tensor
        tensor.item<int64> ()

    /// The sum of value over all processes (an all-reduce of one float64): e.g. a window's summed loss,
    /// or, as a Transform.NormReduction, the squared gradient norms of the shards of a sharded gradient.
    /// With one process it is value exactly.
    let sumFloat (communicator: ICommunicator) (value: float) : float =
        TorchRuntime.ensure ()
        use tensor = torch.tensor value
        communicator.AllReduce tensor
        tensor.item<float> ()

    /// The variables read for the size, rank and local rank, first found wins.
    let private sizeVariables = [ "OMPI_COMM_WORLD_SIZE"; "PMI_SIZE"; "WORLD_SIZE" ]
    let private rankVariables = [ "OMPI_COMM_WORLD_RANK"; "PMI_RANK"; "RANK" ]
    let private localRankVariables = [ "OMPI_COMM_WORLD_LOCAL_RANK"; "MPI_LOCALRANKID"; "LOCAL_RANK" ]

    /// Reads the launch environment through lookup (a variable's value, or null/empty when unset). A
    /// value that is not a whole number in range raises InvalidInputException naming the variable.
    let parseEnvironment (lookup: string -> string) : LaunchEnvironment =
        let first (names: string list) =
            names |> List.tryPick (fun n -> match lookup n with null | "" -> None | v -> Some(n, v.Trim()))
        let number (names: string list) (least: int) =
            match first names with
            | None -> None
            | Some(name, text) ->
                match Int32.TryParse text with
                | true, v when v >= least -> Some(name, v)
                | _ -> raise (InvalidInputException("environment", name, sprintf "expected a whole number of at least %d, got '%s'" least text))
        let size = number sizeVariables 1
        let rank = number rankVariables 0 |> Option.map snd |> Option.defaultValue 0
        let localRank = number localRankVariables 0 |> Option.map snd |> Option.defaultValue 0
        let sizeValue = size |> Option.map snd |> Option.defaultValue 1
        if rank >= sizeValue then
            let name = (first rankVariables |> Option.get |> fst)
            raise (InvalidInputException("environment", name, sprintf "expected a rank below the run's %d processes, got %d" sizeValue rank))
        { Size = sizeValue; Rank = rank; LocalRank = localRank; SizeVariable = size |> Option.map fst }

    let private fromLaunch () : ICommunicator =
        let launch = parseEnvironment Environment.GetEnvironmentVariable
        if launch.Size <= 1 then singleProcess
        else
            let mpi = MpiCommunicator.Start launch.LocalRank
            let communicator = mpi :> ICommunicator
            if communicator.Size <> launch.Size then
                failwithf "%s says %d processes but MPI's world has %d: start the run with mpirun (%s)"
                    (Option.defaultValue "the environment" launch.SizeVariable) launch.Size communicator.Size MpiHelp.install
            communicator

    let private launched = lazy (fromLaunch ())

    /// The communicator of this process as its launcher set it up: with no launcher variables, or a
    /// size of 1, the single-process communicator (MPI is not loaded); with a size above 1, MPI's world
    /// communicator (Open MPI's libmpi.so.40; CPU tensors only for now). Raises, naming the library and
    /// how to install it, when the environment says there are several processes but MPI cannot be
    /// loaded, or when MPI's size disagrees with the environment's. Made on the first call; every later call returns the same
    /// communicator (MPI starts once per process).
    let fromEnvironment () : ICommunicator = launched.Force()

    /// Ends a self-check of a launch (LaunchCheck, TensorParallelChecks, PipelineCheck): prints its line on
    /// standard output, finalizes MPI (the world communicator's Dispose), and returns the exit code, 0 when
    /// the check passed and 1 otherwise.
    let finishCheck (world: ICommunicator) (passed: bool, line: string) : int =
        Console.Out.WriteLine(line: string)
        Console.Out.Flush()
        match world with
        | :? IDisposable as d -> d.Dispose()
        | _ -> ()
        if passed then 0 else 1
