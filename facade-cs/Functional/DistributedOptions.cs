namespace Functional;

/// <summary>How a run spreads over several processes (<see cref="TrainerBuilder.UseDistributed(System.Action{DistributedOptions})"/>).
/// The processes are those of the launcher (<c>mpirun -np N</c>): rank and world size come from its environment.</summary>
public sealed class DistributedOptions
{
    /// <summary>DeepSpeed's ZeRO stage (--zero-stage): 0 (default) every process holds all the training state; 1
    /// each keeps only its block of the optimizer state; 2 also reduce-scatters the gradients into that block; 3 also
    /// shards the parameters, gathering each layer while it runs.</summary>
    public int ZeroStage { get; set; }

    /// <summary>Elements per all-reduce or reduce-scatter of the gradients (DeepSpeed's reduce_bucket_size,
    /// --reduce-bucket-size; default 5e8).</summary>
    public long ReduceBucketSize { get; set; } = Functional.Distributed.CollectiveBucketsModule.DefaultElements;

    /// <summary>Elements per all-gather of the parameters (DeepSpeed's allgather_bucket_size, --allgather-bucket-size;
    /// default 5e8).</summary>
    public long AllgatherBucketSize { get; set; } = Functional.Distributed.CollectiveBucketsModule.DefaultElements;

    /// <summary>Every process writes OUTPUT/metrics-rank-R.jsonl (R its rank): per logged step, its own token-weighted
    /// loss over its rows of the window and their predicted tokens (--log-each-rank; HF's log_on_each_node). Default
    /// false: only process 0 logs (metrics.jsonl, the loss over all processes).</summary>
    public bool LogEachRank { get; set; }

    /// <summary>Processes that split each layer of the model (PaddleNLP's tensor_parallel_degree,
    /// --tensor-parallel-degree; Megatron's layout): LLaMA-family causal LMs, fp32, with checkpoints in one process's layout; the
    /// remaining processes are data parallel. Default 1: every process holds the whole model.</summary>
    public int TensorParallelDegree { get; set; } = 1;

    /// <summary>Stages the model's layers are divided into, one process each (PaddleNLP's pipeline_parallel_degree,
    /// --pipeline-parallel-degree; 1F1B over the accumulation window's micro-batches, balanced by parameter count):
    /// every family's causal LM, fp32, with tensor parallelism too for the LLaMA families (each stage split), with checkpoints in one process's
    /// layout; the remaining processes are data parallel. Default 1: every process runs every layer.</summary>
    public int PipelineParallelDegree { get; set; } = 1;

    /// <summary>The processes of the run; null (default): from the launcher's environment. Implement
    /// <see cref="Functional.Distributed.ICommunicator"/> to bring another transport.</summary>
    public Functional.Distributed.ICommunicator? Communicator { get; set; }
}
