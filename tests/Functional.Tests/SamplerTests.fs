/// Epoch orders: the seeded shuffle and torch DistributedSampler's split over ranks.
module Functional.Tests.SamplerTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open Functional.Data

let private config = { FsCheckConfig.defaultConfig with maxTest = 300 }

/// (rows, world size, rank seed, shuffle, seed, epoch)
let private runs =
    gen {
        let! n = Gen.choose (0, 120)
        let! world = Gen.choose (1, 9)
        let! shuffle = Gen.elements [ true; false ]
        let! seed = Gen.choose (0, 10000)
        let! epoch = Gen.choose (0, 50)
        return n, world, shuffle, int64 seed, epoch
    }
    |> Arb.fromGen

let private allRanks (n, world, shuffle, seed, epoch) =
    Array.init world (fun rank -> Sampler.distributed rank world shuffle seed epoch n)

[<Tests>]
let tests =
    testList "sampler" [
        testPropertyWithConfig config "every rank gets ceil(n / world) rows" <| Prop.forAll runs (fun ((n, world, _, _, _) as run) ->
            allRanks run |> Array.forall (fun rows -> rows.Length = (n + world - 1) / world))
        testPropertyWithConfig config "the ranks together cover every row at least once per epoch" <| Prop.forAll runs (fun ((n, _, _, _, _) as run) ->
            let seen = allRanks run |> Array.concat |> Set.ofArray
            seen = Set.ofSeq (seq { 0 .. n - 1 }))
        testPropertyWithConfig config "when n is a multiple of the world size every row is visited exactly once" <| Prop.forAll runs (fun (n, world, shuffle, seed, epoch) ->
            let n = n - n % world
            let visits = allRanks (n, world, shuffle, seed, epoch) |> Array.concat
            Array.sort visits = Array.init n id)
        testPropertyWithConfig config "padding only repeats rows, from the start of the epoch's order" <| Prop.forAll runs (fun ((n, world, shuffle, seed, epoch) as run) ->
            let order = if shuffle then Sampler.shuffled seed epoch n else Sampler.sequential n
            let ranks = allRanks run
            let total = ranks[0].Length * world
            // Interleaving the ranks back gives the padded order: the order, then its first indices again.
            let padded = Array.init total (fun i -> ranks[i % world][i / world])
            padded = Array.init total (fun i -> order[i % n])
            && total - n < max 1 world)
        test "without shuffling the ranks take every world-th row of the padded file order, as torch" {
            Expect.equal (Sampler.distributed 0 2 false 0L 0 5) [| 0; 2; 4 |] "rank 0 of 2 over 5 rows"
            Expect.equal (Sampler.distributed 1 2 false 0L 0 5) [| 1; 3; 0 |] "rank 1 repeats row 0"
            Expect.equal (Sampler.distributed 2 4 false 0L 0 2) [| 0 |] "fewer rows than ranks repeat the whole order"
            Expect.equal (Sampler.distributed 3 4 false 0L 0 2) [| 1 |] "fewer rows than ranks, last rank"
        }
        testPropertyWithConfig config "the shuffled order is fixed by seed and epoch" <| Prop.forAll runs (fun (n, _, _, seed, epoch) ->
            Sampler.shuffled seed epoch n = Sampler.shuffled seed epoch n
            && Sampler.distributed 0 1 true seed epoch n = Sampler.shuffled seed epoch n)
        testPropertyWithConfig config "different epochs shuffle differently" <| Prop.forAll (Arb.fromGen (Gen.zip3 (Gen.choose (12, 300)) (Gen.choose (0, 10000)) (Gen.choose (0, 100)))) (fun (n, seed, epoch) ->
            Sampler.shuffled (int64 seed) epoch n <> Sampler.shuffled (int64 seed) (epoch + 1) n)
        test "an invalid rank or world size is rejected" {
            Expect.throwsT<ArgumentException> (fun () -> Sampler.distributed 0 0 false 0L 0 4 |> ignore) "world 0"
            Expect.throwsT<ArgumentException> (fun () -> Sampler.distributed 2 2 false 0L 0 4 |> ignore) "rank = world"
            Expect.throwsT<ArgumentException> (fun () -> Sampler.distributed -1 2 false 0L 0 4 |> ignore) "negative rank"
        }
    ]
