namespace Functional.Checkpoint

open System
open System.Globalization
open TorchSharp
open Functional

/// How a model folder's weights are written, as HF's save_pretrained does: the element type of every
/// parameter (config.json's torch_dtype names it) and the largest shard (max_shard_size).
type WeightsFormat =
    { /// float32, bfloat16 or float16.
      DType: torch.ScalarType
      /// The most bytes of tensor data one shard holds (HF's max_shard_size); a tensor larger than this
      /// gets a shard of its own. One shard is written as model.safetensors, several as
      /// model-0000i-of-0000N.safetensors with model.safetensors.index.json.
      MaxShardSize: int64 }

/// One shard of a split: its file name and the tensors it holds, in state-dict order.
type WeightsShard =
    { /// "model.safetensors" for a single shard, else "model-00001-of-00003.safetensors" and so on.
      FileName: string
      /// The names of the tensors in the shard.
      Tensors: string list }

/// Parsing HF's size strings and dtype names, and HF's rule for splitting a state dict into shards.
[<RequireQualifiedAccess>]
module WeightsFormat =

    /// huggingface_hub's MAX_SHARD_SIZE and the save_pretrained default of transformers 4.x: 5 GB
    /// (5 * 10^9 bytes). transformers 5 raised its default to 50 GB.
    let defaultMaxShardSize = 5_000_000_000L

    /// float32 weights in shards of at most 5 GB.
    let defaults = { DType = torch.ScalarType.Float32; MaxShardSize = defaultMaxShardSize }

    /// The file of an unsharded model.
    let singleFileName = "model.safetensors"

    /// The index of a sharded model.
    let indexFileName = "model.safetensors.index.json"

    /// config.json's torch_dtype of a weights dtype: "float32", "bfloat16", "float16".
    let dtypeName (dtype: torch.ScalarType) : string =
        match dtype with
        | torch.ScalarType.Float32 -> "float32"
        | torch.ScalarType.BFloat16 -> "bfloat16"
        | torch.ScalarType.Float16 -> "float16"
        | torch.ScalarType.Float64 -> "float64"
        | other -> invalidArg "dtype" (sprintf "%A is not a weights dtype" other)

    /// The short name of a weights dtype, as the command line spells it: "fp32", "bf16", "fp16".
    let shortName (dtype: torch.ScalarType) : string =
        match dtype with
        | torch.ScalarType.Float32 -> "fp32"
        | torch.ScalarType.BFloat16 -> "bf16"
        | torch.ScalarType.Float16 -> "fp16"
        | other -> dtypeName other

    /// A weights dtype by name: "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16" (case-insensitive).
    /// Raises InvalidInputException naming the setting for anything else.
    let parseDType (setting: string) (text: string) : torch.ScalarType =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "fp32" | "float32" -> torch.ScalarType.Float32
        | "bf16" | "bfloat16" -> torch.ScalarType.BFloat16
        | "fp16" | "float16" -> torch.ScalarType.Float16
        | _ -> InvalidInput.setting setting (sprintf "%s: expected fp32, bf16 or fp16" text)

    /// The units of HF's size strings (transformers' convert_file_size_to_int), longest suffix first:
    /// binary units (KiB, MiB, GiB, TiB) are powers of 2; decimal ones (KB, MB, GB, TB) powers of 10,
    /// and read as bits (divided by 8) when the string ends in a lowercase "b" ("8Gb" = 10^9 bytes).
    let private units =
        [ "TIB", 1099511627776.0, false
          "GIB", 1073741824.0, false
          "MIB", 1048576.0, false
          "KIB", 1024.0, false
          "TB", 1e12, true
          "GB", 1e9, true
          "MB", 1e6, true
          "KB", 1e3, true ]

    /// A size in bytes from HF's spelling: a plain integer of bytes, or a number and a unit ("5GB" =
    /// 5 * 10^9, "2GiB" = 2 * 2^30, "500MB", "100KB", "1.5GB"; "8Gb" is bits, 10^9 bytes), case-insensitive
    /// but for the bits "b". None when the text is no such size or not positive.
    let tryParseSize (text: string) : int64 option =
        let text = if isNull text then "" else text.Trim()
        let number (digits: string) =
            match Double.TryParse(digits, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture) with
            | true, v when Double.IsFinite v -> Some v
            | _ -> None
        let bytes =
            match Int64.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture) with
            | true, n -> Some n
            | _ ->
                let upper = text.ToUpperInvariant()
                units
                |> List.tryFind (fun (suffix, _, _) -> upper.EndsWith(suffix, StringComparison.Ordinal))
                |> Option.bind (fun (suffix, scale, decimalUnit) ->
                    number (text.Substring(0, text.Length - suffix.Length))
                    |> Option.map (fun v ->
                        let size = int64 (Math.Floor(v * scale))
                        if decimalUnit && text.EndsWith("b", StringComparison.Ordinal) then size / 8L else size))
        bytes |> Option.filter (fun n -> n > 0L)

    /// tryParseSize, raising InvalidInputException naming the setting (e.g. max_shard_size, which the
    /// command line shows as its flag) and what was expected ("2XB: expected a size like 5GB, 500MB, 2GiB
    /// or a number of bytes").
    let parseSize (setting: string) (text: string) : int64 =
        match tryParseSize text with
        | Some n -> n
        | None ->
            InvalidInput.setting setting
                (sprintf "%s: expected a positive size like 5GB, 500MB, 100KB, 2GiB or a number of bytes (HF's max_shard_size)" text)

    /// HF's split of a state dict into shards (huggingface_hub's split_state_dict_into_shards): the
    /// tensors (name, bytes) in state-dict order fill a shard until the next one would take it past
    /// maxShardSize, which then starts a new shard; a tensor larger than maxShardSize gets a shard of its
    /// own at once (so it may come before the shard being filled). One shard is "model.safetensors";
    /// N > 1 shards are "model-00001-of-0000N.safetensors", ... in that order.
    let split (maxShardSize: int64) (tensors: (string * int64) list) : WeightsShard list =
        let closed, current, _ =
            tensors
            |> List.fold
                (fun (closed: string list list, current: string list, size: int64) (name, bytes) ->
                    if bytes > maxShardSize then [ name ] :: closed, current, size
                    elif size + bytes > maxShardSize && not current.IsEmpty then (List.rev current) :: closed, [ name ], bytes
                    else closed, name :: current, size + bytes)
                ([], [], 0L)
        let shards = List.rev (if current.IsEmpty then closed else (List.rev current) :: closed)
        match shards with
        | [] -> [ { FileName = singleFileName; Tensors = [] } ]
        | [ only ] -> [ { FileName = singleFileName; Tensors = only } ]
        | _ ->
            let n = shards.Length
            shards |> List.mapi (fun i names -> { FileName = sprintf "model-%05d-of-%05d.safetensors" (i + 1) n; Tensors = names })
