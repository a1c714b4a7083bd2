"""Run lm-eval tasks on our model: standalone (eval.py) or during training."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from megatron.errors import DataError, UserError

# eval.py's default: stderr for every metric. Means (acc, exact_match) have a closed form;
# only perplexity/median/F1/BLEU-like metrics are resampled, serially (see evaluate_tasks),
# which takes seconds at 1000 draws where lm-eval's 100000 takes minutes.
DEFAULT_BOOTSTRAP_ITERS = 1000
OFFLINE_RECIPE = "docs/eval.md, 'Offline evaluation'"


def module_logits_fn(model: torch.nn.Module, tp_group=None):
    """``tokens -> full-vocab fp32 logits`` for a (possibly tensor-parallel) model.

    With tensor parallelism the head's output is a vocab shard; the shards are
    gathered so every rank sees the whole distribution. For a GPTNeoX, ``cache`` (a
    KVCache) is passed on for incremental decoding and ``logits_fn.takes_cache`` is True.
    """
    from megatron.model import GPTNeoX

    @torch.no_grad()
    def logits_fn(tokens: torch.Tensor, cache=None) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            tokens = tokens.to(device)
            logits = (model(tokens) if cache is None else model(tokens, cache=cache)).float()
        finally:
            model.train(was_training)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(shards, logits.contiguous(), group=tp_group)
            logits = torch.cat(shards, dim=-1)
        return logits.cpu()

    logits_fn.takes_cache = isinstance(model, GPTNeoX)  # not a DeepSpeed PipelineModule
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
    # lm-eval's bootstrap otherwise forks a pool of cpu_count() workers from this rank,
    # which holds the model (and maybe CUDA and a process group).
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    try:
        with _as_local_rank_0():
            out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, bootstrap_iters=bootstrap_iters,
                                  log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    except OSError:  # ConnectionError, a missing data file, an unreachable Hub, ...
        failing = _task_failing_to_load(tasks, manager)
        if failing is None:
            raise  # not a dataset problem
        raise _data_error(*failing) from None
    return {k: out[k] for k in ("results", "versions", "n-shot", "configs", "samples") if k in out}


def _task_failing_to_load(tasks, manager):
    """(task, error) of the first task whose dataset cannot be loaded, else None. lm-eval
    loads every dataset inside simple_evaluate without saying which failed, so each task
    is loaded again on its own (only after an error)."""
    for task in tasks:
        try:
            manager.load_task_or_group([task])
        except OSError as e:
            return task, e
    return None


def _data_error(task: str, error: OSError) -> DataError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = f"{type(error).__name__} {error}".lower()
    offline = isinstance(error, ConnectionError) or any(
        word in text for word in ("offline", "couldn't reach", "connection", "timed out"))
    if offline:
        return DataError(f"eval: task '{task}' cannot load its dataset without network ({first_line}); "
                         f"download it into an HF cache on a machine with internet and set HF_HOME "
                         f"and HF_DATASETS_OFFLINE=1 here ({OFFLINE_RECIPE})")
    return DataError(f"eval: task '{task}' cannot load its dataset ({first_line}); check the task's "
                     f"dataset_path/data_files ({OFFLINE_RECIPE})")


def flatten_results(results: dict, prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task>_<metric>": value}`` for logging (NeoX's key style)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none"):
                flat[f"{prefix}/{task}_{name.split(',')[0]}"] = float(value)
    return flat
