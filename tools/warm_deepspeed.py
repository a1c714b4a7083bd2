"""Build DeepSpeed's CPU shared-memory comm op once, in one process.

On a fresh machine DeepSpeed JIT-compiles this op on the first ``init_distributed``
(~45 s). Doing it here, before any multi-process test starts, avoids every rank of
the first distributed test compiling it at the same time. Cached in
~/.cache/torch_extensions afterwards (~1 s). A lock left there by a killed build is
reported (exit 2, the file to delete) instead of waited on forever.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.errors import cli_main  # noqa: E402


@cli_main
def main():
    import deepspeed
    import torch.distributed as dist

    from megatron.launcher import free_port
    from megatron.parallel.extension_locks import check_extension_locks

    check_extension_locks()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    start = time.time()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dist.destroy_process_group()
    print(f"deepspeed comm ready ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
