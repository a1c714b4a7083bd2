"""Running MS statistics equal a brute-force float64 computation, for dp 1, 2 and 4."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from l2e_testlib import activation_stream, attach_scale, l2e_config, run_steps

from megatron.l2e.statistics import RunningMoments

STEPS, BATCH, S, H = 4, 8, 3, 8


def _dp_body(rank, world_size, sync_stats):
    data = activation_stream(STEPS, BATCH, S, H)
    mine = np.array_split(data, world_size, axis=1)[rank]  # this rank's share of each global batch
    block, l2e = attach_scale(l2e_config(inhibition="none", sync_stats=sync_stats), S, H,
                              dp_group=dist.group.WORLD)
    last = run_steps(l2e, block, mine, micro=2, log=True)[-1]
    last.pop("runtime/l2e_time_frac")
    sd = l2e.state_dict()["layers"][0]
    return sd["n"], sd["mean"].numpy(), (sd["M2"] / (sd["n"] - 1)).numpy(), last


def _brute(samples):
    flat = samples.reshape(-1, S, H).astype(np.float64)
    return flat.shape[0], flat.mean(0), flat.var(0, ddof=1)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_dp_statistics_match_brute_force(world_size):
    n_ref, mean_ref, var_ref = _brute(activation_stream(STEPS, BATCH, S, H))
    results = run_distributed(_dp_body, world_size, args=(True,))
    for n, mean, var, metrics in results:
        assert metrics == results[0][3]  # every rank logs the same, gathered numbers
        assert n == n_ref
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var, var_ref, rtol=1e-4, atol=1e-5)


def test_unsynced_statistics_are_per_rank():
    data = activation_stream(STEPS, BATCH, S, H)
    results = run_distributed(_dp_body, 2, args=(False,))
    for rank, (n, mean, var, _) in enumerate(results):
        n_ref, mean_ref, var_ref = _brute(np.array_split(data, 2, axis=1)[rank])
        assert n == n_ref
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var, var_ref, rtol=1e-4, atol=1e-5)


def test_step_by_step_merge_matches_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(20.0, 1.0, size=(30, 2, 2)).astype(np.float32)  # mean far from the first shift (0)
    m = RunningMoments((2, 2), eps=1e-12)
    for chunk in np.array_split(x, 5):
        m.begin_step()
        d = m.deviation(torch.from_numpy(chunk))
        m.accumulate(d, d * d)
        m.merge(m.m, m.s1, m.s2)
        m.reset_batch()
    np.testing.assert_allclose(m.mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(m.variance().numpy(), x.astype(np.float64).var(0, ddof=1), rtol=1e-4)
