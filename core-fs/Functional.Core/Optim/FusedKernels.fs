namespace Functional.Optim

// The kernels read and write tensors' memory through native pointers.
#nowarn "9"

open System
open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open System.Runtime.Intrinsics
open System.Threading
open System.Threading.Tasks
open Microsoft.FSharp.NativeInterop
open TorchSharp

/// LibTorchSharp's entry point for a tensor's data address (TorchSharp 0.107 keeps its binding internal).
module internal NativeTensor =

    /// libtorch's tensor.data_ptr(): the address of the tensor's first element (storage offset included).
    [<DllImport("LibTorchSharp")>]
    extern nativeint THSTensor_data(nativeint handle)

/// The memory of contiguous CPU tensors, for elementwise kernels written in .NET.
[<RequireQualifiedAccess>]
module internal TensorMemory =

    /// Whether a kernel may work on t's memory directly: t is on the CPU, contiguous and of dtype.
    let isPlain (dtype: torch.ScalarType) (t: torch.Tensor) =
        t.device_type = DeviceType.CPU && t.dtype = dtype && t.is_contiguous ()

    /// The address of t's first element (t must be a CPU tensor). Valid while t's storage is alive.
    let address (t: torch.Tensor) : nativeint =
        let result = NativeTensor.THSTensor_data t.Handle
        if result = 0n then invalidOp "libtorch gave no data address for the tensor"
        result

/// The constants of one AdamW update in the buffers' precision (float32), in the order the unfused
/// transforms apply them (Transform.clipByGlobalNorm, scaleByAdam, addDecayedWeights,
/// scaleByLearningRate, scaleByFactors).
[<Struct; NoEquality; NoComparison>]
type internal AdamWConstants =
    { /// The clipping coefficient the gradients are multiplied by (1 when they are not clipped).
      GradScale: float32
      Beta1: float32
      OneMinusBeta1: float32
      Beta2: float32
      OneMinusBeta2: float32
      /// sqrt(1 - b2^t) / (1 - b1^t).
      StepScale: float32
      /// eps sqrt(1 - b2^t).
      ScaledEps: float32
      /// The weight decay (0: the mask is not read).
      WeightDecay: float32
      /// Minus the scheduled learning rate.
      NegativeLearningRate: float32 }

/// The buffers of one fused AdamW update: addresses of contiguous CPU buffers of Count elements each.
/// Optional ones are 0 when absent.
[<Struct; NoEquality; NoComparison>]
type internal AdamWBuffers =
    { Count: int64
      /// fp32 parameters, updated in place.
      Parameters: nativeint
      /// fp32 gradients, only read.
      Gradients: nativeint
      /// fp32 first moment, updated in place.
      ExpAvg: nativeint
      /// fp32 second moment, updated in place.
      ExpAvgSq: nativeint
      /// fp32 0/1 weight-decay mask, or 0.
      DecayMask: nativeint
      /// fp32 per-element learning-rate factors, or 0.
      Factors: nativeint
      /// bf16 copy of the parameters written after the update, or 0.
      Bf16Copy: nativeint }

/// Elementwise kernels over flat buffers: one pass over memory where the equivalent chain of
/// libtorch ops makes a dozen (each reading and writing whole buffers).
[<RequireQualifiedAccess>]
module internal FusedKernels =

    /// Elements per parallel work item: 256 KB per fp32 buffer.
    [<Literal>]
    let Chunk = 65536L

    /// bf16 bits of an fp32 value, rounded to nearest even as torch's conversion (NaN: 0x7FC0).
    let private toBf16 (x: float32) : uint16 =
        if Single.IsNaN x then 0x7FC0us
        else
            let bits = BitConverter.SingleToUInt32Bits x
            uint16 ((bits + 0x7FFFu + ((bits >>> 16) &&& 1u)) >>> 16)

    /// Eight bf16 values (as Vector128<uint16>) of eight fp32 ones, rounded as toBf16.
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private toBf16x8 (x: Vector256<float32>) : Vector128<uint16> =
        let bits = x.AsUInt32()
        let lowestKept = Vector256.ShiftRightLogical(bits, 16) &&& Vector256.Create 1u
        let rounded = Vector256.ShiftRightLogical(bits + Vector256.Create 0x7FFFu + lowestKept, 16)
        let isNumber = Vector256.Equals(x, x).AsUInt32()
        let result = Vector256.ConditionalSelect(isNumber, rounded, Vector256.Create 0x7FC0u)
        Vector128.Narrow(result.GetLower(), result.GetUpper())

    /// Element i of an fp32 buffer.
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private at (address: nativeint) (i: int64) : nativeptr<float32> =
        NativePtr.ofNativeInt (address + nativeint (i * 4L))

    /// Element i of a bf16 buffer (as its bits).
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private atBf16 (address: nativeint) (i: int64) : nativeptr<uint16> =
        NativePtr.ofNativeInt (address + nativeint (i * 2L))

    /// Element i of the AdamW update, computed alone (the tail of a chunk).
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private adamWElement (c: AdamWConstants) (b: AdamWBuffers) (i: int64) =
        let gi = NativePtr.read (at b.Gradients i) * c.GradScale
        let mi = NativePtr.read (at b.ExpAvg i) * c.Beta1 + gi * c.OneMinusBeta1
        let vi = NativePtr.read (at b.ExpAvgSq i) * c.Beta2 + gi * gi * c.OneMinusBeta2
        NativePtr.write (at b.ExpAvg i) mi
        NativePtr.write (at b.ExpAvgSq i) vi
        let pi = NativePtr.read (at b.Parameters i)
        let mutable u = 1.0f / (MathF.Sqrt vi + c.ScaledEps) * mi * c.StepScale
        if b.DecayMask <> 0n then u <- u + c.WeightDecay * NativePtr.read (at b.DecayMask i) * pi
        u <- u * c.NegativeLearningRate
        if b.Factors <> 0n then u <- u * NativePtr.read (at b.Factors i)
        let updated = pi + u
        NativePtr.write (at b.Parameters i) updated
        if b.Bf16Copy <> 0n then NativePtr.write (atBf16 b.Bf16Copy i) (toBf16 updated)

    /// What every thread of an AdamW update runs: takes the next chunk (next counts the chunks taken)
    /// until none is left, and updates it eight elements at a time, then its tail one at a time.
    ///
    /// One call covers many chunks on purpose. Tiered compilation starts a method as unoptimized code,
    /// where every vector operation is a call, and promotes it only after 30 calls and a quiet spell of
    /// the JIT, which a starting training run does not give: with one call per 64K-element chunk the
    /// first steps of a 92M-parameter run took 120 and 290 ms instead of 40. A long-running loop leaves
    /// unoptimized code after about a thousand iterations instead (on-stack replacement). F# does not
    /// emit MethodImplOptions.AggressiveOptimization, which would skip the unoptimized tier.
    let private adamWWorker (c: AdamWConstants) (b: AdamWBuffers) (chunks: int64) (next: int64 ref) =
        let scale = Vector256.Create c.GradScale
        let beta1 = Vector256.Create c.Beta1
        let oneMinusBeta1 = Vector256.Create c.OneMinusBeta1
        let beta2 = Vector256.Create c.Beta2
        let oneMinusBeta2 = Vector256.Create c.OneMinusBeta2
        let stepScale = Vector256.Create c.StepScale
        let scaledEps = Vector256.Create c.ScaledEps
        let decay = Vector256.Create c.WeightDecay
        let negativeRate = Vector256.Create c.NegativeLearningRate
        let one = Vector256.Create 1.0f
        let mutable k = Interlocked.Increment &next.contents
        while k < chunks do
            let stop = min b.Count ((k + 1L) * Chunk)
            let mutable i = k * Chunk
            while i + 8L <= stop do
                let gi = Vector256.Load(at b.Gradients i) * scale
                let mi = Vector256.Load(at b.ExpAvg i) * beta1 + gi * oneMinusBeta1
                let vi = Vector256.Load(at b.ExpAvgSq i) * beta2 + gi * gi * oneMinusBeta2
                mi.Store(at b.ExpAvg i)
                vi.Store(at b.ExpAvgSq i)
                let pi = Vector256.Load(at b.Parameters i)
                let mutable u = one / (Vector256.Sqrt vi + scaledEps) * mi * stepScale
                if b.DecayMask <> 0n then u <- u + decay * Vector256.Load(at b.DecayMask i) * pi
                u <- u * negativeRate
                if b.Factors <> 0n then u <- u * Vector256.Load(at b.Factors i)
                let updated = pi + u
                updated.Store(at b.Parameters i)
                if b.Bf16Copy <> 0n then (toBf16x8 updated).Store(atBf16 b.Bf16Copy i)
                i <- i + 8L
            while i < stop do
                adamWElement c b i
                i <- i + 1L
            k <- Interlocked.Increment &next.contents

    /// One AdamW update over all of b's elements, in chunks of Chunk elements shared by up to
    /// `threads` threads. Each element is computed independently, so the result does not depend on
    /// the number of threads.
    let adamW (threads: int) (c: AdamWConstants) (b: AdamWBuffers) : unit =
        let chunks = (b.Count + Chunk - 1L) / Chunk
        let next = ref -1L
        let workers = int (min (int64 (max threads 1)) chunks)
        if workers <= 1 then adamWWorker c b chunks next
        else
            Parallel.For(0, workers, ParallelOptions(MaxDegreeOfParallelism = workers), fun _ -> adamWWorker c b chunks next)
            |> ignore
