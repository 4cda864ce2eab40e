/// reduce_lr_on_plateau's state machine against torch.optim.lr_scheduler.ReduceLROnPlateau (golden
/// learning rates of tools/reference/make_plateau_golden.py) and its properties.
module Functional.Tests.PlateauTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional

/// PlateauOptions from the torch keyword arguments of a golden case.
let private optionsOf (settings: JsonElement) =
    settings.EnumerateObject()
    |> Seq.fold
        (fun (o: PlateauOptions) p ->
            match p.Name with
            | "mode" -> { o with Mode = (if p.Value.GetString() = "max" then PlateauMode.Max else PlateauMode.Min) }
            | "factor" -> { o with Factor = p.Value.GetDouble() }
            | "patience" -> { o with Patience = p.Value.GetInt32() }
            | "threshold" -> { o with Threshold = p.Value.GetDouble() }
            | "threshold_mode" ->
                { o with ThresholdMode = (if p.Value.GetString() = "abs" then ThresholdMode.Absolute else ThresholdMode.Relative) }
            | "cooldown" -> { o with Cooldown = p.Value.GetInt32() }
            | "min_lr" -> { o with MinLr = p.Value.GetDouble() }
            | "eps" -> { o with Eps = p.Value.GetDouble() }
            | other -> failtestf "unknown setting %s in the golden file" other)
        PlateauOptions.Defaults

/// The learning rates after each metric.
let private run (options: PlateauOptions) (baseLr: float) (metrics: float seq) =
    metrics |> Seq.scan (Plateau.step options) (Plateau.init options baseLr) |> Seq.skip 1 |> Seq.map (fun s -> s.LearningRate) |> List.ofSeq

let private golden =
    test "equals torch's ReduceLROnPlateau on every golden case, bit for bit" {
        use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestUtil.goldenDir "schedules", "plateau.json")))
        let cases = doc.RootElement.GetProperty("cases").EnumerateArray() |> List.ofSeq
        Expect.isGreaterThanOrEqual cases.Length 10 "ten cases"
        for c in cases do
            let name = c.GetProperty("name").GetString()
            let metrics = c.GetProperty("metrics").EnumerateArray() |> Seq.map (fun m -> m.GetDouble()) |> List.ofSeq
            let expected = c.GetProperty("lrs").EnumerateArray() |> Seq.map (fun m -> m.GetDouble()) |> List.ofSeq
            let actual = run (optionsOf (c.GetProperty "settings")) (c.GetProperty("base_lr").GetDouble()) metrics
            Expect.sequenceEqual actual expected name
            Expect.isTrue (List.distinct expected |> List.length > 1) (sprintf "%s: the case reduces at least once" name)
    }

/// Random settings and metric sequences.
let private settings =
    gen {
        let! mode = Gen.elements [ PlateauMode.Min; PlateauMode.Max ]
        let! thresholdMode = Gen.elements [ ThresholdMode.Relative; ThresholdMode.Absolute ]
        let! factor = Gen.choose (0, 99) |> Gen.map (fun i -> float i / 100.0)
        let! patience = Gen.choose (0, 5)
        let! cooldown = Gen.choose (0, 3)
        let! threshold = Gen.choose (0, 100) |> Gen.map (fun i -> float i * 1e-3)
        let! minLr = Gen.frequency [ 2, Gen.constant 0.0; 1, Gen.choose (1, 50) |> Gen.map (fun i -> float i * 1e-3) ]
        let! eps = Gen.elements [ 1e-8; 0.0; 1e-3 ]
        return
            { Mode = mode; Factor = factor; Patience = patience; Threshold = threshold; ThresholdMode = thresholdMode
              Cooldown = cooldown; MinLr = minLr; Eps = eps }
    }

let private metrics = Gen.listOf (Gen.choose (0, 40) |> Gen.map (fun i -> float i / 10.0))

let private cases = Gen.zip settings metrics |> Arb.fromGen
let private config = { FsCheckConfig.defaultConfig with maxTest = 300 }

let private properties =
    testList "properties" [
        testPropertyWithConfig config "the rate never rises, never falls below min(base, min_lr), and only falls by factor or to min_lr"
        <| Prop.forAll cases (fun (o, ms) ->
            let baseLr = 0.1
            let rates = baseLr :: run o baseLr ms
            rates
            |> List.pairwise
            |> List.forall (fun (a, b) -> b = a || (b < a && (b = a * o.Factor || b = o.MinLr) && a - b > o.Eps))
            && rates |> List.forall (fun r -> r >= min baseLr o.MinLr))
        testPropertyWithConfig config "a metric that improves significantly at every evaluation never reduces the rate"
        <| Prop.forAll cases (fun (o, ms) ->
            // 1.5^k + 1 rising (max) or falling below 0 (min): each step beats the best by at least 25% and 0.5.
            let improving =
                ms |> List.mapi (fun k _ -> match o.Mode with PlateauMode.Max -> 1.5 ** float k + 1.0 | PlateauMode.Min -> -(1.5 ** float k) - 1.0)
            run o 0.1 improving |> List.forall ((=) 0.1))
        testPropertyWithConfig config "a flat metric first reduces on evaluation patience + 2, then every patience + cooldown + 1"
        <| Prop.forAll (Arb.fromGen settings) (fun o ->
            let o = { o with MinLr = 0.0; Eps = 0.0; Factor = max 0.5 o.Factor }
            let n = 3 * (o.Patience + o.Cooldown + 2)
            let rates = run o 1.0 (List.replicate n 1.0)
            let reductions = 1.0 :: rates |> List.pairwise |> List.indexed |> List.filter (fun (_, (a, b)) -> b < a) |> List.map (fst >> (+) 1)
            let expected =
                List.unfold (fun at -> if at <= n then Some(at, at + o.Patience + o.Cooldown + 1) else None) (o.Patience + 2)
            reductions = expected)
        testPropertyWithConfig config "a NaN metric counts as no improvement"
        <| Prop.forAll (Arb.fromGen settings) (fun o ->
            let s = Plateau.step o (Plateau.init o 1.0) 1.0
            let after = Plateau.step o s nan
            after.Best = 1.0 && (after.BadEvaluations = 1 || after.LearningRate < 1.0 || s.CooldownLeft > 0))
    ]

let private validation =
    test "settings out of torch's range are refused naming the argument" {
        let d = PlateauOptions.Defaults
        for o, name in
            [ { d with Factor = 1.0 }, "factor"; { d with Patience = -1 }, "patience"; { d with Cooldown = -1 }, "cooldown"
              { d with Threshold = nan }, "threshold"; { d with MinLr = -1.0 }, "min_lr"; { d with Eps = -1.0 }, "eps" ] do
            let e = Expect.throwsC (fun () -> Plateau.validate o) id
            Expect.equal (e :?> ArgumentException).ParamName name name
    }

[<Tests>]
let tests = testList "reduce_lr_on_plateau" [ golden; properties; validation ]
