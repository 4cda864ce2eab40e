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

/// The ids of one text made of a prompt followed by an answer, encoded as one string.
type JoinedEncoding =
    { /// The ids of prompt + answer, no special tokens added.
      Ids: int64[]
      /// How many leading ids are tokens whose characters all lie in the prompt; a token that spans
      /// the boundary (holds characters of both) counts as the answer's.
      PromptTokens: int }

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
      /// Whether the tokenizer's own rule starts an encoded text with bos: what HF's
      /// `tokenizer(text)` (add_special_tokens=True) does; LLaMA's adds it, GPT-2's does not.
      AddsBos: bool
      /// Whether the tokenizer's own rule ends an encoded text with eos (HF's add_eos_token).
      AddsEos: bool
      /// Text to ids, adding no special tokens.
      Encode: string -> int64[]
      /// A prompt and an answer to the ids of their concatenation (one string, tokenized once, no
      /// special tokens added) and the number of tokens lying in the prompt, from character offsets.
      EncodeJoined: string -> string -> JoinedEncoding
      /// Ids to text; special tokens are left out.
      Decode: int64[] -> string }

/// Tokenizers that are not loaded from files, and the bos rule shared by training rows and prompts.
[<RequireQualifiedAccess>]
module TextTokenizer =

    /// What starts an encoded text: [bos] when addBos says so, by default (None) the tokenizer's own
    /// rule (AddsBos), else nothing. Raises InvalidInputException naming --add-bos when bos is asked
    /// for explicitly and the tokenizer has none.
    let leadingBos (addBos: bool option) (tokenizer: TextTokenizer) : int64[] =
        match addBos |> Option.defaultValue tokenizer.AddsBos, tokenizer.Special.Bos with
        | true, Some bos -> [| bos |]
        | true, None when addBos.IsSome ->
            Functional.InvalidInput.setting "add_bos" (sprintf "the tokenizer %s has no bos token" tokenizer.Name)
        | _ -> [||]

    /// A stand-in for a tokenizer that is not there: pre-tokenized data needs none, and encoding text
    /// raises InvalidInputException(origin, "", problem), which says what is missing.
    let absent (origin: string) (problem: string) : TextTokenizer =
        { Name = "none"
          Fingerprint = "none"
          VocabSize = 0
          Special = { Bos = None; Eos = None; Pad = None }
          AddsBos = false
          AddsEos = false
          Encode = fun _ -> Functional.InvalidInput.fail origin "" problem
          EncodeJoined = fun _ _ -> Functional.InvalidInput.fail origin "" problem
          Decode = fun _ -> "" }
