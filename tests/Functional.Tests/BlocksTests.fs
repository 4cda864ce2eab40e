module Functional.Tests.BlocksTests

open System
open Expecto
open TorchSharp
open Functional.Models
open Functional.Tests.TestUtil

// The shared blocks' attention biases: ALiBi (HF BLOOM) and the sliding window (HF Mistral), in the
// training forward (CausalAttention.apply) and the cached forward (IncrementalDecoding.keyMask +
// CausalAttention.applyCached), against references written out here.

/// ALiBi's slopes as the paper's reference code (ofirpress/attention_with_linear_biases) writes them,
/// another formulation than HF's: for a power of two n, start = 2^(-8/n) and slope i = start^(i+1);
/// otherwise the slopes of the largest power of two p < n followed by every other slope of 2p, n - p of them.
let rec private referenceSlopes (n: int) : float list =
    let ofPowerOfTwo (n: int) =
        let start = Math.Pow(2.0, -8.0 / float n)
        [ for i in 0 .. n - 1 -> Math.Pow(start, float (i + 1)) ]
    if n &&& (n - 1) = 0 then ofPowerOfTwo n
    else
        let p = pown 2 (int (Math.Floor(Math.Log2(float n))))
        ofPowerOfTwo p @ (referenceSlopes (2 * p) |> List.indexed |> List.filter (fun (i, _) -> i % 2 = 0) |> List.map snd |> List.truncate (n - p))

let private random (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randn(shape, generator = g)

/// Softmax attention written out: q, k, v (B, nh, T_q, hs) and (B, nh, T_k, hs); bias (nh, T_q, T_k) the
/// additive bias with -inf where a key is hidden.
let private reference (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) (bias: float[,,]) =
    use scores = torch.matmul(q, k.transpose(-2L, -1L)) / Math.Sqrt(float q.shape[3])
    let nh, tq, tk = Array3D.length1 bias, Array3D.length2 bias, Array3D.length3 bias
    use b = torch.tensor(Array.init (nh * tq * tk) (fun i -> float32 bias[i / (tq * tk), (i / tk) % tq, i % tk])).view(int64 nh, int64 tq, int64 tk)
    use weights = (scores + b).softmax(-1L)
    torch.matmul(weights, v)

/// The relative ALiBi bias of queries at positions qStart .. qStart + tq - 1 over tk keys: -slope (i - j)
/// for j <= i, -inf beyond (the paper's form; HF adds slope * j, equal after the softmax).
let private alibiBias (slopes: float list) (qStart: int) (tq: int) (tk: int) =
    Array3D.init slopes.Length tq tk (fun h i j ->
        let i = qStart + i
        if j <= i then -slopes[h] * float (i - j) else Double.NegativeInfinity)

/// The sliding-window mask: 0 for i - window < j <= i, -inf elsewhere.
let private windowBias (heads: int) (window: int) (qStart: int) (tq: int) (tk: int) =
    Array3D.init heads tq tk (fun _ i j ->
        let i = qStart + i
        if j <= i && i - window < j then 0.0 else Double.NegativeInfinity)

/// Decodes position by position with the cached forward's mask: query t over keys 0 .. t. -> (B, nh, T, hs).
let private decodeStepwise (bias: AttentionBias) (q: torch.Tensor) (k: torch.Tensor) (v: torch.Tensor) =
    let B, T = q.shape[0], q.shape[2]
    let steps =
        [| for t in 0L .. T - 1L ->
               use mask = torch.ones(B, t + 1L, dtype = torch.int64)
               use keyMask = IncrementalDecoding.keyMask bias mask 1L true
               use qt = q.narrow(2L, t, 1L)
               use kt = k.narrow(2L, 0L, t + 1L)
               use vt = v.narrow(2L, 0L, t + 1L)
               CausalAttention.applyCached qt kt vt keyMask 0.0 |]
    let y = torch.cat(steps, 2L)
    for s in steps do s.Dispose()
    y

let private slopeTests =
    testList "alibi slopes" [
        torchTest "HF BLOOM's slopes equal the paper's reference for 1 to 33 heads" (fun () ->
            for n in 1 .. 33 do
                use s = Alibi.slopes n
                let actual = values s
                let expected = referenceSlopes n |> Array.ofList
                Expect.equal actual.Length n (sprintf "%d heads: one slope each" n)
                Array.iter2 (fun a e -> Expect.floatClose Accuracy.high a e (sprintf "%d heads" n)) actual expected)
        torchTest "8 heads: 1/2 .. 1/256; 6 heads: the 4-head slopes, then 1/2 and 1/8" (fun () ->
            use eight = Alibi.slopes 8
            Expect.sequenceEqual (values eight) [ for i in 1 .. 8 -> Math.Pow(0.5, float i) ] "8 heads"
            use six = Alibi.slopes 6
            Expect.sequenceEqual (values six) [ 0.25; 0.0625; 0.015625; 0.00390625; 0.5; 0.125 ] "6 heads")
        test "no head is refused" { Expect.throwsT<ArgumentException> (fun () -> Alibi.slopes 0 |> ignore) "0 heads" }
    ]

let private attentionTests =
    testList "attention bias" [
        torchTest "ALiBi: the training forward matches the written-out relative bias (fp32 and bf16)" (fun () ->
            let heads, T = 6, 7
            use q = random [| 2L; int64 heads; int64 T; 8L |] 1L
            use k = random [| 2L; int64 heads; int64 T; 8L |] 2L
            use v = random [| 2L; int64 heads; int64 T; 8L |] 3L
            use slopes = Alibi.slopes heads
            use expected = reference q k v (alibiBias (List.ofArray (values slopes)) 0 T T)
            use actual = CausalAttention.apply q k v { Dropout = 0.0; Bias = Alibi slopes }
            expectClose 1e-5 actual expected "fp32"
            use plain = CausalAttention.apply q k v { Dropout = 0.0; Bias = NoBias }
            Expect.isGreaterThan (maxAbsDiff plain expected) 1e-3 "the bias changes the result"
            use q16 = q.to_type torch.bfloat16
            use k16 = k.to_type torch.bfloat16
            use v16 = v.to_type torch.bfloat16
            use low = CausalAttention.apply q16 k16 v16 { Dropout = 0.0; Bias = Alibi slopes }
            use low32 = low.to_type torch.float32
            expectClose 5e-2 low32 expected "bf16")
        torchTest "ALiBi: decoding position by position with the cache equals the training forward" (fun () ->
            use q = random [| 2L; 5L; 6L; 4L |] 4L
            use k = random [| 2L; 5L; 6L; 4L |] 5L
            use v = random [| 2L; 5L; 6L; 4L |] 6L
            use slopes = Alibi.slopes 5
            use full = CausalAttention.apply q k v { Dropout = 0.0; Bias = Alibi slopes }
            use stepwise = decodeStepwise (Alibi slopes) q k v
            expectClose 1e-5 stepwise full "stepwise")
        torchTest "ALiBi with left padding: a padded row's real queries equal the row run alone" (fun () ->
            use q = random [| 1L; 3L; 5L; 4L |] 7L
            use k = random [| 1L; 3L; 5L; 4L |] 8L
            use v = random [| 1L; 3L; 5L; 4L |] 9L
            use slopes = Alibi.slopes 3
            use mask = torch.tensor([| 0L; 0L; 1L; 1L; 1L |]).unsqueeze 0L
            use keyMask = IncrementalDecoding.keyMask (Alibi slopes) mask 5L false // (1, 3, 5, 5)
            Expect.sequenceEqual keyMask.shape [| 1L; 3L; 5L; 5L |] "per-head additive mask"
            use padded = CausalAttention.applyCached q k v keyMask 0.0
            use real = padded.narrow(2L, 2L, 3L)
            use alone = CausalAttention.apply (q.narrow(2L, 2L, 3L)) (k.narrow(2L, 2L, 3L)) (v.narrow(2L, 2L, 3L)) { Dropout = 0.0; Bias = Alibi slopes }
            expectClose 1e-5 real alone "real queries")
        torchTest "sliding window: the training forward sees keys i - window < j <= i (fp32 and bf16)" (fun () ->
            let heads, T, window = 2, 7, 3
            use q = random [| 2L; int64 heads; int64 T; 8L |] 10L
            use k = random [| 2L; int64 heads; int64 T; 8L |] 11L
            use v = random [| 2L; int64 heads; int64 T; 8L |] 12L
            use expected = reference q k v (windowBias heads window 0 T T)
            use actual = CausalAttention.apply q k v { Dropout = 0.0; Bias = Window window }
            expectClose 1e-5 actual expected "fp32"
            use q16 = q.to_type torch.bfloat16
            use k16 = k.to_type torch.bfloat16
            use v16 = v.to_type torch.bfloat16
            use low = CausalAttention.apply q16 k16 v16 { Dropout = 0.0; Bias = Window window }
            use low32 = low.to_type torch.float32
            expectClose 5e-2 low32 expected "bf16"
            use wide = CausalAttention.apply q k v { Dropout = 0.0; Bias = Window T }
            use plain = CausalAttention.apply q k v { Dropout = 0.0; Bias = NoBias }
            expectClose 1e-5 wide plain "a window as long as the sequence is plain causal attention")
        torchTest "sliding window: decoding with the cache equals the training forward, padded rows too" (fun () ->
            use q = random [| 2L; 2L; 6L; 4L |] 13L
            use k = random [| 2L; 2L; 6L; 4L |] 14L
            use v = random [| 2L; 2L; 6L; 4L |] 15L
            use full = CausalAttention.apply q k v { Dropout = 0.0; Bias = Window 2 }
            use stepwise = decodeStepwise (Window 2) q k v
            expectClose 1e-5 stepwise full "stepwise"
            use mask = torch.tensor([| 0L; 1L; 1L; 1L; 1L; 1L; 1L; 1L; 1L; 1L; 1L; 1L |]).view(2L, 6L)
            use keyMask = IncrementalDecoding.keyMask (Window 2) mask 6L false
            use padded = CausalAttention.applyCached q k v keyMask 0.0
            use real = padded[0L].narrow(1L, 1L, 5L)
            use alone = CausalAttention.apply (q[0L].narrow(1L, 1L, 5L).unsqueeze 0L) (k[0L].narrow(1L, 1L, 5L).unsqueeze 0L) (v[0L].narrow(1L, 1L, 5L).unsqueeze 0L) { Dropout = 0.0; Bias = Window 2 }
            expectClose 1e-5 (real.unsqueeze 0L) alone "the padded row's real queries"
            use unpadded = padded[1L].unsqueeze 0L
            use second = full[1L].unsqueeze 0L
            expectClose 1e-5 unpadded second "the unpadded row")
        torchTest "the shared layers carry their markers: Conv1D a transposed weight, RmsNorm a normalization" (fun () ->
            use conv = new Conv1D(2L, 3L)
            Expect.sequenceEqual (box conv :?> ITransposedWeight).Weight.shape [| 2L; 3L |] "Conv1D weight (in, out)"
            use norm = new RmsNorm(4L, 1e-6)
            Expect.isTrue (box norm :? INormalization) "RmsNorm is an INormalization")
    ]

[<Tests>]
let tests = testList "blocks" [ slopeTests; attentionTests ]
