namespace Functional.Distributed

open Functional

/// Where one process sits in a run of data x pipeline x tensor parallel processes (PaddleNLP's
/// tensor_parallel_degree and pipeline_parallel_degree; the rest is data parallel), in Megatron's order:
/// the tensor-parallel ranks of a group are consecutive (they exchange the most, so they share a machine
/// first), then data parallel, and the pipeline stages outermost:
/// rank = (pipeline * DataDegree + data) * TensorDegree + tensor.
type ProcessGrid =
    { /// The run's processes (the world size).
      World: int
      /// This process's rank in the world.
      Rank: int
      /// Processes that split each layer's weights (tensor_parallel_degree, at least 1).
      TensorDegree: int
      /// Stages the layers are divided into (pipeline_parallel_degree, at least 1).
      PipelineDegree: int
      /// Copies of the model that train on different rows: World / (TensorDegree * PipelineDegree).
      DataDegree: int
      /// This process's index in its tensor-parallel group, from 0.
      TensorRank: int
      /// This process's pipeline stage, from 0.
      PipelineRank: int
      /// This process's index among the data-parallel copies, from 0.
      DataRank: int }

/// This process's communicators of a process grid: one per kind of parallelism, each over the processes
/// that differ from it only in that coordinate.
[<NoEquality; NoComparison>]
type ParallelGroups =
    { /// The grid they were made for.
      Grid: ProcessGrid
      /// The processes of this one's tensor-parallel group (TensorDegree of them; ranked by TensorRank).
      Tensor: ISplittableCommunicator
      /// The processes of this one's pipeline (PipelineDegree of them; ranked by stage).
      Pipeline: ISplittableCommunicator
      /// The processes that hold the same weights as this one (DataDegree of them; ranked by DataRank).
      Data: ISplittableCommunicator }

/// Process grids: coordinates from ranks, the ranks of each group, and the sub-communicators.
[<RequireQualifiedAccess>]
module ProcessGrid =

    /// The grid of a world of `world` processes for this rank, with tensorDegree x pipelineDegree
    /// processes per model copy. Raises InvalidInputException naming {tensor_parallel_degree} or
    /// {pipeline_parallel_degree} when a degree is below 1 or their product does not divide the world.
    let create (world: int) (rank: int) (tensorDegree: int) (pipelineDegree: int) : ProcessGrid =
        if tensorDegree < 1 then
            InvalidInput.setting "tensor_parallel_degree" (sprintf "must be at least 1, got %d" tensorDegree)
        if pipelineDegree < 1 then
            InvalidInput.setting "pipeline_parallel_degree" (sprintf "must be at least 1, got %d" pipelineDegree)
        if world < 1 || rank < 0 || rank >= world then
            invalidArg (nameof rank) (sprintf "expected a rank below the world's %d processes, got %d" world rank)
        let perCopy = tensorDegree * pipelineDegree
        if world % perCopy <> 0 then
            InvalidInput.setting "tensor_parallel_degree"
                (sprintf "times {pipeline_parallel_degree} (%d x %d = %d) must divide the %d processes of the run" tensorDegree pipelineDegree perCopy world)
        let dataDegree = world / perCopy
        { World = world
          Rank = rank
          TensorDegree = tensorDegree
          PipelineDegree = pipelineDegree
          DataDegree = dataDegree
          TensorRank = rank % tensorDegree
          DataRank = (rank / tensorDegree) % dataDegree
          PipelineRank = rank / (tensorDegree * dataDegree) }

    /// The world rank of the process at (pipeline, data, tensor) of the grid's shape.
    let rankAt (grid: ProcessGrid) (pipeline: int) (data: int) (tensor: int) : int =
        (pipeline * grid.DataDegree + data) * grid.TensorDegree + tensor

    /// The world ranks of this process's tensor-parallel group, by TensorRank.
    let tensorGroup (grid: ProcessGrid) : int list =
        [ for t in 0 .. grid.TensorDegree - 1 -> rankAt grid grid.PipelineRank grid.DataRank t ]

    /// The world ranks of this process's pipeline, by stage.
    let pipelineGroup (grid: ProcessGrid) : int list =
        [ for p in 0 .. grid.PipelineDegree - 1 -> rankAt grid p grid.DataRank grid.TensorRank ]

    /// The world ranks of this process's data-parallel group, by DataRank.
    let dataGroup (grid: ProcessGrid) : int list =
        [ for d in 0 .. grid.DataDegree - 1 -> rankAt grid grid.PipelineRank d grid.TensorRank ]

    /// Splits the world communicator into this process's three groups (MPI_Comm_split three times, in
    /// the same order on every process: tensor, pipeline, data). Each split's color numbers the group
    /// (the smallest world rank in it), its key orders the group by the coordinate that varies. With one
    /// process every group is the world itself.
    let groups (world: ISplittableCommunicator) (tensorDegree: int) (pipelineDegree: int) : ParallelGroups =
        let grid = create world.Size world.Rank tensorDegree pipelineDegree
        let split (members: int list) (key: int) = world.Split(List.min members, key)
        let tensor = split (tensorGroup grid) grid.TensorRank
        let pipeline = split (pipelineGroup grid) grid.PipelineRank
        let data = split (dataGroup grid) grid.DataRank
        { Grid = grid; Tensor = tensor; Pipeline = pipeline; Data = data }
