"""pretrain(): set up one rank, then the training loop with eval, logging and checkpoints.

One optimizer step = ``train_step``: gradient-accumulation micro-batches through the
DeepSpeed engine (pp=0), or one ``engine.train_batch`` (pipeline). L2E brackets the
step (``begin_step`` before the forward passes, ``end_step`` after the update) and
injects its gradient itself, so ``lm_loss`` stays pure cross-entropy.
"""
from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from megatron.errors import ConfigError
from megatron.parallel.distributed import init_distributed
from megatron.training.checkpoint_validation import validate_checkpoint
from megatron.training.engine import Trainer, build_trainer, lm_loss
from megatron.training.watchdog import PeerWatchdog


def set_seeds(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def micro_batches(raw, eod: int, eod_mask_loss: bool, pipe: bool):
    """``{"text": [b, s+1]}`` -> (tokens, labels, loss_mask), or DeepSpeed's pipe format."""
    from megatron.data.data_utils import get_batch

    device = _device()
    for sample in raw:
        tokens, labels, loss_mask = (t.to(device) for t in get_batch(sample["text"], eod, eod_mask_loss))
        yield ((tokens,), (labels, loss_mask)) if pipe else (tokens, labels, loss_mask)


def _dp_mean(value: torch.Tensor, dp_group) -> float:
    if dp_group is not None:
        value = value.clone()
        dist.all_reduce(value, group=dp_group)
        value /= dist.get_world_size(dp_group)
    return float(value)


def loss_scale(engine) -> float:
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    config = getattr(opt, "loss_scale_config", None)
    return float(config.cur_scale if config is not None else opt.cur_scale)


def train_step(trainer: Trainer, batches, iteration: int, dp_group=None, log: bool = False) -> dict:
    """One optimizer step; returns ``lm_loss`` (dp-mean), ``skipped``, ``nonfinite`` and
    any L2E metrics.

    A step whose loss or gradients are NaN/inf on any rank is not applied
    (``trainer.step_check``), and L2E drops that step's statistics; the loss comes back
    from the same all-reduce, so the check costs no extra host sync.
    """
    engine, check = trainer.engine, trainer.step_check
    gas = engine.gradient_accumulation_steps()
    skipped_before = engine.skipped_steps
    if trainer.l2e is not None:
        trainer.l2e.begin_step(iteration, grad_scale=loss_scale(engine) / gas, log=log)
    if trainer.is_pipe:
        check.begin_step(None)  # it reads the pipeline engine's own total_loss
        loss = float(engine.train_batch(data_iter=batches))  # already averaged over dp
    else:
        total = torch.zeros((), device=_device())
        check.begin_step(total)
        for _ in range(gas):
            tokens, labels, loss_mask = next(batches)
            micro_loss = lm_loss(engine(tokens), labels, loss_mask, trainer.tp_group)
            total += micro_loss.detach()  # before step(): the check reads it at the boundary
            engine.backward(micro_loss)
            engine.step()
        loss_sum, _ = check.outcome()
        # world sum / world size: tp ranks hold identical losses, so this is the dp mean
        loss = loss_sum / (check.world_size * gas) if loss_sum is not None else _dp_mean(total / gas, dp_group)
    skipped = engine.skipped_steps > skipped_before
    # DeepSpeed's own skip outside fp16 (bf16, ZeRO) means a non-finite gradient norm
    nonfinite = check.outcome()[1] or (skipped and not engine.fp16_enabled()) or not math.isfinite(loss)
    metrics = {"lm_loss": loss, "skipped": skipped, "nonfinite": nonfinite}
    if trainer.l2e is not None:
        metrics.update(trainer.l2e.end_step(commit=not skipped))
    return metrics


@torch.no_grad()
def evaluate(trainer: Trainer, batches, eval_iters: int, dp_group=None) -> dict:
    """Mean validation lm loss over ``eval_iters`` global batches (and its perplexity)."""
    engine = trainer.engine
    engine.eval()
    losses = []
    for _ in range(eval_iters):
        if trainer.is_pipe:
            losses.append(float(engine.eval_batch(data_iter=batches)))
            continue
        for _ in range(engine.gradient_accumulation_steps()):
            tokens, labels, loss_mask = next(batches)
            losses.append(_dp_mean(lm_loss(engine(tokens), labels, loss_mask, trainer.tp_group), dp_group))
    engine.train()
    loss = sum(losses) / max(len(losses), 1)
    return {"validation/lm_loss": loss, "validation/lm_loss_ppl": math.exp(min(loss, 20.0))}


def _check_runtime_settings(args):
    if args.train_iters is None or args.train_iters <= 0:
        raise ConfigError("train_iters must be a positive integer")


def _run_eval_tasks(args, trainer, groups, tokenizer) -> dict:
    from megatron.eval import evaluate_tasks, flatten_results, parallel_logits_fn

    # Collective: every rank scores the same requests (a pipeline passes activations on).
    results = evaluate_tasks(parallel_logits_fn(trainer, groups), tokenizer, args.eval_tasks,
                             max_length=args.max_position_embeddings, num_fewshot=args.eval_num_fewshot,
                             include_path=args.eval_include_path, seed=args.seed)
    return flatten_results(results)


def pretrain(args) -> dict:
    """Train ``args`` to ``train_iters``; returns the per-step lm losses, the final iteration
    and whether a preemption signal stopped it."""
    from megatron import checkpoint
    from megatron.training import preflight

    started = time.perf_counter()
    _check_runtime_settings(args)
    init_distributed(args)
    preflight.check_paths(args)  # an unwritable save is named before the lock tries to write there
    lock = checkpoint.lock_save_dir(args)  # one writer per save directory, for the whole run
    try:
        return _pretrain(args, started)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(args, started: float) -> dict:
    from megatron.data.data_utils import (build_train_valid_test_datasets, make_data_iterator,
                                          shutdown_data_loaders)
    from megatron.parallel import ParallelGroups
    from megatron.tokenizer import build_tokenizer
    from megatron import checkpoint
    from megatron.training import logging, preflight, profiling, robustness, summary

    args.configure_world(dist.get_world_size())
    watchdog = PeerWatchdog.start(args)
    groups = ParallelGroups.build(max(1, args.pipe_parallel_size), args.model_parallel_size)
    set_seeds(args.seed)
    tokenizer = build_tokenizer(args)
    args.set_vocab_size(tokenizer.vocab_size)
    preflight.check_data_on_rank0(args, args.padded_vocab_size)
    trainer = build_trainer(args, groups)
    preflight.check_disk_space(args, preflight.model_parameter_count(trainer.engine, groups.dp_size))

    load_started = time.perf_counter()
    iteration = checkpoint.load_checkpoint(args, trainer.engine, groups, l2e=trainer.l2e)
    load_seconds = time.perf_counter() - load_started
    checkpoint.check_planned_saves(args, iteration)
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(args)
    pipe = trainer.is_pipe

    def batches(dataset, start, start_sample=None):
        raw = make_data_iterator(dataset, args, groups.dp_rank, groups.dp_size, start, start_sample)
        return micro_batches(raw, tokenizer.eod, args.eod_mask_loss, pipe)

    # DeepSpeed counts (and checkpoints) consumed samples; they differ from iteration x
    # global batch once a resume changed the batch. 0: a fresh run or a weights-only load.
    train_batches = batches(train_ds, iteration, trainer.engine.global_samples or None)
    valid_batches = batches(valid_ds, 0) if valid_ds is not None and args.eval_iters else None

    loaded = os.path.join(args.load or "", checkpoint.checkpoint_tag(iteration))
    resumed_from = loaded if iteration and os.path.isdir(loaded) else None  # not an HF directory
    logger = logging.MetricsLogger(args, groups, engine=trainer.engine, start_iteration=iteration,
                                   checkpoint_dir=resumed_from)
    if iteration or (args.load and args.finetune):  # something was loaded, not a fresh start
        logger.add_outside_training("load", load_seconds, before_logging=True)
    summary.announce(args, tokenizer.vocab_size, (train_ds, valid_ds, test_ds), logger)
    profiler = profiling.StepProfiler(args)
    guard = robustness.NonFiniteLossGuard(args)
    health = checkpoint.CheckpointHealth(args.save, is_writer=dist.get_rank() == 0)
    if resumed_from:
        health.start_from(args.load, checkpoint.checkpoint_tag(iteration))
        guard.last_checkpoint = health.last_good
    preemption = robustness.PreemptionHandler()
    losses, last_saved, start = [], None, iteration

    def save(at):
        nonlocal last_saved
        with logger.outside_training("save"):
            checkpoint.check_save_step(args, at)
            robustness.check_finite_weights(trainer.engine, at, health.last_good)
            verdict = health.verdict()
            path = checkpoint.save_checkpoint(args, at, trainer.engine, groups, l2e=trainer.l2e,
                                                 verdict=verdict)
            health.saved(path, verdict)
            guard.last_checkpoint = health.last_good
            last_saved = at
            if args.checkpoint_validation_with_forward_pass:
                validate_checkpoint(args, trainer, groups, path, tokenizer.vocab_size)

    if iteration == 0 and checkpoint.should_save(args, 0):
        save(0)  # Pythia keeps the initialisation (extra_save_iters starts with 0)
    try:
        while iteration < args.train_iters:
            profiler.at_step(iteration + 1)
            metrics = train_step(trainer, train_batches, iteration, groups.dp_group,
                                 log=_l2e_diagnostics_step(args, iteration + 1))
            iteration += 1
            health.observe(iteration, metrics["lm_loss"], metrics["nonfinite"])
            guard.last_checkpoint = health.last_good
            guard.check(iteration, metrics["lm_loss"], metrics["skipped"], metrics["nonfinite"])
            losses.append(metrics["lm_loss"])
            logger.log_step(iteration, _step_metrics(trainer, metrics, guard))
            if args.eval_interval and iteration % args.eval_interval == 0:
                with logger.outside_training("eval"):
                    _evaluate_all(args, trainer, groups, tokenizer, valid_batches, logger, iteration)
            if checkpoint.should_save(args, iteration):
                save(iteration)
            if preemption.requested() or (args.exit_interval and iteration - start >= args.exit_interval):
                break
        if args.save and last_saved != iteration and iteration > start:  # nothing trained: nothing to save
            save(iteration)
        summary.announce_end(args, logger, start, iteration, time.perf_counter() - started,
                             guard.last_checkpoint if last_saved is not None else None)
    finally:
        # Every ending (last step, preemption, error) stops the readers here: an error's
        # traceback would keep these generators (and their DataLoader workers) alive until
        # the interpreter's exit, and a pipeline engine still holds its stream.
        train_batches.close()
        if valid_batches is not None:
            valid_batches.close()
        shutdown_data_loaders()
        if watchdog is not None:
            watchdog.stop()
        profiler.close()
        preemption.close()
        logger.close()
    return {"iteration": iteration, "lm_loss": losses, "stopped_by_signal": preemption.flag}


def _l2e_diagnostics_step(args, step: int) -> bool:
    """L2E's diagnostics cost a little: gather them only for lines that get written, and
    at most about once per ``l2e.diagnostics_interval`` steps (the last step always)."""
    from megatron.l2e.metrics import diagnostics_due

    return step == args.train_iters or diagnostics_due(step, args.log_interval, args.l2e.diagnostics_interval)


def _step_metrics(trainer: Trainer, metrics: dict, guard) -> dict:
    """What MetricsLogger gets every step (it averages ``*_loss`` and adds runtime/*)."""
    out = {("train/lm_loss" if k == "lm_loss" else k): v for k, v in metrics.items()
           if k not in ("skipped", "nonfinite")}
    out["train/learning_rate"] = trainer.engine.get_lr()[0]
    if trainer.engine.fp16_enabled():
        out["train/loss_scale"] = loss_scale(trainer.engine)
    out.update(guard.metrics())
    out.update(trainer.norms.metrics())
    return out


def _evaluate_all(args, trainer, groups, tokenizer, valid_batches, logger, iteration):
    results = {}
    if valid_batches is not None:
        results.update(evaluate(trainer, valid_batches, args.eval_iters, groups.dp_group))
    if args.eval_tasks:
        results.update(_run_eval_tasks(args, trainer, groups, tokenizer))
    if results:
        logger.log_eval(iteration, results)
