"""Rank discovery from each launcher's variables, and deepy's srun/mpirun commands and
forwarded environment (the real launches: tests/cluster)."""
import os

import pytest

from megatron.config import ConfigError, NeoXArgs
from megatron.multinode import (
    deepspeed_exports,
    forwarded_names,
    mpirun_command,
    slurm_allocation_hosts,
    srun_command,
)
from megatron.parallel.distributed import discover_rank, expand_hostlist, expand_tasks_per_node

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny.yml")
SRUN_TASK = {  # rank 3 of `srun -N2 --ntasks-per-node=2` in job 4321
    "SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)",
}


def test_slurm_hostlists_and_task_counts_expand():
    assert expand_hostlist("gpu[07-09,12],login1,n[1-2]x") == [
        "gpu07", "gpu08", "gpu09", "gpu12", "login1", "n1x", "n2x"]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_srun_task_learns_its_rank_from_slurm():
    placed = discover_rank(SRUN_TASK)
    assert (placed.rank, placed.local_rank, placed.world_size, placed.local_world_size) == (3, 1, 4, 2)
    assert placed.master_addr == "gpu07" and placed.source == "slurm"
    assert placed.master_port == discover_rank(dict(SRUN_TASK, SLURM_PROCID="0")).master_port
    assert placed.master_port != discover_rank(dict(SRUN_TASK, SLURM_JOB_ID="4322")).master_port
    assert discover_rank(SRUN_TASK, master_port=1234).master_port == 1234
    assert discover_rank(dict(SRUN_TASK, MASTER_PORT="999")).master_port == 999
    assert "SLURM_PROCID=3" in placed.describe() and "gpu07" in placed.describe()


def test_batch_script_itself_is_not_a_rank_and_torchrun_wins_over_slurm():
    batch_shell = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert discover_rank(dict(batch_shell, SLURM_PROCID="0")).world_size == 1
    torchrun_in_srun = dict(SRUN_TASK, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1",
                            MASTER_ADDR="gpu07", MASTER_PORT="29501", TORCHELASTIC_RUN_ID="x")
    placed = discover_rank(torchrun_in_srun)
    assert (placed.rank, placed.world_size, placed.source) == (5, 8, "torchrun")


def test_deepspeed_launch_rank_reads_its_local_size():
    launched = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    placed = discover_rank(launched)
    assert (placed.rank, placed.local_rank, placed.local_world_size, placed.source) == (3, 1, 2, "deepspeed")


def test_openmpi_rank_needs_the_exported_master_address():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ConfigError, match="-x MASTER_ADDR"):
        discover_rank(ompi)
    placed = discover_rank(dict(ompi, MASTER_ADDR="node1", MASTER_PORT="29600"))
    assert (placed.rank, placed.world_size, placed.master_addr, placed.master_port) == (2, 4, "node1", 29600)


def test_bad_rank_variable_is_a_one_line_error():
    with pytest.raises(ConfigError, match="SLURM_PROCID='x'"):
        discover_rank(dict(SRUN_TASK, SLURM_PROCID="x"))


def test_forwarded_environment_is_the_default_set_plus_the_config_patterns():
    environ = {"WANDB_API_KEY": "k", "HF_TOKEN": "t", "OMP_NUM_THREADS": "1", "HOME": "/root",
               "CUDA_VISIBLE_DEVICES": "0", "MY_SECRET": "s", "AWS_REGION": "r"}
    assert forwarded_names(environ=environ) == ["HF_TOKEN", "OMP_NUM_THREADS", "WANDB_API_KEY"]
    assert forwarded_names(["MY_SECRET", "AWS_*"], environ) == [
        "AWS_REGION", "HF_TOKEN", "MY_SECRET", "OMP_NUM_THREADS", "WANDB_API_KEY"]


def test_deepspeed_runner_exports_the_forwarded_names_for_one_launch_only():
    from deepspeed.launcher import runner

    before = list(runner.EXPORT_ENVS)
    with deepspeed_exports(["WANDB_API_KEY", "PYTHON"]):
        assert "WANDB_API_KEY" in runner.EXPORT_ENVS
        assert runner.EXPORT_ENVS.count("PYTHON") == 1
    assert runner.EXPORT_ENVS == before


def test_srun_and_mpirun_commands_start_one_task_per_slot(monkeypatch):
    args = NeoXArgs.from_ymls([TINY], overrides={"launcher": "slurm", "comment": "pythia run"})
    cmd = srun_command(args, {"node1": 2, "node2": 2}, "train.py", ["--neox_config", "B64"])
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2",
                       "--nodelist=node1,node2", "--export=ALL"]
    assert "--comment=pythia run" in cmd and cmd[-3:] == ["train.py", "--neox_config", "B64"]
    with pytest.raises(ConfigError, match="same number of ranks"):
        srun_command(args, {"node1": 2, "node2": 1}, "train.py", [])

    monkeypatch.setenv("HF_TOKEN", "secret-value")
    cmd = mpirun_command(args, {"node2": 1, "node3": 1}, "train.py", [], forwarded_names())
    assert cmd[cmd.index("-H") + 1] == "node2:1,node3:1" and "MASTER_ADDR=node2" in cmd
    assert cmd[cmd.index("HF_TOKEN") - 1] == "-x" and not any("secret-value" in a for a in cmd)


def test_slurm_allocation_gives_hosts_and_tasks_per_node():
    assert slurm_allocation_hosts(SRUN_TASK) == {"gpu07": 2, "gpu08": 2}
    assert slurm_allocation_hosts({}) == {}


TIMEOUT_PROBE = """
from megatron.config import NeoXArgs
from megatron.parallel.distributed import init_distributed
import torch, torch.distributed as dist
args = NeoXArgs.from_ymls([{config!r}], overrides={{"distributed_timeout_minutes": 3}})
init_distributed(args)
print("timeout", dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout)
"""


@pytest.mark.slow  # a fresh interpreter imports torch and DeepSpeed
def test_process_group_gets_the_configured_collective_timeout():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", TIMEOUT_PROBE.format(config=TINY)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    startup = [line for line in lines if line.startswith("rank ")]
    assert len(startup) == 1 and "rank 0/1 (local 0/1) from no launcher" in startup[0]
    assert "timeout 0:03:00" in lines
