module Functional.Tests.OptimizerTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Functional
open Functional.Runtime
open Functional.Optim

let private toArray (t: torch.Tensor) : float[] =
    use detached = t.detach ()
    use asDouble = detached.to_type torch.float64
    use contiguous = asDouble.contiguous ()
    contiguous.data<float>().ToArray()

/// A random optimizer run: hyperparameters, one learning rate per step, and a seed for the initial
/// parameters, the gradients (a random scale per step) and the weight-decay mask.
type private Case =
    { Beta1: float
      Beta2: float
      Eps: float
      WeightDecay: float
      Momentum: float
      Nesterov: bool
      LearningRates: float list
      Size: int
      Seed: int }

let private unitInterval = Gen.choose (1, 999) |> Gen.map (fun i -> float i / 1000.0)

let private cases =
    gen {
        let! beta1 = Gen.oneof [ unitInterval; Gen.elements [ 0.0; 0.9; 0.99 ] ]
        let! beta2 = Gen.oneof [ unitInterval; Gen.elements [ 0.999; 0.9999 ] ]
        let! eps = Gen.elements [ 1e-8; 1e-6; 1e-3; 0.1 ]
        let! weightDecay = Gen.elements [ 0.0; 0.01; 0.1; 0.5 ]
        let! momentum = Gen.oneof [ Gen.constant 0.0; unitInterval ]
        let! nesterov = if momentum > 0.0 then Gen.elements [ false; true ] else Gen.constant false
        let! steps = Gen.choose (1, 8)
        let! learningRates = Gen.listOfLength steps (Gen.choose (0, 1000) |> Gen.map (fun i -> float i * 1e-4))
        let! size = Gen.choose (1, 40)
        let! seed = Gen.choose (0, Int32.MaxValue)
        return
            { Beta1 = beta1
              Beta2 = beta2
              Eps = eps
              WeightDecay = weightDecay
              Momentum = momentum
              Nesterov = nesterov
              LearningRates = learningRates
              Size = size
              Seed = seed }
    }
    |> Arb.fromGen

/// Initial parameters in [-1, 1], a 0/1 mask and one gradient per step, all exactly representable
/// in fp32 so the float64 references see the same inputs.
let private data (c: Case) =
    let rng = Random c.Seed
    let uniform () = rng.NextDouble() * 2.0 - 1.0
    let parameters = Array.init c.Size (fun _ -> float32 (uniform ()))
    let mask = Array.init c.Size (fun _ -> if rng.Next 2 = 0 then 0.0f else 1.0f)
    let grads =
        c.LearningRates
        |> List.map (fun _ ->
            let scale = 10.0 ** (rng.NextDouble() * 4.0 - 3.0)
            Array.init c.Size (fun _ -> float32 (uniform () * scale)))
    parameters, mask, grads

let private schedule (c: Case) = fun k -> List.item k c.LearningRates

/// Runs the transform over the gradients as Optimizer.apply does (update, then parameters += update)
/// and returns, per step, the parameters before it and the update it produced.
let private run (transform: Transform) (parameters: float32[]) (grads: float32[] list) =
    use values = torch.tensor parameters
    let mutable state = transform.Init values
    let steps =
        [ for g in grads do
              use gradient = torch.tensor g
              let before = toArray values
              let updates, next = transform.Update gradient state values
              state <- next
              let update = toArray updates
              values.add_ updates |> ignore
              yield before, update ]
    state.Dispose()
    steps

/// torch.optim.AdamW written out in float64: the update added to p at each step, given the p (the
/// run's own parameters) before it.
let private adamWReference (c: Case) (mask: float32[]) (grads: float32[] list) (befores: float[] list) =
    let m = Array.zeroCreate c.Size
    let v = Array.zeroCreate c.Size
    List.zip3 grads befores c.LearningRates
    |> List.mapi (fun k (g, p, lr) ->
        let t = float (k + 1)
        let bc1 = 1.0 - c.Beta1 ** t
        let bc2 = 1.0 - c.Beta2 ** t
        Array.init c.Size (fun i ->
            let g = float g[i]
            m[i] <- c.Beta1 * m[i] + (1.0 - c.Beta1) * g
            v[i] <- c.Beta2 * v[i] + (1.0 - c.Beta2) * g * g
            let adam = (m[i] / bc1) / (sqrt v[i] / sqrt bc2 + c.Eps)
            -lr * (adam + c.WeightDecay * float mask[i] * p[i])))

/// torch.optim.SGD (dampening 0, coupled weight decay) written out in float64.
let private sgdReference (c: Case) (mask: float32[]) (grads: float32[] list) (befores: float[] list) =
    let buffer = Array.zeroCreate c.Size
    List.zip3 grads befores c.LearningRates
    |> List.mapi (fun k (g, p, lr) ->
        Array.init c.Size (fun i ->
            let d = float g[i] + c.WeightDecay * float mask[i] * p[i]
            let direction =
                if c.Momentum = 0.0 then d
                else
                    buffer[i] <- if k = 0 then d else c.Momentum * buffer[i] + d
                    if c.Nesterov then d + c.Momentum * buffer[i] else buffer[i]
            -lr * direction))

/// Relative tolerance 1e-5 per element, plus 1e-6 of the vector's largest entry and floor (absolute)
/// for entries that come out of a cancellation.
let private expectCloseWithin (floor: float) (label: string) (expected: float[]) (actual: float[]) =
    let scale = expected |> Array.map abs |> Array.fold max 0.0
    Array.iteri2
        (fun i e a ->
            if not (abs (e - a) <= 1e-5 * abs e + 1e-6 * scale + floor) then
                failtestf "%s: element %d is %.9g, expected %.9g" label i a e)
        expected
        actual

let private expectClose = expectCloseWithin 0.0

let private withTorch (body: unit -> unit) =
    TorchRuntime.ensure ()
    use _ = torch.NewDisposeScope()
    body ()

let private config = { FsCheckConfig.defaultConfig with maxTest = 100 }

let private linear () =
    torch.manual_seed 7L |> ignore
    torch.nn.Linear(3L, 2L)

/// Two rows of three features.
let private input () = torch.tensor([| 1.0f; 2.0f; 3.0f; 4.0f; 5.0f; 6.0f |]).reshape(2L, 3L)

let private backward (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (x: torch.Tensor) =
    use y = model.forward x
    use loss = y.sum ()
    loss.backward ()

let private flatTests =
    testList "flat parameters" [
        test "lays parameters out in order, each aliasing its slice of Values" {
            withTorch (fun () ->
                let model = linear ()
                let weight = toArray model.weight
                let bias = toArray model.bias
                use flat = FlatParameters.create (model.named_parameters ())
                Expect.equal flat.Names [ "weight"; "bias" ] "names in module order"
                Expect.equal flat.Offsets [ 0L; 6L ] "offsets"
                Expect.equal flat.Counts [ 6L; 2L ] "counts"
                Expect.equal (toArray flat.Values) (Array.append weight bias) "data copied in"
                use biasView = FlatParameters.slice flat "bias"
                Expect.equal biasView.shape [| 2L |] "slice has the parameter's shape"
                flat.Values.fill_ 0.5 |> ignore
                Expect.equal (toArray model.weight) (Array.create 6 0.5) "parameters see writes to Values")
        }

        test "changing Values changes the module's output" {
            withTorch (fun () ->
                let model = linear ()
                use flat = FlatParameters.create (model.named_parameters ())
                use x = input ()
                use values = torch.tensor [| 1.0f; 0.0f; 0.0f; 0.0f; 1.0f; 1.0f; 10.0f; 20.0f |]
                flat.Values.copy_ values |> ignore
                use y = model.forward x
                // y = x W^T + b with W = [[1, 0, 0], [0, 1, 1]], b = [10, 20]
                Expect.equal (toArray y) [| 11.0; 25.0; 14.0; 31.0 |] "output follows the flat values")
        }

        test "backward accumulates into Grads: two backwards give twice one" {
            withTorch (fun () ->
                let model = linear ()
                use flat = FlatParameters.create (model.named_parameters ())
                use x = input ()
                backward model x
                let once = toArray flat.Grads
                // d sum(x W^T + b) / dW[j, k] = sum over rows of x[:, k]; / db[j] = number of rows
                Expect.equal once [| 5.0; 7.0; 9.0; 5.0; 7.0; 9.0; 2.0; 2.0 |] "one backward"
                backward model x
                Expect.equal (toArray flat.Grads) (once |> Array.map ((*) 2.0)) "two backwards")
        }

        test "p.grad stays a view of Grads after backward and after zeroGrads" {
            withTorch (fun () ->
                let model = linear ()
                use flat = FlatParameters.create (model.named_parameters ())
                use x = input ()
                backward model x
                flat.Grads.fill_ 7.0 |> ignore
                Expect.equal (toArray model.weight.grad) (Array.create 6 7.0) "after backward, weight.grad reads Grads"
                Expect.equal (toArray model.bias.grad) (Array.create 2 7.0) "after backward, bias.grad reads Grads"
                FlatParameters.zeroGrads flat
                Expect.equal (toArray model.weight.grad) (Array.zeroCreate 6) "zeroing Grads zeroes weight.grad"
                backward model x
                Expect.equal (toArray flat.Grads) [| 5.0; 7.0; 9.0; 5.0; 7.0; 9.0; 2.0; 2.0 |] "backward after zeroing lands in Grads")
        }

        test "Optimizer.apply on Values moves the module's parameters" {
            withTorch (fun () ->
                let model = linear ()
                use flat = FlatParameters.create (model.named_parameters ())
                use mask = FlatParameters.mask flat (fun _ -> true)
                let sgd = Optimizer.sgd (fun _ -> 0.5) 0.0 false 0.0 mask
                use x = input ()
                let weight = toArray model.weight
                backward model x
                use state = Optimizer.apply sgd flat (sgd.Init flat.Values)
                let expected = Array.map2 (fun w g -> w - 0.5 * g) weight [| 5.0; 7.0; 9.0; 5.0; 7.0; 9.0 |]
                expectClose "weight after one SGD step" expected (toArray model.weight))
        }

        test "mask is 1 over the selected parameters and 0 elsewhere" {
            withTorch (fun () ->
                let model = linear ()
                use flat = FlatParameters.create (model.named_parameters ())
                use mask = FlatParameters.mask flat (fun name -> name <> "bias")
                Expect.equal (toArray mask) [| 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 0.0; 0.0 |] "weight decays, bias does not")
        }

        test "namedValues gives every parameter's view in order" {
            withTorch (fun () ->
                let model = linear ()
                use flat = FlatParameters.create (model.named_parameters ())
                let named = FlatParameters.namedValues flat
                Expect.equal (named |> List.map fst) [ "weight"; "bias" ] "names"
                Expect.equal (named |> List.map (fun (_, t) -> t.shape)) [ [| 2L; 3L |]; [| 2L |] ] "shapes"
                Expect.equal (toArray (snd named[0])) (toArray model.weight) "weight view")
        }

        test "create rejects repeated names and non-fp32 parameters" {
            withTorch (fun () ->
                use a = new Modules.Parameter(torch.zeros 2L)
                use b = new Modules.Parameter(torch.zeros 3L)
                use c = new Modules.Parameter(torch.zeros(2L, dtype = torch.float64))
                Expect.throwsT<ArgumentException>
                    (fun () -> FlatParameters.create [ struct ("a", a); struct ("a", b) ] |> ignore)
                    "repeated name"
                Expect.throwsT<ArgumentException>
                    (fun () -> FlatParameters.create [ struct ("c", c) ] |> ignore)
                    "float64 parameter")
        }
    ]

let private adamW (c: Case) (mask: torch.Tensor) =
    Optimizer.adamW (schedule c) c.Beta1 c.Beta2 c.Eps c.WeightDecay mask

let private sgd (c: Case) (mask: torch.Tensor) =
    Optimizer.sgd (schedule c) c.Momentum c.Nesterov c.WeightDecay mask

/// floor: the absolute tolerance of a case's updates (0 for AdamW, whose update is normalized).
let private equalsReferenceWithin (floor: Case -> float32[] -> float32[] list -> float) optimizer reference =
    Prop.forAll cases (fun c ->
        withTorch (fun () ->
            let parameters, mask, grads = data c
            use maskTensor = torch.tensor mask
            let steps = run (optimizer c maskTensor) parameters grads
            let expected = reference c mask grads (List.map fst steps)
            let floor = floor c parameters grads
            List.iteri2 (fun k e (_, actual) -> expectCloseWithin floor (sprintf "update %d" k) e actual) expected steps))

let private equalsReference optimizer reference = equalsReferenceWithin (fun _ _ _ -> 0.0) optimizer reference

/// SGD's update is lr x (gradient + weight decay x parameter + momentum x buffer), summed in fp32 against a
/// float64 reference: where the terms cancel (a one-element case has no larger entry to scale by; CI run of
/// 2026-12-03: 6.1978e-07 against 6.1977e-07), fp32 rounding is relative to the terms, not to the
/// result. The floor is 1e-6 of lr x the terms' bound (every step's largest gradient, which bounds the
/// buffer, plus the decayed parameter), 16 times fp32's epsilon.
let private sgdFloor (c: Case) (parameters: float32[]) (grads: float32[] list) =
    let largest (values: float32[]) = values |> Array.fold (fun m v -> max m (abs (float v))) 0.0
    let terms = (grads |> List.sumBy largest) + c.WeightDecay * (largest parameters + 1.0)
    1e-6 * List.max c.LearningRates * terms

let private clipCases =
    gen {
        let! size = Gen.choose (1, 60)
        let! maxNorm = Gen.elements [ 0.0; 0.01; 0.5; 1.0; 10.0; 1000.0 ]
        let! seed = Gen.choose (0, Int32.MaxValue)
        return size, maxNorm, seed
    }
    |> Arb.fromGen

/// Runs the first `split` steps on one state, exports it, loads it into a fresh Init and runs the
/// rest on both: every later update must be identical.
let private roundTrip optimizer =
    Prop.forAll cases (fun c ->
        withTorch (fun () ->
            let parameters, mask, grads = data c
            use maskTensor = torch.tensor mask
            let transform = optimizer c maskTensor
            let split = c.Seed % (grads.Length + 1)
            use values = torch.tensor parameters
            let mutable original = transform.Init values
            for g in List.take split grads do
                use gradient = torch.tensor g
                let updates, next = transform.Update gradient original values
                original <- next
                values.add_ updates |> ignore
            let saved = Transform.stateTensors original |> List.map (fun (name, t) -> name, t.clone ())
            use copy = values.clone ()
            let mutable restored = transform.Init copy |> Transform.loadStateTensors saved
            for g in List.skip split grads do
                use g1 = torch.tensor g
                use g2 = torch.tensor g
                let u1, next1 = transform.Update g1 original values
                let u2, next2 = transform.Update g2 restored copy
                original <- next1
                restored <- next2
                Expect.equal (toArray u2) (toArray u1) "restored state gives the same update"
                values.add_ u1 |> ignore
                copy.add_ u2 |> ignore
            original.Dispose()
            restored.Dispose()))

/// Runs ours (through FlatParameters and Optimizer.apply) and one of TorchSharp's ports of
/// torch.optim side by side for six steps on 1,000 parameters; returns both final parameter vectors.
let private sideBySide (ours: torch.Tensor -> Transform) (theirs: Modules.Parameter -> torch.optim.Optimizer) =
    torch.manual_seed 11L |> ignore
    use initial = torch.randn 1000L
    let grads = [ for _ in 1..6 -> torch.randn 1000L ]
    use reference = new Modules.Parameter(initial.clone ())
    let optimizer = theirs reference
    use parameter = new Modules.Parameter(initial.clone ())
    use flat = FlatParameters.create [ struct ("p", parameter) ]
    use mask = FlatParameters.mask flat (fun _ -> true)
    let transform = ours mask
    let mutable state = transform.Init flat.Values
    for g in grads do
        reference.grad <- g.clone ()
        optimizer.step () |> ignore
        flat.Grads.copy_ g |> ignore
        state <- Optimizer.apply transform flat state
    state.Dispose()
    toArray reference, toArray parameter

let private expectNear (label: string) (expected: float[]) (actual: float[]) =
    Array.iteri2
        (fun i e a ->
            if not (abs (e - a) <= 1e-5 * (abs e + 0.1)) then
                failtestf "%s: element %d is %.9g, expected %.9g" label i a e)
        expected
        actual

let private transformTests =
    testList "transforms" [
        testPropertyWithConfig config "Optimizer.adamW equals torch.optim.AdamW's recurrence in float64"
            (equalsReference adamW adamWReference)

        testPropertyWithConfig config "Optimizer.sgd equals torch.optim.SGD's recurrence (momentum, Nesterov, L2) in float64"
            (equalsReferenceWithin sgdFloor sgd sgdReference)

        test "Optimizer.adamW and Optimizer.sgd track TorchSharp's ports of torch.optim.AdamW and SGD" {
            withTorch (fun () ->
                let expected, actual =
                    sideBySide
                        (Optimizer.adamW (fun _ -> 0.01) 0.9 0.99 1e-6 0.1)
                        (fun p -> torch.optim.AdamW([ p ], 0.01, 0.9, 0.99, 1e-6, 0.1))
                expectNear "AdamW" expected actual
                for momentum, nesterov in [ 0.0, false; 0.9, false; 0.9, true ] do
                    let expected, actual =
                        sideBySide
                            (Optimizer.sgd (fun _ -> 0.01) momentum nesterov 0.1)
                            (fun p -> torch.optim.SGD([ p ], 0.01, momentum, 0.0, 0.1, nesterov))
                    expectNear (sprintf "SGD momentum %g Nesterov %b" momentum nesterov) expected actual)
        }

        test "clipByGlobalNorm tracks torch.nn.utils.clip_grad_norm_" {
            withTorch (fun () ->
                torch.manual_seed 5L |> ignore
                use gradient = torch.randn 100L * 3.0
                use parameter = new Modules.Parameter(torch.zeros 100L)
                parameter.grad <- gradient.clone ()
                let norm = torch.nn.utils.clip_grad_norm_([ parameter ], 1.0)
                let clip = Transform.clipByGlobalNorm 1.0
                use values = torch.zeros 100L
                let updates, state = clip.Update (gradient.clone ()) (clip.Init values) values
                Expect.floatClose Accuracy.medium (Transform.lastGradNorm state) norm "reported norm"
                expectNear "clipped gradient" (toArray parameter.grad) (toArray updates))
        }

        testPropertyWithConfig config "clipByGlobalNorm scales by min(1, maxNorm / (norm + 1e-6)) and reports the pre-clip norm"
            (Prop.forAll clipCases (fun (size, maxNorm, seed) ->
                withTorch (fun () ->
                    let rng = Random seed
                    let scale = 10.0 ** (rng.NextDouble() * 6.0 - 3.0)
                    let g = Array.init size (fun _ -> float32 ((rng.NextDouble() * 2.0 - 1.0) * scale))
                    let norm = g |> Array.sumBy (fun x -> float x * float x) |> sqrt
                    let coefficient = if maxNorm = 0.0 then 1.0 else min 1.0 (maxNorm / (norm + 1e-6))
                    let clip = Transform.clipByGlobalNorm maxNorm
                    use gradient = torch.tensor g
                    use values = torch.zeros (int64 size)
                    let updates, state = clip.Update gradient (clip.Init values) values
                    expectClose "clipped" (g |> Array.map (fun x -> float x * coefficient)) (toArray updates)
                    let reported = Transform.lastGradNorm state
                    Expect.isTrue (abs (reported - norm) <= 1e-5 * norm) (sprintf "norm %g reported as %g" norm reported))))

        test "clipping reports the norm before clipping, through a chain, and NaN before any update" {
            withTorch (fun () ->
                use values = torch.zeros 2L
                use mask = torch.ones 2L
                let transform = Optimizer.withClipping 1.0 (Optimizer.sgd (fun _ -> 1.0) 0.0 false 0.0 mask)
                let initial = transform.Init values
                Expect.isTrue (Double.IsNaN(Transform.lastGradNorm initial)) "no norm before the first update"
                use gradient = torch.tensor [| 3.0f; 4.0f |]
                let updates, state = transform.Update gradient initial values
                Expect.floatClose Accuracy.high (Transform.lastGradNorm state) 5.0 "pre-clip norm of (3, 4)"
                expectClose "clipped to norm 1, negated by lr 1" [| -0.6; -0.8 |] (toArray updates))
        }

        testPropertyWithConfig config "masked weight decay leaves masked-out entries untouched (AdamW and SGD)"
            (Prop.forAll cases (fun c ->
                withTorch (fun () ->
                    let parameters, mask, _ = data c
                    let weightDecay = max c.WeightDecay 0.1
                    let lr = List.head c.LearningRates
                    use maskTensor = torch.tensor mask
                    let zeros = [ Array.zeroCreate c.Size ]
                    let optimizers =
                        [ Optimizer.adamW (fun _ -> lr) c.Beta1 c.Beta2 c.Eps weightDecay maskTensor
                          Optimizer.sgd (fun _ -> lr) c.Momentum c.Nesterov weightDecay maskTensor ]
                    for optimizer, factor in List.zip optimizers [ 1.0; (if c.Nesterov then 1.0 + c.Momentum else 1.0) ] do
                        let _, update = run optimizer parameters zeros |> List.head
                        for i in 0 .. c.Size - 1 do
                            // AdamW: p (1 - lr wd); SGD: the decayed gradient wd p, counted twice by Nesterov.
                            let expected = if mask[i] = 0.0f then 0.0 else -lr * weightDecay * factor * float parameters[i]
                            if not (abs (update[i] - expected) <= 1e-6 * abs expected) then
                                failtestf "entry %d (mask %g): update %g, expected %g" i mask[i] update[i] expected)))

        testPropertyWithConfig config "AdamW state export and import continue identically" (roundTrip adamW)

        testPropertyWithConfig config "SGD momentum state export and import continue identically" (roundTrip sgd)

        test "AdamW's state has stable names" {
            withTorch (fun () ->
                use values = torch.zeros 3L
                use mask = torch.ones 3L
                use state = (Optimizer.adamW (fun _ -> 1e-3) 0.9 0.999 1e-8 0.0 mask).Init values
                let exported = Transform.stateTensors state
                Expect.equal
                    (exported |> List.map fst)
                    [ "0.adam.exp_avg"; "0.adam.exp_avg_sq"; "0.adam.step"; "2.learning_rate.count" ]
                    "names"
                Expect.equal state.Names (exported |> List.map fst) "Names lists what Export gives")
        }

        test "loading a state with a missing, unexpected or misshaped entry raises InvalidInputException" {
            withTorch (fun () ->
                use values = torch.zeros 3L
                use mask = torch.ones 3L
                let transform = Optimizer.sgd (fun _ -> 1e-3) 0.9 false 0.0 mask
                use state = transform.Init values
                let good = Transform.stateTensors state
                let load entries = Transform.loadStateTensors entries state |> ignore
                Expect.throwsT<InvalidInputException> (fun () -> load (List.tail good)) "missing entry"
                Expect.throwsT<InvalidInputException>
                    (fun () -> load (("extra", torch.zeros 1L) :: good))
                    "unexpected entry"
                Expect.throwsT<InvalidInputException>
                    (fun () -> load (good |> List.map (fun (n, t) -> n, (if t.numel () = 3L then torch.zeros 4L else t))))
                    "misshaped buffer")
        }

        test "invalid hyperparameters raise ArgumentException (users' values are checked by TrainOptions.validate)" {
            TorchRuntime.ensure ()
            Expect.throwsT<ArgumentException> (fun () -> Transform.scaleByAdam 1.0 0.999 1e-8 |> ignore) "beta1 = 1"
            Expect.throwsT<ArgumentException> (fun () -> Transform.scaleByAdam 0.9 -0.1 1e-8 |> ignore) "beta2 < 0"
            Expect.throwsT<ArgumentException> (fun () -> Transform.scaleByAdam 0.9 0.999 nan |> ignore) "eps NaN"
            Expect.throwsT<ArgumentException> (fun () -> Transform.trace 0.0 true |> ignore) "Nesterov without momentum"
            Expect.throwsT<ArgumentException> (fun () -> Transform.clipByGlobalNorm -1.0 |> ignore) "negative max norm"
        }

        test "200 updates inside per-step dispose scopes leave the live tensor count flat" {
            withTorch (fun () ->
                use parameter = new Modules.Parameter(torch.randn 10_000L)
                use flat = FlatParameters.create [ struct ("w", parameter) ]
                use mask = FlatParameters.mask flat (fun _ -> true)
                let transform = Optimizer.withClipping 1.0 (Optimizer.adamW (fun k -> 1e-3 / float (k + 1)) 0.9 0.999 1e-8 0.01 mask)
                let mutable state =
                    // Created in a scope that ends at once: the state's buffers must outlive it.
                    use _ = torch.NewDisposeScope()
                    transform.Init flat.Values
                use gradient = torch.randn 10_000L
                let update () =
                    flat.Grads.copy_ gradient |> ignore
                    state <- Optimizer.apply transform flat state
                    FlatParameters.zeroGrads flat
                let step () =
                    use _ = torch.NewDisposeScope()
                    update ()
                step ()
                let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
                let before = live ()
                for _ in 1..200 do
                    step ()
                Expect.equal (live ()) before "live tensors after 200 updates in per-step scopes"
                for _ in 1..10 do
                    update ()
                Expect.equal (live ()) before "live tensors after 10 updates without a scope: no handle is left behind"
                Expect.isTrue (Double.IsFinite(Transform.lastGradNorm state)) "the state is still usable"
                state.Dispose())
        }
    ]

/// The AdamW configuration of one process (Transform.localNorm) from its hyperparameters.
let private fusedConfig maxNorm schedule beta1 beta2 eps weightDecay mask factors : AdamWConfig =
    { Schedule = schedule
      Beta1 = beta1
      Beta2 = beta2
      Epsilon = eps
      WeightDecay = weightDecay
      DecayMask = mask
      MaxGradNorm = maxNorm
      NormReduction = Transform.localNorm
      Factors = factors
      Amsgrad = false
      Maximize = false }

/// Runs Optimizer.fusedAdamW and the same transform unfused side by side over the case's steps on flat
/// buffers of c.Size elements (the gradients repeated to fill them), with clipping at maxNorm and,
/// when asked, per-element learning-rate factors and a bf16 compute copy; checks after every step that
/// parameters, moments, reported norm and copy agree.
let private fusedMatchesUnfused (c: Case) (size: int) (maxNorm: float) (withFactors: bool) (withCopy: bool) =
    let parameters, mask, grads = data c
    let fill (values: float32[]) = Array.init size (fun i -> values[i % values.Length])
    let makeFlat () =
        let parameter = new Modules.Parameter(torch.tensor (fill parameters))
        FlatParameters.create [ struct ("w", parameter) ]
    use fusedFlat = makeFlat ()
    use plainFlat = makeFlat ()
    use maskTensor = torch.tensor (fill mask)
    use factorTensor = torch.linspace(0.5, 2.0, int64 size)
    let factors = if withFactors then Some factorTensor else None
    let fused = Optimizer.fusedAdamW (fusedConfig maxNorm (schedule c) c.Beta1 c.Beta2 c.Eps c.WeightDecay maskTensor factors)
    let plain = Optimizer.unfused fused.Transform
    use fusedCopy = torch.zeros([| int64 size |], dtype = torch.bfloat16)
    use plainCopy = torch.zeros([| int64 size |], dtype = torch.bfloat16)
    let copies = if withCopy then Some fusedCopy, Some plainCopy else None, None
    let mutable fusedState = fused.Transform.Init fusedFlat.Values
    let mutable plainState = plain.Transform.Init plainFlat.Values
    for step, g in List.indexed grads do
        use gradient = torch.tensor (fill g)
        fusedFlat.Grads.copy_ gradient |> ignore
        plainFlat.Grads.copy_ gradient |> ignore
        fusedState <- fused.Step fusedFlat fusedState (fst copies)
        plainState <- plain.Step plainFlat plainState (snd copies)
        let label = sprintf "step %d" (step + 1)
        expectClose (label + " parameters") (toArray plainFlat.Values) (toArray fusedFlat.Values)
        for (name, expected), (_, actual) in List.zip (Transform.stateTensors plainState) (Transform.stateTensors fusedState) do
            expectClose (sprintf "%s %s" label name) (toArray expected) (toArray actual)
            expected.Dispose()
            actual.Dispose()
        let norm = Transform.lastGradNorm plainState
        Expect.isTrue (abs (Transform.lastGradNorm fusedState - norm) <= 1e-6 * norm) (label + " reported norm")
        if withCopy then
            // The kernel rounds to bf16 as torch's conversion does: bit for bit the same copy.
            use converted = fusedFlat.Values.to_type torch.bfloat16
            Expect.equal (toArray fusedCopy) (toArray converted) (label + " bf16 copy is the updated parameters rounded")
    fusedState.Dispose()
    plainState.Dispose()

let private fusedTests =
    testList "fused AdamW" [
        testPropertyWithConfig config "fusedAdamW equals the unfused chain: clipping, masked decay, factors, bf16 copy"
            (Prop.forAll cases (fun c ->
                withTorch (fun () ->
                    let rng = Random c.Seed
                    // Sizes that leave a tail after the eight-wide loop; max norms that clip, or not, or only measure.
                    let size = c.Size + 8 * rng.Next 5
                    let maxNorm = [| 0.0; 1e-3; 1.0; 1e6 |][rng.Next 4]
                    fusedMatchesUnfused c size maxNorm (rng.Next 2 = 0) (rng.Next 2 = 0))))

        test "fusedAdamW equals the unfused chain over several parallel chunks" {
            withTorch (fun () ->
                let c =
                    { Beta1 = 0.9; Beta2 = 0.999; Eps = 1e-8; WeightDecay = 0.1; Momentum = 0.0; Nesterov = false
                      LearningRates = [ 1e-3; 5e-4; 1e-4 ]; Size = 37; Seed = 3 }
                fusedMatchesUnfused c 300_007 1.0 true true)
        }

        test "without weight decay a one-element uniform mask serves fused and unfused AdamW alike" {
            withTorch (fun () ->
                let make () =
                    let parameter = new Modules.Parameter(torch.linspace(-1.0, 1.0, 1000L))
                    FlatParameters.create [ struct ("w", parameter) ]
                use fusedFlat = make ()
                use plainFlat = make ()
                use mask = FlatParameters.uniform fusedFlat 1.0f
                Expect.equal (mask.numel ()) 1000L "laid out as Values"
                Expect.equal (mask.stride ()) [| 0L |] "backed by one element"
                let fused = Optimizer.fusedAdamW (fusedConfig 1.0 (fun _ -> 1e-2) 0.9 0.999 1e-8 0.0 mask None)
                let plain = Optimizer.unfused fused.Transform
                use gradient = torch.linspace(2.0, -3.0, 1000L)
                fusedFlat.Grads.copy_ gradient |> ignore
                plainFlat.Grads.copy_ gradient |> ignore
                use fusedState = fused.Step fusedFlat (fused.Transform.Init fusedFlat.Values) None
                use plainState = plain.Step plainFlat (plain.Transform.Init plainFlat.Values) None
                expectClose "parameters" (toArray plainFlat.Values) (toArray fusedFlat.Values))
        }

        test "fusedAdamW refreshes an fp16 compute copy through the unfused conversion" {
            withTorch (fun () ->
                use parameter = new Modules.Parameter(torch.randn 100L)
                use flat = FlatParameters.create [ struct ("w", parameter) ]
                use mask = FlatParameters.mask flat (fun _ -> true)
                let fused = Optimizer.fusedAdamW (fusedConfig 1.0 (fun _ -> 1e-2) 0.9 0.999 1e-8 0.0 mask None)
                use copy = torch.zeros([| 100L |], dtype = torch.float16)
                flat.Grads.copy_ (torch.randn 100L) |> ignore
                use state = fused.Step flat (fused.Transform.Init flat.Values) (Some copy)
                use expected = flat.Values.to_type torch.float16
                Expect.equal (toArray copy) (toArray expected) "fp16 copy of the updated parameters")
        }

        test "fusedAdamW steps inside per-step dispose scopes leave the live tensor count flat" {
            withTorch (fun () ->
                use parameter = new Modules.Parameter(torch.randn 10_000L)
                use flat = FlatParameters.create [ struct ("w", parameter) ]
                use mask = FlatParameters.mask flat (fun _ -> true)
                let fused = Optimizer.fusedAdamW (fusedConfig 1.0 (fun k -> 1e-3 / float (k + 1)) 0.9 0.999 1e-8 0.01 mask None)
                use copy = torch.zeros([| 10_000L |], dtype = torch.bfloat16)
                let mutable state = fused.Transform.Init flat.Values
                use gradient = torch.randn 10_000L
                let update () =
                    flat.Grads.copy_ gradient |> ignore
                    state <- fused.Step flat state (Some copy)
                let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
                update ()
                let before = live ()
                for _ in 1..100 do
                    update ()
                Expect.equal (live ()) before "live tensors after 100 fused steps without a scope"
                state.Dispose())
        }
    ]

[<Tests>]
let tests = testList "optimizer" [ flatTests; transformTests; fusedTests ]
