"""Evaluation under tensor and pipeline parallelism.

Every rank runs lm-eval on the same requests in the same order, so each call of a
logits function is collective: the pipeline's stages hand activations down the
pipe, the last stage gathers the vocabulary shards of its logits, and the result is
broadcast back up so every rank's harness sees the same numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.eval.harness import module_logits_fn
from megatron.parallel import gather_from_tensor_parallel_region


def _send(x: torch.Tensor, dst: int) -> None:
    # Shapes differ from batch to batch (lm-eval pads to the longest request), so the
    # receiver learns the shape first.
    dist.send(torch.tensor(x.shape, dtype=torch.long, device=x.device), dst)
    dist.send(x.contiguous(), dst)


def _recv(src: int, ndim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    shape = torch.empty(ndim, dtype=torch.long, device=device)
    dist.recv(shape, src)
    x = torch.empty(*shape.tolist(), dtype=dtype, device=device)
    dist.recv(x, src)
    return x


def _broadcast(x: torch.Tensor | None, src: int, group, device: torch.device) -> torch.Tensor:
    """``x`` from global rank ``src`` to every rank of ``group`` (fp32, any shape)."""
    shape = torch.tensor(x.shape if x is not None else (0, 0, 0), dtype=torch.long, device=device)
    dist.broadcast(shape, src, group=group)
    if x is None:
        x = torch.empty(*shape.tolist(), dtype=torch.float32, device=device)
    dist.broadcast(x, src, group=group)
    return x


def pipeline_logits_fn(pipe_module, groups):
    """``tokens [b, s] -> full-vocab fp32 logits [b, s, V]`` (on CPU) for a DeepSpeed
    ``PipelineModule``, run outside DeepSpeed's schedule; collective over the pipeline.

    ``pipe_module(x)`` runs this stage's layers: the tokens on the first stage, the
    previous stage's hidden states [b, s, h] elsewhere. Each tensor-parallel rank talks
    to the same tensor-parallel rank of the neighbouring stages (``groups.pp_ranks``).
    """
    stages = groups.pp_ranks
    stage = groups.pp_rank
    tp_group = groups.tp_group

    @torch.no_grad()
    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        param = next(pipe_module.parameters())
        was_training = pipe_module.training
        pipe_module.eval()
        try:
            if groups.is_first_stage:
                x = tokens.to(param.device)
            else:
                x = _recv(stages[stage - 1], 3, param.dtype, param.device)
            out = pipe_module(x)
        finally:
            pipe_module.train(was_training)
        logits = None
        if groups.is_last_stage:
            logits = gather_from_tensor_parallel_region(out.float(), tp_group).contiguous()
        else:
            _send(out, stages[stage + 1])
        if groups.pp_group is not None:
            logits = _broadcast(logits, stages[-1], groups.pp_group, param.device)
        return logits.cpu()

    return logits_fn


def parallel_logits_fn(trainer, groups):
    """The collective logits function for a model built by ``build_trainer``."""
    if trainer.model is not None:  # pp=0, or a pipeline of one stage
        return module_logits_fn(trainer.model, trainer.tp_group)
    return pipeline_logits_fn(trainer.engine.module, groups)
