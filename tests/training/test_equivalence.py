"""TP=2, PP=2 and DP=2 (ZeRO-1) train exactly like one process (fp32, gloo).

Every layout draws its own layers (shards) from the seed layer by layer, never the
whole model, reads the same global batches through the real data iterator, and runs
the real DeepSpeed engine. We compare the merged initial weights (bit for bit), the
losses, the merged gradient of the first step (as the optimizer sees it, after
clipping) and the merged weights after the last step.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "local" / "tiny.yml")
VOCAB = 256
STEPS = 5
# Weights after STEPS Adam updates: per-element steps m/sqrt(v) amplify the ~1e-7 rounding
# differences of sharded matmuls where gradients are small; losses and first gradients
# are held to 1e-5.
WEIGHT_TOL = 1e-4
BASE = {
    "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
    "seq_length": 32, "max_position_embeddings": 32,
    "train_iters": 50, "lr_decay_iters": 50, "warmup": 0.04,
    "l2e": {"enabled": False}, "save": None, "log_dir": None, "log_interval": 1,
}
# Per-parameter norms on every step (ZeRO-0 layouts; ZeRO shards the gradients).
PER_PARAM = {"log_grad_norm": True, "log_param_norm": True, "log_grad_pct_zeros": True,
             "log_optimizer_states": True}


class _RandomTokens:
    """A dataset of fixed random rows, indexable like GPT2Dataset."""

    def __init__(self, n, seq):
        self.tokens = np.random.RandomState(0).randint(0, VOCAB, size=(n, seq + 1)).astype(np.int64)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, k):
        return {"text": self.tokens[k]}


def _layer_key(name: str) -> str:
    return name.removeprefix("sequential.")


def _numpy(d: dict) -> dict:
    return {k: v.cpu().numpy() for k, v in d.items()}


def _train(rank, world_size, overrides, steps):
    from megatron.config import NeoXArgs
    from megatron.data.data_utils import make_data_iterator
    from megatron.parallel import ParallelGroups
    from megatron.training.engine import build_trainer
    from megatron.training.loop import micro_batches, train_step

    args = NeoXArgs.from_ymls([TINY], overrides={**BASE, **overrides})
    args.configure_world(world_size)
    args.set_vocab_size(VOCAB)
    groups = ParallelGroups.build(max(1, args.pipe_parallel_size), args.model_parallel_size)
    trainer = build_trainer(args, groups)
    engine = trainer.engine
    init_params = {_layer_key(k): v.detach().clone() for k, v in engine.module.state_dict().items()}

    names = {id(p): _layer_key(n) for n, p in engine.module.named_parameters()}
    first_grads = {}

    def capture(optimizer, *_):
        if first_grads:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in names and p.grad is not None:
                    first_grads[names[id(p)]] = p.grad.detach().clone()

    if isinstance(engine.optimizer, torch.optim.Optimizer):  # ZeRO-0: our AdamW itself
        engine.optimizer.register_step_pre_hook(capture)
    raw = make_data_iterator(_RandomTokens(256, args.seq_length), args, groups.dp_rank, groups.dp_size)
    batches = micro_batches(raw, eod=0, eod_mask_loss=False, pipe=trainer.is_pipe)
    losses, norms = [], []
    for it in range(steps):
        losses.append(train_step(trainer, batches, it, groups.dp_group)["lm_loss"])
        norms.append(trainer.norms.metrics())
    params = {_layer_key(k): v.detach().clone() for k, v in engine.module.state_dict().items()}
    # numpy, not tensors: torch would share tensor storage with the (exiting) worker
    return {"losses": losses, "norms": norms, "grads": _numpy(first_grads), "params": _numpy(params),
            "init_params": _numpy(init_params), "tp_rank": groups.tp_rank,
            "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank}


_ROW = ("attention.dense.weight", "dense_4h_to_h.weight")
_REPLICATED_GRAD = ("norm.", "layernorm.", "attention.dense.bias", "dense_4h_to_h.bias")


def _merge_grads(per_tp_rank: list[dict]) -> dict:
    """Full gradients from shards. Unlike weights, a row-parallel bias shard's gradient is
    the full bias gradient on every rank (each shard is added once), like the norms'."""
    merged = {}
    for key in per_tp_rank[0]:
        parts = [r[key] for r in per_tp_rank]
        if any(tag in key for tag in _REPLICATED_GRAD):
            merged[key] = parts[0]
        else:
            merged[key] = torch.cat(parts, dim=1 if key.endswith(_ROW) else 0)
    return merged


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _without_key_bias(sd: dict) -> dict:
    """Drop the key part of every QKV bias. On the channels rotary leaves alone it adds the
    same score to all of a query's keys, which the softmax ignores: its exact gradient is
    zero, so Adam turns rounding noise of ~1e-10 into full-size steps, differently per layout."""
    heads = BASE["num_attention_heads"]
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith("query_key_value.bias"):
            qkv = v.view(heads, 3, -1)
            out[k] = torch.cat([qkv[:, 0], qkv[:, 2]], dim=-1)
    return out


def _assert_close_dicts(got: dict, want: dict, tol: float, what: str):
    assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    got, want = _without_key_bias(got), _without_key_bias(want)
    worst = max(((_rel(got[k], want[k]), k) for k in want), key=lambda t: t[0])
    assert worst[0] < tol, f"{what}: {worst[1]} differs by {worst[0]:.2e} (relative norm)"


def _assert_equal_dicts(got: dict, want: dict, what: str):
    """Bit for bit: every layout draws the same initial weights from the seed."""
    assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {differ} differ"


@pytest.fixture(scope="module")
def single():
    overrides = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
                 "gradient_accumulation_steps": 2, **PER_PARAM}
    (result,) = run_distributed(_train, world_size=1, args=(overrides, STEPS), init_deepspeed=True)
    return _tensors(result)


def _tensors(result: dict) -> dict:
    for key in ("grads", "params", "init_params"):
        result[key] = {k: torch.from_numpy(v) for k, v in result[key].items()}
    return result


def _check_losses(results, single, per_param=True):
    for r in results:
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
        # the global pre-clip gradient norm, on every rank whatever the layout
        np.testing.assert_allclose([m["train/grad_norm"] for m in r["norms"]],
                                   [m["train/grad_norm"] for m in single["norms"]], rtol=1e-5)
    if not per_param:
        return
    writer = results[0]["norms"]  # global rank 0 gathers the per-parameter norms
    # (exact-zero gradient counts are rounding-dependent: checked to exist, not to match)
    per_param = [k for k in writer[0] if k.startswith(("gradient_norms/", "parameter_norms/",
                                                       "optimizer_state_norms/exp_avg/"))]
    assert len(per_param) > 0 and any(k.startswith("pct_grad_zeros/") for k in writer[0])
    for got, want in zip(writer, single["norms"]):
        assert set(got) >= set(per_param)
        np.testing.assert_allclose([got[k] for k in per_param], [want[k] for k in per_param],
                                   rtol=1e-4, atol=1e-7)
    # the losses actually move, so matching them is not vacuous
    assert single["losses"][0] != single["losses"][-1]


def test_tensor_parallel_matches_single_process(single):
    from megatron.checkpoint.layout import merge_tp_shards

    overrides = {"model_parallel_size": 2, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
                 "gradient_accumulation_steps": 2, **PER_PARAM}
    results = [_tensors(r) for r in run_distributed(_train, world_size=2, args=(overrides, STEPS), init_deepspeed=True)]
    _check_losses(results, single)
    shards = sorted(results, key=lambda r: r["tp_rank"])
    assert shards[0]["grads"]["2.attention.query_key_value.weight"].shape[0] * 2 == \
        single["grads"]["2.attention.query_key_value.weight"].shape[0]  # really sharded
    _assert_equal_dicts(merge_tp_shards([r["init_params"] for r in shards]), single["init_params"], "TP init")
    _assert_close_dicts(_merge_grads([r["grads"] for r in shards]), single["grads"], 1e-5, "TP grads")
    _assert_close_dicts(merge_tp_shards([r["params"] for r in shards]), single["params"], WEIGHT_TOL, "TP weights")


def test_pipeline_parallel_matches_single_process(single):
    overrides = {"pipe_parallel_size": 2, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
                 "gradient_accumulation_steps": 2, **PER_PARAM}
    results = [_tensors(r) for r in run_distributed(_train, world_size=2, args=(overrides, STEPS), init_deepspeed=True)]
    _check_losses(results, single)
    stage_keys = [set(r["params"]) for r in results]
    assert not stage_keys[0] & stage_keys[1]  # each stage holds its own layers only
    grads = {k: v for r in results for k, v in r["grads"].items()}
    params = {k: v for r in results for k, v in r["params"].items()}
    _assert_equal_dicts({k: v for r in results for k, v in r["init_params"].items()}, single["init_params"], "PP init")
    _assert_close_dicts(grads, single["grads"], 1e-5, "PP grads")
    _assert_close_dicts(params, single["params"], WEIGHT_TOL, "PP weights")


def test_data_parallel_zero1_matches_single_process(single):
    overrides = {"zero_optimization": {"stage": 1}, "train_batch_size": 4,
                 "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    results = [_tensors(r) for r in run_distributed(_train, world_size=2, args=(overrides, STEPS), init_deepspeed=True)]
    _check_losses(results, single, per_param=False)
    for r in results:  # ZeRO-1 all-gathers the updated partitions into every replica
        _assert_close_dicts(r["params"], single["params"], WEIGHT_TOL, f"DP rank {r['dp_rank']} weights")
