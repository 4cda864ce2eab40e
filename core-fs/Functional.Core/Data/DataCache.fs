namespace Functional.Data

open System
open System.Buffers.Binary
open System.IO
open System.Security.Cryptography
open System.Text
open Functional
open Functional.Text

/// Tokenized data kept on disk, so a second run over the same files, tokenizer and options reads
/// token ids instead of tokenizing again.
///
/// An entry is one file, KEY.bin (KEY: 64 hex digits), little-endian:
///   header:  magic "FNDATA\r\n" (8 bytes), format version (int32), key (32 bytes),
///            payload length (int64), SHA-256 of the payload (32 bytes);
///   payload: skipped rows (int32), the training set, an evaluation flag (byte) and set, then the
///            evaluation samples (count, then line (int32), prompt and answer (length-prefixed UTF-8));
///   a set:   path, row count, per row its line, prompt length and length (int32 each), the id width
///            (byte: 4 or 8), then all ids, then a flag (byte 1: packed in isolation, 0: not) and for
///            packed rows, per row its segment count and each segment's length and prompt length (int32),
///            then a train-mask flag (byte) and, when set, one byte per token of every row (1: the loss
///            predicts it).
/// An entry whose magic, version, key, length or checksum does not match is rebuilt, never trusted.
/// Entries are written to a temporary file and renamed into place, so readers never see half a file.
[<RequireQualifiedAccess>]
module DataCache =

    let private magic = Encoding.ASCII.GetBytes "FNDATA\r\n"

    /// The version of the entry format and of the loading semantics; changing either bumps it, so old
    /// entries stop matching.
    [<Literal>]
    let FormatVersion = 4

    let private headerLength = 8 + 4 + 32 + 8 + 32

    let private hashFile (path: string) =
        InvalidInput.requireFile path "the data file does not exist" "a data file (JSON or JSON Lines)"
        use stream = File.OpenRead path
        Convert.ToHexString(SHA256.HashData stream)

    /// The file's hash, or "missing" (loading the data then says what is wrong).
    let private hashIfThere (path: string) =
        if File.Exists path then
            use stream = File.OpenRead path
            Convert.ToHexString(SHA256.HashData stream)
        else "missing"

    let private describe (options: PromptDataOptions) =
        let option (value: string option) = defaultArg (value |> Option.map (sprintf "some:%s")) "none"
        String.concat "\n" [
            sprintf "format=%A" options.Format
            sprintf "prompt-field=%s" (option options.Fields.Prompt)
            sprintf "answer-field=%s" (option options.Fields.Answer)
            sprintf "text-field=%s" (option options.Fields.Text)
            sprintf "max-seq-len=%d" options.MaxSeqLen
            sprintf "train-on=%A" options.TrainOn
            sprintf "packing=%b" options.Packing
            sprintf "packing-attention=%s" (PromptDataset.packingAttentionName options.PackingAttention)
            sprintf "add-bos=%s" (options.AddBos |> Option.map string |> Option.defaultValue "tokenizer")
            sprintf "skip-bad-rows=%b" options.SkipBadRows
            sprintf "data-split=%s" (option options.DataSplit)
            sprintf "eval-split-ratio=%s" (options.EvalSplitRatio.ToString("R", Globalization.CultureInfo.InvariantCulture))
            sprintf "seed=%d" options.Seed
            sprintf "chat-template-file=%s" (options.ChatTemplateFile |> Option.map hashIfThere |> Option.defaultValue "none") ]

    /// The cache key (64 hex digits): SHA-256 of the format version, the content of the training file
    /// and of the evaluation file (if any), the tokenizer's Fingerprint and every option that decides
    /// the ids. File paths are not part of it: the same content elsewhere is a hit.
    let key (trainPath: string) (evalPath: string option) (options: PromptDataOptions) (tokenizer: TextTokenizer) : string =
        let text =
            String.concat "\n" [
                sprintf "functional-data-cache v%d" FormatVersion
                sprintf "train=%s" (hashFile trainPath)
                sprintf "eval=%s" (evalPath |> Option.map hashFile |> Option.defaultValue "none")
                sprintf "tokenizer=%s" tokenizer.Fingerprint
                // A model folder's chat_template.jinja renders conversation rows (tokenizer_config.json is in the
                // tokenizer's fingerprint).
                sprintf "chat-template=%s" (
                    let file = Path.Combine(tokenizer.Name, ChatTemplate.TemplateFileName)
                    if File.Exists file then hashIfThere file else "none")
                describe options ]
        Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes text)).ToLowerInvariant()

    /// The file that holds the entry for key in cacheDir.
    let entryPath (cacheDir: string) (key: string) : string = Path.Combine(cacheDir, key + ".bin")

    // ---------------------------------------------------------------- payload

    let private writeDataset (w: BinaryWriter) (d: TokenizedDataset) =
        w.Write d.Path
        w.Write d.Rows.Length
        for r in 0 .. d.Rows.Length - 1 do
            w.Write d.Lines[r]
            w.Write d.PromptLengths[r]
            w.Write d.Rows[r].Length
        let narrow = d.Rows |> Array.forall (Array.forall (fun id -> id <= int64 Int32.MaxValue))
        w.Write(if narrow then 4uy else 8uy)
        for row in d.Rows do
            for id in row do
                if narrow then w.Write(int32 id) else w.Write id
        if TokenizedDataset.isPackedInIsolation d then
            w.Write 1uy
            for segments in d.Segments do
                w.Write segments.Length
                for s in segments do
                    w.Write s.Length
                    w.Write s.PromptLength
        else w.Write 0uy
        w.Write(d.TrainMasks.Length > 0)
        for mask in d.TrainMasks do
            w.Write(mask |> Array.map (fun kept -> if kept then 1uy else 0uy))

    let private readDataset (r: BinaryReader) : TokenizedDataset =
        let path = r.ReadString()
        let count = r.ReadInt32()
        if count < 0 then raise (InvalidDataException "negative row count")
        let lines = Array.zeroCreate count
        let prompts = Array.zeroCreate count
        let lengths = Array.zeroCreate count
        for i in 0 .. count - 1 do
            lines[i] <- r.ReadInt32()
            prompts[i] <- r.ReadInt32()
            lengths[i] <- r.ReadInt32()
        let width = r.ReadByte()
        if width <> 4uy && width <> 8uy then raise (InvalidDataException "bad id width")
        let rows =
            lengths
            |> Array.map (fun length ->
                if length < 0 then raise (InvalidDataException "negative row length")
                Array.init length (fun _ -> if width = 4uy then int64 (r.ReadInt32()) else r.ReadInt64()))
        let segments =
            match r.ReadByte() with
            | 0uy -> [||]
            | 1uy ->
                rows
                |> Array.map (fun row ->
                    let n = r.ReadInt32()
                    if n < 0 then raise (InvalidDataException "negative segment count")
                    let segments = Array.init n (fun _ -> let length = r.ReadInt32() in { Length = length; PromptLength = r.ReadInt32() })
                    if segments |> Array.sumBy (fun s -> s.Length) <> row.Length then raise (InvalidDataException "segments do not cover the row")
                    segments)
            | _ -> raise (InvalidDataException "bad packing flag")
        let masks =
            if r.ReadBoolean() then rows |> Array.map (fun row -> r.ReadBytes row.Length |> Array.map (fun b -> b <> 0uy))
            else [||]
        if masks |> Array.exists2 (fun (row: int64[]) (mask: bool[]) -> mask.Length <> row.Length) (if masks.Length = 0 then [||] else rows) then
            raise (InvalidDataException "truncated train masks")
        { Path = path; Rows = rows; Lines = lines; PromptLengths = prompts; Segments = segments; TrainMasks = masks }

    let private serialize (data: TrainAndEval) =
        use stream = new MemoryStream()
        use w = new BinaryWriter(stream, Encoding.UTF8)
        w.Write data.Skipped
        writeDataset w data.Train
        match data.Eval with
        | Some eval ->
            w.Write 1uy
            writeDataset w eval
        | None -> w.Write 0uy
        w.Write data.EvalSamples.Length
        for s in data.EvalSamples do
            w.Write s.Line
            w.Write s.Prompt
            w.Write s.Answer
        w.Flush()
        stream.ToArray()

    let private deserialize (payload: byte[]) : TrainAndEval =
        use stream = new MemoryStream(payload)
        use r = new BinaryReader(stream, Encoding.UTF8)
        let skipped = r.ReadInt32()
        let train = readDataset r
        let eval = if r.ReadByte() = 1uy then Some(readDataset r) else None
        let count = r.ReadInt32()
        if count < 0 then raise (InvalidDataException "negative sample count")
        let samples =
            Array.init count (fun _ ->
                let line = r.ReadInt32()
                let prompt = r.ReadString()
                { Prompt = prompt; Answer = r.ReadString(); Line = line })
        if stream.Position <> stream.Length then raise (InvalidDataException "trailing bytes")
        { Train = train; Eval = eval; EvalSamples = samples; Skipped = skipped }

    // ---------------------------------------------------------------- entries

    /// The entry for key, if the file exists and every check passes; None otherwise.
    let private tryRead (path: string) (key: string) : TrainAndEval option =
        let keyBytes = Convert.FromHexString key
        let bytes = try (if File.Exists path then Some(File.ReadAllBytes path) else None) with :? IOException -> None
        match bytes with
        | Some bytes when bytes.Length >= headerLength ->
            let header = ReadOnlySpan(bytes, 0, headerLength)
            let payloadLength = BinaryPrimitives.ReadInt64LittleEndian(ReadOnlySpan(bytes, 44, 8))
            let valid =
                header.Slice(0, 8).SequenceEqual(ReadOnlySpan magic)
                && BinaryPrimitives.ReadInt32LittleEndian(header.Slice(8, 4)) = FormatVersion
                && header.Slice(12, 32).SequenceEqual(ReadOnlySpan keyBytes)
                && payloadLength = int64 (bytes.Length - headerLength)
                && ReadOnlySpan(SHA256.HashData(ReadOnlySpan(bytes, headerLength, bytes.Length - headerLength)))
                    .SequenceEqual(header.Slice(52, 32))
            if valid then
                try Some(deserialize bytes[headerLength..])
                with :? EndOfStreamException | :? InvalidDataException | :? ArgumentException | :? DecoderFallbackException -> None
            else None
        | _ -> None

    /// Writes the entry atomically: a temporary file in cacheDir, then a rename over KEY.bin.
    let private write (cacheDir: string) (key: string) (data: TrainAndEval) =
        let payload = serialize data
        let temp = Path.Combine(cacheDir, sprintf "%s.%s.tmp" key (Guid.NewGuid().ToString("N")))
        try
            Directory.CreateDirectory cacheDir |> ignore
            do
                use file = new FileStream(temp, FileMode.CreateNew, FileAccess.Write)
                use w = new BinaryWriter(file)
                w.Write magic
                w.Write FormatVersion
                w.Write(Convert.FromHexString key)
                w.Write(int64 payload.Length)
                w.Write(SHA256.HashData payload)
                w.Write payload
                w.Flush()
                file.Flush true
            File.Move(temp, entryPath cacheDir key, true)
        with
        | :? IOException | :? UnauthorizedAccessException as e ->
            (try File.Delete temp with _ -> ())
            InvalidInput.fail cacheDir "" (sprintf "cannot write the data cache (%s)" e.Message)

    /// The data cached under key in cacheDir, and true; or, when there is no valid entry, build ()'s
    /// result, written to the cache, and false. key: 64 hex digits (see DataCache.key).
    let getOrBuild (cacheDir: string) (key: string) (build: unit -> TrainAndEval) : TrainAndEval * bool =
        if key.Length <> 64 || not (key |> Seq.forall Uri.IsHexDigit) then
            invalidArg (nameof key) (sprintf "a cache key is 64 hex digits, got \"%s\"" key)
        match tryRead (entryPath cacheDir key) key with
        | Some data -> data, true
        | None ->
            let data = build ()
            write cacheDir key data
            data, false

    /// PromptDataset.loadTrainAndEval through the cache in cacheDir: on a hit nothing is parsed or
    /// tokenized. The returned sets name the given paths. The bool is true on a hit.
    let loadTrainAndEval (cacheDir: string) (trainPath: string) (evalPath: string option) (options: PromptDataOptions) (tokenizer: TextTokenizer) : TrainAndEval * bool =
        let entry = key trainPath evalPath options tokenizer
        let data, hit = getOrBuild cacheDir entry (fun () -> PromptDataset.loadTrainAndEval trainPath evalPath options tokenizer)
        let evalFile = defaultArg evalPath trainPath
        { data with
            Train = { data.Train with Path = trainPath }
            Eval = data.Eval |> Option.map (fun e -> { e with Path = evalFile }) },
        hit

    /// PromptDataset.load through the cache in cacheDir. The bool is true on a hit.
    let load (cacheDir: string) (path: string) (options: PromptDataOptions) (tokenizer: TextTokenizer) : Loaded * bool =
        let data, hit = loadTrainAndEval cacheDir path None options tokenizer
        { Dataset = data.Train; Skipped = data.Skipped }, hit
