"""Which checkpoints can be trusted: judged from the run itself, not from finiteness.

A checkpoint at step K is **trustworthy** when, since the previous checkpoint,

* no step was non-finite (NaN/inf loss or gradients, skipped or not), and
* no step's loss exceeded ``LOSS_SPIKE_FACTOR`` x the mean of the last
  ``BASELINE_STEPS`` finite steps' losses (the baseline travels with the checkpoint,
  so a resumed run judges its first steps against the run it continues), and
* the first step after it did not show K's weights broken: that step's loss is
  computed on exactly the saved weights, so a non-finite or spiked loss there revokes
  K's trust (a non-finite *gradient* alone does not: it may be the batch).

Verdicts live in ``SAVE/checkpoint_health.json`` (``{tag: {...}}``, beside ``latest``;
the step directories and their checksums are untouched). Pruning never removes the
newest trustworthy checkpoint, nor the newest one whose next step confirmed it, and the
divergence error names the newest trustworthy one. A checkpoint without a record
(written before verdicts existed, or by a converter) counts as trustworthy when a run
starts from it.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque

HEALTH_FILE = "checkpoint_health.json"
LOSS_SPIKE_FACTOR = 1.5
BASELINE_STEPS = 20
# Below this many healthy losses there is no mean to compare against (a run's first steps).
MIN_BASELINE = 3


def read_verdicts(directory: str) -> dict:
    try:
        with open(os.path.join(directory, HEALTH_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: no verdict, as before verdicts existed
        return {}


def _write_verdicts(directory: str, verdicts: dict) -> None:
    path = os.path.join(directory, HEALTH_FILE)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        json.dump(verdicts, f, indent=1)
    os.replace(tmp, path)


def trusted(record: dict | None) -> bool:
    return record is None or (record.get("healthy", True) and record.get("next_step_ok") is not False)


def _step(tag: str) -> int:
    return int(tag[len("global_step"):])


def _newest(directory: str, confirmed: bool = False, below: int | None = None) -> str | None:
    """The newest trustworthy tag present in ``directory`` (confirmed by its next step, below a step)."""
    verdicts = read_verdicts(directory)
    for tag in sorted(verdicts, key=_step, reverse=True):
        record = verdicts[tag]
        if (below is None or _step(tag) < below) and trusted(record) and (record.get("next_step_ok") or not confirmed) \
                and os.path.isdir(os.path.join(directory, tag)):
            return tag
    return None


def protected_tags(directory: str) -> set[str]:
    """Tags pruning must keep: the newest trustworthy checkpoint and the newest confirmed one."""
    return {tag for tag in (_newest(directory), _newest(directory, confirmed=True)) if tag is not None}


def record_verdict(directory: str, tag: str, verdict: dict) -> None:
    """Rank 0, inside the save: store ``tag``'s verdict before pruning reads it."""
    verdicts = read_verdicts(directory)
    verdicts[tag] = {**verdict, "next_step_ok": None}
    _write_verdicts(directory, verdicts)


class CheckpointHealth:
    """Tracks the steps since the last checkpoint and gives each checkpoint its verdict.

    Call :meth:`observe` after every step, :meth:`verdict` just before a save (it goes to
    ``save_checkpoint``, which records it) and :meth:`saved` after it. ``last_good`` is
    the newest trustworthy checkpoint's path (what the divergence error names).
    """

    def __init__(self, save_dir: str | None, is_writer: bool):
        self.save_dir, self.is_writer = save_dir, is_writer
        self.baseline = deque(maxlen=BASELINE_STEPS)  # the last finite steps' losses
        self.problems: list[str] = []
        self.last_good: str | None = None
        self._good_before_pending: str | None = None
        self._pending: str | None = None  # the checkpoint the next step will confirm or revoke

    def start_from(self, directory: str, tag: str) -> None:
        """The run resumes from ``directory/tag``: its baseline, and trust unless revoked."""
        record = read_verdicts(directory).get(tag)
        self.baseline.extend((record or {}).get("baseline", []))
        path = os.path.join(directory, tag)
        earlier = _newest(self.save_dir, below=_step(tag)) if self.save_dir else None
        earlier = os.path.join(self.save_dir, earlier) if earlier else None
        if not trusted(record):  # resumed on purpose from an untrusted one: the best before it
            self.last_good = earlier
            return
        self.last_good = path
        if self.save_dir and os.path.abspath(directory) == os.path.abspath(self.save_dir):
            self._pending = path  # the first step confirms or revokes it, as in the run that saved it
            self._good_before_pending = earlier

    def observe(self, iteration: int, loss: float, nonfinite: bool) -> None:
        loss = float(loss)
        mean = sum(self.baseline) / len(self.baseline) if len(self.baseline) >= MIN_BASELINE else None
        loss_bad = not math.isfinite(loss) or (mean is not None and loss > LOSS_SPIKE_FACTOR * mean)
        if nonfinite or not math.isfinite(loss):
            self.problems.append(f"step {iteration} non-finite")
        elif loss_bad:
            self.problems.append(f"step {iteration} loss {loss:.4g} > {LOSS_SPIKE_FACTOR} x recent mean {mean:.4g}")
        if not nonfinite and math.isfinite(loss):  # spikes too: a loss that stays at a new level is the norm
            self.baseline.append(loss)
        if self._pending is not None:  # this step's loss was computed on the pending checkpoint's weights
            self._confirm(self._pending, not loss_bad)
            self._pending = None

    def verdict(self) -> dict:
        return {"healthy": not self.problems, "problems": self.problems[:3], "baseline": list(self.baseline)}

    def saved(self, path: str, verdict: dict) -> None:
        self._good_before_pending = self.last_good
        if trusted(verdict):
            self.last_good = path
        self.problems = []
        self._pending = path

    def _confirm(self, path: str, ok: bool) -> None:
        if not ok and self.last_good == path:
            self.last_good = self._good_before_pending
        if not self.is_writer:
            return
        directory, tag = os.path.split(path)
        verdicts = read_verdicts(directory)
        if tag in verdicts:
            verdicts[tag]["next_step_ok"] = ok
            _write_verdicts(directory, verdicts)
