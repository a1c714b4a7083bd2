"""Keeping long runs alive: non-finite losses and preemption signals."""
from __future__ import annotations

import logging
import math
import signal

import torch
import torch.distributed as dist

from megatron.errors import UserError

log = logging.getLogger(__name__)


class TrainingError(UserError):
    """Training diverged (persistent NaN/inf loss); lower lr, raise warmup or use bf16."""


class NonFiniteLossGuard:
    """Counts NaN/inf losses and stops a run that keeps producing them.

    Under fp16 dynamic loss scaling an overflow is routine: DeepSpeed skips the
    step and lowers the scale, so such steps are only counted. Elsewhere (fp32,
    bf16, static fp16 scale) the step was not discarded, and ``nan_tolerance``
    consecutive non-finite losses abort the run before a poisoned checkpoint is
    written.
    """

    def __init__(self, args):
        self.tolerance = args.nan_tolerance
        self.consecutive = 0
        self.nan_iterations = 0
        self.skipped_iterations = 0

    def check(self, iteration: int, loss, skipped_by_loss_scaler: bool) -> None:
        loss = float(loss)
        if skipped_by_loss_scaler:
            self.skipped_iterations += 1
        if math.isfinite(loss):
            self.consecutive = 0
            return
        self.nan_iterations += 1
        if skipped_by_loss_scaler:
            log.warning("iteration %d: loss is %s; fp16 loss scaler skipped the step", iteration, loss)
            return
        self.consecutive += 1
        log.warning("iteration %d: loss is %s (%d in a row, tolerance %d)",
                    iteration, loss, self.consecutive, self.tolerance)
        if self.consecutive >= self.tolerance:
            raise TrainingError(
                f"training diverged: loss was non-finite for {self.consecutive} consecutive "
                f"iterations ending at iteration {iteration}; no checkpoint was written. "
                f"Resume from the last checkpoint with a lower lr / longer warmup, or raise nan_tolerance"
            )

    def metrics(self) -> dict:
        """Cumulative counters under the keys MetricsLogger prints."""
        return {"train/skipped_iters": self.skipped_iterations,
                "train/nan_iters": self.nan_iterations}


class PreemptionHandler:
    """Turns SIGTERM (schedulers, k8s) and SIGUSR1 (slurm ``--signal``) into a flag.

    The loop polls :meth:`requested` once per step; because the signal may reach only
    some ranks, the flag is max-reduced so every rank saves and exits together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.flag = False
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        log.warning("received %s: will save a checkpoint and exit after this step",
                    signal.Signals(signum).name)
        self.flag = True

    def requested(self, groups=None) -> bool:
        """True on every rank once any rank got a signal. ``groups`` is accepted for
        symmetry with the other training calls; the agreement must span the whole
        world, so the reduction uses the default group."""
        flag = torch.tensor([int(self.flag)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
