namespace Functional.Benchmarks

open System
open System.Diagnostics
open System.Text
open TorchSharp
open Functional
open Functional.Generation
open Functional.Models
open Functional.Runtime

/// One line of GenerationBenchmark.run's table.
type GenerationBenchmarkRow =
    { /// How many tokens were generated.
      NewTokens: int
      /// Wall-clock seconds per generated token with the key/value cache.
      CachedSecondsPerToken: float
      /// Wall-clock seconds per generated token recomputing the whole sequence every step.
      UncachedSecondsPerToken: float }

    /// How many times faster the cache made generation.
    member this.Speedup = this.UncachedSecondsPerToken / this.CachedSecondsPerToken

/// Measures what the key/value cache saves.
[<RequireQualifiedAccess>]
module GenerationBenchmark =

    /// How many times each run is timed; the median is reported.
    [<Literal>]
    let Repeats = 3

    /// For each length N, greedily generates N tokens after a one-token prompt (token 0, no eos), with
    /// the cache and recomputing the full forward every step, and returns the median over Repeats runs of
    /// the seconds per generated token of each. A warm-up run of each mode at the longest length comes
    /// first: tiered compilation promotes a method to optimized code only after 30 calls, and a short
    /// warm-up left the first timed run up to twice as slow; the median keeps one disturbed run (a 32-token
    /// run lasts about 20 ms) out of the figures. Raises InvalidInputException (naming --lengths) for a
    /// length <= 0 or beyond the model's context.
    let run (lm: CausalLm) (lengths: int list) : GenerationBenchmarkRow list =
        TorchRuntime.ensure ()
        for n in lengths do
            if n <= 0 then InvalidInput.setting "lengths" (sprintf "expected positive token counts, found %d" n)
            let limit = Generator.positionLimit lm
            if n > limit then
                InvalidInput.setting "lengths" (sprintf "%d new tokens exceed the positions left: %s" n (Generator.describeLimit lm limit))
        let prompt = [| [| 0L |] |]
        let secondsPerToken useCache newTokens =
            let options = { GenerationOptions.defaults with MaxNewTokens = newTokens; UseCache = useCache }
            let clock = Stopwatch.StartNew()
            let generated = Generator.generate lm prompt options
            clock.Elapsed.TotalSeconds / float generated[0].Length
        let median useCache newTokens =
            let times = Array.init Repeats (fun _ -> secondsPerToken useCache newTokens) |> Array.sort
            times[times.Length / 2]
        if not lengths.IsEmpty then
            let longest = List.max lengths
            secondsPerToken true longest |> ignore
            secondsPerToken false longest |> ignore
        [ for n in lengths ->
              { NewTokens = n
                CachedSecondsPerToken = median true n
                UncachedSecondsPerToken = median false n } ]

    /// The rows as a text table: new tokens, milliseconds per token with and without the cache, speedup.
    let format (rows: GenerationBenchmarkRow list) : string =
        let text = StringBuilder()
        text.AppendLine(sprintf "%10s %16s %18s %8s" "new tokens" "cached ms/token" "uncached ms/token" "speedup") |> ignore
        for row in rows do
            text.AppendLine(
                sprintf "%10d %16.3f %18.3f %7.1fx"
                    row.NewTokens (1000.0 * row.CachedSecondsPerToken) (1000.0 * row.UncachedSecondsPerToken) row.Speedup)
            |> ignore
        text.ToString()
