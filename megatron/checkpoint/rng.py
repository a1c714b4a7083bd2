"""RNG states in a checkpoint, stored as tensors and numbers so that
``torch.load(weights_only=True)`` reads them back."""
from __future__ import annotations

import random

import numpy as np
import torch

def rng_state() -> dict:
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_neox_rng(meta: dict) -> bool:
    """NeoX keeps python/numpy/torch RNG states in the mp_rank file."""
    if "random_rng_state" not in meta:
        return False
    random.setstate(meta["random_rng_state"])
    np.random.set_state(meta["np_rng_state"])
    torch.set_rng_state(meta["torch_rng_state"])
    if meta.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["cuda_rng_state"])
    return True
