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

from megatron.model import Block, Embedding, FinalNorm, GPTNeoX, Head, ModelConfig
from megatron.parallel.apply import apply_tensor_parallel, checkpoint_block, layer_modules
from megatron.parallel.groups import ParallelGroups
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


def layer_specs(cfg: ModelConfig) -> list:
    """The NeoX layer list (indices as in the module docstring)."""
    blocks = [LayerSpec(Block, cfg) for _ in range(cfg.num_layers)]
    if cfg.tie_embeddings:
        embed = TiedLayerSpec("embed", Embedding, cfg, tied_weight_attr=["word_embeddings.weight"])
        head = TiedLayerSpec("embed", Embedding, cfg, forward_fn=_tied_logits,
                             tied_weight_attr=["word_embeddings.weight"])
    else:
        embed, head = LayerSpec(Embedding, cfg), LayerSpec(Head, cfg)
    return [embed, _to_stack, *blocks, _from_stack, LayerSpec(FinalNorm, cfg), head]


@torch.no_grad()
def _load_local_layers(pipe: PipelineModule, full_model: GPTNeoX) -> None:
    source = layer_modules(full_model)
    for idx, layer in layer_modules(pipe).items():
        layer.load_state_dict(source[idx].state_dict())


def build_pipeline_module(
    model_cfg: ModelConfig,
    groups: ParallelGroups,
    loss_fn,
    *,
    seed: int,
    partition_method: str = "type:Block",
    activation_checkpointing: bool = False,
    recompute_context=None,
    full_model: GPTNeoX | None = None,
) -> PipelineModule:
    """This stage's layers, tensor-parallel if tp > 1, ready for `deepspeed.initialize`.

    Weights: copied (and sharded) from `full_model` when given, else drawn NeoX-style,
    one generator per layer index and tp rank (`init_layers_sharded`). With
    `activation_checkpointing` every block recomputes its activations in backward;
    `recompute_context()` is entered during recomputation (L2E counts statistics once).
    """
    if partition_method.lower() == NEOX_DEFAULT_PARTITION:
        partition_method = "type:Block"  # the same layers under our class name
    pipe = PipelineModule(
        layers=layer_specs(model_cfg),
        topology=groups.topology,
        loss_fn=loss_fn,
        partition_method=partition_method,
        activation_checkpoint_interval=0,  # blocks checkpoint themselves (never the embedding)
    )
    for layer in layer_modules(pipe).values():
        if isinstance(layer, Embedding):
            layer.register_forward_pre_hook(_unpack_tokens)
    if full_model is not None:
        _load_local_layers(pipe, full_model)
    apply_tensor_parallel(pipe, groups, shard_from_full=full_model is not None, seed=seed, cfg=model_cfg)
    if model_cfg.tie_embeddings:
        pipe._synchronize_tied_weights()  # the first stage's draw wins on the last stage too
    if activation_checkpointing:
        for layer in layer_modules(pipe).values():
            if isinstance(layer, Block):
                checkpoint_block(layer, recompute_context)
    return pipe
