"""Running per-neuron moments and the Monosemanticity Score (paper eq. 1).

    phi(z_j) = (z_j - zbar_j)^2 / S^2_j                                   (eq. 1)

zbar_j and S^2_j are the mean and sample variance of neuron j over every sample seen
*before* the current optimizer step (spec §2). They live in fp32 as Welford/Chan
accumulators (n, mean, M2) of shape [S, H_local].

Within a step the running state is frozen, so every micro-batch scores against the same
(mean, S^2) and only accumulates *shifted* batch sums

    m = #samples,   s1 = sum (z - mean),   s2 = sum (z - mean)^2

which simply add across micro-batches and data-parallel ranks (one all-reduce). At the
end of the step they fold into the running state with Chan's parallel formula written
for data shifted by the old mean:

    n' = n + m,   mean' = mean + s1 / n',   M2' = M2 + s2 - s1^2 / n'

Shifting by the running mean keeps s2 free of the catastrophic cancellation of a raw
sum of squares once the mean has settled.

Exponentially moving statistics (``stats_momentum`` beta < 1): before the merge the old
state's weight and M2 are scaled by beta, i.e. the same Chan merge of a batch of weight m
into a state of weight beta*w. Each past step's samples then weigh beta^age, and the state
is the exact weighted mean and M2 of everything seen (a window of ~1/(1 - beta) steps).
The weight w replaces the count in S^2 = M2 / (w - 1). With beta = 1 the scaling is a
multiplication by 1.0 and the statistics are bit-identical to the cumulative ones. The
merge still takes only the all-reduced sums, so dp and resume stay exact.
"""
from __future__ import annotations

import torch

from megatron.errors import CheckpointError


class RunningMoments:
    """Per-neuron (n, mean, M2) plus the current step's shifted batch sums."""

    def __init__(self, shape: tuple[int, ...], eps: float, device=None, momentum: float = 1.0):
        self.eps = eps
        self.momentum = momentum
        self.n = 0  # samples seen
        self.weight = 0.0  # their total weight: n when cumulative, sum of beta^age otherwise
        self.mean = torch.zeros(shape, dtype=torch.float32, device=device)
        self.M2 = torch.zeros(shape, dtype=torch.float32, device=device)
        self.var = None  # S^2 floored at eps, frozen for the current step; None while n < 2
        self.reset_batch()

    def reset_batch(self) -> None:
        self.m = 0
        self.s1 = torch.zeros_like(self.mean)
        self.s2 = torch.zeros_like(self.mean)

    def begin_step(self) -> None:
        """Freeze the scoring statistics for this step (nothing is scored while n < 2, or
        while a short moving window holds a weight below 2)."""
        scorable = self.n >= 2 and self.weight >= 2.0
        self.var = (self.M2 / (self.weight - 1.0)).clamp_min(self.eps) if scorable else None

    def deviation(self, z: torch.Tensor) -> torch.Tensor:
        """z - mean in fp32, [b, S, H_local]; reused for scoring, the sums and the loss."""
        return z.detach().float() - self.mean

    def accumulate(self, d: torch.Tensor, d2: torch.Tensor) -> None:
        self.m += d.shape[0]
        self.s1 += d.sum(0)
        self.s2 += d2.sum(0)

    def score(self, d2: torch.Tensor) -> torch.Tensor:
        """phi, eq. 1; only valid when ``var`` is set."""
        return d2 / self.var

    def merge(self, m: int, s1: torch.Tensor, s2: torch.Tensor) -> None:
        """Fold (possibly all-reduced) shifted sums into the running state."""
        if m == 0:
            return
        if self.momentum != 1.0:
            self.M2 *= self.momentum
        w_new = self.momentum * self.weight + m
        self.mean += s1 / w_new
        self.M2 += (s2 - s1 * s1 / w_new).clamp_min(0.0)
        self.n += m
        self.weight = w_new

    def variance(self) -> torch.Tensor:
        """Running sample variance S^2 (unfloored), for inspection and tests."""
        return self.M2 / max(self.weight - 1.0, 1.0)

    def state_dict(self) -> dict:
        return {"n": self.n, "weight": self.weight, "mean": self.mean.clone(), "M2": self.M2.clone()}

    def load_state_dict(self, sd: dict) -> None:
        if tuple(sd["mean"].shape) != tuple(self.mean.shape):
            raise CheckpointError(
                f"L2E statistics shape {tuple(sd['mean'].shape)} does not match this run's "
                f"{tuple(self.mean.shape)} (seq_length, hidden_size, l2e.site or tensor "
                "parallelism changed); resume with the original settings"
            )
        self.n = int(sd["n"])
        self.weight = float(sd.get("weight", self.n))  # checkpoints before stats_momentum: cumulative
        self.mean.copy_(sd["mean"])
        self.M2.copy_(sd["M2"])
        self.reset_batch()
