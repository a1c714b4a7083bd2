import struct

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import (DTYPES, MMapIndexedDataset, MMapIndexedDatasetBuilder,
                                           best_token_dtype)
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
