"""Shared by the tensor-parallel tests: rebuild full tensors from tp shards."""
import torch
import torch.distributed as dist

ROW_WEIGHTS = ("attention.dense.weight", "dense_4h_to_h.weight")
ROW_BIASES = ("attention.dense.bias", "dense_4h_to_h.bias")


def gather(t, group, dim):
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def merged_grad(name, grad, group):
    """The full-model gradient from this rank's shard gradient (NeoX's merge rules)."""
    if name.endswith(ROW_WEIGHTS):
        return gather(grad, group, 1)
    if name.endswith(ROW_BIASES) or "norm" in name:
        return grad  # replicated, or a summand of the full bias: its grad is the full grad
    return gather(grad, group, 0)
