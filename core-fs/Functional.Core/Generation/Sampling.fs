namespace Functional.Generation

open System
open TorchSharp
open Functional

/// How the next token is chosen from the logits, as HF transformers' generate does it: greedy
/// (do_sample=False) or sampling after temperature, top-k and top-p (in that order, as HF's
/// TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper).
type SamplingOptions =
    { /// Take the most likely token (argmax); the other fields except Seed are then not used.
      Greedy: bool
      /// Logits are divided by it before sampling (> 0; 1.0 leaves them as they are).
      Temperature: float
      /// Keep only the TopK most likely tokens (>= 0; 0 turns the filter off).
      TopK: int
      /// Keep the smallest set of most likely tokens whose probability sums to at least TopP (in (0, 1];
      /// 1.0 turns the filter off). The most likely token is always kept.
      TopP: float
      /// Seed of the torch.Generator the draws come from: the same seed gives the same tokens.
      Seed: int64 }

/// Default sampling options and their validation.
[<RequireQualifiedAccess>]
module SamplingOptions =

    /// Greedy decoding with neutral sampling fields: Temperature 1.0, TopK 0, TopP 1.0, Seed 0.
    let greedy =
        { Greedy = true
          Temperature = 1.0
          TopK = 0
          TopP = 1.0
          Seed = 0L }

    /// Checks every field (Greedy or not), raising InvalidInputException naming the command-line option:
    /// --temperature must be > 0, --top-k >= 0, --top-p in (0, 1].
    let validate (options: SamplingOptions) =
        if not (options.Temperature > 0.0 && Double.IsFinite options.Temperature) then
            InvalidInput.setting "temperature" (sprintf "expected a number > 0, found %g" options.Temperature)
        if options.TopK < 0 then
            InvalidInput.setting "top_k" (sprintf "expected an integer >= 0 (0 turns top-k off), found %d" options.TopK)
        if not (options.TopP > 0.0 && options.TopP <= 1.0) then
            InvalidInput.setting "top_p" (sprintf "expected a number in (0, 1] (1 turns top-p off), found %g" options.TopP)

/// Choosing next tokens from logits.
[<RequireQualifiedAccess>]
module Sampling =

    /// The logits (B, V) as sampling sees them, in fp32: divided by the temperature, then every token
    /// outside the TopK largest set to -inf (ties with the k-th kept, as HF), then every token outside the
    /// nucleus set to -inf. The nucleus, as HF's TopPLogitsWarper: sorted ascending, a token goes when
    /// the cumulative probability up to and including it is <= 1 - TopP; the most likely token stays.
    let filterLogits (options: SamplingOptions) (logits: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let vocab = logits.shape[logits.shape.Length - 1]
        let scores = logits.to_type torch.float32
        let scores = if options.Temperature <> 1.0 then scores / options.Temperature else scores
        let scores =
            if options.TopK > 0 && int64 options.TopK < vocab then
                let struct (top, _) = scores.topk(options.TopK, dim = -1) // (B, k), descending
                let kth = top.narrow(-1L, int64 options.TopK - 1L, 1L) // (B, 1)
                scores.masked_fill(scores.lt kth, Double.NegativeInfinity)
            else scores
        let scores =
            if options.TopP < 1.0 then
                let struct (sorted, order) = scores.sort(dim = -1L, descending = false) // (B, V) ascending
                let cumulative = sorted.softmax(-1L).cumsum(-1L) // (B, V)
                let dropSorted = cumulative.le(torch.tensor(1.0 - options.TopP, dtype = torch.float32, device = scores.device))
                dropSorted.narrow(-1L, vocab - 1L, 1L).fill_(false) |> ignore // the most likely token stays
                let drop = dropSorted.scatter(-1L, order, dropSorted) // back to vocabulary order
                scores.masked_fill(drop, Double.NegativeInfinity)
            else scores
        scope.MoveToOuter(scores.alias ())

    /// The next token of each row, (B) int64, from logits (B, V): the argmax when Greedy, else a draw
    /// from softmax(filterLogits options logits) with the generator (on the logits' device).
    let nextTokens (options: SamplingOptions) (generator: torch.Generator) (logits: torch.Tensor) : torch.Tensor =
        if options.Greedy then logits.argmax(-1L)
        else
            use scope = torch.NewDisposeScope()
            let probabilities = (filterLogits options logits).softmax(-1L) // (B, V)
            let drawn = probabilities.multinomial(1L, false, generator) // (B, 1)
            scope.MoveToOuter(drawn.squeeze(-1L))
