"""A resume must train on what the checkpoint was trained on.

A checkpoint carries the YAML it was launched with (``configs/``) and a copy of its
tokenizer files (``tokenizer/``). Before a resume continues, the inputs of this run are
compared with them; a difference that silently changes what training means is refused
in one line naming every such difference, unless ``allow_changed_inputs: true``:

- the tokenizer (by content: another tokenizer of the same vocabulary size loads without
  a shape error but gives every embedding row another token),
- ``seq_length`` (the data position and the batches replayed after it change),
- the training data: other prefixes (by file name) or other blend weights.

Only a different directory holding the same training files (data moved to another
disk), and changed validation/test data, are accepted with a warning: the training
stream is the same. ``finetune`` starts a new run on purpose, so only its tokenizer is
checked.
"""
from __future__ import annotations

import logging
import os

from megatron.checkpoint.files import sha256_file
from megatron.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

ACCEPT_KEY = "allow_changed_inputs"
TRAIN_DATA_KEYS = ("data_path", "train_data_paths")
OTHER_DATA_KEYS = ("valid_data_paths", "test_data_paths")


def _saved_args(ckpt_dir: str):
    from megatron.config import NeoXArgs

    try:
        return NeoXArgs.from_config_dir(os.path.join(ckpt_dir, "configs"))
    except UserError:  # a hand-written partial configs/: nothing to compare with
        return None


def tokenizer_difference(args, ckpt_dir: str) -> str | None:
    """``vocab_file X (sha256 ..) is not the checkpoint's tokenizer/Y (sha256 ..)``, or None
    when the files match or the checkpoint carries no tokenizer copy."""
    from megatron.tokenizer import tokenizer_files

    copy_dir = os.path.join(ckpt_dir, "tokenizer")
    if not os.path.isdir(copy_dir):
        return None  # NeoX's own checkpoints carry none
    copies = {name: sha256_file(os.path.join(copy_dir, name)) for name in sorted(os.listdir(copy_dir))}
    for path in tokenizer_files(args):
        digest = sha256_file(path)
        if digest in copies.values():
            continue
        name = os.path.basename(path)
        theirs = name if name in copies else next(iter(copies), None)
        if theirs is None:
            return None
        return (f"tokenizer {path} (sha256 {digest[:12]}) is not the checkpoint's "
                f"{os.path.join(copy_dir, theirs)} (sha256 {copies[theirs][:12]})")
    return None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _data_differences(saved, args) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences of the data keys, as ``key saved -> current``."""
    refused, accepted = [], []
    for key in TRAIN_DATA_KEYS + OTHER_DATA_KEYS:
        before, now = _as_list(getattr(saved, key, None)), _as_list(getattr(args, key, None))
        if [os.path.normpath(p) for p in before] == [os.path.normpath(p) for p in now]:
            continue
        same_files = [os.path.basename(p) for p in before] == [os.path.basename(p) for p in now]
        change = f"{key} {before} -> {now}"
        (accepted if same_files or key in OTHER_DATA_KEYS else refused).append(change)
    before, now = getattr(saved, "train_data_weights", None), getattr(args, "train_data_weights", None)
    if before is not None and now is not None and [float(w) for w in before] != [float(w) for w in now]:
        refused.append(f"train_data_weights {list(before)} -> {list(now)}")
    return refused, accepted


def input_differences(args, ckpt_dir: str) -> tuple[list[str], list[str]]:
    """(refused, accepted): how this run's inputs differ from the checkpoint's."""
    refused = [d for d in [tokenizer_difference(args, ckpt_dir)] if d]
    if getattr(args, "finetune", False):
        return refused, []
    saved = _saved_args(ckpt_dir)
    if saved is None:
        return refused, []
    seq_length = getattr(args, "seq_length", None)
    if seq_length is not None and saved.seq_length != seq_length:
        refused.append(f"seq_length {saved.seq_length} -> {seq_length}")
    data_refused, accepted = _data_differences(saved, args)
    return refused + data_refused, accepted


def check_steps_left(args, ckpt_dir: str, iteration: int | None) -> None:
    """A checkpoint past ``train_iters`` leaves nothing to train: say so, instead of a
    mismatched LR schedule (or, with override_lr_scheduler, re-saving it and exiting 0)."""
    train_iters = getattr(args, "train_iters", None)
    if getattr(args, "finetune", False) or iteration is None or train_iters is None:
        return
    if iteration > train_iters:
        raise CheckpointError(
            f"load: {ckpt_dir} is at iteration {iteration}, past train_iters={train_iters}, so there is "
            f"nothing left to train; raise train_iters above {iteration} to train on, or load an earlier "
            f"'iteration' (finetune: true starts a new run from its weights)")


def check_resume_inputs(args, ckpt_dir: str) -> None:
    """Refuse (CheckpointError) a resume whose tokenizer, seq_length or training data
    differ from the checkpoint's, unless ``allow_changed_inputs``; warn about the rest."""
    refused, accepted = input_differences(args, ckpt_dir)
    if refused and getattr(args, ACCEPT_KEY, False):
        accepted, refused = refused + accepted, []
    if accepted:
        log.warning("resuming %s with changed inputs (accepted): %s", ckpt_dir, "; ".join(accepted))
    if refused:
        raise CheckpointError(
            f"load: {ckpt_dir} was trained on other inputs: {'; '.join(refused)}; resume with the "
            f"checkpoint's (its configs/ and tokenizer/), or set {ACCEPT_KEY}: true to change them on purpose")
