"""``checkpoint_validation_with_forward_pass``: a saved checkpoint must reproduce the
model that wrote it.

After each save, every rank runs the live (possibly tp/pp-sharded) model on a fixed
batch, and rank 0 reloads the checkpoint from disk as one plain fp32 model
(``megatron.checkpoint.load_model``, the path converters and eval use) and runs the same
batch. The losses must agree (to float rounding in fp32, to the rounding of 16-bit
weights otherwise); a mismatch is a CheckpointError rather than a run that later
resumes from wrong weights. Costs one forward pass per rank and, on rank 0, a CPU copy
of the full model per save.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.errors import CheckpointError

# relative loss difference allowed between the live model and the reloaded fp32 copy
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bfloat16": 2e-2}


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten()))


def validate_checkpoint(args, trainer, groups, ckpt_dir: str, vocab_size: int) -> None:
    """Collective: call on every rank right after ``save_checkpoint``."""
    from megatron.checkpoint import load_model
    from megatron.eval import parallel_logits_fn

    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab_size, (1, min(args.seq_length, 128)), generator=generator)
    live = _loss(parallel_logits_fn(trainer, groups)(tokens), tokens)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    with torch.no_grad():
        saved = _loss(load_model(ckpt_dir)(tokens), tokens)
    tolerance = TOLERANCE.get(args.precision, 2e-2)
    if abs(saved - live) > tolerance * max(abs(live), 1.0):
        raise CheckpointError(
            f"checkpoint_validation_with_forward_pass: {ckpt_dir} gives loss {saved:.6f} on a "
            f"fixed batch but the model that saved it gives {live:.6f}; the checkpoint does "
            f"not hold the trained weights (check the filesystem, then resave)")
    print(f"checkpoint validation: {ckpt_dir} reproduces the live model "
          f"(loss {saved:.6f} vs {live:.6f})", flush=True)
