"""Train a small byte-level BPE tokenizer (tokenizer.json) with the `tokenizers` library.

    python tools/datasets/train_tokenizer.py                 # rebuilds the embedded one:
        # data/austen/*.txt -> data/tokenizers/austen_bpe4k.json (4,096 ids)
    python tools/datasets/train_tokenizer.py --input a.txt b.jsonl --vocab-size 8192 \\
        --output my_tokenizer.json

Same shape as the GPT-NeoX-20B tokenizer: NFC, byte-level pre-tokenization without a
prefix space, <|endoftext|> = 0 and <|padding|> = 1, so HFTokenizer loads it unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.errors import DataError, cli_main  # noqa: E402
from tools.datasets.austen import AUSTEN_DIR, austen_documents  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
DEFAULT_OUTPUT = AUSTEN_DIR.parent / "tokenizers" / "austen_bpe4k.json"


def iter_texts(paths):
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"--input: {path} does not exist")
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{path}:{lineno}: not a JSON object with a 'text' "
                                        f"field; fix the line") from None
        else:
            yield Path(path).read_text(encoding="utf-8")


def train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", help=".txt files (whole file) or .jsonl ('text'); "
                   "default: the embedded Austen chapters")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = p.parse_args(argv)
    texts = iter_texts(args.input) if args.input else austen_documents()
    tokenizer = train_bpe(texts, args.vocab_size)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.output)
    print(f"wrote {args.output} ({tokenizer.get_vocab_size()} ids)")


if __name__ == "__main__":
    main()
