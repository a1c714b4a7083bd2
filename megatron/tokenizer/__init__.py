"""Tokenizers as GPT-NeoX names them (HF tokenizers JSON, GPT2 BPE, ...) and where their
files are; imports only errors."""
from megatron.tokenizer.tokenizer import build_tokenizer, resolve_tokenizer_path, tokenizer_files

__all__ = ["build_tokenizer", "resolve_tokenizer_path", "tokenizer_files"]
