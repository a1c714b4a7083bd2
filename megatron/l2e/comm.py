"""The few collectives L2E needs, each a no-op when its group is absent (size 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum_(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' tensors along the last dim, in rank order."""
    if group is None:
        return x
    # gloo cannot gather bool tensors; uint8 carries a mask just as well.
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, wire, group=group)
    return torch.cat(parts, dim=-1).to(x.dtype)
