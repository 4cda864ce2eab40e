namespace Functional

open System
open System.Collections.Generic
open TorchSharp
open Functional.Runtime

// Chunked cross-entropy (Liger's fused linear cross-entropy, Unsloth's chunked loss, Apple's cut
// cross-entropy): the LM head and the loss run together over chunks of the predicted positions, so at most
// chunk x V logits (and their fp32 copy, and in backward their softmax) exist at any time instead of the
// B x T x V logits of the model's forward. The backward recomputes each chunk's logits from the saved
// hidden rows and the head weight: one extra head matmul per chunk for memory that no longer grows with V.

/// The buffers one pass over the chunks reuses, allocated once per forward or backward, so that no
/// per-chunk allocation of chunk x V elements reaches the allocator (glibc keeps freed blocks of a heap
/// whose mmap threshold is raised, see TorchRuntime, and fresh ones per chunk made the resident peak grow
/// with the number of chunks).
[<NoEquality; NoComparison>]
type private ChunkBuffers =
    { /// (chunk, V) fp32: the chunk's logits, then in place their softmax and its gradient.
      Logits: torch.Tensor
      /// (chunk, V) in the compute dtype when that is not fp32 (the logits before the upcast and the
      /// gradient after the downcast), else null.
      Narrow: torch.Tensor }

    /// Buffers for chunks of chunk rows of a (V, C) weight.
    static member Create(chunk: int64, weight: torch.Tensor) =
        let vocab = weight.shape[0]
        { Logits = torch.empty([| chunk; vocab |], dtype = torch.float32, device = weight.device)
          Narrow =
            if weight.dtype = torch.ScalarType.Float32 then null
            else torch.empty([| chunk; vocab |], dtype = weight.dtype, device = weight.device) }

    /// The fp32 logits (length, V) of rows (length, C): rows @ weight^T computed in the compute dtype
    /// (as the model's head computes them) into the buffers, upcast to fp32. A view of Logits.
    member this.LogitsOf(rows: torch.Tensor, weight: torch.Tensor) =
        let length = rows.shape[0]
        let logits = this.Logits.narrow(0L, 0L, length)
        if isNull this.Narrow then
            // beta 0: the buffer's old values are ignored (NaN included), as torch.addmm documents.
            logits.addmm_(rows, weight.t (), beta = 0.0f, alpha = 1.0f) |> ignore
        else
            use narrow = this.Narrow.narrow(0L, 0L, length)
            narrow.addmm_(rows, weight.t (), beta = 0.0f, alpha = 1.0f) |> ignore
            logits.copy_ narrow |> ignore
        logits

/// The autograd function of the chunked loss. Arguments: the hidden rows of the predicted positions (N, C)
/// in the compute dtype, the head weight (V, C) in the same dtype, their targets (N) int64 and the chunk
/// size (an int64). Returns the summed cross-entropy (0-dim fp32). Saves the rows, the weight, the targets
/// and each row's fp32 logsumexp (N); nothing of size V survives the forward.
type private ChunkedCrossEntropy() =
    inherit torch.autograd.SingleTensorFunction<ChunkedCrossEntropy>()

    /// The node's name in the autograd graph.
    override _.Name = "ChunkedCrossEntropyBackward"

    /// Computes sum over rows of logsumexp(logits) - logits[target], chunk by chunk, the logits of a chunk
    /// computed in the rows' dtype and upcast to fp32 as Loss.causalLmSum upcasts the model's logits.
    override _.forward(ctx, args) =
        let rows = args[0] :?> torch.Tensor
        let weight = args[1] :?> torch.Tensor
        let targets = args[2] :?> torch.Tensor
        let chunk = args[3] :?> int64
        use scope = torch.NewDisposeScope()
        let count = rows.shape[0]
        let logSumExp = torch.empty([| count |], dtype = torch.float32, device = rows.device)
        let total = torch.zeros([||], dtype = torch.float32, device = rows.device)
        let buffers = ChunkBuffers.Create(min chunk (max 1L count), weight)
        let mutable start = 0L
        while start < count do
            use _ = torch.NewDisposeScope()
            let length = min chunk (count - start)
            let logits = buffers.LogitsOf(rows.narrow(0L, start, length), weight) // (n, V) fp32
            let target = logits.gather(1L, targets.narrow(0L, start, length).unsqueeze 1L).squeeze 1L // (n)
            // logsumexp in place: max + log sum exp(logits - max), as torch.logsumexp computes it.
            let largest = logits.amax([| 1L |], keepdim = true) // (n, 1)
            let lse = logits.sub_(largest).exp_().sum(1L).log_().add_(largest.squeeze 1L) // (n)
            logSumExp.narrow(0L, start, length).copy_ lse |> ignore
            total.add_((lse - target).sum()) |> ignore
            start <- start + length
        ctx.save_for_backward(List<torch.Tensor>([| rows; weight; targets; logSumExp |]))
        ctx.save_data("chunk", chunk)
        ctx.save_data("rowsNeedGrad", rows.requires_grad)
        ctx.save_data("weightNeedsGrad", weight.requires_grad)
        scope.MoveToOuter logSumExp |> ignore
        scope.MoveToOuter total

    /// Recomputes each chunk's logits, turns them into d loss / d logits = (softmax - onehot(target)) *
    /// gradient (fp32, cast to the compute dtype as the upcast's backward casts it) and backpropagates that
    /// through the head: the rows' gradient chunk by chunk, the weight's accumulated in fp32 over the chunks
    /// and cast to the weight's dtype once.
    override _.backward(ctx, outputGradient) =
        use scope = torch.NewDisposeScope()
        let saved = ctx.get_saved_variables ()
        let rows, weight, targets, logSumExp = saved[0], saved[1], saved[2], saved[3]
        let chunk = ctx.get_data "chunk" :?> int64
        let rowsNeedGrad = ctx.get_data "rowsNeedGrad" :?> bool
        let weightNeedsGrad = ctx.get_data "weightNeedsGrad" :?> bool
        let count = rows.shape[0]
        let fp32 = rows.dtype = torch.ScalarType.Float32
        let rowGradient = if rowsNeedGrad then torch.empty_like rows else null
        let weightGradient =
            if weightNeedsGrad then torch.zeros(weight.shape, dtype = torch.float32, device = weight.device) else null
        // Compute-dtype partial weight gradients and their fp32 copy, reused by every chunk.
        let part, wide =
            if weightNeedsGrad && not fp32 then torch.empty_like weight, torch.empty_like weightGradient else null, null
        let buffers = ChunkBuffers.Create(min chunk (max 1L count), weight)
        let gradient = outputGradient.to_type torch.ScalarType.Float32
        let mutable start = 0L
        while start < count do
            use _ = torch.NewDisposeScope()
            let length = min chunk (count - start)
            let chunkRows = rows.narrow(0L, start, length)
            let logits = buffers.LogitsOf(chunkRows, weight) // (n, V) fp32
            // softmax = exp(logits - logsumexp), in place; minus 1 at the target; times the output gradient.
            let probabilities = logits.sub_(logSumExp.narrow(0L, start, length).unsqueeze 1L).exp_()
            let index = targets.narrow(0L, start, length).unsqueeze 1L
            probabilities.scatter_add_(1L, index, torch.full(length, 1L, -1.0f, dtype = torch.float32, device = rows.device)) |> ignore
            let logitsGradient = probabilities.mul_ gradient // (n, V) fp32
            let logitsGradient =
                if fp32 then logitsGradient
                else
                    let narrow = buffers.Narrow.narrow(0L, 0L, length)
                    narrow.copy_ logitsGradient
            if rowsNeedGrad then
                rowGradient.narrow(0L, start, length).addmm_(logitsGradient, weight, beta = 0.0f, alpha = 1.0f) |> ignore
            if weightNeedsGrad then
                if fp32 then
                    weightGradient.addmm_(logitsGradient.t (), chunkRows) |> ignore
                else
                    part.addmm_(logitsGradient.t (), chunkRows, beta = 0.0f, alpha = 1.0f) |> ignore // (V, C), compute dtype
                    wide.copy_ part |> ignore
                    weightGradient.add_ wide |> ignore
            start <- start + length
        let rowGradient = if rowsNeedGrad then scope.MoveToOuter rowGradient else null
        let weightGradient =
            if not weightNeedsGrad then null
            elif fp32 then scope.MoveToOuter weightGradient
            else scope.MoveToOuter(weightGradient.to_type weight.dtype)
        // One entry per argument of forward: the rows, the weight, none for the targets and the chunk size.
        List<torch.Tensor>([| rowGradient; weightGradient; null; null |])

/// The causal language-modelling loss of Loss.causalLmSum computed from the final hidden states and the
/// LM head's weight in chunks of positions, without the B x T x V logits: memory for the logits is
/// chunk x V instead of B x T x V, in the forward and in the backward alike.
[<RequireQualifiedAccess>]
module ChunkedLoss =

    /// Loss.causalLmSum (linear(hidden, weight)) labels, computed chunkSize predicted positions at a time.
    /// hidden (B, T, C) are the final hidden states (after the final norm), weight (V, C) the LM head's
    /// (lm_head.weight, or the token embedding of a tied head; no family of the library has a head bias,
    /// logit scaling or soft-capping), both in the model's compute dtype; labels (B, T) int64 as
    /// Loss.causalLmSum takes them: position t predicts labels[:, t + 1], -100 skips a position. Only the
    /// positions with a target are computed; each chunk's logits are computed in the compute dtype and
    /// upcast to fp32 for the loss, as the full path does, and the backward recomputes them chunk by chunk
    /// (a custom autograd function), so no tensor of B x T x V elements exists at any time: one chunkSize x V
    /// fp32 buffer (the logits, then in place their softmax and its gradient) and, for a bf16/fp16 model,
    /// one in the compute dtype, each allocated once per forward and per backward and reused by every
    /// chunk. The weight's gradient is accumulated over the chunks in fp32 (one V x C buffer). Returns a fresh 0-dim fp32 tensor carrying the graph
    /// to hidden and weight, 0 when nothing is predicted; it equals Loss.causalLmSum on the full logits to
    /// float rounding, and so do the gradients. Raises ArgumentException for chunkSize < 1 or shapes that
    /// disagree.
    let causalLmSum (chunkSize: int) (hidden: torch.Tensor) (weight: torch.Tensor) (labels: torch.Tensor) : torch.Tensor =
        TorchRuntime.ensure ()
        if chunkSize < 1 then
            raise (ArgumentOutOfRangeException(nameof chunkSize, chunkSize, "the chunk size must be at least 1 position"))
        if hidden.dim () <> 3L then
            raise (ArgumentException(sprintf "hidden must be (B, T, C), got shape %A." hidden.shape, "hidden"))
        if weight.dim () <> 2L || weight.shape[1] <> hidden.shape[2] then
            raise (ArgumentException(sprintf "weight must be (V, C) with C = %d, got shape %A." hidden.shape[2] weight.shape, "weight"))
        if weight.dtype <> hidden.dtype then
            raise (ArgumentException(sprintf "hidden (%A) and weight (%A) must have one dtype." hidden.dtype weight.dtype, "weight"))
        if labels.dim () <> 2L || labels.dtype <> torch.ScalarType.Int64 then
            raise (ArgumentException(sprintf "labels must be (B, T) int64, got shape %A (%A)." labels.shape labels.dtype, "labels"))
        if labels.shape[0] <> hidden.shape[0] || labels.shape[1] <> hidden.shape[1] then
            raise (ArgumentException(sprintf "hidden %A and labels %A disagree on (B, T)." hidden.shape labels.shape, "labels"))
        use scope = torch.NewDisposeScope()
        let batch, time, width = hidden.shape[0], hidden.shape[1], hidden.shape[2]
        let targets = (Loss.shiftedTargets labels).``to`` hidden.device // (B*T)
        let predicted = targets.ne(torch.tensor Loss.IgnoreIndex).nonzero().squeeze 1L // (N)
        // The rows of the predicted positions only: index_select's backward scatters their gradient back
        // into a (B*T, C) zero gradient of hidden.
        let rows = hidden.reshape(batch * time, width).index_select(0L, predicted) // (N, C)
        let rowTargets = targets.index_select(0L, predicted) // (N)
        let sum = ChunkedCrossEntropy.apply [| box rows; box weight; box rowTargets; box (int64 chunkSize) |]
        scope.MoveToOuter sum
