"""deepy.py's multi-node launch paths: the rank commands for slurm and OpenMPI, the
hosts they run on, and the environment every rank receives on every path.

pdsh goes through DeepSpeed's runner (megatron/launcher.py). ``launcher: slurm`` and
``launcher: openmpi`` are built here instead: DeepSpeed's runner would ssh to the first
node (a check and ``hostname -I``) before starting srun, and would start each MPI rank
through a helper that gives it no master address. Here srun or mpirun starts
``python train.py`` itself and each rank reads its place from the scheduler's variables
(megatron.parallel.distributed).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shlex
import sys

from megatron.errors import ConfigError
from megatron.parallel.distributed import expand_hostlist, expand_tasks_per_node

# Forwarded to every rank on every path when set in the launching shell (docs/launching.md).
# CUDA_VISIBLE_DEVICES is not: each node's launcher sets it for its own GPUs.
FORWARDED_BY_DEFAULT = (
    "WANDB_*", "HF_*", "HUGGING_FACE_*", "TRANSFORMERS_*", "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_*", "PYTHONPATH", "PYTHONUNBUFFERED",
    "CUDA_*", "NCCL_*", "TORCH_*", "GLOO_*", "UCX_*", "FI_*",
)
NEVER_FORWARDED = ("CUDA_VISIBLE_DEVICES",)


def forwarded_names(extra_patterns=(), environ=None) -> list[str]:
    """Names of the variables in ``environ`` the launch passes to every rank: the default
    set plus the config's ``launcher_env`` names/patterns (``fnmatch``, e.g. ``MY_*``)."""
    environ = os.environ if environ is None else environ
    patterns = (*FORWARDED_BY_DEFAULT, *(extra_patterns or ()))
    return sorted(name for name in environ if name not in NEVER_FORWARDED
                  and any(fnmatch.fnmatchcase(name, p) for p in patterns))


@contextlib.contextmanager
def deepspeed_exports(names):
    """DeepSpeed's pdsh runner exports the variables whose names start with an entry of
    its EXPORT_ENVS (plus ~/.deepspeed_env and ./.deepspeed_env, left untouched): add
    ours for the duration of one launch."""
    from deepspeed.launcher import runner

    saved = list(runner.EXPORT_ENVS)
    runner.EXPORT_ENVS.extend(n for n in names if n not in saved)
    try:
        yield
    finally:
        runner.EXPORT_ENVS[:] = saved


def slurm_allocation_hosts(environ=None) -> dict[str, int]:
    """Hosts of the enclosing slurm allocation and its tasks per node, or {} outside one."""
    environ = os.environ if environ is None else environ
    nodelist, per_node = environ.get("SLURM_JOB_NODELIST"), environ.get("SLURM_TASKS_PER_NODE")
    if not (nodelist and per_node):
        return {}
    return dict(zip(expand_hostlist(nodelist), expand_tasks_per_node(per_node)))


def rank_command(script: str, rank_argv: list[str]) -> list[str]:
    return [sys.executable, "-u", script, *rank_argv]


def srun_command(args, hosts: dict[str, int], script: str, rank_argv: list[str]) -> list[str]:
    """srun starting every rank: one task per slot, the same count on every node."""
    counts = set(hosts.values())
    if len(counts) != 1:
        raise ConfigError(f"launcher: slurm starts the same number of ranks on every node, but "
                          f"the hosts have {dict(hosts)} slots; give every host the same slots")
    cmd = ["srun", f"--nodes={len(hosts)}", f"--ntasks={sum(hosts.values())}",
           f"--ntasks-per-node={counts.pop()}", f"--nodelist={','.join(hosts)}",
           "--export=ALL", "--kill-on-bad-exit=1"]
    if args.comment:
        cmd.append(f"--comment={args.comment}")
    if args.account:
        cmd.append(f"--account={args.account}")
    return cmd + rank_command(script, rank_argv)


def mpirun_command(args, hosts: dict[str, int], script: str, rank_argv: list[str],
                   forwarded: list[str]) -> list[str]:
    """mpirun starting every rank; values travel by name (``-x NAME``), not on its command line."""
    cmd = ["mpirun", "-np", str(sum(hosts.values())),
           "-H", ",".join(f"{host}:{slots}" for host, slots in hosts.items()),
           "--bind-to", "none", "-wdir", os.getcwd(),
           "-x", f"MASTER_ADDR={args.master_addr or next(iter(hosts))}",
           "-x", f"MASTER_PORT={args.master_port}"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for name in forwarded:
        cmd += ["-x", name]
    return cmd + rank_command(script, rank_argv)


def describe(cmd: list[str]) -> str:
    """The command for the log, without the encoded config."""
    shown = [a if len(a) < 200 else "<config>" for a in cmd]
    return shlex.join(shown)
