"""``python -m megatron.torchrun ARGS``: torchrun, exiting with its ranks' status.

torchrun itself exits 1 whatever its ranks returned, so a rank's one-line error (status
2) would read as a crash to a scheduler or a requeue script. Here the first rank that
exited with a status of its own gives the status; ranks killed by a signal are usually
the consequence (a peer's watchdog, torchrun's clean-up), so their status (128+N, as a
shell shows it) counts only when no rank exited by itself.
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as failed:
        failures = sorted(failed.failures.values(), key=lambda f: f.timestamp)
        own = [f for f in failures if f.exitcode > 0]
        failure = (own or failures)[0]
        sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)
