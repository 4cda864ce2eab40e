module Functional.Tests.ReportingTests

open System
open System.Buffers.Binary
open System.IO
open System.Text
open Expecto
open FsCheck
open SkiaSharp
open Functional
open Functional.Cli
open Functional.Reporting
open Functional.Tests.TestUtil

// ---------------------------------------------------------------------------------------------
// An independent minimal reader of TensorBoard event files: a bitwise CRC32C (no table), TFRecord
// unframing with both checksums verified, and a generic protobuf field parser.

/// CRC32C computed bit by bit from the reflected Castagnoli polynomial.
let private bitwiseCrc32c (data: byte[]) =
    let mutable crc = 0xFFFFFFFFu
    for b in data do
        crc <- crc ^^^ uint32 b
        for _ in 1..8 do
            crc <- if crc &&& 1u = 1u then (crc >>> 1) ^^^ 0x82F63B78u else crc >>> 1
    ~~~crc

let private masked (data: byte[]) =
    let crc = bitwiseCrc32c data
    ((crc >>> 15) ||| (crc <<< 17)) + 0xa282ead8u

/// The records of a TFRecord file; fails the test on a bad checksum or a truncated record.
let private readRecords (path: string) =
    let bytes =
        use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite)
        use memory = new MemoryStream()
        stream.CopyTo memory
        memory.ToArray()
    let rec loop offset acc =
        if offset = bytes.Length then List.rev acc
        else
            Expect.isGreaterThanOrEqual (bytes.Length - offset) 12 "a record header is complete"
            let lengthBytes = bytes[offset .. offset + 7]
            let length = int (BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan lengthBytes))
            Expect.equal (BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(bytes, offset + 8, 4))) (masked lengthBytes) "length CRC"
            Expect.isGreaterThanOrEqual (bytes.Length - offset - 12) (length + 4) "the record's data is complete"
            let data = bytes[offset + 12 .. offset + 12 + length - 1]
            Expect.equal (BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(bytes, offset + 12 + length, 4))) (masked data) "data CRC"
            loop (offset + 16 + length) (data :: acc)
    loop 0 []

/// One protobuf field value by wire type.
type private Wire =
    | Varint of uint64
    | Fixed64 of byte[]
    | Bytes of byte[]
    | Fixed32 of byte[]

/// The (field number, value) pairs of a protobuf message, in order.
let private parseMessage (bytes: byte[]) =
    let mutable offset = 0
    let varint () =
        let mutable result = 0UL
        let mutable shift = 0
        let mutable more = true
        while more do
            let b = bytes[offset]
            offset <- offset + 1
            result <- result ||| (uint64 (b &&& 0x7Fuy) <<< shift)
            shift <- shift + 7
            more <- b &&& 0x80uy <> 0uy
        result
    let take n =
        let chunk = bytes[offset .. offset + n - 1]
        offset <- offset + n
        chunk
    [ while offset < bytes.Length do
          let key = varint ()
          let field = int (key >>> 3)
          match int (key &&& 7UL) with
          | 0 -> field, Varint(varint ())
          | 1 -> field, Fixed64(take 8)
          | 2 -> field, Bytes(take (int (varint ())))
          | 5 -> field, Fixed32(take 4)
          | other -> failtestf "unexpected wire type %d" other ]

/// What one Event record holds.
type private Event =
    { WallTime: float option
      Step: int64 option
      FileVersion: string option
      Values: (string * float32) list }

let private parseEvent (record: byte[]) =
    let empty = { WallTime = None; Step = None; FileVersion = None; Values = [] }
    let parseValue bytes =
        let fields = parseMessage bytes
        let tag = fields |> List.pick (function 1, Bytes b -> Some(Encoding.UTF8.GetString b) | _ -> None)
        let value = fields |> List.pick (function 2, Fixed32 b -> Some(BinaryPrimitives.ReadSingleLittleEndian(ReadOnlySpan b)) | _ -> None)
        tag, value
    (empty, parseMessage record)
    ||> List.fold (fun e field ->
        match field with
        | 1, Fixed64 b -> { e with WallTime = Some(BinaryPrimitives.ReadDoubleLittleEndian(ReadOnlySpan b)) }
        | 2, Varint v -> { e with Step = Some(int64 v) }
        | 3, Bytes b -> { e with FileVersion = Some(Encoding.UTF8.GetString b) }
        | 5, Bytes summary ->
            let values = parseMessage summary |> List.map (function 1, Bytes v -> parseValue v | f -> failtestf "unexpected Summary field %A" f)
            { e with Values = e.Values @ values }
        | f -> failtestf "unexpected Event field %A" f)

let private readEvents path = readRecords path |> List.map parseEvent

let private singleEventFile (folder: string) =
    let files = Directory.GetFiles folder
    Expect.hasLength files 1 "one event file"
    files[0]

// ---------------------------------------------------------------------------------------------
// PNG helpers.

let private pngSignature = [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |]

/// Width and height from the IHDR chunk, which must come right after the signature.
let private ihdrSize (bytes: byte[]) =
    Expect.equal (Encoding.ASCII.GetString(bytes, 12, 4)) "IHDR" "IHDR is the first chunk"
    BinaryPrimitives.ReadInt32BigEndian(ReadOnlySpan(bytes, 16, 4)), BinaryPrimitives.ReadInt32BigEndian(ReadOnlySpan(bytes, 20, 4))

/// How many pixels lie within a small distance of the colour (r, g, b).
let private pixelsNear (bitmap: SKBitmap) (r: int, g: int, b: int) =
    let pixels = bitmap.Pixels
    pixels
    |> Array.filter (fun p -> abs (int p.Red - r) + abs (int p.Green - g) + abs (int p.Blue - b) < 60)
    |> Array.length

let private sampleSteps =
    [ for s in 1..200 ->
        let lr = if s <= 20 then 3e-4 * float s / 20.0 else 3e-4 * 0.5 * (1.0 + cos (Math.PI * float (s - 20) / 180.0))
        s, 2.0 + 8.0 * exp (-float s / 40.0) + 0.1 * sin (float s), lr ]

let private sampleEval = [ 50, 3.4; 100, 2.6; 150, 2.3; 200, 2.2 ]

// ---------------------------------------------------------------------------------------------
// ProgressDisplay helpers.

let private progress step total =
    TrainingProgress(step, total, float step / float total, 2.5, 1e-4, 0.75, 1234.0)

/// Everything a display writes while drive uses it, Dispose included.
let private capture totalSteps interactive width (clock: TimeProvider) (drive: ProgressDisplay -> unit) =
    use writer = new StringWriter()
    do
        use display = new ProgressDisplay(totalSteps, writer, interactive, width, clock)
        drive display
    writer.ToString()

let private lines (text: string) =
    text.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.map (fun l -> l.TrimEnd '\r')

[<Tests>]
let tests =
    testList "reporting" [
        testList "tensorboard" [
            test "crc32c of \"123456789\" is the standard check value 0xE3069283" {
                Expect.equal (TensorBoard.crc32c (Encoding.ASCII.GetBytes "123456789")) 0xE3069283u "check value"
            }

            testProperty "table-driven crc32c agrees with a bitwise CRC32C" (fun (data: byte[]) ->
                TensorBoard.crc32c data = bitwiseCrc32c data)

            test "masked crc rotates right by 15 and adds 0xa282ead8" {
                let data = Encoding.ASCII.GetBytes "123456789"
                Expect.equal (TensorBoard.maskedCrc32c data) (masked data) "masked CRC"
            }

            test "the event file is named events.out.tfevents.<seconds>.<host> and opens with a brain.Event:2 record" {
                use folder = new TempFolder()
                let before = DateTimeOffset.UtcNow.ToUnixTimeSeconds()
                let path =
                    use writer = TensorBoard.create (folder.File "run")
                    writer.Path
                let after = DateTimeOffset.UtcNow.ToUnixTimeSeconds()
                Expect.equal (singleEventFile (folder.File "run")) path "the writer's path is the file in the folder"
                let name = Path.GetFileName path
                let prefix = "events.out.tfevents."
                Expect.stringStarts name prefix "name prefix"
                let seconds, host = let rest = name.Substring prefix.Length in rest.Substring(0, rest.IndexOf '.'), rest.Substring(rest.IndexOf '.' + 1)
                Expect.isTrue (Int64.Parse seconds >= before && Int64.Parse seconds <= after) "unix seconds of creation"
                Expect.equal host Environment.MachineName "host name"
                match readEvents path with
                | [ first ] ->
                    Expect.equal first.FileVersion (Some "brain.Event:2") "file_version"
                    let wall = first.WallTime |> Option.defaultValue 0.0
                    Expect.isTrue (wall >= float before && wall < float after + 1.0) "wall_time in unix seconds"
                | events -> failtestf "expected one record, got %d" events.Length
            }

            testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "scalars are read back with their tags, steps and float32 values, both CRCs valid"
                (fun (points: (NonEmptyString * int64 * float) list) ->
                    use folder = new TempFolder()
                    let path =
                        use writer = TensorBoard.create folder.Path
                        for NonEmptyString tag, step, value in points do
                            TensorBoard.scalar writer tag step value
                        writer.Path
                    let events = readEvents path
                    let read = events |> List.tail |> List.map (fun e -> e.Step, e.Values)
                    let expected = points |> List.map (fun (NonEmptyString tag, step, value) -> Some step, [ tag, float32 value ])
                    let same = List.forall2 (fun (s1, v1) (s2, v2) -> s1 = s2 && List.forall2 (fun (t1, x1: float32) (t2, x2) -> t1 = t2 && x1.Equals x2) v1 v2)
                    events.Length = points.Length + 1 && same read expected)

            test "scalars at one step share one event" {
                use folder = new TempFolder()
                let path =
                    use writer = TensorBoard.create folder.Path
                    TensorBoard.scalars writer 7L [ "train/loss", 2.5; "train/learning_rate", 3e-4 ]
                    writer.Path
                match readEvents path with
                | [ _; event ] ->
                    Expect.equal event.Step (Some 7L) "step"
                    Expect.equal event.Values [ "train/loss", 2.5f; "train/learning_rate", float32 3e-4 ] "values in order"
                | events -> failtestf "expected two records, got %d" events.Length
            }

            test "every write is flushed: the file is readable while the writer is open" {
                use folder = new TempFolder()
                use writer = TensorBoard.create folder.Path
                TensorBoard.scalar writer "loss" 1L 4.0
                TensorBoard.scalar writer "loss" 2L 3.0
                let steps = readEvents writer.Path |> List.tail |> List.map (fun e -> e.Step, e.Values)
                Expect.equal steps [ Some 1L, [ "loss", 4.0f ]; Some 2L, [ "loss", 3.0f ] ] "both points visible before Dispose"
            }

            test "two writers opened in the same folder at once write distinct files" {
                use folder = new TempFolder()
                use first = TensorBoard.create folder.Path
                use second = TensorBoard.create folder.Path
                Expect.notEqual first.Path second.Path "distinct paths"
                Expect.stringContains (Path.GetFileName second.Path) "tfevents" "TensorBoard still reads the second file"
                Expect.hasLength (Directory.GetFiles folder.Path) 2 "two files"
            }

            test "an empty tag is rejected and nothing is written" {
                use folder = new TempFolder()
                use writer = TensorBoard.create folder.Path
                Expect.throwsT<ArgumentException> (fun () -> TensorBoard.scalars writer 1L [ "ok", 1.0; "", 2.0 ]) "empty tag"
                Expect.hasLength (readEvents writer.Path) 1 "only the version record"
            }

            test "writing after Dispose raises ObjectDisposedException" {
                use folder = new TempFolder()
                let writer = TensorBoard.create folder.Path
                (writer :> IDisposable).Dispose()
                Expect.throwsT<ObjectDisposedException> (fun () -> TensorBoard.scalar writer "loss" 1L 1.0) "closed writer"
            }
        ]

        testList "metrics plot" [
            test "the PNG has the signature, is 1000x600 and shows the loss, eval and learning-rate series" {
                use folder = new TempFolder()
                let path = folder.File "plots/loss.png"
                MetricsPlot.save path sampleSteps sampleEval
                let bytes = File.ReadAllBytes path
                Expect.sequenceEqual bytes[0..7] pngSignature "PNG signature"
                Expect.equal (ihdrSize bytes) (1000, 600) "IHDR size"
                use bitmap = SKBitmap.Decode path
                Expect.equal (bitmap.Width, bitmap.Height) (1000, 600) "decoded size"
                let total = bitmap.Width * bitmap.Height
                let white = pixelsNear bitmap (255, 255, 255)
                Expect.isLessThan white (total * 97 / 100) "not blank"
                Expect.isGreaterThan (pixelsNear bitmap (0x1f, 0x77, 0xb4)) 500 "training loss line (blue)"
                Expect.isGreaterThan (pixelsNear bitmap (0xd6, 0x27, 0x28)) 100 "evaluation markers (red)"
                Expect.isGreaterThan (pixelsNear bitmap (0x2c, 0xa0, 0x2c)) 300 "learning-rate line (green)"
            }

            test "empty series and non-finite losses still give a valid PNG" {
                use folder = new TempFolder()
                let empty = folder.File "empty.png"
                MetricsPlot.save empty [] []
                let nonFinite = folder.File "non-finite.png"
                MetricsPlot.save nonFinite [ 1, 3.0, 1e-4; 2, nan, 1e-4; 3, infinity, 1e-4; 4, 2.0, 1e-4 ] [ 2, nan ]
                for path in [ empty; nonFinite ] do
                    let bytes = File.ReadAllBytes path
                    Expect.sequenceEqual bytes[0..7] pngSignature "PNG signature"
                    Expect.equal (ihdrSize bytes) (1000, 600) "IHDR size"
            }
        ]

        testList "progress display" [
            test "redirected output gets one plain line per reported step with loss, lr and an ETA from elapsed/step" {
                let clock = ManualClock()
                let text =
                    capture 40 false 120 clock (fun display ->
                        for step in 1..4 do
                            clock.Advance(TimeSpan.FromSeconds 2.5)
                            display.Report(progress step 40))
                let printed = lines text
                Expect.hasLength printed 4 "one line per step"
                Expect.isFalse (text.Contains '\u001b') "no escape sequences"
                let last = printed[3]
                for part in [ "step 4/40 (10%)"; "loss 2.5000"; "lr 1.00e-04"; "grad_norm 0.750"; "tokens/s 1234"; "elapsed 0:00:10"; "eta 0:01:30" ] do
                    Expect.stringContains last part "field of the last line"
            }

            test "redirected output of a long run prints at most one line per percent plus the last step" {
                let text =
                    capture 1000 false 120 (ManualClock()) (fun display ->
                        for step in 1..1000 do
                            display.Report(progress step 1000))
                let printed = lines text
                Expect.hasLength printed 101 "steps 1 (0%), 10, 20, ... 1000"
                Expect.stringStarts printed[100] "step 1000/1000 (100%)" "the last step is printed"
            }

            test "messages print as their own lines in both modes" {
                let drive (display: ProgressDisplay) =
                    display.Report(progress 1 10)
                    display.Message "eval loss 2.1"
                let plain = lines (capture 10 false 120 (ManualClock()) drive)
                Expect.equal plain[1] "eval loss 2.1" "plain message line"
                let live = capture 10 true 120 (ManualClock()) drive
                Expect.stringContains live ("\r\u001b[Keval loss 2.1" + Environment.NewLine + "\r\u001b[Kstep  1/10") "the status line is erased, the message printed, the status line redrawn"
            }

            test "an interactive terminal gets one line redrawn in place with a bar, cut to the width" {
                let clock = ManualClock()
                use writer = new StringWriter()
                let display = new ProgressDisplay(10, writer, true, 100, clock)
                for step in 1..5 do
                    clock.Advance(TimeSpan.FromSeconds 1.0)
                    display.Report(progress step 10)
                let live = writer.ToString()
                Expect.isFalse (live.Contains '\n') "no newline while running"
                let redraws = live.Split("\r\u001b[K", StringSplitOptions.RemoveEmptyEntries)
                Expect.hasLength redraws 5 "one redraw per report a second apart"
                let current = redraws[4]
                Expect.isLessThanOrEqual current.Length 100 "fits the width"
                Expect.stringStarts current "step  5/10 [" "step and bar"
                for part in [ " 50%"; "loss   2.5000"; "lr 1.00e-04"; "1,234 tok/s"; "elapsed 0:00:05  eta 0:00:05" ] do
                    Expect.stringContains current part "field of the status line"
                (display :> IDisposable).Dispose()
                Expect.stringEnds (writer.ToString()) Environment.NewLine "Dispose ends the status line"
            }

            test "a report's total steps take precedence over the constructor's, which stands in when a report has none" {
                let text =
                    capture 0 false 120 (ManualClock()) (fun display ->
                        display.Report(progress 1 8)
                        display.Report(TrainingProgress(2, 0, 0.0, 2.0, 1e-4, 0.5, 10.0)))
                Expect.stringStarts (Array.head (lines text)) "step 1/8 (12%)" "total from the report"
                let fallback = capture 5 false 120 (ManualClock()) (fun display -> display.Report(TrainingProgress(2, 0, 0.0, 2.0, 1e-4, 0.5, 10.0)))
                Expect.stringStarts fallback "step 2/5 (40%)" "total from the constructor"
            }

            test "interactive redraws closer than 100 ms are skipped but the last step is drawn" {
                let clock = ManualClock()
                let text =
                    capture 3 true 100 clock (fun display ->
                        for step in 1..3 do
                            clock.Advance(TimeSpan.FromMilliseconds 10.0)
                            display.Report(progress step 3))
                let redraws = text.Split("\r\u001b[K", StringSplitOptions.RemoveEmptyEntries)
                Expect.equal (redraws |> Array.map (fun r -> r.Substring(0, 8))) [| "step 1/3"; "step 3/3"; "step 3/3" |] "first, last and the final line on Dispose"
            }
        ]
    ]
