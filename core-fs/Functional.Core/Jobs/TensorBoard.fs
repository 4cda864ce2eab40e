namespace Functional.Reporting

open System
open System.Buffers
open System.Buffers.Binary
open System.IO
open System.Text

/// Protocol buffer encoding of the few TensorBoard messages written here, field numbers as in
/// tensorboard/compat/proto/event.proto and summary.proto.
module private Proto =

    /// Wire types (protobuf encoding guide).
    let private varintType = 0
    let private fixed64Type = 1
    let private lengthDelimitedType = 2
    let private fixed32Type = 5

    let private writeVarint (buffer: ArrayBufferWriter<byte>) (value: uint64) =
        let span = buffer.GetSpan 10
        let mutable rest = value
        let mutable count = 0
        while rest >= 0x80UL do
            span[count] <- byte (rest &&& 0x7FUL) ||| 0x80uy
            rest <- rest >>> 7
            count <- count + 1
        span[count] <- byte rest
        buffer.Advance(count + 1)

    let private writeKey buffer (field: int) (wireType: int) =
        writeVarint buffer (uint64 ((field <<< 3) ||| wireType))

    /// A double field (wire type fixed64, little-endian).
    let double (buffer: ArrayBufferWriter<byte>) field (value: float) =
        writeKey buffer field fixed64Type
        BinaryPrimitives.WriteDoubleLittleEndian(buffer.GetSpan 8, value)
        buffer.Advance 8

    /// A float field (wire type fixed32, little-endian).
    let float32 (buffer: ArrayBufferWriter<byte>) field (value: float32) =
        writeKey buffer field fixed32Type
        BinaryPrimitives.WriteSingleLittleEndian(buffer.GetSpan 4, value)
        buffer.Advance 4

    /// An int64 field (varint; negative values take ten bytes, as protobuf's int64 does).
    let int64 buffer field (value: int64) =
        writeKey buffer field varintType
        writeVarint buffer (uint64 value)

    /// A bytes or embedded-message field.
    let bytes (buffer: ArrayBufferWriter<byte>) field (value: ReadOnlySpan<byte>) =
        writeKey buffer field lengthDelimitedType
        writeVarint buffer (uint64 value.Length)
        buffer.Write value

    /// A string field (UTF-8).
    let string buffer field (value: string) =
        bytes buffer field (ReadOnlySpan(Encoding.UTF8.GetBytes value))

    /// Event.wall_time = 1 (double).
    let wallTimeField = 1
    /// Event.step = 2 (int64).
    let stepField = 2
    /// Event.file_version = 3 (string).
    let fileVersionField = 3
    /// Event.summary = 5 (Summary).
    let summaryField = 5
    /// Summary.value = 1 (repeated Value).
    let summaryValueField = 1
    /// Summary.Value.tag = 1 (string).
    let valueTagField = 1
    /// Summary.Value.simple_value = 2 (float).
    let valueSimpleValueField = 2

/// TFRecord framing (tensorflow/core/lib/io/record_writer.cc): per record a little-endian uint64
/// length, the masked CRC32C of those 8 bytes, the data, and the masked CRC32C of the data.
module private TfRecord =

    /// The CRC32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table, one entry per byte value.
    let private table =
        Array.init 256 (fun n ->
            let mutable c = uint32 n
            for _ in 1..8 do
                c <- if c &&& 1u <> 0u then (c >>> 1) ^^^ 0x82F63B78u else c >>> 1
            c)

    /// The CRC32C of data (check value: "123456789" gives 0xE3069283).
    let crc32c (data: ReadOnlySpan<byte>) =
        let mutable crc = 0xFFFFFFFFu
        for b in data do
            crc <- table[int ((crc ^^^ uint32 b) &&& 0xFFu)] ^^^ (crc >>> 8)
        crc ^^^ 0xFFFFFFFFu

    /// TFRecord's masked CRC: rotate right by 15 bits and add a constant, so that a CRC stored
    /// inside checksummed data does not checksum trivially.
    let maskedCrc32c (data: ReadOnlySpan<byte>) =
        let crc = crc32c data
        ((crc >>> 15) ||| (crc <<< 17)) + 0xa282ead8u

    /// The framed bytes of one record.
    let frame (data: ReadOnlySpan<byte>) : byte[] =
        let record = Array.zeroCreate<byte> (8 + 4 + data.Length + 4)
        let span = Span<byte>(record)
        BinaryPrimitives.WriteUInt64LittleEndian(span.Slice(0, 8), uint64 data.Length)
        BinaryPrimitives.WriteUInt32LittleEndian(span.Slice(8, 4), maskedCrc32c (ReadOnlySpan<byte>(record, 0, 8)))
        data.CopyTo(span.Slice(12, data.Length))
        BinaryPrimitives.WriteUInt32LittleEndian(span.Slice(12 + data.Length, 4), maskedCrc32c data)
        record

/// An open TensorBoard event file (a TFRecord file of tensorflow.Event protocol buffers). Create one
/// with <c>TensorBoard.create</c> and write with <c>TensorBoard.scalar</c>; every write is flushed so
/// that a running TensorBoard sees it at once. Safe to use from several threads.
[<Sealed>]
type EventWriter internal (path: string, stream: FileStream) =
    let gate = obj ()
    let mutable disposed = false

    /// Seconds since the Unix epoch, with sub-second precision, as TensorBoard's wall_time.
    static member internal WallTime() =
        (DateTimeOffset.UtcNow - DateTimeOffset.UnixEpoch).TotalSeconds

    /// The full path of the event file being written.
    member _.Path = path

    /// Appends one TFRecord holding data and flushes it to the file.
    member internal _.WriteRecord(data: ReadOnlySpan<byte>) =
        let record = TfRecord.frame data
        lock gate (fun () ->
            if disposed then raise (ObjectDisposedException(nameof EventWriter, $"the event file {path} is closed"))
            stream.Write(record, 0, record.Length)
            stream.Flush())

    interface IDisposable with
        member _.Dispose() =
            lock gate (fun () ->
                if not disposed then
                    disposed <- true
                    stream.Dispose())

/// TensorBoard scalar logging: <c>create</c> opens <c>events.out.tfevents.&lt;unix seconds&gt;.&lt;hostname&gt;</c>
/// in a folder (TensorBoard's --logdir or a run folder below it), <c>scalar</c> and <c>scalars</c> append
/// points. The file starts with the "brain.Event:2" version event, as TensorFlow's writer does.
[<RequireQualifiedAccess>]
module TensorBoard =

    /// The file_version of the first event, as tf.summary and PyTorch's SummaryWriter write it.
    [<Literal>]
    let FileVersion = "brain.Event:2"

    /// The CRC32C (Castagnoli) of data, as TFRecord uses it (check value: "123456789" gives 0xE3069283).
    let crc32c (data: byte[]) = TfRecord.crc32c (ReadOnlySpan data)

    /// TFRecord's masked CRC32C of data: ((crc >>> 15) ||| (crc <<< 17)) + 0xa282ead8.
    let maskedCrc32c (data: byte[]) = TfRecord.maskedCrc32c (ReadOnlySpan data)

    let private checkTag (tag: string) =
        if String.IsNullOrEmpty tag then invalidArg (nameof tag) "a TensorBoard tag must not be empty"

    /// Opens a new event file in folder (created when missing) and writes the file-version event.
    /// The name is events.out.tfevents.&lt;unix seconds&gt;.&lt;hostname&gt;; when a file of that name
    /// already exists (two writers in one second), ".1", ".2", ... is appended: TensorBoard reads every
    /// file whose name contains "tfevents".
    let create (folder: string) : EventWriter =
        Directory.CreateDirectory folder |> ignore
        let baseName =
            sprintf "events.out.tfevents.%d.%s" (DateTimeOffset.UtcNow.ToUnixTimeSeconds()) Environment.MachineName
        let rec openNew attempt =
            let name = if attempt = 0 then baseName else sprintf "%s.%d" baseName attempt
            let path = Path.Combine(folder, name)
            match (try Some(new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.Read)) with :? IOException when File.Exists path -> None) with
            | Some stream -> path, stream
            | None -> openNew (attempt + 1)
        let path, stream = openNew 0
        let writer = new EventWriter(Path.GetFullPath path, stream)
        let event = ArrayBufferWriter<byte>()
        Proto.double event Proto.wallTimeField (EventWriter.WallTime())
        Proto.string event Proto.fileVersionField FileVersion
        try
            writer.WriteRecord event.WrittenSpan
            writer
        with _ ->
            (writer :> IDisposable).Dispose()
            reraise ()

    /// Appends one event at step holding several scalars (one Summary.Value each, simple_value stored
    /// as a 32-bit float, as TensorBoard's scalar plugin reads it). Tags must not be empty.
    let scalars (writer: EventWriter) (step: int64) (values: (string * float) list) =
        let summary = ArrayBufferWriter<byte>()
        for tag, value in values do
            checkTag tag
            let entry = ArrayBufferWriter<byte>()
            Proto.string entry Proto.valueTagField tag
            Proto.float32 entry Proto.valueSimpleValueField (float32 value)
            Proto.bytes summary Proto.summaryValueField entry.WrittenSpan
        let event = ArrayBufferWriter<byte>()
        Proto.double event Proto.wallTimeField (EventWriter.WallTime())
        Proto.int64 event Proto.stepField step
        Proto.bytes event Proto.summaryField summary.WrittenSpan
        writer.WriteRecord event.WrittenSpan

    /// Appends one scalar point (tag, step, value); value is stored as a 32-bit float.
    let scalar (writer: EventWriter) (tag: string) (step: int64) (value: float) =
        scalars writer step [ tag, value ]
