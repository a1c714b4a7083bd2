"""NeoX init methods: σ per method, which tensors get which method, biases/norms."""
import math

import pytest
import torch

from megatron.errors import ConfigError
from megatron.model import GPTNeoX, ModelConfig, init_std, init_weights

H, L = 256, 4
CFG = dict(vocab_size=512, hidden_size=H, num_layers=L, num_heads=4, init_std=0.02)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("normal", 0.02),
        ("scaled_normal", 0.02 / math.sqrt(2 * L)),
        ("small_init", math.sqrt(2 / (5 * H))),
        ("wang_init", 2 / (L * math.sqrt(H))),
    ],
)
def test_std_per_method(method, expected):
    assert init_std(method, ModelConfig(**CFG)) == pytest.approx(expected)


def test_weights_drawn_with_the_right_std():
    cfg = ModelConfig(**CFG, init_method="small_init", output_layer_init_method="wang_init")
    model = GPTNeoX(cfg)
    init_weights(model, cfg, generator=torch.Generator().manual_seed(0))
    small, wang = math.sqrt(2 / (5 * H)), 2 / (L * math.sqrt(H))
    block = model.blocks[1]
    for w, std in [
        (model.embed.word_embeddings.weight, small),
        (model.head.final_linear.weight, small),
        (block.attention.query_key_value.weight, small),
        (block.mlp.dense_h_to_4h.weight, small),
        (block.attention.dense.weight, wang),
        (block.mlp.dense_4h_to_h.weight, wang),
    ]:
        assert w.std().item() == pytest.approx(std, rel=0.03)
        assert abs(w.mean().item()) < 0.1 * std
    for ln in (block.input_layernorm, block.post_attention_layernorm, model.final_norm.norm):
        assert torch.equal(ln.weight, torch.ones(H)) and torch.equal(ln.bias, torch.zeros(H))
    for bias in (block.attention.query_key_value.bias, block.attention.dense.bias, block.mlp.dense_4h_to_h.bias):
        assert torch.count_nonzero(bias) == 0


def test_generator_makes_init_reproducible():
    cfg = ModelConfig(**CFG)
    a, b = GPTNeoX(cfg), GPTNeoX(cfg)
    init_weights(a, cfg, generator=torch.Generator().manual_seed(3))
    init_weights(b, cfg, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="xavier_uniform"):
        init_std("xavier_uniform", ModelConfig(**CFG))
