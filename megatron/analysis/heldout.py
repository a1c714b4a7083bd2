"""The top-ρ Monosemanticity Score of a model on held-out token windows, scored two ways.

*fresh*: φ against the mean and variance of the held-out windows themselves (offline,
as the paper's analyses); *running*: φ against the run's own checkpointed running
statistics, as training scores it (layers with L2E state only). The two differ by how
far the running statistics lag the model: a fall that shows only in *running* is
distance from stale statistics, not a less monosemantic layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

RATE = 0.02


def heldout_windows(data_prefix, split: str = "949,50,1", seq_length: int = 128) -> torch.Tensor:
    """Non-overlapping ``seq_length``-token windows of the validation split of a Megatron
    ``.bin/.idx`` dataset (documents no training step reads), ``[count, seq_length]``."""
    from megatron.data.data_utils import split_boundaries
    from megatron.data.indexed_dataset import MMapIndexedDataset

    data = MMapIndexedDataset(str(data_prefix))
    _, start, stop, _ = split_boundaries(split, len(data))
    tokens = np.concatenate([data.get(i) for i in range(start, stop)]).astype(np.int64)
    count = len(tokens) // seq_length
    return torch.from_numpy(tokens[:count * seq_length].reshape(count, seq_length))


def block_outputs(model, tokens: torch.Tensor, batch: int = 32) -> dict[int, torch.Tensor]:
    """Every block's output over ``tokens``: {layer: [n, S, H]} fp32."""
    outs = {i: [] for i in range(len(model.blocks))}
    hooks = [b.register_forward_hook(lambda m, x, z, i=i: outs[i].append(z.detach().float()))
             for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            for start in range(0, len(tokens), batch):
                model(tokens[start:start + batch])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(z) for i, z in outs.items()}


def top_quantile(phi: torch.Tensor, rate: float = RATE) -> float:
    """The exact (1 − rate) quantile of every value of ``phi``."""
    flat = phi.flatten()
    k = max(1, round(rate * flat.numel()))
    return float(flat.kthvalue(flat.numel() - k + 1).values)


def running_statistics(checkpoint) -> dict:
    """{layer: RunningMoments state} saved by L2E in ``checkpoint`` (a save dir or a
    ``global_stepN`` dir); {} for an HF folder or a run without L2E state."""
    from megatron.checkpoint import extra_state_name, resolve_step_dir

    checkpoint = Path(checkpoint)
    if (checkpoint / "config.json").is_file():
        return {}
    extra = resolve_step_dir(checkpoint) / extra_state_name(0)
    if not extra.is_file():
        return {}
    state = torch.load(extra, weights_only=True).get("l2e") or {}
    return {int(i): s for i, s in state.get("layers", {}).items()}


def heldout_ms(model, windows: torch.Tensor, running: dict, rate: float = RATE) -> dict:
    """{layer: {"heldout_fresh": q, "heldout_running": q}} (running only where ``running``
    has the layer's statistics)."""
    from megatron.errors import UserError
    from megatron.l2e.statistics import RunningMoments

    result = {}
    for i, z in block_outputs(model, windows).items():
        row = result[i] = {"heldout_fresh": top_quantile((z - z.mean(0)) ** 2 / z.var(0).clamp_min(1e-12), rate)}
        if i in running:
            moments = RunningMoments(tuple(z.shape[1:]), eps=1e-12)
            if tuple(running[i]["mean"].shape) != tuple(z.shape[1:]):
                raise UserError(f"held-out windows give layer {i} shape {tuple(z.shape[1:])} but the run's "
                                f"statistics are {tuple(running[i]['mean'].shape)}; pass --heldout-seq "
                                f"{running[i]['mean'].shape[0]} (the run's seq_length)")
            moments.load_state_dict(running[i])
            moments.begin_step()
            row["heldout_running"] = top_quantile((z - moments.mean) ** 2 / moments.var, rate)
    return result
