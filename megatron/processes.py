"""How the processes of a run end together with the process that started them."""
import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: signal.Signals) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, even by SIGKILL
    (Linux; elsewhere a no-op). The parent is the *thread* that started us, so call it
    in children started from the main thread."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
