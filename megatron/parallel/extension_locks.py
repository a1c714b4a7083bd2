"""DeepSpeed JIT-builds its CPU communication op the first time a process group comes up;
a build killed half-way leaves its lock file behind and every later launch would wait
on it forever. This module names such a lock instead (deepy.py before launching, each
rank before ``init_distributed``), and waits, with a bound, for a build that is alive."""
from __future__ import annotations

import glob
import os
import sys
import time

from megatron.errors import UserError


class StaleBuildLockError(UserError):
    """A torch-extensions build lock left by a killed build (every later build waits on it)."""


# A build on this machine holds its lock file open; one on another node sharing the
# cache (an NFS home) cannot be seen, so there only age tells, and no build takes an hour.
LOCK_GRACE_S = 30
LOCK_MAX_BUILD_S = 3600


def _lock_holders(path: str) -> bool:
    """True when a process on this machine has ``path`` open (Linux /proc)."""
    real = os.path.realpath(path)
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) == real:
                    return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def _build_locks(root: str) -> list[str]:
    return glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))


def check_extension_locks(root: str | None = None, single_node: bool = True, grace_s: float = LOCK_GRACE_S,
                          max_build_s: float = LOCK_MAX_BUILD_S, poll_s: float = 2.0) -> None:
    """Fail with the file to delete instead of hanging on a DeepSpeed/torch JIT-build lock
    (``<torch_extensions>/<python_device>/<op>/lock``) whose builder was killed; wait,
    saying so, for one that may belong to a live build, until it is released or stale
    (unheld past ``grace_s``, or older than ``max_build_s``): DeepSpeed itself would
    wait on it forever without a word."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    can_see_holders = single_node and os.path.isdir("/proc")
    announced = set()
    while True:
        waiting = False
        for path in _build_locks(root):
            try:
                age = time.time() - os.path.getmtime(path)
            except OSError:  # released meanwhile
                continue
            held = can_see_holders and _lock_holders(path)
            stale = age > max_build_s or (can_see_holders and age > grace_s and not held)
            if stale and os.path.exists(path):
                raise StaleBuildLockError(
                    f"{path}: a DeepSpeed op build was killed {age / 60:.0f} min ago and left this lock, on "
                    f"which every launch would hang; delete it (rm {path}) and launch again")
            waiting = True
            if path not in announced:
                announced.add(path)
                owner = "a build on this machine holds it" if held else "maybe a build that is starting or on another node"
                limit = max_build_s if held or not can_see_holders else grace_s
                print(f"waiting for the DeepSpeed op build lock {path} ({owner}, {age:.0f} s old); it is taken "
                      f"as stale, and the launch stops naming it, once it is {limit:.0f} s old", file=sys.stderr,
                      flush=True)
        if not waiting:
            return
        time.sleep(poll_s)
