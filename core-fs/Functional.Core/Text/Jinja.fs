namespace Functional.Text

open System
open System.Collections.Generic
open System.Globalization
open System.Text
open System.Text.Json
open System.Text.RegularExpressions

// The subset of Jinja that Hugging Face chat templates use, written for this project (no Jinja engine
// exists for .NET). It behaves as Python's Jinja2 does under transformers' apply_chat_template
// (trim_blocks and lstrip_blocks on, tojson without ASCII escapes, raise_exception, strftime_now), which
// @huggingface/jinja (transformers.js) also follows; where the two differ (none prints "None" in Python
// and "" in JavaScript; selectattr over a missing attribute), this follows Python, what training with
// transformers sees. The goldens in tests/golden/chat-templates hold both renderers' output. Anything
// outside the subset is refused with the template's name and line.

/// A value a template computes with. Lists and mappings are compared by reference (a message found by
/// selectattr equals itself; two messages with equal fields are told apart, which only matters to
/// templates that compare messages, such as Mistral's "message == user_messages[-1]").
[<CustomEquality; NoComparison>]
type JinjaValue =
    | Undefined
    | Null
    | Bool of bool
    | Int of int64
    | Float of float
    | Str of string
    | List of JinjaValue[]
    /// An ordered mapping (a JSON object, a dict literal).
    | Dict of (string * JinjaValue)[]
    /// namespace(...): the one mutable value (set ns.attr = ...).
    | Namespace of Dictionary<string, JinjaValue>
    /// A global function, a macro or a bound method: positional and keyword arguments -> result.
    | Func of name: string * call: (JinjaValue list -> (string * JinjaValue) list -> JinjaValue)

    override this.Equals(other: obj) =
        match other with
        | :? JinjaValue as o -> JinjaValue.Same(this, o)
        | _ -> false

    override this.GetHashCode() =
        match this with
        | Str s -> s.GetHashCode()
        | Int i -> i.GetHashCode()
        | Bool b -> b.GetHashCode()
        | _ -> 0

    /// Equality as the template's == sees it: numbers by value (1 == 1.0), strings by content, none and
    /// undefined equal each other, lists, mappings and namespaces by reference.
    static member Same(a: JinjaValue, b: JinjaValue) =
        match a, b with
        | (Undefined | Null), (Undefined | Null) -> true
        | Bool x, Bool y -> x = y
        | Int x, Int y -> x = y
        | Int x, Float y | Float y, Int x -> float x = y
        | Float x, Float y -> x = y
        | Str x, Str y -> String.Equals(x, y, StringComparison.Ordinal)
        | List x, List y -> obj.ReferenceEquals(x, y)
        | Dict x, Dict y -> obj.ReferenceEquals(x, y)
        | Namespace x, Namespace y -> obj.ReferenceEquals(x, y)
        | _ -> false

/// A template could not be parsed or rendered: Template names it, Line is 1-based (0 when unknown).
/// Raised carries the message of raise_exception(...) when the template itself refused its input.
type JinjaException(template: string, line: int, problem: string, raised: string option) =
    inherit Exception(if line > 0 then sprintf "%s:%d: %s" template line problem else sprintf "%s: %s" template problem)
    /// The template's name (a file or "tokenizer_config.json chat_template").
    member _.Template = template
    /// The 1-based line of the template where the problem is.
    member _.Line = line
    /// What is wrong.
    member _.Problem = problem
    /// The message the template passed to raise_exception, when that is what stopped it.
    member _.Raised = raised

/// A character range [Start, End) of the rendered text that a {% generation %} block produced.
[<Struct>]
type GenerationSpan = { Start: int; End: int }

/// The rendered text and the spans of its {% generation %} blocks (HF's assistant-token marking).
type JinjaOutput = { Text: string; Generation: GenerationSpan[] }

/// Parsing and rendering Jinja templates.
[<RequireQualifiedAccess>]
module Jinja =

    // ------------------------------------------------------------------ tokens

    type private Tok =
        | TName of string
        | TString of string
        | TInt of int64
        | TFloat of float
        | TOp of string

    type private Item =
        | IText of string * line: int
        | IOutput of Tok[] * line: int
        | ITag of Tok[] * line: int

    exception private Fail of line: int * problem: string
    exception private Raised of line: int * message: string
    exception private BreakLoop
    exception private ContinueLoop

    let private fail line problem = raise (Fail(line, problem))

    let private ops2 = [| "=="; "!="; "<="; ">="; "//"; "**" |]
    let private ops1 = "()[]{},.:|~+-*/%<>="

    /// The template text after HF's preprocessing: one trailing newline dropped, lstrip_blocks (spaces and
    /// tabs before a block or comment tag at a line's start removed), trim_blocks (the newline after a
    /// block or comment tag removed); with, for each character kept, its 1-based line in the source, so
    /// that errors name the line the author sees.
    let private preprocess (source: string) : string * int[] =
        let source = source.Replace("\r\n", "\n")
        let source = if source.EndsWith "\n" then source.Substring(0, source.Length - 1) else source
        let drop = Array.zeroCreate<bool> source.Length
        for m in Regex.Matches(source, @"^[ \t]*(\{[#%-])", RegexOptions.Multiline) do
            for i in m.Index .. m.Groups[1].Index - 1 do drop[i] <- true
        for m in Regex.Matches(source, @"([#%-]\})\n") do
            drop[m.Index + 2] <- true
        let text = StringBuilder(source.Length)
        let lines = ResizeArray<int>(source.Length)
        let mutable line = 1
        for i in 0 .. source.Length - 1 do
            if not drop[i] then
                text.Append source[i] |> ignore
                lines.Add line
            if source[i] = '\n' then line <- line + 1
        text.ToString(), lines.ToArray()

    let private lineAt (lines: int[]) (offset: int) =
        if lines.Length = 0 then 1 elif offset < lines.Length then lines[offset] else lines[lines.Length - 1]

    /// Splits the template into text, {{ output }} and {% tag %} items; {# comments #} disappear. Whitespace
    /// control ("-" inside a delimiter) trims the neighbouring text.
    let private lex (source: string, lineStarts: int[]) : Item list =
        let items = ResizeArray<Item>()
        let mutable trimNext = false
        let mutable pos = 0
        let addText (text: string) (start: int) (trimEnd: bool) =
            let text = if trimNext then text.TrimStart() else text
            let text = if trimEnd then text.TrimEnd() else text
            trimNext <- false
            if text.Length > 0 then items.Add(IText(text, lineAt lineStarts start))
        let n = source.Length
        while pos < n do
            let next = source.IndexOf('{', pos)
            let rec findOpen (from: int) =
                let i = source.IndexOf('{', from)
                if i < 0 || i + 1 >= n then -1
                elif source[i + 1] = '{' || source[i + 1] = '%' || source[i + 1] = '#' then i
                else findOpen (i + 1)
            let start = if next < 0 then -1 else findOpen next
            if start < 0 then
                addText (source.Substring pos) pos false
                pos <- n
            else
                let kind = source[start + 1]
                let minus = start + 2 < n && source[start + 2] = '-'
                addText (source.Substring(pos, start - pos)) pos minus
                let line = lineAt lineStarts start
                let bodyStart = start + (if minus then 3 else 2)
                if kind = '#' then
                    let close = source.IndexOf("#}", bodyStart, StringComparison.Ordinal)
                    if close < 0 then fail line "a comment {# is never closed with #}"
                    trimNext <- close > bodyStart && source[close - 1] = '-'
                    pos <- close + 2
                else
                    let closer = if kind = '{' then "}}" else "%}"
                    let toks = ResizeArray<Tok>()
                    let mutable p = bodyStart
                    let mutable closed = false
                    while not closed do
                        while p < n && Char.IsWhiteSpace source[p] do p <- p + 1
                        if p >= n then fail line (sprintf "a tag opened here is never closed with %s" closer)
                        let c = source[p]
                        if c = '-' && p + 2 < n + 1 && String.CompareOrdinal(source, p + 1, closer, 0, 2) = 0 then
                            trimNext <- true
                            closed <- true
                            p <- p + 3
                        elif String.CompareOrdinal(source, p, closer, 0, 2) = 0 then
                            closed <- true
                            p <- p + 2
                        elif c = '"' || c = '\'' then
                            let sb = StringBuilder()
                            let mutable q = p + 1
                            while q < n && source[q] <> c do
                                if source[q] = '\\' && q + 1 < n then
                                    let e = source[q + 1]
                                    match e with
                                    | 'n' -> sb.Append '\n' |> ignore
                                    | 't' -> sb.Append '\t' |> ignore
                                    | 'r' -> sb.Append '\r' |> ignore
                                    | 'b' -> sb.Append '\b' |> ignore
                                    | 'f' -> sb.Append '\f' |> ignore
                                    | 'v' -> sb.Append '\v' |> ignore
                                    | '\'' | '"' | '\\' -> sb.Append e |> ignore
                                    | other -> sb.Append('\\').Append(other) |> ignore
                                    q <- q + 2
                                else
                                    sb.Append source[q] |> ignore
                                    q <- q + 1
                            if q >= n then fail line "a string literal is never closed"
                            toks.Add(TString(sb.ToString()))
                            p <- q + 1
                        elif Char.IsDigit c then
                            let mutable q = p
                            while q < n && (Char.IsDigit source[q] || source[q] = '_') do q <- q + 1
                            if q + 1 < n && source[q] = '.' && Char.IsDigit source[q + 1] then
                                q <- q + 1
                                while q < n && Char.IsDigit source[q] do q <- q + 1
                                toks.Add(TFloat(Double.Parse(source.Substring(p, q - p).Replace("_", ""), CultureInfo.InvariantCulture)))
                            else toks.Add(TInt(Int64.Parse(source.Substring(p, q - p).Replace("_", ""), CultureInfo.InvariantCulture)))
                            p <- q
                        elif Char.IsLetter c || c = '_' then
                            let mutable q = p
                            while q < n && (Char.IsLetterOrDigit source[q] || source[q] = '_') do q <- q + 1
                            toks.Add(TName(source.Substring(p, q - p)))
                            p <- q
                        else
                            let two = if p + 1 < n then source.Substring(p, 2) else ""
                            if Array.contains two ops2 then
                                toks.Add(TOp two)
                                p <- p + 2
                            elif ops1.IndexOf c >= 0 then
                                toks.Add(TOp(string c))
                                p <- p + 1
                            else fail line (sprintf "unexpected character '%c' in a tag" c)
                    let toks = toks.ToArray()
                    items.Add(if kind = '{' then IOutput(toks, line) else ITag(toks, line))
                    pos <- p
        List.ofSeq items

    // ------------------------------------------------------------------ syntax tree

    type private Expr =
        | ELit of JinjaValue
        | EName of string
        | EAttr of Expr * string
        | EIndex of Expr * Expr
        | ESlice of Expr * Expr option * Expr option * Expr option
        | ECall of Expr * Expr list * (string * Expr) list
        | EFilter of Expr * string * Expr list * (string * Expr) list
        | ETest of Expr * string * Expr list * negated: bool
        | EBinary of string * Expr * Expr
        | EAnd of Expr * Expr
        | EOr of Expr * Expr
        | ENot of Expr
        | ENeg of Expr
        | ECond of Expr * Expr * Expr option
        | EList of Expr list
        | EDict of (Expr * Expr) list

    type private Target =
        | TVar of string
        | TAttr of string * string
        | TTuple of string list

    type private Node =
        | NText of string
        | NOutput of Expr * line: int
        | NIf of (Expr * Node list) list * Node list * line: int
        | NFor of Target * Expr * Expr option * Node list * Node list * line: int
        | NSet of Target * Expr * line: int
        | NSetBlock of string * Node list * line: int
        | NMacro of string * (string * Expr option) list * Node list * line: int
        | NBreak of line: int
        | NContinue of line: int
        | NGeneration of Node list

    /// A parsed template.
    type Template = private { Name: string; Body: Node list }

    /// Recursive descent over one tag's tokens.
    type private Parser(toks: Tok[], line: int) =
        let mutable i = 0
        member _.AtEnd = i >= toks.Length
        member _.Peek = if i < toks.Length then Some toks[i] else None
        member _.PeekAt k = if i + k < toks.Length then Some toks[i + k] else None
        member _.Next() =
            if i >= toks.Length then fail line "the tag ends too early"
            i <- i + 1
            toks[i - 1]
        member p.IsOp(op: string) = match p.Peek with Some(TOp o) when o = op -> true | _ -> false
        member p.IsName(name: string) = match p.Peek with Some(TName n) when n = name -> true | _ -> false
        member p.Expect(op: string) =
            if p.IsOp op then p.Next() |> ignore
            else fail line (sprintf "expected '%s' %s" op (p.Where()))
        member p.ExpectName(name: string) =
            if p.IsName name then p.Next() |> ignore
            else fail line (sprintf "expected '%s' %s" name (p.Where()))
        member p.Name() =
            match p.Next() with
            | TName n -> n
            | t -> fail line (sprintf "expected a name, found %s" (Parser.Show t))
        member p.Where() =
            match p.Peek with
            | Some t -> sprintf "before %s" (Parser.Show t)
            | None -> "at the end of the tag"
        static member Show(t: Tok) =
            match t with
            | TName n -> sprintf "'%s'" n
            | TString s -> sprintf "the string \"%s\"" s
            | TInt v -> string v
            | TFloat v -> string v
            | TOp o -> sprintf "'%s'" o
        member p.Done() =
            if not p.AtEnd then fail line (sprintf "unexpected %s in the tag" (Parser.Show toks[i]))

        // expression grammar (Jinja2's precedence)
        member p.Expression() : Expr =
            let value = p.Or()
            if p.IsName "if" then
                p.Next() |> ignore
                let cond = p.Or()
                let otherwise =
                    if p.IsName "else" then
                        p.Next() |> ignore
                        Some(p.Expression())
                    else None
                ECond(cond, value, otherwise)
            else value
        member p.Or() =
            let mutable left = p.And()
            while p.IsName "or" do
                p.Next() |> ignore
                left <- EOr(left, p.And())
            left
        member p.And() =
            let mutable left = p.Not()
            while p.IsName "and" do
                p.Next() |> ignore
                left <- EAnd(left, p.Not())
            left
        member p.Not() =
            if p.IsName "not" then
                p.Next() |> ignore
                ENot(p.Not())
            else p.Compare()
        member p.Compare() =
            let mutable left = p.Add()
            let mutable go = true
            while go do
                match p.Peek with
                | Some(TOp("==" | "!=" | "<" | ">" | "<=" | ">=" as op)) ->
                    p.Next() |> ignore
                    left <- EBinary(op, left, p.Add())
                | Some(TName "in") ->
                    p.Next() |> ignore
                    left <- EBinary("in", left, p.Add())
                | Some(TName "not") when (match p.PeekAt 1 with Some(TName "in") -> true | _ -> false) ->
                    p.Next() |> ignore
                    p.Next() |> ignore
                    left <- EBinary("not in", left, p.Add())
                | _ -> go <- false
            left
        member p.Add() =
            let mutable left = p.Concat()
            let mutable go = true
            while go do
                match p.Peek with
                | Some(TOp("+" | "-" as op)) ->
                    p.Next() |> ignore
                    left <- EBinary(op, left, p.Concat())
                | _ -> go <- false
            left
        member p.Concat() =
            let mutable left = p.Mul()
            while p.IsOp "~" do
                p.Next() |> ignore
                left <- EBinary("~", left, p.Mul())
            left
        member p.Mul() =
            let mutable left = p.Pow()
            let mutable go = true
            while go do
                match p.Peek with
                | Some(TOp("*" | "/" | "//" | "%" as op)) ->
                    p.Next() |> ignore
                    left <- EBinary(op, left, p.Pow())
                | _ -> go <- false
            left
        member p.Pow() =
            let left = p.Unary()
            if p.IsOp "**" then
                p.Next() |> ignore
                EBinary("**", left, p.Unary())
            else left
        member p.Unary() =
            if p.IsOp "-" then
                p.Next() |> ignore
                ENeg(p.Unary())
            elif p.IsOp "+" then
                p.Next() |> ignore
                p.Unary()
            else p.Postfix(p.Primary())
        member p.Arguments() =
            // after '(': positional and keyword arguments up to ')'
            let positional = ResizeArray()
            let keywords = ResizeArray()
            while not (p.IsOp ")") do
                match p.Peek, p.PeekAt 1 with
                | Some(TName n), Some(TOp "=") ->
                    p.Next() |> ignore
                    p.Next() |> ignore
                    keywords.Add((n, p.Expression()))
                | _ ->
                    if keywords.Count > 0 then fail line "a positional argument follows a keyword argument"
                    positional.Add(p.Expression())
                if not (p.IsOp ")") then p.Expect ","
            p.Expect ")"
            List.ofSeq positional, List.ofSeq keywords
        member p.Postfix(e: Expr) : Expr =
            if p.IsOp "." then
                p.Next() |> ignore
                match p.Next() with
                | TName n -> p.Postfix(EAttr(e, n))
                | TInt k -> p.Postfix(EIndex(e, ELit(Int k)))
                | t -> fail line (sprintf "expected an attribute name after '.', found %s" (Parser.Show t))
            elif p.IsOp "[" then
                p.Next() |> ignore
                let part () = if p.IsOp ":" || p.IsOp "]" then None else Some(p.Expression())
                let first = part ()
                if p.IsOp ":" then
                    p.Next() |> ignore
                    let stop = part ()
                    let step =
                        if p.IsOp ":" then
                            p.Next() |> ignore
                            part ()
                        else None
                    p.Expect "]"
                    p.Postfix(ESlice(e, first, stop, step))
                else
                    p.Expect "]"
                    match first with
                    | Some index -> p.Postfix(EIndex(e, index))
                    | None -> fail line "an empty subscript []"
            elif p.IsOp "(" then
                p.Next() |> ignore
                let args, kwargs = p.Arguments()
                p.Postfix(ECall(e, args, kwargs))
            elif p.IsOp "|" then
                p.Next() |> ignore
                let name = p.FilterName()
                let args, kwargs =
                    if p.IsOp "(" then
                        p.Next() |> ignore
                        p.Arguments()
                    else [], []
                p.Postfix(EFilter(e, name, args, kwargs))
            elif p.IsName "is" then
                p.Next() |> ignore
                let negated =
                    if p.IsName "not" then
                        p.Next() |> ignore
                        true
                    else false
                let name =
                    match p.Next() with
                    | TName n -> n
                    | TOp("==" | "!=" | "<" | ">" | "<=" | ">=" as o) -> o
                    | t -> fail line (sprintf "expected a test name after 'is', found %s" (Parser.Show t))
                let args =
                    if p.IsOp "(" then
                        p.Next() |> ignore
                        fst (p.Arguments())
                    else
                        match p.Peek with
                        | Some(TString _ | TInt _ | TFloat _) -> [ p.Primary() ]
                        | Some(TName n) when n <> "and" && n <> "or" && n <> "if" && n <> "else" && n <> "is" && n <> "in" && n <> "not" && n <> "for" ->
                            [ p.Primary() ]
                        | _ -> []
                p.Postfix(ETest(e, name, args, negated))
            else e
        member p.FilterName() =
            let mutable name = p.Name()
            while p.IsOp "." do
                p.Next() |> ignore
                name <- name + "." + p.Name()
            name
        member p.Primary() : Expr =
            match p.Next() with
            | TString s ->
                // adjacent string literals concatenate, as in Python
                let mutable s = s
                let mutable go = true
                while go do
                    match p.Peek with
                    | Some(TString t) ->
                        p.Next() |> ignore
                        s <- s + t
                    | _ -> go <- false
                ELit(Str s)
            | TInt v -> ELit(Int v)
            | TFloat v -> ELit(Float v)
            | TName("true" | "True") -> ELit(Bool true)
            | TName("false" | "False") -> ELit(Bool false)
            | TName("none" | "None") -> ELit Null
            | TName n -> EName n
            | TOp "(" ->
                if p.IsOp ")" then
                    p.Next() |> ignore
                    EList []
                else
                    let first = p.Expression()
                    if p.IsOp "," then
                        let items = ResizeArray [ first ]
                        while p.IsOp "," do
                            p.Next() |> ignore
                            if not (p.IsOp ")") then items.Add(p.Expression())
                        p.Expect ")"
                        EList(List.ofSeq items)
                    else
                        p.Expect ")"
                        first
            | TOp "[" ->
                let items = ResizeArray()
                while not (p.IsOp "]") do
                    items.Add(p.Expression())
                    if not (p.IsOp "]") then p.Expect ","
                p.Expect "]"
                EList(List.ofSeq items)
            | TOp "{" ->
                let items = ResizeArray()
                while not (p.IsOp "}") do
                    let key = p.Expression()
                    p.Expect ":"
                    items.Add((key, p.Expression()))
                    if not (p.IsOp "}") then p.Expect ","
                p.Expect "}"
                EDict(List.ofSeq items)
            | t -> fail line (sprintf "unexpected %s in an expression" (Parser.Show t))

        /// A for/set target: a name, name.attr or several names separated by commas.
        member p.Target(allowAttr: bool) : Target =
            let first = p.Name()
            if allowAttr && p.IsOp "." then
                p.Next() |> ignore
                TAttr(first, p.Name())
            elif p.IsOp "," then
                let names = ResizeArray [ first ]
                while p.IsOp "," do
                    p.Next() |> ignore
                    names.Add(p.Name())
                TTuple(List.ofSeq names)
            else TVar first

        /// The iterable of a for loop: an expression up to an inline 'if' filter (not a conditional).
        member p.Iterable() : Expr = p.Or()

    let private tagName (toks: Tok[]) =
        match toks with
        | [||] -> ""
        | _ -> match toks[0] with TName n -> n | _ -> ""

    let private supported =
        "if, elif, else, for, set, macro, break, continue, generation and their end tags"

    /// Parses items into nodes up to one of the given end tags; returns the nodes, the end tag met and
    /// the items after it.
    let rec private parseBlock (name: string) (stopAt: string list) (items: Item list) : Node list * (Tok[] * int) option * Item list =
        let nodes = ResizeArray<Node>()
        let rec loop items =
            match items with
            | [] -> None, []
            | IText(text, _) :: rest ->
                nodes.Add(NText text)
                loop rest
            | IOutput(toks, line) :: rest ->
                let p = Parser(toks, line)
                let e = p.Expression()
                p.Done()
                nodes.Add(NOutput(e, line))
                loop rest
            | ITag(toks, line) :: rest ->
                let tag = tagName toks
                if List.contains tag stopAt then Some(toks, line), rest
                else
                    let p = Parser(toks, line)
                    p.Next() |> ignore
                    match tag with
                    | "if" ->
                        let branches = ResizeArray()
                        let mutable cond = p.Expression()
                        p.Done()
                        let mutable rest = rest
                        let mutable elseBody = []
                        let mutable go = true
                        while go do
                            let body, ending, after = parseBlock name [ "elif"; "else"; "endif" ] rest
                            branches.Add((cond, body))
                            rest <- after
                            match ending with
                            | Some(toks, l) when tagName toks = "elif" ->
                                let q = Parser(toks, l)
                                q.Next() |> ignore
                                cond <- q.Expression()
                                q.Done()
                            | Some(toks, l) when tagName toks = "else" ->
                                Parser(toks, l).Next() |> ignore
                                let body, ending, after = parseBlock name [ "endif" ] rest
                                if ending.IsNone then fail line "this {% if %} is never closed with {% endif %}"
                                elseBody <- body
                                rest <- after
                                go <- false
                            | Some _ -> go <- false
                            | None -> fail line "this {% if %} is never closed with {% endif %}"
                        nodes.Add(NIf(List.ofSeq branches, elseBody, line))
                        loop rest
                    | "for" ->
                        let target = p.Target false
                        p.ExpectName "in"
                        let iterable = p.Iterable()
                        let filter =
                            if p.IsName "if" then
                                p.Next() |> ignore
                                Some(p.Expression())
                            else None
                        if p.IsName "recursive" then fail line "recursive for loops are not supported"
                        p.Done()
                        let body, ending, after = parseBlock name [ "else"; "endfor" ] rest
                        match ending with
                        | Some(toks, _) when tagName toks = "else" ->
                            let elseBody, ending, after = parseBlock name [ "endfor" ] after
                            if ending.IsNone then fail line "this {% for %} is never closed with {% endfor %}"
                            nodes.Add(NFor(target, iterable, filter, body, elseBody, line))
                            loop after
                        | Some _ ->
                            nodes.Add(NFor(target, iterable, filter, body, [], line))
                            loop after
                        | None -> fail line "this {% for %} is never closed with {% endfor %}"
                    | "set" ->
                        let target = p.Target true
                        if p.AtEnd then
                            match target with
                            | TVar v ->
                                let body, ending, after = parseBlock name [ "endset" ] rest
                                if ending.IsNone then fail line "this {% set %} block is never closed with {% endset %}"
                                nodes.Add(NSetBlock(v, body, line))
                                loop after
                            | _ -> fail line "a {% set %} block takes one name"
                        else
                            p.Expect "="
                            let e = p.Expression()
                            p.Done()
                            nodes.Add(NSet(target, e, line))
                            loop rest
                    | "macro" ->
                        let macroName = p.Name()
                        p.Expect "("
                        let parameters = ResizeArray()
                        while not (p.IsOp ")") do
                            let param = p.Name()
                            let defaultValue =
                                if p.IsOp "=" then
                                    p.Next() |> ignore
                                    Some(p.Expression())
                                else None
                            parameters.Add((param, defaultValue))
                            if not (p.IsOp ")") then p.Expect ","
                        p.Expect ")"
                        p.Done()
                        let body, ending, after = parseBlock name [ "endmacro" ] rest
                        if ending.IsNone then fail line "this {% macro %} is never closed with {% endmacro %}"
                        nodes.Add(NMacro(macroName, List.ofSeq parameters, body, line))
                        loop after
                    | "break" ->
                        p.Done()
                        nodes.Add(NBreak line)
                        loop rest
                    | "continue" ->
                        p.Done()
                        nodes.Add(NContinue line)
                        loop rest
                    | "generation" ->
                        p.Done()
                        let body, ending, after = parseBlock name [ "endgeneration" ] rest
                        if ending.IsNone then fail line "this {% generation %} is never closed with {% endgeneration %}"
                        nodes.Add(NGeneration body)
                        loop after
                    | "" -> fail line "an empty tag {% %}"
                    | other ->
                        let ending = [ "endif"; "endfor"; "endset"; "endmacro"; "endgeneration"; "elif"; "else" ]
                        if List.contains other ending then fail line (sprintf "{%% %s %%} without the block it closes" other)
                        else fail line (sprintf "the statement {%% %s %%} is not supported (supported: %s)" other supported)
        let ending, rest = loop items
        List.ofSeq nodes, ending, rest

    /// Parses a template's source; name is what errors call it (a file, "tokenizer_config.json
    /// chat_template"). Raises JinjaException naming the line of a syntax error or an unsupported statement.
    let parse (name: string) (source: string) : Template =
        try
            let items = lex (preprocess source)
            let body, ending, _ = parseBlock name [] items
            match ending with
            | Some(toks, line) -> fail line (sprintf "unexpected {%% %s %%}" (tagName toks))
            | None -> { Name = name; Body = body }
        with Fail(line, problem) -> raise (JinjaException(name, line, problem, None))

    // ------------------------------------------------------------------ values

    let private typeName (v: JinjaValue) =
        match v with
        | Undefined -> "undefined"
        | Null -> "none"
        | Bool _ -> "boolean"
        | Int _ -> "integer"
        | Float _ -> "float"
        | Str _ -> "string"
        | List _ -> "list"
        | Dict _ -> "mapping"
        | Namespace _ -> "namespace"
        | Func _ -> "function"

    let rec private truthy (v: JinjaValue) =
        match v with
        | Undefined | Null -> false
        | Bool b -> b
        | Int i -> i <> 0L
        | Float f -> f <> 0.0 && not (Double.IsNaN f)
        | Str s -> s.Length > 0
        | List items -> items.Length > 0
        | Dict entries -> entries.Length > 0
        | Namespace _ | Func _ -> true

    let private formatFloat (f: float) =
        if f = 0.0 && Double.IsNegative f then "-0.0"
        elif Double.IsInteger f && abs f < 1e21 then f.ToString("0.0", CultureInfo.InvariantCulture)
        else f.ToString("R", CultureInfo.InvariantCulture)

    /// A string as JSON.stringify writes it: quotes, backslash and control characters escaped; other
    /// characters (non-ASCII included) as they are, unless ensureAscii.
    let private jsonString (s: string) (ensureAscii: bool) =
        let sb = StringBuilder(s.Length + 2)
        sb.Append '"' |> ignore
        for i in 0 .. s.Length - 1 do
            let c = s[i]
            match c with
            | '"' -> sb.Append "\\\"" |> ignore
            | '\\' -> sb.Append "\\\\" |> ignore
            | '\n' -> sb.Append "\\n" |> ignore
            | '\r' -> sb.Append "\\r" |> ignore
            | '\t' -> sb.Append "\\t" |> ignore
            | '\b' -> sb.Append "\\b" |> ignore
            | '\f' -> sb.Append "\\f" |> ignore
            | c when c < ' ' -> sb.AppendFormat("\\u{0:x4}", int c) |> ignore
            | c when Char.IsSurrogate c ->
                let paired =
                    if Char.IsHighSurrogate c then i + 1 < s.Length && Char.IsLowSurrogate s[i + 1]
                    else i > 0 && Char.IsHighSurrogate s[i - 1]
                if paired && not ensureAscii then sb.Append c |> ignore
                else sb.AppendFormat("\\u{0:x4}", int c) |> ignore
            | c when ensureAscii && int c > 126 -> sb.AppendFormat("\\u{0:x4}", int c) |> ignore
            | c -> sb.Append c |> ignore
        sb.Append('"').ToString()

    /// tojson: JSON with ", " and ": " separators, or an indented layout ("," and ": ") when indent is set.
    let rec private toJson (v: JinjaValue) (indent: int option) (depth: int) (undefinedAsNull: bool) (ensureAscii: bool) : string =
        let item, key = if indent.IsSome then ",", ": " else ", ", ": "
        let pad = match indent with Some k -> String(' ', k) | None -> ""
        let basePad = "\n" + String.replicate depth pad
        let childPad = basePad + pad
        let sub x = toJson x indent (depth + 1) undefinedAsNull ensureAscii
        match v with
        | Null -> "null"
        | Undefined -> if undefinedAsNull then "null" else "undefined"
        | Bool b -> if b then "true" else "false"
        | Int i -> string i
        | Float f -> formatFloat f
        | Str s -> jsonString s ensureAscii
        | List items ->
            let core = items |> Array.map sub
            if indent.IsSome && core.Length > 0 then "[" + childPad + String.Join(item + childPad, core) + basePad + "]"
            else "[" + String.Join(item, core) + "]"
        | Dict _ | Namespace _ ->
            let entries =
                match v with
                | Dict e -> e
                | Namespace d -> [| for kv in d -> kv.Key, kv.Value |]
                | _ -> [||]
            let core =
                entries
                |> Array.map (fun (k, x) ->
                    let text = jsonString k ensureAscii + key + sub x
                    if indent.IsSome then childPad + text else text)
            if indent.IsSome && core.Length > 0 then "{" + String.Join(item, core) + basePad + "}"
            else "{" + String.Join(item, core) + "}"
        | Func(name, _) -> fail 0 (sprintf "the function %s cannot be written as JSON" name)

    /// A string as Python's repr writes it: single quotes unless it holds a single quote and no double one.
    let private pyStringRepr (s: string) =
        let quote = if s.Contains '\'' && not (s.Contains '"') then '"' else '\''
        let sb = StringBuilder(s.Length + 2)
        sb.Append quote |> ignore
        for c in s do
            match c with
            | '\\' -> sb.Append "\\\\" |> ignore
            | '\n' -> sb.Append "\\n" |> ignore
            | '\r' -> sb.Append "\\r" |> ignore
            | '\t' -> sb.Append "\\t" |> ignore
            | c when c = quote -> sb.Append('\\').Append(c) |> ignore
            | c when c < ' ' || c = '\u007f' -> sb.AppendFormat("\\x{0:x2}", int c) |> ignore
            | c -> sb.Append c |> ignore
        sb.Append(quote).ToString()

    /// How a value prints in the output and under the string filter: Python's str (None, True, False;
    /// lists and mappings as Python's repr); undefined prints nothing.
    let rec private show (v: JinjaValue) : string =
        match v with
        | Undefined -> ""
        | Null -> "None"
        | Bool b -> if b then "True" else "False"
        | Int i -> string i
        | Float f -> formatFloat f
        | Str s -> s
        | List _ | Dict _ | Namespace _ -> repr v
        | Func(name, _) -> sprintf "<function %s>" name

    and private repr (v: JinjaValue) : string =
        match v with
        | Str s -> pyStringRepr s
        | List items -> "[" + String.Join(", ", items |> Array.map repr) + "]"
        | Dict entries -> "{" + String.Join(", ", entries |> Array.map (fun (k, x) -> pyStringRepr k + ": " + repr x)) + "}"
        | Namespace d -> "<Namespace {" + String.Join(", ", [| for kv in d -> pyStringRepr kv.Key + ": " + repr kv.Value |]) + "}>"
        | Undefined -> ""
        | other -> show other

    /// A JSON document as template values (objects keep their key order; integers stay integers).
    let rec ofJson (element: JsonElement) : JinjaValue =
        match element.ValueKind with
        | JsonValueKind.Object -> Dict [| for p in element.EnumerateObject() -> p.Name, ofJson p.Value |]
        | JsonValueKind.Array -> List [| for x in element.EnumerateArray() -> ofJson x |]
        | JsonValueKind.String -> Str(element.GetString())
        | JsonValueKind.Number ->
            match element.TryGetInt64() with
            | true, i when not (element.GetRawText().Contains '.') && not (element.GetRawText().ToLowerInvariant().Contains 'e') -> Int i
            | _ -> Float(element.GetDouble())
        | JsonValueKind.True -> Bool true
        | JsonValueKind.False -> Bool false
        | _ -> Null

    // ------------------------------------------------------------------ evaluation

    type private Scope(parent: Scope option) =
        let vars = Dictionary<string, JinjaValue>()
        member _.Parent = parent
        member this.Get(name: string) =
            match vars.TryGetValue name with
            | true, v -> v
            | _ ->
                match parent with
                | Some p -> p.Get name
                | None -> Undefined
        member _.Set(name: string, value: JinjaValue) = vars[name] <- value

    let private lookup (v: JinjaValue) (key: string) =
        match v with
        | Dict entries ->
            match entries |> Array.tryFind (fun (k, _) -> k = key) with
            | Some(_, x) -> x
            | None -> Undefined
        | Namespace d ->
            match d.TryGetValue key with
            | true, x -> x
            | _ -> Undefined
        | _ -> Undefined

    let private asInt line (what: string) (v: JinjaValue) =
        match v with
        | Int i -> i
        | Bool b -> if b then 1L else 0L
        | Float f when Double.IsInteger f -> int64 f
        | other -> fail line (sprintf "%s must be an integer, found %s" what (typeName other))

    let private items line (what: string) (v: JinjaValue) : JinjaValue[] =
        match v with
        | List xs -> xs
        | Dict entries -> entries |> Array.map (fst >> Str)
        | Str s -> [| for r in s.EnumerateRunes() -> Str(r.ToString()) |]
        | Namespace d -> [| for kv in d -> Str kv.Key |]
        | other -> fail line (sprintf "%s must be a list or mapping, found %s" what (typeName other))

    let private slice line (v: JinjaValue) (start: int64 option) (stop: int64 option) (step: int64 option) =
        let step = defaultArg step 1L
        if step = 0L then fail line "a slice step of 0"
        let pick (length: int) : int[] =
            let n = int64 length
            let norm (x: int64) = if x < 0L then max (if step < 0L then -1L else 0L) (x + n) else min x (if step < 0L then n - 1L else n)
            let first = match start with Some s -> norm s | None -> if step > 0L then 0L else n - 1L
            let last = match stop with Some s -> norm s | None -> if step > 0L then n else -1L
            [| let mutable i = first
               while (step > 0L && i < last) || (step < 0L && i > last) do
                   yield int i
                   i <- i + step |]
        match v with
        | List xs -> List(pick xs.Length |> Array.map (fun i -> xs[i]))
        | Str s ->
            let chars = s.ToCharArray()
            Str(String(pick chars.Length |> Array.map (fun i -> chars[i])))
        | other -> fail line (sprintf "cannot slice a %s" (typeName other))

    let private strip (s: string) (chars: JinjaValue list) (left: bool) (right: bool) =
        match chars with
        | [ Str cs ] ->
            let set = cs.ToCharArray()
            let s = if left then s.TrimStart set else s
            if right then s.TrimEnd set else s
        | _ ->
            let s = if left then s.TrimStart() else s
            if right then s.TrimEnd() else s

    let private titleCase (s: string) =
        let sb = StringBuilder(s.Length)
        let mutable start = true
        for c in s do
            if Char.IsLetter c then
                sb.Append(if start then Char.ToUpperInvariant c else Char.ToLowerInvariant c) |> ignore
                start <- false
            else
                sb.Append c |> ignore
                start <- not (Char.IsLetterOrDigit c)
        sb.ToString()

    let private capitalize (s: string) =
        if s.Length = 0 then s else string (Char.ToUpperInvariant s[0]) + s.Substring(1).ToLowerInvariant()

    let private func name f = Func(name, f)

    /// The methods of a value: string methods, a mapping's items/keys/values/get.
    let private methodOf line (v: JinjaValue) (name: string) : JinjaValue =
        let m f = func name (fun args kwargs -> f args kwargs)
        match v, name with
        | Str s, "upper" -> m (fun _ _ -> Str(s.ToUpperInvariant()))
        | Str s, "lower" -> m (fun _ _ -> Str(s.ToLowerInvariant()))
        | Str s, "strip" -> m (fun args _ -> Str(strip s args true true))
        | Str s, "lstrip" -> m (fun args _ -> Str(strip s args true false))
        | Str s, "rstrip" -> m (fun args _ -> Str(strip s args false true))
        | Str s, "title" -> m (fun _ _ -> Str(titleCase s))
        | Str s, "capitalize" -> m (fun _ _ -> Str(capitalize s))
        | Str s, ("startswith" | "endswith") ->
            m (fun args _ ->
                let test (p: string) = if name = "startswith" then s.StartsWith(p, StringComparison.Ordinal) else s.EndsWith(p, StringComparison.Ordinal)
                match args with
                | [ Str p ] -> Bool(test p)
                | [ List ps ] -> Bool(ps |> Array.exists (function Str p -> test p | _ -> false))
                | _ -> fail line (sprintf "%s takes a string or a tuple of strings" name))
        | Str s, "split" ->
            m (fun args kwargs ->
                let sep = match args with Str p :: _ -> Some p | _ -> (match List.tryFind (fst >> (=) "sep") kwargs with Some(_, Str p) -> Some p | _ -> None)
                let maxSplit =
                    match args with
                    | [ _; Int k ] -> int k
                    | _ -> match List.tryFind (fst >> (=) "maxsplit") kwargs with Some(_, Int k) -> int k | _ -> -1
                match sep with
                | Some "" -> fail line "split: empty separator"
                | Some p ->
                    let parts = if maxSplit < 0 then s.Split(p) else s.Split(p, maxSplit + 1)
                    List(parts |> Array.map Str)
                | None ->
                    let parts = s.Split((null: char[]), StringSplitOptions.RemoveEmptyEntries)
                    List(parts |> Array.map Str))
        | Str s, "replace" ->
            m (fun args _ ->
                match args with
                | [ Str a; Str b ] -> Str(if a = "" then s else s.Replace(a, b))
                | [ Str a; Str b; Int count ] ->
                    let sb = StringBuilder()
                    let mutable rest = s
                    let mutable left = count
                    let mutable i = rest.IndexOf(a, StringComparison.Ordinal)
                    while left > 0L && a <> "" && i >= 0 do
                        sb.Append(rest.Substring(0, i)).Append(b) |> ignore
                        rest <- rest.Substring(i + a.Length)
                        left <- left - 1L
                        i <- rest.IndexOf(a, StringComparison.Ordinal)
                    Str(sb.Append(rest).ToString())
                | _ -> fail line "replace takes two strings (and a count)")
        | Str s, "find" -> m (fun args _ -> match args with [ Str p ] -> Int(int64 (s.IndexOf(p, StringComparison.Ordinal))) | _ -> fail line "find takes a string")
        | Str s, "count" -> m (fun args _ -> match args with [ Str p ] when p <> "" -> Int(int64 ((s.Length - s.Replace(p, "").Length) / p.Length)) | _ -> fail line "count takes a non-empty string")
        | Str s, "join" -> m (fun args _ -> match args with [ List xs ] -> Str(String.Join(s, xs |> Array.map show)) | _ -> fail line "join takes a list")
        | Str s, "isdigit" -> m (fun _ _ -> Bool(s.Length > 0 && s |> Seq.forall Char.IsDigit))
        | Str s, "isspace" -> m (fun _ _ -> Bool(s.Length > 0 && s |> Seq.forall Char.IsWhiteSpace))
        | (Dict _ | Namespace _), "items" ->
            m (fun _ _ ->
                match v with
                | Dict e -> List(e |> Array.map (fun (k, x) -> List [| Str k; x |]))
                | Namespace d -> List [| for kv in d -> List [| Str kv.Key; kv.Value |] |]
                | _ -> List [||])
        | Dict e, "keys" -> m (fun _ _ -> List(e |> Array.map (fst >> Str)))
        | Dict e, "values" -> m (fun _ _ -> List(e |> Array.map snd))
        | Dict _, "get" ->
            m (fun args _ ->
                match args with
                | [ Str k ] -> (match lookup v k with Undefined -> Null | x -> x)
                | [ Str k; d ] -> (match lookup v k with Undefined -> d | x -> x)
                | _ -> fail line "get takes a key and an optional default")
        | _ -> Undefined

    /// obj.name as Jinja2 resolves it: a method of the value first (a mapping's items, keys, values, get),
    /// then the mapping's key.
    let private attribute line (v: JinjaValue) (name: string) =
        match v with
        | Dict _ | Namespace _ ->
            match methodOf line v name with
            | Undefined -> lookup v name
            | m -> m
        | Str _ -> methodOf line v name
        | List xs when name = "length" -> Int(int64 xs.Length)
        | Undefined -> Undefined
        | _ -> Undefined

    let private index line (v: JinjaValue) (key: JinjaValue) =
        match v, key with
        | List xs, (Int _ | Bool _) ->
            let i = asInt line "an index" key
            let i = if i < 0L then i + int64 xs.Length else i
            if i >= 0L && i < int64 xs.Length then xs[int i] else Undefined
        | Str s, Int i ->
            let i = if i < 0L then i + int64 s.Length else i
            if i >= 0L && i < int64 s.Length then Str(string s[int i]) else Undefined
        | (Dict _ | Namespace _), Str k -> (match lookup v k with Undefined -> methodOf line v k | x -> x)
        | Undefined, _ -> Undefined
        | _, Str k -> attribute line v k
        | _ -> Undefined

    let rec private runTest line (name: string) (v: JinjaValue) (args: JinjaValue list) : bool =
        match name, args with
        | "defined", [] -> (match v with Undefined -> false | _ -> true)
        | "undefined", [] -> (match v with Undefined -> true | _ -> false)
        | "none", [] -> (match v with Null -> true | _ -> false)
        | "string", [] -> (match v with Str _ -> true | _ -> false)
        | "number", [] -> (match v with Int _ | Float _ -> true | _ -> false)
        | "integer", [] -> (match v with Int _ -> true | _ -> false)
        | "float", [] -> (match v with Float _ -> true | _ -> false)
        | "boolean", [] -> (match v with Bool _ -> true | _ -> false)
        | "true", [] -> (match v with Bool true -> true | _ -> false)
        | "false", [] -> (match v with Bool false -> true | _ -> false)
        | "iterable", [] -> (match v with List _ | Dict _ | Str _ -> true | _ -> false)
        | "sequence", [] -> (match v with List _ | Str _ -> true | _ -> false)
        | "mapping", [] -> (match v with Dict _ -> true | _ -> false)
        | "callable", [] -> (match v with Func _ -> true | _ -> false)
        | "odd", [] -> asInt line "odd's operand" v % 2L <> 0L
        | "even", [] -> asInt line "even's operand" v % 2L = 0L
        | "lower", [] -> (match v with Str s -> s = s.ToLowerInvariant() | _ -> false)
        | "upper", [] -> (match v with Str s -> s = s.ToUpperInvariant() | _ -> false)
        | ("equalto" | "eq" | "=="), [ x ] -> JinjaValue.Same(v, x)
        | ("ne" | "!="), [ x ] -> not (JinjaValue.Same(v, x))
        | ("in"), [ x ] -> items line "in's operand" x |> Array.exists (fun y -> JinjaValue.Same(v, y))
        | _ -> fail line (sprintf "the test '%s' (with %d arguments) is not supported" name args.Length)

    let private compare line (a: JinjaValue) (b: JinjaValue) : int =
        match a, b with
        | (Int _ | Float _ | Bool _), (Int _ | Float _ | Bool _) ->
            let f x = match x with Int i -> float i | Float f -> f | Bool b -> (if b then 1.0 else 0.0) | _ -> 0.0
            compare (f a) (f b)
        | Str x, Str y -> String.CompareOrdinal(x, y)
        | _ -> fail line (sprintf "cannot compare a %s with a %s" (typeName a) (typeName b))

    let private kwarg (kwargs: (string * JinjaValue) list) (name: string) =
        kwargs |> List.tryFind (fun (k, _) -> k = name) |> Option.map snd

    type private Renderer(templateName: string) =
        let output = StringBuilder()
        let spans = ResizeArray<GenerationSpan>()
        let mutable current = 0

        /// The line of the statement being run (where a failing global function is reported).
        member _.Line = current

        member _.Output = output
        member _.Spans = spans

        member r.Eval (scope: Scope) (line: int) (e: Expr) : JinjaValue =
            let eval = r.Eval scope line
            match e with
            | ELit v -> v
            | EName n -> scope.Get n
            | EAttr(x, name) -> attribute line (eval x) name
            | EIndex(x, k) -> index line (eval x) (eval k)
            | ESlice(x, a, b, c) ->
                let opt (o: Expr option) = o |> Option.map (eval >> asInt line "a slice bound")
                slice line (eval x) (opt a) (opt b) (opt c)
            | ECall(f, args, kwargs) ->
                let fv = eval f
                let args = args |> List.map eval
                let kwargs = kwargs |> List.map (fun (k, x) -> k, eval x)
                match fv with
                | Func(_, call) -> call args kwargs
                | Undefined ->
                    let what = match f with EName n -> n | EAttr(_, n) -> n | _ -> "the expression"
                    fail line (sprintf "'%s' is not a function this renderer knows" what)
                | other -> fail line (sprintf "a %s cannot be called" (typeName other))
            | EFilter(x, name, args, kwargs) ->
                r.Filter line scope (eval x) name (args |> List.map eval) (kwargs |> List.map (fun (k, a) -> k, eval a))
            | ETest(x, name, args, negated) ->
                let result = runTest line name (eval x) (args |> List.map eval)
                Bool(if negated then not result else result)
            | EAnd(a, b) ->
                let left = eval a
                if truthy left then eval b else left
            | EOr(a, b) ->
                let left = eval a
                if truthy left then left else eval b
            | ENot a -> Bool(not (truthy (eval a)))
            | ENeg a ->
                match eval a with
                | Int i -> Int(-i)
                | Float f -> Float(-f)
                | other -> fail line (sprintf "cannot negate a %s" (typeName other))
            | ECond(c, a, b) -> if truthy (eval c) then eval a else (match b with Some b -> eval b | None -> Undefined)
            | EList xs -> List(xs |> List.map eval |> Array.ofList)
            | EDict entries ->
                Dict(entries |> List.map (fun (k, v) -> (match eval k with Str s -> s | other -> show other), eval v) |> Array.ofList)
            | EBinary(op, a, b) -> r.Binary line op (eval a) (eval b)

        member _.Binary line (op: string) (a: JinjaValue) (b: JinjaValue) : JinjaValue =
            match op with
            | "==" -> Bool(JinjaValue.Same(a, b))
            | "!=" -> Bool(not (JinjaValue.Same(a, b)))
            | "<" -> Bool(compare line a b < 0)
            | ">" -> Bool(compare line a b > 0)
            | "<=" -> Bool(compare line a b <= 0)
            | ">=" -> Bool(compare line a b >= 0)
            | "~" -> Str(show a + show b)
            | "in" | "not in" ->
                let found =
                    match b with
                    | Undefined -> false
                    | Str s -> (match a with Str x -> s.Contains(x, StringComparison.Ordinal) | other -> fail line (sprintf "'in <string>' needs a string, found %s" (typeName other)))
                    | Dict _ | Namespace _ -> (match a with Str k -> (match lookup b k with Undefined -> false | _ -> true) | _ -> false)
                    | List xs -> xs |> Array.exists (fun x -> JinjaValue.Same(a, x))
                    | other -> fail line (sprintf "'in' needs a list, mapping or string, found %s" (typeName other))
                Bool(if op = "in" then found else not found)
            | _ ->
                match a, b with
                | Undefined, _ | _, Undefined -> fail line (sprintf "cannot apply '%s' to an undefined value" op)
                | Null, _ | _, Null -> fail line (sprintf "cannot apply '%s' to none" op)
                | (Int _ | Float _), (Int _ | Float _) ->
                    let isFloat = (match a with Float _ -> true | _ -> false) || (match b with Float _ -> true | _ -> false)
                    let fa, fb = (match a with Int i -> float i | Float f -> f | _ -> 0.0), (match b with Int i -> float i | Float f -> f | _ -> 0.0)
                    match op, a, b with
                    | "+", Int x, Int y -> Int(x + y)
                    | "-", Int x, Int y -> Int(x - y)
                    | "*", Int x, Int y -> Int(x * y)
                    | "+", _, _ -> Float(fa + fb)
                    | "-", _, _ -> Float(fa - fb)
                    | "*", _, _ -> Float(fa * fb)
                    | "/", _, _ -> Float(fa / fb)
                    | "//", Int x, Int y ->
                        if y = 0L then fail line "division by zero"
                        Int(int64 (Math.Floor(float x / float y)))
                    | "//", _, _ -> Float(Math.Floor(fa / fb))
                    | "%", Int x, Int y ->
                        if y = 0L then fail line "modulo by zero"
                        Int(((x % y) + y) % y)
                    | "%", _, _ -> Float(fa - fb * Math.Floor(fa / fb))
                    | "**", Int x, Int y when y >= 0L -> Int(int64 (Math.Pow(float x, float y)))
                    | "**", _, _ -> Float(Math.Pow(fa, fb))
                    | _ -> ignore isFloat; fail line (sprintf "the operator '%s' is not supported" op)
                | List x, List y when op = "+" -> List(Array.append x y)
                | (Str _, _ | _, Str _) when op = "+" -> Str(show a + show b)
                | Str s, Int k when op = "*" -> Str(String.replicate (int (max 0L k)) s)
                | _ -> fail line (sprintf "cannot apply '%s' to a %s and a %s" op (typeName a) (typeName b))

        member r.Filter line (scope: Scope) (v: JinjaValue) (name: string) (args: JinjaValue list) (kwargs: (string * JinjaValue) list) : JinjaValue =
            let attrOf (item: JinjaValue) (path: string) =
                path.Split('.') |> Array.fold (fun x part -> match Int64.TryParse part with | true, k -> index line x (Int k) | _ -> attribute line x part) item
            match name, args with
            | "trim", _ -> (match v with Str s -> Str(strip s args true true) | other -> Str((show other).Trim()))
            | "tojson", _ ->
                let indent =
                    match kwarg kwargs "indent", args with
                    | Some(Int k), _ | None, [ Int k ] -> Some(int k)
                    | _ -> None
                let ensureAscii = match kwarg kwargs "ensure_ascii" with Some x -> truthy x | None -> false
                Str(toJson v indent 0 true ensureAscii)
            | ("length" | "count"), [] ->
                match v with
                | Str s -> Int(int64 s.Length)
                | List xs -> Int(int64 xs.Length)
                | Dict e -> Int(int64 e.Length)
                | Namespace d -> Int(int64 d.Count)
                | other -> fail line (sprintf "length of a %s" (typeName other))
            | "list", [] -> List(items line "list's operand" v)
            | "first", [] -> (match items line "first's operand" v with [||] -> Undefined | xs -> xs[0])
            | "last", [] -> (match items line "last's operand" v with [||] -> Undefined | xs -> xs[xs.Length - 1])
            | "reverse", [] ->
                match v with
                | Str s -> Str(String(Array.rev (s.ToCharArray())))
                | _ -> List(Array.rev (items line "reverse's operand" v))
            | "join", _ ->
                let sep = match args with Str s :: _ -> s | _ -> ""
                let xs = items line "join's operand" v
                let xs = match kwarg kwargs "attribute" with Some(Str a) -> xs |> Array.map (fun x -> attrOf x a) | _ -> xs
                Str(String.Join(sep, xs |> Array.map show))
            | "string", [] -> Str(show v)
            | "upper", [] -> Str((show v).ToUpperInvariant())
            | "lower", [] -> Str((show v).ToLowerInvariant())
            | "title", [] -> Str(titleCase (show v))
            | "capitalize", [] -> Str(capitalize (show v))
            | "safe", [] -> v
            | ("default" | "d"), _ ->
                let fallback = match args with x :: _ -> x | [] -> Str ""
                let boolean = match args with [ _; b ] -> truthy b | _ -> (match kwarg kwargs "boolean" with Some b -> truthy b | None -> false)
                match v with
                | Undefined -> fallback
                | x when boolean && not (truthy x) -> fallback
                | x -> x
            | "items", [] ->
                match v with
                | Dict e -> List(e |> Array.map (fun (k, x) -> List [| Str k; x |]))
                | Namespace d -> List [| for kv in d -> List [| Str kv.Key; kv.Value |] |]
                | Undefined -> List [||]
                | other -> fail line (sprintf "items of a %s" (typeName other))
            | ("selectattr" | "rejectattr"), (Str attr :: testArgs) ->
                let keep (x: JinjaValue) =
                    let value = attrOf x attr
                    let result =
                        match testArgs with
                        | [] -> truthy value
                        | Str test :: rest -> runTest line test value rest
                        | _ -> fail line (sprintf "%s takes an attribute and a test name" name)
                    if name = "selectattr" then result else not result
                List(items line (name + "'s operand") v |> Array.filter keep)
            | ("select" | "reject"), _ ->
                let keep (x: JinjaValue) =
                    let result =
                        match args with
                        | [] -> truthy x
                        | Str test :: rest -> runTest line test x rest
                        | _ -> fail line (sprintf "%s takes a test name" name)
                    if name = "select" then result else not result
                List(items line (name + "'s operand") v |> Array.filter keep)
            | "map", _ ->
                let xs = items line "map's operand" v
                match kwarg kwargs "attribute", args with
                | Some(Str a), _ ->
                    let fallback = kwarg kwargs "default"
                    List(xs |> Array.map (fun x -> match attrOf x a, fallback with Undefined, Some d -> d | y, _ -> y))
                | None, Str filter :: rest -> List(xs |> Array.map (fun x -> r.Filter line scope x filter rest []))
                | _ -> fail line "map takes attribute=NAME or a filter name"
            | "sort", _ ->
                let xs = Array.copy (items line "sort's operand" v)
                let key (x: JinjaValue) = match kwarg kwargs "attribute" with Some(Str a) -> attrOf x a | _ -> x
                let descending = match kwarg kwargs "reverse", args with Some x, _ -> truthy x | None, b :: _ -> truthy b | _ -> false
                let sorted = xs |> Array.sortWith (fun a b -> compare line (key a) (key b))
                List(if descending then Array.rev sorted else sorted)
            | "unique", [] -> List(items line "unique's operand" v |> Array.fold (fun acc x -> if acc |> List.exists (fun y -> JinjaValue.Same(x, y)) then acc else acc @ [ x ]) [] |> Array.ofList)
            | "int", _ ->
                match v with
                | Int i -> Int i
                | Float f -> Int(int64 (Math.Truncate f))
                | Bool b -> Int(if b then 1L else 0L)
                | Str s -> (match Int64.TryParse(s.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture) with | true, i -> Int i | _ -> (match args with d :: _ -> d | [] -> Int 0L))
                | _ -> (match args with d :: _ -> d | [] -> Int 0L)
            | "float", _ ->
                match v with
                | Int i -> Float(float i)
                | Float f -> Float f
                | Str s -> (match Double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture) with | true, f -> Float f | _ -> Float 0.0)
                | _ -> Float 0.0
            | "abs", [] -> (match v with Int i -> Int(abs i) | Float f -> Float(abs f) | other -> fail line (sprintf "abs of a %s" (typeName other)))
            | "replace", (Str a :: Str b :: _) -> Str((show v).Replace(a, b))
            | "indent", _ ->
                let width = match args, kwarg kwargs "width" with Int k :: _, _ | _, Some(Int k) -> int k | _ -> 4
                let first = match args, kwarg kwargs "first" with [ _; b ], _ | _, Some b -> truthy b | _ -> false
                let blank = match kwarg kwargs "blank" with Some b -> truthy b | None -> false
                let pad = String(' ', width)
                let lines = (show v).Split('\n')
                let lines =
                    lines |> Array.mapi (fun i l ->
                        if i = 0 && not first then l
                        elif l.Trim().Length = 0 && not blank then l
                        else pad + l)
                Str(String.Join("\n", lines))
            | "dictsort", _ ->
                match v with
                | Dict e -> List(e |> Array.sortBy fst |> Array.map (fun (k, x) -> List [| Str k; x |]))
                | other -> fail line (sprintf "dictsort of a %s" (typeName other))
            | _ -> fail line (sprintf "the filter '%s' is not supported" name)

        member r.Assign (scope: Scope) line (target: Target) (value: JinjaValue) =
            match target with
            | TVar name -> scope.Set(name, value)
            | TAttr(obj, attr) ->
                match scope.Get obj with
                | Namespace d -> d[attr] <- value
                | other -> fail line (sprintf "cannot set an attribute of a %s ('%s' is not a namespace)" (typeName other) obj)
            | TTuple names ->
                let values = items line "the unpacked value" value
                if values.Length <> names.Length then
                    fail line (sprintf "cannot unpack %d values into %d names" values.Length names.Length)
                List.iteri (fun i n -> scope.Set(n, values[i])) names

        member r.Run (scope: Scope) (nodes: Node list) : unit =
            for node in nodes do
                match node with
                | NOutput(_, line) | NIf(_, _, line) | NSet(_, _, line) | NFor(_, _, _, _, _, line) -> current <- line
                | _ -> ()
                match node with
                | NText text -> output.Append text |> ignore
                | NOutput(e, line) -> output.Append(show (r.Eval scope line e)) |> ignore
                | NIf(branches, elseBody, line) ->
                    match branches |> List.tryFind (fun (c, _) -> truthy (r.Eval scope line c)) with
                    | Some(_, body) -> r.Run scope body
                    | None -> r.Run scope elseBody
                | NSet(target, e, line) -> r.Assign scope line target (r.Eval scope line e)
                | NSetBlock(name, body, _) ->
                    let start = output.Length
                    r.Run scope body
                    let text = output.ToString(start, output.Length - start)
                    output.Length <- start
                    scope.Set(name, Str text)
                | NMacro(name, parameters, body, line) ->
                    let call (args: JinjaValue list) (kwargs: (string * JinjaValue) list) =
                        let inner = Scope(Some scope)
                        if args.Length > parameters.Length then fail line (sprintf "the macro %s takes %d arguments, got %d" name parameters.Length args.Length)
                        parameters
                        |> List.iteri (fun i (p, d) ->
                            let value =
                                if i < args.Length then args[i]
                                else
                                    match kwarg kwargs p, d with
                                    | Some v, _ -> v
                                    | None, Some d -> r.Eval inner line d
                                    | None, None -> Undefined
                            inner.Set(p, value))
                        let start = output.Length
                        r.Run inner body
                        let text = output.ToString(start, output.Length - start)
                        output.Length <- start
                        Str text
                    scope.Set(name, func name call)
                | NFor(target, iterable, filter, body, elseBody, line) ->
                    let loopScope = Scope(Some scope)
                    let source =
                        match r.Eval loopScope line iterable with
                        | List xs -> xs
                        | Dict e -> e |> Array.map (fst >> Str)
                        | Namespace d -> [| for kv in d -> Str kv.Key |]
                        | Str s -> [| for rune in s.EnumerateRunes() -> Str(rune.ToString()) |]
                        | other -> fail line (sprintf "a for loop needs a list or mapping, found %s" (typeName other))
                    let kept =
                        match filter with
                        | None -> source
                        | Some f ->
                            source
                            |> Array.filter (fun x ->
                                let test = Scope(Some loopScope)
                                r.Assign test line target x
                                truthy (r.Eval test line f))
                    let n = kept.Length
                    let mutable stop = false
                    let mutable i = 0
                    while not stop && i < n do
                        let loop =
                            Dict [| "index", Int(int64 (i + 1))
                                    "index0", Int(int64 i)
                                    "revindex", Int(int64 (n - i))
                                    "revindex0", Int(int64 (n - i - 1))
                                    "first", Bool(i = 0)
                                    "last", Bool(i = n - 1)
                                    "length", Int(int64 n)
                                    "previtem", (if i > 0 then kept[i - 1] else Undefined)
                                    "nextitem", (if i < n - 1 then kept[i + 1] else Undefined) |]
                        loopScope.Set("loop", loop)
                        r.Assign loopScope line target kept[i]
                        try r.Run loopScope body
                        with
                        | ContinueLoop -> ()
                        | BreakLoop -> stop <- true
                        i <- i + 1
                    if n = 0 then r.Run loopScope elseBody
                | NBreak _ -> raise BreakLoop
                | NContinue _ -> raise ContinueLoop
                | NGeneration body ->
                    let start = output.Length
                    r.Run scope body
                    spans.Add { Start = start; End = output.Length }

        member _.Name = templateName

    /// The functions every template sees: raise_exception, namespace, range, strftime_now, dict.
    let private globals (line: unit -> int) : (string * JinjaValue) list =
        [ "raise_exception",
          func "raise_exception" (fun args _ ->
              let message = match args with x :: _ -> show x | [] -> "raise_exception was called"
              raise (Raised(line (), message)))
          "namespace",
          func "namespace" (fun args kwargs ->
              let d = Dictionary<string, JinjaValue>()
              match args with
              | [ Dict e ] -> for k, v in e do d[k] <- v
              | _ -> ()
              for k, v in kwargs do d[k] <- v
              Namespace d)
          "dict", func "dict" (fun _ kwargs -> Dict(Array.ofList kwargs))
          "range",
          func "range" (fun args _ ->
              let ints = args |> List.map (asInt 0 "range's argument")
              let start, stop, step =
                  match ints with
                  | [ b ] -> 0L, b, 1L
                  | [ a; b ] -> a, b, 1L
                  | [ a; b; c ] when c <> 0L -> a, b, c
                  | _ -> fail 0 "range takes 1 to 3 integers (a step other than 0)"
              List [| let mutable i = start
                      while (step > 0L && i < stop) || (step < 0L && i > stop) do
                          yield Int i
                          i <- i + step |])
          "strftime_now",
          func "strftime_now" (fun args _ ->
              let now = DateTime.Now
              let format = match args with Str f :: _ -> f | _ -> "%Y-%m-%d"
              let sb = StringBuilder()
              let mutable i = 0
              while i < format.Length do
                  if format[i] = '%' && i + 1 < format.Length then
                      let c = format[i + 1]
                      let text =
                          match c with
                          | 'Y' -> now.ToString("yyyy", CultureInfo.InvariantCulture)
                          | 'm' -> now.ToString("MM", CultureInfo.InvariantCulture)
                          | 'd' -> now.ToString("dd", CultureInfo.InvariantCulture)
                          | 'H' -> now.ToString("HH", CultureInfo.InvariantCulture)
                          | 'M' -> now.ToString("mm", CultureInfo.InvariantCulture)
                          | 'b' -> now.ToString("MMM", CultureInfo.InvariantCulture)
                          | 'B' -> now.ToString("MMMM", CultureInfo.InvariantCulture)
                          | '%' -> "%"
                          | other -> fail 0 (sprintf "strftime_now: %%%c is not supported" other)
                      sb.Append text |> ignore
                      i <- i + 2
                  else
                      sb.Append format[i] |> ignore
                      i <- i + 1
              Str(sb.ToString())) ]

    /// Renders a template with the given variables. Raises JinjaException naming the template and line
    /// for an unsupported construct or an operation on the wrong kind of value; when the template calls
    /// raise_exception, the exception's Raised holds its message.
    let renderWithSpans (template: Template) (variables: (string * JinjaValue) list) : JinjaOutput =
        let renderer = Renderer(template.Name)
        let root = Scope None
        for name, value in globals (fun () -> renderer.Line) do
            root.Set(name, value)
        for name, value in variables do
            root.Set(name, value)
        try
            renderer.Run (Scope(Some root)) template.Body
            { Text = renderer.Output.ToString(); Generation = renderer.Spans.ToArray() }
        with
        | Fail(line, problem) -> raise (JinjaException(template.Name, (if line > 0 then line else renderer.Line), problem, None))
        | Raised(line, message) -> raise (JinjaException(template.Name, line, sprintf "the template refused the input: %s" message, Some message))
        | BreakLoop | ContinueLoop -> raise (JinjaException(template.Name, 0, "break or continue outside a for loop", None))

    /// The rendered text (see renderWithSpans).
    let render (template: Template) (variables: (string * JinjaValue) list) : string =
        (renderWithSpans template variables).Text
