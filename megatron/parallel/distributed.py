"""How a rank learns who it is, and torch.distributed set up from it.

A rank finds RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, in this order, from:

1. torchrun or DeepSpeed's launcher (``WORLD_SIZE`` and ``RANK`` set);
2. slurm, when srun started the rank (``SLURM_STEP_ID`` set: a batch script itself is
   not a rank): ``SLURM_PROCID``, ``SLURM_LOCALID``, the step's task count and tasks per
   node, master = first host of the step's node list;
3. OpenMPI's mpirun (``OMPI_COMM_WORLD_*``); the master address comes from
   ``MASTER_ADDR``, which the launcher exports with ``mpirun -x``;
4. otherwise a world of one on this machine.

The master port is ``MASTER_PORT`` when set, else the config's ``master_port``; under
slurm without either, it is derived from the job id so that two jobs sharing a node
do not collide. Each rank prints one line saying where its rank came from.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

from megatron.errors import ConfigError

DEFAULT_MASTER_PORT = 29500


@dataclass
class RankPlacement:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str    # "torchrun", "slurm", ...
    evidence: str  # the variables it was read from

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) "
                f"from {self.source}: {self.evidence}; master {self.master_addr}:{self.master_port}")

    def export(self, environ) -> None:
        """Write the placement as the variables torch.distributed and DeepSpeed read."""
        environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank),
                       WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(self.local_world_size),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def expand_hostlist(hostlist: str) -> list[str]:
    """slurm's compressed host list: ``gpu[01-02,7],login`` -> gpu01, gpu02, gpu7, login."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", hostlist):
        prefix, ranges, suffix = match.groups()
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}{suffix}")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """slurm's ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts


def _int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} is not an integer; unset it or fix the "
                          f"launcher that set it") from None


def _port(environ, configured: int | None, fallback: int) -> int:
    if "MASTER_PORT" in environ:
        return _int(environ, "MASTER_PORT")
    if configured is not None and configured != DEFAULT_MASTER_PORT:
        return configured
    return fallback


def _from_launcher(environ, configured_port) -> RankPlacement:
    # DeepSpeed's launch.py says LOCAL_SIZE where torchrun says LOCAL_WORLD_SIZE.
    source = ("torchrun" if "TORCHELASTIC_RUN_ID" in environ else
              "deepspeed" if "LOCAL_SIZE" in environ else "launcher environment")
    def number(name, default):
        return _int(environ, name) if name in environ else default

    world = _int(environ, "WORLD_SIZE")
    return RankPlacement(
        rank=number("RANK", 0), local_rank=number("LOCAL_RANK", 0), world_size=world,
        local_world_size=number("LOCAL_WORLD_SIZE", number("LOCAL_SIZE", world)),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(environ, configured_port, DEFAULT_MASTER_PORT), source=source,
        evidence=f"RANK={environ.get('RANK', '(unset: 0)')} WORLD_SIZE={environ['WORLD_SIZE']}")


def _from_slurm(environ, configured_port) -> RankPlacement:
    def step(name):  # the step's own view first: a step may use part of the allocation
        return environ.get(f"SLURM_STEP_{name}") or environ.get(f"SLURM_{name}") or environ.get(f"SLURM_JOB_{name}")

    nodelist, tasks, per_node = step("NODELIST"), step("NUM_TASKS") or environ.get("SLURM_NTASKS"), step("TASKS_PER_NODE")
    if not (nodelist and tasks and per_node):
        raise ConfigError("srun started this rank but SLURM_STEP_NODELIST/SLURM_NTASKS/"
                          "SLURM_TASKS_PER_NODE are missing; launch with srun inside an allocation")
    node_id = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    job_id = int(environ.get("SLURM_JOB_ID", "0") or 0)
    return RankPlacement(
        rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID"),
        world_size=int(tasks), local_world_size=expand_tasks_per_node(per_node)[node_id],
        master_addr=environ.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
        master_port=_port(environ, configured_port, 20000 + job_id % 20000), source="slurm",
        evidence=f"SLURM_PROCID={environ['SLURM_PROCID']} SLURM_LOCALID={environ['SLURM_LOCALID']} "
                 f"tasks={tasks} per node={per_node} nodes={nodelist}")


def _from_openmpi(environ, configured_port) -> RankPlacement:
    if "MASTER_ADDR" not in environ:
        raise ConfigError("mpirun started this rank without MASTER_ADDR; pass "
                          "-x MASTER_ADDR=<first host> to mpirun (deepy.py does)")
    return RankPlacement(
        rank=_int(environ, "OMPI_COMM_WORLD_RANK"), local_rank=_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK"),
        world_size=_int(environ, "OMPI_COMM_WORLD_SIZE"),
        local_world_size=_int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        master_addr=environ["MASTER_ADDR"], master_port=_port(environ, configured_port, DEFAULT_MASTER_PORT),
        source="openmpi", evidence=f"OMPI_COMM_WORLD_RANK={environ['OMPI_COMM_WORLD_RANK']} "
                                   f"OMPI_COMM_WORLD_SIZE={environ['OMPI_COMM_WORLD_SIZE']}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_rank(environ=None, master_port: int | None = None) -> RankPlacement:
    """This process's place in the job, from its launcher's variables (module docstring)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ:
        return _from_launcher(environ, master_port)
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        return _from_slurm(environ, master_port)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _from_openmpi(environ, master_port)
    # A free port: two single-process runs on one machine must not fight over 29500.
    port = _port(environ, master_port, 0) or free_port()
    return RankPlacement(0, 0, 1, 1, environ.get("MASTER_ADDR", "127.0.0.1"), port,
                         "no launcher", "a world of one")


def init_distributed(args) -> None:
    """torch.distributed via DeepSpeed (nccl on GPUs, gloo on CPU); a no-op when already up.

    From ``args``: ``master_port`` and the collective timeout ``distributed_timeout_minutes``.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    placement = discover_rank(master_port=args.master_port)
    placement.export(os.environ)
    print(placement.describe(), flush=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(placement.local_rank)
    from megatron.parallel.extension_locks import check_extension_locks

    # DeepSpeed JIT-builds its CPU comm op here; a killed build's lock would hang us
    check_extension_locks(single_node=placement.world_size == placement.local_world_size)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False, timeout=timedelta(minutes=args.distributed_timeout_minutes))
