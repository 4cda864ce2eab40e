module Functional.Tests.StateDictTests

open System
open System.IO
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Runtime

let private withTempDir (f: string -> unit) =
    TorchRuntime.ensure ()
    let dir = Path.Combine(Path.GetTempPath(), "functional-statedict-" + Guid.NewGuid().ToString "N")
    Directory.CreateDirectory dir |> ignore
    try f dir finally Directory.Delete(dir, true)

/// A tiny GPT-2-shaped model: tied head, "transformer." prefix, attention-mask buffers.
let private gpt2Spec =
    { Expected =
        [ "transformer.wte.weight", [| 10L; 4L |]
          "transformer.h.0.attn.c_attn.weight", [| 4L; 12L |]
          "transformer.h.0.attn.c_attn.bias", [| 12L |]
          "transformer.ln_f.weight", [| 4L |] ]
      BasePrefix = "transformer."
      IgnoredSuffixes = [ ".attn.bias"; ".attn.masked_bias" ]
      TiedKeys = [ "lm_head.weight" ] }

/// A tiny LLaMA-shaped model: untied head outside the "model." prefix, rotary buffers.
let private llamaSpec =
    { Expected =
        [ "model.embed_tokens.weight", [| 10L; 4L |]
          "model.layers.0.self_attn.q_proj.weight", [| 4L; 4L |]
          "model.norm.weight", [| 4L |]
          "lm_head.weight", [| 10L; 4L |] ]
      BasePrefix = "model."
      IgnoredSuffixes = [ ".rotary_emb.inv_freq" ]
      TiedKeys = [] }

/// Distinct deterministic values for every expected tensor of a spec, keyed by expected name.
let private valuesFor (spec: StateDictSpec) =
    spec.Expected
    |> List.mapi (fun i (name, shape) ->
        let count = shape |> Array.fold (*) 1L
        name, torch.arange(count, dtype = torch.ScalarType.Float32).add(torch.tensor(float32 (100 * i))).reshape(shape))

let private save (path: string) (tensors: (string * torch.Tensor) list) = Safetensors.save path Map.empty tensors

let private expectSame (expected: (string * torch.Tensor) list) (loaded: Map<string, torch.Tensor>) =
    Expect.equal (loaded |> Map.keys |> Set.ofSeq) (expected |> List.map fst |> Set.ofList) "exactly the expected parameters"
    for name, t in expected do
        Expect.equal loaded[name].dtype torch.ScalarType.Float32 (sprintf "%s is float32" name)
        Expect.isTrue (loaded[name].Equals t) (sprintf "%s has the stored values" name)

let private expectInvalid (path: string) (location: string) (fragments: string list) (f: unit -> unit) =
    match (try f (); None with :? InvalidInputException as (TestUtil.CommandLine e) -> Some e) with
    | None -> failtest "expected an InvalidInputException; nothing was raised"
    | Some e ->
        Expect.equal e.Origin path "origin is the file"
        Expect.equal e.Location location "location is the tensor"
        Expect.stringContains e.Message path "message names the file"
        for fragment in fragments do
            Expect.stringContains e.Message fragment "message names the problem"

let private load path spec = StateDict.matchCheckpoint path spec torch.ScalarType.Float32

[<Tests>]
let tests =
    testList "state dict" [
        test "prefixed and unprefixed names load to the same parameters" {
            withTempDir (fun dir ->
                let values = valuesFor gpt2Spec
                let prefixed, bare = Path.Combine(dir, "lm.safetensors"), Path.Combine(dir, "base.safetensors")
                save prefixed values
                save bare (values |> List.map (fun (n, t) -> n.Substring "transformer.".Length, t))
                expectSame values (load prefixed gpt2Spec)
                expectSame values (load bare gpt2Spec))
        }

        test "GPT-2 attention-mask buffers attn.bias and attn.masked_bias are ignored" {
            withTempDir (fun dir ->
                let values = valuesFor gpt2Spec
                let path = Path.Combine(dir, "gpt2.safetensors")
                save path
                    (values
                     @ [ "transformer.h.0.attn.bias", torch.ones(1L, 1L, 8L, 8L)
                         "transformer.h.0.attn.masked_bias", torch.tensor(-1e4f) ])
                expectSame values (load path gpt2Spec)
                let bare = Path.Combine(dir, "bare.safetensors")
                save bare
                    ((values |> List.map (fun (n, t) -> n.Substring "transformer.".Length, t))
                     @ [ "h.0.attn.bias", torch.ones(1L, 1L, 8L, 8L) ])
                expectSame values (load bare gpt2Spec))
        }

        test "LLaMA rotary_emb.inv_freq buffers are ignored and an untied lm_head.weight is loaded" {
            withTempDir (fun dir ->
                let values = valuesFor llamaSpec
                let path = Path.Combine(dir, "llama.safetensors")
                save path (values @ [ "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(2L) ])
                expectSame values (load path llamaSpec))
        }

        test "a tied lm_head.weight in the file is ignored when the head is tied" {
            withTempDir (fun dir ->
                let values = valuesFor gpt2Spec
                let path = Path.Combine(dir, "tied.safetensors")
                save path (values @ [ "lm_head.weight", torch.zeros(10L, 4L) ])
                expectSame values (load path gpt2Spec))
        }

        test "a missing tensor is reported with the file and the tensor's name" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "missing.safetensors")
                save path (valuesFor gpt2Spec |> List.filter (fun (n, _) -> n <> "transformer.ln_f.weight"))
                expectInvalid path "transformer.ln_f.weight" [ "lacks 1 tensor"; "transformer.ln_f.weight" ]
                    (fun () -> load path gpt2Spec |> ignore))
        }

        test "an untied head missing from a base-model checkpoint is reported" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "base.safetensors")
                save path [ for n, t in valuesFor llamaSpec do if n <> "lm_head.weight" then n.Substring "model.".Length, t ]
                expectInvalid path "lm_head.weight" [ "lm_head.weight" ] (fun () -> load path llamaSpec |> ignore))
        }

        test "an extra tensor is reported with the file and the tensor's name" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "extra.safetensors")
                save path (valuesFor gpt2Spec @ [ "transformer.h.1.attn.c_attn.weight", torch.zeros(4L, 12L) ])
                expectInvalid path "transformer.h.1.attn.c_attn.weight" [ "does not have"; "transformer.h.1.attn.c_attn.weight" ]
                    (fun () -> load path gpt2Spec |> ignore))
        }

        test "a wrong shape is reported with the stored and the implied shape" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "shape.safetensors")
                let values =
                    valuesFor gpt2Spec
                    |> List.map (fun (n, t) -> if n = "transformer.h.0.attn.c_attn.weight" then n, torch.zeros(4L, 13L) else n, t)
                save path values
                expectInvalid path "transformer.h.0.attn.c_attn.weight"
                    [ "tensor transformer.h.0.attn.c_attn.weight has shape [4, 13], the config implies [4, 12]" ]
                    (fun () -> load path gpt2Spec |> ignore))
        }

        test "a parameter stored both with and without the prefix is reported" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "twice.safetensors")
                save path (valuesFor gpt2Spec @ [ "ln_f.weight", torch.zeros(4L) ])
                expectInvalid path "transformer.ln_f.weight" [ "stored twice"; "\"ln_f.weight\"" ]
                    (fun () -> load path gpt2Spec |> ignore))
        }

        test "F16 and BF16 stored weights are converted to F32 exactly" {
            withTempDir (fun dir ->
                // Multiples of 0.5 below 64 need at most 7 significant bits: exact in F16 and BF16.
                let values =
                    gpt2Spec.Expected
                    |> List.mapi (fun i (name, shape) ->
                        let count = shape |> Array.fold (*) 1L
                        name, torch.arange(count, dtype = torch.ScalarType.Float32).remainder(torch.tensor(32.0f)).add(torch.tensor(0.5f * float32 i)).reshape(shape))
                let path = Path.Combine(dir, "half.safetensors")
                save path
                    (values
                     |> List.mapi (fun i (n, t) ->
                         n, t.``to``(if i % 2 = 0 then torch.ScalarType.Float16 else torch.ScalarType.BFloat16)))
                let header = Safetensors.readHeader path
                Expect.equal
                    (header.Entries |> List.map (fun e -> e.DType) |> List.distinct |> List.sort)
                    ([ torch.ScalarType.Float16; torch.ScalarType.BFloat16 ] |> List.sort) "stored as F16 and BF16"
                expectSame values (load path gpt2Spec))
        }

        test "an integer tensor for a floating-point parameter is rejected" {
            withTempDir (fun dir ->
                let path = Path.Combine(dir, "int.safetensors")
                save path
                    (valuesFor gpt2Spec
                     |> List.map (fun (n, t) -> if n = "transformer.ln_f.weight" then n, t.``to``(torch.ScalarType.Int64) else n, t))
                expectInvalid path "transformer.ln_f.weight" [ "stored as I64" ] (fun () -> load path gpt2Spec |> ignore))
        }

        test "tensors split over shards load together; a tensor missing from every shard names all shards" {
            withTempDir (fun dir ->
                let values = valuesFor llamaSpec
                let a, b = Path.Combine(dir, "model-00001-of-00002.safetensors"), Path.Combine(dir, "model-00002-of-00002.safetensors")
                save a (values |> List.take 2)
                save b (values |> List.skip 2)
                expectSame values (StateDict.matchShards [ a; b ] llamaSpec torch.ScalarType.Float32)
                save b (values |> List.skip 3)
                expectInvalid (a + ", " + b) "model.norm.weight" [ "model.norm.weight" ]
                    (fun () -> StateDict.matchShards [ a; b ] llamaSpec torch.ScalarType.Float32 |> ignore))
        }

        test "export writes format=pt metadata and the file loads back" {
            withTempDir (fun dir ->
                let values = valuesFor gpt2Spec
                let path = Path.Combine(dir, "model.safetensors")
                StateDict.export path (Map [ "format", "other"; "step", "7" ]) values
                Expect.equal (Safetensors.readHeader path).Metadata (Map [ "format", "pt"; "step", "7" ]) "metadata"
                expectSame values (load path gpt2Spec))
        }
    ]
