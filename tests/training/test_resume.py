"""Exact resume: train 10 steps saving at 5; a run resumed from step 5 reproduces
steps 6-10 bit for bit (losses, weights, and L2E's thresholds and statistics), for
pp=0 on one process and pp=2 on two. Then `finetune: true` loads only the weights."""
import json
from pathlib import Path

import pytest
import torch

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "local" / "tiny.yml")


def tiny_overrides(tmp_path, **extra):
    overrides = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "seq_length": 32, "max_position_embeddings": 32,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "train_iters": 10, "lr_decay_iters": 10, "warmup": 0.2,
        "log_interval": 5, "eval_interval": 100, "eval_iters": 0,
        "data_path": str(ROOT / "data" / "austen_bpe4k_text_document"),
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(tmp_path / "logs"), "save": str(tmp_path / "full"),
        "checkpoint_factor": 5,
        "l2e": {"enabled": True, "layers": [0, 1], "rate": 0.05, "loss_weight": 1.0e-3, "warmup_steps": 2},
    }
    overrides.update(extra)
    return overrides


def _train_resume_finetune(rank, world_size, full, resumed, finetune):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    return [pretrain(NeoXArgs.from_ymls([TINY], overrides=o)) for o in (full, resumed, finetune)]


def _final_state(save_dir):
    """Every tensor a step-10 checkpoint holds about the model and L2E, by file."""
    step = Path(save_dir) / "global_step10"
    state = {}
    for path in sorted(step.glob("*_extra_state.pt")):
        state[path.name] = torch.load(path, weights_only=True)["l2e"]
    for path in sorted(step.glob("layer_*-model_states.pt")):  # pipeline runs
        state[path.name] = torch.load(path, weights_only=True)
    for path in sorted(step.glob("mp_rank_*_model_states.pt")):  # pp=0 runs keep `module` here
        state[path.name] = torch.load(path, weights_only=True)["module"]
    return state


def _assert_same(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


@pytest.mark.parametrize("pipe_parallel_size,world_size", [(0, 1), (2, 2)])
def test_resume_from_step_5_reproduces_steps_6_to_10_exactly(tmp_path, pipe_parallel_size, world_size):
    full = tiny_overrides(tmp_path, pipe_parallel_size=pipe_parallel_size)
    resumed = tiny_overrides(tmp_path, pipe_parallel_size=pipe_parallel_size, load=str(tmp_path / "full"),
                             iteration=5, save=str(tmp_path / "resumed"))
    finetune = tiny_overrides(tmp_path, pipe_parallel_size=pipe_parallel_size, load=str(tmp_path / "full"),
                              finetune=True, train_iters=2, save=None, log_dir=str(tmp_path / "logs3"))
    results = run_distributed(_train_resume_finetune, world_size=world_size, args=(full, resumed, finetune),
                              init_deepspeed=True, timeout=600)
    first, second, tuned = results[0]
    assert second["iteration"] == 10 and len(first["lm_loss"]) == 10 and len(second["lm_loss"]) == 5
    # Bitwise: same data order, RNG, optimizer and L2E state, same reduction order.
    assert second["lm_loss"] == first["lm_loss"][5:]
    # finetune: the step-10 weights, but a new run from iteration 0 on the first batches.
    assert tuned["iteration"] == 2 and tuned["lm_loss"][0] < first["lm_loss"][0] - 0.1
    # Both runs wrote one metrics.jsonl: the resumed run replaced the lines after step 5.
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [5, 10]
    state_full, state_resumed = _final_state(tmp_path / "full"), _final_state(tmp_path / "resumed")
    assert any(v is not None for k, v in state_full.items() if k.endswith("_extra_state.pt"))
    _assert_same(state_resumed, state_full, "step-10 checkpoint")
