namespace Functional.Peft

open System.IO
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Checkpoint
open Functional.Runtime

/// The files of a PEFT adapter folder (save_pretrained's layout), shared by every adapter kind: their
/// names, the atomic write of both, and copying saved values back into live parameters.
[<RequireQualifiedAccess>]
module PeftFolder =

    /// The file PEFT's save_pretrained writes the configuration to.
    [<Literal>]
    let ConfigFileName = "adapter_config.json"

    /// The file PEFT's save_pretrained writes the adapter tensors to.
    [<Literal>]
    let WeightsFileName = "adapter_model.safetensors"

    /// Writes configJson to folder/adapter_config.json and tensors to folder/adapter_model.safetensors
    /// (folder created when missing; other files there are left alone). Each file is written under a
    /// temporary name and renamed into place.
    let write (folder: string) (configJson: string) (tensors: (string * torch.Tensor) list) : unit =
        TorchRuntime.ensure ()
        Directory.CreateDirectory folder |> ignore
        let configPath = Path.Combine(folder, ConfigFileName)
        let temporary = configPath + ".tmp"
        File.WriteAllText(temporary, configJson)
        File.Move(temporary, configPath, true)
        StateDict.export (Path.Combine(folder, WeightsFileName)) Map.empty tensors

    /// folder's adapter_config.json: its path and root object. Raises InvalidInputException naming the file
    /// when it is missing, not JSON or not an object.
    let readConfig (folder: string) : string * System.Text.Json.JsonElement =
        let path = Path.Combine(folder, ConfigFileName)
        path, JsonInput.readObject path "the adapter configuration file does not exist"

    /// Copies folder/adapter_model.safetensors into the parameters of the same names (a checkpoint's or
    /// the best checkpoint's adapter values, written by this run). Raises InvalidInputException naming the
    /// file and tensor when a parameter is missing from it.
    let loadValues (folder: string) (parameters: (string * Parameter) list) : unit =
        let file = Path.Combine(folder, WeightsFileName)
        let saved = Safetensors.load file
        try
            use _ = torch.no_grad ()
            for name, p in parameters do
                match saved.TryFind name with
                | Some t -> p.copy_ t |> ignore
                | None -> InvalidInput.fail file name "missing from the checkpoint's adapter"
        finally
            saved |> Map.iter (fun _ t -> t.Dispose())
