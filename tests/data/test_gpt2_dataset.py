import os

import numpy as np
import pytest

from distributed import run_distributed
from megatron.data.gpt2_dataset import GPT2Dataset, build_index_maps, index_map_paths
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.errors import DataError


def reference_maps(sizes, documents, num_samples, seq, seed):
    """GPT-NeoX v1.0's algorithm, written out step by step (slow, obviously right)."""
    tokens = int(sum(int(sizes[d]) for d in documents))
    epochs = 1
    while (epochs * tokens - 1) // seq < num_samples:
        epochs += 1
    rng = np.random.RandomState(seed)
    doc_idx = np.array(list(documents) * epochs, dtype=np.int32)
    rng.shuffle(doc_idx)
    n = (epochs * tokens - 1) // seq
    rows, d, offset = [(0, 0)], 0, 0
    for _ in range(n):
        remaining = seq + 1
        while remaining:
            available = int(sizes[doc_idx[d]]) - offset
            if available >= remaining:  # the sample ends inside document d
                offset += remaining - 1  # its last token starts the next sample
                remaining = 0
            else:
                remaining -= available
                d, offset = d + 1, 0
        rows.append((d, offset))
    shuffle = np.arange(n, dtype=np.uint32)
    rng.shuffle(shuffle)
    return doc_idx, np.array(rows, dtype=np.int32), shuffle


CASES = [  # (number of docs, max doc length, seq, num_samples): 1 epoch to many
    (50, 300, 16, 20),
    (50, 300, 16, 2000),
    (7, 5, 4, 50),
    (200, 3000, 128, 300),
]


@pytest.mark.parametrize("seed", [0, 1234, 99])
@pytest.mark.parametrize("ndocs, maxlen, seq, num_samples", CASES)
def test_index_maps_equal_reference(seed, ndocs, maxlen, seq, num_samples):
    rng = np.random.default_rng(seed + ndocs)
    sizes = rng.integers(0, maxlen, size=ndocs).astype(np.int32)
    sizes[[0, ndocs // 2]] = 0  # empty documents, including the first
    documents = np.arange(1, ndocs, dtype=np.int32)  # a split that skips document 0
    got = build_index_maps(sizes, documents, num_samples, seq, seed)
    want = reference_maps(sizes, documents, num_samples, seq, seed)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)
    assert len(got[1]) - 1 >= num_samples


def write_docs(prefix, docs):
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for doc in docs:
        builder.add_item(np.asarray(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return MMapIndexedDataset(str(prefix))


def test_items_are_the_shuffled_stream_with_one_token_overlap(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=rng.integers(1, 40)) for _ in range(30)]
    ds = write_docs(tmp_path / "c", docs)
    data = GPT2Dataset("train", str(tmp_path / "c"), np.arange(30, dtype=np.int32), ds,
                       num_samples=100, seq_length=8, seed=5)
    stream = np.concatenate([docs[d] for d in data.doc_idx])
    for k in range(len(data)):
        s = int(data.shuffle_idx[k])
        item = data[k]["text"]
        assert item.dtype == np.int64 and np.array_equal(item, stream[s * 8:s * 8 + 9])


def test_cache_names_reuse_and_stale_detection(tmp_path):
    ds = write_docs(tmp_path / "c", [np.arange(50)] * 4)
    documents = np.arange(4, dtype=np.int32)
    GPT2Dataset("train_0", str(tmp_path / "c"), documents, ds, 10, 16, 1234)
    paths = index_map_paths(str(tmp_path / "c"), "train_0", 10, 16, 1234)
    assert paths["doc_idx"].endswith("c_train_0_indexmap_10ns_16sl_1234s_doc_idx.npy")
    assert all(os.path.isfile(p) for p in paths.values())
    stamp = os.path.getmtime(paths["sample_idx"])
    GPT2Dataset("train_0", str(tmp_path / "c"), documents, ds, 10, 16, 1234)
    assert os.path.getmtime(paths["sample_idx"]) == stamp  # loaded, not rebuilt
    np.save(paths["shuffle_idx"], np.arange(3, dtype=np.uint32))
    with pytest.raises(DataError, match="stale index map"):
        GPT2Dataset("train_0", str(tmp_path / "c"), documents, ds, 10, 16, 1234)


def test_cache_dir_and_empty_data(tmp_path):
    ds = write_docs(tmp_path / "c", [np.arange(50)])
    GPT2Dataset("valid", str(tmp_path / "c"), np.arange(1, dtype=np.int32), ds, 3, 16, 1,
                cache_dir=str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 3
    with pytest.raises(DataError, match="needs at least 2"):
        build_index_maps(np.array([0, 1], np.int32), np.arange(2), 5, 16, 1)


def _build_on_ranks(rank, world_size, prefix):
    from types import SimpleNamespace

    from megatron.data.data_utils import make_data_iterator

    ds = MMapIndexedDataset(prefix)
    data = GPT2Dataset("train", prefix, np.arange(len(ds), dtype=np.int32), ds, 40, 16, 7)
    args = SimpleNamespace(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    batch = next(make_data_iterator(data, args, rank, world_size))["text"]
    return np.asarray(data.shuffle_idx).tolist(), batch.tolist()


@pytest.mark.distributed
def test_rank0_builds_and_ranks_read_their_slices(tmp_path):
    write_docs(tmp_path / "c", [np.arange(i, i + 60) for i in range(10)])
    results = run_distributed(_build_on_ranks, world_size=2, args=(str(tmp_path / "c"),))
    assert results[0][0] == results[1][0] and len(results[0][0]) >= 40
    ds = MMapIndexedDataset(str(tmp_path / "c"))
    data = GPT2Dataset("train", str(tmp_path / "c"), np.arange(10, dtype=np.int32), ds, 40, 16, 7)
    assert results[0][1] + results[1][1] == [data[k]["text"].tolist() for k in range(4)]


def test_build_index_maps_cli(tmp_path, capsys):
    from tools.datasets.build_index_maps import main

    sizes = [30, 0, 45, 12]
    write_docs(tmp_path / "c", [np.arange(n) for n in sizes])
    main(["--data-path", str(tmp_path / "c"), "--num-samples", "20", "--seq-length", "8",
          "--seed", "3"])
    paths = index_map_paths(str(tmp_path / "c"), "train_0", 20, 8, 3)
    out = capsys.readouterr().out
    assert all(path in out for path in paths.values())
    want = reference_maps(np.array(sizes), range(4), 20, 8, 3)
    for key, w in zip(("doc_idx", "sample_idx", "shuffle_idx"), want):
        assert np.array_equal(np.load(paths[key]), w)
    with pytest.raises(SystemExit) as e:
        main(["--data-path", str(tmp_path / "missing"), "--num-samples", "1"])
    assert e.value.code == 2 and "missing.idx: no such file" in capsys.readouterr().err


def test_build_index_maps_split_name_matches_training(tmp_path, capsys):
    """--name train builds the maps of the split's train documents, not a stale set."""
    from tools.datasets.build_index_maps import main

    write_docs(tmp_path / "c", [np.arange(20 + k) for k in range(40)])
    main(["--data-path", str(tmp_path / "c"), "--num-samples", "30", "--seq-length", "8",
          "--name", "train", "--split", "8,1,1"])
    assert "train: built" in capsys.readouterr().out
    ds = MMapIndexedDataset(str(tmp_path / "c"))
    data = GPT2Dataset("train", str(tmp_path / "c"), np.arange(32, dtype=np.int32), ds, 30, 8, 1234)
    assert data.index_cache["hit"]
    assert set(np.asarray(data.doc_idx).tolist()) == set(range(32))


def test_damaged_cached_maps_are_rebuilt(tmp_path, capsys):
    ds = write_docs(tmp_path / "c", [np.arange(50)] * 4)
    documents = np.arange(4, dtype=np.int32)
    first = GPT2Dataset("train", str(tmp_path / "c"), documents, ds, 10, 16, 1)
    assert not first.index_cache["hit"] and "cache miss" in capsys.readouterr().out
    want = np.array(first.shuffle_idx)
    paths = index_map_paths(str(tmp_path / "c"), "train", 10, 16, 1)
    assert first.index_cache["paths"] == list(paths.values())
    assert GPT2Dataset("train", str(tmp_path / "c"), documents, ds, 10, 16, 1).index_cache["hit"]
    full = open(paths["shuffle_idx"], "rb").read()
    for damage in (full[:len(full) - 4], b"garbage" * 20, b""):  # truncated, foreign, empty
        open(paths["shuffle_idx"], "wb").write(damage)
        again = GPT2Dataset("train", str(tmp_path / "c"), documents, ds, 10, 16, 1)
        assert not again.index_cache["hit"] and np.array_equal(again.shuffle_idx, want)
        assert "is unusable" in capsys.readouterr().out
    np.save(paths["sample_idx"], np.zeros(5, np.float32))  # a valid .npy of the wrong kind
    rebuilt = GPT2Dataset("train", str(tmp_path / "c"), documents, ds, 10, 16, 1)
    assert not rebuilt.index_cache["hit"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_maps_built_for_other_data_are_stale(tmp_path):
    write_docs(tmp_path / "c", [np.arange(50)] * 4)
    GPT2Dataset("train", str(tmp_path / "c"), np.arange(4, dtype=np.int32),
                MMapIndexedDataset(str(tmp_path / "c")), 10, 16, 1)
    ds = write_docs(tmp_path / "c", [np.arange(70)] * 4)  # re-preprocessed, same name
    with pytest.raises(DataError, match="stale index map"):
        GPT2Dataset("train", str(tmp_path / "c"), np.arange(4, dtype=np.int32), ds, 10, 16, 1)


def test_data_shorter_than_one_sample_is_refused_for_training(tmp_path, caplog):
    ds = write_docs(tmp_path / "c", [np.arange(10), np.arange(5)])  # 15 tokens, a sample needs 17
    documents = np.arange(2, dtype=np.int32)
    with pytest.raises(DataError, match=rf"^{tmp_path}/c: the train_0 documents hold 15 tokens, fewer than one "
                                        r"sample of seq_length\+1 = 17, so each sample would repeat them 2 times; "
                                        r"preprocess more data or lower seq_length$"):
        GPT2Dataset("train_0", str(tmp_path / "c"), documents, ds, 10, 16, 1234)
    GPT2Dataset("valid", str(tmp_path / "c"), documents, ds, 3, 16, 1)  # evaluation: a warning only
    assert "the valid documents hold 15 tokens" in caplog.text
    GPT2Dataset("train_0", str(tmp_path / "c"), documents, ds, 10, 14, 1234)  # 15 tokens hold one sample of 14+1
