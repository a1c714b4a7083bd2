"""Paper Fig. 12 on the tiny demo model, through pretrain() and metrics.jsonl.

Two short runs from configs/local/tiny.yml with the same seed and data: L2E (regularize)
and its monitor-only control. The moving threshold must track the batch's top-rho MS
quantile, and the inhibited layers must end with a lower top-rho MS under L2E. A third,
short run with L2E disabled must give the monitor run's losses bit for bit.
"""
import json
from pathlib import Path

import pytest

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "local" / "tiny.yml")
STEPS = 60
LAYERS = (1, 2)  # tiny.yml: mid2 of 4 layers
# |tau - q| / q averaged over the last three log lines, where q is the logged exact top-rho
# MS quantile; a tau frozen after the warm-up would be 0.3-0.9 off the final quantile. The
# quantile falls fast in a 60-step run (the running variance still holds the large early
# activations): the default multiplicative tracker follows it without tuning.
TRACKING_BOUND = 0.2


def _run(tmp: str, name: str, **overrides) -> dict:
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    log_dir = Path(tmp) / name
    base = {
        "seq_length": 64, "max_position_embeddings": 64,
        "train_iters": STEPS, "lr_decay_iters": STEPS, "log_interval": 4, "eval_interval": 10 * STEPS,  # no evaluation
        "data_path": str(ROOT / "data" / "austen_bpe4k_text_document"),
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(log_dir), "save": None,  # the tracker at its defaults
        "l2e.diagnostics_interval": 1,  # the quantile on every logged line
    }
    result = pretrain(NeoXArgs.from_ymls([TINY], overrides={**base, **overrides}))
    lines = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": result["lm_loss"], "logged": [m for m in lines if "train/lm_loss" in m]}


def _three_runs(rank, world_size, tmp):
    return {
        "l2e": _run(tmp, "l2e"),
        "monitor": _run(tmp, "monitor", **{"l2e.inhibition": "none"}),
        "disabled": _run(tmp, "disabled", exit_interval=12, **{"l2e.enabled": False}),
    }


def _tiny_l2e() -> dict:
    import yaml

    return yaml.safe_load(Path(TINY).read_text())["l2e"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    (result,) = run_distributed(_three_runs, world_size=1, args=(str(tmp_path_factory.mktemp("fig12")),),
                                init_deepspeed=True)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("run", ["l2e", "monitor"])
def test_tau_tracks_the_batch_quantile(runs, run):
    logged = runs[run]["logged"]
    warmup = _tiny_l2e()["warmup_steps"]
    after_warmup = next(m for m in logged if m["iteration"] > warmup + 1)
    frozen_gaps = []
    for i in LAYERS:
        tau, q = f"l2e/tau/layer_{i}", f"l2e/batch_quantile/layer_{i}"
        gap = sum(abs(m[tau] - m[q]) / m[q] for m in logged[-3:]) / 3
        assert gap < TRACKING_BOUND, f"{run} layer {i}: tau is {gap:.0%} off the batch quantile at the end"
        frozen_gaps.append(abs(after_warmup[tau] - logged[-1][q]) / logged[-1][q])
    # not met trivially: the quantile moved, and a tau frozen after the warm-up would miss it
    assert max(frozen_gaps) > 2 * TRACKING_BOUND


@pytest.mark.slow
def test_l2e_lowers_the_top_rho_ms_of_inhibited_layers(runs):
    l2e, monitor = runs["l2e"]["logged"][-1], runs["monitor"]["logged"][-1]
    assert l2e["iteration"] == monitor["iteration"] == STEPS
    for i in LAYERS:
        for key in (f"l2e/batch_quantile/layer_{i}", f"l2e/mean_selected_ms/layer_{i}"):
            assert l2e[key] < 0.7 * monitor[key], key


@pytest.mark.slow
def test_monitor_only_trains_bit_identically_to_l2e_disabled(runs):
    disabled, monitor = runs["disabled"]["losses"], runs["monitor"]["losses"]
    assert len(disabled) == 12
    assert disabled == monitor[:12]
    assert runs["l2e"]["losses"][:12] != disabled  # while the regularizer does change training
    assert not any("l2e/tau/layer_1" in m for m in runs["disabled"]["logged"])
