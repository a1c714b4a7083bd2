"""HF `GPTNeoXForCausalLM` <-> our GPTNeoX: config fields and parameter names.

The tensors themselves need no reshaping: HF uses NeoX's per-head-interleaved qkv layout
and keeps the padded vocabulary rows, so conversion is a pure rename.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron.errors import CheckpointError
from megatron.model.gpt_neox import ModelConfig

EXACT_GELU = "gelu"
TANH_GELU = "gelu_pytorch_tanh"  # F.gelu(approximate="tanh"): bit-identical to our nn.GELU("tanh")
TANH_GELU_ALIASES = {TANH_GELU, "gelu_new", "gelu_fast", "gelu_python_tanh"}

# Buffers older HF/NeoX checkpoints carry that hold no learned state.
_IGNORED_HF_KEYS = re.compile(r"\.attention\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict (transformers 4 or 5 field names)."""
    if hf.get("model_type") != "gpt_neox":
        raise CheckpointError(
            f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt_neox'; pass a GPT-NeoX/Pythia model directory"
        )
    act = hf.get("hidden_act", EXACT_GELU)
    if act != EXACT_GELU and act not in TANH_GELU_ALIASES:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not a GELU; GPT-NeoX uses 'gelu' or a tanh GELU")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is unsupported; only default rotary is")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing {', '.join(missing)}; not a complete GPT-NeoX config")
    h = hf["hidden_size"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=h,
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
        rotary_base=float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
        parallel_residual=hf.get("use_parallel_residual", True),
        layernorm_eps=hf.get("layer_norm_eps", 1e-5),
        gelu_tanh=act != EXACT_GELU,
        intermediate_size=None if hf.get("intermediate_size", 4 * h) == 4 * h else hf["intermediate_size"],
        hidden_dropout=hf.get("hidden_dropout", 0.0),
        attention_dropout=hf.get("attention_dropout", 0.0),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
    )


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for `transformers.GPTNeoXConfig` describing the same network."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=TANH_GELU if cfg.gelu_tanh else EXACT_GELU,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base, partial_rotary_factor=cfg.rotary_pct),
        layer_norm_eps=cfg.layernorm_eps,
        use_parallel_residual=cfg.parallel_residual,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        bos_token_id=0,  # Pythia: <|endoftext|> is id 0 and serves as both
        eos_token_id=0,
    )


# (HF name pattern, our name pattern); `{}` is the rest of the key. transformers 5 calls the
# head `lm_head` in memory and renames it to the files' `embed_out` on save/load.
_RENAMES = [
    ("gpt_neox.embed_in.{}", "embed.word_embeddings.{}"),
    ("gpt_neox.final_layer_norm.{}", "final_norm.norm.{}"),
    ("lm_head.{}", "head.final_linear.{}"),
    ("gpt_neox.layers.{}", "blocks.{}"),
]
_FILE_NAMES = [("embed_out.{}", "head.final_linear.{}")]


def _rename(key: str, pairs) -> str:
    for src, dst in pairs:
        prefix = src[:-2]
        if key.startswith(prefix):
            return dst[:-2] + key[len(prefix) :]
    raise CheckpointError(f"unexpected parameter {key!r} in a GPT-NeoX state dict")


def hf_to_model_state_dict(hf_sd: dict) -> dict:
    return {_rename(k, _RENAMES + _FILE_NAMES): v for k, v in hf_sd.items() if not _IGNORED_HF_KEYS.search(k)}


def model_to_hf_state_dict(sd: dict) -> dict:
    return {_rename(k, [(b, a) for a, b in _RENAMES]): v for k, v in sd.items()}


def read_config_json(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read an HF config ({e}); pass an HF model directory") from e


def read_hf_checkpoint(directory) -> tuple[ModelConfig, dict]:
    """(ModelConfig, our state dict) from an HF GPT-NeoX directory, in its stored dtype."""
    cfg = model_config_from_hf(read_config_json(directory), source=str(Path(directory) / "config.json"))
    from transformers import GPTNeoXForCausalLM  # slow import: only once the directory checks out

    try:
        hf_model = GPTNeoXForCausalLM.from_pretrained(str(directory), dtype="auto", local_files_only=True)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot load the HF weights ({e})") from e
    return cfg, hf_to_model_state_dict(hf_model.state_dict())


def write_hf_checkpoint(directory, cfg: ModelConfig, sd: dict, tokenizer_file=None) -> None:
    """Save as an HF GPT-NeoX directory (optionally with a tokenizer.json-based tokenizer)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    dtype = sd["embed.word_embeddings.weight"].dtype
    with torch.device("meta"):
        hf_model = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_config_kwargs(cfg)))
    hf_sd = model_to_hf_state_dict(sd)
    if cfg.tie_embeddings:
        hf_sd.setdefault("lm_head.weight", hf_sd["gpt_neox.embed_in.weight"])
    hf_model.load_state_dict(hf_sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    hf_model.config.dtype = dtype
    hf_model.save_pretrained(str(directory))
    if tokenizer_file is not None:
        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file),
                                **special_tokens(tokenizer_file)).save_pretrained(str(directory))


def special_tokens(tokenizer_file) -> dict:
    """BOS/EOS/UNK (and PAD) as Pythia's HF tokenizer declares them.

    NeoX tokenizers mark end-of-document with ``<|endoftext|>`` (id 0), which HF's
    GPT-NeoX tokenizer uses as BOS, EOS and UNK; without them ``lm_eval --model hf``
    cannot build its prefix token.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eod = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else tok.id_to_token(0)
    out = {"bos_token": eod, "eos_token": eod, "unk_token": eod}
    if tok.token_to_id("<|padding|>") is not None:
        out["pad_token"] = "<|padding|>"
    return out
