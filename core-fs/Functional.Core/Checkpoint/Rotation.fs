namespace Functional.Checkpoint

open System

/// Which checkpoints to keep and which evaluation is the best so far, as Hugging Face's Trainer decides
/// (`Trainer._sorted_checkpoints`, `_rotate_checkpoints`, `_determine_best_metric`). Pure functions of
/// step numbers and metric values: the trainer lists the folders and deletes what these return.
[<RequireQualifiedAccess>]
module Rotation =

    /// The steps of the checkpoints to delete so that at most `limit` remain (HF's save_total_limit),
    /// oldest first. Steps are ordered by value; the best checkpoint (when it is among them) is moved
    /// to the second-to-last place, so it survives like the newest one; then the first `count - limit`
    /// of that order go. With limit 1 and a best checkpoint that is not the newest, 2 are kept (the
    /// best one and the newest, which resuming needs); as in HF this also happens when `best` names a
    /// step that is not in the list. No limit, or a limit of 0 or less, deletes nothing. Duplicate
    /// steps count once.
    let toDelete (steps: int list) (best: int option) (limit: int option) : int list =
        match limit with
        | None -> []
        | Some limit when limit <= 0 -> []
        | Some limit ->
            let sorted = steps |> List.distinct |> List.sort
            let order =
                match best with
                | Some b when List.contains b sorted && b <> List.last sorted ->
                    // HF swaps the best one forward until it sits second-to-last.
                    let others = sorted |> List.filter ((<>) b)
                    List.take (others.Length - 1) others @ [ b; List.last others ]
                | _ -> sorted
            let count = order.Length
            if count <= limit then []
            else
                let effectiveLimit =
                    match best with
                    | Some b when limit = 1 && List.last order <> b -> 2
                    | _ -> limit
                order |> List.take (max 0 (count - effectiveLimit))

    /// The key of the evaluation metric in the metrics of an evaluation: HF prefixes "eval_" to
    /// metric_for_best_model when it does not start with it ("loss" -> "eval_loss").
    let metricKey (metricName: string) : string =
        if metricName.StartsWith("eval_", StringComparison.Ordinal) then metricName else "eval_" + metricName

    /// HF's default for greater_is_better: false when the metric's name ends with "loss", true otherwise.
    let defaultGreaterIsBetter (metricName: string) : bool =
        not (metricName.EndsWith("loss", StringComparison.Ordinal))

    /// Whether candidate beats the best metric so far, strictly (HF's np.greater / np.less): equal values
    /// are no improvement, and NaN never is. No best yet counts as -infinity when greater is better and
    /// +infinity otherwise (as HF's _determine_best_metric initializes it), so the first finite value wins.
    let isBetter (greaterIsBetter: bool) (candidate: float) (best: float option) : bool =
        let reference =
            match best with
            | Some b -> b
            | None -> if greaterIsBetter then Double.NegativeInfinity else Double.PositiveInfinity
        if greaterIsBetter then candidate > reference else candidate < reference
