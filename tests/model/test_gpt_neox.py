"""GPTNeoX: logits parity with HF GPTNeoXForCausalLM, shapes, dtypes, meta construction."""
import pytest
import torch
import torch.nn as nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from megatron.model import GPTNeoX, KVCache, ModelConfig, init_weights
from megatron.model.hf import hf_config_kwargs, hf_to_model_state_dict, model_config_from_hf

TINY = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)


def random_hf_model(seed=0, **overrides):
    kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**kw)).eval()
    with torch.no_grad():  # HF's init leaves LayerNorms at 1/0 and biases at 0: randomise everything
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def ours_from_hf(hf):
    cfg = model_config_from_hf(hf.config.to_dict())
    model = GPTNeoX(cfg).eval()
    model.load_state_dict(hf_to_model_state_dict(hf.state_dict()), strict=True)
    return model


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_logits_match_hf(rotary_pct, parallel, act):
    hf = random_hf_model(rotary_pct=rotary_pct, use_parallel_residual=parallel, hidden_act=act)
    model = ours_from_hf(hf)
    assert model.cfg.gelu_tanh == (act != "gelu")
    # ids include the padded rows (>= 100): those rows must take part exactly as in HF
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, 24, 128)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_gelu_choice_is_visible_in_logits():
    """Guards the parity test: using the other GELU must break the 1e-5 match."""
    hf = random_hf_model(hidden_act="gelu")
    model = ours_from_hf(hf)
    model.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() > 1e-5


def test_hf_tanh_aliases_and_non_gelu():
    base = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).to_dict()
    for act, tanh in [("gelu", False), ("gelu_new", True), ("gelu_pytorch_tanh", True), ("gelu_fast", True)]:
        assert model_config_from_hf({**base, "hidden_act": act}).gelu_tanh is tanh


def test_transformers_4_config_fields():
    """Pythia's config.json on the Hub predates rope_parameters."""
    v4 = dict(model_type="gpt_neox", vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
              intermediate_size=2048, rotary_pct=0.25, rotary_emb_base=10000, rope_scaling=None, hidden_act="gelu")  # fmt: skip
    cfg = model_config_from_hf(v4)
    assert (cfg.rotary_pct, cfg.rotary_dims, cfg.rotary_base, cfg.intermediate_size) == (0.25, 16, 10000.0, None)


def test_hf_config_round_trip():
    cfg = ModelConfig(**TINY, rotary_pct=0.25, parallel_residual=False, gelu_tanh=True, tie_embeddings=True)
    back = model_config_from_hf(GPTNeoXConfig(**hf_config_kwargs(cfg)).to_dict())
    assert back == cfg


def test_parameter_count_formula():
    V, h, L = 256, 48, 3
    model = GPTNeoX(ModelConfig(vocab_size=V, hidden_size=h, num_layers=L, num_heads=4))
    assert sum(p.numel() for p in model.parameters()) == 2 * V * h + L * (12 * h * h + 13 * h) + 2 * h


def test_tied_embeddings_share_one_tensor():
    model = GPTNeoX(ModelConfig(**TINY, tie_embeddings=True))
    assert model.head.final_linear.weight is model.embed.word_embeddings.weight


def test_meta_construction_then_materialise():
    cfg = ModelConfig(**TINY)
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    init_weights(model, cfg, generator=torch.Generator().manual_seed(0))
    logits = model(torch.randint(0, 128, (1, 8)))
    assert torch.isfinite(logits).all()


def test_low_precision_close_to_fp32():
    hf = random_hf_model()
    model = ours_from_hf(hf)
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(ids)
        half = model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    scale = ref.abs().max()
    for out in (auto, half):
        assert torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.1 * scale


def test_rotary_tables_not_in_state_dict():
    model = GPTNeoX(ModelConfig(**TINY, rotary_pct=0.25))
    assert not any("rotary" in k or "inv_freq" in k for k in model.state_dict())


def test_heads_follow_the_qkv_shard():
    """A tensor-parallel rank swaps in a qkv with half the rows; attention must run on half the heads."""
    cfg = ModelConfig(**TINY)
    attn = GPTNeoX(cfg).blocks[0].attention
    attn.query_key_value = nn.Linear(32, 48)  # 2 of 4 heads
    attn.dense = nn.Linear(16, 32)
    assert attn(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_causal_future_tokens_do_not_change_past_logits():
    model = GPTNeoX(ModelConfig(**TINY)).eval()
    ids = torch.randint(0, 128, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 128
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.equal(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_kv_cache_decoding_matches_full_forward(rotary_pct):
    """A prompt, then a 3-token chunk, then single tokens through the cache: every step's
    logits equal the full-sequence forward at those positions (rotary offsets, masks)."""
    model = ours_from_hf(random_hf_model(rotary_pct=rotary_pct))
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(2))
    cache = KVCache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :6], cache=cache), model(ids[:, 6:9], cache=cache)]
        steps += [model(ids[:, i : i + 1], cache=cache) for i in range(9, 14)]
    assert cache.length == 14
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_dropout_only_in_training():
    model = GPTNeoX(ModelConfig(**TINY, hidden_dropout=0.5, attention_dropout=0.5))
    ids = torch.randint(0, 128, (1, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_flash_request_falls_back_to_sdpa_on_cpu():
    hf = random_hf_model()
    sdpa = ours_from_hf(hf)
    flash = GPTNeoX(ModelConfig(**{**sdpa.cfg.__dict__, "attention_impl": "flash"})).eval()
    flash.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(flash(ids), sdpa(ids))


@pytest.mark.gpu
def test_cuda_bf16_flash_close_to_fp32_hf():
    hf = random_hf_model().cuda()
    model = ours_from_hf(hf)
    model.blocks.apply(lambda m: setattr(m, "use_flash", True) if hasattr(m, "use_flash") else None)
    model = model.cuda()
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    with torch.no_grad():
        ref = hf(ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.gpu
def test_cuda_bf16_kv_cache_close_to_full_forward():
    """generate.py's GPU path: bf16, flash requested (used for the prompt, SDPA with a
    mask for the cached steps)."""
    model = ours_from_hf(random_hf_model())
    model.blocks.apply(lambda m: setattr(m, "use_flash", True) if hasattr(m, "use_flash") else None)
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 40), device="cuda")
    cache = KVCache()
    with torch.no_grad():
        full = model(ids).float()
        steps = [model(ids[:, :32], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(32, 40)]
    stepped = torch.cat(steps, dim=1).float()
    assert (stepped - full).abs().max() < 0.05 * full.abs().max()


def test_trains_after_inference_mode_forward():
    """The shared rotary tables must not become inference tensors on first use."""
    model = GPTNeoX(ModelConfig(**{**TINY, "max_position_embeddings": 77}, rotary_pct=0.5))  # a fresh table
    ids = torch.randint(0, 128, (1, 8))
    with torch.inference_mode():
        model(ids)
    model(ids).sum().backward()
    assert model.blocks[0].attention.query_key_value.weight.grad is not None
