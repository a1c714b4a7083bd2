import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import (DTYPES, DatasetWriter, MMapIndexedDataset,
                                           MMapIndexedDatasetBuilder, best_token_dtype)
from megatron.errors import DataError


def write(prefix, docs, dtype):
    """docs: list of documents, each a list of items (token lists)."""
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for doc in docs:
        for item in doc:
            builder.add_item(np.asarray(item))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.parametrize("dtype", [np.dtype(d) for d in DTYPES.values()])
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 100, size=rng.integers(0, 9)).astype(dtype) for _ in range(3)]
            for _ in range(5)]
    ds = MMapIndexedDataset(write(tmp_path / "d", docs, dtype))
    items = [item for doc in docs for item in doc]
    assert len(ds) == 15 and ds.dtype == dtype
    for i, item in enumerate(items):
        assert ds[i].dtype == dtype and np.array_equal(ds[i], item)
    assert np.array_equal(ds.sizes, [len(x) for x in items])
    assert np.array_equal(ds.doc_idx, [0, 3, 6, 9, 12, 15])
    assert [list(x) for x in ds[2:5]] == [list(x) for x in items[2:5]]
    assert np.array_equal(ds[-1], items[-1])


def test_index_bytes_match_megatron_layout(tmp_path):
    prefix = write(tmp_path / "d", [[[5, 6, 7]], [[8], [9, 10]]], np.uint16)
    sizes = np.array([3, 1, 2], np.int32)
    pointers = np.array([0, 6, 8], np.int64)  # exclusive cumsum of 2-byte tokens
    doc_idx = np.array([0, 1, 3], np.int64)
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                + struct.pack("<Q", 3) + struct.pack("<Q", 3)
                + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    assert open(f"{prefix}.idx", "rb").read() == expected
    assert open(f"{prefix}.bin", "rb").read() == np.arange(5, 11, dtype=np.uint16).tobytes()


def test_get_is_a_view_and_accepts_tensors(tmp_path):
    builder = MMapIndexedDatasetBuilder(f"{tmp_path}/d.bin", np.int32)
    builder.add_item(torch.arange(10))
    builder.end_document()
    builder.finalize(f"{tmp_path}/d.idx")
    ds = MMapIndexedDataset(f"{tmp_path}/d")
    part = ds.get(0, offset=3, length=4)
    assert list(part) == [3, 4, 5, 6]
    assert not part.flags.owndata  # a view into the map, not a copy
    assert list(ds.get(0, offset=8)) == [8, 9]


def test_token_dtype_rule():
    assert best_token_dtype(50277) == np.uint16
    assert best_token_dtype(65500) == np.int32


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "d", [[[1, 2, 3]], [[4, 5]]], np.uint16)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: patch(f"{p}.idx", 0, b"XXXXXXX"), "bad magic"),
    (lambda p: patch(f"{p}.idx", 0, b"TNTIDX\x00\x00"), "TNTIDX"),
    (lambda p: patch(f"{p}.idx", 9, struct.pack("<Q", 2)), "version 2"),
    (lambda p: patch(f"{p}.idx", 17, struct.pack("<B", 9)), "dtype code 9"),
    (lambda p: open(f"{p}.idx", "ab").write(b"\0" * 8), "truncated or corrupt"),
    (lambda p: open(f"{p}.bin", "r+b").truncate(6), "truncated"),
])
def test_corruption_is_a_data_error_naming_the_file(good, corrupt, message):
    corrupt(good)
    with pytest.raises(DataError, match=message) as e:
        MMapIndexedDataset(good)
    assert good in str(e.value)


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="nope.idx: no such file"):
        MMapIndexedDataset(str(tmp_path / "nope"))
    empty = write(tmp_path / "e", [], np.uint16)
    with pytest.raises(DataError, match="empty dataset"):
        MMapIndexedDataset(empty)


def test_bin_of_another_size_is_rejected_naming_both_files(tmp_path):
    prefix = write(tmp_path / "d", [[[1, 2, 3]], [[4, 5]]], np.uint16)
    good = open(f"{prefix}.bin", "rb").read()
    for damaged in (good[:-2], good + b"\0\0", b""):  # truncated, appended to, empty
        open(f"{prefix}.bin", "wb").write(damaged)
        with pytest.raises(DataError) as e:
            MMapIndexedDataset(prefix)
        message = str(e.value)
        assert f"{prefix}.bin: {len(damaged)} bytes but {prefix}.idx says 10" in message
        assert "re-run preprocess_data.py" in message and "\n" not in message


@pytest.mark.parametrize("damage, why", [
    (lambda b: b"XXXXXXXXX" + b[9:], "bad magic"),
    (lambda b: b"TNTIDX\0\0" + b[8:], "old TNTIDX"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:17] + b"\x09" + b[18:], "unknown dtype code 9"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b[:-8], "header .* implies"),
    (lambda b: b"", "bad magic"),
])
def test_corrupt_or_foreign_index_is_named(tmp_path, damage, why):
    prefix = write(tmp_path / "d", [[[1, 2, 3]], [[4, 5]]], np.uint16)
    idx = open(f"{prefix}.idx", "rb").read()
    open(f"{prefix}.idx", "wb").write(damage(idx))
    with pytest.raises(DataError, match=f"{prefix}.idx: .*{why}"):
        MMapIndexedDataset(prefix)


def test_get_checks_bounds(tmp_path):
    ds = MMapIndexedDataset(write(tmp_path / "d", [[[1, 2, 3]], [[4, 5]]], np.uint16))
    assert list(ds.get(1, offset=2)) == [] and list(ds.get(0, 1, 2)) == [2, 3]
    for i, offset, length in [(2, 0, None), (-1, 0, None), (0, 4, None), (0, -1, 1),
                              (0, 1, 3), (0, 0, -1), (1, 0, 3)]:
        with pytest.raises(IndexError, match="out of range"):
            ds.get(i, offset, length)
    with pytest.raises(IndexError):
        ds[2]
    assert list(ds[-1]) == [4, 5]


def test_writer_publishes_both_files_or_neither(tmp_path):
    prefix = write(tmp_path / "d", [[[1, 2, 3]]], np.uint16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with DatasetWriter(prefix, np.uint16) as writer:
            writer.builder.add_item([7, 8, 9, 10])
            writer.builder.end_document()
            raise RuntimeError("failed mid-way")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with DatasetWriter(prefix, np.int32) as writer:
        writer.builder.add_item([7, 8, 9, 10])
        writer.builder.end_document()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.int32 and list(ds[0]) == [7, 8, 9, 10]


def test_writer_sweeps_leftovers_of_killed_writers(tmp_path):
    prefix = str(tmp_path / "d")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    for leftover in (f"d.tmp-{dead}.bin", f"d.tmp-{dead}.idx", f"d.tmp-{os.getppid()}.bin"):
        (tmp_path / leftover).write_bytes(b"x")
    with DatasetWriter(prefix, np.uint16) as writer:
        writer.builder.add_item([1])
        writer.builder.end_document()
    # a dead writer's files go; a live process's (the parent's pid) stay
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["d.bin", "d.idx", f"d.tmp-{os.getppid()}.bin"]


def test_writer_into_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match="file/sub/d: cannot write a dataset there .*writable"):
        DatasetWriter(str(tmp_path / "file" / "sub" / "d"), np.uint16)
