"""The few collectives checkpoint code needs; a single process runs without a process group."""
from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def say(message: str) -> None:
    if rank() == 0:
        print(message, flush=True)


def gather_to_all(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
