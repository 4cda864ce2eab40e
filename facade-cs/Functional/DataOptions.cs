namespace Functional;

/// <summary>
/// How the training file becomes token rows, for <see cref="TrainerBuilder.UseData(string, Action{DataOptions})"/>.
/// Every default is the command line's (and DeepSpeed-Chat's or Hugging Face's).
/// </summary>
public sealed class DataOptions
{
    /// <summary>The data's shape: "auto", "deepspeed-chat" (prompt/chosen), "phoenix" (from_human/from_gpt),
    /// "alpaca" (instruction/input/output), "text" or "input-ids" (command line: --data-format).</summary>
    /// <value>Default: "auto", detected from the first row's fields.</value>
    public string Format { get; set; } = "auto";

    /// <summary>The field holding the prompt, for data of another shape (--prompt-field).</summary>
    /// <value>Default: null (the format's own field).</value>
    public string? PromptField { get; set; }

    /// <summary>The field holding the answer, for data of another shape (--answer-field).</summary>
    /// <value>Default: null (the format's own field).</value>
    public string? AnswerField { get; set; }

    /// <summary>The field holding plain text, for data of another shape (--text-field).</summary>
    /// <value>Default: null (the format's own field).</value>
    public string? TextField { get; set; }

    /// <summary>"all" (DeepSpeed-Chat: the loss covers prompt and answer), "completion" (prompt tokens get
    /// label -100) or "assistant" (conversation rows: the assistant turns and the end-of-turn text the chat
    /// template writes after each; every other token gets label -100) (--train-on).</summary>
    /// <value>Default: "all".</value>
    public string TrainOn { get; set; } = "all";

    /// <summary>A Jinja chat template file that renders conversation rows ("messages" or ShareGPT's
    /// "conversations") instead of the model's own (--chat-template).</summary>
    /// <value>Default: null (the model folder's chat_template.jinja or tokenizer_config.json's chat_template).</value>
    public string? ChatTemplate { get; set; }

    /// <summary>Pack several samples into each row of up to <see cref="MaxSequenceLength"/> tokens (--packing), attending
    /// as <see cref="PackingAttention"/> says.</summary>
    /// <value>Default: false.</value>
    public bool Packing { get; set; }

    /// <summary>How packed rows attend (--packing-attention): "isolated" packs whole samples, restarts their positions
    /// and lets each attend only to itself (a block-diagonal causal mask), so a packed micro-batch gives the loss and
    /// gradients of its samples unpacked, with <see cref="TrainOn"/> "completion" too; "cross" cuts the eos-separated
    /// stream into rows of exactly <see cref="MaxSequenceLength"/> tokens that attend across samples (every token
    /// trained on).</summary>
    /// <value>Default: "isolated".</value>
    public string PackingAttention { get; set; } = "isolated";

    /// <summary>Whether every sample starts with the tokenizer's bos token: true (--add-bos), false (--no-add-bos) or
    /// null for the tokenizer's own rule, as Hugging Face's tokenizer(text) (tokenizer_config.json's add_bos_token,
    /// else tokenizer.json's post-processor: LLaMA's adds bos, GPT-2's does not). Every sample ends with eos.</summary>
    /// <value>Default: null (the tokenizer's rule).</value>
    public bool? AddBos { get; set; }

    /// <summary>Skip and count bad rows instead of stopping at the first (--skip-bad-rows).</summary>
    /// <value>Default: false.</value>
    public bool SkipBadRows { get; set; }

    /// <summary>A DeepSpeed-Chat data split such as "2,4,4": this phase trains on the first share (--data-split).</summary>
    /// <value>Default: null (all rows).</value>
    public string? DataSplit { get; set; }

    /// <summary>The fraction of the training rows held out for evaluation when there is no evaluation file
    /// (--eval-split-ratio).</summary>
    /// <value>Default: 0 (none held out).</value>
    public double EvalSplitRatio { get; set; }

    /// <summary>Rows are truncated to this many tokens (--max-seq-len); 0 uses the model's context (config.json's
    /// n_positions or max_position_embeddings, less a prefix's virtual tokens). A value above the context is
    /// refused when training starts.</summary>
    /// <value>Default: 0 (the model's context).</value>
    public int MaxSequenceLength { get; set; }

    /// <summary>Shuffle the rows each epoch from the seed; false keeps file order (--no-shuffle turns it off).</summary>
    /// <value>Default: true.</value>
    public bool Shuffle { get; set; } = true;

    /// <summary>Keep tokenized data in a cache on disk ($FUNCTIONAL_CACHE or ~/.cache/functional/data), keyed by
    /// the file's content, the tokenizer and these options (--no-data-cache turns it off).</summary>
    /// <value>Default: true.</value>
    public bool UseCache { get; set; } = true;
}
