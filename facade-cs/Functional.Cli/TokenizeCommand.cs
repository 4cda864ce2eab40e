using System.CommandLine;
using System.Globalization;

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
        var text = new Argument<string?>("text")
        {
            Description = "The text to encode (or the ids to decode with --decode); taken as it is, also when it starts with @ (after --, also when it starts with -).",
            Arity = ArgumentArity.ZeroOrOne,
        };

        var command = new Command("tokenize", "Print the token ids of a text (space separated), or the text of token ids with --decode.")
        {
            model, tokenizer, decode, text,
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
            if (parse.GetResult(decode) is not null)
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

    /// <summary>Token ids separated by spaces or commas, optionally in brackets ("[1, 2, 3]").</summary>
    private static long[] ParseIds(string ids) =>
        ids.Split(IdSeparators, StringSplitOptions.RemoveEmptyEntries)
            .Select(part => long.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out var id)
                ? id
                : throw new InvalidInputException("--decode", "", $"expected token ids (non-negative integers), found '{part}'"))
            .ToArray();
}
