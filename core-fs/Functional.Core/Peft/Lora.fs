namespace Functional.Peft

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open TorchSharp.Modules
open Functional
open Functional.Checkpoint
open Functional.Models
open Functional.Runtime

// LoRA (Hu et al. 2021) as Hugging Face PEFT's LoraLayer computes it, attached from outside the model:
// each chosen projection keeps its weights and module, and a forward hook adds
// scale * B(A(dropout(x))) to its output, with scale = alpha / r. The model code knows nothing of LoRA;
// it only has to invoke its projections through Module.call (the hook-running entry point, PyTorch's
// module(x)) rather than Module.forward. Names, shapes, initialization, merging and the saved files
// follow PEFT (tuners/lora/layer.py, utils/save_and_load.py), so adapters move between the two.

/// Which projections get LoRA adapters and how large they are, as PEFT's LoraConfig and
/// DeepSpeed-Chat's --lora_* options describe them.
type LoraConfig =
    { /// r, the rank of the update B @ A (--lora-dim); at least 1.
      R: int
      /// lora_alpha: the update is scaled by Alpha / R (PEFT's default scaling, not rsLoRA's) (--lora-alpha).
      Alpha: float
      /// lora_dropout: the probability of zeroing an input element of the adapter path, in training mode
      /// only; in [0, 1) (--lora-dropout).
      Dropout: float
      /// PEFT's target_modules: module-name suffixes matched at a dot boundary ("q_proj" chooses
      /// "model.layers.0.self_attn.q_proj"; a full module name chooses that module). Empty: no suffix
      /// condition (--lora-target-modules).
      TargetModules: string list
      /// DeepSpeed-Chat's --lora_module_name: a projection is chosen only when its full module name
      /// contains this text (e.g. "layers." or "h."). None: no such condition (--lora-module-name).
      ModuleNameSubstring: string option }

/// How a projection stores its weight.
type WeightLayout =
    /// torch.nn.Linear: weight (out, in), y = x @ W^T + b.
    | OutByIn
    /// GPT-2's Conv1D: weight (in, out), y = x @ W + b (PEFT's fan_in_fan_out).
    | InByOut

/// One projection with its adapter: the update is B @ A, shaped like a (out, in) Linear weight.
[<NoEquality; NoComparison>]
type LoraAdapter =
    { /// The projection's module name in the model, e.g. "model.layers.0.self_attn.q_proj".
      ModuleName: string
      /// The wrapped projection (a Linear or a Conv1D).
      Target: torch.nn.Module<torch.Tensor, torch.Tensor>
      /// The projection's base weight.
      Weight: Parameter
      /// How Weight is stored.
      Layout: WeightLayout
      /// lora_A, (r, in) fp32.
      A: Parameter
      /// lora_B, (out, r) fp32.
      B: Parameter }

    /// PEFT's state-dict key of lora_A: "base_model.model." + ModuleName + ".lora_A.weight".
    member this.AKey = "base_model.model." + this.ModuleName + ".lora_A.weight"

    /// PEFT's state-dict key of lora_B: "base_model.model." + ModuleName + ".lora_B.weight".
    member this.BKey = "base_model.model." + this.ModuleName + ".lora_B.weight"

/// The adapters attached to a model by Lora.wrap or Lora.load. Dispose removes the hooks, which
/// restores the plain model, and frees the adapter tensors.
[<NoEquality; NoComparison>]
type LoraAdapters =
    { /// The configuration the adapters were made with.
      Config: LoraConfig
      /// Alpha / R.
      Scale: float
      /// One adapter per chosen projection, in the model's named_modules() order.
      Adapters: LoraAdapter list
      /// What adapter_config.json's target_modules says: suffixes (or full module names) that choose
      /// exactly these projections under PEFT's matching rule.
      TargetModuleNames: string list
      /// Removes the forward hooks; calling it again does nothing.
      RemoveHooks: unit -> unit }

    interface IDisposable with
        /// Removes the hooks and frees lora_A and lora_B of every adapter.
        member this.Dispose() =
            this.RemoveHooks()
            for adapter in this.Adapters do
                adapter.A.Dispose()
                adapter.B.Dispose()

/// Attaching, training, saving, loading and merging LoRA adapters.
[<RequireQualifiedAccess>]
module Lora =

    /// The file PEFT's save_pretrained writes the configuration to.
    [<Literal>]
    let ConfigFileName = PeftFolder.ConfigFileName

    /// The file PEFT's save_pretrained writes the adapter tensors to.
    [<Literal>]
    let WeightsFileName = PeftFolder.WeightsFileName

    /// Where a bad setting came from: the command line (option names) or adapter_config.json (fields).
    type private Source =
        | CommandLine
        | ConfigFile of path: string

    /// Raises InvalidInput naming the option on the command line, or the file and field.
    let private fail (source: Source) (option: string) (field: string) (problem: string) : 'T =
        match source with
        | CommandLine -> InvalidInput.failSetting option problem
        | ConfigFile path -> InvalidInput.fail path field problem

    let private check (source: Source) (config: LoraConfig) =
        if config.R < 1 then
            fail source "{lora_dim}" "r" (sprintf "the LoRA rank must be at least 1, found %d" config.R)
        if Double.IsNaN config.Alpha || Double.IsInfinity config.Alpha || config.Alpha <= 0.0 then
            fail source "{lora_alpha}" "lora_alpha" (sprintf "the LoRA alpha must be a positive number, found %g" config.Alpha)
        if Double.IsNaN config.Dropout || config.Dropout < 0.0 || config.Dropout >= 1.0 then
            fail source "{lora_dropout}" "lora_dropout" (sprintf "the LoRA dropout must be in [0, 1), found %g" config.Dropout)
        for target in config.TargetModules do
            if String.IsNullOrWhiteSpace target || target <> target.Trim() then
                fail source "{lora_target_modules}" "target_modules"
                    (sprintf "a target module must be a module name or suffix without spaces, found \"%s\"" target)
        match config.ModuleNameSubstring with
        | Some text when String.IsNullOrWhiteSpace text ->
            fail source "{lora_module_name}" "" "the module name text must not be empty"
        | _ -> ()
        // On the command line neither means the family's default targets (see choose); a saved adapter
        // always names what it adapts.
        if config.TargetModules.IsEmpty && config.ModuleNameSubstring.IsNone && source <> CommandLine then
            fail source "{lora_target_modules}" "target_modules"
                "no projection chosen: give target modules (e.g. q_proj,v_proj or c_attn) or a module name text"

    /// Checks a configuration given on the command line; raises InvalidInputException naming the option
    /// (--lora-dim, --lora-alpha, --lora-dropout, --lora-target-modules, --lora-module-name).
    let validate (config: LoraConfig) : unit = check CommandLine config

    /// Alpha / R, PEFT's scaling.
    let scale (config: LoraConfig) : float = config.Alpha / float config.R

    /// The model's projections LoRA can wrap: (module name, module, weight, layout, in, out), in
    /// named_modules() order.
    let private projections (lm: CausalLm) =
        [ for struct (name, m) in lm.Module.named_modules () do
              match box m with
              | :? Linear as l -> yield name, (l :> torch.nn.Module<torch.Tensor, torch.Tensor>), l.weight, OutByIn, l.in_features, l.out_features
              | :? ITransposedWeight as c -> // GPT-2's Conv1D (Models/Blocks.fs)
                  yield name, (m :?> torch.nn.Module<torch.Tensor, torch.Tensor>), c.Weight, InByOut, c.Weight.shape[0], c.Weight.shape[1]
              | _ -> () ]

    /// PEFT's rule for a list of target_modules: the name equals the target or ends with "." + target.
    let private matchesTarget (name: string) (target: string) = name = target || name.EndsWith("." + target)

    let private lastComponent (name: string) = name.Substring(name.LastIndexOf '.' + 1)

    let private listNames (names: string seq) =
        let names = List.ofSeq names
        let shown = names |> List.truncate 8
        String.Join(", ", shown) + (if names.Length > shown.Length then sprintf ", ... (%d in all)" names.Length else "")

    /// The projections the configuration chooses; raises when a target or the module name text chooses
    /// nothing. Without target modules and module name text, the family's default targets
    /// (FamilyTraits.DefaultLoraTargets, PEFT's mapping: c_attn for GPT-2, q_proj and v_proj for LLaMA).
    let private choose (source: Source) (config: LoraConfig) (lm: CausalLm) =
        let config =
            if config.TargetModules.IsEmpty && config.ModuleNameSubstring.IsNone then
                { config with TargetModules = (ModelFamily.traits lm.Config).DefaultLoraTargets }
            else config
        let all = projections lm
        let names = all |> List.map (fun (name, _, _, _, _, _) -> name)
        for target in config.TargetModules do
            if not (names |> List.exists (fun name -> matchesTarget name target)) then
                fail source "{lora_target_modules}" "target_modules"
                    (sprintf "\"%s\" matches no projection of the model; its projections are %s"
                        target (listNames (names |> List.map lastComponent |> List.distinct)))
        let chosen =
            all
            |> List.filter (fun (name, _, _, _, _, _) ->
                (config.TargetModules.IsEmpty || config.TargetModules |> List.exists (matchesTarget name))
                && (config.ModuleNameSubstring |> Option.forall (fun text -> name.Contains text)))
        if chosen.IsEmpty then
            let text = defaultArg config.ModuleNameSubstring ""
            fail source "{lora_module_name}" ""
                (sprintf "no projection%s has a name containing \"%s\"; the model's projections are %s"
                    (if config.TargetModules.IsEmpty then "" else " among the target modules") text (listNames names))
        chosen, names

    /// target_modules for adapter_config.json: the chosen names' last components when they choose
    /// exactly the same projections, else the full module names.
    let private targetModuleNames (chosen: string list) (all: string list) =
        let suffixes = chosen |> List.map lastComponent |> List.distinct
        let bySuffix = all |> List.filter (fun name -> suffixes |> List.exists (matchesTarget name))
        if bySuffix = chosen then suffixes else chosen

    /// The forward hook: output + scale * B(A(dropout(x))), computed in the adapters' dtype and cast to
    /// the output's; dropout only in training mode, drawn from the global generator.
    let private hook (scale: float) (dropout: float) (a: Parameter) (b: Parameter) =
        Func<torch.nn.Module<torch.Tensor, torch.Tensor>, torch.Tensor, torch.Tensor, torch.Tensor>(fun target input output ->
            use scope = torch.NewDisposeScope()
            let x = input.to_type a.dtype // (..., in)
            let x = if target.training && dropout > 0.0 then torch.nn.functional.dropout(x, dropout, true) else x
            let update = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scale // (..., out)
            scope.MoveToOuter(output + update.to_type output.dtype))

    /// Attaches fresh adapters (A drawn from a generator seeded with seed, B zero) to the chosen projections.
    let private attach (source: Source) (config: LoraConfig) (lm: CausalLm) (seed: int64) =
        TorchRuntime.ensure ()
        check source config
        let chosen, all = choose source config lm
        let r = int64 config.R
        let s = scale config
        use generator = new torch.Generator(uint64 seed)
        let parameter (values: torch.Tensor) (device: torch.Device) =
            let p = torch.nn.Parameter(values.``to`` device)
            p.DetachFromDisposeScope() |> ignore
            p
        let adapters =
            [ for name, target, weight, layout, inFeatures, outFeatures in chosen ->
                  use scope = torch.NewDisposeScope()
                  // nn.Linear's reset_parameters for A: kaiming_uniform_(a = sqrt(5)), whose bound
                  // gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5)) is 1 / sqrt(in).
                  let bound = 1.0 / Math.Sqrt(float inFeatures)
                  let a = torch.empty(r, inFeatures, dtype = torch.float32).uniform_(-bound, bound, generator) // (r, in)
                  let b = torch.zeros(outFeatures, r, dtype = torch.float32) // (out, r)
                  { ModuleName = name
                    Target = target
                    Weight = weight
                    Layout = layout
                    A = parameter a weight.device
                    B = parameter b weight.device } ]
        let removers =
            [ for adapter in adapters ->
                  adapter.Target.register_forward_hook(hook s config.Dropout adapter.A adapter.B) ]
        { Config = config
          Scale = s
          Adapters = adapters
          TargetModuleNames = targetModuleNames (chosen |> List.map (fun (name, _, _, _, _, _) -> name)) all
          RemoveHooks = fun () -> for remover in removers do remover.remove () }

    /// Attaches LoRA adapters to the projections the configuration chooses (Linear modules and GPT-2's
    /// Conv1D): a projection is chosen when its module name matches one of TargetModules (if any) and
    /// contains ModuleNameSubstring (if given); with neither, the family's default targets are chosen. Each gets lora_A (r, in) drawn as PEFT does (nn.Linear's
    /// kaiming_uniform_ with a = sqrt(5), i.e. uniform in +-1/sqrt(in)) from a generator seeded with seed,
    /// and lora_B (out, r) zero, both fp32 on the weight's device, so the model's outputs are unchanged
    /// until B trains. From then on every call of the projection (forward, no_grad, the key/value-cache
    /// path) returns base(x) + (Alpha / R) * B(A(dropout(x))), dropout in training mode only. The
    /// adapters are not registered in the model: its parameters, state dict and HF folder stay the base
    /// model's. Raises InvalidInputException naming the option for a bad configuration, a target that
    /// matches no projection (listing the model's projection names) or a selection that chooses nothing.
    let wrap (config: LoraConfig) (lm: CausalLm) (seed: int64) : LoraAdapters = attach CommandLine config lm seed

    /// Attaches a copy of the adapters to another model of the same architecture, such as the bf16/fp16
    /// compute copy of mixed-precision training: each adapter goes to the projection of the same module
    /// name in lm, with lora_A and lora_B converted (rounded) to that projection's weight dtype and device,
    /// as fresh parameters that require gradients, and the same rank, alpha and dropout. The copy's hook
    /// then runs the adapter path (dropout, both matmuls and the Alpha / R scaling) in that dtype, as PEFT
    /// does under autocast, drawing dropout from the global generator as the original does. The original
    /// adapters are left as they are; disposing the result removes only the copy's hooks and tensors.
    /// Raises ArgumentException when lm has no projection of an adapter's name.
    let copyTo (adapters: LoraAdapters) (lm: CausalLm) : LoraAdapters =
        TorchRuntime.ensure ()
        let targets = dict [ for name, target, weight, layout, _, _ in projections lm -> name, (target, weight, layout) ]
        let copied =
            [ for adapter in adapters.Adapters ->
                  match targets.TryGetValue adapter.ModuleName with
                  | true, (target, weight, layout) ->
                      let parameter (source: Parameter) =
                          use _ = torch.no_grad ()
                          use values = source.detach().``to``(weight.dtype, weight.device)
                          let p = torch.nn.Parameter(values.clone ())
                          p.DetachFromDisposeScope() |> ignore
                          p
                      { adapter with Target = target; Weight = weight; Layout = layout; A = parameter adapter.A; B = parameter adapter.B }
                  | _ -> invalidArg (nameof lm) (sprintf "the model has no projection named '%s' to attach its adapter to" adapter.ModuleName) ]
        let removers =
            [ for adapter in copied ->
                  adapter.Target.register_forward_hook(hook adapters.Scale adapters.Config.Dropout adapter.A adapter.B) ]
        { adapters with
            Adapters = copied
            RemoveHooks = fun () -> for remover in removers do remover.remove () }

    /// Stops every base-model parameter from requiring gradients (the adapters' own parameters, which
    /// the model does not hold, keep theirs), as PEFT's mark_only_lora_as_trainable with bias "none".
    let freezeBase (lm: CausalLm) : unit =
        for p in lm.Module.parameters () do
            p.requires_grad <- false

    /// The trainable adapter parameters under PEFT's names, per adapter lora_A then lora_B, adapters in
    /// the model's named_modules() order, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".
    let parameters (adapters: LoraAdapters) : (string * Parameter) list =
        [ for adapter in adapters.Adapters do
              yield adapter.AKey, adapter.A
              yield adapter.BKey, adapter.B ]

    /// PEFT's key of a sequence classifier's score, a module it saves whole (modules_to_save ["score"]):
    /// get_peft_model_state_dict drops the wrapper's "modules_to_save.<adapter>." part.
    [<Literal>]
    let ScoreKey = "base_model.model.score.weight"

    /// The score weight of a sequence classifier (trained whole beside the adapters, PEFT's SEQ_CLS); None
    /// for a causal LM.
    let scoreOf (lm: CausalLm) : Parameter option =
        match box lm.Module with
        | :? SequenceClassifierHead as c -> Some c.Score.weight
        | _ -> None

    /// adapter_config.json as PEFT's LoraConfig.to_dict writes it for a causal LM, or (classifier) for
    /// sequence classification: task_type "SEQ_CLS", modules_to_save ["score"].
    let private configJsonFor (classifier: bool) (adapters: LoraAdapters) (baseModelNameOrPath: string option) =
        let config = adapters.Config
        let json = JsonObject()
        json["alpha_pattern"] <- JsonObject()
        json["auto_mapping"] <- null
        json["base_model_name_or_path"] <- (match baseModelNameOrPath with Some path -> JsonValue.Create path :> JsonNode | None -> null)
        json["bias"] <- JsonValue.Create "none"
        json["fan_in_fan_out"] <- JsonValue.Create(adapters.Adapters |> List.exists (fun a -> a.Layout = InByOut))
        json["inference_mode"] <- JsonValue.Create false
        json["init_lora_weights"] <- JsonValue.Create true
        json["layers_pattern"] <- null
        json["layers_to_transform"] <- null
        json["lora_alpha"] <- JsonValue.Create config.Alpha
        json["lora_dropout"] <- JsonValue.Create config.Dropout
        json["modules_to_save"] <- (if classifier then JsonArray(JsonValue.Create "score") :> JsonNode else null)
        json["peft_type"] <- JsonValue.Create "LORA"
        json["r"] <- JsonValue.Create config.R
        json["rank_pattern"] <- JsonObject()
        json["revision"] <- null
        json["target_modules"] <- JsonArray([| for name in adapters.TargetModuleNames -> JsonValue.Create name :> JsonNode |])
        json["task_type"] <- JsonValue.Create(if classifier then "SEQ_CLS" else "CAUSAL_LM")
        json["use_dora"] <- JsonValue.Create false
        json["use_rslora"] <- JsonValue.Create false
        json.ToJsonString(JsonSerializerOptions(WriteIndented = true))

    /// Writes the adapters in PEFT's save_pretrained format to folder (created when missing; other files
    /// there are left alone): adapter_config.json (peft_type "LORA", task_type "CAUSAL_LM", r,
    /// lora_alpha, lora_dropout, target_modules, fan_in_fan_out true for GPT-2's Conv1D, bias "none",
    /// base_model_name_or_path when given) and adapter_model.safetensors (PEFT's keys, fp32). Each file
    /// is written under a temporary name and renamed into place.
    let save (folder: string) (baseModelNameOrPath: string option) (adapters: LoraAdapters) : unit =
        let tensors = [ for name, p in parameters adapters -> name, (p :> torch.Tensor) ]
        PeftFolder.write folder (configJsonFor false adapters baseModelNameOrPath) tensors

    /// save for the adapters on lm: a sequence classifier's folder is PEFT's SEQ_CLS adapter (task_type
    /// "SEQ_CLS", modules_to_save ["score"], the score weight under ScoreKey beside the adapters).
    let saveFor (lm: CausalLm) (folder: string) (baseModelNameOrPath: string option) (adapters: LoraAdapters) : unit =
        match scoreOf lm with
        | None -> save folder baseModelNameOrPath adapters
        | Some score ->
            let tensors = [ for name, p in parameters adapters -> name, (p :> torch.Tensor) ] @ [ ScoreKey, (score :> torch.Tensor) ]
            PeftFolder.write folder (configJsonFor true adapters baseModelNameOrPath) tensors

    /// Reads a LoRA configuration from folder's adapter_config.json (PEFT's format). Raises
    /// InvalidInputException naming the file and field for a missing file, malformed JSON, a missing or
    /// mistyped field, a PEFT type other than LORA, or a PEFT feature these adapters do not implement
    /// (bias other than "none", rsLoRA, DoRA, rank or alpha patterns, modules_to_save,
    /// layers_to_transform, a regular-expression target_modules).
    let loadConfig (folder: string) : LoraConfig =
        let path, root = PeftFolder.readConfig folder
        let field = JsonInput.field root
        let required = JsonInput.required path root
        let number name =
            let value = required name
            if value.ValueKind <> JsonValueKind.Number then
                InvalidInput.fail path name (sprintf "expected a number, found %s" (JsonInput.describe value.ValueKind))
            value.GetDouble()
        let absentOr name (allowed: JsonElement -> bool) (problem: string) =
            match field name with
            | Some value when value.ValueKind <> JsonValueKind.Null && not (allowed value) -> InvalidInput.fail path name problem
            | _ -> ()
        let peftType = required "peft_type"
        if peftType.ValueKind <> JsonValueKind.String || peftType.GetString() <> "LORA" then
            InvalidInput.fail path "peft_type" (sprintf "expected \"LORA\", found %s" (peftType.GetRawText()))
        let rank =
            let r = required "r"
            let integer = if r.ValueKind = JsonValueKind.Number then r.TryGetInt32() else (false, 0)
            match integer with
            | true, value -> value
            | _ -> InvalidInput.fail path "r" (sprintf "expected an integer, found %s" (r.GetRawText()))
        let alpha = number "lora_alpha"
        let dropout = match field "lora_dropout" with Some _ -> number "lora_dropout" | None -> 0.0
        let targets = required "target_modules"
        let targetModules =
            match targets.ValueKind with
            | JsonValueKind.Array ->
                [ for t in targets.EnumerateArray() ->
                      if t.ValueKind <> JsonValueKind.String then
                          InvalidInput.fail path "target_modules" (sprintf "expected module names, found %s" (t.GetRawText()))
                      t.GetString() ]
            | JsonValueKind.String ->
                InvalidInput.fail path "target_modules"
                    (sprintf "a regular expression (%s) is not supported; list the module names" (targets.GetRawText()))
            | kind -> InvalidInput.fail path "target_modules" (sprintf "expected a list of module names, found %s" (JsonInput.describe kind))
        absentOr "bias" (fun v -> v.ValueKind = JsonValueKind.String && v.GetString() = "none") "only bias \"none\" is supported"
        absentOr "use_rslora" (fun v -> v.ValueKind = JsonValueKind.False) "rsLoRA scaling is not supported"
        absentOr "use_dora" (fun v -> v.ValueKind = JsonValueKind.False) "DoRA is not supported"
        absentOr "rank_pattern" (fun v -> v.ValueKind = JsonValueKind.Object && Seq.isEmpty (v.EnumerateObject())) "per-module ranks are not supported"
        absentOr "alpha_pattern" (fun v -> v.ValueKind = JsonValueKind.Object && Seq.isEmpty (v.EnumerateObject())) "per-module alphas are not supported"
        absentOr "modules_to_save"
            (fun v -> v.ValueKind = JsonValueKind.Array && (v.GetArrayLength() = 0 || (v.GetArrayLength() = 1 && v[0].ValueKind = JsonValueKind.String && v[0].GetString() = "score")))
            "modules_to_save is supported only as [\"score\"] (a sequence classifier's head, PEFT's SEQ_CLS)"
        absentOr "layers_to_transform" (fun _ -> false) "layers_to_transform is not supported"
        let config =
            { R = rank
              Alpha = alpha
              Dropout = dropout
              TargetModules = targetModules
              ModuleNameSubstring = None }
        check (ConfigFile path) config
        config

    /// Attaches the adapters saved in folder (PEFT's adapter_config.json and adapter_model.safetensors)
    /// to the model, as wrap with the file's configuration, and copies the saved lora_A and lora_B values
    /// (any floating dtype, converted to fp32). Raises InvalidInputException naming the file and field or
    /// tensor for a bad configuration, a target that matches no projection, a missing file, a missing,
    /// extra or misshapen tensor.
    let load (folder: string) (lm: CausalLm) : LoraAdapters =
        let config = loadConfig folder
        let adapters = attach (ConfigFile(Path.Combine(folder, ConfigFileName))) config lm 0L
        try
            let path = Path.Combine(folder, WeightsFileName)
            if not (File.Exists path) then InvalidInput.fail path "" "the adapter weights file does not exist"
            let stored = Safetensors.load path
            try
                let expected = parameters adapters @ (scoreOf lm |> Option.map (fun p -> ScoreKey, p) |> Option.toList)
                let expectedNames = expected |> List.map fst |> Set.ofList
                for KeyValue(name, _) in stored do
                    if not (expectedNames.Contains name) then
                        InvalidInput.fail path name "the tensor is not an adapter of the projections adapter_config.json chooses"
                use _ = torch.no_grad ()
                for name, p in expected do
                    match stored.TryFind name with
                    | None -> InvalidInput.fail path name (sprintf "the tensor is missing (expected shape %A)" p.shape)
                    | Some t when t.shape <> p.shape ->
                        InvalidInput.fail path name (sprintf "expected shape %A, found %A" p.shape t.shape)
                    | Some t when not (t.is_floating_point ()) ->
                        InvalidInput.fail path name (sprintf "expected a floating-point tensor, found %A" t.dtype)
                    | Some t -> p.copy_ t |> ignore
            finally
                for KeyValue(_, t) in stored do t.Dispose()
            adapters
        with _ ->
            (adapters :> IDisposable).Dispose()
            reraise ()

    /// Folds every adapter into its base weight, as PEFT's merge_and_unload and DeepSpeed-Chat's
    /// convert_lora_to_linear_layer: Linear W += scale * B @ A, Conv1D W += scale * (B @ A)^T, in the
    /// weight's dtype; then removes the hooks and frees the adapters (see Dispose). The model then
    /// computes what the adapted model did, and saves with HfModelFolder.save as a plain HF model.
    let merge (adapters: LoraAdapters) : unit =
        do
            use _ = torch.no_grad ()
            for adapter in adapters.Adapters do
                use scope = torch.NewDisposeScope()
                let delta = adapter.B.matmul(adapter.A) * adapters.Scale // (out, in)
                let delta = match adapter.Layout with OutByIn -> delta | InByOut -> delta.t () // as the weight
                adapter.Weight.add_(delta.to_type adapter.Weight.dtype) |> ignore
        (adapters :> IDisposable).Dispose()

    /// The adapters' signature text: rank, alpha, dropout, targets, whether the base is frozen and the
    /// adapters' learning rate (the run's when None).
    let signature (adapters: LoraAdapters) (onlyOptimizeLora: bool) (learningRate: float) : string =
        let c = adapters.Config
        Adapter.signatureText
            [ "r", string c.R
              "lora_alpha", Adapter.number c.Alpha
              "lora_dropout", Adapter.number c.Dropout
              "target_modules", String.Join(",", c.TargetModules)
              "module_name_substring", defaultArg c.ModuleNameSubstring ""
              "only_optimize_lora", (if onlyOptimizeLora then "true" else "false")
              "learning_rate", Adapter.number learningRate ]

    /// The adapters as a job's Adapter: the model keeps its modules (the adapters hook into them),
    /// onlyOptimizeLora freezes the base, learningRate is the adapters' own (None: the run's, runLearningRate,
    /// which the signature records then). AttachToCompute copies the adapters onto the compute copy in
    /// its dtype (copyTo), so the adapter path runs in the low precision.
    /// On a sequence classifier the score trains whole beside the adapters (PEFT's modules_to_save
    /// ["score"]), under ScoreKey, and the folder is PEFT's SEQ_CLS adapter (saveFor).
    let asAdapter (adapters: LoraAdapters) (lm: CausalLm) (onlyOptimizeLora: bool) (learningRate: float option) (runLearningRate: float) : Adapter =
        let score (model: CausalLm) = scoreOf model |> Option.map (fun p -> ScoreKey, p) |> Option.toList
        let trained = parameters adapters @ score lm
        { Kind = "LORA"
          Model = lm
          Parameters = trained
          FreezesBase = onlyOptimizeLora
          LearningRate = learningRate
          Signature = signature adapters onlyOptimizeLora (defaultArg learningRate runLearningRate)
          Save = fun folder baseModel -> saveFor lm folder baseModel adapters
          Load = fun folder -> PeftFolder.loadValues folder trained
          AttachToCompute =
            fun copy ->
                let copied = copyTo adapters copy
                { Model = copy
                  Parameters = parameters copied @ score copy
                  Release = fun () -> (copied :> IDisposable).Dispose() } }
