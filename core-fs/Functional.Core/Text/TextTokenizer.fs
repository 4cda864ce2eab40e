namespace Functional.Text

/// Ids of the special tokens a model uses. Pad falls back to eos when a model has no pad token, as
/// DeepSpeed-Chat does.
type SpecialTokens =
    { /// Beginning of sequence, if the model has one.
      Bos: int64 option
      /// End of sequence: generation stops there; packing separates samples with it.
      Eos: int64 option
      /// Padding (falls back to Eos).
      Pad: int64 option }

/// A tokenizer as the rest of the library sees it: text to ids and back, plus special tokens.
/// Built by the Tokenizers module from a model folder or an encoding name.
[<NoEquality; NoComparison>]
type TextTokenizer =
    { /// What was loaded: a model folder's path or an encoding name such as "cl100k_base".
      Name: string
      /// A hash of everything that decides the ids (vocabulary files, encoding name, special
      /// tokens), so caches of tokenized data can be keyed by it.
      Fingerprint: string
      /// Number of ids, including special tokens.
      VocabSize: int
      /// bos / eos / pad ids.
      Special: SpecialTokens
      /// Text to ids, adding no special tokens.
      Encode: string -> int64[]
      /// Ids to text; special tokens are left out.
      Decode: int64[] -> string }

/// Tokenizers that are not loaded from files.
[<RequireQualifiedAccess>]
module TextTokenizer =

    /// A stand-in for a tokenizer that is not there: pre-tokenized data needs none, and encoding text
    /// raises InvalidInputException(origin, "", problem), which says what is missing.
    let absent (origin: string) (problem: string) : TextTokenizer =
        { Name = "none"
          Fingerprint = "none"
          VocabSize = 0
          Special = { Bos = None; Eos = None; Pad = None }
          Encode = fun _ -> Functional.InvalidInput.fail origin "" problem
          Decode = fun _ -> "" }
