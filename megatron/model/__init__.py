"""GPT-NeoX model in plain torch and its initialisation.

Knows nothing of ranks, DeepSpeed or checkpoints; imports only errors. Tensor and
pipeline parallelism are applied to it from outside (megatron.parallel)."""
from megatron.model.gpt_neox import (
    MLP,
    Attention,
    Block,
    Embedding,
    FinalNorm,
    GPTNeoX,
    Head,
    KVCache,
    ModelConfig,
    RotaryEmbedding,
    parameter_counts,
)
from megatron.model.init import init_std, init_weights

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "Embedding",
    "FinalNorm",
    "GPTNeoX",
    "Head",
    "KVCache",
    "ModelConfig",
    "RotaryEmbedding",
    "init_std",
    "init_weights",
    "parameter_counts",
]
