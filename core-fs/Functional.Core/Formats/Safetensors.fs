namespace Functional.Checkpoint

open System
open System.Buffers.Binary
open System.Collections.Generic
open System.IO
open System.Text.Encodings.Web
open System.Text.Json
open TorchSharp
open Functional
open Functional.Runtime

/// One tensor as a safetensors header describes it.
type SafetensorsEntry =
    { /// The tensor's name: its key in the JSON header.
      Name: string
      /// The stored element type.
      DType: torch.ScalarType
      /// The shape, outermost dimension first; empty for a 0-dim tensor.
      Shape: int64[]
      /// First byte of the tensor's data, counted from the first byte after the header.
      Begin: int64
      /// One past the last byte of the tensor's data, counted like Begin.
      End: int64 }

/// A validated safetensors header: every entry's dtype, shape and byte range have been checked
/// against the format and the file's length.
type SafetensorsHeader =
    { /// The file the header was read from.
      Path: string
      /// Byte offset in the file where the data region starts: 8 plus the JSON header's length.
      DataStart: int64
      /// The tensors in the order the JSON header lists them.
      Entries: SafetensorsEntry list
      /// The optional "__metadata__" object (string to string); empty when absent.
      Metadata: Map<string, string> }

/// Reads and writes the safetensors format (https://github.com/huggingface/safetensors): an 8-byte
/// little-endian header length N, N bytes of UTF-8 JSON mapping each tensor name to its dtype, shape
/// and data_offsets (relative to the first byte after the header, end exclusive) plus an optional
/// "__metadata__" object, then the raw row-major little-endian data. Nothing is ever unpickled.
[<RequireQualifiedAccess>]
module Safetensors =

    /// Headers longer than this are rejected as damaged files (the reference implementation's limit).
    let private maxHeaderBytes = 100_000_000UL

    /// Tensors are copied between file and memory in pieces of at most this many bytes, so that
    /// tensors over 2 GiB (the limit of one Span) load and save too.
    let private chunkBytes = 64L * 1024L * 1024L

    let private metadataKey = "__metadata__"

    /// (safetensors dtype code, TorchSharp scalar type, bytes per element), widest first.
    let private dtypes =
        [ "F64", torch.ScalarType.Float64, 8L
          "I64", torch.ScalarType.Int64, 8L
          "F32", torch.ScalarType.Float32, 4L
          "I32", torch.ScalarType.Int32, 4L
          "F16", torch.ScalarType.Float16, 2L
          "BF16", torch.ScalarType.BFloat16, 2L
          "I16", torch.ScalarType.Int16, 2L
          "I8", torch.ScalarType.Int8, 1L
          "U8", torch.ScalarType.Byte, 1L
          "BOOL", torch.ScalarType.Bool, 1L ]

    /// The safetensors dtype codes this module reads and writes.
    let supportedDTypes : string list = dtypes |> List.map (fun (code, _, _) -> code)

    /// The scalar type for a safetensors dtype code ("F32", "BF16", ...), or None when unsupported.
    let tryScalarType (code: string) : torch.ScalarType option =
        dtypes |> List.tryPick (fun (c, t, _) -> if c = code then Some t else None)

    /// The safetensors dtype code of a scalar type; raises ArgumentException for types the format
    /// cannot hold here (complex and quantized types).
    let dtypeCode (dtype: torch.ScalarType) : string =
        match dtypes |> List.tryFind (fun (_, t, _) -> t = dtype) with
        | Some(code, _, _) -> code
        | None ->
            invalidArg "dtype" (sprintf "%A cannot be stored; supported: %s" dtype (String.Join(", ", supportedDTypes)))

    /// Bytes per element of a supported scalar type.
    let elementSize (dtype: torch.ScalarType) : int64 =
        match dtypes |> List.tryFind (fun (_, t, _) -> t = dtype) with
        | Some(_, _, size) -> size
        | None -> invalidArg "dtype" (sprintf "%A is not a safetensors dtype" dtype)

    let private formatShape (shape: int64[]) = "[" + String.Join(", ", shape) + "]"

    /// Element count of a shape, or None when it does not fit in 63 bits.
    let private elementCount (shape: int64[]) =
        try Some(shape |> Array.fold (fun acc d -> Checked.(*) acc d) 1L)
        with :? OverflowException -> None

    let private parseEntry (path: string) (dataLength: int64) (name: string) (value: JsonElement) =
        let fail problem = InvalidInput.fail path name problem
        if value.ValueKind <> JsonValueKind.Object then
            fail (sprintf "expected an object with dtype, shape and data_offsets, found %s" (JsonInput.describe value.ValueKind))
        let field key =
            match value.TryGetProperty(key: string) with
            | true, v -> v
            | _ -> fail (sprintf "the header entry lacks \"%s\"" key)
        let nonNegativeIntegers key (element: JsonElement) =
            if element.ValueKind <> JsonValueKind.Array then
                fail (sprintf "\"%s\" must be an array of integers, found %s" key (JsonInput.describe element.ValueKind))
            [| for item in element.EnumerateArray() do
                   match item.TryGetInt64() with
                   | true, n when n >= 0L -> n
                   | _ -> fail (sprintf "\"%s\" must hold non-negative integers, found %s" key (item.GetRawText())) |]
        let dtype =
            let element = field "dtype"
            if element.ValueKind <> JsonValueKind.String then
                fail (sprintf "\"dtype\" must be a string, found %s" (JsonInput.describe element.ValueKind))
            let code = element.GetString()
            match tryScalarType code with
            | Some t -> t
            | None -> fail (sprintf "unknown dtype \"%s\"; supported: %s" code (String.Join(", ", supportedDTypes)))
        let shape = nonNegativeIntegers "shape" (field "shape")
        let offsets = nonNegativeIntegers "data_offsets" (field "data_offsets")
        if offsets.Length <> 2 then
            fail (sprintf "\"data_offsets\" must hold two integers [begin, end], found %d" offsets.Length)
        let first, last = offsets[0], offsets[1]
        if first > last then
            fail (sprintf "data_offsets [%d, %d] begin after they end" first last)
        if last > dataLength then
            fail (sprintf "data_offsets [%d, %d] reach past the end of the file: the data region holds %d bytes" first last dataLength)
        let size = elementSize dtype
        match elementCount shape |> Option.bind (fun n -> try Some(Checked.(*) n size) with :? OverflowException -> None) with
        | None -> fail (sprintf "shape %s is too large" (formatShape shape))
        | Some bytes when bytes <> last - first ->
            fail (sprintf "data_offsets [%d, %d] hold %d bytes but shape %s of %s needs %d"
                    first last (last - first) (formatShape shape) (dtypeCode dtype) bytes)
        | Some _ -> ()
        { Name = name; DType = dtype; Shape = shape; Begin = first; End = last }

    let private parseMetadata (path: string) (value: JsonElement) =
        let fail problem = InvalidInput.fail path metadataKey problem
        if value.ValueKind <> JsonValueKind.Object then
            fail (sprintf "expected an object of strings, found %s" (JsonInput.describe value.ValueKind))
        value.EnumerateObject()
        |> Seq.fold (fun (acc: Map<string, string>) p ->
            if p.Value.ValueKind <> JsonValueKind.String then
                fail (sprintf "value of \"%s\" must be a string, found %s" p.Name (JsonInput.describe p.Value.ValueKind))
            if acc.ContainsKey p.Name then fail (sprintf "key \"%s\" appears twice" p.Name)
            acc.Add(p.Name, p.Value.GetString())) Map.empty

    /// Checks that no two tensors share bytes.
    let private checkOverlaps (path: string) (entries: SafetensorsEntry list) =
        entries
        |> List.filter (fun e -> e.End > e.Begin)
        |> List.sortBy (fun e -> e.Begin, e.End)
        |> List.pairwise
        |> List.iter (fun (a, b) ->
            if b.Begin < a.End then
                InvalidInput.fail path b.Name
                    (sprintf "data_offsets [%d, %d] overlap those of \"%s\" [%d, %d]" b.Begin b.End a.Name a.Begin a.End))

    let private parseHeader (path: string) (dataStart: int64) (fileLength: int64) (json: byte[]) =
        let root =
            match JsonInput.tryParseBytes (ReadOnlyMemory<byte>(json)) with
            | Ok root -> root
            | Error e ->
                InvalidInput.fail path "header"
                    (sprintf "the header is not valid JSON (at byte %d of the header): %s" e.BytePositionInLine e.Message)
        if root.ValueKind <> JsonValueKind.Object then
            InvalidInput.fail path "header" (sprintf "the header must be a JSON object, found %s" (JsonInput.describe root.ValueKind))
        let seen = HashSet<string>()
        let mutable metadata = Map.empty
        let entries =
            [ for p in root.EnumerateObject() do
                  if not (seen.Add p.Name) then InvalidInput.fail path p.Name "the name appears twice in the header"
                  if p.Name = metadataKey then metadata <- parseMetadata path p.Value
                  else parseEntry path (fileLength - dataStart) p.Name p.Value ]
        checkOverlaps path entries
        { Path = path; DataStart = dataStart; Entries = entries; Metadata = metadata }

    let private openRead (path: string) =
        try new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.SequentialScan)
        with
        | :? FileNotFoundException
        | :? DirectoryNotFoundException -> InvalidInput.fail path "" "no such file"

    /// Reads and validates the header of a safetensors file without touching the tensor data. Raises
    /// InvalidInputException (origin: the file; location: "header" or the tensor's name) for a file
    /// shorter than 8 bytes, a header length past the end of the file or over 100 MB, a header that is
    /// not a JSON object, an entry without dtype/shape/data_offsets, an unknown dtype, data_offsets that
    /// begin after they end or reach past the end of the file, a byte range whose size is not
    /// prod(shape) * element size, and byte ranges that overlap.
    let readHeader (path: string) : SafetensorsHeader =
        use stream = openRead path
        let fileLength = stream.Length
        if fileLength < 8L then
            InvalidInput.fail path "header"
                (sprintf "the file is %d bytes long; a safetensors file starts with an 8-byte header length" fileLength)
        let lengthField = Array.zeroCreate<byte> 8
        stream.ReadExactly(lengthField, 0, 8)
        let headerLength = BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan<byte>(lengthField))
        if headerLength > maxHeaderBytes then
            InvalidInput.fail path "header"
                (sprintf "the header length field says %d bytes, more than the %d-byte limit: not a safetensors file, or a damaged one"
                    headerLength maxHeaderBytes)
        if headerLength > uint64 (fileLength - 8L) then
            InvalidInput.fail path "header"
                (sprintf "the header length field says %d bytes but only %d bytes follow it: the file is truncated"
                    headerLength (fileLength - 8L))
        let json = Array.zeroCreate<byte> (int headerLength)
        stream.ReadExactly(json, 0, json.Length)
        parseHeader path (8L + int64 headerLength) fileLength json

    /// Reads one entry's bytes from an open stream of the header's file into a fresh CPU tensor.
    let private readFrom (stream: FileStream) (header: SafetensorsHeader) (entry: SafetensorsEntry) =
        let size = elementSize entry.DType
        let count = (entry.End - entry.Begin) / size
        let flat = torch.empty([| count |], dtype = entry.DType)
        try
            try
                stream.Position <- header.DataStart + entry.Begin
                let perChunk = max 1L (chunkBytes / size)
                let mutable start = 0L
                while start < count do
                    let n = min perChunk (count - start)
                    use part = flat.narrow(0, start, n)
                    stream.ReadExactly(part.bytes)
                    start <- start + n
                flat.view(entry.Shape)
            with :? EndOfStreamException ->
                InvalidInput.fail header.Path entry.Name
                    "the file ended inside the tensor's data (did it change after its header was read?)"
        finally
            flat.Dispose()

    /// Loads one tensor described by a header read with readHeader: a fresh CPU tensor of the stored
    /// dtype and shape, bit-exact with the file.
    let readEntry (header: SafetensorsHeader) (entry: SafetensorsEntry) : torch.Tensor =
        TorchRuntime.ensure ()
        use stream = openRead header.Path
        readFrom stream header entry

    /// Loads the tensors whose header entries satisfy keep, as fresh CPU tensors of the stored dtype,
    /// keyed by name. The header is validated before any tensor is created (see readHeader).
    let loadFiltered (path: string) (keep: SafetensorsEntry -> bool) : Map<string, torch.Tensor> =
        TorchRuntime.ensure ()
        let header = readHeader path
        use stream = openRead path
        let loaded = List<string * torch.Tensor>()
        try
            for entry in header.Entries do
                if keep entry then loaded.Add((entry.Name, readFrom stream header entry))
            Map.ofSeq loaded
        with _ ->
            for _, t in loaded do t.Dispose()
            reraise ()

    /// Loads every tensor of a safetensors file, as fresh CPU tensors of the stored dtype, keyed by name.
    let load (path: string) : Map<string, torch.Tensor> = loadFiltered path (fun _ -> true)

    let private jsonOptions =
        JsonWriterOptions(Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping, Indented = false)

    /// The JSON header, padded with spaces so that the data starts at a multiple of 8 bytes.
    let private headerBytes (metadata: Map<string, string>) (entries: SafetensorsEntry list) =
        use buffer = new MemoryStream()
        do
            use writer = new Utf8JsonWriter(buffer, jsonOptions)
            writer.WriteStartObject()
            if not metadata.IsEmpty then
                writer.WriteStartObject metadataKey
                for KeyValue(k, v) in metadata do writer.WriteString(k, v)
                writer.WriteEndObject()
            for e in entries |> List.sortWith (fun a b -> String.CompareOrdinal(a.Name, b.Name)) do
                writer.WriteStartObject e.Name
                writer.WriteString("dtype", dtypeCode e.DType)
                writer.WriteStartArray "shape"
                for d in e.Shape do writer.WriteNumberValue d
                writer.WriteEndArray()
                writer.WriteStartArray "data_offsets"
                writer.WriteNumberValue e.Begin
                writer.WriteNumberValue e.End
                writer.WriteEndArray()
                writer.WriteEndObject()
            writer.WriteEndObject()
        let json = buffer.ToArray()
        let padded = (json.Length + 7) / 8 * 8
        Array.append json (Array.create (padded - json.Length) (byte ' '))

    /// Writes one tensor's bytes (moved to CPU and made contiguous in a temporary) to the stream.
    let private writeTensor (stream: Stream) (tensor: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        let flat = tensor.detach().cpu().contiguous().reshape(-1L)
        let count = flat.numel()
        let perChunk = max 1L (chunkBytes / elementSize flat.dtype)
        let mutable start = 0L
        while start < count do
            let n = min perChunk (count - start)
            use part = flat.narrow(0, start, n)
            stream.Write(Span<byte>.op_Implicit part.bytes)
            start <- start + n

    /// Writes tensors and string metadata to a safetensors file at path. The output is deterministic:
    /// the JSON header lists "__metadata__" first (omitted when metadata is empty) and then the tensors
    /// by ordinal name; the data region holds the tensors widest dtype first, then by name, so every
    /// tensor starts at a multiple of its element size; the header is padded with spaces to a multiple
    /// of 8 bytes. Tensors may live on any device and need not be contiguous; they are not modified.
    /// The file is written beside path under a temporary name and renamed over path when complete, so
    /// path never holds a partial file. Raises ArgumentException for a repeated or reserved name or a
    /// dtype the format cannot hold.
    let save (path: string) (metadata: Map<string, string>) (tensors: (string * torch.Tensor) seq) : unit =
        TorchRuntime.ensure ()
        let tensors = List.ofSeq tensors
        let names = HashSet<string>()
        for name, tensor: torch.Tensor in tensors do
            if name = metadataKey then invalidArg "tensors" (sprintf "\"%s\" is reserved for metadata" metadataKey)
            if not (names.Add name) then invalidArg "tensors" (sprintf "the tensor name \"%s\" appears twice" name)
            if not (dtypes |> List.exists (fun (_, t, _) -> t = tensor.dtype)) then
                invalidArg "tensors"
                    (sprintf "tensor \"%s\" is %A, which safetensors cannot hold here; supported: %s"
                        name tensor.dtype (String.Join(", ", supportedDTypes)))
        let layout =
            tensors
            |> List.sortWith (fun (a, ta: torch.Tensor) (b, tb: torch.Tensor) ->
                match compare (elementSize tb.dtype) (elementSize ta.dtype) with
                | 0 -> String.CompareOrdinal(a, b)
                | c -> c)
            |> List.mapFold (fun offset (name, t: torch.Tensor) ->
                let bytes = t.numel() * elementSize t.dtype
                let entry = { Name = name; DType = t.dtype; Shape = t.shape; Begin = offset; End = offset + bytes }
                (entry, t), offset + bytes) 0L
            |> fst
        let header = headerBytes metadata (List.map fst layout)
        let fullPath = Path.GetFullPath path
        let staging =
            Path.Combine(Path.GetDirectoryName fullPath, sprintf ".%s.%s.tmp" (Path.GetFileName fullPath) (Guid.NewGuid().ToString "N"))
        try
            do
                use stream = new FileStream(staging, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 <<< 20)
                let lengthField = Array.zeroCreate<byte> 8
                BinaryPrimitives.WriteUInt64LittleEndian(Span<byte>(lengthField), uint64 header.Length)
                stream.Write(lengthField, 0, 8)
                stream.Write(header, 0, header.Length)
                for _, t in layout do writeTensor stream t
                stream.Flush(true)
            File.Move(staging, fullPath, true)
        with _ ->
            try File.Delete staging with _ -> ()
            reraise ()
