"""Non-finite steps are skipped everywhere: no weight, Adam, LR-schedule or L2E update,
the same decision on every rank, and a diverging run stops naming its last good
checkpoint without ever writing NaN weights or pruning the good checkpoint away."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed
from test_resume import ROOT, TINY, tiny_overrides

BASE = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
    "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
    "train_iters": 20, "lr_decay_iters": 20, "warmup": 0.1, "save": None, "log_dir": None,
    "l2e": {"enabled": True, "layers": [0, 1], "rate": 0.05, "loss_weight": 1.0e-3, "warmup_steps": 1},
}
CASES = {
    "fp32_zero0": {},
    "fp32_zero1_no_clipping": {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.0},
    "bf16_zero0": {"bf16": {"enabled": True}},
    "bf16_zero2": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
}


def _poison_losses(poisoned_steps: set, state: dict, only_rank=None):
    """Make lm_loss NaN during the listed train_step calls (the loop's and the pipeline's)."""
    import torch.distributed as dist

    from megatron.training import engine as engine_mod
    from megatron.training import loop

    real = engine_mod.lm_loss

    def lm_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        rank_hit = only_rank is None or dist.get_rank() == only_rank
        return loss * float("nan") if state["step"] in poisoned_steps and rank_hit else loss

    engine_mod.lm_loss = loop.lm_loss = lm_loss


def _snapshot(trainer) -> dict:
    engine = trainer.engine
    opt = engine.basic_optimizer
    state = {"params": [p.detach().float().clone() for p in engine.module.parameters()],
             "adam": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                      for group in opt.param_groups for p in group["params"]],
             "lr": engine.get_lr()[0]}
    if trainer.l2e is not None:
        state["l2e"] = trainer.l2e.state_dict()["layers"]  # its "iteration" is only a label
    return state


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _skip_one_step(rank, world_size, cases, only_rank=None):
    """Per case: 2 steps, a poisoned step 3 (must change nothing), then step 4 trains."""
    from megatron.config import NeoXArgs
    from megatron.parallel import ParallelGroups
    from megatron.training.engine import build_trainer
    from megatron.training.loop import micro_batches, train_step

    state = {"step": 0}
    _poison_losses({2}, state, only_rank)
    out = {}
    for name, overrides in cases.items():
        args = NeoXArgs.from_ymls([TINY], overrides={**BASE, **overrides})
        args.configure_world(world_size)
        args.set_vocab_size(256)
        groups = ParallelGroups.build(max(1, args.pipe_parallel_size), args.model_parallel_size)
        trainer = build_trainer(args, groups)
        gen = np.random.RandomState(groups.dp_rank)
        raw = ({"text": torch.from_numpy(gen.randint(1, 256, size=(2, 33)))} for _ in range(1000))
        batches = micro_batches(raw, eod=0, eod_mask_loss=False, pipe=trainer.is_pipe)
        results = []
        for it in range(4):
            state["step"] = it
            if it == 2:
                before = _snapshot(trainer)
            results.append(train_step(trainer, batches, it, groups.dp_group))
            if it == 2:
                now = _snapshot(trainer)
                unchanged = [k for k in before if not _same(before[k], now[k])] == []
        after = _snapshot(trainer)
        out[name] = {"skipped": [r["skipped"] for r in results], "nonfinite": [r["nonfinite"] for r in results],
                     "loss3_nan": bool(np.isnan(results[2]["lm_loss"])), "unchanged": unchanged,
                     "trains_after": not _same(before["params"], after["params"]),
                     "lr_moved_after": after["lr"] != before["lr"],
                     "engine_skipped": trainer.engine.skipped_steps}
    return out


def test_nonfinite_step_changes_nothing_in_fp32_and_bf16_with_zero_0_to_2():
    (out,) = run_distributed(_skip_one_step, world_size=1, args=(CASES,), init_deepspeed=True)
    for name, r in out.items():
        assert r["skipped"] == [False, False, True, False], name
        assert r["nonfinite"] == [False, False, True, False], name
        assert r["loss3_nan"] and r["unchanged"], name  # weights, Adam state+step, lr, L2E
        assert r["trains_after"] and r["lr_moved_after"] and r["engine_skipped"] == 1, name


@pytest.mark.distributed
def test_nonfinite_on_one_rank_skips_on_all_tp2_and_pipeline():
    cases = {"tp2": {"model_parallel_size": 2},
             "pp2": {"pipe_parallel_size": 2}}
    # Poison rank 1 only: under tp the other rank's loss is finite, yet both must skip.
    results = run_distributed(_skip_one_step, world_size=2, args=(cases, 1), init_deepspeed=True)
    for rank, out in enumerate(results):
        for name, r in out.items():
            assert r["skipped"] == [False, False, True, False], (rank, name)
            assert r["unchanged"] and r["trains_after"], (rank, name)


def _all_finite(step_dir: Path) -> bool:
    for path in step_dir.glob("*model_states.pt"):
        sd = torch.load(path, weights_only=True)
        module = sd.get("module", sd)
        if not all(torch.isfinite(v).all() for v in module.values() if torch.is_tensor(v)):
            return False
    return True


def _cli(*override):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), str(ROOT / "train.py"), TINY, "--override",
                           *override], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_diverging_run_exits_nonzero_naming_the_kept_finite_checkpoint(tmp_path):
    # l2e.loss_weight: 1e38 (finite: .inf itself is refused by the config) makes the
    # gradient norm overflow once L2E scores (step 2 on) while the lm loss stays finite:
    # steps 2, 3, 4 are skipped, the third stops the run.
    overrides = tiny_overrides(tmp_path, nan_tolerance=3, checkpoint_factor=1, keep_last_n_checkpoints=2,
                               train_iters=10, lr_decay_iters=10, log_interval=1)
    flat = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if k != "l2e"] + ["l2e.loss_weight=1e38"]
    result = _cli(*flat)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    save = tmp_path / "full"
    assert len(errors) == 1 and "3 consecutive non-finite steps ending at iteration 4" in errors[0]
    # Steps 2 and 3 were non-finite: their checkpoints are finite but not trustworthy,
    # so the error names global_step1 and pruning keeps it beside the last two.
    assert (save / "latest").read_text() == "global_step3" and str(save / "global_step1") in errors[0]
    kept = sorted(p.name for p in save.iterdir() if p.name.startswith("global_step"))
    assert kept == ["global_step1", "global_step2", "global_step3"]  # never a NaN one
    assert all(_all_finite(save / name) for name in kept)
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["iteration"]: r["train/skipped_iters"] for r in records if "train/skipped_iters" in r}
    assert skipped[1] == 0 and skipped[3] == 2
