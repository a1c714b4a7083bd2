"""Megatron-style tensor parallelism: autograd collectives, sharded layers, sharded loss.

A column-parallel linear splits its output features over the tensor-parallel (tp)
ranks, a row-parallel linear its input features. Put back to back (qkv -> dense,
h_to_4h -> 4h_to_h) they need one all-reduce forward and one backward:

    x --copy--> [x W1_r] --act--> [. W2_r + b2_r] --reduce--> y
         (bwd: all-reduce)                           (fwd: all-reduce)

The layers subclass nn.Linear / nn.Embedding with their *local* shapes, so code that
reads `out_features` or initialises by module type sees a normal layer.
A ``group`` of None means tp size 1: every collective is then the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is None:
        return x
    x = x.clone()  # never reduce in place into a tensor autograd may have saved
    dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _own_chunk_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    return x.chunk(_size(group), dim=-1)[_rank(group)].contiguous()


# ----------------------------------------------------------------------------- mappings


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce backward (each rank's input grad is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward; identity backward (every rank needs the whole output grad)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """Concatenate the shards along the last dim; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk_last_dim(grad, ctx.group), None


def copy_to_tensor_parallel_region(x, group):
    return x if group is None else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x, group):
    return x if group is None else _ReduceFromRegion.apply(x, group)


def gather_from_tensor_parallel_region(x, group):
    """Full tensor from last-dim shards (e.g. eval logits from a vocab-parallel head)."""
    return x if group is None else _GatherFromRegion.apply(x, group)


# ----------------------------------------------------------------------------- layers


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {tp}")
    return n // tp


class ColumnParallelLinear(nn.Linear):
    """y_r = x W_r^T + b_r: this rank's slice of the output features (left sharded)."""

    def __init__(self, in_features, out_features, bias=True, group=None, device=None, dtype=None):
        super().__init__(in_features, _split(out_features, _size(group), "out_features"), bias, device, dtype)
        self.group = group

    def forward(self, x):
        return F.linear(copy_to_tensor_parallel_region(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """y = Σ_r (x_r W_r^T + b_r): input arrives sharded, output is whole on every rank.

    Each rank adds its own bias shard before the reduction (NeoX's gpt-j-residual
    layout), so the full bias is the sum of the shards.
    """

    def __init__(self, in_features, out_features, bias=True, group=None, device=None, dtype=None):
        super().__init__(_split(in_features, _size(group), "in_features"), out_features, bias, device, dtype)
        self.group = group

    def forward(self, x):
        return reduce_from_tensor_parallel_region(F.linear(x, self.weight, self.bias), self.group)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the (padded) vocabulary; other ids look up zeros, then sum."""

    def __init__(self, num_embeddings, embedding_dim, group=None, device=None, dtype=None):
        tp = _size(group)
        super().__init__(_split(num_embeddings, tp, "padded vocab size"), embedding_dim, device=device, dtype=dtype)
        self.group = group
        self.vocab_start = _rank(group) * self.num_embeddings
        self.vocab_end = self.vocab_start + self.num_embeddings

    def forward(self, ids):
        if self.group is None:
            return super().forward(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(outside, 0, ids - self.vocab_start)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(x, self.group)


# ----------------------------------------------------------------------------- loss


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token fp32 cross-entropy from vocab-sharded logits [..., V/tp]; shape of labels.

    loss = log Σ_v exp(z_v - m) - (z_label - m) with m the global max (stability only,
    so no gradient flows through it). Each sum is a local sum plus an all-reduce whose
    backward is the identity: every rank holds the same loss, and autograd then fills
    the gradient of its own logits shard.
    """
    z = logits_shard.float()
    m = _all_reduce(z.detach().amax(dim=-1, keepdim=True), tp_group, op=dist.ReduceOp.MAX)
    z = z - m
    v_local = z.shape[-1]
    start = _rank(tp_group) * v_local
    outside = (labels < start) | (labels >= start + v_local)
    local = torch.where(outside, 0, labels - start)
    z_label = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    z_label = reduce_from_tensor_parallel_region(z_label, tp_group)
    sum_exp = reduce_from_tensor_parallel_region(z.exp().sum(dim=-1), tp_group)
    return sum_exp.log() - z_label
