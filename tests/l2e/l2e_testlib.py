"""Shared pieces of the L2E tests: a stand-in block, a random activation stream, a driver."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from megatron.config.l2e import L2EConfig
from megatron.l2e import L2E


class Scale(nn.Module):
    """A block whose output is its input times a learnable per-channel scale (1 at start)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return x * self.w


def l2e_config(**overrides) -> L2EConfig:
    return L2EConfig(**{"enabled": True, "layers": [0], "warmup_steps": 2, **overrides})


def activation_stream(steps: int, batch: int, S: int, H: int, seed: int = 0) -> np.ndarray:
    """[steps, batch, S, H] float32 with per-neuron means and scales far from (0, 1)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(3.0, 2.0, size=(S, H))
    scale = rng.uniform(0.5, 3.0, size=(S, H))
    return (centre + scale * rng.standard_normal((steps, batch, S, H))).astype(np.float32)


def attach_scale(cfg, S, H, **groups):
    block = Scale(H)
    return block, L2E.attach({0: block}, cfg, seq_length=S, hidden_size=H, **groups)


def run_steps(l2e, block, steps: np.ndarray, micro: int = 1, grad_scale: float = 1.0, log=False):
    """Drive begin_step / forward+backward per micro-batch / end_step; returns the metrics."""
    history = []
    for it, batch in enumerate(steps):
        l2e.begin_step(it, grad_scale, log=log)
        for x in np.array_split(batch, micro):
            out = block(torch.from_numpy(x))
            out.sum().backward()
        history.append(l2e.end_step())
    return history


class ActSite(nn.Module):
    """A block exposing `mlp.act` (identity here) fed directly with an activation shard."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(1, width)  # only its row count (local width) is read
        self.mlp.act = nn.Identity()

    def forward(self, x):
        return self.mlp.act(x)
