"""The three inhibitions: eq. 5's gradient, Reverse Deactivation, monitor-only bit-identity."""
import contextlib
import copy

import numpy as np
import pytest
import torch
from l2e_testlib import activation_stream, attach_scale, l2e_config, run_steps

from megatron.config.l2e import L2EConfig
from megatron.l2e import L2E, l2e_blocks
from megatron.model.gpt_neox import GPTNeoX, ModelConfig
from megatron.parallel.apply import apply_activation_checkpointing

S, H, B = 4, 16, 6


def _warm(cfg):
    """An L2E past its warm-up on a Scale block, plus the next step's input."""
    block, l2e = attach_scale(cfg, S, H)
    data = activation_stream(5, B, S, H, seed=3)
    run_steps(l2e, block, data[:4])
    block.zero_grad()
    # four steps of six samples leave heavy-tailed phi and a high tau; pick one that
    # selects a fair share so the comparisons below are not vacuous
    l2e.sites[0].retrieval.tau = 1.0
    return block, l2e, torch.from_numpy(data[4])


def _frozen(l2e):
    sd = l2e.state_dict()["layers"][0]
    var = (sd["M2"] / (sd["n"] - 1)).clamp_min(l2e.cfg.eps)
    return sd["mean"], var, sd["tau"]


@pytest.mark.parametrize("retrieval", ["moving_threshold", "topk"])
def test_regularizer_gradient_equals_autograd_of_eq5(retrieval):
    lam, eps, grad_scale = 1e-2, 1e-12, 3.5
    block, l2e, x = _warm(l2e_config(retrieval=retrieval, loss_weight=lam, eps=eps, warmup_steps=1))
    mean, var, tau = _frozen(l2e)
    head = torch.randn(B, S, H)

    l2e.begin_step(4, grad_scale)
    ((block(x) * head).sum() * grad_scale).backward()
    l2e.end_step()
    got = block.w.grad.clone()

    block.zero_grad()
    l2e.detach()
    z = block(x)
    phi = (z.detach() - mean) ** 2 / var
    if retrieval == "topk":
        mask = phi >= phi.flatten(1).topk(l2e.sites[0].retrieval.k, dim=1).values[:, -1].view(-1, 1, 1)
    else:
        mask = phi >= tau
    assert 0 < mask.sum() < mask.numel()
    l_ms = lam * torch.log((z - mean) ** 2 + eps)[mask].sum()
    (((z * head).sum() + l_ms) * grad_scale).backward()
    torch.testing.assert_close(got, block.w.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, (x * head).sum((0, 1)) * grad_scale)  # L_MS really contributed


def test_reverse_deactivation_replaces_and_negates():
    block, l2e, x = _warm(l2e_config(inhibition="reverse_deactivation", warmup_steps=1))
    mean, var, tau = _frozen(l2e)
    mask = (x - mean) ** 2 / var >= tau
    assert mask.any()
    xr = x.clone().requires_grad_(True)
    l2e.begin_step(4, 1.0)
    out = block(xr)
    head = torch.randn_like(out)
    (out * head).sum().backward()
    l2e.end_step()
    torch.testing.assert_close(out.detach(), torch.where(mask, mean, x))
    torch.testing.assert_close(xr.grad, torch.where(mask, -head, head))


def _tiny_gpt():
    torch.manual_seed(0)
    return GPTNeoX(ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4))


def _checkpointed(block, h, l2e, mode):
    if mode == "reentrant":  # DeepSpeed's pipeline style: the first forward runs without grad
        return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
    return torch.utils.checkpoint.checkpoint(
        block, h, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), l2e.recompute_context()))


def _train_grads(model, l2e, tokens, checkpoint=None):
    grads = []
    for it, x in enumerate(tokens):
        model.zero_grad()
        if l2e:
            l2e.begin_step(it, 1.0, log=True)
        if checkpoint:
            h = model.embed(x)
            for block in model.blocks:
                h = _checkpointed(block, h, l2e, checkpoint)
            logits = model.head(model.final_norm(h))
        else:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        if l2e:
            l2e.end_step()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("site", ["block_output", "mlp_act"])
def test_monitor_only_is_bit_identical(site):
    tokens = torch.randint(0, 64, (4, 3, 8), generator=torch.Generator().manual_seed(1))
    plain = _tiny_gpt()
    ref = _train_grads(plain, None, tokens)
    model = _tiny_gpt()
    cfg = L2EConfig(enabled=True, inhibition="none", site=site, warmup_steps=1)
    l2e = L2E.attach(l2e_blocks(dict(enumerate(model.blocks)), cfg, 4), cfg, seq_length=8, hidden_size=32)
    got = _train_grads(model, l2e, tokens)
    assert l2e.state_dict()["layers"][1]["n"] == 12  # it did watch every sample
    for g_ref, g in zip(ref, got):
        assert all(torch.equal(a, b) for a, b in zip(g_ref, g))


@pytest.mark.parametrize("inhibition,mode,site", [
    ("regularize", "non_reentrant", "block_output"),
    ("regularize", "reentrant", "block_output"),
    ("reverse_deactivation", "non_reentrant", "block_output"),
    ("regularize", "megatron", "block_output"),  # the training code's checkpoint_block
    ("regularize", "megatron", "mlp_act"),  # hook inside the recomputed region
])
def test_recompute_matches_plain_and_counts_once(inhibition, mode, site):
    tokens = torch.randint(0, 64, (4, 3, 8), generator=torch.Generator().manual_seed(2))
    cfg = L2EConfig(enabled=True, inhibition=inhibition, site=site, loss_weight=1e-2, warmup_steps=1)
    runs = []
    for checkpoint in (None, mode):
        model = _tiny_gpt()
        l2e = L2E.attach(l2e_blocks(dict(enumerate(model.blocks)), cfg, 4), cfg, seq_length=8, hidden_size=32)
        if checkpoint == "megatron":
            apply_activation_checkpointing(model, recompute_context=l2e.recompute_context)
            checkpoint = None
        runs.append((_train_grads(model, l2e, tokens, checkpoint), l2e.state_dict()))
    (g_plain, sd_plain), (g_ckpt, sd_ckpt) = runs
    for a, b in zip(g_plain[-1], g_ckpt[-1]):
        torch.testing.assert_close(a, b)
    for i in (1, 2):
        assert sd_ckpt["layers"][i]["n"] == 12  # recomputation did not count the samples again
        torch.testing.assert_close(sd_ckpt["layers"][i]["M2"], sd_plain["layers"][i]["M2"])
        assert sd_ckpt["layers"][i]["tau"] == pytest.approx(sd_plain["layers"][i]["tau"])


def test_resume_continues_identically():
    data = activation_stream(8, B, S, H, seed=5)
    cfg = l2e_config(loss_weight=1e-2, warmup_steps=2)
    block, l2e = attach_scale(cfg, S, H)
    run_steps(l2e, block, data[:4])
    l2e.sites[0].retrieval.tau = 1.0  # so that the steps after the resume do select neurons
    saved = copy.deepcopy(l2e.state_dict())
    block.zero_grad(set_to_none=True)
    block2 = copy.deepcopy(block)
    resumed = L2E.attach({0: block2}, cfg, seq_length=S, hidden_size=H)
    resumed.load_state_dict(saved)
    a = run_steps(l2e, block, data[4:])
    b = run_steps(resumed, block2, data[4:])
    for m_a, m_b in zip(a, b):
        m_a.pop("runtime/l2e_time_frac"), m_b.pop("runtime/l2e_time_frac")
        assert m_a == m_b and m_a["l2e/selected_frac/layer_0"] > 0
    assert torch.equal(block.w.grad, block2.w.grad)
    for key, value in l2e.state_dict()["layers"][0].items():
        other = resumed.state_dict()["layers"][0][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert np.isfinite(a[-1]["l2e/tau/layer_0"]) and a[-1]["l2e/tau/layer_0"] != saved["layers"][0]["tau"]


def test_log_step_metrics():
    block, l2e, x = _warm(l2e_config(loss_weight=1e-2, warmup_steps=1))
    (m,) = run_steps(l2e, block, x.numpy()[None], log=True)
    for key in ("tau", "selected_frac", "batch_quantile", "mean_selected_ms", "grad_ratio"):
        assert np.isfinite(m[f"l2e/{key}/layer_0"]), key
    assert m["l2e/grad_ratio/layer_0"] > 0 and m["train/l2e_loss"] != 0
    assert 0 <= m["runtime/l2e_time_frac"] <= 1
    # the mean MS of the selected neurons lies above the threshold that selected them
    assert m["l2e/mean_selected_ms/layer_0"] >= l2e.state_dict()["layers"][0]["tau"] - 1.0
