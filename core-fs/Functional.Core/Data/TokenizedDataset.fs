namespace Functional.Data

open System
open System.IO
open System.Text
open System.Text.Json
open Functional

/// Rows of token ids, as PromptDataset makes them from a data file. Line numbers are kept so later
/// checks (e.g. ids outside the vocabulary) can name the line.
[<NoComparison>]
type TokenizedDataset =
    { /// The file the rows were read from.
      Path: string
      /// Token ids of each row, in file order.
      Rows: int64[][]
      /// The 1-based line number (or JSON array index + 1) of each row in Path.
      Lines: int[]
      /// Leading tokens of each row that the loss ignores (the prompt when training on the
      /// completion only; 0 when every token is trained on).
      PromptLengths: int[]
      /// Per row, per token, whether the loss predicts it (assistant-only training: the tokens of the
      /// assistant turns); PromptLengths is then 0. Empty (no entry at all) when PromptLengths decide.
      TrainMasks: bool[][] }

/// Checks of tokenized data.
[<RequireQualifiedAccess>]
module TokenizedDataset =

    /// Raises InvalidInputException naming the line of the first token id >= vocabSize.
    let checkVocabulary (vocabSize: int) (dataset: TokenizedDataset) =
        dataset.Rows
        |> Array.iteri (fun r row ->
            match Array.tryFindIndex (fun id -> id >= int64 vocabSize) row with
            | Some i ->
                InvalidInput.fail dataset.Path (sprintf "%d: input_ids[%d]" dataset.Lines[r] i)
                    (sprintf "token id %d is outside the model's vocabulary (vocab_size %d)" row[i] vocabSize)
            | None -> ())
