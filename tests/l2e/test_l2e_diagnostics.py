"""Cheap L2E diagnostics: the sampled batch quantile and the diagnostics schedule."""
import json
import math
from pathlib import Path

import pytest
import torch

from megatron.config.l2e import L2EConfig
from megatron.errors import ConfigError
from megatron.l2e.metrics import batch_quantile, diagnostics_due, sampled_quantile

ROOT = Path(__file__).resolve().parents[2]
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


def _pretrain(rank, world_size, overrides):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    return pretrain(NeoXArgs.from_ymls([str(ROOT / "configs" / "local" / "tiny.yml")], overrides=overrides))


def test_training_logs_every_step_but_diagnoses_every_fifth(tmp_path):
    from distributed import run_distributed

    overrides = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
        "train_iters": 12, "lr_decay_iters": 12, "log_interval": 1, "eval_interval": 100, "eval_iters": 0,
        "l2e.diagnostics_interval": 5, "l2e.warmup_steps": 2,
        "data_path": str(ROOT / "data" / "austen_bpe4k_text_document"),
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(tmp_path / "logs"), "save": None,
    }
    run_distributed(_pretrain, world_size=1, args=(overrides,), init_deepspeed=True)
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "train/lm_loss" in m]
    assert [m["iteration"] for m in logged] == list(range(1, 13))
    assert all("l2e/tau/layer_0" in m for m in logged)  # the cheap metrics: every line
    diagnosed = [m["iteration"] for m in logged if "l2e/batch_quantile/layer_0" in m]
    assert diagnosed == [5, 10, 12]  # and the last step
    assert all("train/l2e_loss" in m for m in logged if m["iteration"] in diagnosed)
