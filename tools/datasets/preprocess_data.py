"""Tokenize text into Megatron's mmap format: PREFIX_{key}_document.{bin,idx}.

    python tools/datasets/preprocess_data.py --input corpus.jsonl.zst,notes.txt \\
        --output-prefix data/mycorpus --tokenizer-type HFTokenizer \\
        --vocab-file data/tokenizers/20B_tokenizer.json --append-eod --workers 2

Inputs (comma-separated), each optionally compressed as .gz or .zst (the Pile's
format; needs `zstandard`):
  *.jsonl / *.json  one document per line, {"text": ...}; --jsonl-keys picks the fields.
  *.txt             one document per file, or per blank-line-separated paragraph with
                    --txt-paragraphs. A book or an article is one document, as a jsonl
                    line would hold it; paragraphs suit corpora of short texts.
Input must be UTF-8: anything else stops the run naming the file and byte offset. A
jsonl line that is not JSON or lacks a key is reported as file:line and stops the run
(default), or is skipped and counted with --on-error skip. Nothing is dropped silently.

The output appears only when the run succeeds: both files are written under temporary
names and renamed at the end, so a failed or interrupted run leaves an existing dataset
at the prefix as it was, and no partial files.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tqdm import tqdm  # noqa: E402

from megatron.data.indexed_dataset import DatasetWriter, best_token_dtype  # noqa: E402
from megatron.errors import DataError, cli_main  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402

COMPRESSIONS = (".gz", ".zst")
JSONL, TXT = "jsonl", "txt"


def input_kind(path: str) -> str:
    name = path
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json")):
        return JSONL
    if name.endswith(".txt"):
        return TXT
    raise DataError(f"--input: {path}: unknown input type; name it .jsonl or .txt "
                    f"(optionally .gz or .zst)")


def _open_binary(path: str, raw):
    """A binary line-iterable over the decompressed bytes of ``raw`` (an open file)."""
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        return io.BufferedReader(ZstdFrames(raw, path), buffer_size=1 << 20)
    return raw


class ZstdFrames(io.RawIOBase):
    """Every frame of a .zst file, decompressed, as `zstd -d` reads it.

    zstandard's own stream reader ends silently where a truncated download ends; this
    one raises EOFError there, so a cut-off Pile shard is not taken for a complete one.
    """

    def __init__(self, raw, path: str):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"--input: {path} is zstd-compressed; `pip install zstandard` "
                            f"or decompress it first (zstd -d)") from None
        self._raw, self._new_frame = raw, zstandard.ZstdDecompressor().decompressobj
        self._zstd_error = zstandard.ZstdError
        self._frame, self._frame_started = self._new_frame(), False
        self._pending, self._taken = b"", 0  # decompressed bytes, and how many were read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._taken == len(self._pending):
            compressed = self._raw.read(1 << 20)
            if not compressed:
                if self._frame_started and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._pending, self._taken = self._decompress(compressed), 0
        n = min(len(buffer), len(self._pending) - self._taken)
        buffer[:n] = memoryview(self._pending)[self._taken:self._taken + n]
        self._taken += n
        return n

    def _decompress(self, compressed: bytes) -> bytes:
        out = []
        while compressed:
            if self._frame.eof:  # the rest starts the next frame
                self._frame = self._new_frame()
            self._frame_started = True
            try:
                out.append(self._frame.decompress(compressed))
            except self._zstd_error as e:
                raise ValueError(str(e)) from None
            compressed = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)


class InputReader:
    """Yields (where, kind, text) per document of every input, decoding UTF-8 strictly.

    ``position`` is how many bytes of the inputs (as stored, compressed or not) have
    been read, for a progress bar whose total is ``total_bytes``.
    """

    def __init__(self, paths, txt_paragraphs: bool = False):
        for path in paths:
            if not Path(path).is_file():
                raise DataError(f"--input: {path} does not exist")
            input_kind(path)
        self.paths, self.txt_paragraphs = list(paths), txt_paragraphs
        self.total_bytes = sum(os.path.getsize(p) for p in self.paths)
        self._finished_bytes, self._raw = 0, None

    @property
    def position(self) -> int:
        current = self._raw.tell() if self._raw is not None and not self._raw.closed else 0
        return self._finished_bytes + current

    def __iter__(self):
        for path in self.paths:
            with open(path, "rb") as raw:
                self._raw = raw
                try:
                    yield from self._documents(path, input_kind(path), _open_binary(path, raw))
                except (OSError, EOFError, ValueError) as e:  # gzip, zstd and I/O errors
                    raise DataError(f"{path}: unreadable ({e}); re-download or re-compress "
                                    f"it (check with gzip -t / zstd -t)") from None
            self._finished_bytes += os.path.getsize(path)
            self._raw = None

    def _documents(self, path, kind, stream):
        offset, parts, first_line = 0, [], 1
        for lineno, line in enumerate(stream, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                of_text = " of the decompressed text" if path.endswith(COMPRESSIONS) else ""
                raise DataError(f"{path}: not UTF-8 at byte offset {offset + e.start}{of_text} "
                                f"(line {lineno}); convert it, e.g. iconv -f latin1 -t utf-8"
                                ) from None
            offset += len(line)
            if kind == JSONL:
                if text.strip():
                    yield f"{path}:{lineno}", JSONL, text
            elif self.txt_paragraphs and not text.strip():
                if parts:
                    yield f"{path}:{first_line}", TXT, "".join(parts)
                parts = []
            else:
                if not parts:
                    first_line = lineno
                parts.append(text)
        if parts:
            yield (f"{path}:{first_line}" if self.txt_paragraphs else path), TXT, "".join(parts)


class Encoder:
    """Runs in each worker: a document -> {key: token ids} or an error message."""

    def __init__(self, tokenizer_args, keys, append_eod, fix_text=False):
        self.tokenizer_args, self.keys, self.append_eod = tokenizer_args, keys, append_eod
        self.fix_text = fix_text

    def start(self):
        self.tokenizer = build_tokenizer(self.tokenizer_args)
        if self.fix_text:
            import ftfy

            self._fix = ftfy.fix_text

    def __call__(self, item):
        where, kind, text = item
        if kind == TXT:
            doc = {"text": text}
        else:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                return where, None, f"not valid JSON ({e.msg})"
            if not isinstance(doc, dict):
                return where, None, "not a JSON object"
        missing = [k for k in self.keys if not isinstance(doc.get(k), str)]
        if missing:
            return where, None, f"no string field {missing[0]!r}"
        ids = {}
        for key in self.keys:
            ids[key] = self.tokenizer.tokenize(self._fix(doc[key]) if self.fix_text else doc[key])
            if self.append_eod and ids[key]:
                ids[key].append(self.tokenizer.eod)
        return where, ids, None


_encoder: Encoder | None = None
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(encoder):
    global _encoder
    # The parent cleans up on Ctrl-C/SIGTERM and then terminates the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by _start_pool
    _encoder = encoder
    _encoder.start()


def _start_pool(workers: int, encoder):
    """Workers are forked with Ctrl-C and SIGTERM blocked: one arriving before
    _worker_init set their handlers would otherwise run the parent's handler in them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return multiprocessing.Pool(workers, initializer=_worker_init, initargs=(encoder,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_encode(item):
    return _encoder(item)


def _check_options(inputs, keys, fix_text):
    if any(input_kind(p) == TXT for p in inputs) and list(keys) != ["text"]:
        raise DataError(f"--jsonl-keys {' '.join(keys)}: .txt inputs have only the 'text' "
                        f"field; preprocess them separately without --jsonl-keys")
    if fix_text:
        try:
            import ftfy  # noqa: F401
        except ImportError:
            raise DataError("--ftfy needs the ftfy package: pip install ftfy") from None


def preprocess(inputs, output_prefix, tokenizer_args, keys=("text",), append_eod=False,
               workers=1, on_error="stop", progress=True, fix_text=False,
               txt_paragraphs=False, log_interval=100, num_docs=None) -> dict:
    """Write one dataset per key; returns counts (documents, tokens, skipped, empty)."""
    _check_options(inputs, keys, fix_text)
    reader = InputReader(inputs, txt_paragraphs)
    encoder = Encoder(tokenizer_args, list(keys), append_eod, fix_text)
    dtype = best_token_dtype(build_tokenizer(tokenizer_args).vocab_size)
    writers = {}
    stats = {"documents": 0, "tokens": 0, "skipped": 0, "empty": 0}
    first_skip, pool, bar = None, None, None
    start = time.time()
    try:
        for key in keys:
            writers[key] = DatasetWriter(f"{output_prefix}_{key}_document", dtype)
        if workers > 1:
            pool = _start_pool(workers, encoder)
            results = pool.imap(_worker_encode, reader, chunksize=64)
        else:
            encoder.start()
            results = map(encoder, reader)
        if num_docs:  # NeoX's flag: count documents against a known total
            bar = tqdm(total=num_docs, unit=" docs", disable=not progress, mininterval=1.0)
        else:
            bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       disable=not progress, mininterval=1.0)
        seen = 0
        for where, ids, error in results:
            seen += 1
            if seen % log_interval == 0:
                bar.update((seen if num_docs else reader.position) - bar.n)
                seconds = max(time.time() - start, 1e-9)
                bar.set_postfix(docs=f"{stats['documents']:,}",
                                tok_per_s=f"{stats['tokens'] / seconds:,.0f}", refresh=False)
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
                writers[key].builder.add_item(doc)
                writers[key].builder.end_document()
                stats["tokens"] += len(doc)
            stats["documents"] += 1
        bar.update((seen if num_docs else reader.total_bytes) - bar.n)
        if stats["documents"] == 0:
            raise DataError(f"--input: no documents in {', '.join(inputs)}; nothing to write")
        for writer in writers.values():
            writer.finalize()
        for writer in writers.values():
            writer.publish()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
    _report(writers, stats, dtype, time.time() - start, first_skip)
    return stats


def _report(writers, stats, dtype, seconds, first_skip):
    seconds = max(seconds, 1e-9)
    print(f"wrote {', '.join(w.prefix for w in writers.values())}: {stats['documents']:,} "
          f"documents, {stats['tokens']:,} tokens ({dtype.__name__}) in {seconds:.1f}s = "
          f"{stats['documents'] / seconds:,.0f} docs/s, {stats['tokens'] / seconds:,.0f} tokens/s",
          file=sys.stderr)
    if stats["empty"]:
        print(f"skipped {stats['empty']} documents with no text", file=sys.stderr)
    if stats["skipped"]:
        print(f"skipped {stats['skipped']} bad lines (first: {first_skip})", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = p.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="comma-separated .jsonl/.txt files (.gz/.zst ok)")
    group.add_argument("--jsonl-keys", nargs="+", default=["text"],
                       help="jsonl fields to tokenize, one dataset each (default: text)")
    group.add_argument("--txt-paragraphs", action="store_true",
                       help=".txt inputs: one document per blank-line-separated paragraph "
                       "(default: one per file)")
    group.add_argument("--num-docs", type=int,
                       help="number of documents, if known: the progress bar counts "
                       "documents instead of input bytes")
    group.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                       help="a bad jsonl line stops the run (default) or is skipped and counted")
    group = p.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       choices=["HFTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer"])
    group.add_argument("--vocab-file")
    group.add_argument("--merge-file")
    group.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    group.add_argument("--ftfy", action="store_true",
                       help="repair mojibake and odd Unicode with ftfy.fix_text before tokenizing")
    group = p.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True)
    group.add_argument("--dataset-impl", choices=["mmap", "lazy", "cached"], default="mmap",
                       help="only mmap is written (the format training reads)")
    group = p.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=100,
                       help="refresh the progress bar every this many documents")
    return p.parse_args(argv)


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM, raised in the parent only: it unwinds through preprocess, which
    removes the temporary files (a KeyboardInterrupt would print the parent's traceback
    and the pool's)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    for sig in _STOP_SIGNALS:  # a second Ctrl-C must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise _Stopped(signum)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.dataset_impl != "mmap":
        raise DataError(f"--dataset-impl {args.dataset_impl}: only mmap is supported (the "
                        f"only format neox-l2e and current GPT-NeoX read); drop the flag")
    if args.log_interval < 1 or args.workers < 1:
        raise DataError("--log-interval and --workers must be at least 1")
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _stop)
    tokenizer_args = SimpleNamespace(tokenizer_type=args.tokenizer_type,
                                     vocab_file=args.vocab_file, merge_file=args.merge_file)
    try:
        preprocess(args.input.split(","), args.output_prefix, tokenizer_args, args.jsonl_keys,
                   args.append_eod, args.workers, args.on_error, fix_text=args.ftfy,
                   txt_paragraphs=args.txt_paragraphs, log_interval=args.log_interval,
                   num_docs=args.num_docs)
    except _Stopped as stop:
        print(f"preprocess_data: stopped by {signal.Signals(stop.signum).name}; its temporary files are "
              f"removed and any dataset already at --output-prefix is unchanged", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
