"""Saving: NeoX's schedule of steps, and one atomic, exactly-resumable checkpoint.

Layout under ``args.save`` (GPT-NeoX's)::

    latest                          text file holding the newest complete tag
    global_step{N}/
        mp_rank_XX_model_states.pt  DeepSpeed: engine state (+ ``module`` when pp=0),
                                    ``iteration`` and NeoX's ``args`` summary
        layer_XX-model_YY-model_states.pt   DeepSpeed pipeline engine: one per layer
        *_optim_states.pt           DeepSpeed ZeRO optimizer shards
        rank_{R:05d}_extra_state.pt ours: RNG states, L2E state, iteration (per rank)
        configs/<name>.yml          the YAML files the run was launched with
        tokenizer/                  a copy of the run's tokenizer files
        checksums.json              sha256 of every file (files.py)

How a tag becomes visible atomically is in tags.py.
"""
from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpoint import collective, elastic, files, health, rng, tags
from megatron.errors import CheckpointError

TOKENIZER_DIR = "tokenizer"


def should_save(args, iteration: int) -> bool:
    """NeoX's schedule: ``extra_save_iters`` (Pythia's 0, 1, 2, 4, ..., 512) plus every
    ``checkpoint_factor`` steps, or, with ``checkpoint_scale: log``, at its powers."""
    if not args.save:
        return False
    if iteration in (args.extra_save_iters or ()):
        return True
    factor = args.checkpoint_factor
    if not factor or iteration <= 0:
        return False
    if args.checkpoint_scale == "log":  # 1, f, f², ... each rounded down, as NeoX does
        k = 0
        while factor > 1 and int(factor**k) < iteration:
            k += 1
        return int(factor**k) == iteration
    return iteration % factor == 0


def _weights_only_safe(obj):
    """numpy scalars/arrays -> python numbers/tensors, so torch.load(weights_only=True)
    can read the file back (L2E statistics may be computed with numpy)."""
    if isinstance(obj, dict):
        return {_weights_only_safe(k): _weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_weights_only_safe(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _neox_args_summary(args) -> dict:
    """The ``args`` entry NeoX keeps in mp_rank_XX_model_states.pt (read by converters)."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
            "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type",
            "model_parallel_size")
    return {k: getattr(args, k) for k in keys}


def _write_configs(args, ckpt_dir: str) -> None:
    config_dir = os.path.join(ckpt_dir, "configs")
    os.makedirs(config_dir, exist_ok=True)
    for name, text in (args.config_files or {}).items():
        with open(os.path.join(config_dir, os.path.basename(name)), "w") as f:
            f.write(text)


def _saved_state(args) -> dict:
    """Client-state entries saying what this save holds (read back by load and inspect).

    ``no_save_optim`` also replaces DeepSpeed's ``optimizer`` entry (ZeRO-0) with None.
    """
    keep_optimizer = not getattr(args, "no_save_optim", False)
    state = {files.SAVED_STATE_KEY: {"optimizer": keep_optimizer, "rng": not getattr(args, "no_save_rng", False)}}
    if not keep_optimizer:
        state["optimizer"] = None
    return state


class _optimizer_saving:
    """``no_save_optim`` under ZeRO: DeepSpeed writes the *_optim_states.pt shards only
    while ``engine.save_zero_checkpoint`` is set."""

    def __init__(self, engine, enabled: bool):
        self.engine, self.enabled = engine, enabled

    def __enter__(self):
        self.saved = getattr(self.engine, "save_zero_checkpoint", False)
        if not self.enabled:
            self.engine.save_zero_checkpoint = False

    def __exit__(self, *exc):
        self.engine.save_zero_checkpoint = self.saved


def _copy_tokenizer(args, ckpt_dir: str) -> None:
    """Every checkpoint carries its tokenizer files (tokenizer/<name>), so it is usable
    where the original path is not."""
    from megatron.tokenizer import tokenizer_files

    paths = tokenizer_files(args)
    if paths:
        os.makedirs(os.path.join(ckpt_dir, TOKENIZER_DIR), exist_ok=True)
    for path in paths:
        shutil.copyfile(path, os.path.join(ckpt_dir, TOKENIZER_DIR, os.path.basename(path)))


def save_checkpoint(args, iteration: int, engine, groups, l2e=None, verdict: dict | None = None) -> str:
    """Save everything needed to resume at ``iteration``; returns the checkpoint dir.
    ``verdict``: checkpoint_health's judgement of it, recorded beside ``latest``.

    Every rank must call this (DeepSpeed and the barriers are collective). ``groups``
    places this rank in the ``layout`` its mp_rank file records (read on resume elsewhere).
    Assumes ``args.save`` is one filesystem shared by all nodes, as NeoX does.
    """
    directory, tag = args.save, tags.checkpoint_tag(iteration)
    tmp_tag = tag + tags.TMP_SUFFIX
    rank = collective.rank()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        tags.sweep_leftovers(directory)
    collective.barrier()

    client_state = {"iteration": iteration, "args": _neox_args_summary(args), **_saved_state(args),
                    "layout": elastic.layout_state(args, engine, groups) if groups is not None else None}
    tmp_dir = os.path.join(directory, tmp_tag)
    try:
        with _optimizer_saving(engine, not getattr(args, "no_save_optim", False)):
            engine.save_checkpoint(directory, tag=tmp_tag, client_state=client_state, save_latest=False)
        extra = {
            "iteration": iteration,
            "rng": None if getattr(args, "no_save_rng", False) else rng.rng_state(),
            "l2e": _weights_only_safe(l2e.state_dict()) if l2e is not None else None,
        }
        torch.save(extra, os.path.join(tmp_dir, tags.extra_state_name(rank)))
        if rank == 0:
            _write_configs(args, tmp_dir)
            _copy_tokenizer(args, tmp_dir)
        failure = None
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        failure = e
    _raise_if_any_rank_failed(failure, directory, tag, tmp_dir, engine)
    collective.barrier()  # every rank's files are on disk before the tag becomes visible
    files.write_checksums(tmp_dir)

    if rank == 0:
        tags.publish(directory, tmp_tag, tag)
        if verdict is not None:
            health.record_verdict(directory, tag, verdict)
        if args.keep_last_n_checkpoints:
            tags.prune(directory, args.keep_last_n_checkpoints)
        print(f"saved checkpoint {os.path.join(directory, tag)}", flush=True)
    collective.barrier()
    return os.path.join(directory, tag)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _space_needed(directory: str, engine) -> int:
    """About one checkpoint: the size of the newest one, else weights + Adam moments."""
    tag = tags.read_latest(directory)
    if tag and os.path.isdir(os.path.join(directory, tag)):
        return _dir_bytes(os.path.join(directory, tag))
    world = dist.get_world_size() if dist.is_initialized() else 1
    return world * sum(p.numel() * (p.element_size() + 8) for p in engine.module.parameters())


# What torch's zip writer raises when a write comes up short: "file write failed", or at
# the end of the archive "unexpected pos N vs M" (the bytes that did not fit).
_TORCH_SHORT_WRITE = ("file write failed", "unexpected pos ")


def _is_disk_full(error: BaseException) -> bool:
    return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or any(text in str(error) for text in _TORCH_SHORT_WRITE))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _raise_if_any_rank_failed(failure, directory: str, tag: str, tmp_dir: str, engine) -> None:
    """Collective: when any rank could not write its files, every rank raises one
    CheckpointError and rank 0 removes the partial ``.tmp`` dir (``latest`` and the
    checkpoints before it are untouched)."""
    failed = torch.tensor([float(failure is not None), float(failure is not None and _is_disk_full(failure))])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed)
    if not failed[0]:
        return
    collective.barrier()  # nobody writes into tmp_dir any more
    if collective.rank() == 0:
        tags.remove_path(tmp_dir)
    previous = tags.read_latest(directory)
    kept = f"{os.path.join(directory, previous)} is intact" if previous else "no earlier checkpoint exists"
    if failed[1]:
        free, need = _size(shutil.disk_usage(directory).free), _size(_space_needed(directory, engine))
        raise CheckpointError(f"save: disk full writing {tag} to {directory} ({free} free, a checkpoint "
                              f"needs about {need}); free space there or point save at a larger "
                              f"disk, then resume ({kept})") from None
    if failure is None:
        raise CheckpointError(f"save: another rank could not write {tag} to {directory}; see its error ({kept})")
    if isinstance(failure, OSError):
        raise CheckpointError(f"save: cannot write {tag} to {directory} ({failure.strerror}: "
                              f"{failure.filename}); fix the directory, then resume ({kept})") from None
    raise failure
