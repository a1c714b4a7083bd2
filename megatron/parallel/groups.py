"""Who talks to whom: the data × tensor × pipeline process-group layout.

Ranks are laid out by DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe,
data, model; model varies fastest), the same layout DeepSpeed's ``PipelineModule``
builds internally, so our tensor-parallel groups and its pipeline grid agree about
which rank holds which shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron.errors import ConfigError


def build_topology(world_size: int, pp: int, tp: int) -> PipeModelDataParallelTopology:
    """The rank layout for ``world_size`` processes; pp=0 (no pipeline) counts as 1 stage."""
    pp, tp = max(pp, 1), max(tp, 1)
    if world_size % (pp * tp):
        raise ConfigError(
            f"world size {world_size} is not divisible by pipe-parallel-size {pp} × "
            f"model-parallel-size {tp}; change pipe_parallel_size/model_parallel_size "
            f"or the number of GPUs"
        )
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world_size // (pp * tp))


@dataclass
class ParallelGroups:
    """This rank's place in the data/tensor/pipeline grid, and the groups along each axis.

    ``*_group`` is None when that axis has size 1, so callers can skip the collective.
    ``*_ranks`` are the global ranks of this rank's group on each axis.
    """

    rank: int
    world_size: int
    topology: PipeModelDataParallelTopology
    dp_group: object = None
    tp_group: object = None
    pp_group: object = None
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    # Real group objects even for size-1 axes: DeepSpeed reads None as "the world".
    _axis_groups: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, pp: int, tp: int) -> "ParallelGroups":
        """Create the groups; every rank must call this (new_group is collective)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups.build needs torch.distributed to be initialised")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        topology = build_topology(world_size, pp, tp)
        kwargs, axis_groups = {}, {}
        for axis, short in (("data", "dp"), ("model", "tp"), ("pipe", "pp")):
            for ranks in topology.get_axis_comm_lists(axis):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    axis_groups[short] = group
                    kwargs[f"{short}_ranks"] = ranks
                    kwargs[f"{short}_group"] = group if len(ranks) > 1 else None
        return cls(rank, world_size, topology, _axis_groups=axis_groups, **kwargs)

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no parallelism (torch.distributed need not be initialised)."""
        return cls(0, 1, build_topology(1, 1, 1))

    @property
    def _coord(self):
        return self.topology.get_coord(self.rank)

    dp_rank = property(lambda self: self._coord.data)
    tp_rank = property(lambda self: self._coord.model)
    pp_rank = property(lambda self: self._coord.pipe)
    dp_size = property(lambda self: self.topology.get_dim("data"))
    tp_size = property(lambda self: self.topology.get_dim("model"))
    pp_size = property(lambda self: self.topology.get_dim("pipe"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def mpu(self) -> "MPU | None":
        """The Megatron-style object ``deepspeed.initialize(mpu=...)`` wants (non-pipeline
        engines only; a PipelineModule brings its own grid). None for a single process."""
        if not self._axis_groups:
            return None
        if self.pp_size > 1:
            raise ValueError("with pipeline parallelism DeepSpeed takes the grid from the PipelineModule")
        return MPU(self)


class MPU:
    """Adapter: DeepSpeed's "model parallel" is our tensor-parallel axis (pp is 1 here)."""

    def __init__(self, groups: ParallelGroups):
        self._g = groups

    def get_model_parallel_rank(self):
        return self._g.tp_rank

    def get_model_parallel_world_size(self):
        return self._g.tp_size

    def get_model_parallel_group(self):
        return self._g._axis_groups["tp"]

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self._g.tp_ranks[0]

    def get_data_parallel_rank(self):
        return self._g.dp_rank

    def get_data_parallel_world_size(self):
        return self._g.dp_size

    def get_data_parallel_group(self):
        return self._g._axis_groups["dp"]

    def get_pipeline_model_parallel_world_size(self):
        return 1
