"""Signal the training ranks on this machine, and nothing else.

    python tools/signal_ranks.py [--signal USR1] [--script train.py]
    pdsh -w node[1-3] 'python /path/to/tools/signal_ranks.py'      # every node of a job

A rank is a process started with LOCAL_RANK by a parent without it (torchrun, DeepSpeed's
launch.py, srun, mpirun): the launchers above it and the DataLoader readers below it are
left alone, unlike ``pkill -f train.py``, which also kills deepy.py and DeepSpeed's
launcher (their command lines name the script too) and so cuts the ranks' output. The
ranks' preemption handler agrees at the next step, saves one checkpoint on every rank and
exits; a second signal is not needed. Prints one line per rank signalled; exits 1 when
there was none.
"""
import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.errors import cli_main  # noqa: E402


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", default="USR1", help="signal name: USR1 (default), TERM, INT, KILL")
    parser.add_argument("--launch", default=None,
                        help="only the ranks of this deepy launch (its NEOX_LAUNCH_ID; deepy passes it)")
    parser.add_argument("--script", default=None,
                        help="only ranks whose command line names this script (e.g. train.py)")
    return parser


@cli_main
def main(argv=None) -> int:
    import psutil

    from megatron.errors import UserError
    from megatron.processes import is_rank

    ns = _parser().parse_args(argv)
    try:
        sig = signal.Signals["SIG" + ns.signal.upper().removeprefix("SIG")]
    except KeyError:
        raise UserError(f"--signal {ns.signal}: not a signal name; use USR1, TERM, INT or KILL") from None
    signalled = 0
    for proc in psutil.process_iter():
        if proc.pid == os.getpid() or not is_rank(proc):
            continue
        try:
            if ns.script and not any(os.path.basename(a) == ns.script for a in proc.cmdline()):
                continue
            environ = proc.environ()
            if ns.launch and environ.get("NEOX_LAUNCH_ID") != ns.launch:
                continue
            rank = environ.get("RANK", "?")
            proc.send_signal(sig)
        except psutil.Error:
            continue
        signalled += 1
        print(f"{sig.name} to rank {rank} (pid {proc.pid})", flush=True)
    if not signalled:
        print(f"{os.uname().nodename}: no training rank found", file=sys.stderr)
    return 0 if signalled else 1


if __name__ == "__main__":
    sys.exit(main())
