"""The moving threshold tracks the (1 - rate) quantile; top-k selects exactly k per sample."""
import math

import numpy as np
import pytest
import torch
from l2e_testlib import attach_scale, l2e_config
from scipy.stats import chi2

from megatron.l2e.retrieval import ETA, Retrieval, kth_largest


def test_tracker_converges_on_stationary_stream():
    S, H, B, rate = 8, 64, 16, 0.02
    block, l2e = attach_scale(l2e_config(inhibition="none", rate=rate, warmup_steps=5), S, H)
    gen = torch.Generator().manual_seed(0)
    fracs = []
    for it in range(700):
        l2e.begin_step(it, 1.0)
        block(1.5 + 2.0 * torch.randn(B, S, H, generator=gen))  # monitor only: no backward needed
        m = l2e.end_step()
        fracs.append(m["l2e/selected_frac/layer_0"])
    # phi of a Gaussian neuron with known moments is chi-square(1)
    true_quantile = chi2.ppf(1 - rate, df=1)
    assert m["l2e/tau/layer_0"] == pytest.approx(true_quantile, rel=0.05)
    assert 0.8 * rate <= np.mean(fracs[-100:]) <= 1.25 * rate


def test_threshold_moves_by_eq6():
    r = Retrieval(rate=0.1, num_neurons=100, mode="moving_threshold", warmup_steps=0, threshold_lr=0.5,
                  update="additive")
    r.tau = 2.0
    r.end_step(selected=30.0, samples=1.0, kth_sum=0.0)  # k* = 30 > k = 10: tau rises
    assert r.tau == pytest.approx(2.0 + 0.5 * (30 - 10) / 100)
    r.end_step(selected=0.0, samples=2.0, kth_sum=0.0)  # none selected: tau falls
    assert r.tau == pytest.approx(2.1 - 0.5 * 10 / 100)


def test_multiplicative_step_is_relative_and_clipped():
    r = Retrieval(rate=0.1, num_neurons=100, mode="moving_threshold", warmup_steps=0, threshold_lr=0.5)
    assert r.warmup_steps == 1  # needs a positive start: one exact step even with warmup_steps 0
    r.scored_steps, r.tau = 1, 2.0
    r.end_step(selected=15.0, samples=1.0, kth_sum=0.0)  # k* = 15, k = 10: +50% relative error
    assert r.tau == pytest.approx(2.0 * math.exp(0.5 * ETA * 0.5))
    tau = r.tau
    r.end_step(selected=400.0, samples=2.0, kth_sum=0.0)  # k* = 200: the step is clipped at +1
    assert r.tau == pytest.approx(tau * math.exp(0.5 * ETA))
    tau = r.tau
    r.end_step(selected=0.0, samples=2.0, kth_sum=0.0)  # none selected: the largest fall
    assert r.tau == pytest.approx(tau * math.exp(-0.5 * ETA))
    r.tau = 0.0  # e.g. a warm-up of constant activations: tau must still be able to rise
    r.end_step(selected=400.0, samples=2.0, kth_sum=0.0)
    assert r.tau > 0.0


def test_warmup_tau_is_mean_of_kth_values():
    r = Retrieval(rate=0.25, num_neurons=8, mode="moving_threshold", warmup_steps=2, threshold_lr=1.0)
    phis = [torch.tensor([[1., 2, 3, 4, 5, 6, 7, 8]]), torch.tensor([[10., 0, 0, 0, 0, 0, 0, 20]])]
    for phi in phis:  # k = 2: second largest is 7, then 10
        assert r.exact
        mask = r.select(phi.view(1, 2, 4), torch.ones(2, 4), count=True)
        assert int(mask.sum()) == 2
        r.end_step(*r.counts().tolist())
    assert not r.exact and r.tau == pytest.approx((7 + 10) / 2)


def test_topk_selects_exactly_k_per_sample():
    phi = torch.rand(5, 4, 32)
    r = Retrieval(rate=0.05, num_neurons=128, mode="topk", warmup_steps=0, threshold_lr=1.0)
    mask = r.select(2.0 * phi, torch.full((4, 32), 2.0), count=False)  # phi = d2 / var
    assert mask.flatten(1).sum(1).tolist() == [r.k] * 5
    ref = phi.flatten(1).topk(r.k, dim=1).values.min(1).values
    assert torch.equal(kth_largest(phi, r.k), ref)
    for i in range(5):  # every selected value beats every unselected one
        assert phi[i][mask[i]].min() > phi[i][~mask[i]].max()
