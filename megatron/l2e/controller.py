"""The `L2E` object: the one place where training meets the method.

It hooks the chosen blocks from outside (``register_forward_hook``; the model code does
not know about L2E). For every training forward of a hooked site it

  1. computes d = z - mean against the statistics frozen at ``begin_step``,
  2. adds the micro-batch to the step's shifted sums           (statistics.py, eq. 1),
  3. scores phi and selects neurons                             (retrieval.py, eq. 6 / top-k),
  4. inhibits them                                              (inhibition.py, eq. 5 / RD / none),

and ``end_step`` merges the step's sums and selection counts over the data-parallel group
with one all-reduce, folds them into the running state and moves tau.

Activation checkpointing: nothing changes the running state between ``begin_step`` and
``end_step``, so recomputing a forward re-derives exactly the same selection from the
same z. ``recompute_context()`` only has to stop the recomputation from counting the
micro-batch a second time.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn as nn

from megatron.console import THIS_RANK
from megatron.errors import CheckpointError
from megatron.l2e.comm import all_reduce_sum_, group_rank, group_size
from megatron.l2e.inhibition import regularize, reverse_deactivate
from megatron.l2e.metrics import LayerLog, gather_layer_sums, log_metrics
from megatron.l2e.retrieval import Retrieval
from megatron.l2e.statistics import RunningMoments

log = logging.getLogger(__name__)


def l2e_blocks(stage_blocks: dict[int, nn.Module], cfg, num_layers: int) -> dict[int, nn.Module]:
    """The blocks of this pipeline stage that ``cfg.layers`` selects (global indices)."""
    chosen = set(cfg.resolve_layers(num_layers))
    return {i: b for i, b in stage_blocks.items() if i in chosen}


def _finite_marker(moments: RunningMoments) -> torch.Tensor:
    """0 when the step's shifted sums are finite, NaN otherwise (summed over ranks with
    the counts, so one all-reduce tells every rank)."""
    total = moments.s1.sum() + moments.s2.sum()
    return (total * 0).reshape(1).to(torch.float64)


class _Site:
    """One hooked layer: its statistics, its selection rule, its log accumulators."""

    def __init__(self, layer: int, width: int, lo: int, hi: int, gather_group, cfg, seq_length,
                 tp_group, device):
        self.layer = layer
        self.lo, self.hi = lo, hi  # the rank's channel slice of z
        self.sliced = gather_group is not None
        self.gather_group = gather_group  # tp group when z is replicated and we own a slice
        self.moments = RunningMoments((seq_length, hi - lo), cfg.eps, device=device,
                                      momentum=cfg.stats_momentum)
        self.retrieval = Retrieval(rate=cfg.rate, num_neurons=seq_length * width, mode=cfg.retrieval,
                                   warmup_steps=cfg.warmup_steps, threshold_lr=cfg.threshold_lr,
                                   update=cfg.threshold_update, tp_group=tp_group)
        self.frac = 0.0
        # the quantile diagnostic's own random stream: drawing from the global one would
        # change dropout and data order depending on the log interval
        self.generator = torch.Generator(device=device).manual_seed(1_000_003 * (layer + 1))
        self.quantile_samples = cfg.diagnostics_samples
        self.log = self.new_log()

    def new_log(self) -> LayerLog:
        return LayerLog(self.quantile_samples, self.generator)


class L2E:
    """Monosemantic-neuron inhibition attached to the blocks of one pipeline stage."""

    def __init__(self, cfg, sites: dict[int, _Site], dp_group, tp_group):
        self.cfg = cfg
        self.sites = sites
        self.dp_group, self.tp_group = dp_group, tp_group
        self.handles = []
        self.iteration = 0
        self.grad_scale = 1.0
        self._active = self._log = self._recomputing = False
        self._hook_time = 0.0
        self._t_begin = time.perf_counter()

    @classmethod
    def attach(cls, blocks: dict[int, nn.Module], cfg, *, seq_length: int, hidden_size: int,
               dp_group=None, tp_group=None) -> "L2E":
        """Hook ``blocks`` (global layer index -> Block on this stage, already selected,
        see `l2e_blocks`); ``hidden_size`` is the full model width."""
        tp, r = group_size(tp_group), group_rank(tp_group)
        sites = {}
        for i, block in blocks.items():
            device = next(block.parameters()).device
            if cfg.site == "block_output":
                # replicated [b, s, h]: rank r owns channels [r*h/tp, (r+1)*h/tp)
                width, local = hidden_size, hidden_size // tp
                lo, hi, gather = r * local, (r + 1) * local, tp_group
            else:
                # already the rank's shard [b, s, 4h/tp]
                local = block.mlp.dense_h_to_4h.weight.shape[0]
                width, lo, hi, gather = local * tp, 0, local, None
            sites[i] = _Site(i, width, lo, hi, gather, cfg, seq_length, tp_group, device)
        l2e = cls(cfg, sites, dp_group, tp_group)
        for i, block in blocks.items():
            module = block if cfg.site == "block_output" else block.mlp.act
            l2e.handles.append(module.register_forward_hook(l2e._make_hook(sites[i])))
        return l2e

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # ------------------------------------------------------------------ per step

    def begin_step(self, iteration: int, grad_scale: float, log: bool = False) -> None:
        self._t_begin = time.perf_counter()
        self.iteration, self.grad_scale, self._log = iteration, float(grad_scale), log
        self._active = True
        for s in self.sites.values():
            s.moments.begin_step()
            s.log = s.new_log()
        self._hook_time = time.perf_counter() - self._t_begin

    def end_step(self, commit: bool = True) -> dict[str, float]:
        """Fold the step's statistics and selection counts into the running state and
        move tau; ``commit=False`` (a skipped, non-finite step) drops them instead."""
        t0 = time.perf_counter()
        self._active = False
        if not commit:
            for s in self.sites.values():
                s.moments.reset_batch()
                s.retrieval.reset_step()
            return {f"l2e/tau/layer_{i}": s.retrieval.tau for i, s in self.sites.items()}
        self._merge_step()
        metrics = {}
        for i, s in self.sites.items():
            metrics[f"l2e/tau/layer_{i}"] = s.retrieval.tau
            metrics[f"l2e/selected_frac/layer_{i}"] = s.frac
        if self._log:
            local = {i: {"tau": s.retrieval.tau, "frac": s.frac, **s.log.sums()}
                     for i, s in self.sites.items()}
            metrics.update(log_metrics(gather_layer_sums(local), group_size(self.dp_group)))
        t1 = time.perf_counter()
        metrics["runtime/l2e_time_frac"] = (self._hook_time + t1 - t0) / max(t1 - self._t_begin, 1e-9)
        return metrics

    def _merge_step(self) -> None:
        """One all-reduce over dp (statistics of every layer + selection counts), one small
        all-reduce of the selected counts over tp; then Chan merge and the tau update."""
        if not self.sites:
            return
        sites = list(self.sites.values())
        sync = self.cfg.sync_stats and self.dp_group is not None
        parts = [t.flatten() for s in sites for t in (s.moments.s1, s.moments.s2)] if sync else []
        device = sites[0].moments.mean.device
        # [layers, 5]: m, selected, samples, kth_sum, finite (NaN when any sum is NaN/inf)
        counts = torch.stack([torch.cat([torch.tensor([float(s.moments.m)], dtype=torch.float64, device=device),
                                         s.retrieval.counts(device), _finite_marker(s.moments)]) for s in sites])
        flat = torch.cat(parts + [counts.flatten().float()]) if sync else counts.flatten()
        all_reduce_sum_(flat, self.dp_group)
        counts = flat[-counts.numel():].view_as(counts).double()
        if group_size(self.tp_group) > 1:
            counts[:, 1] = all_reduce_sum_(counts[:, 1].contiguous(), self.tp_group)
        offset = 0
        for s, (m, selected, samples, kth_sum, finite) in zip(sites, counts.tolist()):
            mom = s.moments
            if not math.isfinite(finite + kth_sum):
                # NaN/inf activations: neither the running statistics nor tau may absorb them
                # the layer's pipeline stage may not hold rank 0: its first dp/tp rank reports it
                first_of_stage = group_rank(self.dp_group) == 0 and group_rank(self.tp_group) == 0
                log.warning("L2E layer %d: non-finite activations at iteration %d; step's statistics dropped",
                            s.layer, self.iteration, extra=THIS_RANK if first_of_stage else None)
                offset += 2 * mom.mean.numel() if sync else 0
                mom.reset_batch()
                s.retrieval.reset_step()
                continue
            if sync:
                numel = mom.mean.numel()
                s1 = flat[offset:offset + numel].view_as(mom.mean)
                s2 = flat[offset + numel:offset + 2 * numel].view_as(mom.mean)
                offset += 2 * numel
                mom.merge(int(m), s1, s2)
            else:
                mom.merge(mom.m, mom.s1, mom.s2)
            mom.reset_batch()
            if samples > 0:
                s.frac = s.retrieval.end_step(selected, samples, kth_sum)
            else:
                s.retrieval.reset_step()

    # ------------------------------------------------------------------ the hook

    def _make_hook(self, site: _Site):
        def hook(module, inputs, z):
            if not self._active or not torch.is_grad_enabled():
                return None
            t0 = time.perf_counter()
            out = self._process(site, z)
            self._hook_time += time.perf_counter() - t0
            return out

        return hook

    def _process(self, site: _Site, z: torch.Tensor):
        cfg, mom = self.cfg, site.moments
        zl = z[..., site.lo:site.hi] if site.sliced else z
        if zl.shape[1:] != mom.mean.shape:
            raise ValueError(f"L2E layer {site.layer}: got activations {tuple(z.shape)}, expected "
                             f"[b, {mom.mean.shape[0]}, ...]; L2E needs every micro-batch at seq_length")
        counting = not self._recomputing
        d = mom.deviation(zl)
        d2 = d * d
        if counting:
            mom.accumulate(d, d2)
        if mom.var is None:  # fewer than 2 samples seen: no variance, nothing scored
            return None
        mask = site.retrieval.select(d2, mom.var, count=counting)
        if counting and self._log:
            site.log.record(d2, mom.var, mask, rate=cfg.rate, loss_weight=cfg.loss_weight, eps=cfg.eps)
        if cfg.inhibition == "regularize":
            return regularize(z, d, d2, mask, loss_weight=cfg.loss_weight, eps=cfg.eps,
                              grad_scale=self.grad_scale, tp_group=site.gather_group,
                              lo=site.lo, hi=site.hi, probe=site.log.probe if self._log else None)
        if cfg.inhibition == "reverse_deactivation":
            return reverse_deactivate(z, mask, mom.mean, site.gather_group)
        return None  # monitor only: the output object is returned untouched

    @contextlib.contextmanager
    def _recompute(self):
        previous, self._recomputing = self._recomputing, True
        try:
            yield
        finally:
            self._recomputing = previous

    def recompute_context(self):
        """Context manager for the recomputation pass of torch.utils.checkpoint
        (non-reentrant, ``context_fn=lambda: (nullcontext(), l2e.recompute_context())``)."""
        return self._recompute()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"iteration": self.iteration,
                "layers": {i: {**s.moments.state_dict(), **s.retrieval.state_dict()}
                           for i, s in self.sites.items()}}

    def load_state_dict(self, sd: dict) -> None:
        missing = sorted(set(self.sites) - set(sd["layers"]))
        if missing:
            raise CheckpointError(f"L2E state in the checkpoint has no layers {missing}; "
                                  "resume with the l2e.layers the run was started with")
        self.iteration = int(sd["iteration"])
        for i, s in self.sites.items():
            s.moments.load_state_dict(sd["layers"][i])
            s.retrieval.load_state_dict(sd["layers"][i])
