"""Run a function on N real gloo processes and collect what each rank returns.

Usage in a test::

    def _body(rank, world_size, x):      # module-level, so spawn can pickle it
        ...
        return value                      # picklable

    results = run_distributed(_body, world_size=2, args=(x,))   # [value_rank0, value_rank1]

Each process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set, one CPU
thread, DS_ACCELERATOR=cpu, and an initialised gloo process group (torch.distributed),
which is destroyed afterwards. A rank that raises fails the test with its traceback.
"""
from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from megatron.launcher import free_port


def _worker(rank, world_size, port, fn, args, kwargs, queue, init_deepspeed):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a peer already failed
                pass
            dist.destroy_process_group()


def run_distributed(fn, world_size=2, args=(), kwargs=None, timeout=300, init_deepspeed=False):
    """Spawn ``world_size`` gloo processes running ``fn(rank, world_size, *args)``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, kwargs or {}, queue, init_deepspeed),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
