namespace Functional.Checkpoint

open System
open System.Collections.Generic
open TorchSharp
open Functional
open Functional.Runtime

/// What a model expects from a checkpoint, in the naming of the Hugging Face LM-head model's state
/// dict as save_pretrained writes it (e.g. "transformer.h.0.attn.c_attn.weight" for GPT-2,
/// "model.layers.0.self_attn.q_proj.weight" for LLaMA).
type StateDictSpec =
    { /// Every parameter the model needs, with its shape.
      Expected: (string * int64[]) list
      /// The base model's prefix ("transformer." or "model."): a stored name without it (as a base
      /// model's checkpoint writes it) is read as BasePrefix + name.
      BasePrefix: string
      /// Name endings of non-parameter buffers some checkpoints hold, skipped wherever they appear
      /// (GPT-2: ".attn.bias", ".attn.masked_bias"; LLaMA: ".rotary_emb.inv_freq").
      IgnoredSuffixes: string list
      /// Names of tensors tied to another parameter, skipped when present and not expected
      /// ("lm_head.weight" when the head shares the embedding).
      TiedKeys: string list }

/// Where one expected parameter's data lies in a checkpoint.
type StateDictSource =
    { /// The parameter's name as the model expects it.
      Parameter: string
      /// The header of the file that holds the tensor.
      Header: SafetensorsHeader
      /// The tensor's entry in that header (its stored name may lack the base prefix).
      Entry: SafetensorsEntry }

/// Matches the tensors of safetensors checkpoints (one file or several shards) to a model's
/// parameters, tolerating what real Hugging Face files contain (base-model names without the
/// prefix, attention-mask and rotary buffers, a tied head), without knowing the model family.
/// Every problem is found from the headers before any tensor data is read.
[<RequireQualifiedAccess>]
module StateDict =

    /// How many names an error message lists before "and N more".
    let private listedNames = 5

    let private listNames (names: string list) =
        let shown = names |> List.truncate listedNames |> String.concat ", "
        if names.Length > listedNames then sprintf "%s and %d more" shown (names.Length - listedNames) else shown

    let private formatShape (shape: int64[]) = "[" + String.Join(", ", shape) + "]"

    let private origin (headers: SafetensorsHeader list) =
        headers |> List.map (fun h -> h.Path) |> String.concat ", "

    let private isFloating (dtype: torch.ScalarType) =
        match dtype with
        | torch.ScalarType.Float16
        | torch.ScalarType.BFloat16
        | torch.ScalarType.Float32
        | torch.ScalarType.Float64 -> true
        | _ -> false

    /// Matches the headers' tensors to spec.Expected and returns one source per expected parameter,
    /// in spec.Expected order. A stored name that is not expected but is once prefixed with
    /// spec.BasePrefix maps to the prefixed name; names ending in one of spec.IgnoredSuffixes and
    /// unexpected names in spec.TiedKeys are skipped. Raises InvalidInputException (origin: the file;
    /// location: the stored tensor name) for a parameter stored twice, a tensor the model does not
    /// have, a parameter no file holds (origin: all files) and a shape other than the expected one
    /// ("tensor X has shape [a, b], the config implies [c, d]").
    let resolve (headers: SafetensorsHeader list) (spec: StateDictSpec) : StateDictSource list =
        let expected = Dictionary<string, int64[]>()
        for name, shape in spec.Expected do
            if not (expected.TryAdd(name, shape)) then
                invalidArg "spec" (sprintf "the parameter \"%s\" is expected twice" name)
        let canonical (stored: string) =
            if expected.ContainsKey stored then Some stored
            elif not (stored.StartsWith(spec.BasePrefix, StringComparison.Ordinal))
                 && expected.ContainsKey(spec.BasePrefix + stored) then
                Some(spec.BasePrefix + stored)
            else None
        let ignored (stored: string) =
            spec.IgnoredSuffixes |> List.exists (fun s -> stored.EndsWith(s, StringComparison.Ordinal))
        let tied (stored: string) =
            spec.TiedKeys |> List.exists (fun k -> k = stored || k = spec.BasePrefix + stored)
        let found = Dictionary<string, StateDictSource>()
        let extras = List<SafetensorsHeader * SafetensorsEntry>()
        for header in headers do
            for entry in header.Entries do
                if not (ignored entry.Name) then
                    match canonical entry.Name with
                    | Some parameter ->
                        match found.TryGetValue parameter with
                        | true, earlier ->
                            InvalidInput.fail header.Path entry.Name
                                (sprintf "the parameter %s is stored twice: also as \"%s\" in %s"
                                    parameter earlier.Entry.Name earlier.Header.Path)
                        | _ -> found.Add(parameter, { Parameter = parameter; Header = header; Entry = entry })
                    | None -> if not (tied entry.Name) then extras.Add((header, entry))
        if extras.Count > 0 then
            let header, first = extras[0]
            let inFile = extras |> Seq.filter (fun (h, _) -> h.Path = header.Path) |> Seq.map (fun (_, e) -> e.Name) |> List.ofSeq
            let example = spec.Expected |> List.tryHead |> Option.map fst |> Option.defaultValue "(none)"
            InvalidInput.fail header.Path first.Name
                (sprintf "the checkpoint holds %d tensor(s) the model does not have: %s (the model's names look like \"%s\"); is it a checkpoint of another architecture or size?"
                    inFile.Length (listNames inFile) example)
        let missing = spec.Expected |> List.map fst |> List.filter (found.ContainsKey >> not)
        if not missing.IsEmpty then
            InvalidInput.fail (origin headers) missing.Head
                (sprintf "the checkpoint lacks %d tensor(s) the model needs: %s" missing.Length (listNames missing))
        [ for name, shape in spec.Expected do
              let source = found[name]
              if source.Entry.Shape <> shape then
                  let stored = if source.Entry.Name = name then name else sprintf "%s (%s)" source.Entry.Name name
                  InvalidInput.fail source.Header.Path source.Entry.Name
                      (sprintf "tensor %s has shape %s, the config implies %s"
                          stored (formatShape source.Entry.Shape) (formatShape shape))
              source ]

    /// Loads the sources' tensors as fresh CPU tensors of the given floating-point dtype, keyed by
    /// parameter name; stored floating-point tensors of another width are converted (F16/BF16 to F32
    /// exactly). Raises InvalidInputException before reading any data when a source is stored with a
    /// non-floating dtype (integer or bool) while dtype is floating-point, and after reading one that
    /// holds a NaN or an infinity (naming the file and the tensor).
    let load (sources: StateDictSource list) (dtype: torch.ScalarType) : Map<string, torch.Tensor> =
        TorchRuntime.ensure ()
        for s in sources do
            if isFloating dtype && not (isFloating s.Entry.DType) then
                InvalidInput.fail s.Header.Path s.Entry.Name
                    (sprintf "tensor is stored as %s; a floating-point parameter was expected" (Safetensors.dtypeCode s.Entry.DType))
        let loaded = List<string * torch.Tensor>()
        try
            for s in sources do
                let stored = Safetensors.readEntry s.Header s.Entry
                let tensor =
                    if stored.dtype = dtype then stored
                    else
                        try stored.``to``(dtype) finally stored.Dispose()
                loaded.Add((s.Parameter, tensor))
                if isFloating tensor.dtype then
                    use finite = torch.isfinite tensor
                    use allFinite = finite.all ()
                    if not (allFinite.item<bool> ()) then
                        use nonFinite = finite.logical_not ()
                        use total = nonFinite.sum ()
                        let bad = total.item<int64> ()
                        InvalidInput.fail s.Header.Path s.Entry.Name
                            (sprintf "tensor holds %d NaN or infinite value(s) of %d; a model's weights must be finite (was it saved from a diverged run?)" bad tensor.NumberOfElements)
            Map.ofSeq loaded
        with _ ->
            for _, t in loaded do t.Dispose()
            reraise ()

    /// Reads the headers of the shard files, matches them to spec (see resolve) and loads every
    /// expected parameter as a CPU tensor of dtype, keyed by parameter name.
    let matchShards (paths: string list) (spec: StateDictSpec) (dtype: torch.ScalarType) : Map<string, torch.Tensor> =
        let headers = paths |> List.map Safetensors.readHeader
        load (resolve headers spec) dtype

    /// Reads the header of one safetensors file, matches it to spec (see resolve) and loads every
    /// expected parameter as a CPU tensor of dtype, keyed by parameter name.
    let matchCheckpoint (path: string) (spec: StateDictSpec) (dtype: torch.ScalarType) : Map<string, torch.Tensor> =
        matchShards [ path ] spec dtype

    /// Writes named tensors as a safetensors file the way Hugging Face's save_pretrained does: the
    /// metadata gets "format" = "pt" (which transformers requires when loading). See Safetensors.save.
    let export (path: string) (metadata: Map<string, string>) (tensors: (string * torch.Tensor) seq) : unit =
        Safetensors.save path (metadata |> Map.add "format" "pt") tensors
