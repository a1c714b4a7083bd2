"""Rank layout and validation of ParallelGroups (no processes needed for the layout)."""
import pytest

from distributed import run_distributed
from megatron.errors import ConfigError
from megatron.parallel import ParallelGroups, build_topology


def test_layout_pp2_tp2_dp2_agrees_with_megatron_order():
    topo = build_topology(8, pp=2, tp=2)
    # tp neighbours are adjacent ranks (model axis fastest), then data, then pipe.
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    coord = topo.get_coord(6)
    assert (coord.pipe, coord.data, coord.model) == (1, 1, 0)


def test_pp0_means_one_stage():
    topo = build_topology(4, pp=0, tp=2)
    assert (topo.get_dim("pipe"), topo.get_dim("model"), topo.get_dim("data")) == (1, 2, 2)


@pytest.mark.parametrize("world, pp, tp", [(6, 2, 4), (4, 1, 3), (2, 4, 1)])
def test_indivisible_world_is_a_config_error(world, pp, tp):
    with pytest.raises(ConfigError, match=f"world size {world} is not divisible by pipe-parallel-size {pp}"):
        build_topology(world, pp, tp)


def test_single_process():
    g = ParallelGroups.single()
    assert (g.dp_size, g.tp_size, g.pp_size, g.dp_rank, g.tp_rank, g.pp_rank) == (1, 1, 1, 0, 0, 0)
    assert g.tp_group is None and g.dp_group is None and g.pp_group is None and g.mpu is None


def _groups_body(rank, world_size):
    import torch
    import torch.distributed as dist

    g = ParallelGroups.build(pp=1, tp=2)
    mpu = g.mpu
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=mpu.get_data_parallel_group())  # a real group even at dp=1
    return dict(tp_rank=g.tp_rank, dp_size=g.dp_size, tp_ranks=g.tp_ranks, dp_group_none=g.dp_group is None,
                mpu_tp=(mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()), dp_sum=x.item())


@pytest.mark.distributed
def test_build_two_processes_tp2():
    r0, r1 = run_distributed(_groups_body, world_size=2)
    assert (r0["tp_rank"], r1["tp_rank"]) == (0, 1)
    assert r0["tp_ranks"] == r1["tp_ranks"] == [0, 1]
    assert r0["dp_size"] == 1 and r0["dp_group_none"]
    assert r1["mpu_tp"] == (1, 2)
    assert (r0["dp_sum"], r1["dp_sum"]) == (0.0, 1.0)  # dp group is only the rank itself
