"""Who prints what: the startup lines and warnings once, from global rank 0.

Every rank loads the same config and builds the same run, so every warning about them
would otherwise appear once per rank. The other ranks print only their errors and the
warnings that only they can see (their own disk, signal, activations), which the code
marks with ``extra=THIS_RANK`` and which come prefixed with the rank.
"""
from __future__ import annotations

import logging
import os
import sys

THIS_RANK = {"this_rank": True}  # extra= of a warning about this rank's own situation


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR or getattr(record, "this_rank", False)


def route_console_output(rank: int | None = None) -> logging.Handler:
    """Send warnings to stderr: all of them on rank 0 (``RANK``, 0 in a single process),
    only errors and ``THIS_RANK`` warnings elsewhere. Replaces an earlier call's handler."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h.filters[0] if h.filters else None, _RankFilter)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    return handler
