"""Datasets from the NeoX config keys, and the per-rank micro-batch stream.

Sample counts, split arithmetic, blend weights and the order in which ranks read items
are GPT-NeoX v1.0's, so a NeoX config trains on the same tokens in the same order.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import weakref

import numpy as np
import torch
import torch.utils.data

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preshuffled_dataset import PreshuffledDataset
from megatron.errors import ConfigError
from megatron.processes import die_with_parent

BLEND_MARGIN = 1.005  # NeoX asks each blended dataset for 0.5% extra samples


def num_samples(args) -> tuple[int, int, int]:
    """Samples needed by train, valid and test (NeoX's formulas)."""
    batch = args.train_batch_size
    # eval_interval 0 (or unset) means validation only at the end of training.
    evals = args.train_iters // args.eval_interval + 1 if args.eval_interval else 1
    return (args.train_iters * batch, evals * args.eval_iters * batch, args.eval_iters * batch)


def split_boundaries(split: str, num_docs: int) -> list[int]:
    """"969,30,1" -> document boundaries [0, a, b, num_docs] (NeoX rounding)."""
    sep = "," if "," in split else "/"
    try:
        parts = [float(s) for s in split.split(sep)]
    except ValueError:
        raise ConfigError(f"split: {split!r} is not like '969,30,1'") from None
    parts = (parts + [0.0, 0.0])[:3]
    if sum(parts) <= 0 or min(parts) < 0:
        raise ConfigError(f"split: {split!r} must be non-negative with a positive sum")
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + int(round(p / sum(parts) * float(num_docs))))
    excess = bounds[-1] - num_docs
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def blend_num_samples(weights, total: int) -> tuple[list[float], list[int]]:
    if not weights or sum(weights) <= 0:
        raise ConfigError("*_data_weights: give one positive weight per data path")
    weights = [w / sum(weights) for w in weights]
    return weights, [int(math.ceil(total * w * BLEND_MARGIN)) for w in weights]


def _check_impl(args) -> None:
    impl = getattr(args, "data_impl", "mmap")
    if impl not in ("mmap", "infer"):
        raise ConfigError(f"data_impl: {impl!r} is not supported; use 'mmap' (re-run "
                          f"preprocess_data.py for old 'cached'/'lazy' data)")


def _gpt2(args, prefix, name, documents, indexed, n):
    return GPT2Dataset(name, prefix, documents, indexed, n, args.seq_length, args.seed,
                       use_shared_fs=getattr(args, "use_shared_fs", True))


def weights_by_num_docs(num_docs, alpha: float) -> list[float]:
    """NeoX's weight_by_num_documents: p_i ~ (n_i/N)^alpha, damped by (1 - n_i/N)."""
    if len(num_docs) == 1:
        return [1.0]
    share = np.asarray(num_docs, dtype=np.float64) / sum(num_docs)
    prob = share ** alpha / np.sum(share ** alpha)
    weights = prob * (1 - share)
    return (weights / weights.sum()).tolist()


def _blend(args, paths, weights, total, kind, blend=True):
    indexed = [MMapIndexedDataset(prefix) for prefix in paths]
    if getattr(args, "weight_by_num_documents", False):
        weights = weights_by_num_docs([len(d) for d in indexed], args.weighted_sampler_alpha)
    elif weights is None:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ConfigError(f"{kind}_data_weights: {len(weights)} weights for {len(paths)} "
                          f"{kind}_data_paths; give one weight per path")
    weights, counts = blend_num_samples(weights, total)
    datasets = [_gpt2(args, prefix, f"{kind}_{i}", np.arange(len(ds), dtype=np.int32), ds, n)
                for i, (prefix, ds, n) in enumerate(zip(paths, indexed, counts))]
    return BlendableDataset(datasets, weights) if blend else datasets


def _preshuffled_train(args, n):
    paths = args.train_data_paths
    if len(paths) != 1:
        raise ConfigError(f"data_preshuffled: needs exactly one train_data_paths entry (the "
                          f"unsharded pre-shuffled 'document' prefix), got {len(paths)}")
    for kind in ("valid", "test"):
        held_out = [os.path.realpath(p) for p in getattr(args, f"{kind}_data_paths") or []]
        if os.path.realpath(paths[0]) in held_out:
            raise ConfigError(f"{kind}_data_paths: {paths[0]} is also the pre-shuffled train "
                              f"data, so {kind} would score rows the model trains on; give "
                              f"held-out data, or use data_path + split (which splits the rows)")
    return PreshuffledDataset(MMapIndexedDataset(paths[0]), args.seq_length, n)


def build_train_valid_test_datasets(args, blend=True):
    """(train, valid, test) datasets; an entry is None when it has no data.

    ``data_preshuffled`` applies to the train set; valid/test are built the usual way.
    With ``data_path`` + ``split`` the pre-shuffled train set is the first rows (the
    train share) and valid/test cut samples from the rows after it, so no row is in
    both. ``blend=False`` returns each ``*_data_paths`` split as its list of component
    GPT2Datasets: every index map built or loaded, the blending itself skipped.
    """
    _check_impl(args)
    counts = num_samples(args)
    preshuffled = getattr(args, "data_preshuffled", False)
    if args.train_data_paths:
        kinds = ("train", "valid", "test")
        out = []
        for kind, n in zip(kinds, counts):
            paths = getattr(args, f"{kind}_data_paths", None)
            if kind == "train" and preshuffled:
                out.append(_preshuffled_train(args, n))
            elif paths:
                out.append(_blend(args, paths, getattr(args, f"{kind}_data_weights", None), n,
                                  kind, blend))
            else:
                out.append(None)
        return tuple(out)
    if not args.data_path:
        raise ConfigError("data_path: not set; give data_path (a .bin/.idx prefix) or "
                          "train_data_paths/valid_data_paths/test_data_paths")
    indexed = MMapIndexedDataset(args.data_path)
    bounds = split_boundaries(args.split, len(indexed))
    out = []
    for i, (kind, n) in enumerate(zip(("train", "valid", "test"), counts)):
        if kind == "train" and preshuffled:
            out.append(PreshuffledDataset(indexed, args.seq_length, n, num_rows=bounds[1],
                                          rows_hint=f"the train share of split {args.split!r}"))
        elif bounds[i + 1] > bounds[i]:
            documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
            out.append(_gpt2(args, args.data_path, kind, documents, indexed, n))
        else:
            out.append(None)
    return tuple(out)


def index_caches(dataset) -> list[dict]:
    """{"name", "hit", "paths"} of the index-map cache of every GPT2Dataset in ``dataset``
    (one, a blend, or build_train_valid_test_datasets' blend=False list); [] for None or
    pre-shuffled data, which has no maps."""
    if isinstance(dataset, GPT2Dataset):
        return [{"name": dataset.name, **dataset.index_cache}]
    if isinstance(dataset, BlendableDataset):
        dataset = dataset.datasets
    if isinstance(dataset, list):
        return [cache for part in dataset for cache in index_caches(part)]
    return []


def _read_items(dataset, start: int, stop: int) -> np.ndarray:
    if hasattr(dataset, "rows"):  # contiguous fixed-width items: one slice, no loop
        return dataset.rows(start, stop)
    return np.stack([dataset[k]["text"] for k in range(start, stop)])


def make_data_iterator(dataset, args, dp_rank: int, dp_size: int, start_iteration: int = 0,
                       start_sample: int | None = None):
    """Yield this rank's micro-batches {"text": LongTensor[mbs, seq_length+1]} forever.

    Micro-batch b covers items [b*mbs*dp, (b+1)*mbs*dp) and rank r takes the contiguous
    slice [r*mbs, (r+1)*mbs) of it; a step is gas consecutive micro-batches, so step t
    sees items [t*B, (t+1)*B) whatever the dp/gas split. Resuming at iteration i skips
    i*gas micro-batches without reading them (NeoX saves no loader state). At the end
    of the dataset the stream starts again from item 0, as NeoX's modulo does on resume.
    ``start_sample`` (default i*B) starts the stream at a consumed-sample count instead:
    after a change of global batch the two differ.
    """
    mbs, gas = args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps
    per_micro_step = mbs * dp_size
    num_batches = len(dataset) // per_micro_step
    if num_batches == 0:
        raise ConfigError(f"train_micro_batch_size_per_gpu: {mbs} x {dp_size} ranks exceeds "
                          f"the {len(dataset)} samples of the dataset; lower the batch size")
    span = num_batches * per_micro_step
    if start_sample is None:
        start_sample = start_iteration * gas * per_micro_step
    micro_batch = _RankMicroBatches(dataset, dp_rank * mbs, mbs)
    order = _positions(start_sample % span, per_micro_step, span)
    workers = getattr(args, "num_workers", 0)
    if workers == 0:
        yield from map(micro_batch.__getitem__, order)
        return
    # Worker processes read ahead (2 micro-batches each); the sampler keeps the order.
    loader = iter(torch.utils.data.DataLoader(micro_batch, sampler=order, batch_size=None,
                                              num_workers=workers, pin_memory=torch.cuda.is_available(),
                                              worker_init_fn=_leave_signals_to_the_rank))
    _reading_loaders.add(loader)
    try:
        yield from loader
    finally:
        _stop_readers(loader)


# Streams whose reader processes may still run. A pipeline engine keeps the last stream
# it was given until the interpreter exits, so the streams are not collected in time.
_reading_loaders = weakref.WeakSet()


def shutdown_data_loaders() -> None:
    """Stop the reader processes of every micro-batch stream of this process.

    Every ending of a run calls it (the training loop, then ``atexit``): the readers
    ignore SIGTERM (below), and multiprocessing's own exit handler stops children with
    SIGTERM and waits for them, so without this a run would hang after its last line.
    """
    for loader in list(_reading_loaders):
        _stop_readers(loader)


def _stop_readers(loader) -> None:
    readers = list(loader._workers)
    loader._shutdown_workers()  # asks them to leave (what the loader's __del__ does)
    for reader in readers:
        if reader.is_alive():  # busy past the loader's grace period; SIGTERM is ignored
            reader.kill()
            reader.join()
    _reading_loaders.discard(loader)


# Registered after multiprocessing's and torch's exit handlers, so it runs before them
# (atexit is last-in, first-out) while the loaders can still be shut down.
atexit.register(shutdown_data_loaders)


def _leave_signals_to_the_rank(worker_id: int) -> None:
    """A preemption signal sent to the whole process group (or every process of a slurm
    step) must reach the rank, which saves a checkpoint, not kill its readers first (the
    rank would then die with a DataLoader error instead of saving). The rank stops its
    readers at every ending (shutdown_data_loaders); if it dies before that, even by
    SIGKILL, the kernel kills them with it."""
    die_with_parent(signal.SIGKILL)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # USR1: slurm's --signal
        signal.signal(sig, signal.SIG_IGN)


def _positions(position: int, per_micro_step: int, span: int):
    """First item of each micro-batch, from ``position`` on, wrapping at the dataset's end."""
    while True:
        yield position
        position += per_micro_step
        if position + per_micro_step > span:
            position = 0


class _RankMicroBatches(torch.utils.data.Dataset):
    """Item p: this rank's slice of the micro-batch that starts at item p (for DataLoader workers)."""

    def __init__(self, dataset, offset: int, mbs: int):
        self.dataset, self.offset, self.mbs = dataset, offset, mbs

    def __getitem__(self, position: int) -> dict:
        start = position + self.offset
        return {"text": torch.from_numpy(_read_items(self.dataset, start, start + self.mbs))}


def get_batch(text: torch.Tensor, eod_token: int, eod_mask_loss: bool = False):
    """(tokens, labels, loss_mask): inputs, next-token targets, 1.0 where loss counts.

    As NeoX, eod_mask_loss zeroes the loss where the *input* token is EOD (the
    prediction across a document boundary).
    """
    text = text.long()
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=text.device)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    return tokens, labels, loss_mask
