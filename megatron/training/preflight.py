"""Checks that fail a run in seconds, before step 1, instead of hours into it.

``check_paths`` (writable ``save``/``log_dir``/``tensorboard_dir``) and ``check_data``
(every data prefix opens, its largest token id fits the padded vocabulary) run in
``deepy.py`` before the ranks start and again in ``pretrain`` (paths on every rank, data
on rank 0); ``check_disk_space`` runs in ``pretrain`` once the model is built and its
size is known. Each problem is one
``UserError`` line with the path and the fix.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket

import numpy as np

from megatron.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_FILE = os.path.join(os.path.expanduser("~"), ".cache", "neox-l2e", "max_token_ids.json")
CHUNK_TOKENS = 1 << 26  # 64 Mi tokens per numpy max: bounded memory on any corpus


def check_writable_dir(path: str, key: str) -> None:
    """Create ``path`` if needed, write and remove a probe file in it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a file, not a directory; remove it or point {key} elsewhere")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{socket.gethostname()}_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {path} ({e.strerror}); fix its permissions "
                          f"or point {key} at a writable directory") from None


def check_paths(args) -> None:
    for key in ("save", "log_dir", "tensorboard_dir"):
        path = getattr(args, key, None)
        if path:
            check_writable_dir(path, key)


def checkpoint_bytes(num_params: int, args) -> int:
    """One checkpoint on disk: the weights in the training precision plus Adam's two fp32
    moments, plus an fp32 master copy when training in bf16/fp16 or with ZeRO."""
    weight = 4 if args.precision == "fp32" else 2
    zero = (args.zero_optimization or {}).get("stage", 0)
    master = 4 if weight == 2 or zero else 0
    return num_params * (weight + 8 + master)


def check_disk_space(args, num_params: int) -> None:
    """Error when ``save`` cannot hold one checkpoint, warn below two."""
    if not args.save:
        return
    need = checkpoint_bytes(num_params, args)
    free = shutil.disk_usage(args.save).free
    gib = 2**30
    if free < need:
        raise ConfigError(f"save: {args.save} has {free / gib:.2f} GiB free but one checkpoint needs about "
                          f"{need / gib:.2f} GiB; free space there or point save at a larger disk")
    if free < 2 * need:
        log.warning("save: %s has %.2f GiB free, room for only one checkpoint of about %.2f GiB",
                    args.save, free / gib, need / gib)


def data_prefixes(args) -> list[str]:
    paths = [args.data_path] if args.data_path else []
    for kind in ("train", "valid", "test"):
        paths += getattr(args, f"{kind}_data_paths", None) or []
    return list(dict.fromkeys(paths))


def _load_cache() -> dict:
    try:
        with open(CACHE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict) -> None:
    try:  # best effort: a read-only home only costs the scan next time
        os.makedirs(os.path.dirname(CACHE_FILE), exist_ok=True)
        tmp = f"{CACHE_FILE}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, CACHE_FILE)
    except OSError:
        pass


def _scan_max(path: str, dtype, count: int) -> int:
    tokens = np.memmap(path, mode="r", dtype=dtype, shape=(count,)) if count else np.zeros(0, int)
    return max((int(tokens[i:i + CHUNK_TOKENS].max()) for i in range(0, count, CHUNK_TOKENS)), default=-1)


def max_token_id(dataset) -> int:
    """Largest token id in an ``MMapIndexedDataset``'s .bin, scanned in chunks and cached
    by (path, size, mtime) so that later launches on an unchanged file cost nothing."""
    from megatron.data.indexed_dataset import data_file_path

    path = os.path.abspath(data_file_path(dataset.prefix))
    stat = os.stat(path)
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = _load_cache()
    if key in cache:
        return cache[key]
    count = (int(dataset.pointers[-1]) // dataset.dtype.itemsize + int(dataset.sizes[-1])) if len(dataset) else 0
    if count * dataset.dtype.itemsize > 2**30:
        log.info("%s: scanning for the largest token id (once; cached in %s)", path, CACHE_FILE)
    largest = _scan_max(path, dataset.dtype, count)
    cache[key] = largest
    _store_cache(cache)
    return largest


def check_data(args, vocab_size: int) -> None:
    """Open every data prefix (the reader checks .idx/.bin consistency) and check that
    its tokens fit the model's padded vocabulary (``vocab_size``)."""
    from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path

    for prefix in data_prefixes(args):
        dataset = MMapIndexedDataset(prefix)
        largest = max_token_id(dataset)
        if largest >= vocab_size:
            raise DataError(f"{data_file_path(prefix)}: token id {largest} >= the padded vocabulary "
                            f"({vocab_size}) of tokenizer {args.vocab_file or args.tokenizer_type}; "
                            f"the data was tokenized with another tokenizer: re-run preprocess_data.py "
                            f"with this one or set vocab_file to the one the data used")


def check_data_on_rank0(args, vocab_size: int) -> None:
    """``check_data`` on global rank 0 only (one scan per job, not per rank), its error
    raised on every rank so that none waits for the others in a collective."""
    import torch.distributed as dist

    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            check_data(args, vocab_size)
        except (ConfigError, DataError) as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def check_before_launch(args) -> None:
    """What the launcher can check before any rank starts (paths, data, vocabulary)."""
    from megatron.tokenizer import build_tokenizer

    check_paths(args)
    if data_prefixes(args):
        args.set_vocab_size(build_tokenizer(args).vocab_size)
        check_data(args, args.padded_vocab_size)


def model_parameter_count(engine, dp_size: int) -> int:
    """Parameters of one model replica: every rank's local count summed, over dp."""
    import torch
    import torch.distributed as dist

    local = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    total = torch.tensor([local], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return int(total.item()) // max(dp_size, 1)
