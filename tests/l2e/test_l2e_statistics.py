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


MOMENTUM = 0.7


def _momentum_dp_body(rank, world_size):
    data = activation_stream(STEPS, BATCH, S, H)
    mine = np.array_split(data, world_size, axis=1)[rank]
    group = dist.group.WORLD if world_size > 1 else None
    block, l2e = attach_scale(l2e_config(inhibition="none", stats_momentum=MOMENTUM), S, H, dp_group=group)
    run_steps(l2e, block, mine, micro=2)
    sd = l2e.state_dict()["layers"][0]
    return sd["n"], sd["weight"], sd["mean"].numpy(), (sd["M2"] / (sd["weight"] - 1)).numpy(), sd["tau"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_moving_statistics_are_exponentially_weighted_over_the_global_batch(world_size):
    data = activation_stream(STEPS, BATCH, S, H).astype(np.float64)
    # every sample of step t weighs beta^(age in steps), whichever rank saw it
    w = np.repeat(MOMENTUM ** np.arange(STEPS - 1, -1, -1), BATCH)[:, None, None]
    flat = data.reshape(-1, S, H)
    mean_ref = (w * flat).sum(0) / w.sum()
    var_ref = (w * (flat - mean_ref) ** 2).sum(0) / (w.sum() - 1)
    results = run_distributed(_momentum_dp_body, world_size) if world_size > 1 else [_momentum_dp_body(0, 1)]
    for n, weight, mean, var, tau in results:
        assert n == STEPS * BATCH and weight == pytest.approx(w.sum())
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var, var_ref, rtol=1e-4, atol=1e-5)
        assert tau == results[0][4]  # the global tracker is the same on every rank
    # a real window, not the cumulative statistics
    assert not np.allclose(var_ref, flat.var(0, ddof=1), rtol=1e-2)


@pytest.mark.parametrize("momentum", [1.0, MOMENTUM])
def test_resume_continues_bit_identically(momentum):
    data = activation_stream(2 * STEPS, BATCH, S, H)
    cfg = l2e_config(inhibition="none", stats_momentum=momentum)
    block, straight = attach_scale(cfg, S, H)
    run_steps(straight, block, data)
    block, first = attach_scale(cfg, S, H)
    run_steps(first, block, data[:STEPS])
    saved = torch.load(_roundtrip(first.state_dict()), weights_only=True)
    block, resumed = attach_scale(cfg, S, H)
    resumed.load_state_dict(saved)
    run_steps(resumed, block, data[STEPS:])
    want, got = straight.state_dict()["layers"][0], resumed.state_dict()["layers"][0]
    for key, value in want.items():
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), key


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
