namespace Functional.Checkpoint

open System
open System.IO
open System.Text.Json
open TorchSharp
open Functional
open Functional.Models

/// Hugging Face model folders: `config.json` + `model.safetensors` (or shards listed by
/// `model.safetensors.index.json`), with the tensor names save_pretrained of the LM-head model writes.
[<RequireQualifiedAccess>]
module HfModelFolder =

    /// The weight files of a folder: model.safetensors, or the shards its index names.
    let private weightFiles (folder: string) =
        let single = Path.Combine(folder, "model.safetensors")
        let index = Path.Combine(folder, "model.safetensors.index.json")
        if File.Exists single then [ single ]
        elif File.Exists index then
            let root =
                match JsonInput.tryParse (File.ReadAllText index) with
                | Ok root -> root
                | Error e -> InvalidInput.fail index "" (sprintf "not valid JSON (%s)" e.Message)
            match root.TryGetProperty "weight_map" with
            | true, map when map.ValueKind = JsonValueKind.Object ->
                [ for entry in map.EnumerateObject() do
                      if entry.Value.ValueKind <> JsonValueKind.String then
                          InvalidInput.fail index ("weight_map." + entry.Name) "expected a file name"
                      yield Path.Combine(folder, entry.Value.GetString()) ]
                |> List.distinct
            | _ -> InvalidInput.fail index "weight_map" "expected an object mapping tensor names to shard files"
        else
            InvalidInput.fail folder "" "the model folder has no model.safetensors (nor model.safetensors.index.json)"

    /// The state-dict spec of a model: its parameters and the buffers and tied keys files may hold.
    let spec (model: CausalLm) : StateDictSpec =
        { Expected = CausalLm.parameterSpec model
          BasePrefix = model.BasePrefix
          IgnoredSuffixes = model.IgnoredBufferSuffixes
          TiedKeys = model.TiedKeys }

    /// Whether the folder's weight files hold a tensor of that name (from the headers, no data read).
    let private holds (folder: string) (name: string) =
        weightFiles folder |> List.exists (fun f -> (Safetensors.readHeader f).Entries |> List.exists (fun e -> e.Name = name))

    /// Copies the weights of a model folder's model.safetensors (or shards) into the model's parameters,
    /// checking names and shapes first. A sequence classifier over a causal-LM checkpoint (no
    /// score.weight stored) keeps its initialized score and skips the checkpoint's lm_head.weight.
    let loadWeightsInto (folder: string) (model: CausalLm) =
        let spec = spec model
        let spec =
            if (SequenceClassification.tryHead model).IsSome && not (holds folder SequenceClassification.ScoreKey) then
                { spec with Expected = spec.Expected |> List.filter (fun (n, _) -> n <> SequenceClassification.ScoreKey) }
            else spec
        let weights = StateDict.matchShards (weightFiles folder) spec torch.float32
        try
            use _ = torch.no_grad ()
            for struct (name, parameter) in model.Module.named_parameters () do
                match weights.TryFind name with
                | Some w -> parameter.copy_ w |> ignore
                | None -> ()
        finally
            weights |> Map.iter (fun _ t -> t.Dispose())

    /// The floating-point dtype a folder's weights are stored in (from the safetensors headers, no data
    /// read): the one dtype all floating-point tensors share, else (mixed) float32.
    let storedDType (folder: string) : torch.ScalarType =
        let floating =
            [ for file in weightFiles folder do
                  for entry in (Safetensors.readHeader file).Entries do
                      match entry.DType with
                      | torch.ScalarType.Float32 | torch.ScalarType.BFloat16 | torch.ScalarType.Float16 -> yield entry.DType
                      | _ -> () ]
            |> List.distinct
        match floating with
        | [ one ] -> one
        | _ -> torch.float32

    /// loadClassifier, with the config changed by adjust before the model is built (e.g.
    /// ModelFamily.withoutDropout). The weights must fit the adjusted config.
    let loadClassifierWith (adjust: ModelConfig -> ModelConfig) (folder: string) (head: ClassificationHead) (seed: int64) : CausalLm =
        Functional.Runtime.TorchRuntime.ensure ()
        InvalidInput.requireFolder folder "the model folder does not exist" "a model folder (config.json + model.safetensors)"
        let config = ModelConfig.load (Path.Combine(folder, "config.json")) |> adjust
        let files = weightFiles folder
        files |> List.iter (fun f -> InvalidInput.requireFile f "the weight file does not exist" "a safetensors weight file")
        let model = SequenceClassification.create config head seed
        loadWeightsInto folder model
        model

    /// Loads a model folder as a sequence classifier with the given head (SequenceClassification.create,
    /// then the weights: a classification checkpoint's score.weight too, a causal-LM checkpoint's
    /// backbone only). Raises InvalidInputException naming the file and field or tensor at fault.
    let loadClassifier (folder: string) (head: ClassificationHead) (seed: int64) : CausalLm =
        loadClassifierWith id folder head seed

    /// load, with the config changed by adjust before the model is built (e.g.
    /// ModelFamily.withoutDropout). The weights must fit the adjusted config.
    let loadWith (adjust: ModelConfig -> ModelConfig) (folder: string) (seed: int64) : CausalLm =
        Functional.Runtime.TorchRuntime.ensure ()
        InvalidInput.requireFolder folder "the model folder does not exist" "a model folder (config.json + model.safetensors)"
        let configPath = Path.Combine(folder, "config.json")
        let config = ModelConfig.load configPath |> adjust
        let configText = File.ReadAllText configPath
        if SequenceClassification.isClassifierConfig configText then
            loadClassifierWith adjust folder (SequenceClassification.readHead configPath configText) seed
        else
            let files = weightFiles folder
            files |> List.iter (fun f -> InvalidInput.requireFile f "the weight file does not exist" "a safetensors weight file")
            let model = CausalLm.create config seed
            loadWeightsInto folder model
            model

    /// Loads a model folder: parses config.json, checks every tensor's name and shape against the config
    /// (from the safetensors headers, before any data is read), builds the model and copies the weights in
    /// as float32: F16 and BF16 weights are widened exactly (the model's master weights are always
    /// float32; --bf16/--fp16 training computes on a rounded copy). A config.json naming a
    /// *ForSequenceClassification architecture loads as that classifier (SequenceClassification.readHead),
    /// any other as a causal LM. Raises InvalidInputException naming the file and field or tensor at fault.
    let load (folder: string) (seed: int64) : CausalLm = loadWith id folder seed

    /// The config.json text of a model whose weights are stored as dtype: our fields written over the
    /// source config's (so keys we do not model, such as bos_token_id or transformers_version, survive),
    /// a sequence classifier's head fields (SequenceClassification.writeInto), torch_dtype set to dtype's
    /// name ("float32", "bfloat16", "float16"), and so is "dtype" when the source has that key
    /// (transformers 5's spelling).
    let configJsonAs (model: CausalLm) (sourceConfig: string option) (dtype: torch.ScalarType) =
        let ours = ModelConfig.toJson model.Config
        let merged =
            match sourceConfig with
            | None -> Nodes.JsonNode.Parse(ours).AsObject()
            | Some source ->
                let merged = Nodes.JsonNode.Parse(source).AsObject()
                for KeyValue(key, value) in Nodes.JsonNode.Parse(ours).AsObject() do
                    merged[key] <- (if isNull value then null else value.DeepClone())
                merged
        match SequenceClassification.tryHead model with
        | Some head -> SequenceClassification.writeInto model.Config head merged
        | None -> ()
        let name = WeightsFormat.dtypeName dtype
        merged["torch_dtype"] <- Nodes.JsonValue.Create name
        if merged.ContainsKey "dtype" then merged["dtype"] <- Nodes.JsonValue.Create name
        let text = merged.ToJsonString(JsonSerializerOptions(WriteIndented = true))
        if sourceConfig.IsNone then text + "\n" else text

    /// The config.json text of a model with float32 weights (see configJsonAs).
    let configJson (model: CausalLm) (sourceConfig: string option) =
        match sourceConfig, SequenceClassification.tryHead model with
        | None, None -> ModelConfig.toJson model.Config
        | _ -> configJsonAs model sourceConfig torch.float32

    /// Writes the model's weights as model.safetensors with save_pretrained's names (tied head omitted).
    let writeWeights (path: string) (model: CausalLm) =
        let tensors = [ for struct (name, p) in model.Module.named_parameters () -> name, (p :> torch.Tensor) ]
        StateDict.export path (Map [ "format", "pt" ]) tensors

    /// Writes the model's weights into folder as save_pretrained does with torch_dtype and max_shard_size:
    /// every parameter rounded to format.DType (round to nearest even, as torch's .to), split by
    /// WeightsFormat.split in named_parameters order (tied head omitted); one shard is model.safetensors,
    /// several are model-0000i-of-0000N.safetensors plus model.safetensors.index.json (metadata
    /// total_parameters and total_size, the tensor bytes; weight_map from name to file; keys sorted,
    /// indented by 2, as transformers writes it). Returns the files written.
    let writeWeightsAs (folder: string) (model: CausalLm) (format: WeightsFormat) : string list =
        let parameters = [ for struct (name, p) in model.Module.named_parameters () -> name, p ]
        let sizes = [ for name, p in parameters -> name, p.numel () * Safetensors.elementSize format.DType ]
        let shards = WeightsFormat.split format.MaxShardSize sizes
        let byName = dict parameters
        for shard in shards do
            use scope = torch.NewDisposeScope()
            let tensors =
                [ for name in shard.Tensors ->
                      let detached = byName[name].detach ()
                      name, (if detached.dtype = format.DType then detached else detached.to_type format.DType) ]
            StateDict.export (Path.Combine(folder, shard.FileName)) Map.empty tensors
        match shards with
        | [ _ ] -> [ WeightsFormat.singleFileName ]
        | _ ->
            use stream = new MemoryStream()
            do
                use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
                w.WriteStartObject()
                w.WriteStartObject "metadata"
                w.WriteNumber("total_parameters", parameters |> List.sumBy (fun (_, p) -> p.numel ()))
                w.WriteNumber("total_size", sizes |> List.sumBy snd)
                w.WriteEndObject()
                w.WriteStartObject "weight_map"
                let fileOf = dict [ for s in shards do for t in s.Tensors -> t, s.FileName ]
                for name in fileOf.Keys |> Seq.sortWith (fun a b -> String.CompareOrdinal(a, b)) do
                    w.WriteString(name, fileOf[name])
                w.WriteEndObject()
                w.WriteEndObject()
            File.WriteAllText(Path.Combine(folder, WeightsFormat.indexFileName), Text.Encoding.UTF8.GetString(stream.ToArray()) + "\n")
            [ for s in shards -> s.FileName ] @ [ WeightsFormat.indexFileName ]

    /// Writes config.json (configJsonAs, torch_dtype of format.DType), the weights (writeWeightsAs) and
    /// copies of extraFiles (e.g. tokenizer files) to folder. Files go to a staging folder first, which
    /// then replaces folder, so a failure never leaves a half-written model behind nor harms a folder
    /// saved before.
    let saveAs (folder: string) (model: CausalLm) (sourceConfig: string option) (extraFiles: string list) (format: WeightsFormat) =
        let staging = Functional.Runtime.StagedFolder.create folder
        try
            let config =
                if format.DType = torch.float32 then configJson model sourceConfig
                else configJsonAs model sourceConfig format.DType
            File.WriteAllText(Path.Combine(staging, "config.json"), config)
            writeWeightsAs staging model format |> ignore
            for file in extraFiles do
                File.Copy(file, Path.Combine(staging, Path.GetFileName file), true)
            Functional.Runtime.StagedFolder.commit staging folder
        with _ ->
            Functional.Runtime.StagedFolder.discard staging
            reraise ()

    /// saveAs with WeightsFormat.defaults: float32 weights, shards of at most 5 GB (one model.safetensors
    /// for any smaller model).
    let save (folder: string) (model: CausalLm) (sourceConfig: string option) (extraFiles: string list) =
        saveAs folder model sourceConfig extraFiles WeightsFormat.defaults
