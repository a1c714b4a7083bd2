"""Parallelism applied to a pure GPTNeoX from outside: tensor parallelism, sharded init,
activation checkpointing. The model code never sees a rank.

Works on any module tree holding the GPT-NeoX layer names, so the same functions serve
the whole model (pp=0) and the local layers of a pipeline stage.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule
from torch.utils.checkpoint import checkpoint

from megatron.errors import ConfigError
from megatron.model import Block, GPTNeoX, ModelConfig, init_weights
from megatron.parallel.groups import ParallelGroups
from megatron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

# Children split along their output features; the row-parallel ones are `dense_4h_to_h`
# and `dense` next to a `query_key_value` (the attention output).
COLUMN = ("query_key_value", "dense_h_to_4h", "final_linear")

# Megatron's model-parallel seed offset: tp rank r draws its shards from seed + 2718 + r.
TP_SEED_OFFSET = 2718


def layer_modules(model: nn.Module) -> dict[int, nn.Module]:
    """NeoX pipeline layer index -> module: embed 0, block i -> i+2, norm L+3, head L+4.

    With tied embeddings the head (L+4) is the embedding module, as in the pipeline.
    For a DeepSpeed PipelineModule: the layers built on this stage (tied ones included).
    """
    if isinstance(model, GPTNeoX):
        L = len(model.blocks)
        head = model.embed if model.cfg.tie_embeddings else model.head
        layers = {0: model.embed, L + 3: model.final_norm, L + 4: head}
        layers.update({i + 2: b for i, b in enumerate(model.blocks)})
        return dict(sorted(layers.items()))
    if not isinstance(model, PipelineModule):
        raise TypeError(f"expected a GPTNeoX or a PipelineModule, got {type(model).__name__}")
    layers = {}
    for i, f in enumerate(model.forward_funcs):
        module = f.args[0] if isinstance(f, functools.partial) else f  # tied head: partial(fn, module)
        if isinstance(module, nn.Module):
            layers[int(model._local_start) + i] = module
    return layers


def local_blocks(model: nn.Module) -> dict[int, Block]:
    """Global block number -> Block, for the blocks on this pipeline stage (all at pp=0)."""
    return {idx - 2: m for idx, m in layer_modules(model).items() if isinstance(m, Block)}


def check_tp_divisibility(cfg: ModelConfig, tp: int) -> None:
    for key, n in (("num_attention_heads", cfg.num_heads), ("intermediate size (4h)", cfg.ffn_size),
                   ("padded_vocab_size", cfg.vocab_size)):
        if n % tp:
            raise ConfigError(f"{key} {n} is not divisible by model_parallel_size {tp}; change one of them")


def _parallel_twin(name: str, parent: nn.Module, layer: nn.Module, group) -> nn.Module | None:
    """An empty parallel layer shaped like `layer`, or None if `layer` stays replicated."""
    if isinstance(layer, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
        return None  # already parallel
    if isinstance(layer, nn.Embedding) and name == "word_embeddings":
        return VocabParallelEmbedding(layer.num_embeddings, layer.embedding_dim, group=group,
                                      device=layer.weight.device, dtype=layer.weight.dtype)
    if not isinstance(layer, nn.Linear):
        return None
    kw = dict(group=group, device=layer.weight.device, dtype=layer.weight.dtype)
    bias = layer.bias is not None
    if name in COLUMN:
        return ColumnParallelLinear(layer.in_features, layer.out_features, bias, **kw)
    if name == "dense_4h_to_h" or (name == "dense" and hasattr(parent, "query_key_value")):
        return RowParallelLinear(layer.in_features, layer.out_features, bias, **kw)
    return None


@torch.no_grad()
def _copy_shard(full: nn.Module, shard: nn.Module, rank: int, tp: int) -> None:
    """Column/vocab layers keep rows [rank], row layers keep columns [rank] and bias/tp."""
    if isinstance(shard, RowParallelLinear):
        shard.weight.copy_(full.weight.chunk(tp, dim=1)[rank])
        if shard.bias is not None:
            shard.bias.copy_(full.bias / tp)
        return
    shard.weight.copy_(full.weight.chunk(tp, dim=0)[rank])
    if getattr(shard, "bias", None) is not None:
        shard.bias.copy_(full.bias.chunk(tp, dim=0)[rank])


def init_layers_sharded(model: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int) -> None:
    """NeoX-style init: every layer drawn from its own generator, forked per tp rank.

    Seeding by pipeline layer index makes the initial weights independent of how layers
    are spread over pipeline stages; seeding by tp rank makes them depend on tp, as in NeoX.
    """
    seen: set[int] = set()
    for idx, layer in layer_modules(model).items():
        params = list(layer.parameters())
        if not params or all(id(p) in seen for p in params):  # the tied head: drawn at index 0
            continue
        seen.update(id(p) for p in params)
        g = torch.Generator(device=params[0].device)
        g.manual_seed(1000 * (seed + TP_SEED_OFFSET + tp_rank) + idx)  # distinct for < 1000 layers
        init_weights(layer, cfg, generator=g)


def apply_tensor_parallel(model: nn.Module, groups: ParallelGroups, shard_from_full: bool = True,
                          seed: int | None = None, cfg: ModelConfig | None = None) -> nn.Module:
    """Swap linears/embedding for their tensor-parallel twins, in place.

    shard_from_full=True: keep this rank's slice of the weights already in `model`
    (a materialised full model: equivalence tests, converted checkpoints).
    shard_from_full=False: draw every shard fresh (`init_layers_sharded(seed)`), so the
    initial weights depend on the tp size as in NeoX. `cfg` defaults to `model.cfg`.
    """
    cfg = cfg or getattr(model, "cfg", None)
    tp, rank = groups.tp_size, groups.tp_rank
    if cfg is not None:
        check_tp_divisibility(cfg, tp)
    if not shard_from_full and (seed is None or cfg is None):
        raise ValueError("sharded init needs seed and cfg")
    if tp > 1:
        swapped: dict[int, nn.Module] = {}  # id(full weight) -> its shard owner, to keep ties
        for parent in list(model.modules()):
            for name, layer in list(parent.named_children()):
                twin = _parallel_twin(name, parent, layer, groups.tp_group)
                if twin is None:
                    continue
                tied_to = swapped.get(id(layer.weight))
                if tied_to is not None:
                    twin.weight = tied_to.weight
                elif shard_from_full:
                    _copy_shard(layer, twin, rank, tp)
                swapped[id(layer.weight)] = twin
                setattr(parent, name, twin)
    if not shard_from_full:
        init_layers_sharded(model, cfg, seed, rank)
    return model


# ----------------------------------------------------------------------------- checkpointing


def _checkpointed_forward(forward, recompute_context, *args):
    context_fn = None
    if recompute_context is not None:
        context_fn = lambda: (contextlib.nullcontext(), recompute_context())  # noqa: E731
    kwargs = {"context_fn": context_fn} if context_fn else {}
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module, recompute_context=None) -> None:
    """Recompute this block's activations in backward instead of storing them.

    The instance's forward is replaced (not wrapped in a new module) so parameter names,
    state dicts and hooks registered on the block are unchanged. `recompute_context()`,
    if given, is entered during recomputation only (L2E uses it to not count twice).
    """
    block.forward = functools.partial(_checkpointed_forward, block.forward, recompute_context)


def apply_activation_checkpointing(model: nn.Module, recompute_context=None) -> nn.Module:
    """Checkpoint every transformer block of `model` (never the integer-input embedding)."""
    for m in model.modules():
        if isinstance(m, Block):
            checkpoint_block(m, recompute_context)
    return model
