"""Parallelism applied to a pure GPTNeoX from outside: tensor parallelism, layer-by-layer
initialisation, activation checkpointing. The model code never sees a rank.

Works on any module tree holding the GPT-NeoX layer names, so the same functions serve
the whole model (pp=0) and the local layers of a pipeline stage.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule
from torch.utils.checkpoint import checkpoint

from megatron.errors import ConfigError
from megatron.model import Block, Embedding, GPTNeoX, ModelConfig, init_weights
from megatron.parallel.groups import ParallelGroups
from megatron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

# Children split along their output features; the row-parallel ones are `dense_4h_to_h`
# and `dense` next to a `query_key_value` (the attention output).
COLUMN = ("query_key_value", "dense_h_to_4h", "final_linear")

# Megatron's model-parallel seed offset: with per-rank shards, tp rank r draws from seed + 2718 + r.
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


def apply_tensor_parallel(model: nn.Module, groups: ParallelGroups, cfg: ModelConfig | None = None) -> nn.Module:
    """Swap linears/embedding for their tensor-parallel twins, in place, keeping this
    rank's slice of the weights already in `model` (on the meta device: just the shapes).

    Twins of already-parallel layers are not made, so applying it twice is harmless.
    `cfg` (default `model.cfg`, if any) is checked for divisibility by the tp size.
    """
    cfg = cfg or getattr(model, "cfg", None)
    tp, rank = groups.tp_size, groups.tp_rank
    if cfg is not None:
        check_tp_divisibility(cfg, tp)
    if tp == 1:
        return model
    swapped: dict[int, nn.Module] = {}  # id(full weight) -> its shard owner, to keep ties
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            twin = _parallel_twin(name, parent, layer, groups.tp_group)
            if twin is None:
                continue
            tied_to = swapped.get(id(layer.weight))
            if tied_to is not None:
                twin.weight = tied_to.weight
            else:
                _copy_local(layer, twin, rank, tp)
            swapped[id(layer.weight)] = twin
            setattr(parent, name, twin)
    return model


@torch.no_grad()
def _copy_local(full: nn.Module, local: nn.Module, rank: int, tp: int) -> None:
    """Copy `full`'s own tensors into `local`, keeping this rank's slice if `local` is a
    twin: column/vocab layers keep rows [rank], row layers keep columns [rank] and bias/tp."""
    if isinstance(local, RowParallelLinear):
        local.weight.copy_(full.weight.chunk(tp, dim=1)[rank])
        if local.bias is not None:
            local.bias.copy_(full.bias / tp)
    elif isinstance(local, (ColumnParallelLinear, VocabParallelEmbedding)):
        local.weight.copy_(full.weight.chunk(tp, dim=0)[rank])
        if getattr(local, "bias", None) is not None:
            local.bias.copy_(full.bias.chunk(tp, dim=0)[rank])
    else:
        for name, t in [*local.named_parameters(recurse=False), *local.named_buffers(recurse=False)]:
            t.copy_(getattr(full, name))


# ----------------------------------------------------------------------------- initialisation


@dataclass(frozen=True)
class LayerInit:
    """How this rank gives a layer built on the meta device its initial weights.

    Every NeoX pipeline layer is drawn from its own generator seeded by (seed, layer
    index) — the embedding always by index 0, so a tied head copy on the last stage
    draws the same matrix. per_rank_shards=False: the whole layer is drawn on the CPU
    and this rank keeps its slice, so weights do not depend on tp or pp and the peak
    extra memory is one full layer. per_rank_shards=True (NeoX): each shard is drawn
    directly, in a generator forked per tp rank, so weights depend on tp.
    """

    cfg: ModelConfig
    groups: ParallelGroups
    seed: int
    device: torch.device = torch.device("cpu")
    per_rank_shards: bool = False

    def generator(self, idx: int, layer: nn.Module) -> torch.Generator:
        seed = self.seed + TP_SEED_OFFSET + self.groups.tp_rank if self.per_rank_shards else self.seed
        idx = 0 if isinstance(layer, Embedding) else idx
        return torch.Generator().manual_seed(1000 * seed + idx)  # distinct for < 1000 layers

    @torch.no_grad()
    def materialize(self, layer: nn.Module, idx: int) -> nn.Module:
        """Tensor-parallel `layer` (NeoX layer `idx`) with real weights on `self.device`."""
        apply_tensor_parallel(layer, self.groups, self.cfg)
        if self.per_rank_shards:
            init_weights(layer.to_empty(device="cpu"), self.cfg, generator=self.generator(idx, layer))
            return layer.to(self.device)
        with torch.device("cpu"):
            full = type(layer)(self.cfg)  # the only full-size tensors: one layer at a time
        init_weights(full, self.cfg, generator=self.generator(idx, layer))
        layer.to_empty(device=self.device)
        source = dict(full.named_modules())
        for name, module in layer.named_modules():
            _copy_local(source[name], module, self.groups.tp_rank, self.groups.tp_size)
        return layer


def build_model(init: LayerInit) -> GPTNeoX:
    """The pp=0 model for this rank, built on the meta device and materialised layer by
    layer: never more than one full-size layer in memory besides this rank's shards."""
    with torch.device("meta"):
        model = GPTNeoX(init.cfg)
    apply_tensor_parallel(model, init.groups)  # on the whole model, so the tied head is swapped too
    seen: set[int] = set()
    for idx, layer in layer_modules(model).items():
        if id(layer) not in seen:  # a tied head is the embedding, at index 0
            seen.add(id(layer))
            init.materialize(layer, idx)
    if init.cfg.tie_embeddings:  # materialising gave the embedding a new tensor; share it again
        model.head.final_linear.weight = model.embed.word_embeddings.weight
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
