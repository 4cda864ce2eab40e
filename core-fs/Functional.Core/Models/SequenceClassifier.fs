namespace Functional.Models

open System
open System.IO
open System.Text.Json
open TorchSharp
open TorchSharp.Modules
open Functional

/// What a sequence classifier predicts (HF's config.problem_type).
[<RequireQualifiedAccess>]
type ProblemType =
    /// One class per example: cross-entropy over the labels ("single_label_classification").
    | SingleLabel
    /// One real value per example (num_labels 1): mean squared error ("regression").
    | Regression

/// The classification head of a model, as config.json describes it for HF's
/// AutoModelForSequenceClassification.
[<NoComparison>]
type ClassificationHead =
    { /// The label names by id (config.json's id2label; HF's default names are LABEL_0, LABEL_1, ...).
      Labels: string[]
      /// What the scores mean.
      ProblemType: ProblemType
      /// Whether config.json names problem_type (a reward model's does not).
      ProblemTypeWritten: bool
      /// config.json's pad_token_id: the pooled position of a row is the rightmost token whose id differs
      /// from it. None: every row must be one sequence alone (batch size 1) and the last position is pooled.
      PadTokenId: int64 option
      /// The standard deviation of the score weight's normal initialization (config.json's initializer_range).
      InitializerRange: float }

    /// num_labels: the width of the score.
    member this.NumLabels = this.Labels.Length

/// HF's *ForSequenceClassification over any family's backbone: the backbone registered under the same
/// name as in the causal LM ("transformer", "model", ...) and score = Linear(width, num_labels, bias
/// false), width the backbone's output width (the token embedding's). Its forward is HF's logits: the
/// score of each row's pooled position, the rightmost token whose id is not head.PadTokenId.
type SequenceClassifierHead(name: string, backboneName: string, backbone: DecoderBackbone, head: ClassificationHead) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>(name)
    let width = backbone.TokenEmbedding.weight.shape[1]
    let score = torch.nn.Linear(width, int64 head.NumLabels, hasBias = false)
    do
        // Explicitly, so the backbone keeps HF's name (see CausalLmHead).
        this.register_module(backboneName, backbone)
        this.register_module("score", score)

    /// The head's labels, problem type and padding id.
    member _.Head = head

    /// The backbone below the score.
    member _.Backbone = backbone

    /// score.weight, (num_labels, width).
    member _.Score = score

    /// The pooled position of each row: input_ids (B, T) -> (B) int64, HF's rule: the rightmost position
    /// whose id is not pad_token_id (0 when every id is padding); without pad_token_id the last position,
    /// which is only defined for B = 1 (raises InvalidInputException naming config.json's pad_token_id).
    member _.PooledPositions(inputIds: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let B, T = inputIds.shape[0], inputIds.shape[1]
        match head.PadTokenId with
        | None ->
            if B <> 1L then
                InvalidInput.fail "config.json" "pad_token_id"
                    (sprintf "a sequence classifier needs pad_token_id to find the last token of each of the %d rows of a batch; set it in the model's config.json (or train with batch size 1)" B)
            let last: torch.Tensor = (T - 1L).ToScalar() |> fun v -> torch.full([| B |], v, dtype = torch.int64, device = inputIds.device)
            scope.MoveToOuter last
        | Some pad ->
            let notPad = inputIds.ne(torch.tensor(pad, device = inputIds.device)).to_type torch.int64 // (B, T)
            let positions = torch.arange(T, dtype = torch.int64, device = inputIds.device) // (T)
            scope.MoveToOuter((notPad * positions).argmax(-1L))

    /// input_ids (B, T) int64 -> logits (B, num_labels) at each row's pooled position (PooledPositions).
    override this.forward(inputIds) =
        use scope = torch.NewDisposeScope()
        let hidden = backbone.forward inputIds // (B, T, C)
        let B = inputIds.shape[0]
        let last = this.PooledPositions inputIds // (B)
        let rows = torch.arange(B, dtype = torch.int64, device = inputIds.device)
        let pooled = hidden.index([| rows; last |]) // (B, C)
        scope.MoveToOuter(score.call pooled)

/// Sequence classification and reward models over every family (HF's AutoModelForSequenceClassification).
[<RequireQualifiedAccess>]
module SequenceClassification =

    /// The checkpoint key of the score weight.
    [<Literal>]
    let ScoreKey = "score.weight"

    /// HF's class name of the family's classifier, derived from its causal-LM class: GPT2LMHeadModel ->
    /// GPT2ForSequenceClassification, XForCausalLM -> XForSequenceClassification (LLaMA, Qwen2, Qwen3,
    /// Mistral, OPT, BLOOM alike).
    let architecture (config: ModelConfig) : string =
        let causal = (ModelFamily.traits config).Architecture
        let stem =
            if causal.EndsWith "LMHeadModel" then causal.Substring(0, causal.Length - "LMHeadModel".Length)
            elif causal.EndsWith "ForCausalLM" then causal.Substring(0, causal.Length - "ForCausalLM".Length)
            else causal
        stem + "ForSequenceClassification"

    /// The name HF gives label i when config.json names none.
    let defaultLabel (i: int) = sprintf "LABEL_%d" i

    /// Whether labels are HF's default names (LABEL_0, LABEL_1, ...): the labels of a config that names none.
    let hasDefaultNames (labels: string[]) = labels |> Array.indexed |> Array.forall (fun (i, l) -> l = defaultLabel i)

    /// Whether a config.json names a *ForSequenceClassification architecture.
    let isClassifierConfig (configText: string) : bool =
        match JsonInput.tryParse configText with
        | Ok root when root.ValueKind = JsonValueKind.Object ->
            match root.TryGetProperty "architectures" with
            | true, a when a.ValueKind = JsonValueKind.Array ->
                a.EnumerateArray() |> Seq.exists (fun e -> e.ValueKind = JsonValueKind.String && e.GetString().EndsWith "ForSequenceClassification")
            | _ -> false
        | _ -> false

    /// The classification facts of a config.json text (origin names it in errors): id2label (keys are
    /// the ids as strings; they must be 0 .. n-1), else num_labels, else HF's default of 2 labels;
    /// problem_type (refusing multi_label_classification; absent: regression when there is one label,
    /// else single-label); pad_token_id; initializer_range (default 0.02).
    let readHead (origin: string) (configText: string) : ClassificationHead =
        let root =
            match JsonInput.tryParse configText with
            | Ok root when root.ValueKind = JsonValueKind.Object -> root
            | Ok _ -> InvalidInput.fail origin "" "expected a JSON object"
            | Error e -> InvalidInput.fail origin "" (sprintf "invalid JSON: %s" e.Message)
        let r = ConfigJson.Reader(origin, root)
        let labels =
            match r.TryGet "id2label" with
            | Some map when map.ValueKind = JsonValueKind.Object ->
                let entries =
                    [ for p in map.EnumerateObject() do
                          match Int32.TryParse p.Name, p.Value.ValueKind with
                          | (true, id), JsonValueKind.String -> yield id, p.Value.GetString()
                          | (false, _), _ -> r.Fail ("id2label." + p.Name) "expected a label id (a non-negative integer as a string)"
                          | _ -> r.Fail ("id2label." + p.Name) (sprintf "expected the label's name, found %s" (ConfigJson.describe p.Value)) ]
                    |> List.sortBy fst
                entries |> List.iteri (fun i (id, _) -> if id <> i then r.Fail "id2label" (sprintf "label ids must be 0 .. %d, found %d" (entries.Length - 1) id))
                if entries.IsEmpty then r.Fail "id2label" "expected at least one label"
                entries |> List.map snd |> Array.ofList
            | Some v -> r.Fail "id2label" (sprintf "expected an object mapping ids to names, found %s" (ConfigJson.describe v))
            | None -> Array.init (r.Positive "num_labels" (r.Int "num_labels" (Some 2))) defaultLabel
        let problem, written =
            match r.String "problem_type" with
            | Some "single_label_classification" -> ProblemType.SingleLabel, true
            | Some "regression" -> ProblemType.Regression, true
            | Some "multi_label_classification" ->
                r.Fail "problem_type" "multi_label_classification is not supported; expected single_label_classification or regression"
            | Some other -> r.Fail "problem_type" (sprintf "unknown problem type \"%s\"; expected single_label_classification or regression" other)
            | None -> (if labels.Length = 1 then ProblemType.Regression else ProblemType.SingleLabel), false
        if problem = ProblemType.Regression && labels.Length <> 1 then
            r.Fail "problem_type" (sprintf "regression needs exactly one label, found %d" labels.Length)
        let pad =
            match r.TryGet "pad_token_id" with
            | Some v when v.ValueKind = JsonValueKind.Number && fst (v.TryGetInt64()) && v.GetInt64() >= 0L -> Some(v.GetInt64())
            | Some v -> r.Fail "pad_token_id" (sprintf "expected a token id, found %s" (ConfigJson.describe v))
            | None -> None
        { Labels = labels
          ProblemType = problem
          ProblemTypeWritten = written
          PadTokenId = pad
          InitializerRange = r.Float "initializer_range" 0.02 |> r.NonNegativeFloat "initializer_range" }

    /// The head of a model, when it is a sequence classifier.
    let tryHead (model: CausalLm) : ClassificationHead option =
        match box model.Module with
        | :? SequenceClassifierHead as c -> Some c.Head
        | _ -> None

    /// Builds the config's classifier: the family's backbone (ModelFamily.build, HF's initialization from
    /// seed) under its causal-LM name, and score.weight drawn from normal(0, initializer_range) by a
    /// generator seeded with seed + 1. The causal LM's own head is dropped; its key (lm_head.weight) is
    /// skipped when a causal-LM checkpoint loads into the classifier.
    let create (config: ModelConfig) (head: ClassificationHead) (seed: int64) : CausalLm =
        Functional.Runtime.TorchRuntime.ensure ()
        let lm = ModelFamily.build config seed
        let classifier = new SequenceClassifierHead(architecture config, lm.BackboneName, lm.Backbone, head)
        do
            use _ = torch.no_grad ()
            use generator = new torch.Generator(uint64 (seed + 1L))
            classifier.Score.weight.normal_(0.0, head.InitializerRange, generator) |> ignore
        CausalLm.ofModule config classifier [ "lm_head.weight" ]

    /// Writes the head's fields into a config.json object: architectures, id2label and label2id (ids as
    /// strings, as HF writes them), num_labels' source, problem_type (when the head names one) and
    /// pad_token_id.
    let writeInto (config: ModelConfig) (head: ClassificationHead) (json: Nodes.JsonObject) : unit =
        json["architectures"] <- Nodes.JsonArray(Nodes.JsonValue.Create(architecture config))
        let id2label = Nodes.JsonObject()
        let label2id = Nodes.JsonObject()
        head.Labels |> Array.iteri (fun i l ->
            id2label[string i] <- Nodes.JsonValue.Create l
            label2id[l] <- Nodes.JsonValue.Create i)
        json["id2label"] <- id2label
        json["label2id"] <- label2id
        json.Remove "num_labels" |> ignore
        if head.ProblemTypeWritten then
            json["problem_type"] <-
                Nodes.JsonValue.Create(match head.ProblemType with ProblemType.SingleLabel -> "single_label_classification" | ProblemType.Regression -> "regression")
        match head.PadTokenId with
        | Some pad -> json["pad_token_id"] <- Nodes.JsonValue.Create pad
        | None -> ()
