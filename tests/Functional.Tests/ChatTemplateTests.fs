/// Chat templates (the list "chat templates"): the real templates of nine models rendered by our Jinja subset
/// equal the goldens of tools/reference (make_chat_template_golden.mjs: @huggingface/jinja, the renderer of
/// transformers.js; make_chat_template_jinja2.py: Python's Jinja2, the renderer of transformers'
/// apply_chat_template). Where the two disagree (8 of 216 renders) we follow Python's: transformers is what
/// training data is rendered with.
module Functional.Tests.ChatTemplateTests

open System
open System.IO
open System.Text.Json
open Expecto
open Functional
open Functional.Text
open Functional.Tests.TestUtil

let private root = goldenDir "chat-templates"

let private models = [ "llama3"; "llama3_1"; "qwen2_5"; "qwen3"; "deepseek_v3"; "mistral_nemo"; "gemma3"; "chatglm3"; "internlm2" ]

let private conversations =
    lazy (JsonDocument.Parse(File.ReadAllText(Path.Combine(root, "conversations.json"))).RootElement)

/// The conversation as a data row: {"messages": [...], "tools": [...]} (the tools when it offers them).
let private rowOf (conversation: JsonElement) =
    let tools = conversations.Value.GetProperty "tools"
    let offered = match conversation.TryGetProperty "tools" with | true, t -> t.ValueKind = JsonValueKind.True | _ -> false
    let messages = conversation.GetProperty("messages").GetRawText()
    let json = if offered then sprintf "{\"messages\": %s, \"tools\": %s}" messages (tools.GetRawText()) else sprintf "{\"messages\": %s}" messages
    JsonDocument.Parse(json).RootElement.Clone()

let private parse (row: JsonElement) =
    match ChatTemplate.parseConversation row with
    | Ok c -> c
    | Error e -> failtestf "the conversation does not parse: %s" e

let private parseJson (json: string) = parse (JsonDocument.Parse(json).RootElement.Clone())

type private Expected =
    | Text of string
    | Refused of string

let private readRenders (path: string) =
    JsonDocument.Parse(File.ReadAllText path).RootElement.EnumerateArray()
    |> Seq.map (fun e ->
        let key = e.GetProperty("conversation").GetString(), e.GetProperty("add_generation_prompt").GetBoolean()
        match e.TryGetProperty "text" with
        | true, t -> key, Text(t.GetString())
        | _ -> key, Refused(e.GetProperty("error").GetString()))
    |> Map.ofSeq

let private show (text: string) = JsonSerializer.Serialize text

let private check (model: string) =
    test (sprintf "%s: every conversation renders as the goldens, with and without the generation prompt" model) {
        let folder = Path.Combine(root, model)
        let template = ChatTemplate.load folder None
        let source = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "tokenizer_config.json"))).RootElement.GetProperty("chat_template").GetString()
        let js = readRenders (Path.Combine(folder, "renders.json"))
        let python = readRenders (Path.Combine(folder, "renders_jinja2.json"))
        let failures = ResizeArray<string>()
        let mutable rendered = 0
        for conversation in conversations.Value.GetProperty("conversations").EnumerateArray() do
            let name = conversation.GetProperty("name").GetString()
            let parsed = parse (rowOf conversation)
            for generationPrompt in [ false; true ] do
                let key = name, generationPrompt
                // The same in both renderers but for the known differences, which follow Python.
                let expected = python[key]
                let actual =
                    try Ok(ChatTemplate.render template parsed generationPrompt)
                    with :? JinjaException as e -> Error e
                let where = sprintf "%s, add_generation_prompt=%b" name generationPrompt
                match expected, actual with
                | Text e, Ok a ->
                    rendered <- rendered + 1
                    if a <> e then failures.Add(sprintf "%s:\n  ours %s\n  gold %s" where (show a) (show e))
                | Text e, Error err -> failures.Add(sprintf "%s: we failed (%s), expected %s" where err.Message (show e))
                | Refused message, Ok a -> failures.Add(sprintf "%s: we rendered %s, the template refuses it (%s)" where (show a) message)
                | Refused message, Error err ->
                    // A refusal of the template's own (raise_exception) carries its words.
                    if source.Contains(message, StringComparison.Ordinal) && err.Raised <> Some message then
                        failures.Add(sprintf "%s: refused with %A, expected raise_exception(%s)" where err.Raised (show message))
        Expect.isEmpty failures (sprintf "%d differences (first 5):\n%s" failures.Count (String.Join("\n", Seq.truncate 5 failures)))
        Expect.isGreaterThan rendered 10 "most conversations render"
    }

let private goldenAgreement =
    test "the two reference renderers agree but for the 8 known renders" {
        let differing =
            [ for model in models do
                  let js = readRenders (Path.Combine(root, model, "renders.json"))
                  let python = readRenders (Path.Combine(root, model, "renders_jinja2.json"))
                  for KeyValue(key, expected) in python do
                      let same =
                          match expected, js[key] with
                          | Text a, Text b -> a = b
                          | Refused _, Refused _ -> true
                          | _ -> false
                      if not same then yield model, fst key ]
            |> List.distinct
        Expect.equal
            differing
            [ "llama3", "two tool calls with string arguments"
              "llama3_1", "two tool calls with string arguments"
              "mistral_nemo", "non-alternating roles"
              "chatglm3", "two tool calls with string arguments" ]
            "null content prints None in Python (JavaScript: empty, or an error of trim); selectattr on a missing attribute"
        let checkedCases = models.Length * conversations.Value.GetProperty("conversations").GetArrayLength() * 2
        Expect.equal checkedCases 216 "nine models, twelve conversations, with and without the generation prompt"
    }

let private template (source: string) = ChatTemplate.ofSource source "test.jinja" [ "eos_token", "</s>"; "bos_token", "<s>" ]

let private renderSource (source: string) (json: string) (generationPrompt: bool) =
    ChatTemplate.render (template source) (parseJson json) generationPrompt

let private jinja (source: string) = Jinja.render (Jinja.parse "test.jinja" source) []

let private engine =
    testList "engine" [
        test "loop variables, namespace, macros, filters and string methods" {
            Expect.equal (jinja "{% for x in [1, 2, 3] %}{{ loop.index }}{{ loop.first }}{{ loop.last }}{% if not loop.last %},{% endif %}{% endfor %}") "1TrueFalse,2FalseFalse,3FalseTrue" "loop"
            Expect.equal (jinja "{% set ns = namespace(n=0) %}{% for x in range(4) %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}") "6" "namespace"
            Expect.equal (jinja "{% macro m(a, b='d') %}[{{ a }}{{ b }}]{% endmacro %}{{ m('x') }}{{ m('y', 'z') }}") "[xd][yz]" "macro"
            Expect.equal (jinja "{{ '  a b  ' | trim }}|{{ [3, 1, 2] | sort | join(',') }}|{{ {'b': 1} | tojson }}|{{ 'abc'.startswith('ab') }}|{{ 'a,b'.split(',') | length }}") "a b|1,2,3|{\"b\": 1}|True|2" "filters"
            Expect.equal (jinja "{{ [{'r': 'a'}, {'r': 'b'}] | selectattr('r', 'equalto', 'b') | map(attribute='r') | list }}") "['b']" "selectattr"
            Expect.equal (jinja "{%- for k, v in {'x': 1, 'y': 2}.items() -%} {{ k }}={{ v }} {%- endfor %}") "x=1y=2" "items and whitespace control"
            Expect.equal (jinja "{{ none }}|{{ undefined_name }}|{{ 1.0 }}|{{ true }}") "None||1.0|True" "values print as Python prints them"
        }
        test "a statement we do not support is refused at parse with its line" {
            try
                Jinja.parse "t.jinja" "line one\n{% if true %}x{% endif %}\n{% filter upper %}x{% endfilter %}" |> ignore
                failtest "expected a JinjaException"
            with :? JinjaException as e ->
                Expect.equal e.Line 3 "the line"
                Expect.stringContains e.Message "t.jinja:3" "names the template and line"
                Expect.stringContains e.Message "filter" "names the statement"
        }
        test "an unknown filter and an unclosed block name their line" {
            for source, line in [ "a\n{{ x | frobnicate }}", 2; "{% for x in y %}\n\nno end", 1 ] do
                try
                    Jinja.render (Jinja.parse "t.jinja" source) [ "y", List [||] ] |> ignore
                    failtest "expected a JinjaException"
                with :? JinjaException as e -> Expect.equal e.Line line (sprintf "the line of %s (%s)" source e.Message)
        }
        test "raise_exception stops with the template's message" {
            try
                jinja "{{ raise_exception('roles must alternate') }}" |> ignore
                failtest "expected a JinjaException"
            with :? JinjaException as e -> Expect.equal e.Raised (Some "roles must alternate") "the message"
        }
    ]

let private chatml =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

let private conversationsData =
    testList "conversation rows" [
        test "ShareGPT conversations map from/value to roles, with the system field first" {
            let c = parseJson "{\"system\": \"Be brief.\", \"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello\"}]}"
            let messages = parseJson "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}"
            Expect.equal (ChatTemplate.render (template chatml) c false) (ChatTemplate.render (template chatml) messages false) "the same render"
        }
        test "a bad row names the field at fault" {
            for json, expected in
                [ "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}", "messages[0].role is \"robot\""
                  "{\"messages\": [{\"role\": \"user\"}]}", "messages[0] has no \"content\""
                  "{\"conversations\": [{\"from\": \"alien\", \"value\": \"x\"}]}", "conversations[0].from is \"alien\""
                  "{\"messages\": []}", "no messages"
                  "{\"text\": \"x\"}", "expected \"messages\"" ] do
                match ChatTemplate.parseConversation (JsonDocument.Parse(json).RootElement.Clone()) with
                | Ok _ -> failtestf "%s parsed" json
                | Error e -> Expect.stringContains e expected json
        }
        test "assistant spans hold each answer and the end-of-turn text, never the next header" {
            let c = parseJson "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", \"content\": \"A1\"}, {\"role\": \"user\", \"content\": \"Q2\"}, {\"role\": \"assistant\", \"content\": \"A2\"}]}"
            match ChatTemplate.renderWithAssistantSpans (template chatml) c with
            | Error e -> failtest e
            | Ok r ->
                let pieces = r.AssistantSpans |> Array.map (fun s -> r.Text.Substring(s.Start, s.End - s.Start))
                Expect.equal pieces [| "A1<|im_end|>\n"; "A2<|im_end|>\n" |] "the answers through their end of turn"
        }
        test "generation blocks mark the assistant spans themselves" {
            let source =
                "{% for m in messages %}{% if m.role == 'assistant' %}[A]{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}[U]{{ m.content }}{% endif %}{% endfor %}"
            let c = parseJson "{\"messages\": [{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}"
            match ChatTemplate.renderWithAssistantSpans (template source) c with
            | Error e -> failtest e
            | Ok r -> Expect.equal [ for s in r.AssistantSpans -> r.Text.Substring(s.Start, s.End - s.Start) ] [ "A</s>" ] "the generation block"
        }
        test "Qwen3's template (earlier reasoning dropped) is refused for spans with the turn" {
            let qwen3 = ChatTemplate.load (Path.Combine(root, "qwen3")) None
            let c =
                parseJson
                    "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nr\\n</think>\\n\\nA1\"}, {\"role\": \"user\", \"content\": \"Q2\"}, {\"role\": \"assistant\", \"content\": \"A2\"}]}"
            match ChatTemplate.renderWithAssistantSpans qwen3 c with
            | Ok _ -> failtest "expected a refusal"
            | Error e -> Expect.stringContains e "messages[1]" "names the turn"
        }
        test "the end-of-turn text of real templates" {
            let eot model = ChatTemplate.endOfTurnText (ChatTemplate.load (Path.Combine(root, model)) None)
            Expect.equal (eot "llama3_1") "<|eot_id|>" "Llama 3.1"
            Expect.equal (eot "qwen2_5") "<|im_end|>\n" "Qwen2.5"
            Expect.equal (eot "mistral_nemo") "</s>" "Mistral Nemo"
        }
        test "a model folder without a template is refused naming the folder" {
            use folder = new TempFolder()
            File.WriteAllText(folder.File "tokenizer_config.json", "{\"eos_token\": \"</s>\"}")
            expectInvalidInput folder.Path "" [ "no chat template"; "--chat-template" ] (fun () -> ChatTemplate.load folder.Path None |> ignore)
        }
        test "a template file that does not parse is refused with its line" {
            use folder = new TempFolder()
            File.WriteAllText(folder.File "t.jinja", "ok\n{% for m in messages %}\n{{ m.content }")
            expectInvalidInput (folder.File "t.jinja") "3" [] (fun () -> ChatTemplate.load folder.Path (Some(folder.File "t.jinja")) |> ignore)
        }
    ]

/// `functional chat-template`, end to end.
let private cli =
    testList "chat-template command" [
        test "prints one JSON string per conversation, as the goldens" {
            use folder = new TempFolder()
            let lines =
                [ for c in conversations.Value.GetProperty("conversations").EnumerateArray() do
                      if c.GetProperty("name").GetString() <> "non-alternating roles" then yield JsonSerializer.Serialize(rowOf c) ]
            File.WriteAllLines(folder.File "conversations.jsonl", lines)
            let result = runCli [ "chat-template"; "--model"; Path.Combine(root, "mistral_nemo"); "--messages"; folder.File "conversations.jsonl"; "--add-generation-prompt" ]
            Expect.equal result.ExitCode 0 result.Stderr
            let printed = result.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.map (fun l -> JsonSerializer.Deserialize<string> l)
            let python = readRenders (Path.Combine(root, "mistral_nemo", "renders_jinja2.json"))
            let expected =
                [| for c in conversations.Value.GetProperty("conversations").EnumerateArray() do
                       let name = c.GetProperty("name").GetString()
                       if name <> "non-alternating roles" then
                           match python[(name, true)] with
                           | Text t -> yield t
                           | Refused e -> failtestf "%s is refused by the golden: %s" name e |]
            Expect.equal printed expected "every line"
        }
        test "a bad line names the file and line; a refused conversation exits non-zero" {
            use folder = new TempFolder()
            File.WriteAllLines(folder.File "c.jsonl", [ "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"; "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}" ])
            let result = runCli [ "chat-template"; "--model"; Path.Combine(root, "llama3_1"); "--messages"; folder.File "c.jsonl" ]
            Expect.notEqual result.ExitCode 0 "fails"
            Expect.stringContains result.Stderr (folder.File "c.jsonl" + ":line 2") "names the file and line"
            Expect.stringContains result.Stderr "robot" "names the value"
            File.WriteAllLines(folder.File "n.jsonl", [ "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}" ])
            let refused = runCli [ "chat-template"; "--model"; Path.Combine(root, "mistral_nemo"); "--messages"; folder.File "n.jsonl" ]
            Expect.notEqual refused.ExitCode 0 "fails"
            Expect.stringContains refused.Stderr "line 1" "names the line"
            Expect.stringContains refused.Stderr "alternate" "gives the template's own message"
        }
        test "a missing model folder and a folder without a template are clear errors" {
            use folder = new TempFolder()
            File.WriteAllText(folder.File "c.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n")
            let result = runCli [ "chat-template"; "--model"; folder.Path; "--messages"; folder.File "c.jsonl" ]
            Expect.notEqual result.ExitCode 0 "fails"
            Expect.stringContains result.Stderr "no chat template" "explains"
        }
    ]

// ---------------------------------------------------------------- assistant-only training and chat generation

/// A real tokenizer (from the fidelity goldens, tokenizer.json unzipped) with a real chat template as the
/// folder's chat_template.jinja.
let private tokenizerFolder (folder: string) (tokenizer: string) (templateOf: string) =
    Directory.CreateDirectory folder |> ignore
    let source = Path.Combine(goldenDir "tokenizer-fidelity", tokenizer)
    do
        use input = File.OpenRead(Path.Combine(source, "tokenizer.json.gz"))
        use gzip = new System.IO.Compression.GZipStream(input, System.IO.Compression.CompressionMode.Decompress)
        use output = File.Create(Path.Combine(folder, "tokenizer.json"))
        gzip.CopyTo output
    File.Copy(Path.Combine(source, "tokenizer_config.json"), Path.Combine(folder, "tokenizer_config.json"))
    let config = JsonDocument.Parse(File.ReadAllText(Path.Combine(root, templateOf, "tokenizer_config.json"))).RootElement
    File.WriteAllText(Path.Combine(folder, ChatTemplate.TemplateFileName), config.GetProperty("chat_template").GetString())
    folder

/// Qwen3's tokenizer with Qwen2.5's template (ChatML: <|im_start|>role\n...<|im_end|>\n), cached per test run.
let private qwen = lazy (tokenizerFolder (Path.Combine(Path.GetTempPath(), "functional-tests", "qwen-chat-" + Guid.NewGuid().ToString("N"))) "qwen3" "qwen2_5")

let private conversationRow =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"What is 2 + 2?\"}, {\"role\": \"assistant\", \"content\": \"4.\"}, {\"role\": \"user\", \"content\": \"梯度累积是什么？\"}, {\"role\": \"assistant\", \"content\": \"把多个微批次的梯度相加 🙂\"}]}"

let private shareGptRow =
    "{\"system\": \"Be brief.\", \"conversations\": [{\"from\": \"human\", \"value\": \"What is 2 + 2?\"}, {\"from\": \"gpt\", \"value\": \"4.\"}, {\"from\": \"human\", \"value\": \"梯度累积是什么？\"}, {\"from\": \"gpt\", \"value\": \"把多个微批次的梯度相加 🙂\"}]}"

/// The runs of consecutive trained positions of a row, as id arrays.
let private trainedRuns (ids: int64[]) (labels: int64[]) =
    [ let mutable run = ResizeArray<int64>()
      for t in 0 .. ids.Length - 1 do
          if labels[t] <> Loss.IgnoreIndex then run.Add ids[t]
          elif run.Count > 0 then
              yield run.ToArray()
              run <- ResizeArray()
      if run.Count > 0 then yield run.ToArray() ]

let private loadRows (folder: TempFolder) (lines: string list) (options: Functional.Data.PromptDataOptions) (tokenizer: TextTokenizer) =
    File.WriteAllLines(folder.File "chat.jsonl", lines)
    Functional.Data.PromptDataset.load (folder.File "chat.jsonl") options tokenizer

let private assistantOnly =
    { Functional.Data.PromptDataset.defaults with TrainOn = Functional.Data.TrainOn.Assistant; MaxSeqLen = 4096 }

let private assistantTraining =
    testList "assistant-only training" [
        test "labels cover each assistant answer and its end-of-turn token, nothing else (Qwen, ChatML)" {
            Functional.Runtime.TorchRuntime.ensure ()
            let tokenizer = Tokenizers.fromFolder qwen.Value
            use folder = new TempFolder()
            let loaded = loadRows folder [ conversationRow; shareGptRow ] assistantOnly tokenizer
            let data = loaded.Dataset
            Expect.equal data.Rows.Length 2 "two rows"
            let template = ChatTemplate.load qwen.Value None
            let expectedIds = tokenizer.Encode(ChatTemplate.render template (parseJson conversationRow) false)
            Expect.equal data.Rows[0] expectedIds "the ids of the rendered text, no special token added"
            Expect.equal data.Rows[1] data.Rows[0] "ShareGPT's row is the same conversation"
            use batch = Functional.Data.Batching.collate 4096 0L data [| 0; 1 |]
            let labels = values batch.Labels |> Array.map int64
            let width = int batch.Labels.shape[1]
            let imEnd = tokenizer.Encode "<|im_end|>"
            Expect.equal imEnd.Length 1 "<|im_end|> is one token"
            for r in 0 .. 1 do
                let runs = trainedRuns data.Rows[r] labels[r * width .. r * width + data.Rows[r].Length - 1]
                Expect.equal runs [ tokenizer.Encode "4.<|im_end|>\n"; tokenizer.Encode "把多个微批次的梯度相加 🙂<|im_end|>\n" ] "the answers through <|im_end|> and its newline"
            let predicted = (tokenizer.Encode "4.<|im_end|>\n").Length + (tokenizer.Encode "把多个微批次的梯度相加 🙂<|im_end|>\n").Length
            Expect.equal batch.PredictedTokens (int64 (2 * predicted)) "the predicted tokens count the trained positions"
            // Packed in isolation, the two conversations share a row and keep their labels.
            let packed = (loadRows folder [ conversationRow; shareGptRow ] { assistantOnly with Packing = true } tokenizer).Dataset
            Expect.equal packed.Rows.Length 1 "one packed row"
            use packedBatch = Functional.Data.Batching.collate 4096 0L packed [| 0 |]
            Expect.equal packedBatch.PredictedTokens batch.PredictedTokens "the same trained tokens"
            let packedLabels = values packedBatch.Labels |> Array.map int64
            Expect.equal (trainedRuns packed.Rows[0] packedLabels) (trainedRuns data.Rows[0] labels[.. data.Rows[0].Length - 1] @ trainedRuns data.Rows[1] labels[width .. width + data.Rows[1].Length - 1]) "the same runs"
        }
        test "Llama 3.1's template: the answer and <|eot_id|>" {
            use folder = new TempFolder()
            let model = tokenizerFolder (folder.File "llama3") "llama3" "llama3_1"
            let tokenizer = Tokenizers.fromFolder model
            let row = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello there.\"}]}"
            let data = (loadRows folder [ row ] assistantOnly tokenizer).Dataset
            let mask = data.TrainMasks[0]
            let row = data.Rows[0]
            let trained = Array.zip row mask |> Array.filter snd |> Array.map fst
            Expect.equal trained (tokenizer.Encode "Hello there.<|eot_id|>") "the answer and the end of turn"
            Expect.equal row[0] (Option.get tokenizer.Special.Bos) "the template's own <|begin_of_text|> first, once"
            Expect.isFalse (row.Length > 1 && row[1] = row[0]) "bos is not doubled"
        }
        test "--train-on all trains every token of a conversation; the cache key follows the template file" {
            let tokenizer = Tokenizers.fromFolder qwen.Value
            use folder = new TempFolder()
            let data = (loadRows folder [ conversationRow ] { assistantOnly with TrainOn = Functional.Data.TrainOn.All } tokenizer).Dataset
            Expect.isEmpty data.TrainMasks "no masks"
            Expect.equal data.PromptLengths [| 0 |] "every token"
            File.WriteAllText(folder.File "t1.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}")
            File.WriteAllText(folder.File "t2.jinja", "{% for m in messages %}[{{ m.content }}]{% endfor %}")
            let key file = Functional.Data.DataCache.key (folder.File "chat.jsonl") None { assistantOnly with ChatTemplateFile = Some file } tokenizer
            Expect.notEqual (key (folder.File "t1.jinja")) (key (folder.File "t2.jinja")) "another template, another key"
            let custom = (loadRows folder [ conversationRow ] { assistantOnly with TrainOn = Functional.Data.TrainOn.All; ChatTemplateFile = Some(folder.File "t1.jinja") } tokenizer).Dataset
            Expect.equal custom.Rows[0] (tokenizer.Encode "Be brief.What is 2 + 2?4.梯度累积是什么？把多个微批次的梯度相加 🙂") "--chat-template renders the rows"
        }
        test "bad rows name the line and what is expected" {
            let tokenizer = Tokenizers.fromFolder qwen.Value
            use folder = new TempFolder()
            let noAnswer = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}"
            expectInvalidInput (folder.File "chat.jsonl") "2" [ "no assistant turn" ] (fun () -> loadRows folder [ conversationRow; noAnswer ] assistantOnly tokenizer |> ignore)
            let loaded = loadRows folder [ conversationRow; noAnswer ] { assistantOnly with SkipBadRows = true } tokenizer
            Expect.equal (loaded.Dataset.Rows.Length, loaded.Skipped) (1, 1) "skipped under --skip-bad-rows"
            expectInvalidInput (folder.File "chat.jsonl") "1" [ "conversation rows" ] (fun () ->
                loadRows folder [ "{\"prompt\": \"a\", \"chosen\": \"b\"}" ] assistantOnly tokenizer |> ignore)
            expectInvalidInput (folder.File "chat.jsonl") "1" [ "--train-on assistant" ] (fun () ->
                loadRows folder [ conversationRow ] { assistantOnly with TrainOn = Functional.Data.TrainOn.Completion } tokenizer |> ignore)
            expectInvalidInput (folder.File "chat.jsonl") "1" [ "messages[1].role" ] (fun () ->
                loadRows folder [ "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"bot\", \"content\": \"x\"}]}" ] assistantOnly tokenizer |> ignore)
            expectInvalidInput (folder.File "chat.jsonl") "1" [ "max-seq-len" ] (fun () ->
                loadRows folder [ conversationRow ] { assistantOnly with MaxSeqLen = 8 } tokenizer |> ignore)
        }
        test "a template that renders earlier turns differently is refused naming the line (Qwen3 drops earlier reasoning)" {
            use folder = new TempFolder()
            let model = tokenizerFolder (folder.File "qwen3") "qwen3" "qwen3"
            let tokenizer = Tokenizers.fromFolder model
            let row = "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nr\\n</think>\\n\\nA1\"}, {\"role\": \"user\", \"content\": \"Q2\"}, {\"role\": \"assistant\", \"content\": \"A2\"}]}"
            expectInvalidInput (folder.File "chat.jsonl") "1" [ "messages[1]"; "generation" ] (fun () -> loadRows folder [ row ] assistantOnly tokenizer |> ignore)
        }
        test "chat prompts end with the generation prompt; the stop token is the template's end of turn" {
            let tokenizer = Tokenizers.fromFolder qwen.Value
            let template = ChatTemplate.load qwen.Value None
            let prompts, stop = Functional.Generation.Generator.encodeChatPrompts template tokenizer (Some "Be brief.") [ "Hi" ]
            Expect.equal prompts[0] (tokenizer.Encode "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") "the rendered prompt"
            Expect.equal stop [ (tokenizer.Encode "<|im_end|>")[0] ] "<|im_end|>"
        }
    ]

/// A tiny LLaMA over the Qwen tokenizer (vocabulary 151k, width 16) in a model folder with its chat template.
let private chatModel (folder: TempFolder) =
    Functional.Runtime.TorchRuntime.ensure ()
    let model = tokenizerFolder (folder.File "model") "qwen3" "qwen2_5"
    let vocab = (Tokenizers.fromFolder model).VocabSize
    let config =
        sprintf """{"model_type": "llama", "vocab_size": %d, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": true}""" vocab
    let lm = Functional.Models.CausalLm.create (Functional.Models.ModelConfig.parse "test" config) 1L
    Functional.Checkpoint.HfModelFolder.save (folder.File "weights") lm None []
    for f in Directory.GetFiles(folder.File "weights") do File.Copy(f, Path.Combine(model, Path.GetFileName f))
    model

let private chatCli =
    testList "chat cli" [
        test "train --train-on assistant on conversations, then generate --chat with the trained folder" {
            use folder = new TempFolder()
            let model = chatModel folder
            File.WriteAllLines(folder.File "chat.jsonl", [ conversationRow; shareGptRow ])
            let train =
                runCli [ "train"; "--model"; model; "--data"; folder.File "chat.jsonl"; "--train-on"; "assistant"; "--output"; folder.File "out"
                         "--max-steps"; "3"; "--learning-rate"; "1e-2"; "--threads"; "1"; "--no-data-cache" ]
            Expect.equal train.ExitCode 0 (sprintf "train (stderr: %s)" train.Stderr)
            Expect.isTrue (File.Exists(folder.File "out/final/chat_template.jinja")) "the trained folder keeps the chat template"
            let generate = runCli [ "generate"; "--model"; folder.File "out/final"; "--chat"; "--prompt"; "Hi"; "--greedy"; "--max-new-tokens"; "4" ]
            Expect.equal generate.ExitCode 0 (sprintf "generate (stderr: %s)" generate.Stderr)
            let refused = runCli [ "generate"; "--model"; folder.File "out/final"; "--system"; "x"; "--prompt"; "Hi" ]
            Expect.equal refused.ExitCode 2 "--system without --chat is refused"
            Expect.stringContains refused.Stderr "--chat" "says what is missing"
        }
    ]

[<Tests>]
let tests =
    testList "chat templates" [
        yield! models |> List.map check
        goldenAgreement
        engine
        conversationsData
        assistantTraining
        cli
        chatCli
    ]
