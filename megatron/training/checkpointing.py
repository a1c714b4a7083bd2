"""Atomic, exactly-resumable checkpoints in GPT-NeoX's directory layout.

Layout under ``args.save`` (reference §6)::

    latest                          text file holding the newest complete tag
    global_step{N}/
        mp_rank_XX_model_states.pt  DeepSpeed: engine state (+ ``module`` when pp=0),
                                    ``iteration`` and NeoX's ``args`` summary
        layer_XX-model_YY-model_states.pt   DeepSpeed pipeline engine: one per layer
        *_optim_states.pt           DeepSpeed ZeRO optimizer shards
        rank_{R:05d}_extra_state.pt ours: RNG states, L2E state, iteration (per rank)
        configs/<name>.yml          the YAML files the run was launched with

Atomicity: every rank writes into ``global_step{N}.tmp``; after a barrier rank 0
renames it to ``global_step{N}`` and only then points ``latest`` at it (tmp file +
``os.replace``). A crash at any moment therefore leaves ``latest`` naming a complete
checkpoint; half-written ``*.tmp`` leftovers are swept at the next save.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron.errors import CheckpointError
from megatron import checkpoint_files as files
from megatron.training import checkpoint_health, elastic
from megatron.training import load_weights as weights
from megatron.training import resume_checks

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
TOKENIZER_DIR = "tokenizer"
# An older checkpoint with the tag being published is parked here for the instant
# between the two renames; `_recover_parked` puts it back if we died in between.
PARKED_SUFFIX = ".old" + TMP_SUFFIX
_TAG_RE = re.compile(r"^global_step(\d+)$")


def checkpoint_tag(iteration: int) -> str:
    return f"global_step{iteration}"


def extra_state_name(rank: int) -> str:
    return f"rank_{rank:05d}_extra_state.pt"


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


# ---------------------------------------------------------------------------
# RNG state, stored so that torch.load(weights_only=True) can read it back


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# ---------------------------------------------------------------------------
# small distributed helpers (a single process runs without a process group)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _say(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def _from_scratch(why: str) -> int:
    _say(f"starting from scratch: {why}; fresh weights at step 0")
    return 0


def _read_latest(directory: str) -> str | None:
    path = os.path.join(directory, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _write_latest(directory: str, tag: str) -> None:
    tmp = os.path.join(directory, "latest" + TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, "latest"))
    except OSError as e:
        _remove(tmp)
        raise CheckpointError(f"save: cannot point {directory}/latest at {tag} ({e.strerror}); "
                              f"{tag} is complete: free space, then write its name into 'latest'") from None


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _recover_parked(directory: str) -> None:
    """Undo a publish that died between parking the old tag dir and renaming the new one in."""
    tag = _read_latest(directory)
    if tag is None:
        return
    final, parked = os.path.join(directory, tag), os.path.join(directory, tag + PARKED_SUFFIX)
    if not os.path.isdir(final) and os.path.isdir(parked):
        os.rename(parked, final)


def _sweep_leftovers(directory: str) -> None:
    _recover_parked(directory)
    for name in os.listdir(directory):
        if name.endswith(TMP_SUFFIX):
            log.info("removing %s left by an interrupted save", os.path.join(directory, name))
            _remove(os.path.join(directory, name))


def _publish(directory: str, tmp_tag: str, tag: str) -> None:
    final = os.path.join(directory, tag)
    if os.path.exists(final):
        # Re-saving a tag that already exists (e.g. after a resume): park the old one so
        # the name is never half-written; `latest` may point at it meanwhile.
        parked = final + PARKED_SUFFIX
        os.rename(final, parked)
        os.rename(os.path.join(directory, tmp_tag), final)
        _remove(parked)
    else:
        os.rename(os.path.join(directory, tmp_tag), final)
    _write_latest(directory, tag)


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``directory`` as (iteration, tag), oldest first."""
    found = []
    for name in os.listdir(directory):
        match = _TAG_RE.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), name))
    return sorted(found)


def _prune(directory: str, keep: int) -> None:
    """Keep the newest ``keep`` up to ``latest``, plus the newest trustworthy checkpoint
    (checkpoint_health) and, after a rollback, every checkpoint newer than ``latest``."""
    latest = _read_latest(directory)
    match = _TAG_RE.match(latest or "")
    latest_step = int(match.group(1)) if match else None
    old = [tag for it, tag in list_checkpoints(directory)
           if tag != latest and (latest_step is None or it < latest_step)]
    protected = checkpoint_health.protected_tags(directory)
    for tag in old[: max(0, len(old) - (keep - 1))]:
        if tag in protected:
            continue
        log.info("keep_last_n_checkpoints=%d: removing %s", keep, tag)
        shutil.rmtree(os.path.join(directory, tag))


# ---------------------------------------------------------------------------
# save


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
    directory, tag = args.save, checkpoint_tag(iteration)
    tmp_tag = tag + TMP_SUFFIX
    rank = _rank()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        _sweep_leftovers(directory)
    _barrier()

    client_state = {"iteration": iteration, "args": _neox_args_summary(args), **_saved_state(args),
                    "layout": elastic.layout_state(args, engine, groups) if groups is not None else None}
    tmp_dir = os.path.join(directory, tmp_tag)
    try:
        with _optimizer_saving(engine, not getattr(args, "no_save_optim", False)):
            engine.save_checkpoint(directory, tag=tmp_tag, client_state=client_state, save_latest=False)
        extra = {
            "iteration": iteration,
            "rng": None if getattr(args, "no_save_rng", False) else rng_state(),
            "l2e": _weights_only_safe(l2e.state_dict()) if l2e is not None else None,
        }
        torch.save(extra, os.path.join(tmp_dir, extra_state_name(rank)))
        if rank == 0:
            _write_configs(args, tmp_dir)
            _copy_tokenizer(args, tmp_dir)
        failure = None
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        failure = e
    _raise_if_any_rank_failed(failure, directory, tag, tmp_dir, engine)
    _barrier()  # every rank's files are on disk before the tag becomes visible
    files.write_checksums(tmp_dir)

    if rank == 0:
        _publish(directory, tmp_tag, tag)
        if verdict is not None:
            checkpoint_health.record_verdict(directory, tag, verdict)
        if args.keep_last_n_checkpoints:
            _prune(directory, args.keep_last_n_checkpoints)
        print(f"saved checkpoint {os.path.join(directory, tag)}", flush=True)
    _barrier()
    return os.path.join(directory, tag)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _space_needed(directory: str, engine) -> int:
    """About one checkpoint: the size of the newest one, else weights + Adam moments."""
    tag = _read_latest(directory)
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
    _barrier()  # nobody writes into tmp_dir any more
    if _rank() == 0:
        _remove(tmp_dir)
    previous = _read_latest(directory)
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


# ---------------------------------------------------------------------------
# load


@dataclass
class Restored:
    """What a load brought back; ``line()`` is the report printed at startup."""

    source: str
    iteration: int
    samples: int
    weights: str = "✓"
    optimizer: str = "✗ (fresh)"
    schedule_at: int = 0
    l2e: str = "– (off)"
    rng: str = "✗ (fresh)"

    def line(self) -> str:
        return (f"restored from {self.source}: weights {self.weights}  optimizer {self.optimizer}  "
                f"schedule at {self.schedule_at}  data at sample {self.samples:,}  "
                f"L2E state {self.l2e}  rng {self.rng}")


def _resolve_tag(args, directory: str) -> str | None:
    """The tag to load, or None for a fresh run writing into its own (empty) save dir."""
    if args.iteration is not None:  # NeoX's `iteration` key picks a specific step
        return checkpoint_tag(args.iteration)
    tag = _read_latest(directory)
    if tag == "":
        available = [t for _, t in list_checkpoints(directory)]
        raise CheckpointError(
            f"load: {os.path.join(directory, 'latest')} is empty; write the step to resume into it "
            f"(one of {available}) or pass it with the 'iteration' key")
    if tag is not None:
        return tag
    if os.path.abspath(directory) == os.path.abspath(args.save or "") and not list_checkpoints(directory):
        return None
    raise CheckpointError(
        f"load: {directory} has no 'latest' file; pass the step with the 'iteration' key "
        f"or point 'load' at a directory written by save_checkpoint"
    )


def _tag_dir(directory: str, tag: str) -> str:
    path = os.path.join(directory, tag)
    if os.path.isdir(path):
        return tag
    if os.path.isdir(path + PARKED_SUFFIX):  # a publish died between its two renames
        return tag + PARKED_SUFFIX
    raise CheckpointError(
        f"load: checkpoint {path} does not exist; check 'load' / 'iteration' "
        f"(available: {[t for _, t in list_checkpoints(directory)]})"
    )


def current_layout(args, engine, groups) -> dict:
    """This run's parallel layout, in the keys a checkpoint's layout is described by."""
    return {
        "tp": groups.tp_size if groups is not None else 1,
        "pp": getattr(args, "pipe_parallel_size", 0),
        "dp": groups.dp_size if groups is not None else (dist.get_world_size() if dist.is_initialized() else 1),
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def layout_differences(saved: dict, current: dict) -> list[str]:
    """``key saved->current`` for every layout key the checkpoint records and this run changes."""
    return [f"{k} {saved[k]}->{current[k]}" for k in current
            if saved.get(k) is not None and saved[k] != current[k]]


def _start_schedule(args, engine, iteration: int) -> None:
    """A load without scheduler state: the LR schedule continues at ``iteration``."""
    engine.global_steps = iteration
    engine.global_samples = iteration * engine.train_batch_size()
    if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "start_at"):
        engine.lr_scheduler.start_at(iteration, getattr(args, "lr_rewarmup_iters", 0))


def _schedule_position(engine, iteration: int) -> int:
    return getattr(engine.lr_scheduler, "num_iters", iteration)


def _report(restored: Restored) -> int:
    _say(restored.line())
    return restored.iteration


def _new_l2e_state(l2e) -> str:
    return "✗ (new: statistics start empty and warm up)" if l2e is not None else "– (off)"


def _continue_from_hf(args, engine, groups, l2e) -> int:
    """``load`` is an HF GPT-NeoX directory: its weights, continued at ``iteration`` (or 0)."""
    from megatron.model.hf import read_hf_checkpoint

    directory = args.load
    _refuse_older_source(args, args.iteration)
    cfg, sd = read_hf_checkpoint(directory)
    files.check_architecture(directory, cfg, args)
    weights.load_full_weights(engine, groups, sd, cfg.num_layers, directory)
    iteration = 0 if args.finetune else (args.iteration or 0)
    _start_schedule(args, engine, iteration)
    return _report(Restored(source=f"{directory} (HF)", iteration=iteration,
                            samples=iteration * engine.train_batch_size(),
                            schedule_at=_schedule_position(engine, iteration), l2e=_new_l2e_state(l2e)))


def _continue_from_weights(args, engine, groups, l2e, info, iteration: int) -> int:
    """Weights only (a converter's output, or ``finetune``), continued at ``iteration``."""
    weights.load_checkpoint_weights(args, engine, groups, info)
    _start_schedule(args, engine, iteration)
    if getattr(args, "evaluating", False):  # eval.py names what it evaluates; no schedule to report
        return iteration
    return _report(Restored(source=info.path, iteration=iteration, samples=iteration * engine.train_batch_size(),
                            weights="✓ (finetune: weights only)" if args.finetune else "✓",
                            schedule_at=_schedule_position(engine, iteration), l2e=_new_l2e_state(l2e)))


def _refuse_older_source(args, iteration: int | None) -> None:
    """A requeued job whose ``load`` still names its starting point (an HF directory, a
    converted or an older checkpoint) would retrain and re-save over its own newer
    checkpoints in ``save``: refuse, pointing at them."""
    save = getattr(args, "save", None)
    if args.finetune or not save or os.path.abspath(save) == os.path.abspath(args.load) or not os.path.isdir(save):
        return
    tag = _read_latest(save)
    match = _TAG_RE.match(tag or "")
    if match and int(match.group(1)) > (iteration or 0):
        raise CheckpointError(
            f"load: 'save' {save} already holds {tag}, newer than step {iteration or 0} loaded from {args.load}; "
            f"set load: {save} to resume it, or give this run another 'save' directory"
        )


def _load_other_layout(args, engine, groups, l2e, info) -> int:
    """The checkpoint was saved with another parallel layout than this run's (or by
    tools/ckpts/reshard.py): megatron/training/elastic.py reads it by parameter name."""
    iteration = elastic.load_other_layout(args, engine, groups, info.path, l2e)
    optimizer = "✓ (resharded)" if info.has_optimizer and not args.no_load_optim else "✗ (fresh)"
    return _report(Restored(source=f"{info.path} (another layout)", iteration=iteration,
                            samples=engine.global_samples, optimizer=optimizer,
                            schedule_at=_schedule_position(engine, iteration),
                            l2e="✓ (resharded)" if l2e is not None else "– (off)",
                            rng="✓ where the rank existed" if not args.no_load_rng else "✗ (fresh)"))


def _check_own_files(engine, directory: str, tag: str, load_optimizer: bool) -> None:
    """The files DeepSpeed will read for this rank exist (it would start a fresh optimizer
    without a word when a ZeRO shard is missing)."""
    own_layers = weights.own_layer_files(engine, os.path.join(directory, tag))
    weights.check_files_exist([engine._get_ckpt_name(directory, tag), *own_layers])
    if load_optimizer and engine.zero_optimization():
        weights.check_files_exist([engine._get_zero_ckpt_name(directory, tag)],
                                  " (or set no_load_optim: true to continue with a fresh optimizer)")


def _restore_neox_rng(meta: dict) -> bool:
    """NeoX keeps python/numpy/torch RNG states in the mp_rank file."""
    if "random_rng_state" not in meta:
        return False
    random.setstate(meta["random_rng_state"])
    np.random.set_state(meta["np_rng_state"])
    torch.set_rng_state(meta["torch_rng_state"])
    if meta.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["cuda_rng_state"])
    return True


def _resume(args, engine, l2e, info, directory: str, tag: str) -> int:
    """Same layout: DeepSpeed restores weights, optimizer and schedule; our extra state the rest."""
    extra_path = os.path.join(info.path, extra_state_name(_rank()))
    extra = None
    if info.kind == "full":
        if os.path.isfile(extra_path):
            extra = files.load_torch(extra_path)
        elif not args.no_load_rng:
            raise CheckpointError(
                f"load: {extra_path} is missing (this rank's iteration, RNG and L2E state); restore it, "
                f"load another 'iteration', or set no_load_rng: true to continue without RNG and L2E state"
            )
    load_optimizer = info.has_optimizer and not args.no_load_optim
    _check_own_files(engine, directory, tag, load_optimizer)
    try:
        path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"load: {e.filename} is missing; the checkpoint is incomplete, "
                              f"load another 'iteration'") from e
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "Missing key" not in str(e):
            raise
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[1:3])
        raise CheckpointError(f"load: {info.path} does not fit this model ({detail}); check the model keys "
                              f"of the config against the checkpoint's configs/") from e
    if path is None:
        raise CheckpointError(f"load: DeepSpeed could not read {info.path}; the checkpoint is incomplete")
    iteration = extra["iteration"] if extra is not None else info.iteration
    if iteration is None:
        raise CheckpointError(f"load: {info.path} records no iteration; set 'iteration' or 'finetune: true'")
    if not load_optimizer:
        weights.refresh_master_weights(engine)
        if hasattr(engine.lr_scheduler, "start_at"):  # fresh moments: the optional re-warm-up
            engine.lr_scheduler.start_at(engine.lr_scheduler.num_iters, getattr(args, "lr_rewarmup_iters", 0))
    restored = Restored(source=info.path, iteration=iteration, samples=iteration * engine.train_batch_size(),
                        schedule_at=_schedule_position(engine, iteration))
    if load_optimizer:
        restored.optimizer = "✓"
    elif not info.has_optimizer:
        restored.optimizer = "✗ (fresh: not in the checkpoint)"
    else:
        restored.optimizer = "✗ (fresh: no_load_optim)"
    restored.rng = _restore_rng(args, info, extra)
    restored.l2e = _restore_l2e(l2e, extra, info.path)
    return _report(restored)


def _restore_rng(args, info, extra) -> str:
    if args.no_load_rng:
        return "✗ (no_load_rng)"
    if extra is not None:
        if extra.get("rng") is None:
            return "✗ (not saved)"
        set_rng_state(extra["rng"])
        return "✓"
    return "✓ (NeoX)" if _restore_neox_rng(info.meta) else "✗ (not saved)"


def _restore_l2e(l2e, extra, source: str) -> str:
    if l2e is None:
        return "– (off)"
    if extra is None or extra.get("l2e") is None:
        return _new_l2e_state(l2e)
    try:
        l2e.load_state_dict(extra["l2e"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"load: the L2E state in {source} does not fit this run's l2e config ({e}); "
                              f"use the l2e block it was saved with") from e
    return "✓"


def load_checkpoint(args, engine, groups, l2e=None) -> int:
    """Restore the run from ``args.load``; returns the iteration to continue from.

    ``load`` may be our checkpoint directory (everything restored exactly), a NeoX-native
    one (weights, optimizer, schedule, NeoX's RNG), a weights-only one (a converter's
    output: weights, continued at its recorded iteration) or an HF GPT-NeoX directory
    (weights, continued at ``iteration``). ``finetune`` takes the weights only and starts
    at 0. docs/checkpoints.md has the matrix. Collective: every rank calls it.
    """
    directory = args.load
    if not directory:
        return _from_scratch("no 'load' is set")
    if not os.path.isdir(directory):
        if os.path.abspath(directory) == os.path.abspath(args.save or ""):
            # first launch of a run that saves and resumes in one directory
            return _from_scratch(f"load {directory} does not exist yet (it is also 'save')")
        raise CheckpointError(f"load: directory {directory} does not exist; fix 'load' or remove it")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return _continue_from_hf(args, engine, groups, l2e)
    tag = _resolve_tag(args, directory)
    if tag is None:
        return _from_scratch(f"load {directory} holds no checkpoint yet")
    tag = _tag_dir(directory, tag)
    ckpt_dir = os.path.join(directory, tag)
    if getattr(args, "checkpoint_verify", True):
        files.verify_checksums(ckpt_dir, may_be_missing=files.EXTRA_STATE_SUFFIX if args.no_load_rng else None)
    files.check_torch_files(ckpt_dir)
    info = files.read_checkpoint_info(ckpt_dir)
    files.check_model_shape(ckpt_dir, info.model_args, args, saved_tp=info.layout.get("tp"))
    files.check_architecture(ckpt_dir, files.saved_model_config(info), args, saved_tp=info.layout.get("tp"))
    _refuse_older_source(args, info.iteration)
    resume_checks.check_steps_left(args, ckpt_dir, info.iteration)
    resume_checks.check_resume_inputs(args, ckpt_dir)

    if args.finetune:
        return _continue_from_weights(args, engine, groups, l2e, info, 0)
    if info.kind == "weights":
        return _continue_from_weights(args, engine, groups, l2e, info, info.iteration or 0)
    current = current_layout(args, engine, groups)
    if groups is not None:  # elastic's own comparison also catches a resharded checkpoint
        if elastic.needs_elastic(elastic.saved_layout(info.path), elastic.current_layout(args, engine)):
            return _load_other_layout(args, engine, groups, l2e, info)
    elif layout_differences(info.layout, current):
        changed = ", ".join(layout_differences(info.layout, current))
        raise CheckpointError(
            f"load: {info.path} was saved with another parallel layout ({changed}); resume with the "
            f"layout it was saved with, or load its weights only with 'finetune: true'"
        )
    return _resume(args, engine, l2e, info, directory, tag)
