"""What L2E logs (spec §7), and how the per-rank pieces become one set of numbers.

Per inhibited layer i:
  l2e/tau/layer_i             the threshold after this step's update (top-k: the step's mean k-th phi)
  l2e/selected_frac/layer_i   k*/N of this step, global over data- and tensor-parallel ranks
  l2e/batch_quantile/layer_i  exact (1 - rate) quantile of phi over each micro-batch's
                              (rank-local) neurons, averaged over micro-batches and ranks
  l2e/mean_selected_ms/layer_i  mean phi of the selected neurons
  l2e/grad_ratio/layer_i      ||dL_MS/dz|| / ||dL/dz arriving from above||, over the step
  train/l2e_loss              L_MS summed over layers, averaged over micro-batches and dp ranks
  runtime/l2e_time_frac       share of this rank's step wall time spent in L2E code

The last five are "expensive" and only gathered on log steps, with one all_gather_object
over the whole world so that layers living on other pipeline stages are reported too.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.l2e.inhibition import GradProbe, ms_loss_value

_SUMMED = ("loss", "forwards", "q_sum", "ms_sum", "ms_count", "added_sq", "incoming_sq")


def batch_quantile(phi: torch.Tensor, rate: float) -> torch.Tensor:
    """The exact (1 - rate) quantile of phi over every (sample, neuron) of the tensor."""
    flat = phi.flatten()
    k = max(1, round(rate * flat.numel()))
    return flat.kthvalue(flat.numel() - k + 1).values


class LayerLog:
    """Log-step accumulators of one layer on this rank (tensors: no host sync in forward)."""

    def __init__(self):
        self.forwards = 0
        self.loss = self.q_sum = self.ms_sum = self.ms_count = 0.0
        self.probe = GradProbe()

    def record(self, phi, d2, mask, *, rate, loss_weight, eps) -> None:
        self.forwards += 1
        self.loss = self.loss + ms_loss_value(d2, mask, loss_weight, eps)
        self.q_sum = self.q_sum + batch_quantile(phi, rate)
        self.ms_sum = self.ms_sum + torch.where(mask, phi, 0.0).sum()
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
