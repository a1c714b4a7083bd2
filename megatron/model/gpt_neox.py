"""GPT-NeoX in plain PyTorch, numerically interchangeable with HF `GPTNeoXForCausalLM`.

    x = embed(tokens)
    for each block:  x = x + attn(ln1(x)) + mlp(ln2(x))         (parallel residual)
                or   x = x + attn(ln1(x));  x = x + mlp(ln2(x))  (sequential)
    logits = head(final_norm(x))

For decoding, ``model(tokens, cache=KVCache())`` keeps each block's keys and values, so
the next call feeds only the new tokens (their positions continue after the cached ones).

Submodule names are GPT-NeoX's per-layer names, so `Embedding`, `Block`, `FinalNorm`
and `Head` state dicts are exactly the contents of NeoX's `layer_XX` checkpoint files.
The model knows nothing about ranks: tensor parallelism swaps the linears from outside,
which is why every projection is called as a module and the attention reads its head
count off the qkv output.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int  # padded: the embedding and head rows
    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 2048
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    layernorm_eps: float = 1e-5
    gelu_tanh: bool = False  # NeoX's bias-gelu-fusion kernel is the tanh form
    intermediate_size: int | None = None  # None means 4h
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = False
    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_std: float = 0.02
    attention_impl: str = "sdpa"  # "sdpa" | "flash"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)


# ----------------------------------------------------------------------------- rotary


@functools.lru_cache(maxsize=16)
def _rotary_tables(dims: int, base: float, n: int, device: torch.device):
    # Always fp32 and never part of the state dict: v1.0 NeoX cast its persisted inv_freq to
    # fp16 with the model, which wrecks the angles at high positions (gpt-neox#1003).
    # Elementwise ops only, so autocast cannot lower the precision; built outside inference
    # mode so a table first made during evaluation can still be used when training.
    with torch.inference_mode(False):
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims))
        angles = torch.arange(n, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # non-interleaved: [f, f]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates the first `dims` channels of each head of q and k; the rest pass through."""

    def __init__(self, dims: int, base: float, max_positions: int):
        super().__init__()
        self.dims, self.base, self.max_positions = dims, base, max_positions

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):  # [b, heads, s, head_dim]
        """``offset``: position of the first of the ``s`` tokens (the cached length when decoding)."""
        if self.dims == 0:
            return q, k
        end = offset + q.shape[-2]
        # Tables live in a shared cache, built on first use on the input's device (so the
        # module works after meta-device construction and survives .to(half)).
        cos, sin = _rotary_tables(self.dims, self.base, max(end, self.max_positions), q.device)
        cos, sin = cos[offset:end], sin[offset:end]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x, cos, sin):
        x_rot, x_pass = x[..., : self.dims].float(), x[..., self.dims :]
        x_rot = x_rot * cos + rotate_half(x_rot) * sin
        return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


# ----------------------------------------------------------------------------- KV cache


class LayerCache:
    """One block's keys and values [b, heads, t, head_dim] of the tokens seen so far."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Append the new tokens' keys and values; return all of them."""
        self.k = k if self.k is None else torch.cat((self.k, k), dim=-2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=-2)
        return self.k, self.v


class KVCache:
    """Per-block ``LayerCache``s for incremental decoding, created on first use."""

    def __init__(self):
        self.layers: list[LayerCache] = []

    def layer(self, i: int) -> LayerCache:
        while len(self.layers) <= i:
            self.layers.append(LayerCache())
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


# ----------------------------------------------------------------------------- layers


@functools.lru_cache(maxsize=1)  # a failed import is not cached by Python; don't retry it every forward
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.use_flash = cfg.attention_impl == "flash"
        # qkv output is viewed as [heads, 3*head_dim]: each head holds its own [q|k|v]
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dims, cfg.rotary_base, cfg.max_position_embeddings)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)  # local heads under tensor parallelism
        q, k, v = qkv.view(b, s, heads, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, dim=-1)
        past = cache.length if cache is not None else 0
        q, k = self.rotary_emb(q, k, offset=past)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = self._attend(q, k, v)  # [b, s, heads, head_dim]
        return self.dense(y.reshape(b, s, heads * self.head_dim))

    def _attend(self, q, k, v):
        p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        s, t = q.shape[-2], k.shape[-2]
        flash = _flash_attn_func() if self.use_flash and q.is_cuda and s == t else None
        if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            return flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p, scale, causal=True)
        if s == t:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)
        else:  # s new queries after t - s cached keys: query i sees keys up to t - s + i
            mask = None if s == 1 else torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu_tanh else "none")
        self.dense_4h_to_h = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        a = self.dropout(self.attention(self.input_layernorm(x), cache))
        if self.parallel_residual:
            return x + a + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + a
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Embedding(nn.Module):
    """Token ids -> hidden states (rotary means there are no learned positions)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.word_embeddings(input_ids))


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_linear = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_linear(x)


class GPTNeoX(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg)
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.final_linear.weight = self.embed.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [b, s, V]. With ``cache``, ``input_ids`` continue the cached tokens."""
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache.layer(i))
        return self.head(self.final_norm(x))


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters, counted on the meta device (no memory);
    non-embedding leaves out the input embedding and the output head, as Pythia counts."""
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters()
                    if name.startswith(("embed.", "head.")))
    return total, total - embedding
