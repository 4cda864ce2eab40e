namespace Functional.Benchmarks

open System
open System.Diagnostics
open TorchSharp
open Functional

/// One way of computing the causal-LM loss and its backward in `functional bench memory`'s vocabulary
/// section.
[<NoComparison>]
type LossMemoryRow =
    { /// "full logits" or "chunked N".
      Path: string
      /// "fp32" or "bf16": the dtype of the hidden states and the head weight (the loss is fp32 in both).
      Precision: string
      /// The peak of the process's resident memory during the loss and its backward, above the resident
      /// memory just before (after a GC and glibc's malloc_trim); None where the system keeps no
      /// high-water mark (/proc/self/clear_refs). The head weight's gradient (V x C) exists before, as the
      /// trainer's gradient buffer does; the hidden states' gradient (B x T x C) is included.
      PeakBytes: int64 option
      /// Wall-clock seconds of the loss and its backward (one cold run: first-touch page faults included).
      Seconds: float
      /// The summed loss.
      Loss: float
      /// The largest difference of this path's gradients (hidden states and head weight) from the full
      /// path's, relative to the largest gradient element; 0 for the full path itself.
      GradientDifference: float }

/// The loss memory of a large vocabulary with and without chunked cross-entropy: Loss.causalLmSum on the
/// full logits against ChunkedLoss.causalLmSum, on random final hidden states and a random head weight.
[<RequireQualifiedAccess>]
module LossMemoryBenchmark =

    /// The bytes of the fp32 logits of the full path: batch x sequenceLength x vocabulary x 4.
    let logitsBytes (vocabulary: int) (batch: int) (sequenceLength: int) : int64 =
        int64 batch * int64 sequenceLength * int64 vocabulary * 4L

    /// Runs the loss and its backward of path on fresh leaves aliasing hidden and weight: the peak resident
    /// growth, the seconds, the loss and the gradients (fp32 copies, made after the measurement).
    let private measurePath (path: torch.Tensor -> torch.Tensor -> torch.Tensor) (hidden: torch.Tensor) (weight: torch.Tensor) =
        use h = hidden.detach().requires_grad_(true)
        use w = weight.detach().requires_grad_(true)
        // The head weight's gradient exists before the step, as the trainer's flat gradient buffer does, so
        // backward adds into it in place on both paths.
        w.grad <- torch.zeros_like weight
        let baseline = TrainingBenchmark.residentBytes ()
        let reset = TrainingBenchmark.resetPeak ()
        let clock = Stopwatch.StartNew()
        let loss =
            use scope = torch.NewDisposeScope()
            let sum = path h w
            sum.backward ()
            sum.item<float32> () |> float
        let seconds = clock.Elapsed.TotalSeconds
        let peak = if reset then TrainingBenchmark.peakResident () |> Option.map (fun p -> max 0L (p - baseline)) else None
        use _ = torch.no_grad ()
        let hiddenGradient = h.grad.to_type(torch.float32).clone().DetachFromDisposeScope()
        let weightGradient = w.grad.to_type(torch.float32).clone().DetachFromDisposeScope()
        h.grad <- null
        w.grad <- null
        peak, seconds, loss, hiddenGradient, weightGradient

    /// Measures both paths in one precision ("fp32" or "bf16") on a batch x sequenceLength batch of hidden
    /// states of the given width and a head of vocabulary rows, with random labels of which every 8th is
    /// -100: the chunked path first (chunks of chunkSize positions), then the full one, each after the
    /// freed heap has been returned to the system. Returns (full, chunked). Seeded: the same figures' inputs
    /// on every run.
    let measure (vocabulary: int) (width: int) (batch: int) (sequenceLength: int) (chunkSize: int) (precision: string) : LossMemoryRow * LossMemoryRow =
        Runtime.TorchRuntime.ensure ()
        let dtype =
            match precision with
            | "fp32" -> torch.float32
            | "bf16" -> torch.bfloat16
            | other -> invalidArg (nameof precision) (sprintf "expected fp32 or bf16, got %s" other)
        use generator = new torch.Generator(17UL)
        use hidden = torch.randn(int64 batch, int64 sequenceLength, int64 width, generator = generator).to_type dtype
        use weight = (torch.randn(int64 vocabulary, int64 width, generator = generator) * 0.05).to_type dtype
        use labels =
            use drawn = torch.randint(int64 vocabulary, [| int64 batch; int64 sequenceLength |], generator = generator, dtype = torch.int64)
            use ignored = torch.tensor(Array.init (batch * sequenceLength) (fun i -> i % 8 = 7)).reshape(int64 batch, int64 sequenceLength)
            drawn.masked_fill(ignored, Loss.IgnoreIndex)
        let fullPath (h: torch.Tensor) (w: torch.Tensor) =
            use logits = torch.nn.functional.linear(h, w) // (B, T, V)
            Loss.causalLmSum logits labels
        let chunkedPath (h: torch.Tensor) (w: torch.Tensor) = ChunkedLoss.causalLmSum chunkSize h w labels
        // Warm-up on a few positions, so neither measured run pays for the first calls (JIT, kernel setup).
        do
            use fewHidden = hidden.narrow(1L, 0L, min 8L (int64 sequenceLength))
            use fewLabels = labels.narrow(1L, 0L, min 8L (int64 sequenceLength))
            for path in [ (fun (h: torch.Tensor) (w: torch.Tensor) -> ChunkedLoss.causalLmSum chunkSize h w fewLabels)
                          (fun h w ->
                              use logits = torch.nn.functional.linear(h, w)
                              Loss.causalLmSum logits fewLabels) ] do
                let _, _, _, g1, g2 = measurePath path fewHidden weight
                g1.Dispose()
                g2.Dispose()
        let chunkedPeak, chunkedSeconds, chunkedLoss, chunkedHidden, chunkedWeight = measurePath chunkedPath hidden weight
        let fullPeak, fullSeconds, fullLoss, fullHidden, fullWeight = measurePath fullPath hidden weight
        let relative (a: torch.Tensor) (b: torch.Tensor) =
            use diff = (a - b).abs().max()
            use scale = b.abs().max()
            float (diff.item<float32> ()) / max 1e-30 (float (scale.item<float32> ()))
        let difference = max (relative chunkedHidden fullHidden) (relative chunkedWeight fullWeight)
        for t in [ chunkedHidden; chunkedWeight; fullHidden; fullWeight ] do t.Dispose()
        { Path = "full logits"; Precision = precision; PeakBytes = fullPeak; Seconds = fullSeconds; Loss = fullLoss; GradientDifference = 0.0 },
        { Path = sprintf "chunked %d" chunkSize; Precision = precision; PeakBytes = chunkedPeak; Seconds = chunkedSeconds; Loss = chunkedLoss; GradientDifference = difference }
