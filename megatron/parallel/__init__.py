"""Parallelism applied from outside the model: the process groups and how a rank joins
them (``distributed``), tensor-parallel layers and sharding, activation checkpointing,
the DeepSpeed pipeline module, and the JIT-build locks distributed start-up waits on.

May import the model and errors only; config, checkpoints and training sit above it."""
from megatron.parallel.apply import (
    LayerInit,
    apply_activation_checkpointing,
    apply_tensor_parallel,
    build_model,
    layer_modules,
    local_blocks,
)
from megatron.parallel.groups import ParallelGroups, build_topology
from megatron.parallel.pipeline import build_pipeline_module
from megatron.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "LayerInit",
    "ParallelGroups",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_activation_checkpointing",
    "apply_tensor_parallel",
    "build_model",
    "build_pipeline_module",
    "build_topology",
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "layer_modules",
    "local_blocks",
    "reduce_from_tensor_parallel_region",
    "vocab_parallel_cross_entropy",
]
