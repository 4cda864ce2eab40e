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

    /// Loads a model folder as a sequence classifier with the given head (SequenceClassification.create,
    /// then the weights: a classification checkpoint's score.weight too, a causal-LM checkpoint's
    /// backbone only). Raises InvalidInputException naming the file and field or tensor at fault.
    let loadClassifier (folder: string) (head: ClassificationHead) (seed: int64) : CausalLm =
        Functional.Runtime.TorchRuntime.ensure ()
        InvalidInput.requireFolder folder "the model folder does not exist" "a model folder (config.json + model.safetensors)"
        let config = ModelConfig.load (Path.Combine(folder, "config.json"))
        let files = weightFiles folder
        files |> List.iter (fun f -> InvalidInput.requireFile f "the weight file does not exist" "a safetensors weight file")
        let model = SequenceClassification.create config head seed
        loadWeightsInto folder model
        model

    /// Loads a model folder: parses config.json, checks every tensor's name and shape against the config
    /// (from the safetensors headers, before any data is read), builds the model and copies the weights in
    /// as float32. A config.json naming a *ForSequenceClassification architecture loads as that
    /// classifier (SequenceClassification.readHead), any other as a causal LM. Raises
    /// InvalidInputException naming the file and field or tensor at fault.
    let load (folder: string) (seed: int64) : CausalLm =
        Functional.Runtime.TorchRuntime.ensure ()
        InvalidInput.requireFolder folder "the model folder does not exist" "a model folder (config.json + model.safetensors)"
        let configPath = Path.Combine(folder, "config.json")
        let config = ModelConfig.load configPath
        let configText = File.ReadAllText configPath
        if SequenceClassification.isClassifierConfig configText then
            loadClassifier folder (SequenceClassification.readHead configPath configText) seed
        else
            let files = weightFiles folder
            files |> List.iter (fun f -> InvalidInput.requireFile f "the weight file does not exist" "a safetensors weight file")
            let model = CausalLm.create config seed
            loadWeightsInto folder model
            model

    /// The config.json text of a model: our fields written over the source config's (so keys we do
    /// not model, such as bos_token_id or transformers_version, survive a fine-tuning run); a sequence
    /// classifier's head fields last (SequenceClassification.writeInto).
    let configJson (model: CausalLm) (sourceConfig: string option) =
        let ours = ModelConfig.toJson model.Config
        match sourceConfig with
        | None when (SequenceClassification.tryHead model).IsNone -> ours
        | None ->
            let json = Nodes.JsonNode.Parse(ours).AsObject()
            SequenceClassification.writeInto model.Config (SequenceClassification.tryHead model).Value json
            json.ToJsonString(JsonSerializerOptions(WriteIndented = true))
        | Some source ->
            let merged = Nodes.JsonNode.Parse(source).AsObject()
            for KeyValue(key, value) in Nodes.JsonNode.Parse(ours).AsObject() do
                merged[key] <- (if isNull value then null else value.DeepClone())
            match SequenceClassification.tryHead model with
            | Some head -> SequenceClassification.writeInto model.Config head merged
            | None -> ()
            merged.ToJsonString(JsonSerializerOptions(WriteIndented = true))

    /// Writes the model's weights as model.safetensors with save_pretrained's names (tied head omitted).
    let writeWeights (path: string) (model: CausalLm) =
        let tensors = [ for struct (name, p) in model.Module.named_parameters () -> name, (p :> torch.Tensor) ]
        StateDict.export path (Map [ "format", "pt" ]) tensors

    /// Writes config.json (see configJson), model.safetensors (save_pretrained's names, tied head
    /// omitted) and copies of extraFiles (e.g. tokenizer files) to folder. Files go to a staging folder
    /// first, which then replaces folder, so a failure never leaves a half-written model behind.
    let save (folder: string) (model: CausalLm) (sourceConfig: string option) (extraFiles: string list) =
        let staging = Functional.Runtime.StagedFolder.create folder
        try
            File.WriteAllText(Path.Combine(staging, "config.json"), configJson model sourceConfig)
            writeWeights (Path.Combine(staging, "model.safetensors")) model
            for file in extraFiles do
                File.Copy(file, Path.Combine(staging, Path.GetFileName file), true)
            Functional.Runtime.StagedFolder.commit staging folder
        with _ ->
            Functional.Runtime.StagedFolder.discard staging
            reraise ()
