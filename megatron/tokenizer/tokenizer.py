"""Tokenizers selected by NeoX's ``tokenizer_type`` key.

Each has ``vocab_size``, ``eod`` (the id ending every document), ``tokenize(str)`` and
``detokenize(ids)``. Pythia uses HFTokenizer with ``20B_tokenizer.json``, whose
``<|endoftext|>`` is id 0.
"""
from __future__ import annotations

import json
import os

from megatron.errors import TokenizerError

EOD_TOKEN = "<|endoftext|>"


def _check_file(path, key: str) -> str:
    if not path:
        raise TokenizerError(f"{key}: not set; give the path of the tokenizer file")
    if not os.path.isfile(path):
        raise TokenizerError(f"{key}: {path} does not exist; fix the path "
                             f"(e.g. data/tokenizers/20B_tokenizer.json)")
    return path


class HFTokenizer:
    """A `tokenizers` tokenizer.json (e.g. the GPT-NeoX-20B / Pythia tokenizer)."""

    def __init__(self, vocab_file: str):
        from tokenizers import Tokenizer

        _check_file(vocab_file, "vocab_file")
        try:
            self.tokenizer = Tokenizer.from_file(vocab_file)
        except Exception as e:  # the library raises plain Exception on a bad file
            raise TokenizerError(f"vocab_file: {vocab_file} is not a readable tokenizer.json "
                                 f"({e}); point vocab_file at a HF tokenizers file") from None
        self.eod = self.tokenizer.token_to_id(EOD_TOKEN)
        if self.eod is None:
            raise TokenizerError(f"vocab_file: {vocab_file} has no {EOD_TOKEN} token; add it "
                                 f"as a special token (tools/datasets/train_tokenizer.py does)")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2's byte-level BPE from vocab.json + merges.txt."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        _check_file(vocab_file, "vocab_file")
        _check_file(merge_file, "merge_file")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:
            raise TokenizerError(f"vocab_file/merge_file: cannot read {vocab_file} / "
                                 f"{merge_file} as GPT-2 vocab.json + merges.txt ({e})") from None
        if EOD_TOKEN not in vocab:
            raise TokenizerError(f"vocab_file: {vocab_file} has no {EOD_TOKEN}; use GPT-2's vocab.json")
        self.tokenizer = Tokenizer(bpe)
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()
        self.eod = vocab[EOD_TOKEN]


class CharLevelTokenizer:
    """UTF-8 bytes as ids (NeoX's CharLevelTokenizer: vocab 512, eod 0)."""

    vocab_size = 512
    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


# Which keys name the files of each tokenizer type.
TOKENIZER_FILE_KEYS = {"hftokenizer": ("vocab_file",), "gpt2bpetokenizer": ("vocab_file", "merge_file")}
# Where a checkpoint keeps copies of its tokenizer files (megatron.checkpoint.save).
CHECKPOINT_TOKENIZER_DIR = "tokenizer"


def resolve_tokenizer_path(path, *directories):
    """``path`` as given when it exists (from the working directory); else, if relative, the
    first of ``directories`` holding it; else the first ``directories/tokenizer/<name>``
    copy (what checkpoints carry). Unchanged when nothing is found, so the error names it."""
    if not path or os.path.isfile(path):
        return path
    candidates = [] if os.path.isabs(path) else [os.path.normpath(os.path.join(d, path)) for d in directories]
    candidates += [os.path.join(d, CHECKPOINT_TOKENIZER_DIR, os.path.basename(path)) for d in directories]
    return next((c for c in candidates if os.path.isfile(c)), path)


def tokenizer_files(args) -> list[str]:
    """The existing files the tokenizer of ``args`` is read from (none for CharLevel)."""
    keys = TOKENIZER_FILE_KEYS.get((getattr(args, "tokenizer_type", None) or "").lower(), ())
    paths = [getattr(args, key, None) for key in keys]
    return [p for p in paths if p and os.path.isfile(p)]


def _checkpoint_directories(args) -> list[str]:
    """The checkpoint ``load`` names (its ``iteration`` or ``latest``): it carries a tokenizer copy."""
    load = getattr(args, "load", None)
    if not load or not os.path.isdir(load):
        return []
    if getattr(args, "iteration", None) is not None:
        return [os.path.join(load, f"global_step{args.iteration}")]
    latest = os.path.join(load, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return [os.path.join(load, f.read().strip())]
    return []


def build_tokenizer(args):
    """The tokenizer named by args.tokenizer_type; also sets args' padded vocab size.

    A tokenizer file missing at its configured path is taken from the copy in the
    checkpoint ``load`` points at (and the path in ``args`` updated)."""
    kind = (getattr(args, "tokenizer_type", None) or "").lower()
    for key in TOKENIZER_FILE_KEYS.get(kind, ()):
        given = getattr(args, key, None)
        found = resolve_tokenizer_path(given, *_checkpoint_directories(args))
        if found != given and os.environ.get("RANK", "0") == "0":
            print(f"{key}: {given} not found; using the checkpoint's copy {found}", flush=True)
        setattr(args, key, found)
    if kind == "hftokenizer":
        tokenizer = HFTokenizer(args.vocab_file)
    elif kind == "gpt2bpetokenizer":
        tokenizer = GPT2BPETokenizer(args.vocab_file, args.merge_file)
    elif kind == "charleveltokenizer":
        tokenizer = CharLevelTokenizer()
    else:
        raise TokenizerError(f"tokenizer_type: {args.tokenizer_type!r} is not supported; use "
                             f"HFTokenizer, GPT2BPETokenizer or CharLevelTokenizer")
    if hasattr(args, "set_vocab_size"):
        args.set_vocab_size(tokenizer.vocab_size)
    return tokenizer
