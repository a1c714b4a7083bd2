"""L2E through real training: the DeepSpeed engine with pipeline and tensor parallelism.

One step's parameter gradients with the MS regularizer on are the same for pp=0, pp=1,
pp=2 and tp=2 (gradient accumulation 2, an inhibited layer in each pipeline stage: the
first stage receives its gradient from the next one and must add dL_MS/dz there), and so
are tau and the selected fraction after a few steps. (Fig. 12 through pretrain():
test_l2e_fig12.py.)
"""
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from test_equivalence import BASE, TINY, _assert_close_dicts, _layer_key, _merge_grads, _numpy, _RandomTokens  # noqa: E402

LAYERS = [1, 2]  # 4 layers over 2 stages: layer 1 on the first stage, layer 2 on the last
# A fast tracker (threshold_lr 5: the default multiplicative rule moves tau by up to a
# factor e per step) so tau comes down from the heavy-tailed warm-up within the few steps
# here: the moving threshold must select neurons at the compared step.
L2E_ON = {"enabled": True, "layers": LAYERS, "rate": 0.02, "warmup_steps": 2, "loss_weight": 1.0e-2,
          "threshold_lr": 5.0}
STEPS = 5  # step 0 only gathers statistics, 1-2 are the warm-up (top-k), 3-4 the moving threshold
GRAD_STEPS = (1, 4)
pytestmark = pytest.mark.distributed
# Raw gradients (no clipping), so a wrongly scaled L2E share cannot be normalised away.
COMMON = {**BASE, "l2e": L2E_ON, "gradient_clipping": 0.0, "train_batch_size": 8,
          "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}


def _train_l2e(rank, world_size, overrides):
    from megatron.config import NeoXArgs
    from megatron.data.data_utils import make_data_iterator
    from megatron.parallel import ParallelGroups
    from megatron.training.engine import build_trainer
    from megatron.training.loop import micro_batches, train_step

    args = NeoXArgs.from_ymls([TINY], overrides={**COMMON, **overrides})
    args.configure_world(world_size)
    args.set_vocab_size(256)
    groups = ParallelGroups.build(max(1, args.pipe_parallel_size), args.model_parallel_size)
    trainer = build_trainer(args, groups)
    engine = trainer.engine
    names = {id(p): _layer_key(n) for n, p in engine.module.named_parameters()}
    grads, step = {}, {"now": 0}

    def capture(optimizer, *_):
        if step["now"] in GRAD_STEPS:
            grads[step["now"]] = {names[id(p)]: p.grad.detach().clone()
                              for g in optimizer.param_groups for p in g["params"] if p.grad is not None}

    engine.optimizer.register_step_pre_hook(capture)
    raw = make_data_iterator(_RandomTokens(64, args.seq_length), args, groups.dp_rank, groups.dp_size)
    batches = micro_batches(raw, eod=0, eod_mask_loss=False, pipe=trainer.is_pipe)
    metrics = []
    for it in range(STEPS):
        step["now"] = it
        metrics.append(train_step(trainer, batches, it, groups.dp_group, log=True))
    return {"grads": {s: _numpy(g) for s, g in grads.items()}, "metrics": metrics,
            "tp_rank": groups.tp_rank}


def _layout(world_size, **overrides):
    results = run_distributed(_train_l2e, world_size=world_size, args=(overrides,), init_deepspeed=True)
    for r in results:
        r["grads"] = {s: {k: torch.from_numpy(v) for k, v in g.items()} for s, g in r["grads"].items()}
    return results


def _l2e_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("l2e/tau", "l2e/selected_frac"))}


@pytest.fixture(scope="module")
def reference():
    (single,) = _layout(1)
    return single


def _check_against(reference, grads_per_step: dict, metrics: list, what: str):
    for s in GRAD_STEPS:
        _assert_close_dicts(grads_per_step[s], reference["grads"][s], 1e-5, f"{what} step {s} grads")
    for got, want in zip(metrics, reference["metrics"]):
        got, want = _l2e_metrics(got), _l2e_metrics(want)
        assert set(got) == set(want) and got, what
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5), f"{what}: {k}"


def test_reference_run_really_inhibits(reference):
    last = reference["metrics"][-1]
    assert {f"l2e/tau/layer_{i}" for i in LAYERS} <= set(last)
    for i in LAYERS:
        # the L2E gradient is a visible share of the gradient at each inhibited layer
        assert last[f"l2e/grad_ratio/layer_{i}"] > 0.05
        assert 0.0 < last[f"l2e/selected_frac/layer_{i}"] < 0.2
    # tau moved after the warm-up: the moving threshold, not a constant, is compared
    taus = [m["l2e/tau/layer_1"] for m in reference["metrics"][1:]]
    assert len(set(taus)) == len(taus)


def test_l2e_gradients_are_visible_in_the_comparison(reference):
    """Without the regularizer the same step's gradients differ far beyond the tolerance."""
    (monitor,) = _layout(1, l2e={**L2E_ON, "inhibition": "none"})
    for s in GRAD_STEPS:
        with pytest.raises(AssertionError, match="differs"):
            _assert_close_dicts(monitor["grads"][s], reference["grads"][s], 1e-3, "monitor")


@pytest.mark.parametrize("pp", [1, 2])
def test_pipeline_parallel_l2e_matches_single_process(reference, pp):
    results = _layout(pp, pipe_parallel_size=pp)
    grads = {s: {k: v for r in results for k, v in r["grads"][s].items()} for s in GRAD_STEPS}
    for r in results:  # every stage reports every layer's tau (gathered on log steps)
        _check_against(reference, grads, r["metrics"], f"pp={pp}")


def test_tensor_parallel_l2e_matches_single_process(reference):
    shards = sorted(_layout(2, model_parallel_size=2), key=lambda r: r["tp_rank"])
    grads = {s: _merge_grads([r["grads"][s] for r in shards]) for s in GRAD_STEPS}
    for r in shards:
        _check_against(reference, grads, r["metrics"], "tp=2")
