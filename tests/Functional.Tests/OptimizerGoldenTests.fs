/// The optimizers behind `--optim` against PyTorch: per-step parameters recorded by
/// tools/reference/make_optimizer_golden.py (torch.optim for AdamW's amsgrad and maximize, SGD's dampening
/// and RMSprop; the script's own torch-op updates for Lion and Adafactor, which torch 1.13 lacks), their
/// properties, checkpoint round trips of their states, and `functional train --optim` end to end.
module Functional.Tests.OptimizerGoldenTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Functional
open Functional.Runtime
open Functional.Optim
open Functional.Training
open Functional.Tests.TestUtil

/// One recorded optimizer run: its name, its settings as written, and the parameters after every step
/// (one flat list per parameter).
type private GoldenCase =
    { Name: string
      Settings: JsonElement
      Steps: float32[] list list }

/// The golden file: parameter shapes, initial values, gradients per step, and the runs.
type private Golden =
    { Shapes: int64[] list
      Initial: float32[] list
      Gradients: float32[] list list
      Cases: GoldenCase list }

let private floats (e: JsonElement) = [| for x in e.EnumerateArray() -> float32 (x.GetDouble()) |]
let private tensorsOf (e: JsonElement) = [ for t in e.EnumerateArray() -> floats t ]

let private golden =
    lazy
        (let path = Path.Combine(AppContext.BaseDirectory, "golden", "optimizers", "optimizers.json")
         let root = JsonDocument.Parse(File.ReadAllText path).RootElement
         { Shapes = [ for s in root.GetProperty("shapes").EnumerateArray() -> [| for d in s.EnumerateArray() -> d.GetInt64() |] ]
           Initial = tensorsOf (root.GetProperty "initial")
           Gradients = [ for g in root.GetProperty("gradients").EnumerateArray() -> tensorsOf g ]
           Cases =
             [ for c in root.GetProperty("cases").EnumerateArray() ->
                   { Name = c.GetProperty("name").GetString()
                     Settings = c.GetProperty("settings").Clone()
                     Steps = [ for s in c.GetProperty("steps").EnumerateArray() -> tensorsOf s ] } ] })

let private case (name: string) = golden.Value.Cases |> List.find (fun c -> c.Name = name)

/// Flat parameters "w" (a matrix) and "b" (a vector) holding the golden's initial values.
let private goldenFlat () =
    let g = golden.Value
    let parameters =
        List.mapi2
            (fun i (shape: int64[]) (values: float32[]) ->
                let p = new Modules.Parameter(torch.tensor(values).reshape shape)
                struct ((if i = 0 then "w" else "b"), p))
            g.Shapes
            g.Initial
    FlatParameters.create parameters

let private flatArray (t: torch.Tensor) : float32[] =
    use contiguous = t.detach().contiguous ()
    contiguous.data<float32>().ToArray()

let private lr = 0.01
let private constant (_: int) = lr

/// The transform of a golden case, over flat parameters (the weight decay applies everywhere, as in the script).
let private transformOf (flat: FlatParameters) (mask: torch.Tensor) (name: string) : Transform =
    let adafactorSettings relative =
        { Transform.adafactorDefaults with RelativeStep = relative; ScaleParameter = relative; WeightDecay = 0.1 }
    match name with
    | "adamw_amsgrad" -> Optimizer.adamWWith constant 0.9 0.9 1e-8 0.1 mask true false
    | "adamw_maximize" -> Optimizer.adamWWith constant 0.9 0.999 1e-8 0.1 mask false true
    | "sgd_dampening" -> Optimizer.sgdWith constant 0.9 0.5 false 0.1 mask
    | "rmsprop" -> Optimizer.rmsprop constant 0.99 1e-8 0.0 false 0.1 mask
    | "rmsprop_centered_momentum" -> Optimizer.rmsprop constant 0.99 1e-8 0.9 true 0.1 mask
    | "rmsprop_alpha_eps_centered" -> Optimizer.rmsprop constant 0.9 1e-6 0.0 true 0.1 mask
    | "lion" -> Optimizer.lion constant 0.9 0.99 0.1 mask
    | "adafactor" -> Optimizer.adafactor constant (Transform.slotsOf flat) (adafactorSettings false) mask
    | "adafactor_relative" -> Optimizer.adafactor constant (Transform.slotsOf flat) (adafactorSettings true) mask
    | "adafactor_clip_decay_scaled" ->
        let settings = { adafactorSettings false with ScaleParameter = true; ClipThreshold = 0.5; DecayRate = -0.6 }
        Optimizer.adafactor constant (Transform.slotsOf flat) settings mask
    | other -> failwithf "no transform for golden case %s" other

let private tolerance = 2e-6f

/// Expects the flat values to equal the golden parameters of step k (from 1) to float tolerance.
let private expectStep (c: GoldenCase) (k: int) (flat: FlatParameters) =
    let expected = Array.concat c.Steps[k - 1]
    let actual = flatArray flat.Values
    Expect.equal actual.Length expected.Length "element count"
    let worst = Array.map2 (fun (a: float32) e -> abs (a - e) / max 1.0f (abs e)) actual expected |> Array.max
    Expect.isLessThanOrEqual worst tolerance (sprintf "%s step %d: worst relative difference %g" c.Name k worst)

let private setGradients (flat: FlatParameters) (k: int) =
    use g = torch.tensor (Array.concat golden.Value.Gradients[k - 1])
    flat.Grads.copy_ g |> ignore

/// Runs the golden case through a FlatOptimizer step by step, checking every step.
let private runGolden (name: string) (makeOptimizer: FlatParameters -> torch.Tensor -> FlatOptimizer) =
    let c = case name
    use flat = goldenFlat ()
    use mask = FlatParameters.uniform flat 1.0f
    let optimizer = makeOptimizer flat mask
    let mutable state = optimizer.Transform.Init flat.Values
    for k in 1 .. c.Steps.Length do
        setGradients flat k
        state <- optimizer.Step flat state None
        expectStep c k flat
    state.Dispose()

let private unfusedCase (name: string) =
    runGolden name (fun flat mask -> Optimizer.unfused (transformOf flat mask name))

let private goldenNames =
    [ "adamw_amsgrad"; "adamw_maximize"; "sgd_dampening"; "rmsprop"; "rmsprop_centered_momentum"; "rmsprop_alpha_eps_centered"
      "lion"; "adafactor"; "adafactor_relative"; "adafactor_clip_decay_scaled" ]

/// The fused AdamW of the trainer (clipping only measuring, maxNorm 0) for a golden AdamW case.
let private fusedConfig (mask: torch.Tensor) (beta2: float) (amsgrad: bool) (maximize: bool) : AdamWConfig =
    { Schedule = constant
      Beta1 = 0.9
      Beta2 = beta2
      Epsilon = 1e-8
      WeightDecay = 0.1
      DecayMask = mask
      MaxGradNorm = 0.0
      NormReduction = Transform.localNorm
      Factors = None
      Amsgrad = amsgrad
      Maximize = maximize }

let private goldenTests =
    testList "torch" [
        for name in goldenNames do
            torchTest (sprintf "%s matches the reference step by step" name) (fun () -> unfusedCase name)
        torchTest "fused AdamW with maximize matches torch.optim.AdamW(maximize=True)" (fun () ->
            runGolden "adamw_maximize" (fun _ mask -> Optimizer.fusedAdamW (fusedConfig mask 0.999 false true)))
        for optim, optimArgs, name in
            [ OptimizerKind.RmsProp, "alpha=0.9, eps=1e-6, centered=True", "rmsprop_alpha_eps_centered"
              OptimizerKind.Adafactor, "clip_threshold=0.5,decay_rate=-0.6,scale_parameter=True", "adafactor_clip_decay_scaled"
              OptimizerKind.Sgd, "dampening=0.5", "sgd_dampening"
              OptimizerKind.AdamW, "amsgrad=True", "adamw_amsgrad" ] do
            torchTest (sprintf "the trainer's optimizer from --optim-args \"%s\" matches %s" optimArgs name) (fun () ->
                let c = case name
                let settings = c.Settings
                let options =
                    { TrainOptions.defaults with
                        Optimizer = optim
                        WeightDecay = 0.1
                        MaxGradNorm = 0.0
                        Momentum = (match settings.TryGetProperty "momentum" with | true, m -> m.GetDouble() | _ -> 0.0)
                        AdamBeta2 = (match settings.TryGetProperty "betas" with | true, b -> b[1].GetDouble() | _ -> 0.999) }
                    |> OptimizerArgs.apply "{optim_args}" optimArgs
                TrainOptions.validate options
                runGolden name (fun flat mask -> TrainingLoop.optimizer options constant mask None (Some(Transform.slotsOf flat))))
        torchTest "the trainer's AdamW with amsgrad matches torch.optim.AdamW(amsgrad=True)" (fun () ->
            runGolden "adamw_amsgrad" (fun _ mask -> Optimizer.fusedAdamW (fusedConfig mask 0.9 true false)))
        test "the golden file holds every case with six steps of both parameters" {
            let g = golden.Value
            Expect.equal (g.Cases |> List.map (fun c -> c.Name) |> List.sort) (List.sort goldenNames) "cases"
            for c in g.Cases do
                Expect.equal c.Steps.Length 6 (c.Name + ": steps")
                Expect.equal (c.Steps |> List.map (List.map Array.length)) (List.replicate 6 [ 12; 5 ]) (c.Name + ": sizes")
            let settings = (case "sgd_dampening").Settings
            Expect.equal (settings.GetProperty("dampening").GetDouble()) 0.5 "the SGD case has dampening 0.5"
            let betas = (case "adamw_amsgrad").Settings.GetProperty("betas")
            Expect.equal [ for b in betas.EnumerateArray() -> b.GetDouble() ] [ 0.9; 0.9 ] "the AMSGrad case's betas"
        }
    ]

/// Checkpoint round trips: three steps, the state exported and loaded into a fresh Init, three more steps
/// still match the reference (every buffer and counter travels).
let private resumeTests =
    testList "state round trip" [
        for name in goldenNames do
            torchTest (sprintf "%s resumes from exported state tensors" name) (fun () ->
                let c = case name
                use flat = goldenFlat ()
                use mask = FlatParameters.uniform flat 1.0f
                let transform = transformOf flat mask name
                let mutable state = transform.Init flat.Values
                for k in 1 .. 3 do
                    setGradients flat k
                    state <- Optimizer.apply transform flat state
                let saved =
                    [ for n, t in Transform.stateTensors state ->
                          let copy = t.clone().DetachFromDisposeScope()
                          t.Dispose()
                          n, copy ]
                Expect.equal (saved |> List.map fst) state.Names "exported under the state's names"
                state.Dispose()
                let mutable resumed = Transform.loadStateTensors saved (transform.Init flat.Values)
                for _, t in saved do t.Dispose()
                for k in 4 .. 6 do
                    setGradients flat k
                    resumed <- Optimizer.apply transform flat resumed
                    expectStep c k flat
                resumed.Dispose())
        torchTest "amsgrad adds max_exp_avg_sq, dampening adds trace.started, Adafactor exports its statistics" (fun () ->
            use flat = goldenFlat ()
            use mask = FlatParameters.uniform flat 1.0f
            let names name =
                use s = (transformOf flat mask name).Init flat.Values
                s.Names
            Expect.equal (names "adamw_amsgrad") [ "0.adam.exp_avg"; "0.adam.exp_avg_sq"; "0.adam.max_exp_avg_sq"; "0.adam.step"; "2.learning_rate.count" ] "amsgrad"
            Expect.equal (names "adamw_maximize") [ "0.adam.exp_avg"; "0.adam.exp_avg_sq"; "0.adam.step"; "2.learning_rate.count" ] "plain AdamW names"
            Expect.equal (names "sgd_dampening") [ "1.trace.momentum_buffer"; "1.trace.started"; "2.learning_rate.count" ] "dampened SGD"
            Expect.equal (names "lion") [ "0.lion.exp_avg"; "2.learning_rate.count" ] "Lion"
            Expect.equal (names "adafactor")
                [ "0.adafactor.exp_avg_sq_row"; "0.adafactor.exp_avg_sq_col"; "0.adafactor.exp_avg_sq"; "0.adafactor.step"; "1.learning_rate.count" ]
                "Adafactor"
            use s = (transformOf flat mask "adafactor").Init flat.Values
            let shapes =
                [ for n, t in s.Export() ->
                      let shape = t.shape
                      t.Dispose()
                      n, shape ]
            Expect.equal (shapes |> List.take 3 |> List.map snd) [ [| 1L; 3L |]; [| 1L; 4L |]; [| 1L; 5L |] ] "rows of w, columns of w, the vector b")
    ]

let private config = { FsCheckConfig.defaultConfig with maxTest = 60 }

/// Random gradients and parameters of a random size, exactly representable in fp32.
let private vectors =
    gen {
        let! size = Gen.choose (1, 30)
        let! seed = Gen.choose (0, Int32.MaxValue)
        let! steps = Gen.choose (1, 5)
        return size, seed, steps
    }
    |> Arb.fromGen

let private randomData (size: int) (seed: int) (steps: int) =
    let rng = Random seed
    let draw () = Array.init size (fun _ -> float32 (rng.Next(-1000, 1001)) / 256.0f)
    draw (), List.init steps (fun _ -> draw ())

/// Runs a transform from the given parameters over the gradients; the parameter values after each step.
let private trajectory (transform: Transform) (initial: float32[]) (grads: float32[] list) (negate: bool) =
    use parameters = torch.tensor initial
    let mutable state = transform.Init parameters
    let result =
        [ for g in grads do
              use _ = torch.no_grad ()
              use gradient = torch.tensor (if negate then Array.map (fun x -> -x) g else g)
              let updates, next = transform.Update gradient state parameters
              state <- next
              parameters.add_ updates |> ignore
              yield flatArray parameters ]
    state.Dispose()
    result

let private propertyTests =
    testList "properties" [
        testPropertyWithConfig config "AdamW with maximize equals AdamW minimizing the negated gradient, bit for bit"
            (Prop.forAll vectors (fun (size, seed, steps) ->
                TorchRuntime.ensure ()
                let initial, grads = randomData size seed steps
                use mask = torch.ones [| int64 size |]
                let make maximize = Optimizer.adamWWith constant 0.9 0.999 1e-8 0.1 mask false maximize
                trajectory (make true) initial grads false = trajectory (make false) initial grads true))

        testPropertyWithConfig config "SGD with dampening 0 equals the SGD without dampening, bit for bit and by state names"
            (Prop.forAll vectors (fun (size, seed, steps) ->
                TorchRuntime.ensure ()
                let initial, grads = randomData size seed steps
                use mask = torch.ones [| int64 size |]
                let nesterov = seed % 2 = 0
                let older = Optimizer.sgd constant 0.9 nesterov 0.1 mask
                let newer = Optimizer.sgdWith constant 0.9 0.0 nesterov 0.1 mask
                use p = torch.tensor initial
                use a = older.Init p
                use b = newer.Init p
                a.Names = b.Names && trajectory older initial grads false = trajectory newer initial grads false))

        testPropertyWithConfig config "SGD with dampening d: the first step is undampened, later ones damp the gradient by 1 - d"
            (Prop.forAll vectors (fun (size, seed, _) ->
                TorchRuntime.ensure ()
                let initial, grads = randomData size seed 2
                use mask = torch.ones [| int64 size |]
                // Momentum 0.5 with dampening 0.75 and lr 1 (exact in binary): buf1 = g1, buf2 = 0.5 g1 + 0.25 g2.
                let transform = Optimizer.sgdWith (fun _ -> 1.0) 0.5 0.75 false 0.0 mask
                let after = trajectory transform initial grads false
                let g1, g2 = grads[0], grads[1]
                let expected1 = Array.map2 (fun p g -> p - g) initial g1
                let expected2 = Array.init size (fun i -> expected1[i] - (0.5f * g1[i] + 0.25f * g2[i]))
                after[0] = expected1 && Array.forall2 (fun (a: float32) e -> abs (a - e) <= 1e-5f) after[1] expected2))

        testPropertyWithConfig config "Lion's updates are -lr, 0 or +lr in every entry without weight decay"
            (Prop.forAll vectors (fun (size, seed, steps) ->
                TorchRuntime.ensure ()
                let initial, grads = randomData size seed steps
                use mask = torch.ones [| int64 size |]
                let transform = Optimizer.lion constant 0.9 0.99 0.0 mask
                use parameters = torch.tensor initial
                let mutable state = transform.Init parameters
                let allowed = set [ -(float32 lr); 0.0f; float32 lr ]
                let ok =
                    [ for g in grads ->
                          use gradient = torch.tensor g
                          let updates, next = transform.Update gradient state parameters
                          state <- next
                          flatArray updates |> Array.forall allowed.Contains ]
                state.Dispose()
                List.forall id ok))

        testPropertyWithConfig config "AMSGrad keeps its maximum at least the second moment, and its steps no larger than Adam's on the first step"
            (Prop.forAll vectors (fun (size, seed, steps) ->
                TorchRuntime.ensure ()
                let initial, grads = randomData size seed steps
                let transform = Transform.scaleByAdamWith 0.9 0.999 1e-8 true false
                use parameters = torch.tensor initial
                let mutable state = transform.Init parameters
                let ok =
                    [ for g in grads ->
                          use gradient = torch.tensor g
                          let _, next = transform.Update gradient state parameters
                          state <- next
                          match Transform.tryFindState<Transform.AdamState> state with
                          | Some adam ->
                              let m = flatArray adam.MaxExpAvgSq.Value
                              let v = flatArray adam.ExpAvgSq
                              Array.forall2 (fun a b -> a >= b) m v
                          | None -> false ]
                state.Dispose()
                List.forall id ok))

        testPropertyWithConfig config "Adafactor's update has a root mean square of at most the learning rate per parameter"
            (Prop.forAll vectors (fun (size, seed, steps) ->
                TorchRuntime.ensure ()
                let rows = 1 + seed % 4
                let _, grads = randomData (rows * size) seed steps
                use w = new Modules.Parameter(torch.zeros([| int64 rows; int64 size |]))
                use b = new Modules.Parameter(torch.zeros([| int64 size |]))
                use flat = FlatParameters.create [ struct ("w", w); struct ("b", b) ]
                use mask = FlatParameters.uniform flat 1.0f
                let settings = { Transform.adafactorDefaults with RelativeStep = false; ScaleParameter = false }
                let transform = Optimizer.adafactor constant (Transform.slotsOf flat) settings mask
                let mutable state = transform.Init flat.Values
                let rms (xs: float32[]) = sqrt ((xs |> Array.sumBy (fun x -> float x * float x)) / float xs.Length)
                let ok =
                    [ for g in grads ->
                          use gradient = torch.tensor (Array.append g (Array.sub g 0 size))
                          let updates, next = transform.Update gradient state flat.Values
                          state <- next
                          let u = flatArray updates
                          rms u[.. rows * size - 1] <= lr * (1.0 + 1e-5) && rms u[rows * size ..] <= lr * (1.0 + 1e-5) ]
                state.Dispose()
                List.forall id ok))
    ]

let private optionTests =
    testList "options" [
        test "every HF optim name here parses; unknown names are refused with the supported ones listed" {
            for name, kind in OptimizerKind.names do
                Expect.equal (OptimizerKind.parse "--optim" (" " + name.ToUpperInvariant())) kind name
            Expect.equal (OptimizerKind.tryParse "adamw_torch_fused") (Some OptimizerKind.AdamW) "fused AdamW is AdamW"
            Expect.equal (OptimizerKind.tryParse "lion_32bit") (Some OptimizerKind.Lion) "lion_32bit"
            expectInvalidInput "--optim" "" [ "adamw_8bit"; "adafactor"; "lion_32bit"; "rmsprop"; "adamw_torch_fused" ] (fun () ->
                OptimizerKind.parse "--optim" "adamw_8bit" |> ignore)
        }
        test "validate refuses dampening outside SGD, Nesterov with dampening and amsgrad/maximize outside AdamW" {
            let d = TrainOptions.defaults
            expectInvalidInput "--dampening" "" [ "sgd" ] (fun () -> TrainOptions.validate { d with Dampening = 0.5 })
            expectInvalidInput "--nesterov" "" [ "dampening" ] (fun () ->
                TrainOptions.validate { d with Optimizer = OptimizerKind.Sgd; Momentum = 0.9; Nesterov = true; Dampening = 0.5 })
            expectInvalidInput "--amsgrad" "" [ "adamw" ] (fun () -> TrainOptions.validate { d with Optimizer = OptimizerKind.Lion; Amsgrad = true })
            expectInvalidInput "--maximize" "" [ "adamw" ] (fun () -> TrainOptions.validate { d with Optimizer = OptimizerKind.Sgd; Maximize = true })
            TrainOptions.validate { d with Optimizer = OptimizerKind.Sgd; Momentum = 0.9; Dampening = 0.5 }
            TrainOptions.validate { d with Amsgrad = true; Maximize = true }
        }
        test "--optim-args: each optimizer takes its constructor's keywords; everything else is refused, saying why" {
            let d = TrainOptions.defaults
            let rms = { d with Optimizer = OptimizerKind.RmsProp }
            let applied = OptimizerArgs.apply "{optim_args}" " alpha = 0.5 ,EPS=1e-5,centered=yes" rms
            Expect.equal (applied.RmsPropAlpha, applied.RmsPropEpsilon, applied.RmsPropCentered) (0.5, 1e-5, true) "rmsprop's keys, blanks and case ignored"
            Expect.equal (OptimizerArgs.apply "{optim_args}" "" rms) rms "an empty text changes nothing"
            let fails text options location (parts: string list) =
                expectInvalidInput "--optim-args" location parts (fun () -> OptimizerArgs.apply "{optim_args}" text options |> ignore)
            fails "beta=0.5" rms "beta" [ "rmsprop"; "alpha, eps, centered" ]
            fails "momentum=0.9" rms "momentum" [ "set by --momentum" ]
            fails "lr=0.1" d "lr" [ "set by --learning-rate" ]
            fails "betas=0.9" d "betas" [ "--adam-beta1" ]
            fails "eps=1e-6" d "eps" [ "--adam-epsilon" ]
            fails "alpha" rms "" [ "key=value"; "'alpha'" ]
            fails "alpha=0.5,alpha=0.6" rms "alpha" [ "twice" ]
            fails "centered=maybe" rms "centered" [ "True or False"; "maybe" ]
            fails "alpha=nan" rms "alpha" [ "finite" ]
            fails "betas=0.9" { d with Optimizer = OptimizerKind.Lion } "betas" [ "--adam-beta1" ]
            fails "foo=1" { d with Optimizer = OptimizerKind.Lion } "foo" [ "lion_32bit"; "takes no" ]
            fails "relative_step=True" { d with Optimizer = OptimizerKind.Adafactor } "relative_step" [ "lr=None" ]
            fails "beta1=0.9" { d with Optimizer = OptimizerKind.Adafactor } "beta1" [ "first moment" ]
            fails "fused=True" d "fused" [ "kernel" ]
            fails "amsgrad=False" { d with Amsgrad = true } "amsgrad" [ "contradicts --amsgrad" ]
            fails "dampening=0.3" { d with Optimizer = OptimizerKind.Sgd; Dampening = 0.5 } "dampening" [ "contradicts --dampening" ]
            let sgd = OptimizerArgs.apply "{optim_args}" "dampening=0.5" { d with Optimizer = OptimizerKind.Sgd; Dampening = 0.5 }
            Expect.equal sgd.Dampening 0.5 "the same value as the flag is accepted"
            let ada = OptimizerArgs.apply "{optim_args}" "clip_threshold=2,decay_rate=-0.5,scale_parameter=1" { d with Optimizer = OptimizerKind.Adafactor }
            Expect.equal (ada.AdafactorClipThreshold, ada.AdafactorDecayRate, ada.AdafactorScaleParameter) (2.0, -0.5, true) "adafactor's keys"
            expectInvalidInput "--optim-args" "alpha" [ "[0, 1]" ] (fun () -> TrainOptions.validate { rms with RmsPropAlpha = 1.5 })
            expectInvalidInput "--optim-args" "decay_rate" [ "< 0" ] (fun () ->
                TrainOptions.validate { d with Optimizer = OptimizerKind.Adafactor; AdafactorDecayRate = 0.5 })
            expectInvalidInput "--optim-args" "" [ "rmsprop" ] (fun () -> TrainOptions.validate { d with RmsPropCentered = true })
            expectInvalidInput "--optim-args" "" [ "adafactor" ] (fun () -> TrainOptions.validate { rms with AdafactorScaleParameter = true })
        }
        torchTest "the trainer refuses Adafactor on ZeRO's blocks of parameters and builds every optimizer otherwise" (fun () ->
            use w = new Modules.Parameter(torch.zeros([| 2L; 3L |]))
            use flat = FlatParameters.create [ struct ("w", w) ]
            use mask = FlatParameters.uniform flat 1.0f
            let options = { TrainOptions.defaults with Optimizer = OptimizerKind.Adafactor }
            expectInvalidInput "--optim" "" [ "adafactor"; "ZeRO" ] (fun () ->
                TrainingLoop.optimizerWith Transform.localNorm options constant mask None None |> ignore)
            for _, kind in OptimizerKind.names do
                let optimizer =
                    TrainingLoop.optimizer { TrainOptions.defaults with Optimizer = kind } constant mask None (Some(Transform.slotsOf flat))
                use state = optimizer.Transform.Init flat.Values
                Expect.isTrue (Optimizer.appliedUpdates state = 0) (sprintf "%A: a fresh state has applied no update" kind))
    ]

[<Tests>]
let tests = testList "optimizer goldens" [ goldenTests; resumeTests; propertyTests; optionTests ]

/// Arguments that train the small golden LLaMA for two steps with an optimizer.
let private trainArgs (model: string) (data: string) (output: string) (optim: string) =
    [ "train"; "--model"; model; "--data"; data; "--output"; output; "--optim"; optim
      "--per-device-train-batch-size"; "2"; "--max-steps"; "2"; "--save-steps"; "1"
      "--max-seq-len"; "32"; "--learning-rate"; "1e-3"; "--weight-decay"; "0.01"; "--no-data-cache" ]

[<Tests>]
let cliTests =
    testList "optimizer cli" [
        for optim, extra in
            [ "adafactor", []
              "lion_32bit", []
              "rmsprop", []
              "adamw_torch_fused", []
              "rmsprop", [ "--optim-args"; "alpha=0.9,eps=1e-6,centered=True" ]
              "adafactor", [ "--optim_args"; "clip_threshold=0.5,scale_parameter=True" ] ] do
            test (sprintf "functional train --optim %s %s trains two steps and resumes to the same weights" optim (String.Join(" ", extra))) {
                use folder = new TempFolder()
                copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (folder.File "model")
                let data = folder.File "data.jsonl"
                File.Copy(Path.Combine(goldenDir "llama-cosine", "data.jsonl"), data)
                let full = folder.File "full"
                let run = runCli (trainArgs (folder.File "model") data full optim @ extra)
                Expect.equal run.ExitCode 0 (sprintf "exit code (stderr: %s)" run.Stderr)
                let weights (output: string) = File.ReadAllBytes(Path.Combine(output, "final", "model.safetensors"))
                let resumed = folder.File "resumed"
                copyFolder full resumed
                for name in [ "checkpoint-2"; "final" ] do Directory.Delete(Path.Combine(resumed, name), true)
                let again = runCli (trainArgs (folder.File "model") data resumed optim @ extra @ [ "--overwrite-output-dir"; "--resume-from-checkpoint"; "latest" ])
                Expect.equal again.ExitCode 0 (sprintf "resume exit code (stderr: %s)" again.Stderr)
                Expect.isTrue (weights resumed = weights full) "resuming from checkpoint-1 gives the same final weights"
                if not extra.IsEmpty then
                    let plain = folder.File "plain"
                    let without = runCli (trainArgs (folder.File "model") data plain optim)
                    Expect.equal without.ExitCode 0 (sprintf "exit code without --optim-args (stderr: %s)" without.Stderr)
                    Expect.isFalse (weights plain = weights full) "--optim-args changes the update"
                    let other = folder.File "other"
                    copyFolder full other
                    for name in [ "checkpoint-2"; "final" ] do Directory.Delete(Path.Combine(other, name), true)
                    let mismatch = runCli (trainArgs (folder.File "model") data other optim @ [ "--overwrite-output-dir"; "--resume-from-checkpoint"; "latest" ])
                    Expect.equal mismatch.ExitCode 2 (sprintf "resuming without the --optim-args is refused (stderr: %s)" mismatch.Stderr)
                    Expect.stringContains mismatch.Stderr "--optimizer" "the refusal names the optimizer setting"
            }
        test "functional train refuses an --optim-args key the optimizer does not take, listing the ones it takes" {
            use folder = new TempFolder()
            copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (folder.File "model")
            let data = folder.File "data.jsonl"
            File.Copy(Path.Combine(goldenDir "llama-cosine", "data.jsonl"), data)
            let output = folder.File "out"
            let run = runCli (trainArgs (folder.File "model") data output "rmsprop" @ [ "--optim-args"; "alpha=0.9,betas=0.9" ])
            Expect.equal run.ExitCode 2 (sprintf "exit code 2 (stderr: %s)" run.Stderr)
            Expect.stringContains run.Stderr "--optim-args:betas: unknown key for the rmsprop optimizer (expected alpha, eps, centered)" "one clear line"
            Expect.isFalse (Directory.Exists output) "no output folder is created"
        }
        test "functional train refuses an unknown --optim, listing the supported names" {
            use folder = new TempFolder()
            copyFolder (Path.Combine(goldenDir "llama-cosine", "model")) (folder.File "model")
            let data = folder.File "data.jsonl"
            File.Copy(Path.Combine(goldenDir "llama-cosine", "data.jsonl"), data)
            let run = runCli (trainArgs (folder.File "model") data (folder.File "out") "adamw_bnb_8bit")
            Expect.equal run.ExitCode 2 (sprintf "exit code 2 (stderr: %s)" run.Stderr)
            for part in [ "--optim"; "adamw_bnb_8bit"; "adafactor"; "lion_32bit" ] do
                Expect.stringContains run.Stderr part "names the option, the value and the supported names"
        }
    ]
