"""Shared helpers of the checkpoint tests: a tiny random HF GPT-NeoX directory, the converter CLIs."""
import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_VOCAB = 100  # padded to 128 by NeoX's rule, like Pythia's 50277 -> 50304


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "ckpts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_hf_dir(path: Path, seed=0, **overrides) -> Path:
    kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64, rotary_pct=0.25, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw))
    with torch.no_grad():  # non-trivial norms and biases, so a wrong merge rule shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(TOKENIZER_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path
