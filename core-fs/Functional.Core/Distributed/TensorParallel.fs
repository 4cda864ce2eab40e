namespace Functional.Distributed

open System
open System.Collections.Generic
open TorchSharp
open Functional
open Functional.Runtime
open Functional.Models

/// Megatron's f: the identity in forward; in backward the gradient is summed over the tensor-parallel
/// group, since every rank's column-parallel projections read the same input and each contributes its
/// part of the input's gradient. Arguments: the input and the group (an ICommunicator).
type private CopyToTensorRegion() =
    inherit torch.autograd.SingleTensorFunction<CopyToTensorRegion>()

    /// The node's name in the autograd graph.
    override _.Name = "CopyToTensorParallelRegionBackward"

    override _.forward(ctx, args) =
        let x = args[0] :?> torch.Tensor
        ctx.save_data("group", args[1])
        x.clone ()

    override _.backward(ctx, gradient) =
        let group = ctx.get_data "group" :?> ICommunicator
        let summed = gradient.contiguous().clone ()
        group.AllReduce summed
        List<torch.Tensor>([| summed; null |])

/// Megatron's g: the sum over the tensor-parallel group in forward (the row-parallel projection's partial
/// outputs become the whole output on every rank); the identity in backward, since each rank's partial
/// output enters the sum once. Arguments: the partial output and the group (an ICommunicator).
type private ReduceFromTensorRegion() =
    inherit torch.autograd.SingleTensorFunction<ReduceFromTensorRegion>()

    /// The node's name in the autograd graph.
    override _.Name = "ReduceFromTensorParallelRegionBackward"

    override _.forward(_, args) =
        let x = args[0] :?> torch.Tensor
        let group = args[1] :?> ICommunicator
        let summed = x.contiguous().clone ()
        group.AllReduce summed
        summed

    override _.backward(_, gradient) = List<torch.Tensor>([| gradient.clone (); null |])

/// Tensor parallelism in Megatron's layout: a column-parallel projection keeps a block of output features
/// (its weight's rows), a row-parallel one a block of input features (its weight's columns); between them
/// nothing is exchanged, and one all-reduce after the row-parallel projection (g) joins the block's
/// output, with its mirror (f) before the column-parallel ones in backward. The all-reduces run on the
/// group's communicator: CPU float32/float64 tensors with the MPI communicator for now.
[<RequireQualifiedAccess>]
module TensorParallel =

    /// f: x unchanged in forward; its gradient summed over the group in backward. With a group of one
    /// process, a fresh handle to x.
    let copyToRegion (group: ICommunicator) (x: torch.Tensor) : torch.Tensor =
        if group.Size = 1 then x.alias () else CopyToTensorRegion.apply [| box x; box group |]

    /// g: x summed over the group in forward (every rank gets the sum); the gradient unchanged in
    /// backward. With a group of one process, a fresh handle to x.
    let reduceFromRegion (group: ICommunicator) (x: torch.Tensor) : torch.Tensor =
        if group.Size = 1 then x.alias () else ReduceFromTensorRegion.apply [| box x; box group |]

    /// The block [rank * n / size, (rank + 1) * n / size) of the n indices along a dimension of extent n;
    /// n must be a multiple of size (raises ArgumentException naming what otherwise).
    let block (what: string) (extent: int64) (rank: int) (size: int) : int64 * int64 =
        if size < 1 || rank < 0 || rank >= size then
            invalidArg (nameof rank) (sprintf "expected a rank below the group's %d processes, got %d" size rank)
        if extent % int64 size <> 0L then
            invalidArg what (sprintf "%s (%d) must be a multiple of the tensor-parallel degree %d" what extent size)
        let length = extent / int64 size
        int64 rank * length, length

    /// A column-parallel projection's weight: rank's block of the output features (rows) of weight
    /// (out, in) -> (out / size, in), a compact copy. A bias (out) splits the same way (dimension 0).
    let columnShard (weight: torch.Tensor) (rank: int) (size: int) : torch.Tensor =
        let start, length = block "the output features" weight.shape[0] rank size
        use part = weight.narrow(0L, start, length)
        part.contiguous().clone ()

    /// A row-parallel projection's weight: rank's block of the input features (columns) of weight
    /// (out, in) -> (out, in / size), a compact copy.
    let rowShard (weight: torch.Tensor) (rank: int) (size: int) : torch.Tensor =
        let start, length = block "the input features" weight.shape[1] rank size
        use part = weight.narrow(1L, start, length)
        part.contiguous().clone ()

    /// The query heads and key/value heads a rank of a group of size keeps, as Megatron divides them:
    /// heads / size query heads from rank * heads / size; key/value heads split the same way when there
    /// are at least size of them, and otherwise replicated, each rank keeping the one key/value head its
    /// query heads read (grouped-query attention with fewer key/value heads than ranks). Returns (first
    /// query head, query heads, first key/value head, key/value heads).
    let attentionHeads (heads: int) (kvHeads: int) (rank: int) (size: int) : int * int * int * int =
        let qStart, qCount = block "the attention heads" (int64 heads) rank size
        if heads % kvHeads <> 0 then
            invalidArg (nameof kvHeads) (sprintf "the attention heads (%d) must be a multiple of the key/value heads (%d)" heads kvHeads)
        if kvHeads >= size then
            let kvStart, kvCount = block "the key/value heads" (int64 kvHeads) rank size
            int qStart, int qCount, int kvStart, int kvCount
        else
            if size % kvHeads <> 0 then
                invalidArg (nameof kvHeads) (sprintf "with fewer key/value heads (%d) than ranks (%d) the ranks must be a multiple of them" kvHeads size)
            let perKv = heads / kvHeads
            int qStart, int qCount, int qStart / perKv, 1

/// A self-check of tensor parallelism on a communicator, for `mpirun -np N`: a LLaMA-style SwiGLU MLP
/// (gate and up projections column-parallel, down row-parallel, SiLU between) split over all processes
/// must give every process the output and input gradient of the whole MLP, and each process's weight
/// gradients must be its blocks of the whole MLP's.
[<RequireQualifiedAccess>]
module TensorParallelCheck =

    /// The largest absolute difference of two tensors, as a float.
    let private difference (a: torch.Tensor) (b: torch.Tensor) =
        use d = (a - b).abs().max ()
        d.item<float> ()

    /// Runs the check over group (every process of it calls this); returns (passed, line).
    let check (group: ICommunicator) : bool * string =
        TorchRuntime.ensure ()
        use _ = torch.NewDisposeScope()
        let r, n = group.Rank, group.Size
        let hidden, inner, rows = 8L, 12L * int64 n, 6L
        use generator = new torch.Generator(7UL)
        let draw (shape: int64[]) = torch.randn(shape, dtype = torch.float64, generator = generator)
        let x0, gate0, up0, down0, upstream = draw [| rows; hidden |], draw [| inner; hidden |], draw [| inner; hidden |], draw [| hidden; inner |], draw [| rows; hidden |]
        let mlp (x: torch.Tensor) (gate: torch.Tensor) (up: torch.Tensor) (down: torch.Tensor) =
            torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, gate)) * torch.nn.functional.linear(x, up), down)
        // The whole MLP, on every process.
        let leaf (t: torch.Tensor) = t.detach().clone().requires_grad_ true
        let x, gate, up, down = leaf x0, leaf gate0, leaf up0, leaf down0
        let y = mlp x gate up down
        torch.autograd.backward([| y |], [| upstream |])
        // This process's part.
        let xs = leaf x0
        let gates = leaf (TensorParallel.columnShard gate0 r n)
        let ups = leaf (TensorParallel.columnShard up0 r n)
        let downs = leaf (TensorParallel.rowShard down0 r n)
        let entered = TensorParallel.copyToRegion group xs
        let partial = mlp entered gates ups downs
        let ys = TensorParallel.reduceFromRegion group partial
        torch.autograd.backward([| ys |], [| upstream |])
        let worst =
            [ "output", difference ys y
              "input gradient", difference xs.grad x.grad
              "gate gradient", difference gates.grad (TensorParallel.columnShard gate.grad r n)
              "up gradient", difference ups.grad (TensorParallel.columnShard up.grad r n)
              "down gradient", difference downs.grad (TensorParallel.rowShard down.grad r n) ]
        let failures = worst |> List.filter (fun (_, d) -> not (d <= 1e-10))
        let largest = worst |> List.map snd |> List.max
        let status =
            if failures.IsEmpty then sprintf "ok (SwiGLU MLP over %d processes: output and gradients within %.1e of the whole MLP)" n largest
            else "FAILED: " + String.Join("; ", failures |> List.map (fun (what, d) -> sprintf "%s differs by %g" what d))
        failures.IsEmpty, sprintf "tensor-parallel-check rank %d of %d: %s" r n status

/// The vocabulary-parallel cross-entropy's autograd function: arguments the rank's logits (N, V / size)
/// fp32 of the positions with a target, their targets (N) int64 in the whole vocabulary, the rank's first
/// vocabulary index (int64) and the group. Returns the summed cross-entropy (0-dim fp32), the same on
/// every rank. The whole logits never exist: each rank exchanges N maxima, N exponential sums and N
/// target logits.
type private VocabParallelCrossEntropy() =
    inherit torch.autograd.SingleTensorFunction<VocabParallelCrossEntropy>()

    /// The node's name in the autograd graph.
    override _.Name = "VocabParallelCrossEntropyBackward"

    override _.forward(ctx, args) =
        let logits = args[0] :?> torch.Tensor
        let targets = args[1] :?> torch.Tensor
        let start = args[2] :?> int64
        let group = args[3] :?> ICommunicator
        use scope = torch.NewDisposeScope()
        let n, width = logits.shape[0], logits.shape[1]
        // The largest logit of each row over the whole vocabulary: every rank's row maxima, gathered.
        let localMax = logits.amax([| 1L |]).contiguous () // (N)
        let maxima = torch.empty([| int64 group.Size * n |], dtype = logits.dtype, device = logits.device)
        group.AllGather(localMax, maxima)
        let largest = maxima.view(int64 group.Size, n).amax([| 0L |]) // (N)
        let sumExp = (logits - largest.unsqueeze 1).exp_().sum(1L).contiguous () // (N)
        group.AllReduce sumExp
        let local = targets - start
        let inRange = torch.logical_and(local.ge(0L.ToScalar()), local.lt(width.ToScalar()))
        let index = local.clamp(0L.ToScalar(), (width - 1L).ToScalar()).unsqueeze 1
        let targetLogit = (logits.gather(1L, index).squeeze(1L) * inRange.to_type logits.dtype).contiguous () // (N)
        group.AllReduce targetLogit
        let logSumExp = sumExp.log() + largest // (N)
        let total = (logSumExp - targetLogit).sum ()
        ctx.save_for_backward(List<torch.Tensor>([| logits; scope.MoveToOuter logSumExp; scope.MoveToOuter index; scope.MoveToOuter inRange |])) |> ignore
        scope.MoveToOuter total

    override _.backward(ctx, gradient) =
        use scope = torch.NewDisposeScope()
        let saved = ctx.get_saved_variables ()
        let logits, logSumExp, index, inRange = saved[0], saved[1], saved[2], saved[3]
        // d loss / d logits = softmax - onehot(target), the softmax of the whole vocabulary on the rank's block.
        let probabilities = (logits - logSumExp.unsqueeze 1).exp_ ()
        let hit = inRange.to_type(logits.dtype).neg().unsqueeze 1
        probabilities.scatter_add_(1L, index, hit) |> ignore
        let result = scope.MoveToOuter(probabilities.mul_ gradient)
        List<torch.Tensor>([| result; null; null; null |])

/// A vocabulary split over a tensor-parallel group (Megatron's VocabParallelEmbedding, column-parallel
/// LM head and vocabulary-parallel cross-entropy): rank r holds the rows [r V / size, (r + 1) V / size)
/// of the token embedding and of the head, so no rank holds, or computes, the whole vocabulary's logits.
[<RequireQualifiedAccess>]
module VocabParallel =

    /// The embeddings of ids (B, T) through the rank's rows (an Embedding of V / size rows, the block from
    /// start): the rank looks up the ids of its block, zeros for the others, and the ranks' lookups are
    /// summed (g): every rank gets the whole embedding; in backward each rank's rows get the gradient of
    /// their ids.
    let embed (group: ICommunicator) (start: int64) (embedding: TorchSharp.Modules.Embedding) (ids: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let rows = embedding.weight.shape[0]
        let local = ids - start
        let outside = torch.logical_or(local.lt(0L.ToScalar()), local.ge(rows.ToScalar()))
        let looked = embedding.forward(local.masked_fill(outside, 0L))
        let zeroed = looked.masked_fill(outside.unsqueeze -1, 0.0)
        scope.MoveToOuter(TensorParallel.reduceFromRegion group zeroed)

    /// Loss.causalLmSum over the rank's logits (B, T, V / size) of the vocabulary block from start: position
    /// t predicts labels[:, t + 1], -100 skips a position; the sum of the token losses, a 0-dim fp32 tensor
    /// carrying the graph, the same on every rank, computed without the whole logits.
    let causalLmSum (group: ICommunicator) (start: int64) (logits: torch.Tensor) (labels: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let T = logits.shape[1]
        let shifted = logits.narrow(1L, 0L, T - 1L).reshape(-1L, logits.shape[2]) // (B (T - 1), V / size)
        let targets = labels.narrow(1L, 1L, T - 1L).reshape(-1L) // (B (T - 1))
        let keep = targets.ne((-100L).ToScalar()).nonzero().squeeze 1
        let rows = shifted.index_select(0L, keep).to_type torch.float32
        let kept = targets.index_select(0L, keep)
        scope.MoveToOuter(VocabParallelCrossEntropy.apply [| box rows; box kept; box start; box group |])

/// A rank's part of a LLaMA-family model (LLaMA, Qwen2, Qwen3, Mistral) under tensor parallelism, in
/// Megatron's layout: per layer, q/k/v hold the rank's query and key/value heads (rows of the weights,
/// biases alike), o_proj the matching columns; gate_proj and up_proj a block of the intermediate
/// features, down_proj the same columns; f before the attention and the MLP, g after them. The token
/// embedding and the LM head hold the rank's block of the vocabulary (VocabParallel: the rank's logits
/// are that block's, and VocabParallel.causalLmSum is the loss); the norms (Qwen3's q_norm and k_norm
/// included) stay whole on every rank. Dropout stays off: the ranks would draw different masks for the
/// same positions.
[<RequireQualifiedAccess>]
module TensorParallelLlama =

    /// The tensor-parallel region of group: f before, g after (TensorParallel.copyToRegion and
    /// reduceFromRegion).
    let region (group: ICommunicator) : ParallelRegion =
        { Enter = TensorParallel.copyToRegion group
          Leave = TensorParallel.reduceFromRegion group }

    /// What a rank of a group of size keeps of config: its heads, key/value heads and block of the
    /// intermediate size (head_dim unchanged). Raises InvalidInputException naming
    /// {tensor_parallel_degree} when the heads, the key/value heads or the intermediate size do not divide
    /// by it, or when the model has a bias after a row-parallel projection or dropout.
    let localConfig (config: LlamaConfig) (rank: int) (size: int) : LlamaConfig =
        let refuse problem = InvalidInput.setting "tensor_parallel_degree" problem
        if config.NumAttentionHeads % size <> 0 then
            refuse (sprintf "(%d) must divide the %d attention heads" size config.NumAttentionHeads)
        if config.NumKeyValueHeads >= size && config.NumKeyValueHeads % size <> 0 then
            refuse (sprintf "(%d) must divide the %d key/value heads" size config.NumKeyValueHeads)
        if config.NumKeyValueHeads < size && size % config.NumKeyValueHeads <> 0 then
            refuse (sprintf "(%d) must be a multiple of the %d key/value heads when there are fewer of them than processes (each is then replicated)" size config.NumKeyValueHeads)
        if config.IntermediateSize % size <> 0 then
            refuse (sprintf "(%d) must divide the intermediate size %d" size config.IntermediateSize)
        if config.VocabSize % size <> 0 then
            refuse (sprintf "(%d) must divide the vocabulary of %d tokens (resize the embeddings to a multiple of it: --resize-token-embeddings-to-multiple-of)" size config.VocabSize)
        if config.AttentionBias || config.Variant.OutputBias || config.MlpBias then
            refuse "is not supported yet for models with a bias on o_proj or down_proj (attention_bias, mlp_bias)"
        if config.AttentionDropout <> 0.0 then
            refuse (sprintf "needs attention_dropout 0 (the ranks would drop different probabilities), found %g" config.AttentionDropout)
        let _, heads, _, kvHeads = TensorParallel.attentionHeads config.NumAttentionHeads config.NumKeyValueHeads rank size
        { config with
            NumAttentionHeads = heads
            NumKeyValueHeads = kvHeads
            IntermediateSize = config.IntermediateSize / size
            VocabSize = config.VocabSize / size
            // The padding row lies in one rank's block only; it matters for initialization, not here.
            PadTokenId = None }

    /// The first vocabulary index of rank's block.
    let vocabStart (config: LlamaConfig) (rank: int) (size: int) : int64 = int64 rank * int64 (config.VocabSize / size)

    /// The dimension along which a parameter, by its name, is split over the ranks into equal blocks, rank r
    /// holding block r: rows (0) of q/k/v (weights and biases: the rank's heads), of gate_proj and up_proj,
    /// of the token embedding and the LM head (the rank's vocabulary); columns (1) of o_proj and down_proj;
    /// None for the parameters every rank holds whole (the norms).
    let splitDimension (name: string) : int64 option =
        let endsWith (suffix: string) = name.EndsWith(suffix, StringComparison.Ordinal)
        if [ ".self_attn.q_proj."; ".self_attn.k_proj."; ".self_attn.v_proj." ] |> List.exists (fun p -> name.Contains(p, StringComparison.Ordinal)) then Some 0L
        elif endsWith ".mlp.gate_proj.weight" || endsWith ".mlp.up_proj.weight" then Some 0L
        elif endsWith "embed_tokens.weight" || name = "lm_head.weight" then Some 0L
        elif endsWith ".self_attn.o_proj.weight" || endsWith ".mlp.down_proj.weight" then Some 1L
        else None

    /// The dimension a LoRA factor of a split projection is split along, by its PEFT key
    /// ("base_model.model.MODULE.lora_A.weight" or "...lora_B.weight"): a column-parallel projection's B by
    /// rows (0) with its output, a row-parallel projection's A by columns (1) with its input; the other
    /// factor is replicated (None), as is every factor of a projection that is not split.
    let loraSplitDimension (key: string) : int64 option =
        let factor, suffix =
            if key.EndsWith(".lora_A.weight", StringComparison.Ordinal) then 'A', ".lora_A.weight"
            elif key.EndsWith(".lora_B.weight", StringComparison.Ordinal) then 'B', ".lora_B.weight"
            else ' ', ""
        if factor = ' ' then None
        else
            let moduleName = key.Substring(0, key.Length - suffix.Length)
            match splitDimension (moduleName + ".weight"), factor with
            | Some 0L, 'B' -> Some 0L
            | Some 1L, 'A' -> Some 1L
            | _ -> None

    /// The split dimension of a parameter or a LoRA factor by its name (splitDimension, loraSplitDimension).
    let dimensionOf (name: string) : int64 option =
        if name.EndsWith(".lora_A.weight", StringComparison.Ordinal) || name.EndsWith(".lora_B.weight", StringComparison.Ordinal) then loraSplitDimension name
        else splitDimension name

    /// The ranks that hold each key/value head: 1 when the key/value heads divide over the ranks, else
    /// size / key/value heads (Megatron's replication: consecutive ranks share one).
    let kvReplicas (config: LlamaConfig) (size: int) : int =
        if config.NumKeyValueHeads >= size then 1 else size / config.NumKeyValueHeads

    let private isKeyValue (name: string) =
        name.Contains(".self_attn.k_proj.", StringComparison.Ordinal) || name.Contains(".self_attn.v_proj.", StringComparison.Ordinal)

    /// Whether a parameter is a key/value projection replicated over several ranks (kvReplicas > 1).
    let private replicated (config: LlamaConfig) (size: int) (name: string) = isKeyValue name && kvReplicas config size > 1

    /// The weight of a parameter's squared gradient in the rank's share of the whole model's squared norm
    /// before the sum over the group: 1 / kvReplicas for a replicated key/value projection (its replicas
    /// hold the same summed gradient, which counts once), 1 otherwise.
    let normWeight (config: LlamaConfig) (size: int) (name: string) : float =
        match dimensionOf name with
        | None -> 1.0 / float size
        | Some _ when replicated config size name -> 1.0 / float (kvReplicas config size)
        | Some _ -> 1.0

    /// The rank's block of a whole parameter, by its name (splitDimension), a compact copy. The blocks are
    /// those of shard: with as many key/value heads as ranks or more, the r-th equal block of q's rows holds
    /// the rank's query heads and of k's and v's its key/value heads; with fewer, k and v hold the one
    /// key/value head the rank's query heads read (rank / kvReplicas).
    let private part' (config: LlamaConfig) (rank: int) (size: int) (name: string) (whole: torch.Tensor) : torch.Tensor =
        match dimensionOf name with
        | Some dimension when replicated config size name ->
            let length = whole.shape[int dimension] / int64 config.NumKeyValueHeads
            use block = whole.narrow(dimension, int64 (rank / kvReplicas config size) * length, length)
            block.contiguous().clone ()
        | Some dimension ->
            let length = whole.shape[int dimension] / int64 size
            use block = whole.narrow(dimension, int64 rank * length, length)
            block.contiguous().clone ()
        | None -> whole.contiguous().clone ()

    /// The parameters inside the region that every rank holds whole (Qwen3's q_norm and k_norm weights):
    /// each rank's gradient of them is its heads' part of the whole gradient.
    let private isPartialGradient (name: string) =
        name.EndsWith(".self_attn.q_norm.weight", StringComparison.Ordinal) || name.EndsWith(".self_attn.k_norm.weight", StringComparison.Ordinal)

    /// This rank's part of a whole model (built by Llama.build or loaded) of config, over group: a new
    /// model with the rank's blocks copied from whole's parameters (named as HF names them, with the
    /// blocks' shapes), whose forward gives the logits of the rank's vocabulary block (B, T, V / size):
    /// take the loss with VocabParallel.causalLmSum. Every rank of group calls it with the same whole model.
    let rec shard (group: ICommunicator) (config: LlamaConfig) (whole: CausalLmHead) : CausalLmHead =
        let local = localConfig config group.Rank group.Size
        let start = vocabStart config group.Rank group.Size
        let model = Llama.buildIn (region group) (VocabParallel.embed group start) local 0L
        model.HeadInput <- TensorParallel.copyToRegion group
        copyInto group config whole model
        model

    /// Copies this rank's blocks of whole's parameters into part's (made by shard of the same config):
    /// after whole was changed, e.g. loaded from a checkpoint.
    and copyInto (group: ICommunicator) (config: LlamaConfig) (whole: CausalLmHead) (part: CausalLmHead) =
        let source = dict [ for name, p in whole.named_parameters () -> name, p ]
        use _ = torch.no_grad ()
        for name, p in part.named_parameters () do
            match source.TryGetValue name with
            | true, w ->
                use block = part' config group.Rank group.Size name w
                if block.shape <> p.shape then
                    failwithf "tensor-parallel part of %s: expected %A, made %A" name p.shape block.shape
                p.copy_ block |> ignore
            | _ -> failwithf "the whole model has no parameter %s" name

    /// Sums over group the gradients that are partial on every rank (Qwen3's q_norm and k_norm, see
    /// shard), and a replicated key/value head's over the ranks that share it (each holds its query heads'
    /// part): call after backward, before clipping and the optimizer. Other gradients are already the
    /// whole model's (replicated parameters) or the rank's block of it (split ones).
    let rec reducePartialGradients (group: ICommunicator) (config: LlamaConfig) (model: CausalLmHead) =
        if group.Size > 1 then
            use _ = torch.no_grad ()
            let replicas = kvReplicas config group.Size
            for name, p in model.named_parameters () do
                if isPartialGradient name && not (isNull p.grad) then
                    group.AllReduce p.grad
                elif replicated config group.Size name && not (isNull p.grad) then
                    sumOverSharers group config replicas p.grad

    /// Sums a replicated key/value head's gradient (rows of k or v, or of their LoRA B) over the ranks that
    /// share the head: every rank places it at its head's rows of a buffer of all the heads, so the sum over
    /// the group adds exactly those ranks.
    and private sumOverSharers (group: ICommunicator) (config: LlamaConfig) (replicas: int) (grad: torch.Tensor) =
        let rows = grad.shape[0]
        use all = torch.zeros([| yield rows * int64 config.NumKeyValueHeads; yield! grad.shape[1..] |], dtype = grad.dtype, device = grad.device)
        let head = int64 (group.Rank / replicas)
        (use mine = all.narrow(0L, head * rows, rows) in mine.copy_ grad |> ignore)
        group.AllReduce all
        use summed = all.narrow(0L, head * rows, rows)
        grad.copy_ summed |> ignore

    /// Sums over group the gradients of LoRA factors that are partial on every rank (loraSplitDimension):
    /// a replicated factor (A of a column-parallel projection, B of a row-parallel one) over the whole
    /// group, a replicated key/value head's B over the ranks that share it. Call with the rank's adapters
    /// (PEFT key, parameter) after the window's reduction, before clipping.
    let reduceLoraGradients (group: ICommunicator) (config: LlamaConfig) (factors: (string * TorchSharp.Modules.Parameter) list) =
        if group.Size > 1 then
            use _ = torch.no_grad ()
            for key, p in factors do
                if not (isNull p.grad) then
                    match loraSplitDimension key with
                    | None -> group.AllReduce p.grad
                    | Some _ when replicated config group.Size key -> sumOverSharers group config (kvReplicas config group.Size) p.grad
                    | Some _ -> ()

    /// The whole model's parameters from every rank's part (the inverse of shard), in the part's
    /// named_parameters order: split parameters are all-gathered over group and joined along their
    /// dimension; whole ones are taken as they are. Every rank of group calls it and gets every tensor (for
    /// writing final/ or a checkpoint in the HF layout, or resharding to another degree).
    let rec gather (group: ICommunicator) (config: LlamaConfig) (model: CausalLmHead) : (string * torch.Tensor) list =
        use _ = torch.no_grad ()
        [ for name, p in model.named_parameters () -> name, join group config name p ]

    /// The whole tensor of a parameter named name from every rank's block (an all-gather over group,
    /// joined along splitDimension name), or a copy of local for a parameter every rank holds whole.
    /// Every rank calls it, in the same order.
    and join (group: ICommunicator) (config: LlamaConfig) (name: string) (local: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let joined =
            match dimensionOf name with
            | Some dimension when group.Size > 1 ->
                let block = local.detach().contiguous ()
                let blocks = torch.empty([| yield int64 group.Size; yield! local.shape |], dtype = local.dtype, device = local.device)
                group.AllGather(block, blocks)
                // A replicated key/value head: the first of the ranks that share it gives it.
                let blocks =
                    if replicated config group.Size name then
                        let every = torch.arange(0L, int64 group.Size, int64 (kvReplicas config group.Size), dtype = torch.int64, device = local.device)
                        blocks.index_select(0L, every)
                    else blocks
                if dimension = 0L then blocks.reshape([| yield -1L; yield! local.shape[1..] |])
                else blocks.transpose(0L, 1L).reshape(local.shape[0], -1L)
            | _ -> local.detach ()
        scope.MoveToOuter(joined.contiguous().clone ()).DetachFromDisposeScope()

    /// The optimizer tensors of a checkpoint (TrainingCheckpoint.optimizerTensors' layout: "PARAMETER:STATE"
    /// tensors shaped as the parameter, and counters) from this rank's: each split parameter's state
    /// gathered whole, so the checkpoint is the one of a single process. Every rank calls it.
    let gatherOptimizerTensors (group: ICommunicator) (config: LlamaConfig) (tensors: (string * torch.Tensor) list) : (string * torch.Tensor) list =
        [ for key, t in tensors ->
              match key.IndexOf ':' with
              | -1 -> key, t
              | colon -> key, join group config (key.Substring(0, colon)) t ]

    /// This rank's blocks of a checkpoint's whole optimizer tensors (the inverse of
    /// gatherOptimizerTensors): what a tensor-parallel run resumes from, saved by any layout.
    let optimizerBlocks (config: LlamaConfig) (rank: int) (size: int) (stored: Map<string, torch.Tensor>) : Map<string, torch.Tensor> =
        stored
        |> Map.map (fun key t ->
            match key.IndexOf ':' with
            | -1 -> t
            | colon -> part' config rank size (key.Substring(0, colon)) t)

    /// The rank's block of a whole tensor named as model parameters are (for comparing gradients with
    /// the whole model's): see shard.
    let partOf (config: LlamaConfig) (rank: int) (size: int) (name: string) (whole: torch.Tensor) : torch.Tensor =
        part' config rank size name whole

/// A self-check of TensorParallelLlama on a communicator, for `mpirun -np N`: a small LLaMA and a small
/// Qwen3 (per-head q/k norms), each split over all processes, must give every process its block of the
/// whole model's logits (and no more), the whole model's loss (vocabulary-parallel cross-entropy) and
/// gradient norm, and each process's gradients must be its blocks of the whole model's.
[<RequireQualifiedAccess>]
module TensorParallelModelCheck =

    let private config (modelType: string) (tied: bool) (kvHeads: int) (size: int) =
        let json =
            sprintf
                """{"model_type": "%s", "vocab_size": %d, "hidden_size": 16, "intermediate_size": %d, "num_hidden_layers": 2,
                    "num_attention_heads": %d, "num_key_value_heads": %d, "head_dim": 4, "max_position_embeddings": 32,
                    "tie_word_embeddings": %b, "initializer_range": 0.2}"""
                modelType (10 * size) (12 * size) (2 * size) kvHeads tied
        match ModelConfig.parse "tensor-parallel check" json with
        | ModelConfig.Llama c -> c
        | other -> failwithf "expected a LLaMA-family config, got %A" other

    let private relative (a: torch.Tensor) (b: torch.Tensor) =
        use d = (a - b).abs().max ()
        use m = b.abs().max ()
        d.item<float32> () / max 1e-12f (m.item<float32> ()) |> float

    /// Checks one family variant; returns the failures and the largest relative difference.
    let private checkVariant (group: ICommunicator) (modelType: string, tied: bool, kvHeads: int) : string list * float =
        use _ = torch.NewDisposeScope()
        let c = config modelType tied (if kvHeads = 0 then group.Size else kvHeads) group.Size
        let modelType = (if tied then modelType + " (tied)" else modelType) + (if kvHeads = 0 then "" else sprintf " (%d key/value head)" kvHeads)
        let whole = Llama.build c 11L
        let part = TensorParallelLlama.shard group c whole
        use generator = new torch.Generator(5UL)
        let ids = torch.randint(0L, int64 c.VocabSize, [| 2L; 7L |], generator = generator, dtype = torch.int64)
        let wholeLogits = whole.forward ids
        let wholeLoss = Loss.causalLmSum wholeLogits ids
        wholeLoss.backward ()
        let start = TensorParallelLlama.vocabStart c group.Rank group.Size
        let partLogits = part.forward ids // (B, T, V / size): the rank's block only
        let partLoss = VocabParallel.causalLmSum group start partLogits ids
        partLoss.backward ()
        let blockOfWhole = wholeLogits.narrow(2L, start, partLogits.shape[2])
        TensorParallelLlama.reducePartialGradients group c part
        let wholeGrads = dict [ for name, p in whole.named_parameters () -> name, p.grad ]
        let gradientDifferences =
            [ for name, p in part.named_parameters () ->
                  use expected = TensorParallelLlama.partOf c group.Rank group.Size name wholeGrads[name]
                  name, relative p.grad expected ]
        // The gradient norm: split parameters' squares summed over the ranks, whole ones counted once.
        // Each gradient's squares weighted by normWeight: a block counts once, a replica 1 / its copies.
        let weightedSquares =
            part.named_parameters ()
            |> Seq.sumBy (fun (struct (name, p)) ->
                use s = p.grad.to_type(torch.float64).square().sum ()
                s.item<float> () * TensorParallelLlama.normWeight c group.Size name)
        let norm = sqrt (Communicator.sumFloat group weightedSquares)
        let wholeNorm =
            whole.parameters () |> Seq.sumBy (fun p -> use s = p.grad.to_type(torch.float64).square().sum () in s.item<float> ()) |> sqrt
        // Gathering the parts gives back the whole model's parameters, bit for bit.
        let gathered = TensorParallelLlama.gather group c part
        let wholeValues = dict [ for name, p in whole.named_parameters () -> name, p ]
        let gatherExact =
            gathered |> List.forall (fun (name, t) -> t.shape = wholeValues[name].shape && t.Equals(wholeValues[name].detach ()))
        let checks =
            [ yield "gathered parameters", (if gatherExact then 0.0 else 1.0)
              yield "logits width", (if partLogits.shape[2] = int64 (c.VocabSize / group.Size) then 0.0 else 1.0)
              yield "logits", relative partLogits blockOfWhole
              yield "loss", relative partLoss wholeLoss
              yield "gradient norm", abs (norm - wholeNorm) / wholeNorm
              yield! gradientDifferences ]
        let failures = [ for what, d in checks do if not (d <= 1e-5) then yield sprintf "%s %s differs by %g (relative)" modelType what d ]
        failures, checks |> List.map snd |> List.max

    /// Runs the check over group (every process of it calls this); returns (passed, line).
    let check (group: ICommunicator) : bool * string =
        TorchRuntime.ensure ()
        // 0 key/value heads: as many as the processes; 1: fewer than the processes, replicated.
        let results = [ for variant in [ "llama", false, 0; "qwen3", false, 0; "llama", true, 0; "qwen3", false, 1 ] -> checkVariant group variant ]
        let failures = results |> List.collect fst
        let largest = results |> List.map snd |> List.max
        let status =
            if failures.IsEmpty then
                sprintf "ok (LLaMA, Qwen3, a tied LLaMA and a Qwen3 of 1 key/value head split over %d processes, vocabulary included: the rank's logits block, loss, gradient norm and every gradient block within %.1e of the whole model, relative)" group.Size largest
            else "FAILED: " + String.Join("; ", failures)
        failures.IsEmpty, sprintf "tensor-parallel-model-check rank %d of %d: %s" group.Rank group.Size status

/// `--tensor-parallel-check`: the tensor-parallel checks over the processes of a launch.
[<RequireQualifiedAccess>]
module TensorParallelChecks =

    /// Checks this launch's processes (Communicator.fromEnvironment) as one tensor-parallel group made by
    /// ProcessGrid.groups (tensor degree = the world size): the group's ranks, then TensorParallelCheck and
    /// TensorParallelModelCheck on it. Prints the
    /// line, finalizes MPI, and returns 0 when it passed, 1 otherwise.
    let run () : int =
        let world = Communicator.fromEnvironment ()
        let passed, line =
            match world with
            | :? ISplittableCommunicator as splittable ->
                let groups = ProcessGrid.groups splittable world.Size 1
                let shape = groups.Tensor.Size = world.Size && groups.Tensor.Rank = world.Rank && groups.Data.Size = 1 && groups.Pipeline.Size = 1
                let mlpPassed, mlpLine = TensorParallelCheck.check groups.Tensor
                let modelPassed, modelLine = TensorParallelModelCheck.check groups.Tensor
                let passed, line = mlpPassed && modelPassed, mlpLine + "\n" + modelLine
                if shape then passed, line
                else false, sprintf "%s; FAILED: the groups are %d/%d/%d processes (tensor/pipeline/data), expected %d/1/1" line groups.Tensor.Size groups.Pipeline.Size groups.Data.Size world.Size
            | _ -> false, sprintf "tensor-parallel-check rank %d of %d: FAILED: the communicator cannot be split" world.Rank world.Size
        Communicator.finishCheck world (passed, line)
