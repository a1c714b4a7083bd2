"""Which neurons to inhibit: the moving threshold (paper eq. 6) or exact top-k.

A layer has N = S*H neurons per sample and the target is k = rate*N of them.

Moving threshold (L2E, Appendix A). During the first ``warmup_steps`` scored steps each
sample's exact k-th largest phi is computed, the sample's top k are selected, and tau is
the mean of those k-th values over the warm-up. Afterwards selection is one element-wise
comparison, phi >= tau, and once per optimizer step tau moves by one of two rules
(``threshold_update``), where k* is the number of selected (sample, neuron) pairs per
sample in the global batch:

    multiplicative (default):  tau <- tau * exp(threshold_lr * ETA * clip((k* - k) / k, -1, 1))
    additive (the paper):      tau <- tau + threshold_lr * (k* - k) / N               (eq. 6)

Too many selected raises tau, too few lowers it: a stochastic-approximation tracker of the
global (1 - rate) quantile of phi, with E[k*] -> k. Eq. 6's step is fixed in phi units,
so how fast it converges depends on the MS scale and on the batch (measured:
tools/bench/l2e_tracker.py, docs/BENCHMARKS.md). The multiplicative step is a fixed
fraction of tau per unit of relative count error, so it is scale-free: the loop gain is
ETA times the log-slope of the tail count, d log k*/d log tau (about 1-3 for MS tails),
whatever the scale of phi or the batch size. The clip bounds one step to a factor
exp(+-ETA) when the selection is far off (nothing or everything selected). It needs a
positive start, so with ``warmup_steps: 0`` the first scored step is still an exact one.

Top-k (MEmeL's retrieval, ``retrieval: topk``): every step works like the warm-up.

Under tensor parallelism each rank scores its own slice of the neurons; the exact k-th
value comes from every rank's local top-k candidates, all-gathered.
"""
from __future__ import annotations

import math

import torch

from megatron.l2e.comm import all_gather_last_dim

# Gain of the multiplicative rule per unit of relative count error (times threshold_lr):
# from 10x off, tau is within 5% in ~25 steps; at the target, batch noise moves it ~ETA*|k*-k|/k.
ETA = 0.2
# A multiplicative tau that reached 0 (a warm-up of constant activations, a long run of
# nothing selected) could never move again; phi is variance-normalised, so this is far
# below any quantile that means anything.
MIN_TAU = 1e-12


def kth_largest(phi: torch.Tensor, k: int, tp_group=None) -> torch.Tensor:
    """Per-sample k-th largest phi over all neurons of the layer (every tp rank's slice)."""
    flat = phi.flatten(1)
    candidates = flat.topk(min(k, flat.shape[1]), dim=1, sorted=False).values
    candidates = all_gather_last_dim(candidates, tp_group)
    return candidates.topk(k, dim=1, sorted=False).values.min(dim=1).values


class Retrieval:
    """Selection rule, threshold tau and this step's selection counts for one layer."""

    def __init__(self, *, rate: float, num_neurons: int, mode: str, warmup_steps: int,
                 threshold_lr: float, update: str = "multiplicative", tp_group=None):
        self.N = num_neurons
        self.k = max(1, round(rate * num_neurons))
        self.mode = mode
        self.update = update
        # a multiplicative tracker cannot start from tau = 0: at least one exact step
        self.warmup_steps = max(warmup_steps, 1) if update == "multiplicative" else warmup_steps
        self.threshold_lr = threshold_lr
        self.tp_group = tp_group
        self.tau = 0.0
        self.scored_steps = 0  # steps that had statistics to score against (n >= 2)
        self.warmup_sum = 0.0  # sum of per-sample k-th values over the warm-up
        self.warmup_samples = 0
        self.reset_step()

    def reset_step(self) -> None:
        self.selected = torch.zeros((), dtype=torch.float64)  # tensor: no host sync per forward
        self.samples = 0
        self.kth_sum = torch.zeros((), dtype=torch.float64)

    @property
    def exact(self) -> bool:
        """True while selection needs the exact per-sample k-th value."""
        return self.mode == "topk" or self.scored_steps < self.warmup_steps

    def select(self, d2: torch.Tensor, var: torch.Tensor, count: bool) -> torch.Tensor:
        """Boolean mask of the selected neurons, from d2 = (z - mean)^2 and S^2 = var;
        ``count`` adds them to this step's tallies."""
        if self.exact:
            phi = d2 / var
            kth = kth_largest(phi, self.k, self.tp_group)
            mask = phi >= kth.view(-1, *([1] * (phi.dim() - 1)))
            if count:
                self.kth_sum = self.kth_sum + kth.sum().to(self.kth_sum)
        else:
            mask = d2 >= self.tau * var  # phi >= tau without materialising phi
        if count:
            self.selected = self.selected.to(d2.device) + mask.sum()
            self.samples += d2.shape[0]
        return mask

    def counts(self, device=None) -> torch.Tensor:
        """[selected, samples, kth_sum] of this step (float64), to be summed over ranks."""
        parts = (self.selected, torch.tensor(float(self.samples)), self.kth_sum)
        return torch.stack([p.to(device=device, dtype=torch.float64) for p in parts])

    def end_step(self, selected: float, samples: float, kth_sum: float) -> float:
        """Update tau from the global counts of a scored step; returns k*/N."""
        frac = selected / (samples * self.N)
        was_exact = self.exact
        self.scored_steps += 1
        if self.mode == "topk":
            self.tau = kth_sum / samples  # reported only: the step's mean k-th phi
        elif was_exact:
            self.warmup_sum += kth_sum
            self.warmup_samples += int(samples)
            self.tau = self.warmup_sum / self.warmup_samples
        elif self.update == "additive":
            self.tau += self.threshold_lr * (frac - self.k / self.N)  # eq. 6: (k* - k) / N
        else:
            error = min(max(frac * self.N / self.k - 1.0, -1.0), 1.0)  # (k* - k) / k, clipped
            self.tau = max(self.tau, MIN_TAU) * math.exp(self.threshold_lr * ETA * error)
        self.reset_step()
        return frac

    def state_dict(self) -> dict:
        return {"tau": self.tau, "scored_steps": self.scored_steps,
                "warmup_sum": self.warmup_sum, "warmup_samples": self.warmup_samples}

    def load_state_dict(self, sd: dict) -> None:
        self.tau = float(sd["tau"])
        self.scored_steps = int(sd["scored_steps"])
        self.warmup_sum = float(sd["warmup_sum"])
        self.warmup_samples = int(sd["warmup_samples"])
        self.reset_step()
