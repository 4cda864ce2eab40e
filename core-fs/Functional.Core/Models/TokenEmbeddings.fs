namespace Functional.Models

open System
open TorchSharp
open Functional.Runtime

/// Resizing a causal LM's vocabulary as HF's resize_token_embeddings(new_num_tokens,
/// pad_to_multiple_of) with mean_resizing=True (the default of current transformers), for every family:
/// the token embedding is the backbone's DecoderBackbone.TokenEmbedding, an untied head CausalLmHead's
/// LmHead, the config's vocab_size ModelFamily.withVocabSize.
[<RequireQualifiedAccess>]
module TokenEmbeddings =

    /// HF's scale of the old rows' covariance for the distribution new rows are drawn from.
    let covarianceScale = 1e-9

    /// The vocabulary size a resize asks for: HF's resize_token_embeddings(tokenizerLength,
    /// pad_to_multiple_of = multipleOf). multipleOf > 0: multipleOf * ceil(n / multipleOf) where n is
    /// tokenizerLength, or the current size when there is no tokenizer (tokenizerLength 0) -
    /// DeepSpeed-Chat's 8 * ceil(len(tokenizer) / 8) is multipleOf 8; this may shrink the vocabulary, as
    /// HF's does. multipleOf 0: tokenizerLength when the tokenizer has more tokens than the model
    /// (added tokens grow the embeddings, as HF users call resize_token_embeddings(len(tokenizer))), else
    /// the current size.
    let targetSize (current: int) (tokenizerLength: int) (multipleOf: int) : int =
        if multipleOf < 0 then invalidArg (nameof multipleOf) "must be >= 0"
        if multipleOf > 0 then
            let n = if tokenizerLength > 0 then tokenizerLength else current
            (n + multipleOf - 1) / multipleOf * multipleOf
        else max current tokenizerLength

    /// HF's rows for added tokens (_init_added_embeddings_weights_with_mean): over the old rows W (N, C) in
    /// float32, mean m and covariance S = (W - m)^T (W - m) / N; when 1e-9 S is positive definite (its
    /// Cholesky factor L exists), each new row is m + L e with e drawn from a standard normal
    /// (torch.distributions.MultivariateNormal(m, covariance_matrix = 1e-9 S).sample), else m. e is
    /// torch.randn((added, C), generator); the rows come back in W's dtype.
    let meanResizedRows (old: torch.Tensor) (added: int64) (generator: torch.Generator) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let w = old.detach().to_type torch.float32
        let n = w.shape[0]
        let mean = w.mean([| 0L |])
        let centered = w - mean
        let covariance = centered.t().matmul(centered) / float n
        let scaled = covariance * covarianceScale
        let struct (factor, info) = torch.linalg.cholesky_ex(scaled)
        let positiveDefinite = info.count_nonzero().item<int64> () = 0L
        let rows =
            if positiveDefinite then
                let e = torch.randn([| added; w.shape[1] |], dtype = torch.float32, generator = generator)
                mean.unsqueeze(0) + e.matmul(factor.t())
            else mean.unsqueeze(0).repeat(added, 1L)
        scope.MoveToOuter(rows.to_type old.dtype)

    /// The rows of a resized matrix: the first min(old, new) rows of old, then (growing) meanResizedRows.
    let private resizedMatrix (old: torch.Tensor) (newRows: int64) (generator: torch.Generator) =
        use scope = torch.NewDisposeScope()
        let oldRows = old.shape[0]
        let kept = old.detach().narrow(0L, 0L, min oldRows newRows)
        let result =
            if newRows > oldRows then torch.cat([| kept; meanResizedRows old (newRows - oldRows) generator |], 0L)
            else kept.clone ()
        scope.MoveToOuter result

    let private headOf (lm: CausalLm) =
        match box lm.Module with
        | :? CausalLmHead as head -> head
        | _ -> invalidArg (nameof lm) (sprintf "the %s module is not a causal LM over a DecoderBackbone" (lm.Module.GetName()))

    /// The state-dict name of a module's weight inside the model, found by reference.
    let private weightName (root: torch.nn.Module) (target: torch.nn.Module) =
        root.named_modules ()
        |> Seq.tryPick (fun struct (name, m) -> if obj.ReferenceEquals(m, target) then Some(name + ".weight") else None)
        |> Option.defaultWith (fun () -> invalidArg (nameof target) "the module is not part of the model")

    /// The model with vocabSize rows of token embedding (and of the untied LM head): a new model of the
    /// config with that vocab_size (ModelFamily.withVocabSize; built with seed, so its other initial
    /// values are overwritten), every other parameter copied, the first min(old, new) rows kept and, when
    /// growing, the new rows of the embedding and then of the untied head drawn by meanResizedRows from
    /// one generator seeded with seed (HF draws both from torch's global generator, in that order). A tied
    /// head follows the embedding. The same size returns lm itself.
    let resize (lm: CausalLm) (vocabSize: int) (seed: int64) : CausalLm =
        TorchRuntime.ensure ()
        let current = ModelConfig.vocabSize lm.Config
        if vocabSize <= 0 then invalidArg (nameof vocabSize) (sprintf "must be positive, got %d" vocabSize)
        if vocabSize = current then lm
        else
            let oldHead = headOf lm
            let embeddingName = weightName lm.Module oldHead.Backbone.TokenEmbedding
            let headName = oldHead.LmHead |> Option.map (fun h -> weightName lm.Module h)
            let resized = CausalLm.create (ModelFamily.withVocabSize vocabSize lm.Config) seed
            use generator = new torch.Generator(uint64 seed)
            let old = dict [ for struct (name, p) in lm.Module.named_parameters () -> name, p ]
            use embedding = resizedMatrix old[embeddingName] (int64 vocabSize) generator
            use head = headName |> Option.map (fun n -> resizedMatrix old[n] (int64 vocabSize) generator) |> Option.toObj
            use _ = torch.no_grad ()
            for struct (name, p) in resized.Module.named_parameters () do
                if name = embeddingName then p.copy_ embedding |> ignore
                elif Some name = headName then p.copy_ head |> ignore
                else
                    match old.TryGetValue name with
                    | true, source when source.shape = p.shape -> p.copy_ source |> ignore
                    | _ ->
                        invalidArg (nameof lm)
                            (sprintf "the parameter %s depends on the vocabulary in a way resize does not know" name)
            CausalLm.setGradientCheckpointing resized (CausalLm.gradientCheckpointing lm)
            resized
