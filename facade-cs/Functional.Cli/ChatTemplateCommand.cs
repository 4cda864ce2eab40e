using System.CommandLine;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace Functional.Cli;

/// <summary>`functional chat-template`: conversations rendered with a model's chat template, one JSON string per line.</summary>
internal static class ChatTemplateCommand
{
    private static readonly JsonSerializerOptions Output = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static Command Create()
    {
        var model = new Option<string>("--model", "--model_name_or_path", "--model-name-or-path")
        {
            Description = "Hugging Face model or tokenizer folder whose chat template (chat_template.jinja or tokenizer_config.json) renders the conversations.",
            Required = true,
        };
        var messages = new Option<string>("--messages")
        {
            Description = "A JSON Lines file (or a JSON array), one conversation per line: {\"messages\": [{\"role\", \"content\"}], \"tools\"?: [...]} or ShareGPT's {\"conversations\": [{\"from\", \"value\"}]}.",
            Required = true,
        };
        var addGenerationPrompt = new Option<bool>("--add-generation-prompt", "--add_generation_prompt")
        {
            Description = "Append the header of the assistant's next turn (what generation starts from).",
        };
        var chatTemplate = new Option<string?>("--chat-template", "--chat_template")
        {
            Description = "A Jinja template file used instead of the model's own.",
        };
        var command = new Command("chat-template", "Render conversations with a model's chat template, as transformers' apply_chat_template(tokenize=False): one JSON-encoded string per line.")
        {
            model, messages, addGenerationPrompt, chatTemplate,
        };
        command.SetAction(parse =>
        {
            var template = ChatTemplate.FromFolder(parse.GetValue(model)!, parse.GetValue(chatTemplate));
            var path = parse.GetValue(messages)!;
            if (!File.Exists(path))
            {
                throw new InvalidInputException(path, "", "the file does not exist (expected a JSON Lines file of conversations)");
            }
            var generationPrompt = parse.GetValue(addGenerationPrompt);
            using var output = new StreamWriter(Console.OpenStandardOutput()) { AutoFlush = false, NewLine = "\n" };
            foreach (var (location, row) in Rows(path))
            {
                string rendered;
                try
                {
                    rendered = template.Render(row, generationPrompt);
                }
                catch (InvalidInputException e) when (e.Origin == "conversation")
                {
                    throw new InvalidInputException(path, location, e.Problem);
                }
                catch (InvalidInputException e)
                {
                    throw new InvalidInputException(path, location, $"{e.Message}");
                }
                output.WriteLine(JsonSerializer.Serialize(rendered, Output));
            }
            output.Flush();
            return 0;
        });
        return command;
    }

    /// <summary>The conversations of a JSON Lines file ("line N") or of a JSON array ("element N").</summary>
    private static IEnumerable<(string Location, string Json)> Rows(string path)
    {
        var text = File.ReadAllText(path);
        if (text.TrimStart().StartsWith('['))
        {
            JsonDocument document;
            try
            {
                document = JsonDocument.Parse(text);
            }
            catch (JsonException e)
            {
                throw new InvalidInputException(path, e.LineNumber is long line ? $"line {line + 1}" : "", $"not valid JSON ({e.Message})");
            }
            using (document)
            {
                var number = 0;
                foreach (var element in document.RootElement.EnumerateArray())
                {
                    number++;
                    yield return ($"element {number}", element.GetRawText());
                }
            }
            yield break;
        }
        var lineNumber = 0;
        foreach (var line in text.Split('\n'))
        {
            lineNumber++;
            if (!string.IsNullOrWhiteSpace(line))
            {
                yield return ($"line {lineNumber}", line.TrimEnd('\r'));
            }
        }
    }
}
