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

Opening checks, in O(1), that the pair belongs together: the header is ours, the
``.idx`` length is what its header says, and the ``.bin`` holds exactly the bytes the
index points at. ``DatasetWriter`` writes a pair under temporary names and renames
them only when both are complete, so a failed or interrupted run never leaves a new
``.bin`` beside an old ``.idx``.
"""
from __future__ import annotations

import glob
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
        if not head.startswith(MAGIC):
            raise DataError(f"{path}: not an MMIDIDX index file (bad magic {head[:9]!r}); "
                            f"point data_path at a prefix written by preprocess_data.py")
        if len(head) < HEADER.size:
            raise DataError(f"{path}: truncated ({idx_bytes} bytes, shorter than the "
                            f"{HEADER.size}-byte header); re-copy or re-run preprocess_data.py")
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
        # The last item ends where the index says the tokens end; any other length means
        # the .bin was cut short, appended to, or written by another run than the .idx.
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if bin_bytes != end:
            raise DataError(f"{path}: {bin_bytes} bytes but {index_file_path(self.prefix)} "
                            f"says {end}; the two files are not one dataset (truncated copy or "
                            f"an interrupted re-preprocessing): re-copy both or re-run "
                            f"preprocess_data.py for {self.prefix}")
        if bin_bytes == 0:  # all items empty; np.memmap cannot map an empty file
            self._tokens = np.zeros(0, self.dtype)
        else:
            self._tokens = np.memmap(path, mode="r", dtype=self.dtype,
                                     shape=(bin_bytes // self.dtype.itemsize,))

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of item i, as a view into the map."""
        i, offset = int(i), int(offset)
        if not 0 <= i < len(self.sizes):
            raise IndexError(f"item {i} out of range for {len(self.sizes)} items in {self.prefix}")
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if not (0 <= offset <= size and 0 <= length <= size - offset):
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for item {i} "
                             f"of {size} tokens in {self.prefix}")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("MMapIndexedDataset slices must be contiguous (step 1)")
            return [self.get(j) for j in range(start, stop)]
        return self.get(i + len(self) if i < 0 else i)

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
        _close_synced(self._bin)
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), len(sizes), len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            _close_synced(f)

    def close(self) -> None:
        self._bin.close()


def _close_synced(f) -> None:
    # On disk before the rename makes it visible: a power cut must not publish zeros.
    f.flush()
    os.fsync(f.fileno())
    f.close()


TMP_MARK = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


class DatasetWriter:
    """A builder for ``prefix.{bin,idx}`` that publishes both files or neither.

    Items go to ``prefix.tmp-PID.bin``; ``commit()`` writes the index and renames the
    pair into place, ``discard()`` (or leaving a ``with`` block by an exception)
    removes the temporary files, so an existing dataset at ``prefix`` stays as it was.
    Leftovers of a run killed with SIGKILL are removed by the next writer of the prefix.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self._tmp = f"{prefix}{TMP_MARK}{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            self._sweep_dead_writers()
            self.builder = MMapIndexedDatasetBuilder(data_file_path(self._tmp), dtype)
        except OSError as e:
            raise DataError(f"{prefix}: cannot write a dataset there ({e.strerror}); choose "
                            f"a writable output prefix") from None
        self._finalized = False

    def _sweep_dead_writers(self) -> None:
        for path in glob.glob(glob.escape(self.prefix + TMP_MARK) + "*"):
            pid = path[len(self.prefix + TMP_MARK):].split(".")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                os.remove(path)

    def finalize(self) -> None:
        """Write the index (still under the temporary name)."""
        self.builder.finalize(index_file_path(self._tmp))
        self._finalized = True

    def publish(self) -> None:
        """Move the finished pair into place."""
        if not self._finalized:
            self.finalize()
        idx, bin_ = index_file_path(self.prefix), data_file_path(self.prefix)
        # Drop the old index first: a crash between the two renames then leaves a
        # missing .idx (a clear error), never a new .bin read through an old .idx.
        if os.path.exists(idx):
            os.remove(idx)
        os.replace(data_file_path(self._tmp), bin_)
        os.replace(index_file_path(self._tmp), idx)

    def discard(self) -> None:
        self.builder.close()
        for path in (data_file_path(self._tmp), index_file_path(self._tmp)):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()
