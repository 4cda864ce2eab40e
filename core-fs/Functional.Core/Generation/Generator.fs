namespace Functional.Generation

open System
open System.Diagnostics
open System.Text
open TorchSharp
open Functional
open Functional.Models
open Functional.Runtime
open Functional.Text

/// What Generator.generate does, as the fields of HF's GenerationConfig of the same meaning.
type GenerationOptions =
    { /// How many tokens to generate per prompt at most (max_new_tokens; > 0).
      MaxNewTokens: int
      /// How each token is chosen.
      Sampling: SamplingOptions
      /// A row stops after producing this token (eos_token_id); None: rows run to MaxNewTokens.
      EosId: int64 option
      /// Further tokens that stop a row after it produces them (a list eos_token_id: the end-of-turn token
      /// of a chat template, generate --chat); empty by default.
      StopIds: int64 list
      /// The token that left-pads shorter prompts and is fed to rows that have stopped (pad_token_id).
      /// Padding is masked, so its value only has to be a valid id.
      PadId: int64
      /// Keep keys and values of earlier positions (use_cache), so each step computes one position per
      /// row; false recomputes the whole sequence every step (for comparison and benchmarks).
      UseCache: bool }

/// Default generation options and their validation.
[<RequireQualifiedAccess>]
module GenerationOptions =

    /// 64 new tokens, greedy, no eos, pad id 0, with the cache.
    let defaults =
        { MaxNewTokens = 64
          Sampling = SamplingOptions.greedy
          EosId = None
          StopIds = []
          PadId = 0L
          UseCache = true }

    /// Checks the options, raising InvalidInputException naming the command-line option
    /// (--max-new-tokens must be > 0; the sampling options as SamplingOptions.validate).
    let validate (options: GenerationOptions) =
        if options.MaxNewTokens <= 0 then
            InvalidInput.setting "max_new_tokens" (sprintf "expected a positive integer, found %d" options.MaxNewTokens)
        SamplingOptions.validate options.Sampling

/// What Generator.generateWith reports after each step.
type GenerationStep =
    { /// The step's index from 0: step i chose the (i + 1)-th new token of each row still running.
      Step: int
      /// Per prompt, the token chosen at this step; None for a row that had already stopped.
      Tokens: int64 option[] }

/// The tensors carried from one step to the next; disposed when replaced.
[<NoEquality; NoComparison>]
type private DecodingState =
    { /// What the next step feeds: the new tokens (B, T_new) with the cache, the whole sequence without.
      Input: torch.Tensor
      /// (B, T_total) 0/1, 0 at left padding.
      Attention: torch.Tensor
      /// The keys and values of every position but the input's (with the cache only).
      Cache: KvCache option }

    member this.Tensors =
        [| yield this.Input
           yield this.Attention
           match this.Cache with
           | Some c -> yield! c.Tensors
           | None -> () |]

/// Text generation with a causal LM: batched, left-padded prompts, a key/value cache and HF's
/// stopping and sampling rules.
[<RequireQualifiedAccess>]
module Generator =

    let private vocabularySize (lm: CausalLm) = (ModelFamily.traits lm.Config).VocabSize

    /// The most positions the tokens can take: the model's context (FamilyTraits.PositionLimit: GPT-2's
    /// n_positions, LLaMA's max_position_embeddings) less those of a prefix.
    let positionLimit (lm: CausalLm) =
        (ModelFamily.traits lm.Config).PositionLimit - CausalLm.prefixLength lm

    /// How a position limit reads in messages: the config field, and what a prefix takes of it.
    let describeLimit (lm: CausalLm) (limit: int) =
        let field = (ModelFamily.traits lm.Config).PositionField
        match CausalLm.prefixLength lm with
        | 0 -> sprintf "the model's context is %s = %d" field limit
        | prefix -> sprintf "the model's context is %s = %d, %d of them taken by the prefix" field (limit + prefix) prefix

    /// The most new tokens the prompts can get within the model's context: the last new token is never
    /// fed back, so a batch whose longest prompt has n tokens has room for positionLimit - n + 1. Raises
    /// InvalidInputException (origin "prompts", location "prompt i") for a prompt longer than the context.
    let newTokenLimit (lm: CausalLm) (prompts: int64[][]) : int =
        let limit = positionLimit lm
        prompts
        |> Array.iteri (fun i prompt ->
            if prompt.Length > limit then
                InvalidInput.fail "prompts" (sprintf "prompt %d" (i + 1))
                    (sprintf "has %d tokens, but %s: at most %d fit (shorten the prompt)" prompt.Length (describeLimit lm limit) limit))
        if prompts.Length = 0 then limit
        else limit - (prompts |> Array.map Array.length |> Array.max) + 1

    let private checkInputs (lm: CausalLm) (prompts: int64[][]) (options: GenerationOptions) =
        GenerationOptions.validate options
        let vocab = int64 (vocabularySize lm)
        prompts
        |> Array.iteri (fun i prompt ->
            if prompt.Length = 0 then
                InvalidInput.fail "prompts" (sprintf "prompt %d" (i + 1)) "expected at least one token, found an empty prompt"
            prompt
            |> Array.iteri (fun j id ->
                if id < 0L || id >= vocab then
                    InvalidInput.fail "prompts" (sprintf "prompt %d, token %d" (i + 1) (j + 1))
                        (sprintf "expected a token id in [0, %d), found %d" vocab id)))
        if options.PadId < 0L || options.PadId >= vocab then
            InvalidInput.fail "pad token" "" (sprintf "expected a token id in [0, %d), found %d" vocab options.PadId)
        newTokenLimit lm prompts |> ignore

    /// generate, calling onStep after every step with the tokens chosen in it (to stream output).
    let generateWith (onStep: GenerationStep -> unit) (lm: CausalLm) (prompts: int64[][]) (options: GenerationOptions) : int64[][] =
        TorchRuntime.ensure ()
        checkInputs lm prompts options
        if prompts.Length = 0 then [||]
        else
            let model = lm.Module
            let device = (Seq.head (model.parameters ())).device
            let rows = prompts.Length
            let longest = prompts |> Array.map Array.length |> Array.max
            // Left padding: every prompt ends in the last column, so all rows continue in the same column.
            let padded = Array.init (rows * longest) (fun n ->
                let prompt = prompts[n / longest]
                let column = n % longest - (longest - prompt.Length)
                if column >= 0 then prompt[column] else options.PadId)
            let real = Array.init (rows * longest) (fun n -> if n % longest >= longest - prompts[n / longest].Length then 1L else 0L)
            let generated = Array.init rows (fun _ -> ResizeArray<int64>())
            let running = Array.create rows true
            let wasTraining = model.training
            model.eval ()
            try
                // Inference mode rather than no_grad: no version counters or view tracking on the many
                // small tensors of a decoding step (about 15% of a step on the embedded model). No tensor
                // made here leaves generate.
                use _ = torch.inference_mode true
                // Catches the state left at the end (or by an exception); each replaced state is freed at once.
                use _ = torch.NewDisposeScope()
                use generator = new torch.Generator(uint64 options.Sampling.Seed, device)
                let shape = [| int64 rows; int64 longest |]
                let mutable state =
                    { Input = torch.tensor(padded, ReadOnlySpan shape, device = device)
                      Attention = torch.tensor(real, ReadOnlySpan shape, device = device)
                      Cache = None }
                let mutable step = 0
                // Generation stops at the context, as HF's max_length: the batch's longest prompt decides.
                let maxNewTokens = min options.MaxNewTokens (newTokenLimit lm prompts)
                while step < maxNewTokens && Array.contains true running do
                    let chosen, next =
                        use scope = torch.NewDisposeScope()
                        let cache = if options.UseCache then state.Cache else None
                        let logits, newCache = CausalLm.nextTokenLogits lm state.Input state.Attention cache // (B, V)
                        use drawn = (Sampling.nextTokens options.Sampling generator logits).cpu ()
                        let drawn = drawn.data<int64>().ToArray()
                        let chosen = Array.init rows (fun b -> if running[b] then Some drawn[b] else None)
                        let tokens = chosen |> Array.map (Option.defaultValue options.PadId)
                        let newTokens = torch.tensor(tokens, ReadOnlySpan [| int64 rows; 1L |], device = device) // (B, 1)
                        let ones = torch.ones(int64 rows, 1L, dtype = state.Attention.dtype, device = device)
                        let attention = torch.cat([| state.Attention; ones |], 1L) // (B, T_total + 1)
                        let next =
                            if options.UseCache then
                                { Input = newTokens; Attention = attention; Cache = Some newCache }
                            else
                                newCache.Tensors |> Array.iter (fun t -> t.Dispose())
                                { Input = torch.cat([| state.Input; newTokens |], 1L); Attention = attention; Cache = None }
                        scope.MoveToOuter(next.Tensors |> Seq.cast<IDisposable>)
                        chosen, next
                    state.Tensors |> Array.iter (fun t -> t.Dispose())
                    state <- next
                    chosen
                    |> Array.iteri (fun b token ->
                        match token with
                        | Some id ->
                            generated[b].Add id
                            if options.EosId = Some id || List.contains id options.StopIds then running[b] <- false
                        | None -> ())
                    onStep { Step = step; Tokens = chosen }
                    step <- step + 1
                generated |> Array.map (fun tokens -> tokens.ToArray())
            finally
                if wasTraining then model.train ()

    /// Generates up to MaxNewTokens tokens after each prompt and returns the new tokens only, per prompt.
    /// Prompts run as one batch, left-padded with PadId and masked, so each row equals its prompt run
    /// alone. The prompts are processed once (prefill); then each step feeds one token per row, with the
    /// key/value cache (UseCache). A row stops after producing EosId (the eos token is part of its
    /// result); it is then fed padding, which is left out of its result, and generation ends when every
    /// row has stopped. The model runs in eval mode under inference mode (its training mode is restored after),
    /// each step in its own dispose scope, so live tensors stay flat. Sampling draws come from a
    /// torch.Generator seeded with Sampling.Seed on the model's device. Generation stops at the model's
    /// context (newTokenLimit: fewer than MaxNewTokens when the longest prompt leaves less room, as HF's
    /// max_length caps max_new_tokens). Raises InvalidInputException for invalid options, empty prompts,
    /// token ids outside the vocabulary and prompts longer than the context, for every family.
    let generate (lm: CausalLm) (prompts: int64[][]) (options: GenerationOptions) : int64[][] =
        generateWith ignore lm prompts options

    /// The token ids generateText feeds for prompts: each encoded as HF's `tokenizer(prompt)` does, bos
    /// first when the tokenizer's rule adds it (TextTokenizer.AddsBos: LLaMA's does, GPT-2's does not) and
    /// no other special token, as training rows start; an empty prompt is the bos token (eos when there
    /// is no bos). Raises InvalidInputException (origin "prompts") for an empty prompt when the tokenizer
    /// has neither.
    let encodePrompts (tokenizer: TextTokenizer) (prompts: string list) : int64[][] =
        let special = tokenizer.Special
        let start = special.Bos |> Option.orElse special.Eos
        let encode i (prompt: string) =
            let ids = Array.append (TextTokenizer.leadingBos None tokenizer) (tokenizer.Encode prompt)
            match ids, start with
            | [||], Some token -> [| token |]
            | [||], None ->
                InvalidInput.fail "prompts" (sprintf "prompt %d" (i + 1))
                    "the prompt is empty and the tokenizer has no bos or eos token to start from"
            | ids, _ -> ids
        prompts |> List.mapi encode |> Array.ofList

    /// generate for prompts encoded by encodePrompts, with the new tokens decoded (special tokens left
    /// out). EosId and PadId come from tokenizer.Special (pad 0 when the tokenizer has neither pad nor
    /// eos); the options' own EosId and PadId are not used.
    let generateEncoded (lm: CausalLm) (tokenizer: TextTokenizer) (prompts: int64[][]) (options: GenerationOptions) : string list =
        let special = tokenizer.Special
        let options =
            { options with
                EosId = special.Eos
                PadId = special.Pad |> Option.defaultValue 0L }
        generate lm prompts options |> Array.map tokenizer.Decode |> List.ofArray

    /// The token ids of chat prompts and the tokens that end the assistant's turn: each prompt is one user
    /// message (after a system message when system is given) rendered with the chat template and its
    /// generation prompt, as apply_chat_template(add_generation_prompt=True), and encoded with no special
    /// tokens added (the template writes them). The stop tokens are the first token of the text the
    /// template writes after an answer (ChatTemplate.endOfTurnText) when it is a special token (Llama 3's
    /// <|eot_id|>, ChatML's <|im_end|>); generateEncoded stops at eos as well. Raises InvalidInputException
    /// naming the template's line for a conversation it cannot render.
    let encodeChatPrompts (template: ChatTemplate) (tokenizer: TextTokenizer) (system: string option) (prompts: string list) : int64[][] * int64 list =
        let encode i (prompt: string) =
            let messages =
                [| match system with
                   | Some s -> Dict [| "role", Str "system"; "content", Str s |]
                   | None -> ()
                   Dict [| "role", Str "user"; "content", Str prompt |] |]
            let text =
                try ChatTemplate.render template { Messages = messages; Tools = None } true
                with :? JinjaException as e -> InvalidInput.fail template.Source (if e.Line > 0 then string e.Line else "") (sprintf "cannot render prompt %d: %s" (i + 1) e.Problem)
            tokenizer.Encode text
        let stop =
            match tokenizer.Encode(ChatTemplate.endOfTurnText template) |> Array.tryHead with
            | Some id when tokenizer.Decode [| id |] = "" -> [ id ]
            | _ -> []
        prompts |> List.mapi encode |> Array.ofList, stop

    /// generate over text: generateEncoded of the prompts' encodePrompts.
    let generateText (lm: CausalLm) (tokenizer: TextTokenizer) (prompts: string list) (options: GenerationOptions) : string list =
        generateEncoded lm tokenizer (encodePrompts tokenizer prompts) options
