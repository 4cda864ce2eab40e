namespace Functional;

/// <summary>
/// The fields and head of a sequence-classification or reward-model run, for
/// <see cref="TrainerBuilder.UseTask(string, Action{TaskOptions})"/>. The text field (classification) and the prompt
/// field (reward model) are <see cref="DataOptions.TextField"/> and <see cref="DataOptions.PromptField"/>.
/// </summary>
public sealed class TaskOptions
{
    /// <summary>Classification: the field holding the label, a name (mapped through config.json's label2id, or the
    /// sorted distinct names of the training file) or an integer id (--label-field).</summary>
    /// <value>Default: null ("label").</value>
    public string? LabelField { get; set; }

    /// <summary>Reward model: the preferred answer's field (--chosen-field).</summary>
    /// <value>Default: null ("chosen").</value>
    public string? ChosenField { get; set; }

    /// <summary>Reward model: the other answer's field (--rejected-field).</summary>
    /// <value>Default: null ("rejected").</value>
    public string? RejectedField { get; set; }

    /// <summary>Classification: num_labels when the labels are ids and config.json names none (--num-labels).</summary>
    /// <value>Default: null (the largest id + 1).</value>
    public int? NumLabels { get; set; }

    /// <summary>The pad id rows are padded with and pooled before, over config.json's pad_token_id (--pad-token-id).</summary>
    /// <value>Default: null (config.json's).</value>
    public long? PadTokenId { get; set; }
}
