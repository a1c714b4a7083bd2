"""Tensor parallelism: 2 ranks with disjoint neuron slices behave like one process."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from l2e_testlib import ActSite, activation_stream, attach_scale, l2e_config, run_steps

from megatron.l2e import L2E

STEPS, BATCH, S, H = 4, 8, 3, 8


def _numpy_state(l2e) -> dict:
    """Layer 0's state with numpy arrays: a worker returning tensors would share their
    storage through torch's resource sharer, which can vanish as the worker exits."""
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in l2e.state_dict()["layers"][0].items()}


def _block_output_run(cfg, tp_group=None):
    """Returns (state, dL/dx of the last step, the last output) for a Scale block."""
    block, l2e = attach_scale(cfg, S, H, tp_group=tp_group)
    data = activation_stream(STEPS, BATCH, S, H)
    run_steps(l2e, block, data[:-1])
    x = torch.from_numpy(data[-1]).requires_grad_(True)
    l2e.begin_step(STEPS, 2.0)
    out = block(x)
    (out * torch.linspace(-1, 1, H)).sum().backward()
    l2e.end_step()
    return _numpy_state(l2e), x.grad.numpy(), out.detach().numpy()


def _block_output_body(rank, world_size, cfg):
    return _block_output_run(cfg, tp_group=dist.group.WORLD)


@pytest.mark.parametrize("inhibition", ["regularize", "reverse_deactivation"])
def test_block_output_slices_match_single_process(inhibition):
    cfg = l2e_config(inhibition=inhibition, loss_weight=1e-2, warmup_steps=2)
    ref, grad_ref, out_ref = _block_output_run(cfg)
    results = run_distributed(_block_output_body, 2, args=(cfg,))
    np.testing.assert_allclose(np.concatenate([r[0]["mean"] for r in results], -1), ref["mean"], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([r[0]["M2"] for r in results], -1), ref["M2"], rtol=1e-5)
    assert not np.allclose(results[0][0]["mean"], results[1][0]["mean"])  # really different slices
    for sd, grad, out in results:
        assert sd["tau"] == pytest.approx(ref["tau"], rel=1e-6)  # counts and k-th values span both slices
        # the replicated output and its gradient are identical on every rank and to one process
        np.testing.assert_allclose(out, out_ref, rtol=1e-6)
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)
    grad_plain = np.broadcast_to(np.linspace(-1, 1, H, dtype=np.float32), grad_ref.shape)
    assert not np.allclose(grad_ref, grad_plain)  # the inhibition did act


def _mlp_act_run(rank, world_size):
    """Each rank sees its own column shard of a [.., S, 2H] activation stream."""
    tp = world_size
    data = activation_stream(STEPS, BATCH, S, 2 * H, seed=7)
    shard = np.array_split(data, tp, axis=-1)[rank] if tp > 1 else data
    block = ActSite(shard.shape[-1])
    cfg = l2e_config(site="mlp_act", loss_weight=1e-2, warmup_steps=2)
    l2e = L2E.attach({0: block}, cfg, seq_length=S, hidden_size=H // 2,
                     tp_group=dist.group.WORLD if tp > 1 else None)
    grads = []
    for it, batch in enumerate(shard):
        l2e.begin_step(it, 1.0)
        x = torch.from_numpy(batch).requires_grad_(True)
        block(x).sum().backward()
        l2e.end_step()
        grads.append(x.grad.numpy())
    return _numpy_state(l2e), np.stack(grads)


def test_mlp_act_shards_match_single_process():
    ref, grads_ref = _mlp_act_run(0, 1)
    results = run_distributed(_mlp_act_run, 2)
    np.testing.assert_allclose(np.concatenate([r[0]["M2"] for r in results], -1), ref["M2"], rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results], -1), grads_ref, rtol=1e-5, atol=1e-7)
    for sd, _ in results:
        assert sd["tau"] == pytest.approx(ref["tau"], rel=1e-6)
