import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron.data.blendable_dataset import BlendableDataset, build_blending_indices
from megatron.data.data_utils import (build_train_valid_test_datasets, get_batch,
                                      make_data_iterator, num_samples, split_boundaries)
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.data.preshuffled_dataset import PreshuffledDataset
from megatron.errors import ConfigError, DataError

SEQ = 8


def write_rows(prefix, rows):
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for row in rows:
        builder.add_item(np.asarray(row))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def preshuffled(tmp_path):
    # Row k holds k in every position, so a batch shows which rows it came from.
    prefix = write_rows(tmp_path / "document", [np.full(SEQ + 1, k) for k in range(96)])
    return PreshuffledDataset(MMapIndexedDataset(prefix), SEQ)


def args_for(mbs, gas, dp, **extra):
    return SimpleNamespace(train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas,
                           train_batch_size=mbs * gas * dp, **extra)


def rows_of_step(dataset, args, dp, step, start_iteration=0):
    """Row ids every rank reads during `step` (counted from start_iteration)."""
    seen = []
    for rank in range(dp):
        it = make_data_iterator(dataset, args, rank, dp, start_iteration)
        skip = (step - start_iteration) * args.gradient_accumulation_steps
        batches = itertools.islice(it, skip, skip + args.gradient_accumulation_steps)
        for b in batches:
            assert b["text"].dtype == torch.int64 and b["text"].shape == (args.train_micro_batch_size_per_gpu, SEQ + 1)
            seen += b["text"][:, 0].tolist()
    return sorted(seen)


@pytest.mark.parametrize("mbs, gas, dp", [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_step_t_reads_rows_tB_to_t1B_for_any_split(preshuffled, mbs, gas, dp):
    args = args_for(mbs, gas, dp)
    B = args.train_batch_size
    for step in (0, 1, 5):
        assert rows_of_step(preshuffled, args, dp, step) == list(range(step * B, (step + 1) * B))


def test_rank_slices_are_contiguous(preshuffled):
    args = args_for(2, 1, 2)
    first = [next(make_data_iterator(preshuffled, args, r, 2))["text"][:, 0].tolist() for r in range(2)]
    assert first == [[0, 1], [2, 3]]


def test_resume_skips_exactly_the_consumed_batches(preshuffled):
    args = args_for(2, 3, 2)
    fresh = make_data_iterator(preshuffled, args, 1, 2)
    consumed = [next(fresh) for _ in range(4 * 3)]  # 4 steps
    assert consumed  # the resumed iterator must continue right after these
    resumed = make_data_iterator(preshuffled, args, 1, 2, start_iteration=4)
    for _ in range(5):
        assert torch.equal(next(fresh)["text"], next(resumed)["text"])


def test_num_workers_reads_the_same_stream_in_order(preshuffled):
    """DataLoader workers (num_workers) read ahead but yield exactly the in-process stream,
    including its wrap-around and a resumed start."""
    plain = make_data_iterator(preshuffled, args_for(4, 2, 2, num_workers=0), 1, 2, start_iteration=3)
    workers = make_data_iterator(preshuffled, args_for(4, 2, 2, num_workers=2), 1, 2, start_iteration=3)
    for _ in range(15):  # 96 rows / (4 x 2 ranks) = 12 micro-batches, so this wraps around
        assert torch.equal(next(plain)["text"], next(workers)["text"])


def test_preshuffled_checks_row_width_and_length(tmp_path):
    prefix = write_rows(tmp_path / "doc", [np.zeros(SEQ)] * 4)
    with pytest.raises(DataError, match="seq_length\\+1"):
        PreshuffledDataset(MMapIndexedDataset(prefix), SEQ)
    prefix = write_rows(tmp_path / "ok", [np.zeros(SEQ + 1)] * 4)
    with pytest.raises(DataError, match="lower train_iters"):
        PreshuffledDataset(MMapIndexedDataset(prefix), SEQ, num_samples=5)


def test_get_batch_shifts_and_masks_eod():
    text = torch.tensor([[5, 0, 7, 8], [0, 1, 2, 0]])
    tokens, labels, mask = get_batch(text, eod_token=0, eod_mask_loss=True)
    assert tokens.tolist() == [[5, 0, 7], [0, 1, 2]]
    assert labels.tolist() == [[0, 7, 8], [1, 2, 0]]
    assert mask.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert get_batch(text, 0, False)[2].sum() == 6


def reference_blend(weights, size):
    weights = np.asarray(weights) / np.sum(weights)
    taken = np.zeros(len(weights), dtype=np.int64)
    which, index = [], []
    for i in range(size):
        errors = weights * max(i, 1) - taken
        j = int(np.argmax(errors))  # first maximum, as the C++ loop's strict '>'
        which.append(j)
        index.append(int(taken[j]))
        taken[j] += 1
    return which, index


@pytest.mark.parametrize("weights", [[1], [1, 1], [0.7, 0.2, 0.1], [3, 1, 1, 5]])
def test_blending_indices_match_reference(weights):
    which, index = build_blending_indices(np.asarray(weights) / np.sum(weights), 500)
    assert (which.tolist(), index.tolist()) == reference_blend(weights, 500)
    shares = np.bincount(which, minlength=len(weights)) / 500
    assert np.allclose(shares, np.asarray(weights) / np.sum(weights), atol=0.01)


def test_blendable_dataset_reads_each_component():
    a = [{"text": np.array([0, i])} for i in range(10)]
    b = [{"text": np.array([1, i])} for i in range(10)]
    blend = BlendableDataset([a, b], [3, 1])
    items = [blend[k]["text"].tolist() for k in range(8)]
    assert [x[0] for x in items].count(0) == 6
    assert [x[1] for x in items if x[0] == 1] == [0, 1]


def test_split_and_sample_counts():
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("1", 10) == [0, 10, 10, 10]
    b = split_boundaries("98/1/1", 7)
    assert b[0] == 0 and b[-1] == 7 and b == sorted(b)
    args = SimpleNamespace(train_iters=100, eval_interval=30, eval_iters=2, train_batch_size=4)
    assert num_samples(args) == (400, (100 // 30 + 1) * 2 * 4, 8)
    args.eval_interval = 0  # validation only at the end
    assert num_samples(args) == (400, 2 * 4, 8)
    with pytest.raises(ConfigError, match="split"):
        split_boundaries("a,b", 10)


def config(**keys):
    base = dict(train_iters=3, eval_interval=2, eval_iters=1, train_batch_size=2,
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                seq_length=SEQ, seed=1234, data_impl="mmap", split="8,1,1", data_path=None,
                train_data_paths=None, valid_data_paths=None, test_data_paths=None,
                train_data_weights=None, valid_data_weights=None, test_data_weights=None,
                data_preshuffled=False)
    base.update(keys)
    return SimpleNamespace(**base)


def test_build_from_data_path_split(tmp_path):
    prefix = write_rows(tmp_path / "c", [np.arange(20) + k for k in range(30)])
    train, valid, test = build_train_valid_test_datasets(config(data_path=prefix))
    assert len(train) >= 6 and len(valid) >= 2 * 2 and len(test) >= 2
    assert set(np.asarray(valid.doc_idx).tolist()) <= set(range(24, 27))
    assert (tmp_path / "c_valid_indexmap_4ns_8sl_1234s_doc_idx.npy").is_file()


def test_build_blended_paths_names_and_counts(tmp_path):
    a = write_rows(tmp_path / "a", [np.arange(20)] * 10)
    b = write_rows(tmp_path / "b", [np.arange(30)] * 10)
    train, valid, test = build_train_valid_test_datasets(config(
        train_data_paths=[a, b], train_data_weights=[3, 1], valid_data_paths=[b]))
    # ceil(6 samples * 0.75 * 1.005) = 5 and ceil(6 * 0.25 * 1.005) = 2
    assert (tmp_path / "a_train_0_indexmap_5ns_8sl_1234s_doc_idx.npy").is_file()
    assert (tmp_path / "b_train_1_indexmap_2ns_8sl_1234s_doc_idx.npy").is_file()
    assert (tmp_path / "b_valid_0_indexmap_5ns_8sl_1234s_doc_idx.npy").is_file()
    assert isinstance(train, BlendableDataset) and test is None
    with pytest.raises(ConfigError, match="train_data_weights"):
        build_train_valid_test_datasets(config(train_data_paths=[a, b], train_data_weights=[1]))


def test_build_preshuffled_train(tmp_path):
    prefix = write_rows(tmp_path / "document", [np.full(SEQ + 1, k) for k in range(20)])
    train, valid, _ = build_train_valid_test_datasets(config(data_path=prefix, data_preshuffled=True))
    assert isinstance(train, PreshuffledDataset) and train[7]["text"][0] == 7
    assert valid is not None  # valid/test still come from the split, via index maps


def test_preshuffled_split_never_shares_rows(tmp_path):
    """data_path + split: train reads the first rows, valid/test only the later ones."""
    prefix = write_rows(tmp_path / "document", [np.full(SEQ + 1, k) for k in range(40)])
    args = config(data_path=prefix, data_preshuffled=True, split="6,3,1", train_iters=10)
    train, valid, test = build_train_valid_test_datasets(args)
    assert len(train) == 24  # rows [0, 24): the train share
    train_rows = {int(r) for b in itertools.islice(make_data_iterator(train, args, 0, 1), 30)
                  for r in b["text"][:, 0]}
    valid_rows = {int(t) for k in range(len(valid)) for t in valid[k]["text"]}
    test_rows = {int(t) for k in range(len(test)) for t in test[k]["text"]}
    assert train_rows == set(range(24))  # wraps inside its share
    assert valid_rows == set(range(24, 36)) and test_rows == set(range(36, 40))
    with pytest.raises(DataError, match="has 24 rows \\(the train share of split '6,3,1': raise"):
        build_train_valid_test_datasets(config(data_path=prefix, data_preshuffled=True,
                                               split="6,3,1", train_iters=13))


def test_preshuffled_train_file_as_valid_data_is_refused(tmp_path):
    prefix = write_rows(tmp_path / "document", [np.full(SEQ + 1, k) for k in range(20)])
    with pytest.raises(ConfigError, match="valid_data_paths: .* is also the pre-shuffled train"):
        build_train_valid_test_datasets(config(train_data_paths=[prefix], data_preshuffled=True,
                                               valid_data_paths=[str(tmp_path / "." / "document")]))


def test_weights_by_num_documents():
    from megatron.data.data_utils import weights_by_num_docs

    assert weights_by_num_docs([5], 0.3) == [1.0]
    w = weights_by_num_docs([900, 100], 0.3)
    assert abs(sum(w) - 1) < 1e-12
    assert w[1] > 100 / 1000  # alpha < 1 up-samples the small group
    assert np.allclose(weights_by_num_docs([10, 10, 10], 0.3), [1 / 3] * 3)
