namespace Functional.Text

open System
open System.IO
open System.Text.Json
open Functional

/// A model's chat template with the special tokens it is rendered with.
type ChatTemplate =
    { /// The parsed template.
      Template: Jinja.Template
      /// Where it came from (a file, or "DIR/tokenizer_config.json chat_template"), for messages.
      Source: string
      /// bos_token, eos_token, unk_token, pad_token as tokenizer_config.json names them (those it has).
      SpecialTokens: (string * string) list }

/// One conversation, as a row of a data file gives it: messages (role, content and any other fields:
/// tool_calls, tool_call_id, reasoning_content) and the tools offered, if any.
type Conversation =
    { /// The messages as template values (mappings with at least "role" and "content").
      Messages: JinjaValue[]
      /// The row's "tools" (a list), when it has them.
      Tools: JinjaValue option }

/// A rendered conversation: the text and, for assistant-only training, the character ranges of the
/// assistant turns (each through the end-of-turn text the template writes after it).
type RenderedConversation =
    { /// The rendered text.
      Text: string
      /// [Start, End) of each assistant turn in Text, in order.
      AssistantSpans: GenerationSpan[] }

/// Chat templates: finding a model's template, reading conversations (messages rows and ShareGPT's
/// conversations), rendering them as transformers' apply_chat_template does, and the spans of the
/// assistant turns.
[<RequireQualifiedAccess>]
module ChatTemplate =

    /// The file a model folder may hold its template in (newer transformers save it there).
    [<Literal>]
    let TemplateFileName = "chat_template.jinja"

    let private tokenText (value: JsonElement) =
        match value.ValueKind with
        | JsonValueKind.String -> Some(value.GetString())
        | JsonValueKind.Object ->
            match value.TryGetProperty "content" with
            | true, c when c.ValueKind = JsonValueKind.String -> Some(c.GetString())
            | _ -> None
        | _ -> None

    /// Parses a template's source (see Jinja.parse) with special tokens; errors name source.
    let ofSource (source: string) (name: string) (specialTokens: (string * string) list) : ChatTemplate =
        try
            { Template = Jinja.parse name source; Source = name; SpecialTokens = specialTokens }
        with :? JinjaException as e -> InvalidInput.fail e.Template (if e.Line > 0 then string e.Line else "") e.Problem

    let private configTemplate (configPath: string) (config: JsonElement) =
        match config.TryGetProperty "chat_template" with
        | true, t when t.ValueKind = JsonValueKind.String -> Some(t.GetString())
        | true, t when t.ValueKind = JsonValueKind.Array ->
            // A list of named templates: the one named "default", as transformers picks it.
            t.EnumerateArray()
            |> Seq.tryPick (fun named ->
                match named.TryGetProperty "name", named.TryGetProperty "template" with
                | (true, n), (true, body) when n.ValueKind = JsonValueKind.String && n.GetString() = "default" && body.ValueKind = JsonValueKind.String ->
                    Some(body.GetString())
                | _ -> None)
            |> Option.orElseWith (fun () ->
                InvalidInput.fail configPath "chat_template" "a list of named templates without one named \"default\"")
        | true, t when t.ValueKind <> JsonValueKind.Null ->
            InvalidInput.fail configPath "chat_template" (sprintf "expected a string or a list of named templates, found %s" (JsonInput.describe t.ValueKind))
        | _ -> None

    /// The template of a model folder: templateFile when given (--chat-template FILE), else the folder's
    /// chat_template.jinja, else tokenizer_config.json's chat_template (a string, or the template named
    /// "default" of a list). Special tokens come from tokenizer_config.json. Raises InvalidInputException
    /// naming the folder when it has no template, or the file and line of a template that does not parse.
    let load (modelDir: string) (templateFile: string option) : ChatTemplate =
        let configPath = Path.Combine(modelDir, "tokenizer_config.json")
        let config =
            if File.Exists configPath then Some(JsonInput.readObject configPath "tokenizer_config.json does not exist")
            else None
        let special =
            match config with
            | Some c ->
                [ for key in [ "bos_token"; "eos_token"; "unk_token"; "pad_token" ] do
                      match c.TryGetProperty key with
                      | true, v ->
                          match tokenText v with
                          | Some text -> yield key, text
                          | None -> ()
                      | _ -> () ]
            | None -> []
        match templateFile with
        | Some file ->
            InvalidInput.requireFile file "the chat template file does not exist" "a Jinja chat template file"
            ofSource (File.ReadAllText file) file special
        | None ->
            let jinjaFile = Path.Combine(modelDir, TemplateFileName)
            if File.Exists jinjaFile then ofSource (File.ReadAllText jinjaFile) jinjaFile special
            else
                match config |> Option.bind (configTemplate configPath) with
                | Some source -> ofSource source (configPath + " chat_template") special
                | None ->
                    InvalidInput.fail modelDir ""
                        (sprintf "the model has no chat template (neither %s nor a chat_template in tokenizer_config.json); give one with {chat_template}" TemplateFileName)

    // ------------------------------------------------------------------ conversations

    /// ShareGPT's speaker names and the roles they map to.
    let private shareGptRoles =
        dict [ "human", "user"; "user", "user"; "gpt", "assistant"; "assistant", "assistant"; "chatgpt", "assistant"
               "bard", "assistant"; "bing", "assistant"; "model", "assistant"; "system", "system"
               "tool", "tool"; "observation", "tool"; "function", "tool"; "function_response", "tool" ]

    let private roles = set [ "system"; "user"; "assistant"; "tool" ]

    /// Whether a JSON object is a conversation row ("messages" or ShareGPT's "conversations").
    let isConversation (row: JsonElement) =
        row.ValueKind = JsonValueKind.Object
        && (match row.TryGetProperty "messages" with | true, m -> m.ValueKind = JsonValueKind.Array | _ -> false)
           || (row.ValueKind = JsonValueKind.Object
               && match row.TryGetProperty "conversations" with | true, m -> m.ValueKind = JsonValueKind.Array | _ -> false)

    /// A conversation row: {"messages": [{"role", "content", ...}], "tools"?: [...]} (roles system, user,
    /// assistant, tool) or ShareGPT's {"conversations": [{"from", "value"}], "system"?: "..."} (from human,
    /// gpt, system, tool/observation/function mapped to user, assistant, system, tool). Error: the field
    /// at fault and what was expected.
    let parseConversation (row: JsonElement) : Result<Conversation, string> =
        let tools =
            match row.TryGetProperty "tools" with
            | true, t when t.ValueKind = JsonValueKind.Array -> Ok(Some(Jinja.ofJson t))
            | true, t when t.ValueKind = JsonValueKind.Null -> Ok None
            | true, t -> Error(sprintf "\"tools\" must be an array, found %s" (JsonInput.describe t.ValueKind))
            | _ -> Ok None
        let message (i: int) (m: JsonElement) =
            if m.ValueKind <> JsonValueKind.Object then Error(sprintf "messages[%d] must be an object, found %s" i (JsonInput.describe m.ValueKind))
            else
                match m.TryGetProperty "role" with
                | true, r when r.ValueKind = JsonValueKind.String && roles.Contains(r.GetString()) ->
                    match m.TryGetProperty "content" with
                    | true, c when c.ValueKind = JsonValueKind.String || c.ValueKind = JsonValueKind.Null || c.ValueKind = JsonValueKind.Array -> Ok(Jinja.ofJson m)
                    | true, c -> Error(sprintf "messages[%d].content must be a string, found %s" i (JsonInput.describe c.ValueKind))
                    | false, _ when r.GetString() = "assistant" && (match m.TryGetProperty "tool_calls" with | true, _ -> true | _ -> false) -> Ok(Jinja.ofJson m)
                    | false, _ -> Error(sprintf "messages[%d] has no \"content\"" i)
                | true, r when r.ValueKind = JsonValueKind.String ->
                    Error(sprintf "messages[%d].role is \"%s\"; expected system, user, assistant or tool" i (r.GetString()))
                | true, r -> Error(sprintf "messages[%d].role must be a string, found %s" i (JsonInput.describe r.ValueKind))
                | false, _ -> Error(sprintf "messages[%d] has no \"role\"" i)
        let turn (i: int) (m: JsonElement) =
            if m.ValueKind <> JsonValueKind.Object then Error(sprintf "conversations[%d] must be an object, found %s" i (JsonInput.describe m.ValueKind))
            else
                match m.TryGetProperty "from", m.TryGetProperty "value" with
                | (true, f), (true, v) when f.ValueKind = JsonValueKind.String && v.ValueKind = JsonValueKind.String ->
                    match shareGptRoles.TryGetValue(f.GetString().ToLowerInvariant()) with
                    | true, role -> Ok(Dict [| "role", Str role; "content", Str(v.GetString()) |])
                    | _ -> Error(sprintf "conversations[%d].from is \"%s\"; expected human, gpt, system or tool (observation, function)" i (f.GetString()))
                | (false, _), _ -> Error(sprintf "conversations[%d] has no \"from\"" i)
                | _, (false, _) -> Error(sprintf "conversations[%d] has no \"value\"" i)
                | _ -> Error(sprintf "conversations[%d]: \"from\" and \"value\" must be strings" i)
        let collect (results: Result<JinjaValue, string> seq) =
            let items = Seq.toArray results
            match items |> Array.tryPick (function Error e -> Some e | Ok _ -> None) with
            | Some e -> Error e
            | None -> Ok(items |> Array.map (function Ok v -> v | Error _ -> Null))
        let messages =
            match row.TryGetProperty "messages" with
            | true, ms when ms.ValueKind = JsonValueKind.Array -> ms.EnumerateArray() |> Seq.mapi message |> collect
            | _ ->
                match row.TryGetProperty "conversations" with
                | true, cs when cs.ValueKind = JsonValueKind.Array ->
                    let system =
                        match row.TryGetProperty "system" with
                        | true, s when s.ValueKind = JsonValueKind.String && s.GetString() <> "" -> [| Dict [| "role", Str "system"; "content", Str(s.GetString()) |] |]
                        | _ -> [||]
                    cs.EnumerateArray() |> Seq.mapi turn |> collect |> Result.map (Array.append system)
                | _ -> Error "expected \"messages\" (an array of {\"role\", \"content\"}) or ShareGPT's \"conversations\" (an array of {\"from\", \"value\"})"
        match messages, tools with
        | Error e, _ | _, Error e -> Error e
        | Ok [||], _ -> Error "the conversation has no messages"
        | Ok ms, Ok tools -> Ok { Messages = ms; Tools = tools }

    // ------------------------------------------------------------------ rendering

    let private variables (template: ChatTemplate) (messages: JinjaValue[]) (tools: JinjaValue option) (addGenerationPrompt: bool) =
        [ yield! template.SpecialTokens |> List.map (fun (k, v) -> k, Str v)
          yield "messages", List messages
          yield "add_generation_prompt", Bool addGenerationPrompt
          match tools with
          | Some t -> yield "tools", t
          | None -> () ]

    let private renderRaw (template: ChatTemplate) (messages: JinjaValue[]) (tools: JinjaValue option) (addGenerationPrompt: bool) =
        Jinja.renderWithSpans template.Template (variables template messages tools addGenerationPrompt)

    /// Renders messages as apply_chat_template(messages, tools, add_generation_prompt, tokenize=False).
    /// Raises JinjaException (the template's line; Raised when the template itself refused the input).
    let render (template: ChatTemplate) (conversation: Conversation) (addGenerationPrompt: bool) : string =
        (renderRaw template conversation.Messages conversation.Tools addGenerationPrompt).Text

    let private role (message: JinjaValue) =
        match message with
        | Dict entries -> entries |> Array.tryPick (fun (k, v) -> match k, v with "role", Str r -> Some r | _ -> None) |> Option.defaultValue ""
        | _ -> ""

    /// The conversation rendered with the character spans of its assistant turns. A template with
    /// {% generation %} blocks marks them itself (HF's return_assistant_tokens_mask). Otherwise turn i's span
    /// starts where the conversation before it, rendered with the generation prompt, ends, and stops where
    /// the conversation through it ends: so it holds the assistant's text and whatever the template writes
    /// after it (the end-of-turn token), never the next turn's header. Both renders must be prefixes of the
    /// whole; a template that renders earlier turns differently once later ones follow (Qwen3 drops the
    /// reasoning of earlier turns) is refused with the turn, unless it has generation blocks.
    let renderWithAssistantSpans (template: ChatTemplate) (conversation: Conversation) : Result<RenderedConversation, string> =
        let whole = renderRaw template conversation.Messages conversation.Tools false
        if whole.Generation.Length > 0 then Ok { Text = whole.Text; AssistantSpans = whole.Generation }
        else
            let text = whole.Text
            let spans = ResizeArray<GenerationSpan>()
            let mutable problem = None
            let messages = conversation.Messages
            for i in 0 .. messages.Length - 1 do
                if problem.IsNone && role messages[i] = "assistant" then
                    let before = (renderRaw template messages[.. i - 1] conversation.Tools true).Text
                    let through = (renderRaw template messages[.. i] conversation.Tools false).Text
                    if not (text.StartsWith(before, StringComparison.Ordinal)) || not (text.StartsWith(through, StringComparison.Ordinal)) || through.Length < before.Length then
                        problem <-
                            Some(
                                sprintf "the chat template renders messages[%d] (assistant) differently once later turns follow, so its tokens cannot be told from the rendered text; use a template with {%% generation %%} blocks ({chat_template})" i
                            )
                    else
                        // Trailing whitespace of the turn belongs to the turn only when the template wrote it
                        // before the next turn; the span ends where the render through this turn ends.
                        spans.Add { Start = before.Length; End = through.Length }
            match problem with
            | Some p -> Error p
            | None -> Ok { Text = text; AssistantSpans = spans.ToArray() }

    /// The text the template writes after an assistant's answer before the next turn: rendered for a probe
    /// conversation (user, assistant) and cut after the answer. Generation stops at the first special
    /// token of it (see TextTokenizer); empty when the template writes nothing after an answer.
    let endOfTurnText (template: ChatTemplate) : string =
        let answer = "Functional end-of-turn probe answer"
        let probe =
            [| Dict [| "role", Str "user"; "content", Str "Functional end-of-turn probe question" |]
               Dict [| "role", Str "assistant"; "content", Str answer |] |]
        let text = (renderRaw template probe None false).Text
        let at = text.LastIndexOf(answer, StringComparison.Ordinal)
        if at < 0 then "" else text.Substring(at + answer.Length)

    /// The ids of a rendered conversation and, per id, whether it lies in an assistant turn: the ids are
    /// the tokenizer's of the whole text with no special tokens added (the template writes bos and the
    /// turn markers itself, as apply_chat_template(tokenize=True) encodes it). A token is in a turn when it
    /// holds any of the turn's characters, as HF's assistant mask (char_to_token over the span) has it. A
    /// span's edges are found by encoding the text before them: where those ids are a prefix of the whole
    /// text's, the edge falls between tokens; otherwise the first differing token straddles the edge and,
    /// holding characters of the turn, belongs to it.
    let tokenizeWithAssistantMask (tokenizer: TextTokenizer) (rendered: RenderedConversation) : int64[] * bool[] =
        let text = rendered.Text
        let ids = tokenizer.Encode text
        let agreeing (prefix: int64[]) =
            let n = min prefix.Length ids.Length
            let mutable i = 0
            while i < n && prefix[i] = ids[i] do
                i <- i + 1
            i
        let edge (at: int) (isEnd: bool) =
            if at <= 0 then 0
            elif at >= text.Length then ids.Length
            else
                let prefix = tokenizer.Encode(text.Substring(0, at))
                let common = agreeing prefix
                if common = prefix.Length then common
                elif isEnd then min ids.Length (common + 1)
                else common
        let mask = Array.zeroCreate ids.Length
        for span in rendered.AssistantSpans do
            for i in edge span.Start false .. edge span.End true - 1 do
                mask[i] <- true
        ids, mask
