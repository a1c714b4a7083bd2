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


def is_rank(proc) -> bool:
    """A training rank: started with LOCAL_RANK by a parent without it (torchrun's,
    DeepSpeed's launch.py's or srun's tasks; not the ranks' own children, which inherit it)."""
    import psutil

    try:
        parent = proc.parent()
        return "LOCAL_RANK" in proc.environ() and (parent is None or "LOCAL_RANK" not in parent.environ())
    except psutil.Error:  # exited meanwhile, or not ours to read
        return False


class _OutputThatMayLoseItsReader:
    """A text stream whose writes are dropped, not raised, once its reader is gone."""

    def __init__(self, stream):
        self._stream, self._lost = stream, False

    def write(self, text):
        if not self._lost:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ConnectionResetError):
                self._lost = True
        return len(text)

    def flush(self):
        if not self._lost:
            try:
                self._stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                self._lost = True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def keep_running_without_output() -> None:
    """Let this process outlive the reader of its stdout/stderr. A rank's output travels
    through pdsh/ssh, srun or mpirun; when that carrier dies first (pdsh killed, a dropped
    ssh session) a print would raise BrokenPipeError (Python ignores SIGPIPE), and a rank
    that was stopping to save would die before saving. Output after that point is lost."""
    sys.stdout = _OutputThatMayLoseItsReader(sys.stdout)
    sys.stderr = _OutputThatMayLoseItsReader(sys.stderr)
