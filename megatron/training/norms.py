"""Gradient and parameter norms of each optimizer step, as NeoX logs them.

``train/grad_norm`` (every step) is the global L2 norm of the gradient before clipping,
over the whole model whatever the tp/pp layout. DeepSpeed's mixed-precision and ZeRO
optimizers compute it themselves (``engine.get_global_grad_norm()``); for a plain torch
optimizer (fp32, ZeRO-0) DeepSpeed only computes it inside clipping and drops it, so we
compute it here: each distinct tensor counted once (the ``model_parallel`` flags set by
engine._mark_for_grad_norm), summed over the model-parallel group.

On log steps the per-parameter keys NeoX names ``gradient_norms/*`` (``log_grad_norm``),
``pct_grad_zeros/*`` (``log_grad_pct_zeros``), ``parameter_norms/*`` (``log_param_norm``)
and ``optimizer_state_norms/*`` (``log_optimizer_states``) are gathered onto global rank 0,
full tensors even when sharded.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.errors import ConfigError


def is_log_step(args, iteration: int) -> bool:
    return iteration % args.log_interval == 0 or iteration == args.train_iters


def _counted_here(p, tp_rank: int) -> bool:
    """True on the one rank that adds this tensor (a tp shard on every rank, replicated
    parameters on tp rank 0)."""
    return getattr(p, "model_parallel", False) or tp_rank == 0


def _neox_name(name: str) -> str:
    # PipelineModule names its layers "2.attention..."; pp=0 already says "sequential.2...."
    return f"sequential.{name}" if name[:1].isdigit() else name


class StepNorms:
    """Installed on the engine by :meth:`attach`; the loop reads :meth:`metrics`."""

    def __init__(self, args, engine, groups):
        self.args, self.engine, self.groups = args, engine, groups
        self.grad_norm = None
        self._details: dict = {}
        self.plain_optimizer = isinstance(engine.optimizer, torch.optim.Optimizer)
        self.per_param_grads = args.log_grad_norm or args.log_grad_pct_zeros
        stage = engine.zero_optimization_stage()
        if self.per_param_grads and stage > 0:
            raise ConfigError(f"log_grad_norm / log_grad_pct_zeros: per-parameter gradients "
                              f"are sharded by ZeRO stage {stage}; use zero_optimization.stage 0 "
                              f"for them (train/grad_norm, the global norm, is always logged)")
        if args.log_optimizer_states and not self.plain_optimizer:
            raise ConfigError("log_optimizer_states: DeepSpeed's ZeRO and 16-bit optimizers keep "
                              "the Adam state in flat shards; use fp32 with zero_optimization.stage "
                              "0 for per-parameter optimizer-state norms")
        if args.log_param_norm and stage > 2:
            raise ConfigError("log_param_norm: ZeRO stage 3 shards the parameters; use stage "
                              "0-2 for per-parameter norms")
        self.params = [(_neox_name(n), p) for n, p in engine.module.named_parameters()]
        self.row_biases = set()
        if groups.tp_size > 1:
            from megatron.parallel import RowParallelLinear

            self.row_biases = {id(m.bias) for m in engine.module.modules()
                               if isinstance(m, RowParallelLinear) and m.bias is not None}

    @classmethod
    def attach(cls, args, engine, groups) -> "StepNorms":
        """Wrap ``engine._take_model_step``, which both DeepSpeed engines call once per
        optimizer step with the reduced, unclipped gradients."""
        norms = cls(args, engine, groups)
        take_model_step = engine._take_model_step

        def take_model_step_with_norms(*a, **k):
            norms._before_step()
            result = take_model_step(*a, **k)
            norms._after_step()
            return result

        engine._take_model_step = take_model_step_with_norms
        return norms

    # ---- per step -------------------------------------------------------------------

    def _before_step(self):
        iteration = self.engine.global_steps + 1
        detailed = is_log_step(self.args, iteration)
        if self.plain_optimizer:
            self.grad_norm = self._plain_grad_norm()
        if detailed and self.per_param_grads:
            self._details.update(self._per_param_grad_stats())
        if detailed and self.args.log_param_norm:
            self._details.update(self._per_param_norms())

    def _after_step(self):
        if not self.plain_optimizer:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        if self.args.log_optimizer_states and is_log_step(self.args, self.engine.global_steps + 1):
            self._details.update(self._optimizer_state_norms())

    def metrics(self) -> dict:
        """``train/grad_norm`` and, on log steps, the per-parameter keys (then cleared)."""
        # read back here, after the step's own host sync, not inside the step
        out = {} if self.grad_norm is None else {"train/grad_norm": float(self.grad_norm)}
        out.update(self._details)
        self._details = {}
        return out

    # ---- computations ---------------------------------------------------------------

    def _plain_grad_norm(self) -> torch.Tensor:
        tp_rank = self.groups.tp_rank
        grads = [p.grad for _, p in self.params if p.grad is not None and _counted_here(p, tp_rank)]
        device = grads[0].device if grads else torch.device("cpu")
        norms = torch._foreach_norm([g.float() for g in grads]) if grads else []
        total = torch.stack([n.square() for n in norms]).sum() if norms else torch.zeros((), device=device)
        mpu = self.engine.mpu
        group = mpu.get_model_parallel_group() if mpu is not None else None
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        return total.sqrt()

    def _per_param_grad_stats(self) -> dict:
        from deepspeed.utils import safe_get_full_grad

        rows = []  # squared norm, zeros, numel
        for _, p in self.params:
            g = safe_get_full_grad(p)
            if g is None or not _counted_here(p, self.groups.tp_rank):
                rows.append((0.0, 0.0, 0.0))
                continue
            g = g.detach().float()
            rows.append((float(g.square().sum()), float((g == 0).sum()), float(g.numel())))
        stats = self._gather(rows)
        out = {}
        for name, (sq, zeros, numel) in stats.items():
            if self.args.log_grad_norm:
                out[f"gradient_norms/{name}"] = math.sqrt(sq)
            if self.args.log_grad_pct_zeros and numel:
                out[f"pct_grad_zeros/{name}"] = zeros / numel
        return out

    def _per_param_norms(self) -> dict:
        rows = []
        for _, p in self.params:
            value = p.detach().float()
            if id(p) in self.row_biases:  # the full bias is the sum of the tp shards
                value = value.clone()
                dist.all_reduce(value, group=self.groups.tp_group)
            counted = _counted_here(p, self.groups.tp_rank)
            rows.append((float(value.square().sum()) if counted else 0.0, 0.0, 0.0))
        return {f"parameter_norms/{name}": math.sqrt(sq) for name, (sq, _, _) in self._gather(rows).items()}

    def _optimizer_state_norms(self) -> dict:
        """Norms of Adam's moments (``exp_avg``, ``exp_avg_sq``) per parameter, after the update."""
        state = self.engine.optimizer.state
        keys = ("exp_avg", "exp_avg_sq")
        rows = []
        for _, p in self.params:
            moments = state.get(p, {})
            counted = _counted_here(p, self.groups.tp_rank)
            rows.append(tuple(float(moments[k].float().square().sum()) if counted and k in moments
                              else 0.0 for k in keys) + (0.0,))
        return {f"optimizer_state_norms/{key}/{name}": math.sqrt(row[i])
                for name, row in self._gather(rows).items() for i, key in enumerate(keys)}

    def _gather(self, rows) -> dict:
        """Sum the rows over tensor-parallel shards, then collect every pipeline stage's on
        global rank 0 (other ranks get {})."""
        t = torch.tensor(rows, dtype=torch.float64)
        if self.groups.tp_group is not None and self.groups.tp_size > 1:
            dist.all_reduce(t, group=self.groups.tp_group)
        local = dict(zip((n for n, _ in self.params), t.tolist()))
        if self.groups.pp_group is not None and self.groups.pp_size > 1:
            parts = [None] * self.groups.pp_size
            dist.all_gather_object(parts, local, group=self.groups.pp_group)
            local = {k: v for part in parts for k, v in part.items()}
        if dist.is_initialized() and dist.get_rank() != 0:
            return {}
        return local
