"""Tokenize jsonl documents into Megatron's mmap format: PREFIX_{key}_document.{bin,idx}.

    python tools/datasets/preprocess_data.py --input corpus.jsonl[,more.jsonl.gz] \\
        --output-prefix data/mycorpus --tokenizer-type HFTokenizer \\
        --vocab-file data/tokenizers/20B_tokenizer.json --append-eod --workers 2

Each jsonl line is one document ({"text": ...}); it becomes one item of the dataset.
Inputs may be plain, .gz or .zst (needs the `zstandard` package). A line that is not
JSON or lacks a key is reported as file:line and stops the run (default), or is
skipped and counted with --on-error skip. Nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.data.indexed_dataset import (  # noqa: E402
    MMapIndexedDatasetBuilder, best_token_dtype, data_file_path, index_file_path)
from megatron.errors import DataError, cli_main  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402


def open_text(path: str):
    if not Path(path).is_file():
        raise DataError(f"--input: {path} does not exist")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"--input: {path} is zstd-compressed; `pip install zstandard` "
                            f"or decompress it first (zstd -d)") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def read_lines(paths):
    """(path, line number, text) for every non-blank line of every input."""
    for path in paths:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield path, lineno, line


class Encoder:
    """Runs in each worker: jsonl line -> {key: token ids} or an error message."""

    def __init__(self, tokenizer_args, keys, append_eod):
        self.tokenizer_args, self.keys, self.append_eod = tokenizer_args, keys, append_eod

    def start(self):
        self.tokenizer = build_tokenizer(self.tokenizer_args)

    def __call__(self, item):
        path, lineno, line = item
        where = f"{path}:{lineno}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            return where, None, f"not valid JSON ({e.msg})"
        if not isinstance(doc, dict):
            return where, None, "not a JSON object"
        missing = [k for k in self.keys if not isinstance(doc.get(k), str)]
        if missing:
            return where, None, f"no string field {missing[0]!r}"
        ids = {}
        for key in self.keys:
            ids[key] = self.tokenizer.tokenize(doc[key])
            if self.append_eod and ids[key]:
                ids[key].append(self.tokenizer.eod)
        return where, ids, None


_encoder: Encoder | None = None


def _worker_init(encoder):
    global _encoder
    _encoder = encoder
    _encoder.start()


def _worker_encode(item):
    return _encoder(item)


def preprocess(inputs, output_prefix, tokenizer_args, keys=("text",), append_eod=False,
               workers=1, on_error="stop", progress=True) -> dict:
    """Write one dataset per key; returns counts (documents, tokens, skipped, empty)."""
    encoder = Encoder(tokenizer_args, list(keys), append_eod)
    tokenizer = build_tokenizer(tokenizer_args)
    dtype = best_token_dtype(tokenizer.vocab_size)
    prefixes = {k: f"{output_prefix}_{k}_document" for k in keys}
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builders = {k: MMapIndexedDatasetBuilder(data_file_path(p), dtype) for k, p in prefixes.items()}
    stats = {"documents": 0, "tokens": 0, "skipped": 0, "empty": 0}
    first_skip = None
    lines = read_lines(inputs)
    if workers > 1:
        pool = multiprocessing.Pool(workers, initializer=_worker_init, initargs=(encoder,))
        results = pool.imap(_worker_encode, lines, chunksize=64)
    else:
        pool = None
        encoder.start()
        results = map(encoder, lines)
    start = time.time()
    bar = tqdm(results, unit=" docs", disable=not progress, mininterval=1.0)
    try:
        for where, ids, error in bar:
            if error:
                if on_error == "stop":
                    raise DataError(f"{where}: {error}; fix the line or pass --on-error skip")
                stats["skipped"] += 1
                first_skip = first_skip or f"{where}: {error}"
                continue
            if not any(ids.values()):
                stats["empty"] += 1
                continue
            for key, doc in ids.items():
                builders[key].add_item(np.asarray(doc, dtype=dtype))
                builders[key].end_document()
                stats["tokens"] += len(doc)
            stats["documents"] += 1
            if stats["documents"] % 1000 == 0:
                seconds = max(time.time() - start, 1e-9)
                bar.set_postfix(tok_per_s=f"{stats['tokens'] / seconds:,.0f}")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if stats["documents"] == 0:
        raise DataError(f"--input: no documents in {', '.join(inputs)}; nothing to write")
    for key, builder in builders.items():
        builder.finalize(index_file_path(prefixes[key]))
    seconds = max(time.time() - start, 1e-9)
    print(f"wrote {', '.join(prefixes.values())}: {stats['documents']:,} documents, "
          f"{stats['tokens']:,} tokens ({dtype.__name__}) in {seconds:.1f}s = "
          f"{stats['documents'] / seconds:,.0f} docs/s, {stats['tokens'] / seconds:,.0f} tokens/s",
          file=sys.stderr)
    if stats["empty"]:
        print(f"skipped {stats['empty']} documents with no text", file=sys.stderr)
    if stats["skipped"]:
        print(f"skipped {stats['skipped']} bad lines (first: {first_skip})", file=sys.stderr)
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="comma-separated jsonl files (.gz/.zst ok)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--jsonl-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-type", required=True,
                   choices=["HFTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer"])
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    tokenizer_args = SimpleNamespace(tokenizer_type=args.tokenizer_type,
                                     vocab_file=args.vocab_file, merge_file=args.merge_file)
    preprocess(args.input.split(","), args.output_prefix, tokenizer_args, args.jsonl_keys,
               args.append_eod, args.workers, args.on_error)


if __name__ == "__main__":
    main()
