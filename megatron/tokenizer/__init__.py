from megatron.tokenizer.tokenizer import build_tokenizer, resolve_tokenizer_path, tokenizer_files

__all__ = ["build_tokenizer", "resolve_tokenizer_path", "tokenizer_files"]
