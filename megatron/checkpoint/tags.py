"""What a save directory holds: ``global_stepN`` tags, ``latest``, and the atomic publish.

Every rank writes into ``global_stepN.tmp``; rank 0 then renames it to ``global_stepN``
and only afterwards points ``latest`` at it (a tmp file and ``os.replace``). A crash at
any moment therefore leaves ``latest`` naming a complete checkpoint; ``*.tmp``
leftovers of an interrupted save are swept at the next one.
"""
from __future__ import annotations

import logging
import os
import re
import shutil

from megatron.checkpoint import health
from megatron.errors import CheckpointError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


PARKED_SUFFIX = ".old" + TMP_SUFFIX


TAG_RE = re.compile(r"^global_step(\d+)$")


def checkpoint_tag(iteration: int) -> str:
    return f"global_step{iteration}"


def extra_state_name(rank: int) -> str:
    return f"rank_{rank:05d}_extra_state.pt"


def read_latest(directory: str) -> str | None:
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
        remove_path(tmp)
        raise CheckpointError(f"save: cannot point {directory}/latest at {tag} ({e.strerror}); "
                              f"{tag} is complete: free space, then write its name into 'latest'") from None


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _recover_parked(directory: str) -> None:
    """Undo a publish that died between parking the old tag dir and renaming the new one in."""
    tag = read_latest(directory)
    if tag is None:
        return
    final, parked = os.path.join(directory, tag), os.path.join(directory, tag + PARKED_SUFFIX)
    if not os.path.isdir(final) and os.path.isdir(parked):
        os.rename(parked, final)


def sweep_leftovers(directory: str) -> None:
    _recover_parked(directory)
    for name in os.listdir(directory):
        if name.endswith(TMP_SUFFIX):
            log.info("removing %s left by an interrupted save", os.path.join(directory, name))
            remove_path(os.path.join(directory, name))


def publish(directory: str, tmp_tag: str, tag: str) -> None:
    final = os.path.join(directory, tag)
    if os.path.exists(final):
        # Re-saving a tag that already exists (e.g. after a resume): park the old one so
        # the name is never half-written; `latest` may point at it meanwhile.
        parked = final + PARKED_SUFFIX
        os.rename(final, parked)
        os.rename(os.path.join(directory, tmp_tag), final)
        remove_path(parked)
    else:
        os.rename(os.path.join(directory, tmp_tag), final)
    _write_latest(directory, tag)


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``directory`` as (iteration, tag), oldest first."""
    found = []
    for name in os.listdir(directory):
        match = TAG_RE.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), name))
    return sorted(found)


def prune(directory: str, keep: int) -> None:
    """Keep the newest ``keep`` up to ``latest``, plus the newest trustworthy checkpoint
    (checkpoint_health) and, after a rollback, every checkpoint newer than ``latest``."""
    latest = read_latest(directory)
    match = TAG_RE.match(latest or "")
    latest_step = int(match.group(1)) if match else None
    old = [tag for it, tag in list_checkpoints(directory)
           if tag != latest and (latest_step is None or it < latest_step)]
    protected = health.protected_tags(directory)
    for tag in old[: max(0, len(old) - (keep - 1))]:
        if tag in protected:
            continue
        log.info("keep_last_n_checkpoints=%d: removing %s", keep, tag)
        shutil.rmtree(os.path.join(directory, tag))
