"""Run lm-eval tasks on our model: standalone (eval.py) or during training."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from megatron.errors import UserError


def module_logits_fn(model: torch.nn.Module, tp_group=None):
    """``tokens -> full-vocab fp32 logits`` for a (possibly tensor-parallel) model.

    With tensor parallelism the head's output is a vocab shard; the shards are
    gathered so every rank sees the whole distribution.
    """

    @torch.no_grad()
    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            logits = model(tokens.to(device)).float()
        finally:
            model.train(was_training)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(shards, logits.contiguous(), group=tp_group)
            logits = torch.cat(shards, dim=-1)
        return logits.cpu()

    return logits_fn


def _task_manager(tasks, include_path):
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        # Indexing lm-eval's ~15k built-in tasks takes seconds; skip it when every
        # requested task is local.
        if all(t in local.all_tasks for t in tasks):
            return local
        return TaskManager(include_path=include_path)
    return TaskManager()


@contextlib.contextmanager
def _as_local_rank_0():
    """lm-eval's ``simple_evaluate`` returns None wherever LOCAL_RANK != 0 (so torchrun
    ranks do not all write files). Our ranks all score every request and the caller
    picks the writer, so every rank should get the results."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


def evaluate_tasks(logits_fn, tokenizer, tasks, *, max_length: int, num_fewshot: int = 0,
                   batch_size: int = 8, limit=None, include_path=None,
                   bootstrap_iters: int = 0, seed: int = 1234, log_samples: bool = False) -> dict:
    """Run lm-eval's ``simple_evaluate`` and return ``{"results": ..., "versions": ..., ...}``.

    ``limit`` is None unless asked for: every document of every task is scored.
    ``include_path`` is a folder of extra task YAMLs; ``log_samples`` adds lm-eval's
    per-request ``samples`` (with each request's log-likelihood) to the answer.
    """
    from lm_eval import simple_evaluate

    from megatron.eval.adapter import NeoXEvalLM

    tasks = list(tasks)
    if not tasks:
        raise UserError("eval: no tasks given; pass --eval_tasks TASK [TASK ...]")
    manager = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval: unknown lm-eval task(s) {unknown}; "
                        "see `lm_eval --tasks list` or pass --include_path for local tasks")
    lm = NeoXEvalLM(logits_fn, tokenizer, max_length=max_length, batch_size=batch_size)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _as_local_rank_0():
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=bootstrap_iters,
                              log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    return {k: out[k] for k in ("results", "versions", "n-shot", "configs", "samples") if k in out}


def flatten_results(results: dict, prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task>_<metric>": value}`` for logging (NeoX's key style)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none"):
                flat[f"{prefix}/{task}_{name.split(',')[0]}"] = float(value)
    return flat
