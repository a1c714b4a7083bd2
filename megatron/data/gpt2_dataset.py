"""GPT2Dataset: fixed-length training samples cut from a stream of shuffled documents.

Three index maps, built exactly as GPT-NeoX v1.0 builds them so that a run reads the
same tokens in the same order (and the cached ``.npy`` files are interchangeable):

* ``doc_idx``     the documents repeated for E epochs, int32, shuffled once as a whole;
* ``sample_idx``  [n+1, 2] int32: (position in doc_idx, token offset) where sample s
                  starts. Concatenating the documents in doc_idx order, sample s is the
                  tokens at positions [s*S, s*S + S] inclusive: S+1 tokens, its last token
                  is the next sample's first (the labels of one are the inputs of the next);
* ``shuffle_idx`` arange(n), uint32, shuffled with the same RandomState, continuing.

Item k of the dataset is sample ``shuffle_idx[k]``.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from megatron.errors import DataError

log = logging.getLogger(__name__)

INT32_MAX = np.iinfo(np.int32).max


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E with (E*T - 1) // S >= num_samples (samples overlap by one token)."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                     tokens_total: int, chunk: int = 1 << 22) -> np.ndarray:
    """Where each sample starts: the document holding token s*S of the stream, and the offset.

    NeoX walks the documents one by one in C++; the same answer comes from searching
    the sample starts in the documents' cumulative end positions (in chunks, to bound
    memory).
    """
    n = (tokens_total - 1) // seq_length
    ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
    sample_idx = np.empty((n + 1, 2), dtype=np.int32)
    for lo in range(0, n + 1, chunk):
        starts = np.arange(lo, min(lo + chunk, n + 1), dtype=np.int64) * seq_length
        # side="right" skips empty documents and a document that ends exactly at the
        # start: the start token belongs to the first document that extends past it.
        d = np.searchsorted(ends, starts, side="right")
        sample_idx[lo:lo + len(starts), 0] = d
        sample_idx[lo:lo + len(starts), 1] = starts - (ends[d] - sizes[doc_idx[d]])
    sample_idx[0] = 0  # NeoX records (0, 0) first, even if document 0 is empty
    return sample_idx


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(size, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def build_index_maps(sizes, documents, num_samples: int, seq_length: int, seed: int):
    """(doc_idx, sample_idx, shuffle_idx) for ``num_samples`` samples of ``seq_length``+1."""
    sizes = np.asarray(sizes, dtype=np.int32)
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    if tokens_per_epoch < 2:
        raise DataError(f"the documents hold {tokens_per_epoch} tokens; a sample needs at "
                        f"least 2: preprocess more data")
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
    if epochs * len(documents) > INT32_MAX:
        raise DataError(f"{num_samples} samples of {seq_length} tokens need {epochs} epochs of "
                        f"{len(documents)} documents, beyond NeoX's int32 index maps: lower "
                        f"train_iters or use more data")
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs * tokens_per_epoch)
    shuffle_idx = build_shuffle_idx(len(sample_idx) - 1, rng)
    return doc_idx, sample_idx, shuffle_idx


def index_map_paths(prefix: str, name: str, num_samples: int, seq_length: int, seed: int,
                    cache_dir: str | None = None) -> dict[str, str]:
    """NeoX v1.0's cache file names (next to the data, or in cache_dir)."""
    if cache_dir:
        prefix = os.path.join(cache_dir, os.path.basename(prefix))
    stem = f"{prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
    return {key: f"{stem}_{key}.npy" for key in ("doc_idx", "sample_idx", "shuffle_idx")}


MAP_KEYS = ("doc_idx", "sample_idx", "shuffle_idx")
_MAP_DTYPES = {"doc_idx": (np.int32,), "sample_idx": (np.int32,),
               "shuffle_idx": (np.uint32, np.int64)}


def _save_atomic(path: str, array: np.ndarray) -> None:
    # A crash mid-write must not leave a truncated map that later runs would trust.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _load_map(key: str, path: str):
    """The memory-mapped map, or the reason it cannot be used (truncated, foreign...)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return None, str(e).split("\n")[0]
    shape_ok = array.ndim == 2 and array.shape[1] == 2 if key == "sample_idx" else array.ndim == 1
    if array.dtype not in _MAP_DTYPES[key] or not shape_ok:
        return None, f"holds {array.dtype}{list(array.shape)}, not a NeoX {key}"
    return array, None


def _load_cached(paths: dict):
    """The three maps if all are present and readable, else None (reporting damage)."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    maps = []
    for key in MAP_KEYS:
        array, problem = _load_map(key, paths[key])
        if problem:
            print(f"index map {paths[key]} is unusable ({problem}); rebuilding it", flush=True)
            return None
        maps.append(array)
    return tuple(maps)


def load_or_build_index_maps(prefix, name, sizes, documents, num_samples, seq_length, seed,
                             cache_dir=None, use_shared_fs=True):
    """((doc_idx, sample_idx, shuffle_idx), cache hit): rank 0 builds and saves the maps
    if missing or damaged; every rank then memory-maps them.

    Without a shared filesystem (use_shared_fs false) local rank 0 of each node builds.
    The hit flag is exact on the building rank; the others report whether the files
    were there when they looked.
    """
    paths = index_map_paths(prefix, name, num_samples, seq_length, seed, cache_dir)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if use_shared_fs:
        builder = not distributed or torch.distributed.get_rank() == 0
    else:
        builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    stem = paths["doc_idx"].removesuffix("_doc_idx.npy")
    if builder:
        hit = _load_cached(paths) is not None
        if hit:
            print(f"index map {name}: cache hit, {stem}_*.npy", flush=True)
        else:
            start = time.time()
            os.makedirs(os.path.dirname(os.path.abspath(paths["doc_idx"])), exist_ok=True)
            maps = build_index_maps(sizes, documents, num_samples, seq_length, seed)
            for key, array in zip(MAP_KEYS, maps):
                _save_atomic(paths[key], array)
            print(f"index map {name}: cache miss, built {len(maps[2]):,} samples in "
                  f"{time.time() - start:.1f}s, {stem}_*.npy", flush=True)
    else:
        hit = all(os.path.isfile(p) for p in paths.values())
    if distributed:
        torch.distributed.barrier()
    maps = []
    for key in MAP_KEYS:
        array, problem = _load_map(key, paths[key])
        if problem:
            raise DataError(f"{paths[key]}: unusable index map ({problem}); delete it and "
                            f"restart to rebuild it (if only this node lacks it, the filesystem "
                            f"is not shared: set use_shared_fs: false)")
        maps.append(array)
    return tuple(maps), hit


def _check_one_sequence(name: str, prefix: str, sizes, documents, seq_length: int) -> None:
    """Data shorter than one sample would be repeated inside every sample (dozens of
    epochs per step): refuse it for training, warn for validation and test splits."""
    tokens = int(np.sum(np.asarray(sizes)[documents], dtype=np.int64))
    if tokens >= seq_length + 1:
        return
    message = (f"{prefix}: the {name} documents hold {tokens} tokens, fewer than one sample of "
               f"seq_length+1 = {seq_length + 1}, so each sample would repeat them "
               f"{-(-(seq_length + 1) // max(tokens, 1))} times; preprocess more data or lower seq_length")
    if name.startswith("train"):
        raise DataError(message)
    log.warning("%s", message)


class GPT2Dataset(torch.utils.data.Dataset):
    """Item k -> {"text": int64[seq_length + 1]}, in NeoX's shuffled order.

    ``index_cache`` says whether the index maps came from the cache: {"hit": bool,
    "paths": [doc_idx, sample_idx, shuffle_idx file]}.
    """

    def __init__(self, name, data_prefix, documents, indexed_dataset, num_samples,
                 seq_length, seed, cache_dir=None, use_shared_fs=True):
        self.name = name
        self.indexed_dataset = indexed_dataset
        _check_one_sequence(name, data_prefix, indexed_dataset.sizes, documents, seq_length)
        (self.doc_idx, self.sample_idx, self.shuffle_idx), hit = load_or_build_index_maps(
            data_prefix, name, indexed_dataset.sizes, documents, num_samples, seq_length,
            seed, cache_dir, use_shared_fs)
        paths = index_map_paths(data_prefix, name, num_samples, seq_length, seed, cache_dir)
        self.index_cache = {"hit": hit, "paths": [paths[key] for key in MAP_KEYS]}
        # The cache name does not say which data it was built from: check the shapes.
        tokens = int(np.sum(indexed_dataset.sizes[documents], dtype=np.int64))
        epochs = num_epochs(tokens, seq_length, num_samples)
        self.num_documents, self.num_tokens, self.num_epochs = len(documents), tokens, epochs
        if (len(self.doc_idx) != epochs * len(documents)
                or len(self.sample_idx) != (epochs * tokens - 1) // seq_length + 1
                or len(self.shuffle_idx) != len(self.sample_idx) - 1):
            raise DataError(f"{paths['sample_idx']}: stale index map (built for other data); "
                            f"delete the three {name} *_idx.npy files to rebuild them")

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, k: int) -> dict:
        j = int(self.shuffle_idx[k])
        (d0, off0), (d1, off1) = self.sample_idx[j], self.sample_idx[j + 1]
        get, doc = self.indexed_dataset.get, self.doc_idx
        if d0 == d1:
            parts = [get(doc[d0], offset=int(off0), length=int(off1 - off0 + 1))]
        else:
            parts = ([get(doc[d0], offset=int(off0))]
                     + [get(doc[d]) for d in range(d0 + 1, d1)]
                     + [get(doc[d1], length=int(off1) + 1)])
        return {"text": np.concatenate(parts).astype(np.int64)}
