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

import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron.errors import CheckpointError
from megatron.training import elastic

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
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


def _read_latest(directory: str) -> str | None:
    path = os.path.join(directory, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _write_latest(directory: str, tag: str) -> None:
    tmp = os.path.join(directory, "latest" + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, "latest"))


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
    latest = _read_latest(directory)
    old = [tag for _, tag in list_checkpoints(directory) if tag != latest]
    for tag in old[: max(0, len(old) - (keep - 1))]:
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


def save_checkpoint(args, iteration: int, engine, groups, l2e=None) -> str:
    """Save everything needed to resume at ``iteration``; returns the checkpoint dir.

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

    client_state = {"iteration": iteration, "args": _neox_args_summary(args),
                    "layout": elastic.layout_state(args, engine, groups) if groups is not None else None}
    engine.save_checkpoint(directory, tag=tmp_tag, client_state=client_state, save_latest=False)
    tmp_dir = os.path.join(directory, tmp_tag)
    extra = {
        "iteration": iteration,
        "rng": rng_state(),
        "l2e": _weights_only_safe(l2e.state_dict()) if l2e is not None else None,
    }
    torch.save(extra, os.path.join(tmp_dir, extra_state_name(rank)))
    if rank == 0:
        _write_configs(args, tmp_dir)
    _barrier()  # every rank's files are on disk before the tag becomes visible

    if rank == 0:
        _publish(directory, tmp_tag, tag)
        if args.keep_last_n_checkpoints:
            _prune(directory, args.keep_last_n_checkpoints)
        print(f"saved checkpoint {os.path.join(directory, tag)}", flush=True)
    _barrier()
    return os.path.join(directory, tag)


# ---------------------------------------------------------------------------
# load


def _resolve_tag(args, directory: str) -> str | None:
    """The tag to load, or None for a fresh run writing into its own (empty) save dir."""
    if args.iteration is not None:  # NeoX's `iteration` key picks a specific step
        return checkpoint_tag(args.iteration)
    tag = _read_latest(directory)
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


def _load_module_only(engine, ckpt_dir: str) -> None:
    """Copy only weights into the engine: converted (HF -> NeoX) checkpoints and finetuning."""
    module = engine.module
    if hasattr(module, "load_state_dir"):  # deepspeed.pipe.PipelineModule: layer_XX files
        module.load_state_dir(ckpt_dir, checkpoint_engine=engine.checkpoint_engine, strict=True)
    else:
        path = os.path.join(ckpt_dir, f"mp_rank_{engine.checkpoint_mp_rank:02d}_model_states.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"load: {path} is missing; the checkpoint is incomplete")
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["module"])
    # ZeRO and mixed precision keep their own fp32 copy of the weights: refresh it, or the
    # next step would write the old weights back.
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def load_checkpoint(args, engine, groups, l2e=None) -> int:
    """Restore the run from ``args.load``; returns the iteration to continue from.

    A full checkpoint (ours) restores weights, optimizer, LR schedule, RNG and L2E
    state exactly. A weights-only checkpoint (no extra-state files, e.g. from
    tools/ckpts/convert_hf_to_neox.py) or ``finetune: true`` loads only the weights
    and starts at iteration 0. A checkpoint from another parallel layout goes through
    ``elastic.load_other_layout``.
    """
    directory = args.load
    if not directory:
        return 0
    if not os.path.isdir(directory):
        if os.path.abspath(directory) == os.path.abspath(args.save or ""):
            return 0  # first launch of a run that saves and resumes in one directory
        raise CheckpointError(f"load: directory {directory} does not exist; fix 'load' or remove it")
    tag = _resolve_tag(args, directory)
    if tag is None:
        return 0
    tag = _tag_dir(directory, tag)
    ckpt_dir = os.path.join(directory, tag)
    extra_path = os.path.join(ckpt_dir, extra_state_name(_rank()))
    has_extra = os.path.isfile(extra_path)

    if args.finetune or not any(name.endswith("_extra_state.pt") for name in os.listdir(ckpt_dir)):
        _say(f"loaded weights only from {ckpt_dir}; training starts at iteration 0")
        _load_module_only(engine, ckpt_dir)
        return 0
    if groups is not None and elastic.needs_elastic(elastic.saved_layout(ckpt_dir),
                                                    elastic.current_layout(args, engine)):
        return elastic.load_other_layout(args, engine, groups, ckpt_dir, l2e)
    if not has_extra:
        raise CheckpointError(
            f"load: {extra_path} is missing; {ckpt_dir} was saved with fewer ranks than this "
            f"run has; resume with the world size it was saved with or set 'finetune: true'"
        )

    try:
        path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=not args.no_load_optim,
                                         load_lr_scheduler_states=not args.no_load_optim)
    except FileNotFoundError as e:
        raise CheckpointError(f"load: {ckpt_dir} is incomplete ({e}); pick another 'iteration'") from e
    if path is None:
        raise CheckpointError(f"load: DeepSpeed could not read {ckpt_dir}; the checkpoint is incomplete")
    extra = torch.load(extra_path, map_location="cpu", weights_only=True)
    if not args.no_load_rng:
        set_rng_state(extra["rng"])
    if l2e is not None:
        if extra["l2e"] is None:
            log.info("%s holds no L2E state; L2E starts fresh", ckpt_dir)
        else:
            l2e.load_state_dict(extra["l2e"])
    _say(f"resumed from {ckpt_dir} at iteration {extra['iteration']}")
    return extra["iteration"]
