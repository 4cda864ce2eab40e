namespace Functional.Training

open System

/// One prompt/answer pair of the embedded task.
type TaskSample =
    { /// The instruction, in DeepSpeed-Chat's " Human: ... Assistant:" style.
      Prompt: string
      /// The expected answer (starts with a space, as the prompt ends with "Assistant:").
      Answer: string }

/// The synthetic instruction task the embedded default run learns: reverse or sort a few letters,
/// e.g. " Human: reverse k d a q Assistant:" -> " q a d k". Deterministic from a seed; the held-out
/// set never shares a letter sequence with the training set.
[<RequireQualifiedAccess>]
module EmbeddedTask =

    let private letters = "abcdefghijklmnopqrstuvwxyz"

    /// The prompt for an instruction ("reverse" or "sort") over letters.
    let prompt (instruction: string) (letters: char[]) =
        sprintf " Human: %s %s Assistant:" instruction (String.Join(" ", letters))

    /// The answer an instruction expects.
    let answer (instruction: string) (letters: char[]) =
        let result =
            match instruction with
            | "reverse" -> Array.rev letters
            | "sort" -> Array.sort letters
            | other -> invalidArg (nameof instruction) (sprintf "unknown instruction %s" other)
        " " + String.Join(" ", result)

    /// A sample's letters are held out when their hash falls in one of 20 buckets, so the train and
    /// held-out sets never share a letter sequence.
    let private heldOut (letters: char[]) =
        let mutable h = 17
        for c in letters do h <- h * 31 + int c
        (h &&& 0x7fffffff) % 20 = 0

    /// count samples of the training (heldOut = false) or held-out (true) set, drawn from seed: an
    /// instruction (reverse or sort) over 4 to 6 random letters.
    let samples (seed: int) (count: int) (heldOutSet: bool) : TaskSample[] =
        let random = Random seed
        seq {
            while true do
                let instruction = if random.Next 2 = 0 then "reverse" else "sort"
                let chosen = Array.init (random.Next(4, 7)) (fun _ -> letters[random.Next letters.Length])
                if heldOut chosen = heldOutSet then
                    yield { Prompt = prompt instruction chosen; Answer = answer instruction chosen }
        }
        |> Seq.truncate count
        |> Array.ofSeq
