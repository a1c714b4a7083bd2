"""``python -m megatron.torchrun ARGS``: torchrun, exiting with its ranks' status.

torchrun itself exits 1 whatever its ranks returned, so a rank's one-line error (status
2) would read as a crash to a scheduler or a requeue script. Here the first rank that
failed gives the status (a death by signal N as a shell shows it: 128+N).
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)
