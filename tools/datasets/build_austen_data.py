"""Rebuild the committed CPU demo data: data/austen_bpe4k_text_document.{bin,idx}.

    python tools/datasets/build_austen_data.py

One document per chapter (269 of them, novels in file-name order, EOD appended), so
the train/valid/test split of `split: "969,30,1"` has whole chapters on each side.
Tokenized with data/tokenizers/austen_bpe4k.json (rebuild it first with
train_tokenizer.py if you change the corpus).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.errors import cli_main  # noqa: E402
from tools.datasets.austen import AUSTEN_DIR, austen_documents  # noqa: E402
from tools.datasets.preprocess_data import preprocess  # noqa: E402

DATA_DIR = AUSTEN_DIR.parent
TOKENIZER = DATA_DIR / "tokenizers" / "austen_bpe4k.json"


@cli_main
def main():
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "austen_chapters.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for chapter in austen_documents():
                f.write(json.dumps({"text": chapter}) + "\n")
        tokenizer_args = SimpleNamespace(tokenizer_type="HFTokenizer", vocab_file=str(TOKENIZER))
        preprocess([str(jsonl)], str(DATA_DIR / "austen_bpe4k"), tokenizer_args,
                   append_eod=True, progress=False)


if __name__ == "__main__":
    main()
