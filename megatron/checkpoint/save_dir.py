"""The save directory belongs to one run: a writer lock, and no overwritten progress.

**Lock.** Rank 0 creates ``SAVE/writer.lock`` with ``O_CREAT | O_EXCL`` (atomic on
local disks and on NFS v3+/Lustre/GPFS, unlike ``flock``, which NFS may not carry
across nodes) holding its host, PID, start time and a heartbeat that a daemon thread
refreshes every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when its
holder ran on this host and its PID is gone (``kill -9``), or, for a holder on another
node (a requeued job landing elsewhere), when its heartbeat does not move while we
watch it for ``WATCH_S`` seconds. Any live holder refuses the run in one line naming it.

**Overwrites.** A step that already exists in ``save`` is never replaced unless
``overwrite_checkpoints: true``; a run that would reach one (a rollback with
``iteration`` below the newest, a converter's checkpoint in the run's directory, a
copy-pasted config) is refused before its first step.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import torch.distributed as dist

from megatron.checkpoint import collective
from megatron.checkpoint.save import should_save
from megatron.checkpoint.tags import list_checkpoints
from megatron.errors import CheckpointError

log = logging.getLogger(__name__)

LOCK_NAME = "writer.lock"
HEARTBEAT_S = 30
# A holder on another node cannot be asked whether it lives: watch its heartbeat for this
# long (two and a half beats) and take the lock over if it never moves. Comparing the
# file's own values needs no agreement between the nodes' clocks.
WATCH_S = 75
POLL_S = 5

class SaveDirBusyError(CheckpointError):
    """Another live run holds the save directory's writer lock."""


class OverwriteError(CheckpointError):
    """A save would replace a checkpoint that already exists."""


def _read_holder(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # gone, or caught between create and first write
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _watch(path: str, holder: dict) -> tuple[str | None, dict | None]:
    """(why the lock is stale or None, the holder now): None when its heartbeat moved."""
    print(f"save: {path} is held by host {holder.get('host')} pid {holder.get('pid')}; watching its heartbeat "
          f"for up to {WATCH_S} s", flush=True)
    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        now = _read_holder(path)
        if now != holder:  # released (None) or alive and beating
            return None, now
    return f"its heartbeat did not move for {WATCH_S} s", holder


def stale_reason(path: str, holder: dict) -> tuple[str | None, dict | None]:
    """(why the lock may be taken over, or None while it is live; the holder now)."""
    if holder.get("host") != socket.gethostname():
        return _watch(path, holder)
    if not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone", holder
    return None, holder


class SaveDirLock:
    """One writer per save directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.record = None
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; SaveDirBusyError naming a live holder."""
        os.makedirs(self.directory, exist_ok=True)
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now}
        for _ in range(3):  # a stale lock removed by us, or a holder that just released
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None:  # its writer is between create and write: give it a moment
                    time.sleep(1)
                    holder = _read_holder(self.path)
                    if holder is None:
                        continue
                reason, holder = stale_reason(self.path, holder)
                if holder is None:  # released while we watched
                    continue
                if reason is None:
                    raise SaveDirBusyError(self._busy_line(holder)) from None
                log.warning("save: taking over %s (%s)", self.path, reason)
                print(f"save: taking over the writer lock {self.path} ({reason})", flush=True)
                self._remove_if(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self._thread = threading.Thread(target=self._beat, name="save-dir-heartbeat", daemon=True)
            self._thread.start()
            return
        raise SaveDirBusyError(f"save: could not take the writer lock {self.path}; another run is starting "
                               f"in {self.directory}? give each run its own 'save' directory")

    def _busy_line(self, holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        return (f"save: {self.directory} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {since}); give this run another 'save' directory, or, once "
                f"that run is surely gone, delete {self.path} (a dead holder's lock is taken over by itself: at "
                f"once on its host, elsewhere when its heartbeat stops for {WATCH_S} s)")

    def _remove_if(self, holder: dict) -> None:
        """Delete the lock file if it still holds ``holder`` (not one re-taken meanwhile)."""
        if _read_holder(self.path) == holder:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.record["heartbeat"] = time.time()
            tmp = f"{self.path}.{os.getpid()}.new"
            try:
                with open(tmp, "w") as f:
                    json.dump(self.record, f)
                os.replace(tmp, self.path)  # atomic: readers never see a half-written lock
            except OSError as e:  # a full or flaky disk must not kill the run; staleness is bounded
                log.warning("save: cannot refresh %s (%s)", self.path, e)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        holder = _read_holder(self.path)
        if holder is not None and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            os.remove(self.path)


def _agree(error: str | None) -> None:
    """Collective: rank 0's error (or None) raised on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise SaveDirBusyError(error)


def lock_save_dir(args) -> SaveDirLock | None:
    """Collective: rank 0 takes ``args.save``'s lock; every rank fails together when it cannot."""
    if not args.save:
        return None
    lock, error = None, None
    if collective.rank() == 0:
        lock = SaveDirLock(args.save)
        try:
            lock.acquire()
        except SaveDirBusyError as e:
            error = str(e)
    _agree(error)
    return lock


# ---------------------------------------------------------------------------
# never overwrite progress


def existing_steps(directory: str) -> list[int]:
    return [it for it, _ in list_checkpoints(directory)] if os.path.isdir(directory) else []


def planned_saves(args, start: int) -> list[int]:
    """The steps this run will save at, from ``start`` (its own starting checkpoint excluded)."""
    steps = [it for it in range(start + 1, args.train_iters + 1) if should_save(args, it)]
    if start == 0 and should_save(args, 0):
        steps.insert(0, 0)
    if args.save and args.train_iters > start and args.train_iters not in steps:
        steps.append(args.train_iters)  # the final save
    return steps


def _tags(steps) -> str:
    return ", ".join(f"global_step{it}" for it in steps)


def check_planned_saves(args, start: int) -> None:
    """Before the first step: refuse a run that would replace checkpoints in ``save``, and
    say what a rollback (resuming below the newest step) leaves in place."""
    if not args.save or getattr(args, "overwrite_checkpoints", False):
        return
    existing = existing_steps(args.save)
    clashes = sorted(set(existing) & set(planned_saves(args, start)))
    newer = [it for it in existing if it > start]
    if clashes:
        raise OverwriteError(
            f"save: {args.save} already holds {_tags(clashes)}, which this run (from step {start}) would "
            f"replace; give it another 'save' directory, resume from the newest step, or set "
            f"overwrite_checkpoints: true to replace them")
    if newer and start > 0 and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"rollback: resuming at step {start} keeps the newer {_tags(newer)} in {args.save} untouched "
              f"(never pruned or replaced; 'latest' moves to this run's checkpoints)", flush=True)


def check_save_step(args, iteration: int) -> None:
    """At a save the startup check could not foresee (preemption, exit_interval)."""
    if getattr(args, "overwrite_checkpoints", False) or iteration not in existing_steps(args.save):
        return
    raise OverwriteError(f"save: {os.path.join(args.save, f'global_step{iteration}')} already exists and this "
                         f"run's step {iteration} was not saved; set overwrite_checkpoints: true to replace it, "
                         f"or resume from it")
