namespace Functional.Training

open System
open System.IO
open Functional
open Functional.Data
open Functional.Generation
open Functional.Models
open Functional.Text

/// What Job.prepare checks before anything is written, and the exact-match score it evaluates with.
// Not qualified-access: Job opens it.
module internal JobChecks =

    /// The files that hold a model folder's tokenizer.
    let internal tokenizerFiles =
        [ "tokenizer.json"; "vocab.json"; "merges.txt"; "tokenizer.model"; "tokenizer_config.json"
          "special_tokens_map.json"; "generation_config.json"; "chat_template.jinja" ]

    let internal hasTokenizer (folder: string) =
        [ "tokenizer.json"; "vocab.json"; "tokenizer.model" ] |> List.exists (fun f -> File.Exists(Path.Combine(folder, f)))

    /// The tokenizer of a job: a named encoding, the model folder's files, or none (pre-tokenized data only:
    /// encoding text then raises an error that says what is missing).
    let internal tokenizerFor (request: FineTuneRequest) : TextTokenizer =
        match request.Data.TokenizerName with
        | Some name -> Tokenizers.fromEncoding name
        | None when hasTokenizer request.ModelPath -> Tokenizers.fromFolder request.ModelPath
        | None ->
            TextTokenizer.absent request.DataPath
                (sprintf "the data holds text, but the model folder %s has no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model): pass {tokenizer} NAME or pre-tokenized {\"input_ids\": [...]} rows" request.ModelPath)

    /// The name of checkWritable's probe files starts so.
    let private probePrefix = ".write-probe-"

    /// Creates the folder when missing, writes and deletes a probe file, then removes what it created, so
    /// that a read-only file system, a missing permission or a full disk stops the run before training,
    /// naming the folder and the reason. A folder already there is left as it was.
    /// Safe when several processes check the same folder at once (the ranks of an mpirun): each writes its
    /// own probe, and a folder another process removed between this one's mkdir and its probe is made again
    /// (a folder may then stay behind, empty, as the run itself would have made it).
    let internal checkWritable (path: string) =
        let rec missingAncestors (folder: string) =
            if String.IsNullOrEmpty folder || Directory.Exists folder || File.Exists folder then []
            else folder :: missingAncestors (Path.GetDirectoryName folder)
        let created = missingAncestors (Path.GetFullPath path)
        match created |> List.tryLast |> Option.map Path.GetDirectoryName with
        | Some parent when File.Exists parent ->
            InvalidInput.fail path "" (sprintf "the folder cannot be created: %s is a file" parent)
        | _ -> ()
        let probe = Path.Combine(path, sprintf "%s%d-%s" probePrefix Environment.ProcessId (Guid.NewGuid().ToString "N"))
        // A folder that another process checking it too removes between this one's mkdir (of the folder or
        // of a parent) and the probe is made again: any I/O error is retried (100 times, 1 ms apart), so a
        // concurrent removal passes while a lasting cause (a read-only or full file system, a missing
        // permission) is reported. mkdir answers ENOENT every time where the file system takes no new
        // folders (/proc, /sys).
        let rec createAndProbe attempt =
            let outcome =
                try
                    try
                        Directory.CreateDirectory path |> ignore
                    with
                    | :? FileNotFoundException
                    | :? DirectoryNotFoundException when attempt >= 100 ->
                        InvalidInput.fail path "" "the folder cannot be created there: the file system takes no new folders"
                    File.WriteAllBytes(probe, Array.zeroCreate 4096)
                    File.Delete probe
                    None
                with
                | :? IOException
                | :? UnauthorizedAccessException as e when attempt < 100 -> Some e
            match outcome with
            | None -> ()
            | Some _ ->
                Threading.Thread.Sleep 1
                createAndProbe (attempt + 1)
        try
            try
                createAndProbe 1
            with
            | :? IOException
            | :? UnauthorizedAccessException as e ->
                InvalidInput.fail path "" (sprintf "the folder is not writable: %s" (e.Message.ReplaceLineEndings " "))
        finally
            if File.Exists probe then (try File.Delete probe with _ -> ())
            for folder in created do
                if Directory.Exists folder then (try Directory.Delete folder with _ -> ())

    let internal checkOutputFolder (request: FineTuneRequest) =
        let path = request.OutputPath
        if File.Exists path then InvalidInput.fail path "" "the output path is a file (expected a folder)"
        // Another process of the run may be probing the folder at this moment: its probe is not content, and
        // the folder it made may vanish while this one looks.
        let content () =
            try
                Directory.EnumerateFileSystemEntries path |> Seq.exists (fun entry -> not (Path.GetFileName(entry).StartsWith probePrefix))
            with :? DirectoryNotFoundException -> false
        if Directory.Exists path && content () && not request.OverwriteOutputDir then
            InvalidInput.fail path "" "the output folder already exists and is not empty; pass {overwrite_output_dir} to write into it"
        checkWritable path

    /// Exact-match accuracy of greedy answers to the first `count` samples: the generated text, trimmed,
    /// equals the reference answer, trimmed.
    let exactMatch (model: CausalLm) (tokenizer: TextTokenizer) (samples: Sample[]) (count: int) (maxNewTokens: int) =
        // A prompt longer than the model's context cannot be answered: it is left out of the score
        // (generating would refuse it, after training, before final/ is written).
        let limit = Generator.positionLimit model
        let fits (s: Sample) = (Generator.encodePrompts tokenizer [ s.Prompt ] |> Array.head).Length <= limit
        let scored = samples |> Array.truncate count |> Array.filter (fun s -> s.Prompt <> "" && fits s)
        if scored.Length = 0 then None
        else
            let options =
                { GenerationOptions.defaults with
                    MaxNewTokens = maxNewTokens
                    EosId = tokenizer.Special.Eos
                    PadId = tokenizer.Special.Pad |> Option.defaultValue 0L }
            let answers =
                scored
                |> Array.chunkBySize 32
                |> Array.collect (fun chunk ->
                    Generator.generateText model tokenizer [ for s in chunk -> s.Prompt ] options |> Array.ofList)
            let correct = Array.map2 (fun (s: Sample) (a: string) -> a.Trim() = s.Answer.Trim()) scored answers |> Array.filter id
            Some(float correct.Length / float scored.Length)

    /// The metrics a checkpoint can be ranked by.
    let internal rankable = [ "eval_loss"; "eval_perplexity" ]

    /// The metric name with HF's "eval_" prefix.
    let internal metricName (options: TrainOptions) =
        let name = options.MetricForBestModel.Trim()
        if name.StartsWith "eval_" then name else "eval_" + name

    let internal checkSettings (request: FineTuneRequest) (hasEvalSet: bool) =
        let o = request.Options
        let needsEval = o.LoadBestModelAtEnd || o.EarlyStoppingPatience > 0 || TrainOptions.evalStrategy o <> IntervalStrategy.No
        if needsEval && not hasEvalSet then
            let option =
                if o.LoadBestModelAtEnd then "{load_best_model_at_end}"
                elif o.EarlyStoppingPatience > 0 then "{early_stopping_patience}"
                else "{eval_strategy}"
            InvalidInput.failSetting option "needs an evaluation set ({eval_data} or {eval_split_ratio})"
        if not (List.contains (metricName o) rankable) then
            InvalidInput.setting "metric_for_best_model"
                (sprintf "unknown metric %s (expected eval_loss or eval_perplexity)" o.MetricForBestModel)

    /// Refuses prefix tuning together with what it does not work with, naming both options.
    let internal checkPrefixCombinations (request: FineTuneRequest) =
        if request.Prefix.IsSome then
            if request.Lora.IsSome then
                InvalidInput.setting "prefix_tuning" "cannot be combined with LoRA ({lora_dim} / {lora_adapter}): train one adapter at a time"
            let precision = MixedPrecision.flag request.Options.Precision
            if precision <> "" then
                InvalidInput.failSetting precision
                    "cannot be combined with {prefix_tuning}: mixed precision trains every parameter of the model, the prefix trains alone"
            if request.GradientCheckpointing then
                InvalidInput.setting "gradient_checkpointing"
                    "cannot be combined with {prefix_tuning}: the prefix runs through the key/value-cache path, which does not recompute blocks"
            let prompt = request.Data.Prompt
            if prompt.Packing && prompt.PackingAttention = Data.PackingAttention.Isolated then
                InvalidInput.setting "packing_attention"
                    "isolated cannot be combined with {prefix_tuning}: the prefix is every sample's past, which packed samples cannot share; use {packing_attention} cross or no {packing}"
            if request.Options.LossChunkSize > 0 then
                InvalidInput.setting "loss_chunk_size"
                    "cannot be combined with {prefix_tuning}: the prefix runs through the key/value-cache path, which computes the full logits"

    /// The model's context must cover the prefix and the longest row (the rows' positions start at N), for
    /// every family: GPT-2's n_positions, LLaMA's max_position_embeddings (see TrainOptions.sequenceLength).
    let internal checkPrefixFits (model: CausalLm) (numVirtualTokens: int) (options: TrainOptions) (datasets: TokenizedDataset list) =
        let context = ModelConfig.contextLength model.Config
        let longest =
            datasets
            |> List.collect (fun d -> [ for row in d.Rows -> min row.Length options.MaxSeqLen ])
            |> List.fold max 0
        if numVirtualTokens + longest > context then
            InvalidInput.setting "num_prefix_tokens"
                (sprintf "%d prefix tokens and the longest row (%d tokens) need %d positions; the model has %s = %d (lower {num_prefix_tokens} or {max_seq_len})"
                    numVirtualTokens longest (numVirtualTokens + longest) (ModelConfig.contextField model.Config) context)
