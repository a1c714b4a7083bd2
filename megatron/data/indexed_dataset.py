"""Megatron's memory-mapped token file pair: ``PREFIX.bin`` + ``PREFIX.idx``.

``.bin`` holds the tokens of every item back to back. ``.idx`` (little-endian) is

    magic  b"MMIDIDX\\0\\0"   9 bytes
    version                  uint64 (= 1)
    dtype code               uint8  (see DTYPES)
    N (items)                uint64
    M (doc_idx entries)      uint64       -> 34-byte header
    sizes                    int32[N]     tokens per item
    pointers                 int64[N]     byte offset of each item in .bin
    doc_idx                  int64[M]     item index where each document starts

Files written here are byte-identical to the ones GPT-NeoX and Megatron-LM write, and
any file they write can be read here. Opening only maps the files, so a 300B-token
Pile opens instantly; items come back as numpy views into the map (no copy).
"""
from __future__ import annotations

import os
import struct

import numpy as np

from megatron.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
OLD_MAGIC = b"TNTIDX\x00\x00"  # the pre-mmap "cached"/"lazy" format
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, M -> 34 bytes

DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}


def dtype_code(dtype) -> int:
    for code, dt in DTYPES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {np.dtype(dtype)} has no MMIDIDX code; use one of "
                     f"{[np.dtype(d).name for d in DTYPES.values()]}")


def best_token_dtype(vocab_size: int):
    """NeoX's rule: uint16 while the vocab fits (with a margin), int32 after."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class MMapIndexedDataset:
    """Read-only view of ``prefix.{bin,idx}``: ``ds[i]`` is item i's tokens."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file; check data_path (a prefix, without "
                                f".bin/.idx) or run tools/datasets/preprocess_data.py")
        self._read_index(idx_path)
        self._map_tokens(bin_path)

    def _read_index(self, path):
        idx_bytes = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if head.startswith(OLD_MAGIC):
            raise DataError(f"{path}: old TNTIDX (cached/lazy) index format; re-run "
                            f"tools/datasets/preprocess_data.py to write the mmap format")
        if len(head) < HEADER.size or not head.startswith(MAGIC):
            raise DataError(f"{path}: not an MMIDIDX index file (bad magic {head[:9]!r}); "
                            f"point data_path at a prefix written by preprocess_data.py")
        _, version, code, n, m = HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{path}: unsupported MMIDIDX version {version} (only {VERSION}); "
                            f"re-run tools/datasets/preprocess_data.py")
        if code not in DTYPES:
            raise DataError(f"{path}: unknown dtype code {code} (valid: {sorted(DTYPES)}); "
                            f"the file is corrupt, re-run preprocess_data.py")
        expected = HEADER.size + n * 4 + n * 8 + m * 8
        if idx_bytes != expected:
            raise DataError(f"{path}: {idx_bytes} bytes but its header (N={n}, M={m}) implies "
                            f"{expected}; the file is truncated or corrupt, re-run preprocess_data.py")
        if n == 0:
            raise DataError(f"{path}: empty dataset (0 items); preprocess a non-empty corpus")
        self.dtype = np.dtype(DTYPES[code])
        self._index = np.memmap(path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(self._index, np.int32, n, HEADER.size)
        self.pointers = np.frombuffer(self._index, np.int64, n, HEADER.size + 4 * n)
        self.doc_idx = np.frombuffer(self._index, np.int64, m, HEADER.size + 12 * n)

    def _map_tokens(self, path):
        bin_bytes = os.path.getsize(path)
        # Checking the last item is O(1) and catches any truncation of the tail.
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if end > bin_bytes:
            raise DataError(f"{path}: truncated ({bin_bytes} bytes, the index needs {end}); "
                            f"re-copy or re-run preprocess_data.py")
        if bin_bytes == 0:  # all items empty; np.memmap cannot map an empty file
            self._tokens = np.zeros(0, self.dtype)
        else:
            self._tokens = np.memmap(path, mode="r", dtype=self.dtype,
                                     shape=(bin_bytes // self.dtype.itemsize,))

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of item i, as a view into the map."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sizes[i]) - offset
        return self._tokens[start:start + length]

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("MMapIndexedDataset slices must be contiguous (step 1)")
            return [self.get(j) for j in range(start, stop)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items in {self.prefix}")
        return self.get(i)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Items [start, stop) of equal length as one [stop-start, length] view (no copy)."""
        width = int(self.sizes[start])
        first = int(self.pointers[start]) // self.dtype.itemsize
        block = self._tokens[first:first + (stop - start) * width]
        return block.reshape(stop - start, width)


class MMapIndexedDatasetBuilder:
    """Streams items into ``bin_path``; ``finalize(idx_path)`` writes the index."""

    def __init__(self, bin_path: str, dtype=np.int64):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail early on an unsupported dtype
        self._bin = open(bin_path, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]

    def add_item(self, tokens) -> None:
        if hasattr(tokens, "numpy"):  # torch tensor
            tokens = tokens.numpy()
        array = np.asarray(tokens, dtype=self.dtype).reshape(-1)
        self._bin.write(array.tobytes(order="C"))
        self._sizes.append(array.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_doc(self, items) -> None:
        """One document made of several items (e.g. sentences)."""
        for tokens in items:
            self.add_item(tokens)
        self.end_document()

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), len(sizes), len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
