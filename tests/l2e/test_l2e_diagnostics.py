"""Cheap L2E diagnostics: the sampled batch quantile and the diagnostics schedule."""
import math

import pytest
import torch

from megatron.config.l2e import L2EConfig
from megatron.errors import ConfigError
from megatron.l2e.metrics import batch_quantile, diagnostics_due, sampled_quantile

RATE = 0.02


def _heavy_tailed_batch(seed: int):
    """d2 = (z - mean)^2 and var of a [b, S, H] layer whose neurons have unequal scales."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(32, 64, generator=g))  # per-neuron spread over ~e^±3
    d2 = (torch.randn(8, 32, 64, generator=g) * scale) ** 2
    var = (scale**2) * torch.exp(0.5 * torch.randn(32, 64, generator=g))  # stale statistics
    return d2, var


@pytest.mark.parametrize("samples", [1024, 4096])
def test_sampled_quantile_lies_within_the_documented_bound(samples):
    p, z = 1.0 - RATE, 4.0  # z = 4: a false failure has probability ~6e-5 per draw
    eps = z * math.sqrt(p * (1 - p) / samples) + 1.0 / samples
    rank_errors = []
    for seed in range(10):
        d2, var = _heavy_tailed_batch(seed)
        phi = (d2 / var).flatten()
        gen = torch.Generator().manual_seed(100 + seed)
        estimate = sampled_quantile(d2, var, RATE, samples, gen)
        rank = (phi <= estimate).double().mean().item()  # its level among the exact phis
        rank_errors.append(abs(rank - p))
        assert abs(rank - p) <= eps, f"seed {seed}: the estimate sits at level {rank:.4f}, not {p}±{eps:.4f}"
    # the bound is not vacuous: the estimate really is a sample's quantile, not the exact one
    assert max(rank_errors) > 0


def test_small_batches_get_the_exact_quantile():
    d2, var = _heavy_tailed_batch(0)
    exact = batch_quantile(d2 / var, RATE)
    gen = torch.Generator().manual_seed(0)
    assert sampled_quantile(d2, var, RATE, d2.numel(), gen) == exact
    assert sampled_quantile(d2, var, RATE, 0, gen) == exact


def test_the_sample_leaves_the_global_random_stream_alone():
    d2, var = _heavy_tailed_batch(1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sampled_quantile(d2, var, RATE, 256, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("log_interval,diagnostics_interval,expected", [
    (1, 10, [10, 20, 30]),   # logging every step: diagnostics every 10th
    (10, 10, [10, 20, 30]),  # every written line
    (15, 10, [15, 30]),      # lines rarer than the interval: every line
    (4, 10, [12, 24]),       # every third line
    (1, 1, list(range(1, 31))),
])
def test_diagnostics_schedule(log_interval, diagnostics_interval, expected):
    steps = [s for s in range(1, 31) if diagnostics_due(s, log_interval, diagnostics_interval)]
    assert steps == expected


@pytest.mark.parametrize("key,value", [("diagnostics_interval", 0), ("diagnostics_samples", -1)])
def test_bad_diagnostics_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"l2e.{key}"):
        L2EConfig.from_dict({key: value}, source="run.yml")
