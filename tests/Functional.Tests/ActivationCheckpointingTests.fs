/// Activation checkpointing: losses and gradients equal plain runs, frozen bases still train their
/// adapters, gradients land in the flat buffer, memory stays flat.
module Functional.Tests.ActivationCheckpointingTests

open System
open Expecto
open TorchSharp
open Functional
open Functional.Models
open Functional.Optim
open Functional.Runtime
open Functional.Tests.TestUtil

// ---------------------------------------------------------------- helpers

let private torchTest name (body: unit -> unit) =
    test name {
        TorchRuntime.ensure ()
        body ()
    }

let private values (t: torch.Tensor) : float[] =
    use f = t.detach().to_type(torch.float64).contiguous()
    f.data<float>().ToArray()

let private tinyGpt2 =
    { VocabSize = 23
      NPositions = 16
      NEmbd = 16
      NLayer = 3
      NHead = 2
      NInner = 32
      ActivationFunction = Activation.GeluNew
      ResidPdrop = 0.0
      EmbdPdrop = 0.0
      AttnPdrop = 0.0
      LayerNormEpsilon = 1e-5
      InitializerRange = 0.2
      ScaleAttnWeights = true
      TieWordEmbeddings = true }

let private tinyLlama =
    { tinyLlama with VocabSize = 29; NumHiddenLayers = 3 }

let private randomIds (vocab: int) (shape: int64[]) (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randint(int64 vocab, shape, dtype = torch.int64, generator = g)

let private idsFor (lm: CausalLm) (seed: int64) =
    randomIds (ModelConfig.vocabSize lm.Config) [| 3L; 9L |] seed

/// One training micro-step in its own dispose scope: forward, summed causal-LM loss, backward.
let private trainingStep (lm: CausalLm) (ids: torch.Tensor) : float =
    use scope = torch.NewDisposeScope()
    let logits = lm.Module.forward ids
    let loss = Loss.causalLmSum logits ids
    loss.backward ()
    loss.item<float32> () |> float

/// Every parameter's gradient (None where it has none), by name.
let private gradients (lm: CausalLm) : (string * float[] option) list =
    [ for struct (name, p) in lm.Module.named_parameters () ->
          match p.grad with
          | null -> name, None
          | g ->
              use g = g
              name, Some(values g) ]

let private clearGradients (lm: CausalLm) =
    for p in lm.Module.parameters () do
        p.grad <- null

/// Loss and gradients of one training step from fresh gradients, with checkpointing on or off.
let private stepWith (lm: CausalLm) (ids: torch.Tensor) (checkpointing: bool) =
    CausalLm.setGradientCheckpointing lm checkpointing
    clearGradients lm
    let loss = trainingStep lm ids
    loss, gradients lm

let private norm (gradients: (string * float[] option) list) =
    gradients |> List.sumBy (fun (_, g) -> g |> Option.map (Array.sumBy (fun v -> v * v)) |> Option.defaultValue 0.0) |> sqrt

/// Expects the same gradients, parameter by parameter: the same ones missing, the rest within
/// 1e-6 of the plain gradients' global norm.
let private expectSameGradients (actual: (string * float[] option) list) (expected: (string * float[] option) list) =
    Expect.sequenceEqual (List.map fst actual) (List.map fst expected) "parameter names"
    let tolerance = 1e-6 * norm expected
    Expect.isGreaterThan (norm expected) 0.0 "the plain run has gradients"
    for (name, a), (_, e) in List.zip actual expected do
        match a, e with
        | None, None -> ()
        | Some a, Some e ->
            let diff = Array.map2 (fun x y -> abs (x - y)) a e |> Array.max
            Expect.isLessThanOrEqual diff tolerance (sprintf "%s: max abs difference %g (tolerance %g)" name diff tolerance)
        | _ -> failtestf "%s: gradient present in one run only (checkpointed %b, plain %b)" name a.IsSome e.IsSome

let private isBlockNormWeight (name: string) =
    (name.Contains ".h." || name.Contains ".layers.")
    && (name.Contains ".ln_" || name.Contains "layernorm")
    && name.EndsWith ".weight"

/// A linear layer with dropout, counting its forward runs: the smallest block to checkpoint.
type private CountingBlock(width: int64, dropout: float) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("CountingBlock")
    let linear = torch.nn.Linear(width, width)
    let drop = torch.nn.Dropout dropout
    do
        this.register_module("linear", linear)
        this.register_module("drop", drop)
        this.RegisterComponents()
    member val Runs = 0 with get, set
    override this.forward(x) =
        this.Runs <- this.Runs + 1
        use scope = torch.NewDisposeScope()
        scope.MoveToOuter(drop.forward(linear.forward x).tanh())

// ---------------------------------------------------------------- tests

/// Parallel-safe: no dropout, so nothing draws from torch's global generator.
let private deterministic =
    testList "deterministic" [
        torchTest "LLaMA: checkpointed loss and every gradient equal the plain run's" (fun () ->
            let lm = CausalLm.create (Llama tinyLlama) 4L
            lm.Module.train ()
            use ids = idsFor lm 1L
            let plainLoss, plain = stepWith lm ids false
            let checkpointedLoss, checkpointed = stepWith lm ids true
            Expect.equal checkpointedLoss plainLoss "loss"
            expectSameGradients checkpointed plain)
        torchTest "GPT-2 without dropout: checkpointed loss and every gradient equal the plain run's" (fun () ->
            let lm = CausalLm.create (Gpt2 { tinyGpt2 with TieWordEmbeddings = false }) 5L
            lm.Module.train ()
            use ids = idsFor lm 2L
            let plainLoss, plain = stepWith lm ids false
            let checkpointedLoss, checkpointed = stepWith lm ids true
            Expect.equal checkpointedLoss plainLoss "loss"
            expectSameGradients checkpointed plain)
        torchTest "with a frozen base, the trainable norm weights inside every block still get the plain run's gradients" (fun () ->
            for config in [ Gpt2 tinyGpt2; Llama tinyLlama ] do
                let lm = CausalLm.create config 6L
                lm.Module.train ()
                for struct (name, p) in lm.Module.named_parameters () do
                    p.requires_grad <- isBlockNormWeight name
                use ids = idsFor lm 3L
                let _, plain = stepWith lm ids false
                let _, checkpointed = stepWith lm ids true
                expectSameGradients checkpointed plain
                let trained = checkpointed |> List.filter (snd >> Option.isSome) |> List.map fst
                let expected = checkpointed |> List.map fst |> List.filter isBlockNormWeight
                Expect.equal trained expected "exactly the block norm weights have gradients"
                let layers = (ModelFamily.traits config).Depth
                Expect.equal expected.Length (2 * layers) "two norms per block")
        torchTest "checkpointed backward accumulates into the flat gradient buffer in place" (fun () ->
            let config = Gpt2 tinyGpt2
            let reference = CausalLm.create config 7L
            reference.Module.train ()
            use ids = idsFor reference 4L
            let _, plain = stepWith reference ids false
            let lm = CausalLm.create config 7L
            lm.Module.train ()
            use flat = FlatParameters.create (lm.Module.named_parameters ())
            CausalLm.setGradientCheckpointing lm true
            trainingStep lm ids |> ignore
            let once = values flat.Grads
            Expect.isGreaterThan (once |> Array.map abs |> Array.max) 0.0 "the buffer received gradients"
            expectSameGradients (gradients lm) plain
            let fromBuffer =
                [ for name in flat.Names ->
                      use slice = FlatParameters.sliceOf flat flat.Grads name
                      name, Some(values slice) ]
            expectSameGradients fromBuffer plain
            trainingStep lm ids |> ignore
            let twice = values flat.Grads
            let diff = Array.map2 (fun t o -> abs (t - 2.0 * o)) twice once |> Array.max
            Expect.isLessThanOrEqual diff 1e-6 "a second step doubles the buffer"
            flat.Grads.fill_(7.0) |> ignore
            for struct (name, p) in lm.Module.named_parameters () do
                use g = p.grad
                Expect.isTrue (values g |> Array.forall ((=) 7.0)) (name + ": p.grad is still the buffer's view"))
        torchTest "the live tensor count stays flat over 30 checkpointed steps" (fun () ->
            for config in [ Gpt2 tinyGpt2; Llama tinyLlama ] do
                let lm = CausalLm.create config 8L
                lm.Module.train ()
                CausalLm.setGradientCheckpointing lm true
                use ids = idsFor lm 5L
                let live =
                    [ for _ in 1..30 ->
                          trainingStep lm ids |> ignore
                          DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount ]
                Expect.equal (live |> List.skip 2 |> List.distinct) [ live[2] ] (sprintf "live tensors per step: %A" live))
        torchTest "the switch is off after create, turns on and off, and eval and the cached path ignore it" (fun () ->
            for config in [ Gpt2 tinyGpt2; Llama tinyLlama ] do
                let lm = CausalLm.create config 9L
                Expect.isFalse (CausalLm.gradientCheckpointing lm) "off after create"
                use ids = idsFor lm 6L
                lm.Module.eval ()
                use plainLogits = lm.Module.forward ids
                use mask = torch.ones_like ids
                let plainCached, plainCache = CausalLm.forwardCached lm ids mask None
                use plainCached = plainCached
                use plainCache = plainCache
                CausalLm.setGradientCheckpointing lm true
                Expect.isTrue (CausalLm.gradientCheckpointing lm) "on"
                use logits = lm.Module.forward ids
                Expect.sequenceEqual (values logits) (values plainLogits) "eval logits"
                let cached, cache = CausalLm.forwardCached lm ids mask None
                use cached = cached
                use cache = cache
                Expect.sequenceEqual (values cached) (values plainCached) "cached logits"
                CausalLm.setGradientCheckpointing lm false
                Expect.isFalse (CausalLm.gradientCheckpointing lm) "off again")
        torchTest "run recomputes the block once in backward and runs it once without gradients" (fun () ->
            use block = new CountingBlock(6L, 0.0)
            use x = torch.randn(4L, 6L).requires_grad_(true)
            let checkpointed () =
                use scope = torch.NewDisposeScope()
                let y = ActivationCheckpointing.run block (fun inputs -> block.forward inputs[0]) [| x |]
                Expect.equal block.Runs 1 "one run in forward"
                y.square().sum().backward ()
                Expect.equal block.Runs 2 "one more run in backward"
            checkpointed ()
            use _ = torch.no_grad ()
            block.Runs <- 0
            use y = ActivationCheckpointing.run block (fun inputs -> block.forward inputs[0]) [| x |]
            Expect.equal block.Runs 1 "no_grad runs the block once"
            Expect.isFalse y.requires_grad "no graph under no_grad")
        torchTest "run refuses extra tensors that require gradients" (fun () ->
            use block = new CountingBlock(6L, 0.0)
            use x = torch.randn(4L, 6L).requires_grad_(true)
            use extra = torch.randn(4L, 6L).requires_grad_(true)
            Expect.throwsT<ArgumentException>
                (fun () -> ActivationCheckpointing.run block (fun inputs -> block.forward inputs[0]) [| x; extra |] |> ignore)
                "an extra tensor would silently get no gradient")
    ]

/// Dropout draws from torch's global generator, which parallel tests share: these run alone, after the
/// parallel tests (testSequenced), and seed it.
let private withDropout =
    testSequenced <| testList "dropout" [
        torchTest "GPT-2 with dropout: checkpointed loss and every gradient equal the plain run's with the same seed" (fun () ->
            let lm = CausalLm.create (Gpt2 { tinyGpt2 with ResidPdrop = 0.2; EmbdPdrop = 0.2; AttnPdrop = 0.2 }) 10L
            lm.Module.train ()
            use ids = idsFor lm 7L
            let seeded seed checkpointing =
                torch.manual_seed seed |> ignore
                stepWith lm ids checkpointing
            let plainLoss, plain = seeded 11L false
            let otherLoss, _ = seeded 12L false
            Expect.notEqual otherLoss plainLoss "dropout is active: another seed gives another loss"
            let checkpointedLoss, checkpointed = seeded 11L true
            Expect.equal checkpointedLoss plainLoss "loss"
            expectSameGradients checkpointed plain)
        torchTest "LLaMA with attention dropout: checkpointed loss and every gradient equal the plain run's with the same seed" (fun () ->
            let lm = CausalLm.create (Llama { tinyLlama with AttentionDropout = 0.3 }) 11L
            lm.Module.train ()
            use ids = idsFor lm 8L
            let seeded seed checkpointing =
                torch.manual_seed seed |> ignore
                stepWith lm ids checkpointing
            let plainLoss, plain = seeded 13L false
            let otherLoss, _ = seeded 14L false
            Expect.notEqual otherLoss plainLoss "dropout is active: another seed gives another loss"
            let checkpointedLoss, checkpointed = seeded 13L true
            Expect.equal checkpointedLoss plainLoss "loss"
            expectSameGradients checkpointed plain)
        torchTest "the recomputation leaves torch's random state where the plain run leaves it" (fun () ->
            let lm = CausalLm.create (Gpt2 { tinyGpt2 with ResidPdrop = 0.2 }) 12L
            lm.Module.train ()
            use ids = idsFor lm 9L
            let stateAfter checkpointing =
                torch.manual_seed 15L |> ignore
                stepWith lm ids checkpointing |> ignore
                use state = torch.get_rng_state ()
                values state
            Expect.sequenceEqual (stateAfter true) (stateAfter false) "random state after the step")
        torchTest "measure restores the switch, the training mode and the gradients" (fun () ->
            let lm = CausalLm.create (Gpt2 tinyGpt2) 13L
            use ids = idsFor lm 10L
            lm.Module.train ()
            trainingStep lm ids |> ignore
            let before = gradients lm
            lm.Module.eval ()
            let plain, checkpointed = ActivationCheckpointing.measure lm.Module ids
            Expect.isGreaterThan plain.Seconds 0.0 "plain time"
            Expect.isGreaterThan checkpointed.Seconds 0.0 "checkpointed time"
            Expect.isFalse (CausalLm.gradientCheckpointing lm) "switch restored"
            Expect.isFalse lm.Module.training "eval mode restored"
            Expect.equal (gradients lm) before "gradients restored")
    ]

[<Tests>]
let tests = testList "activation checkpointing" [ deterministic; withDropout ]
