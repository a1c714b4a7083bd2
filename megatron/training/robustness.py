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


class NonFiniteStepCheck:
    """Skips every optimizer step whose loss or gradients are non-finite, on all ranks.

    Installed on a DeepSpeed engine, it wraps the step of the torch optimizer DeepSpeed
    drives (``engine.basic_optimizer``, which ZeRO, the bf16 wrapper and the pipeline
    engine all call with the fp32 gradients in ``.grad``). Before that step it checks
    the step's loss and the local gradient norm, sums [loss, non-finite flag] over the
    whole world in one all-reduce (so every tp/pp/dp rank takes the same decision) and
    reads both back in the step's single host sync: the loop reuses the summed loss
    instead of syncing again. A bad step is not applied at all: no weight or Adam
    moment/step-count update; the wrapped optimizer then reports ``overflow``, so
    DeepSpeed counts it in ``skipped_steps`` and leaves the LR schedule where it was,
    exactly as for an fp16 overflow. With fp32 and ZeRO 0 DeepSpeed has no check of its
    own, so the gradient norm is checked here (the clipping's norm when it sets
    ``known_norm``, else one foreach pass); with bf16, ZeRO 1/2 and fp16 DeepSpeed skips
    non-finite gradient norms itself before calling the optimizer, and this check adds
    the loss. ZeRO-3 steps its optimizer per parameter sub-group: the decision is taken
    at the first one (the loss and that sub-group's gradients) and applied to all.
    """

    def __init__(self, engine):
        self.engine = engine
        self._loss = None  # this rank's summed micro-batch losses (a tensor), if any
        self._decision = None  # (loss_sum, nonfinite) once taken this step
        self._outcome = None
        self.known_norm = None  # this step's gradient norm, when clipping computed it
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        inner, outer = engine.basic_optimizer, engine.optimizer
        self.check_grads = outer is inner or engine.zero_optimization_stage() == 3
        inner_step = inner.step

        def checked_inner_step(*args, **kwargs):
            if self._decide()[1]:
                return None
            return inner_step(*args, **kwargs)

        inner.step = checked_inner_step
        outer_step = outer.step  # the checked one when DeepSpeed uses ours directly

        def flagging_outer_step(*args, **kwargs):
            result = outer_step(*args, **kwargs)
            decision, self._decision = self._decision, None
            if decision is not None:
                self._outcome = decision
                if decision[1]:
                    outer.overflow = True  # DeepSpeed: skipped_steps += 1, no LR step
                elif outer is inner:
                    outer.overflow = False
            return result

        outer.step = flagging_outer_step

    def begin_step(self, loss: torch.Tensor | None) -> None:
        """``loss``: a tensor the loop sums its micro-batch losses into (pp=0); the
        pipeline engine's own ``total_loss`` is read when None."""
        self._loss, self._outcome = loss, None

    def outcome(self) -> tuple[float | None, bool]:
        """(world sum of the step's loss or None, non-finite) of the last step; the
        sum is None when DeepSpeed skipped the step before our check ran."""
        return self._outcome if self._outcome is not None else (None, False)

    def _decide(self) -> tuple[float, bool]:
        if self._decision is not None:
            return self._decision
        loss = self._loss if self._loss is not None else getattr(self.engine, "total_loss", None)
        if isinstance(loss, (list, tuple)):
            loss = sum(loss)
        grads = [p.grad for group in self.engine.basic_optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        norm, self.known_norm = self.known_norm, None
        if norm is None:
            checked = grads if self.check_grads else []
            norm = torch.nn.utils.get_total_norm(checked) if checked else torch.zeros((), device=device)
        loss_part = loss.detach().float().reshape(()).to(device) if loss is not None else torch.zeros((), device=device)
        bad = (~torch.isfinite(norm.float())).float() + (~torch.isfinite(loss_part)).float()
        both = torch.stack([loss_part, bad])
        if self.world_size > 1:
            dist.all_reduce(both)
        loss_sum, bad_count = both.tolist()  # the step's one host sync
        self._decision = (loss_sum, bad_count > 0)
        return self._decision


def check_finite_weights(engine, iteration: int, last_checkpoint: str | None) -> None:
    """Refuse to checkpoint NaN/inf weights (collective: every rank checks its shard).

    Skipped steps keep the weights finite; this catches what slips through (an fp16
    static loss scale, a finite step that overflows the weights).
    """
    params = [p.detach() for p in engine.module.parameters()]
    norm = torch.nn.utils.get_total_norm(params) if params else torch.zeros(())
    bad = (~torch.isfinite(norm.float())).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    if bad.item():
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        raise TrainingError(f"iteration {iteration}: the weights are NaN/inf, so no checkpoint was saved; "
                            f"{where}. Resume from it with a lower lr / longer warmup")


class NonFiniteLossGuard:
    """Counts non-finite and skipped steps and stops a run that keeps producing them.

    ``NonFiniteStepCheck`` already skipped a step whose loss or gradients were
    non-finite, so the weights are still those of the last finite step; after
    ``nan_tolerance`` such steps in a row the run stops with one line naming the last
    good checkpoint (``last_checkpoint``, kept up to date by the loop). An fp16 loss
    scaler's overflow skip is routine (the scale drops) and is only counted.
    """

    def __init__(self, args):
        self.tolerance = args.nan_tolerance
        self.consecutive = 0
        self.nan_iterations = 0
        self.skipped_iterations = 0
        self.last_checkpoint = None

    def check(self, iteration: int, loss, skipped: bool, nonfinite: bool = False) -> None:
        """``skipped``: the step was not applied; ``nonfinite``: its loss or gradients
        were NaN/inf (a non-finite ``loss`` counts as such too)."""
        nonfinite = nonfinite or not math.isfinite(float(loss))
        self.skipped_iterations += int(skipped)
        if not nonfinite:
            self.consecutive = 0
            return
        self.nan_iterations += 1
        self.consecutive += 1
        log.warning("iteration %d: non-finite loss or gradients (loss %s); step %s (%d in a row, tolerance %d)",
                    iteration, loss, "skipped" if skipped else "APPLIED", self.consecutive, self.tolerance)
        if self.consecutive >= self.tolerance:
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written")
            raise TrainingError(
                f"training diverged: {self.consecutive} consecutive non-finite steps ending at "
                f"iteration {iteration}; {where}. Resume from it with a lower lr / longer warmup, "
                f"or raise nan_tolerance"
            )

    def metrics(self) -> dict:
        """Cumulative counters under the keys MetricsLogger prints."""
        return {"train/skipped_iters": self.skipped_iterations,
                "train/nan_iters": self.nan_iterations}


class PreemptionHandler:
    """Turns SIGTERM (schedulers, k8s, deepy.py passing on its own), SIGINT (Ctrl-C)
    and SIGUSR1 (slurm ``--signal``) into a flag; a second SIGINT stops at once.

    The loop polls :meth:`requested` once per step; because the signal may reach only
    some ranks, the flag is max-reduced so every rank saves and exits together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.flag = False
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
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

    @classmethod
    def ignore_repeats(cls) -> None:
        """For a process that is exiting after the save it was asked for: a repeated
        request (sent again by a scheduler or a user, or one request reaching a rank
        twice) must not turn its clean exit into a death by signal."""
        for sig in cls.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
