"""What a checkpoint directory holds, and whether it is intact.

Used by ``save`` and ``load`` (at save, and before DeepSpeed reads anything at
load), by the converters (``layout.save_neox_checkpoint``) and by
``tools/ckpts/inspect_checkpoint.py``:

* ``checksums.json``: sha256 of every file, written at save and checked at load
  (``checkpoint_verify: false`` skips the check). Hashing 70M's state (282 MB weights +
  563 MB Adam moments) takes about 3 s on one core of the CI machine, as long as writing
  it, so the files are split round-robin over the ranks, each hashes its share, and rank 0
  merges; a save or load costs the largest share, not the sum.
* a cheap structural test of every ``.pt`` file (a truncated zip has no central
  directory) so that a damaged file is named instead of DeepSpeed's "file is corrupted".
* the kind of checkpoint (ours, NeoX-native, weights-only), its layout and model shape.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.checkpoint import collective
from megatron.errors import CheckpointError, UserError

CHECKSUMS_FILE = "checksums.json"
EXTRA_STATE_SUFFIX = "_extra_state.pt"
MP_FILE = "mp_rank_{tp:02d}_model_states.pt"
# Written into the client state of every save of ours: what the checkpoint holds.
SAVED_STATE_KEY = "neox_l2e_saved"
# The model dimensions a checkpoint must share with the run that loads it.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
_HASH_CHUNK = 16 << 20


# ---------------------------------------------------------------------------
# checksums


def checkpoint_files(ckpt_dir: str) -> list[str]:
    """Every file under ``ckpt_dir`` (relative paths, sorted), the manifest excluded."""
    found = []
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir)
            if rel != CHECKSUMS_FILE:
                found.append(rel)
    return sorted(found)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(ckpt_dir: str) -> None:
    """Collective: hash every file of ``ckpt_dir`` (each rank a share); rank 0 writes the manifest.

    Call after the barrier that puts every rank's files on disk.
    """
    rank, world = collective.rank_world()
    mine = {rel: sha256_file(os.path.join(ckpt_dir, rel)) for rel in checkpoint_files(ckpt_dir)[rank::world]}
    shares = collective.gather_to_all(mine)
    if rank == 0:
        files = {rel: digest for share in shares for rel, digest in share.items()}
        manifest = {"algorithm": "sha256", "files": dict(sorted(files.items()))}
        tmp = os.path.join(ckpt_dir, CHECKSUMS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(ckpt_dir, CHECKSUMS_FILE))


def read_checksums(ckpt_dir: str) -> dict | None:
    path = os.path.join(ckpt_dir, CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checksum manifest ({e}); restore it, or set "
                              f"'checkpoint_verify: false' to load without checking") from e


def checksum_problems(ckpt_dir: str, files: dict, share: slice = slice(None)) -> list[str]:
    """One message per file of the manifest (or of ``share`` of it) that is missing or differs."""
    problems = []
    for rel in sorted(files)[share]:
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif sha256_file(path) != files[rel]:
            problems.append(f"{path} does not match its checksum (damaged or changed since the save)")
    return problems


def verify_checksums(ckpt_dir: str, may_be_missing: str | None = None) -> bool:
    """Collective: check ``ckpt_dir`` against its manifest; False when it has none.

    Files ending in ``may_be_missing`` that are gone are not reported: the load was told
    to do without them (``no_load_rng`` and the per-rank extra state)."""
    files = read_checksums(ckpt_dir)
    if files is None:
        return False
    if may_be_missing:
        files = {rel: digest for rel, digest in files.items()
                 if not rel.endswith(may_be_missing) or os.path.isfile(os.path.join(ckpt_dir, rel))}
    rank, world = collective.rank_world()
    problems = [p for share in collective.gather_to_all(checksum_problems(ckpt_dir, files, slice(rank, None, world)))
                for p in share]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"load: {problems[0]}{more}; restore the file or load another 'iteration' "
                              f"(checkpoint_verify: false skips this check)")
    return True


# ---------------------------------------------------------------------------
# files that torch.load would choke on


def torch_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a complete torch file, or None if it looks whole.

    torch writes zip archives whose directory sits at the end: a truncated file lacks it.
    Files from torch < 1.6 are a bare pickle stream (first byte 0x80) and pass unchecked.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if head == b"PK":
        return None if zipfile.is_zipfile(path) else "is truncated (its zip directory is missing)"
    if head[:1] == b"\x80":
        return None
    return "is not a torch checkpoint file" if head else "is empty"


def head_is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def check_torch_files(ckpt_dir: str) -> None:
    for rel in checkpoint_files(ckpt_dir):
        if rel.endswith(".pt"):
            path = os.path.join(ckpt_dir, rel)
            problem = torch_file_problem(path)
            if problem:
                raise CheckpointError(f"load: {path} {problem}; restore it from a copy or load another "
                                      f"'iteration'")


def load_torch(path: str, trusted: bool = False, mmap: bool = False):
    """``torch.load`` whose failures name the file. ``trusted``: the file may hold numpy
    objects (NeoX's own RNG states), which weights-only unpickling refuses. ``mmap``:
    tensors are mapped, not read (for reading metadata out of a file full of weights)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"load: {path} is missing; the checkpoint is incomplete, load another 'iteration'")
    problem = torch_file_problem(path)
    if problem:
        raise CheckpointError(f"load: {path} {problem}; restore it from a copy or load another 'iteration'")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap and head_is_zip(path))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"load: {path} cannot be read ({reason}); restore it or load another "
                              f"'iteration'") from e


# ---------------------------------------------------------------------------
# what kind of checkpoint, which layout, which model


@dataclass
class CheckpointInfo:
    """What a ``global_stepN`` directory holds, read from its file names and mp_rank_00 file."""

    path: str
    kind: str  # "full" (ours), "neox" (NeoX-native: optimizer + scheduler, no extra state), "weights"
    iteration: int | None
    model_args: dict
    layout: dict
    has_optimizer: bool
    has_rng: bool
    meta: dict

    @property
    def extra_state_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path) if n.endswith(EXTRA_STATE_SUFFIX))


def _ds_zero_stage(meta: dict) -> int | None:
    config = meta.get("ds_config")
    if isinstance(config, dict):
        return int((config.get("zero_optimization") or {}).get("stage", 0))
    return None


def _infer_layout(ckpt_dir: str, names: list[str], meta: dict) -> dict:
    """The parallel layout a checkpoint was saved with, from the files when the save did not record it."""
    layer_tps = {n.split("-model_")[1][:2] for n in names if n.startswith("layer_") and "-model_" in n}
    mp_files = [n for n in names if n.startswith("mp_rank_") and n.endswith("_model_states.pt")]
    extra = [n for n in names if n.endswith(EXTRA_STATE_SUFFIX)]
    tp = len(layer_tps) or meta.get("mp_world_size") or len(mp_files) or 1
    pp = len(mp_files) // tp if layer_tps else 0  # the pipeline engine writes one mp_rank file per stage x tp
    return {"tp": tp, "pp": pp, "dp": meta.get("dp_world_size"), "zero_stage": _ds_zero_stage(meta),
            "world_size": len(extra) or None}


ZERO3_PREFIX = "zero_pp_rank_0_"  # ZeRO-3 names the engine-state files per dp rank


def engine_state_file(ckpt_dir: str) -> str:
    """Rank 0's engine-state file (iteration, args, layout, and at pp=0 the weights):
    ``mp_rank_00_model_states.pt``, or ZeRO-3's ``zero_pp_rank_0_mp_rank_00_model_states.pt``."""
    plain = os.path.join(ckpt_dir, MP_FILE.format(tp=0))
    zero3 = os.path.join(ckpt_dir, ZERO3_PREFIX + MP_FILE.format(tp=0))
    return zero3 if not os.path.isfile(plain) and os.path.isfile(zero3) else plain


def read_checkpoint_info(ckpt_dir: str) -> CheckpointInfo:
    names = sorted(os.listdir(ckpt_dir))
    meta_path = engine_state_file(ckpt_dir)
    if not os.path.isfile(meta_path):
        hint = "layer files but " if any(n.startswith("layer_") for n in names) else ""
        raise CheckpointError(f"load: {meta_path} is missing ({hint}no engine state); the checkpoint is "
                              f"incomplete, load another 'iteration'")
    meta = load_torch(meta_path, trusted=True, mmap=True)  # at pp=0 it also holds all weights
    if not isinstance(meta, dict):
        raise CheckpointError(f"load: {meta_path} holds a {type(meta).__name__}, not a checkpoint dict")
    saved = meta.get(SAVED_STATE_KEY)
    has_zero_shards = any(n.endswith("_optim_states.pt") for n in names)
    has_optimizer = meta.get("optimizer") is not None or has_zero_shards
    if saved is not None or any(n.endswith(EXTRA_STATE_SUFFIX) for n in names):
        kind = "full"
        has_optimizer = bool(saved.get("optimizer", has_optimizer)) if saved else has_optimizer
    elif has_optimizer or meta.get("lr_scheduler") is not None:
        kind = "neox"
    else:
        kind = "weights"
    has_rng = bool(saved.get("rng", True)) if saved else "random_rng_state" in meta
    layout = meta.get("layout") or _infer_layout(ckpt_dir, names, meta)
    iteration = meta.get("iteration", meta.get("global_steps"))
    return CheckpointInfo(path=ckpt_dir, kind=kind, iteration=None if iteration is None else int(iteration),
                          model_args=dict(meta.get("args") or {}), layout=layout,
                          has_optimizer=has_optimizer, has_rng=has_rng, meta=meta)


# ModelConfig field -> (the NeoX key that sets it, its value in NeoX's terms): what the weights mean.
ARCHITECTURE = {
    "num_layers": ("num_layers", None), "hidden_size": ("hidden_size", None),
    "num_heads": ("num_attention_heads", None), "vocab_size": ("padded_vocab_size", None),
    "ffn_size": ("intermediate_size", None), "parallel_residual": ("gpt_j_residual", None),
    "tie_embeddings": ("no_weight_tying", lambda tied: not tied), "rotary_pct": ("rotary_pct", None),
    "rotary_base": ("rotary_emb_base", None), "gelu_tanh": ("bias_gelu_fusion", None),
    "layernorm_eps": ("layernorm_epsilon", None),
}


def _shape_error(path: str, key: str, saved, current) -> CheckpointError:
    return CheckpointError(f"load: {path} holds a model with {key}={saved}, the config asks for {current}; "
                           f"load a checkpoint of this model or set {key}: {saved}")


def check_model_shape(path: str, model_args: dict, args, saved_tp: int | None = None) -> None:
    """Refuse, naming the dimension, a checkpoint of a model shaped unlike the config
    (from NeoX's ``args`` summary in the mp_rank file).

    The padded vocabulary depends on the tensor-parallel size, so it is compared only
    when that is unchanged (a resharding load pads or trims it).
    """
    same_tp = saved_tp in (None, getattr(args, "model_parallel_size", None))
    for key in SHAPE_KEYS if same_tp else SHAPE_KEYS[:-1]:
        saved, current = model_args.get(key), getattr(args, key, None)
        if saved is not None and current is not None and saved != current:
            raise _shape_error(path, key, saved, current)


def check_architecture(path: str, saved, args, saved_tp: int | None = None) -> None:
    """Refuse a checkpoint whose ModelConfig ``saved`` differs from the config's in anything
    that changes what the weights mean (residual form, tying, rotary, GELU, widths)."""
    if saved is None or not hasattr(args, "model_config"):
        return
    current = args.model_config()
    same_tp = saved_tp in (None, getattr(args, "model_parallel_size", None))
    for field, (key, to_neox) in ARCHITECTURE.items():
        a, b = getattr(saved, field), getattr(current, field)
        if a != b and (same_tp or field != "vocab_size"):
            raise _shape_error(path, key, to_neox(a) if to_neox else a, to_neox(b) if to_neox else b)


def saved_model_config(info: CheckpointInfo):
    """The checkpoint's ModelConfig from its configs/ (None when it has none or they do not parse)."""
    from megatron.config import NeoXArgs

    try:
        saved = NeoXArgs.from_config_dir(os.path.join(info.path, "configs"))
    except UserError:
        return None  # a partial configs/ (e.g. hand-written): the args summary check still applies
    if saved is None or info.model_args.get("padded_vocab_size") is None:
        return None
    saved.padded_vocab_size = info.model_args["padded_vocab_size"]
    return saved.model_config()
