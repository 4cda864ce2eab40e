namespace Functional

open System
open System.IO
open System.Text.Json

/// Where and why a JSON text does not parse.
type JsonSyntaxError =
    { /// The 1-based line of the fault; 0 when the parser does not say.
      Line: int64
      /// The byte of the fault within its line (from 0); 0 when the parser does not say.
      BytePositionInLine: int64
      /// The parser's reason, its first sentence (without .NET's "LineNumber: ... | BytePositionInLine: ..." tail).
      Reason: string
      /// The parser's whole message.
      Message: string }

/// Reading JSON given by users (config files, adapter configurations, tokenizer files, data rows, headers): every
/// reader parses through here, so syntax errors are found and described one way, with errors that name the file
/// and field.
[<RequireQualifiedAccess>]
module JsonInput =

    let private syntaxError (e: JsonException) =
        { Line = if e.LineNumber.HasValue then e.LineNumber.Value + 1L else 0L
          BytePositionInLine = if e.BytePositionInLine.HasValue then e.BytePositionInLine.Value else 0L
          Reason = e.Message.Split('.').[0]
          Message = e.Message }

    /// The root of a JSON text (comments allowed where allowComments), detached from the parser's buffers, or
    /// where and why it does not parse.
    let tryParseWith (allowComments: bool) (utf8: ReadOnlyMemory<byte>) : Result<JsonElement, JsonSyntaxError> =
        let options =
            JsonDocumentOptions(CommentHandling = (if allowComments then JsonCommentHandling.Skip else JsonCommentHandling.Disallow))
        try
            use document = JsonDocument.Parse(utf8, options)
            Ok(document.RootElement.Clone())
        with :? JsonException as e -> Error(syntaxError e)

    /// The root of a JSON text given as UTF-8 bytes, or where and why it does not parse.
    let tryParseBytes (utf8: ReadOnlyMemory<byte>) = tryParseWith false utf8

    /// The root of a JSON text, or where and why it does not parse.
    let tryParse (text: string) = tryParseWith false (ReadOnlyMemory(Text.Encoding.UTF8.GetBytes text))

    /// What a JSON value is, for messages: "an object", "an array", "a string", "a number", "a boolean",
    /// "null" or "nothing".
    let describe (kind: JsonValueKind) : string =
        match kind with
        | JsonValueKind.Object -> "an object"
        | JsonValueKind.Array -> "an array"
        | JsonValueKind.String -> "a string"
        | JsonValueKind.Number -> "a number"
        | JsonValueKind.True
        | JsonValueKind.False -> "a boolean"
        | JsonValueKind.Null -> "null"
        | _ -> "nothing"

    /// The JSON object in the file at path. Raises InvalidInputException naming path when the file does not
    /// exist (with missingProblem as the problem), is not valid JSON, or holds something else than an object.
    let readObject (path: string) (missingProblem: string) : JsonElement =
        if not (File.Exists path) then InvalidInput.fail path "" missingProblem
        let root =
            match tryParse (File.ReadAllText path) with
            | Ok root -> root
            | Error e -> InvalidInput.fail path "" (sprintf "not valid JSON: %s" e.Message)
        if root.ValueKind <> JsonValueKind.Object then
            InvalidInput.fail path "" (sprintf "expected a JSON object, found %s" (describe root.ValueKind))
        root

    /// The field of a JSON object, or None when it is absent or null.
    let field (root: JsonElement) (name: string) : JsonElement option =
        match root.TryGetProperty name with
        | true, value when value.ValueKind <> JsonValueKind.Null -> Some value
        | _ -> None

    /// The field of a JSON object read from path; raises InvalidInputException naming path and the field
    /// when it is absent or null.
    let required (path: string) (root: JsonElement) (name: string) : JsonElement =
        match field root name with
        | Some value -> value
        | None -> InvalidInput.fail path name "the field is missing"
