namespace Functional;

/// <summary>
/// fp16 loss scaling as DeepSpeed's, for <see cref="TrainerBuilder.UseFp16(Action{LossScaleOptions})"/>: the loss is
/// multiplied by the scale before backward; an update whose gradients overflow is skipped and the scale shrinks.
/// </summary>
public sealed class LossScaleOptions
{
    /// <summary>A fixed loss scale; 0 scales dynamically (--loss-scale).</summary>
    /// <value>Default: 0 (dynamic).</value>
    public double StaticScale { get; set; }

    /// <summary>The dynamic scale starts at 2 to this power (--initial-scale-power).</summary>
    /// <value>Default: 16.</value>
    public int InitialScalePower { get; set; } = 16;

    /// <summary>Overflow-free steps before the dynamic scale doubles (--loss-scale-window).</summary>
    /// <value>Default: 1000.</value>
    public int Window { get; set; } = 1000;

    /// <summary>Overflows tolerated before the dynamic scale halves (--hysteresis).</summary>
    /// <value>Default: 2.</value>
    public int Hysteresis { get; set; } = 2;

    /// <summary>The smallest dynamic scale (--min-loss-scale).</summary>
    /// <value>Default: 1.</value>
    public double MinScale { get; set; } = 1;
}
