"""GPT-NeoX as a DeepSpeed PipelineModule, in NeoX's layer order.

    0        Embedding          (file layer_00: word_embeddings.weight)
    1        _to_stack           a function: no file
    2..L+1   Block × L           (files layer_02.. : the block keys)
    L+2      _from_stack         a function: no file
    L+3      FinalNorm           (norm.weight, norm.bias)
    L+4      Head                (final_linear.weight) or, tied, the embedding reused

Keeping these indices is what makes DeepSpeed write NeoX's
`layer_XX-model_YY-model_states.pt` files. Stages pass one hidden-state tensor; the
data iterator yields ((tokens,), (labels, loss_mask)) and the last stage hands the
(vocab-sharded) logits and (labels, loss_mask) to `loss_fn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from megatron.model import Block, Embedding, FinalNorm, Head, ModelConfig
from megatron.parallel.apply import LayerInit, check_tp_divisibility, checkpoint_block, layer_modules
from megatron.parallel.tensor_parallel import copy_to_tensor_parallel_region


# NeoX's pipe_partition_method default; its regex names NeoX's layer classes.
NEOX_DEFAULT_PARTITION = "type:transformer|mlp"


# Named without "block" so partition_method="type:Block" counts only transformer blocks.
def _to_stack(x: torch.Tensor) -> torch.Tensor:
    return x


def _from_stack(x: torch.Tensor) -> torch.Tensor:
    return x


def _unpack_tokens(module, args):
    """The first stage receives the data iterator's (tokens,) tuple."""
    (x,) = args
    if isinstance(x, tuple):
        return x


def _tied_logits(embed: Embedding, x: torch.Tensor) -> torch.Tensor:
    """Head of a tied model: logits over this rank's vocabulary rows of the embedding."""
    w = embed.word_embeddings.weight
    return F.linear(copy_to_tensor_parallel_region(x, getattr(embed.word_embeddings, "group", None)), w)


class _Materialised:
    """Spec mixin: the layer is built on the meta device and materialised right away
    (tensor-parallel, initial weights of NeoX layer `idx`, on this rank's device), so a
    stage never holds a full-size copy of its layers. `typename` stays the layer class,
    which partition_method="type:Block" matches. (DeepSpeed's "parameters" partitioning
    builds every spec once to count: still one layer at a time, but a full draw.)"""

    def build(self, log=False):
        with torch.device("meta"):
            layer = super().build(log)
        return self.init.materialize(layer, self.idx)


class _InitLayerSpec(_Materialised, LayerSpec):
    def __init__(self, typename, cfg: ModelConfig, idx: int, init: LayerInit):
        super().__init__(typename, cfg)
        self.idx, self.init = idx, init


class _InitTiedLayerSpec(_Materialised, TiedLayerSpec):
    """The tied embedding: every copy (first and last stage) draws layer 0's weights."""

    def __init__(self, cfg: ModelConfig, init: LayerInit, forward_fn=None):
        super().__init__("embed", Embedding, cfg, forward_fn=forward_fn, tied_weight_attr=["word_embeddings.weight"])
        self.idx, self.init = 0, init


def layer_specs(init: LayerInit) -> list:
    """The NeoX layer list (indices as in the module docstring)."""
    cfg, L = init.cfg, init.cfg.num_layers
    blocks = [_InitLayerSpec(Block, cfg, i + 2, init) for i in range(L)]
    if cfg.tie_embeddings:
        embed, head = _InitTiedLayerSpec(cfg, init), _InitTiedLayerSpec(cfg, init, forward_fn=_tied_logits)
    else:
        embed, head = _InitLayerSpec(Embedding, cfg, 0, init), _InitLayerSpec(Head, cfg, L + 4, init)
    return [embed, _to_stack, *blocks, _from_stack, _InitLayerSpec(FinalNorm, cfg, L + 3, init), head]


def build_pipeline_module(
    init: LayerInit,
    loss_fn,
    *,
    partition_method: str = "type:Block",
    activation_checkpointing: bool = False,
    recompute_context=None,
) -> PipelineModule:
    """This stage's layers, tensor-parallel if tp > 1, ready for `deepspeed.initialize`.

    Only this stage's layers are built, one at a time, with `init`'s weights (so they
    equal the pp=0 model's from `build_model(init)`). With `activation_checkpointing`
    every block recomputes its activations in backward; `recompute_context()` is
    entered during recomputation (L2E counts statistics once).
    """
    check_tp_divisibility(init.cfg, init.groups.tp_size)
    if partition_method.lower() == NEOX_DEFAULT_PARTITION:
        partition_method = "type:Block"  # the same layers under our class name
    pipe = PipelineModule(
        layers=layer_specs(init),
        topology=init.groups.topology,
        loss_fn=loss_fn,
        partition_method=partition_method,
        activation_checkpoint_interval=0,  # blocks checkpoint themselves (never the embedding)
    )
    for layer in layer_modules(pipe).values():
        if isinstance(layer, Embedding):
            layer.register_forward_pre_hook(_unpack_tokens)
    if activation_checkpointing:
        for layer in layer_modules(pipe).values():
            if isinstance(layer, Block):
                checkpoint_block(layer, recompute_context)
    return pipe
