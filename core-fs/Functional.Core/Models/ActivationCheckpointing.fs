namespace Functional.Models

open System
open System.Collections.Generic
open System.Diagnostics
open System.Runtime.InteropServices
open TorchSharp
open Functional.Runtime

// Activation checkpointing (HF's gradient_checkpointing, PaddleNLP's recompute) per transformer block,
// as torch.utils.checkpoint's reentrant variant: the forward keeps only each block's input, the backward
// re-runs the block with gradients on and backpropagates through that recomputation. Memory for the
// activations inside the blocks drops from O(layers * block internals) to O(layers * hidden state), for
// one extra forward of every block.

/// A model whose transformer blocks can run with activation checkpointing (HF's
/// gradient_checkpointing_enable / gradient_checkpointing_disable).
type IGradientCheckpointing =
    /// Whether forwards in training mode with gradients enabled keep only each block's input and recompute
    /// the block in backward. Eval mode, no_grad and the key/value-cache path always run blocks plainly.
    abstract GradientCheckpointing: bool with get, set

/// Calls around one checkpointed block's two runs, for parameters that exist only while the block runs
/// (ZeRO stage 3 gathers them from every process): before and after the forward, before the recomputation
/// in backward, and after its backward (when the parameters' gradients are complete).
[<NoEquality; NoComparison>]
type BlockHooks =
    { /// Before the forward (no graph is recorded).
      BeforeForward: unit -> unit
      /// After the forward, also when it failed.
      AfterForward: unit -> unit
      /// Before the recomputation in backward.
      BeforeBackward: unit -> unit
      /// After the recomputation's backward, also when it failed.
      AfterBackward: unit -> unit }

/// What the backward of one checkpointed block needs besides its saved tensors.
[<NoEquality; NoComparison>]
type private Recomputation =
    { /// The block: its hidden-state input first, then the extra tensors -> its output.
      Block: torch.Tensor[] -> torch.Tensor
      /// Whether the caller's hidden state requires a gradient (false when it was made to require one only
      /// so that the block's parameters get theirs).
      InputNeedsGrad: bool
      /// The number of extra tensors after the hidden state.
      Extras: int
      /// The calls around the block's runs.
      Hooks: BlockHooks }

/// The autograd function of one checkpointed block. Arguments: the hidden state, the extra tensors, the
/// random state before the block ran, the Recomputation. Saves the hidden state, the extras and the random
/// state; the block's inner activations are freed as soon as its forward returns.
type private CheckpointedBlock() =
    inherit torch.autograd.SingleTensorFunction<CheckpointedBlock>()

    /// The node's name in the autograd graph.
    override _.Name = "CheckpointedBlockBackward"

    /// Runs the block without recording a graph (apply has disabled gradients).
    override _.forward(ctx, args) =
        let recomputation = args[args.Length - 1] :?> Recomputation
        let tensors = args[.. args.Length - 2] |> Array.map (fun a -> a :?> torch.Tensor)
        ctx.save_for_backward(List<torch.Tensor>(tensors))
        ctx.save_data("recomputation", recomputation)
        use scope = torch.NewDisposeScope()
        let inputs = tensors[.. recomputation.Extras]
        recomputation.Hooks.BeforeForward()
        try
            scope.MoveToOuter(recomputation.Block inputs)
        finally
            recomputation.Hooks.AfterForward()

    /// Re-runs the block with gradients on a detached alias of its input, with the random state its forward
    /// saw (so dropout draws the same masks), and backpropagates the output gradient through it: the
    /// parameters' gradients accumulate into their existing p.grad in place (the nested backward runs with
    /// create_graph = false), the input's gradient is returned.
    override _.backward(ctx, outputGradient) =
        use scope = torch.NewDisposeScope()
        let recomputation = ctx.get_data "recomputation" :?> Recomputation
        let saved = ctx.get_saved_variables ()
        let input = saved[0].detach().requires_grad_(recomputation.InputNeedsGrad)
        let extras = [| for i in 1 .. recomputation.Extras -> saved[i] |]
        let randomState = saved[recomputation.Extras + 1]
        recomputation.Hooks.BeforeBackward()
        try
            let output =
                use _ = torch.enable_grad ()
                let current = torch.get_rng_state ()
                torch.set_rng_state randomState
                try
                    recomputation.Block(Array.append [| input |] extras)
                finally
                    torch.set_rng_state current
            if output.requires_grad then
                torch.autograd.backward([| output |], [| outputGradient |])
        finally
            recomputation.Hooks.AfterBackward()
        let inputGradient =
            match input.grad with
            | null -> null
            | g when recomputation.InputNeedsGrad -> scope.MoveToOuter g
            | _ -> null
        // One entry per argument of forward: the input's gradient, none for the extras, the random state
        // and the Recomputation.
        List<torch.Tensor>(Array.append [| inputGradient |] (Array.create (recomputation.Extras + 2) null))

/// The cost of one training step (forward, loss, backward) of a model, as ActivationCheckpointing.measure
/// sees it.
type StepCost =
    { /// Wall-clock seconds of the forward, the loss and the backward of a warm step.
      Seconds: float
      /// Growth of the process's resident memory from before the forward to after the loss, while the graph
      /// is alive: the activations kept for backward (plus the logits and allocator slack).
      RetainedBytes: int64 }

/// Running transformer blocks with activation checkpointing.
[<RequireQualifiedAccess>]
module ActivationCheckpointing =

    /// Runs a block with activation checkpointing when gradients are enabled, as torch.utils.checkpoint
    /// (use_reentrant, preserve_rng_state): the forward keeps only the inputs, and backward re-runs
    /// `forward inputs` with gradients and the CPU random state of the first run, so dropout draws the same
    /// masks and the gradients equal a plain run's. inputs: the hidden state (B, T, C) first, then extra
    /// tensors that need no gradient (LLaMA's rotary cos and sin); they are kept for the recomputation.
    /// blockModule: the module whose parameters forward uses; when the hidden state needs no gradient
    /// (frozen embeddings, only adapters train) but some of its parameters do, the block still runs
    /// through the checkpoint (on a detached input made to require a gradient, as HF's
    /// enable_input_require_grads), so those parameters get their gradients. Without gradients, or with
    /// nothing to differentiate, runs `forward inputs` plainly. Returns a fresh tensor. The random state
    /// preserved is the CPU generator's (TorchSharp exposes no CUDA generator state): on CUDA, dropout
    /// inside a checkpointed block draws new masks in the recomputation.
    let rec run (blockModule: torch.nn.Module) (forward: torch.Tensor[] -> torch.Tensor) (inputs: torch.Tensor[]) : torch.Tensor =
        runWith none blockModule forward inputs

    /// Calls that do nothing.
    and none: BlockHooks = { BeforeForward = ignore; AfterForward = ignore; BeforeBackward = ignore; AfterBackward = ignore }

    /// run with hooks called around the block's forward and around its recomputation and backward (ZeRO
    /// stage 3 gathers the block's parameters before each and frees them after). When the block runs
    /// plainly (no gradient), hooks.BeforeForward and hooks.AfterForward wrap that run.
    and runWith (hooks: BlockHooks) (blockModule: torch.nn.Module) (forward: torch.Tensor[] -> torch.Tensor) (inputs: torch.Tensor[]) : torch.Tensor =
        if inputs.Length = 0 then
            invalidArg "inputs" "expected the block's hidden state and any extra tensors, found no tensor"
        if inputs |> Array.skip 1 |> Array.exists (fun t -> t.requires_grad) then
            invalidArg "inputs" "extra tensors of a checkpointed block must not require gradients: they receive none"
        let hidden = inputs[0]
        let inputNeedsGrad = hidden.requires_grad
        let differentiable =
            torch.is_grad_enabled ()
            && (inputNeedsGrad || blockModule.parameters () |> Seq.exists (fun p -> p.requires_grad))
        if not differentiable then
            hooks.BeforeForward()
            try forward inputs finally hooks.AfterForward()
        else
            let recomputation = { Block = forward; InputNeedsGrad = inputNeedsGrad; Extras = inputs.Length - 1; Hooks = hooks }
            use detached = if inputNeedsGrad then null else hidden.detach().requires_grad_(true)
            let entry = if inputNeedsGrad then hidden else detached
            use randomState = torch.get_rng_state ()
            let args: obj[] =
                Array.concat [ [| box entry |]; inputs[1..] |> Array.map box; [| box randomState; box recomputation |] ]
            CheckpointedBlock.apply args

    /// Switches activation checkpointing on or off in every part of a model that supports it; raises
    /// ArgumentException when none does.
    let enable (model: torch.nn.Module) (enabled: bool) =
        let switches =
            [ for m in Seq.append [ model ] (model.modules ()) do
                  match box m with
                  | :? IGradientCheckpointing as s -> yield s
                  | _ -> () ]
            |> List.distinct
        if switches.IsEmpty then
            invalidArg "model" (sprintf "the %s module has no block that supports activation checkpointing" (model.GetName()))
        for s in switches do
            s.GradientCheckpointing <- enabled

    /// Whether activation checkpointing is on in any part of a model.
    let isEnabled (model: torch.nn.Module) : bool =
        Seq.append [ model ] (model.modules ())
        |> Seq.exists (fun m ->
            match box m with
            | :? IGradientCheckpointing as s -> s.GradientCheckpointing
            | _ -> false)

    [<DllImport("libc", EntryPoint = "malloc_trim")>]
    extern int private mallocTrim(unativeint pad)

    /// Returns the freed heap memory of glibc's malloc to the system, where there is such a malloc, so that
    /// resident-memory deltas show what is live.
    let private trimHeap () =
        try
            mallocTrim 0un |> ignore
        with
        | :? DllNotFoundException
        | :? EntryPointNotFoundException -> ()

    let private residentBytes () =
        GC.Collect()
        GC.WaitForPendingFinalizers()
        trimHeap ()
        use p = Process.GetCurrentProcess()
        p.WorkingSet64

    /// The seconds of one training step of model on inputIds (B, T) int64: forward, HF's causal-LM loss
    /// with the inputs as labels, backward.
    let private timedStep (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (inputIds: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let clock = Stopwatch.StartNew()
        let logits = model.forward inputIds // (B, T, V)
        let loss = Functional.Loss.causalLmSum logits inputIds
        loss.backward ()
        clock.Elapsed.TotalSeconds

    /// The growth of resident memory over the forward and the loss of one training step, read while the
    /// graph is alive; the step's backward then runs as usual.
    let private retainedBytes (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (inputIds: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let before = residentBytes ()
        let logits = model.forward inputIds // (B, T, V)
        let loss = Functional.Loss.causalLmSum logits inputIds
        let retained = residentBytes () - before
        loss.backward ()
        retained

    /// Measures one training step (forward, causal-LM loss, backward) of model on inputIds (B, T) int64
    /// without and with activation checkpointing, in training mode: (plain, checkpointed). Each variant runs
    /// a warm-up step, a timed step, and a step whose forward and loss are measured for RetainedBytes: the
    /// growth of resident memory while the graph is alive (heap freed back to the system before each reading
    /// where glibc's malloc_trim exists), an estimate that includes the logits and allocator slack. Restores the model's training mode, its
    /// checkpointing switch and its parameters' gradients. The model must support checkpointing (see enable).
    let measure (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (inputIds: torch.Tensor) : StepCost * StepCost =
        TorchRuntime.ensure ()
        let wasTraining = model.training
        let wasEnabled = isEnabled model
        let parameters = model.parameters () |> Seq.toArray
        let savedGradients =
            use _ = torch.no_grad ()
            parameters |> Array.map (fun p ->
                match p.grad with
                | null -> None
                | g ->
                    use g = g
                    Some(g.clone().DetachFromDisposeScope()))
        try
            model.train ()
            let measureWith checkpointing =
                enable model checkpointing
                timedStep model inputIds |> ignore
                let seconds = timedStep model inputIds
                { Seconds = seconds; RetainedBytes = retainedBytes model inputIds }
            let plain = measureWith false
            let checkpointed = measureWith true
            plain, checkpointed
        finally
            enable model wasEnabled
            model.train wasTraining
            use _ = torch.no_grad ()
            for p, saved in Array.zip parameters savedGradients do
                match saved with
                | None -> p.grad <- null
                | Some s ->
                    use g = p.grad
                    g.copy_ s |> ignore
                    s.Dispose()
