module Functional.Tests.SafetensorsTests

open System
open System.Buffers.Binary
open System.IO
open System.Text
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Runtime

/// Runs f with a fresh empty folder that is deleted afterwards.
let private withTempDir (f: string -> unit) =
    TorchRuntime.ensure ()
    let dir = Path.Combine(Path.GetTempPath(), "functional-safetensors-" + Guid.NewGuid().ToString "N")
    Directory.CreateDirectory dir |> ignore
    try f dir finally Directory.Delete(dir, true)

/// A CPU tensor whose storage holds exactly these bytes.
let private tensorOfBytes (dtype: torch.ScalarType) (shape: int64[]) (bytes: byte[]) =
    let t = torch.empty(shape, dtype = dtype)
    t.bytes <- Span<byte>(bytes)
    t

let private bytesOf (t: torch.Tensor) =
    use c = t.contiguous()
    c.bytes.ToArray()

let private u16Bytes (values: uint16 list) =
    values |> List.collect (fun v -> BitConverter.GetBytes v |> List.ofArray) |> Array.ofList

/// A safetensors file assembled byte by byte from a JSON header text and a data region.
let private writeRaw (path: string) (json: string) (data: byte[]) =
    let header = Encoding.UTF8.GetBytes json
    let length = Array.zeroCreate<byte> 8
    BinaryPrimitives.WriteUInt64LittleEndian(Span<byte>(length), uint64 header.Length)
    File.WriteAllBytes(path, Array.concat [ length; header; data ])

/// Asserts that f raises InvalidInputException for path whose message holds every fragment.
let private expectInvalid (path: string) (location: string) (fragments: string list) (f: unit -> unit) =
    match (try f (); None with :? InvalidInputException as (TestUtil.CommandLine e) -> Some e) with
    | None -> failtest "expected an InvalidInputException; nothing was raised"
    | Some e ->
        Expect.equal e.Origin path "origin is the file"
        Expect.equal e.Location location "location"
        Expect.stringContains e.Message path "message names the file"
        for fragment in fragments do
            Expect.stringContains e.Message fragment "message names the problem"

/// Dtypes with special bit patterns that must survive a round trip untouched.
let private specialValues : (torch.ScalarType * byte[]) list =
    [ torch.ScalarType.BFloat16, u16Bytes [ 0x7FC0us; 0x7F81us; 0xFFC1us; 0x7F80us; 0xFF80us; 0x0001us; 0x8001us; 0x8000us ]
      torch.ScalarType.Float16, u16Bytes [ 0x7E00us; 0x7C01us; 0xFE01us; 0x7C00us; 0xFC00us; 0x0001us; 0x83FFus; 0x8000us ]
      torch.ScalarType.Float32,
      [ Single.NaN; BitConverter.Int32BitsToSingle 0x7F800001; Single.PositiveInfinity; Single.NegativeInfinity
        Single.Epsilon; -0.0f; Single.MaxValue; Single.MinValue ]
      |> Array.ofList |> Array.collect BitConverter.GetBytes
      torch.ScalarType.Float64,
      [ Double.NaN; BitConverter.Int64BitsToDouble 0x7FF0000000000001L; Double.PositiveInfinity; Double.Epsilon; -0.0 ]
      |> Array.ofList |> Array.collect BitConverter.GetBytes
      torch.ScalarType.Int64, [ Int64.MinValue; Int64.MaxValue; -1L; 0L ] |> Array.ofList |> Array.collect BitConverter.GetBytes
      torch.ScalarType.Int32, [ Int32.MinValue; Int32.MaxValue; -1; 0 ] |> Array.ofList |> Array.collect BitConverter.GetBytes
      torch.ScalarType.Int16, [ Int16.MinValue; Int16.MaxValue ] |> Array.ofList |> Array.collect BitConverter.GetBytes
      torch.ScalarType.Int8, [| 0x80uy; 0x7Fuy; 0xFFuy |]
      torch.ScalarType.Byte, [| 0uy; 255uy; 128uy |]
      torch.ScalarType.Bool, [| 1uy; 0uy; 1uy |] ]

let private roundTrip dir (tensors: (string * torch.Tensor) list) =
    let path = Path.Combine(dir, "t.safetensors")
    Safetensors.save path Map.empty tensors
    Safetensors.load path

let private roundTripTests =
    testList "round trip" [
        test "every supported dtype round-trips bit-exactly, including NaN payloads, infinities, subnormals and integer extremes" {
            withTempDir (fun dir ->
                let random = Random 7
                let tensors =
                    specialValues
                    |> List.map (fun (dtype, special) ->
                        let size = int (Safetensors.elementSize dtype)
                        let noise =
                            if dtype = torch.ScalarType.Bool then Array.init 64 (fun _ -> byte (random.Next 2))
                            else Array.init (64 * size) (fun _ -> byte (random.Next 256))
                        let bytes = Array.append special noise
                        Safetensors.dtypeCode dtype, tensorOfBytes dtype [| int64 (bytes.Length / size) |] bytes)
                let loaded = roundTrip dir tensors
                Expect.equal (loaded |> Map.keys |> Set.ofSeq) (tensors |> List.map fst |> Set.ofList) "every tensor comes back"
                for name, original in tensors do
                    let back = loaded[name]
                    Expect.equal back.dtype original.dtype (sprintf "%s keeps its dtype" name)
                    Expect.equal back.shape original.shape (sprintf "%s keeps its shape" name)
                    Expect.equal (bytesOf back) (bytesOf original) (sprintf "%s keeps every bit" name))
        }

        test "0-dim, empty and many-dimensional tensors keep their shapes" {
            withTempDir (fun dir ->
                let scalar = torch.tensor(2.5f)
                let empty = torch.empty([| 0L |], dtype = torch.ScalarType.Float32)
                let hollow = torch.empty([| 2L; 0L; 3L |], dtype = torch.ScalarType.BFloat16)
                let cube = torch.arange(24L, dtype = torch.ScalarType.Int64).reshape(2L, 3L, 4L)
                let loaded = roundTrip dir [ "scalar", scalar; "empty", empty; "hollow", hollow; "cube", cube ]
                Expect.equal loaded["scalar"].shape [||] "0-dim stays 0-dim"
                Expect.equal (loaded["scalar"].item<float32> ()) 2.5f "0-dim value"
                Expect.equal loaded["empty"].shape [| 0L |] "empty shape"
                Expect.equal loaded["hollow"].shape [| 2L; 0L; 3L |] "shape with a zero dimension"
                Expect.equal loaded["hollow"].dtype torch.ScalarType.BFloat16 "dtype of an empty tensor"
                Expect.isTrue (loaded["cube"].Equals cube) "3-d values")
        }

        test "non-contiguous tensors are written in row-major order of their logical shape" {
            withTempDir (fun dir ->
                let matrix = torch.arange(6L, dtype = torch.ScalarType.Float32).reshape(2L, 3L)
                let transposed = matrix.t()
                let loaded = roundTrip dir [ "t", transposed ]
                Expect.equal loaded["t"].shape [| 3L; 2L |] "shape"
                Expect.isTrue (loaded["t"].Equals transposed) "values in logical order")
        }

        test "metadata round-trips; an empty map writes no __metadata__ entry" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "m.safetensors")
                let metadata = Map [ "format", "pt"; "note", "ünïcode \"quoted\" + symbols" ]
                Safetensors.save path metadata [ "x", torch.ones(2L) ]
                Expect.equal (Safetensors.readHeader path).Metadata metadata "metadata"
                Safetensors.save path Map.empty [ "x", torch.ones(2L) ]
                let bytes = File.ReadAllBytes path
                Expect.isFalse (Encoding.UTF8.GetString(bytes).Contains "__metadata__") "no metadata key"
                Expect.isEmpty (Safetensors.readHeader path).Metadata "empty metadata")
        }

        test "the header is padded with spaces to a multiple of 8 bytes and every tensor starts aligned to its element size" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "a.safetensors")
                Safetensors.save path Map.empty
                    [ "a", torch.ones(3L, dtype = torch.ScalarType.BFloat16)
                      "b", torch.ones(1L, dtype = torch.ScalarType.Int8)
                      "c", torch.ones(3L, dtype = torch.ScalarType.Float32)
                      "d", torch.ones(1L, dtype = torch.ScalarType.Float64) ]
                let bytes = File.ReadAllBytes path
                let n = BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan<byte>(bytes, 0, 8))
                Expect.equal (n % 8UL) 0UL "header length is a multiple of 8"
                let json = Encoding.UTF8.GetString(bytes, 8, int n)
                Expect.isTrue (json.TrimEnd(' ').EndsWith "}") "only spaces follow the JSON object"
                let header = Safetensors.readHeader path
                for e in header.Entries do
                    Expect.equal (e.Begin % Safetensors.elementSize e.DType) 0L (sprintf "%s is aligned" e.Name)
                Expect.equal (header.Entries |> List.map (fun e -> e.Name)) [ "a"; "b"; "c"; "d" ] "header lists names in order"
                Expect.equal (header.DataStart + (header.Entries |> List.sumBy (fun e -> e.End - e.Begin))) bytes.LongLength
                    "the data region holds exactly the tensors")
        }

        test "saving is deterministic whatever the order of the input tensors" {
            withTempDir (fun dir ->
                let a = torch.arange(5L, dtype = torch.ScalarType.Float32)
                let b = torch.arange(3L, dtype = torch.ScalarType.Int64)
                let c = torch.ones(2L, dtype = torch.ScalarType.Float16)
                let p1, p2 = Path.Combine(dir, "1.safetensors"), Path.Combine(dir, "2.safetensors")
                Safetensors.save p1 (Map [ "k", "v" ]) [ "a", a; "b", b; "c", c ]
                Safetensors.save p2 (Map [ "k", "v" ]) [ "c", c; "a", a; "b", b ]
                Expect.equal (File.ReadAllBytes p1) (File.ReadAllBytes p2) "identical bytes")
        }

        test "a failed save leaves an existing file untouched and no temporary file behind" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "keep.safetensors")
                Safetensors.save path Map.empty [ "x", torch.ones(2L) ]
                let before = File.ReadAllBytes path
                let complex = torch.zeros(2L, dtype = torch.ScalarType.ComplexFloat32)
                Expect.throwsT<ArgumentException>
                    (fun () -> Safetensors.save path Map.empty [ "y", torch.ones(3L); "z", complex ])
                    "complex tensors cannot be stored"
                Expect.throwsT<ArgumentException>
                    (fun () -> Safetensors.save path Map.empty [ "y", torch.ones(3L); "y", torch.ones(3L) ])
                    "a repeated name is refused"
                // A meta tensor has a shape but no data: the save fails after the first tensor is written.
                let dataless = torch.empty([| 4L |], device = torch.device "meta")
                Expect.throws
                    (fun () -> Safetensors.save path Map.empty [ "a", torch.ones(3L); "b", dataless ])
                    "a tensor without data cannot be written"
                Expect.equal (File.ReadAllBytes path) before "old file intact"
                Expect.equal (Directory.GetFiles dir) [| path |] "no stray files")
        }

        test "loadFiltered loads only the selected tensors" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "f.safetensors")
                Safetensors.save path Map.empty [ "keep.a", torch.ones(2L); "drop.b", torch.ones(3L); "keep.c", torch.zeros(1L) ]
                let loaded = Safetensors.loadFiltered path (fun e -> e.Name.StartsWith "keep.")
                Expect.equal (loaded |> Map.keys |> List.ofSeq) [ "keep.a"; "keep.c" ] "selected names")
        }

        testProperty "any float32 and int64 arrays round-trip bit-exactly" (fun (floats: float32[]) (longs: int64[]) ->
            withTempDir (fun dir ->
                let f = torch.tensor(floats, dtype = torch.ScalarType.Float32)
                let l = torch.tensor(longs, dtype = torch.ScalarType.Int64)
                let loaded = roundTrip dir [ "f", f; "l", l ]
                Expect.equal (bytesOf loaded["f"]) (bytesOf f) "float bits"
                Expect.equal (bytesOf loaded["l"]) (bytesOf l) "long bits"))
    ]

let private handWrittenTests =
    testList "hand-written file" [
        test "a file assembled from the format description reads back the right values" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "hand.safetensors")
                // Data: b (I64 [3]) at 0..24, w (F32 [2, 2]) at 24..40, h (BF16 [2]) at 40..44.
                let data =
                    Array.concat
                        [ [| -1L; 0L; Int64.MaxValue |] |> Array.collect BitConverter.GetBytes
                          [| 1.0f; -2.0f; 0.5f; 3.25f |] |> Array.collect BitConverter.GetBytes
                          u16Bytes [ 0x3FC0us; 0xC000us ] ] // bf16 1.5, -2.0
                let json =
                    """{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[24,40]},"__metadata__":{"format":"pt"},"""
                    + """"h":{"shape":[2],"dtype":"BF16","data_offsets":[40,44]},"b":{"dtype":"I64","shape":[3],"data_offsets":[0,24]}}   """
                writeRaw path json data
                let header = Safetensors.readHeader path
                Expect.equal (header.Entries |> List.map (fun e -> e.Name)) [ "w"; "h"; "b" ] "entries in header order"
                Expect.equal header.Metadata (Map [ "format", "pt" ]) "metadata"
                Expect.equal header.DataStart (8L + int64 (Encoding.UTF8.GetByteCount json)) "data start"
                let loaded = Safetensors.load path
                let w = loaded["w"]
                Expect.equal w.dtype torch.ScalarType.Float32 "w dtype"
                Expect.equal w.shape [| 2L; 2L |] "w shape"
                Expect.equal (w.data<float32>().ToArray()) [| 1.0f; -2.0f; 0.5f; 3.25f |] "w values"
                Expect.equal (loaded["b"].data<int64>().ToArray()) [| -1L; 0L; Int64.MaxValue |] "b values"
                use h32 = loaded["h"].``to``(torch.ScalarType.Float32)
                Expect.equal (h32.data<float32>().ToArray()) [| 1.5f; -2.0f |] "h values")
        }
    ]

let private malformedTests =
    let entry = """{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"""
    let eightBytes = Array.zeroCreate<byte> 8
    let case name (build: string -> unit) (location: string) (fragments: string list) =
        test name {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "bad.safetensors")
                build path
                expectInvalid path location fragments (fun () -> Safetensors.readHeader path |> ignore)
                expectInvalid path location fragments (fun () -> Safetensors.load path |> ignore))
        }
    testList "malformed" [
        case "a file shorter than 8 bytes is rejected"
            (fun p -> File.WriteAllBytes(p, [| 1uy; 2uy; 3uy |])) "header" [ "3 bytes long" ]
        case "a header length past the end of the file is reported as truncation"
            (fun p ->
                let bytes = Encoding.UTF8.GetBytes entry
                let length = Array.zeroCreate<byte> 8
                BinaryPrimitives.WriteUInt64LittleEndian(Span<byte>(length), uint64 bytes.Length + 10UL)
                File.WriteAllBytes(p, Array.append length bytes))
            "header" [ "truncated" ]
        case "an absurd header length is rejected"
            (fun p -> File.WriteAllBytes(p, Array.append (BitConverter.GetBytes(UInt64.MaxValue)) eightBytes))
            "header" [ "limit" ]
        case "a header that is not JSON is rejected"
            (fun p -> writeRaw p """{"x": {"dtype": "F32",""" eightBytes) "header" [ "not valid JSON" ]
        case "a header that is a JSON array is rejected"
            (fun p -> writeRaw p "[1, 2]" eightBytes) "header" [ "must be a JSON object"; "an array" ]
        case "an entry without dtype is rejected"
            (fun p -> writeRaw p """{"x":{"shape":[2],"data_offsets":[0,8]}}""" eightBytes) "x" [ "\"dtype\"" ]
        case "an entry without shape is rejected"
            (fun p -> writeRaw p """{"x":{"dtype":"F32","data_offsets":[0,8]}}""" eightBytes) "x" [ "\"shape\"" ]
        case "an entry without data_offsets is rejected"
            (fun p -> writeRaw p """{"x":{"dtype":"F32","shape":[2]}}""" eightBytes) "x" [ "\"data_offsets\"" ]
        case "an unknown dtype is named together with the supported ones"
            (fun p -> writeRaw p """{"x":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}""" eightBytes)
            "x" [ "unknown dtype \"F8_E4M3\""; "F32"; "BF16"; "I64" ]
        case "data_offsets past the end of the file are rejected"
            (fun p -> writeRaw p """{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""" eightBytes)
            "x" [ "past the end of the file"; "8 bytes" ]
        case "data_offsets that begin after they end are rejected"
            (fun p -> writeRaw p """{"x":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}""" eightBytes)
            "x" [ "begin after they end" ]
        case "a byte size other than prod(shape) times the element size is rejected"
            (fun p -> writeRaw p """{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""" eightBytes)
            "x" [ "hold 8 bytes"; "needs 12" ]
        case "overlapping tensors are rejected"
            (fun p ->
                writeRaw p """{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"""
                    eightBytes)
            "y" [ "overlap"; "\"x\"" ]
        case "a negative shape is rejected"
            (fun p -> writeRaw p """{"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""" eightBytes)
            "x" [ "non-negative" ]
        case "a name listed twice is rejected"
            (fun p ->
                writeRaw p """{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"""
                    eightBytes)
            "x" [ "twice" ]
        case "metadata whose values are not strings is rejected"
            (fun p -> writeRaw p """{"__metadata__":{"step":3}}""" [||]) "__metadata__" [ "must be a string" ]
        test "a missing file is reported as invalid input" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "absent.safetensors")
                expectInvalid path "" [ "no such file" ] (fun () -> Safetensors.readHeader path |> ignore))
        }
    ]

[<Tests>]
let tests = testList "safetensors" [ roundTripTests; handWrittenTests; malformedTests ]
