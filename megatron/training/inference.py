"""A trained model for eval.py and generate.py, built on every rank exactly as training
builds it, so any tensor/pipeline layout the run used can be evaluated as it is."""
from __future__ import annotations

import torch.distributed as dist

from megatron.checkpoint import load_checkpoint
from megatron.eval import parallel_logits_fn
from megatron.parallel import ParallelGroups
from megatron.parallel.distributed import init_distributed
from megatron.training.engine import build_trainer


def load_parallel_model(args, checkpoint: str, iteration: int | None = None):
    """Build the model on this rank exactly as training does and load ``checkpoint``'s
    weights into it; returns (logits_fn, groups). Collective: every rank calls it.

    ``args`` is the run's config (its parallel layout must match the checkpoint's);
    its tokenizer must already have set the vocabulary size. ``args`` is changed to
    load weights only, from ``checkpoint``, with L2E and recomputation off.
    """
    init_distributed(args)
    args.configure_world(dist.get_world_size())
    groups = ParallelGroups.build(max(1, args.pipe_parallel_size), args.model_parallel_size)
    # Weights only: no optimizer or RNG state, no L2E hooks, no recomputation.
    args.load, args.iteration, args.finetune = str(checkpoint), iteration, True
    args.evaluating = True  # the restore line would describe a training start; eval.py says what it does
    args.l2e.enabled = False
    args.checkpoint_activations = False
    trainer = build_trainer(args, groups)
    load_checkpoint(args, trainer.engine, groups)
    return parallel_logits_fn(trainer, groups), groups
