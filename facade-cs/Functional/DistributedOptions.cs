namespace Functional;

/// <summary>How a run spreads over several processes (<see cref="TrainerBuilder.UseDistributed(System.Action{DistributedOptions})"/>).
/// The processes are those of the launcher (<c>mpirun -np N</c>): rank and world size come from its environment.</summary>
public sealed class DistributedOptions
{
    /// <summary>DeepSpeed's ZeRO stage (--zero-stage): 0 (default) every process holds all the training state; 1
    /// each keeps only its block of the optimizer state; 2 also reduce-scatters the gradients into that block; 3 also
    /// shards the parameters, gathering each layer while it runs (fp32; with one process a mixed-precision stage 3 runs as
    /// stage 0).</summary>
    public int ZeroStage { get; set; }

    /// <summary>The processes of the run; null (default): from the launcher's environment. Implement
    /// <see cref="Functional.Distributed.ICommunicator"/> to bring another transport.</summary>
    public Functional.Distributed.ICommunicator? Communicator { get; set; }
}
