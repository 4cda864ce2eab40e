using System.CommandLine;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace Functional.Cli;

/// <summary>`functional tokenize`: text to token ids and back, with a model folder's tokenizer or a tiktoken encoding.</summary>
internal static class TokenizeCommand
{
    private static readonly char[] IdSeparators = [' ', ',', '\t', '\n', '\r', '[', ']'];

    public static Command Create()
    {
        var model = new Option<string?>("--model", "--model_name_or_path", "--model-name-or-path")
        {
            Description = "Hugging Face model or tokenizer folder (tokenizer.json, vocab.json + merges.txt, or tokenizer.model).",
        };
        var tokenizer = new Option<string?>("--tokenizer", "--tokenizer_name", "--tokenizer-name")
        {
            Description = $"A tiktoken encoding: {string.Join(", ", Tokenizer.KnownEncodings)}.",
        };
        var decode = new Option<string?>("--decode")
        {
            Description = "Decode token ids (separated by spaces or commas) to text: the ids follow --decode or are the text argument.",
            Arity = ArgumentArity.ZeroOrOne,
        };
        var file = new Option<string?>("--file")
        {
            Description = "A JSON Lines file, one {\"text\": ...} per line (with --decode one {\"ids\": [...]} per line): one {\"ids\": [...]} (or {\"text\": ...}) per line out, in order.",
        };
        var text = new Argument<string?>("text")
        {
            Description = "The text to encode (or the ids to decode with --decode); taken as it is, also when it starts with @ (after --, also when it starts with -).",
            Arity = ArgumentArity.ZeroOrOne,
        };

        var command = new Command("tokenize", "Print the token ids of a text (space separated), or the text of token ids with --decode.")
        {
            model, tokenizer, decode, file, text,
        };
        command.SetAction(parse =>
        {
            var modelPath = parse.GetValue(model);
            var encoding = parse.GetValue(tokenizer);
            var loaded = (string.IsNullOrEmpty(modelPath), string.IsNullOrEmpty(encoding)) switch
            {
                (false, true) => Tokenizer.FromFolder(modelPath!),
                (true, false) => Tokenizer.FromEncoding(encoding!),
                _ => throw new InvalidInputException("--model", "", "expected exactly one of --model DIR or --tokenizer NAME"),
            };
            var argument = parse.GetValue(text);
            if (parse.GetValue(file) is { } path)
            {
                if (argument is not null || parse.GetValue(decode) is not null)
                {
                    throw new InvalidInputException("--file", "", "reads its texts (or ids) from the file: give no text argument and no ids after --decode");
                }
                RunFile(loaded, path, parse.GetResult(decode) is not null);
            }
            else if (parse.GetResult(decode) is not null)
            {
                // No ids ("" or "[]") decode to the empty text.
                var ids = parse.GetValue(decode) ?? argument
                    ?? throw new InvalidInputException("--decode", "", "expected token ids, e.g. --decode \"1 2 3\"");
                Console.WriteLine(loaded.Decode(ParseIds(ids)));
            }
            else
            {
                if (argument is null)
                {
                    throw new InvalidInputException("text", "", "expected the text to encode as the argument");
                }
                Console.WriteLine(string.Join(" ", loaded.Encode(argument)));
            }
            return 0;
        });
        return command;
    }

    private static readonly JsonSerializerOptions Output = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>Encodes (or decodes) every line of a JSON Lines file, writing one JSON object per line to standard
    /// output. A line that is not an object with the field ("text", a string; "ids", a list of non-negative integers)
    /// stops the run naming the file, the line and what was expected; nothing is written for the lines after it.</summary>
    private static void RunFile(Tokenizer tokenizer, string path, bool decoding)
    {
        if (!File.Exists(path))
        {
            throw new InvalidInputException(path, "", "the file does not exist (expected a JSON Lines file)");
        }
        var field = decoding ? "ids" : "text";
        using var output = new StreamWriter(Console.OpenStandardOutput()) { AutoFlush = false, NewLine = "\n" };
        var number = 0;
        foreach (var line in File.ReadLines(path))
        {
            number++;
            var location = $"line {number}";
            JsonElement root;
            try
            {
                using var document = JsonDocument.Parse(line);
                root = document.RootElement.Clone();
            }
            catch (JsonException e)
            {
                throw new InvalidInputException(path, location, $"not valid JSON ({e.Message}); expected {{\"{field}\": ...}}");
            }
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty(field, out var value))
            {
                throw new InvalidInputException(path, location, $"expected an object with \"{field}\"");
            }
            if (decoding)
            {
                if (value.ValueKind != JsonValueKind.Array || value.EnumerateArray().Any(v => v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out var n) || n < 0))
                {
                    throw new InvalidInputException(path, location + ": ids", "expected a list of non-negative integer token ids");
                }
                var ids = value.EnumerateArray().Select(v => v.GetInt64()).ToArray();
                output.WriteLine(JsonSerializer.Serialize(new Dictionary<string, string> { ["text"] = tokenizer.Decode(ids) }, Output));
            }
            else
            {
                if (value.ValueKind != JsonValueKind.String)
                {
                    throw new InvalidInputException(path, location + ": text", "expected a string");
                }
                output.WriteLine(JsonSerializer.Serialize(new Dictionary<string, long[]> { ["ids"] = tokenizer.Encode(value.GetString()!) }, Output));
            }
        }
        output.Flush();
    }

    /// <summary>Token ids separated by spaces or commas, optionally in brackets ("[1, 2, 3]").</summary>
    private static long[] ParseIds(string ids) =>
        ids.Split(IdSeparators, StringSplitOptions.RemoveEmptyEntries)
            .Select(part => long.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out var id)
                ? id
                : throw new InvalidInputException("--decode", "", $"expected token ids (non-negative integers), found '{part}'"))
            .ToArray();
}
