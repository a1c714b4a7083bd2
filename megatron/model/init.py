"""GPT-NeoX weight initialisation by name (NeoX's `init_method` / `output_layer_init_method`).

`init_method` draws the input-side matrices (qkv, MLP-in, word embedding, LM head);
`output_layer_init_method` draws the two matrices that write into the residual stream
(attention.dense, MLP-out), which is where the depth-scaled methods matter.
Biases start at 0 and LayerNorms at weight 1, bias 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from megatron.errors import ConfigError
from megatron.model.gpt_neox import ModelConfig

# Parameters that write into the residual stream get the output-layer method.
OUTPUT_LAYER_SUFFIXES = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def init_std(method: str, cfg: ModelConfig) -> float:
    """The normal σ NeoX uses for `method` on this model."""
    h, L = cfg.hidden_size, cfg.num_layers
    stds = {
        "normal": cfg.init_std,
        "scaled_normal": cfg.init_std / math.sqrt(2.0 * L),
        "small_init": math.sqrt(2.0 / (5.0 * h)),
        "wang_init": 2.0 / (L * math.sqrt(h)),
    }
    if method not in stds:
        raise ConfigError(f"init_method/output_layer_init_method: unknown method {method!r}; use one of {sorted(stds)}")
    return stds[method]


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """Initialise every parameter of a GPTNeoX (or its pipeline pieces) in place."""
    std_in = init_std(cfg.init_method, cfg)
    std_out = init_std(cfg.output_layer_init_method, cfg)
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            std = std_out if name.endswith(OUTPUT_LAYER_SUFFIXES) else std_in
            nn.init.normal_(p, mean=0.0, std=std, generator=generator)
