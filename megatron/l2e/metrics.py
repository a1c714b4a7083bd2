"""What L2E logs (spec §7), and how the per-rank pieces become one set of numbers.

Per inhibited layer i:
  l2e/tau/layer_i             the threshold after this step's update (top-k: the step's mean k-th phi)
  l2e/selected_frac/layer_i   k*/N of this step, global over data- and tensor-parallel ranks
  l2e/batch_quantile/layer_i  (1 - rate) quantile of phi over each micro-batch's (rank-local)
                              (sample, neuron) pairs, averaged over micro-batches and ranks:
                              exact when the micro-batch has at most ``l2e.diagnostics_samples``
                              pairs, else the quantile of that many pairs drawn at random
                              (see `sampled_quantile` for the error bound)
  l2e/mean_selected_ms/layer_i  mean phi of the selected neurons
  l2e/grad_ratio/layer_i      ||dL_MS/dz|| / ||dL/dz arriving from above||, over the step
  train/l2e_loss              L_MS summed over layers, averaged over micro-batches and dp ranks
  runtime/l2e_time_frac       share of this rank's step wall time spent in L2E code

The last five are "expensive" (the diagnostics) and only gathered on the log steps that
`diagnostics_due` picks, with one all_gather_object over the whole world so that layers
living on other pipeline stages are reported too.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.l2e.inhibition import GradProbe, ms_loss_value

_SUMMED = ("loss", "forwards", "q_sum", "ms_sum", "ms_count", "added_sq", "incoming_sq")


def diagnostics_due(step: int, log_interval: int, diagnostics_interval: int) -> bool:
    """Whether step ``step`` (1-based) gathers the diagnostics: log steps only, every one
    when log_interval >= diagnostics_interval, else every ceil(diagnostics_interval /
    log_interval)-th, so they run at most about once per diagnostics_interval steps
    whatever the log interval (and at the same steps after a resume)."""
    every = -(-diagnostics_interval // log_interval)
    return step % log_interval == 0 and (step // log_interval) % every == 0


def batch_quantile(phi: torch.Tensor, rate: float) -> torch.Tensor:
    """The exact (1 - rate) quantile of phi over every (sample, neuron) of the tensor."""
    flat = phi.flatten()
    k = max(1, round(rate * flat.numel()))
    return flat.kthvalue(flat.numel() - k + 1).values


def sampled_quantile(d2: torch.Tensor, var: torch.Tensor, rate: float, samples: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The (1 - rate) quantile of phi = d2 / var over the (sample, neuron) pairs of d2
    ([b, *var.shape]); exact when there are at most ``samples`` pairs (or samples = 0).

    Otherwise phi is evaluated at ``samples`` = n pairs drawn uniformly with replacement,
    i.e. n i.i.d. draws from the batch's empirical distribution of phi, and their
    k-th largest (k = round(rate n)) is returned. Its rank in the full batch is then
    binomial: for p = 1 - rate, with probability >= 1 - delta the estimate lies between
    the batch's exact quantiles at levels p - eps and p + eps, where

        eps = z sqrt(p (1 - p) / n)   (normal approximation of the order-statistic interval,
                                       z = 3 for delta ~ 0.3%)
        eps = sqrt(ln(2 / delta) / (2 n))   (distribution-free, Dvoretzky-Kiefer-Wolfowitz)

    At the default n = 8192 and rate 0.02: eps = 0.0046 (z = 3), i.e. between the exact
    97.5% and 98.5% quantiles; `tests/l2e/test_l2e_diagnostics.py` checks the bound.
    Cost: O(n) instead of a selection over all b * S * H pairs.
    """
    total = d2.numel()
    if samples <= 0 or total <= samples:
        return batch_quantile(d2 / var, rate)
    picks = torch.randint(total, (samples,), generator=generator, device=d2.device)
    phi = d2.flatten()[picks] / var.flatten()[picks % var.numel()]
    return batch_quantile(phi, rate)


class LayerLog:
    """Log-step accumulators of one layer on this rank (tensors: no host sync in forward)."""

    def __init__(self, quantile_samples: int = 0, generator: torch.Generator | None = None):
        self.forwards = 0
        self.loss = self.q_sum = self.ms_sum = self.ms_count = 0.0
        self.probe = GradProbe()
        self.quantile_samples, self.generator = quantile_samples, generator

    def record(self, d2, var, mask, *, rate, loss_weight, eps) -> None:
        self.forwards += 1
        self.loss = self.loss + ms_loss_value(d2, mask, loss_weight, eps)
        self.q_sum = self.q_sum + sampled_quantile(d2, var, rate, self.quantile_samples, self.generator)
        self.ms_sum = self.ms_sum + (torch.where(mask, d2, 0.0) / var).sum()
        self.ms_count = self.ms_count + mask.sum()

    def sums(self) -> dict[str, float]:
        values = dict(loss=self.loss, forwards=self.forwards, q_sum=self.q_sum, ms_sum=self.ms_sum,
                      ms_count=self.ms_count, added_sq=self.probe.added_sq,
                      incoming_sq=self.probe.incoming_sq)
        return {k: float(v) for k, v in values.items()}


def gather_layer_sums(local: dict[int, dict[str, float]]) -> list[dict[int, dict[str, float]]]:
    """Every rank's per-layer sums (all pipeline stages, tp and dp ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return everyone


def log_metrics(per_rank: list[dict[int, dict[str, float]]], dp_size: int) -> dict[str, float]:
    """Merge the ranks' sums into the logged values (tau/frac are identical across ranks)."""
    merged: dict[int, dict[str, float]] = {}
    for rank_sums in per_rank:
        for i, s in rank_sums.items():
            m = merged.setdefault(i, {**s, **{k: 0.0 for k in _SUMMED}, "loss_mean": 0.0})
            for k in _SUMMED:
                m[k] += s[k]
            # L_MS per micro-batch of this rank; tp slices add up, dp ranks are averaged below
            m["loss_mean"] += s["loss"] / max(s["forwards"], 1.0)
    out = {}
    total_loss = 0.0
    for i, m in sorted(merged.items()):
        out[f"l2e/tau/layer_{i}"] = m["tau"]
        out[f"l2e/selected_frac/layer_{i}"] = m["frac"]
        if m["forwards"]:
            out[f"l2e/batch_quantile/layer_{i}"] = m["q_sum"] / m["forwards"]
        if m["ms_count"]:
            out[f"l2e/mean_selected_ms/layer_{i}"] = m["ms_sum"] / m["ms_count"]
        if m["incoming_sq"]:
            out[f"l2e/grad_ratio/layer_{i}"] = math.sqrt(m["added_sq"] / m["incoming_sq"])
        total_loss += m["loss_mean"]
    out["train/l2e_loss"] = total_loss / dp_size
    return out
