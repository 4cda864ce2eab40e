namespace Functional

open System.IO
open System.Text.Json

/// Reading small JSON files given by users (adapter configurations, headers) with errors that name the
/// file and field.
[<RequireQualifiedAccess>]
module JsonInput =

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
            try
                use document = JsonDocument.Parse(File.ReadAllText path)
                document.RootElement.Clone()
            with :? JsonException as e -> InvalidInput.fail path "" (sprintf "not valid JSON: %s" e.Message)
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
