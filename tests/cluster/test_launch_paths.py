"""Every multi-node launch path starts real ranks on the simulated cluster and trains the
design card's layout (3 nodes, one pipeline stage each, L2E on the middle stage) to the
same per-step losses as that layout on one node; 2 nodes x 2 ranks (pp 2 x dp 2) too.

Cost (2 cores): each launch is ~40-60 s of process start-up, so each layout runs once
per path that has its own rank discovery, not every layout on every path:

    path               3-node pp 3 + L2E              2 nodes x 2 ranks
    deepy + pdsh       from scratch (checkpoint 2,4)  -
    deepy, slurm       from scratch (hostfile)        sbatch script (allocation)
    deepy, openmpi     from scratch                   -
    srun train.py      resumes pdsh's step 2          -
    torchrun train.py  from scratch                   -

The srun-only run resumes the checkpoint the pdsh run wrote across nodes, so it checks a
resume across nodes as well as its own launch (its steps 3-4 against the reference).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron.launcher import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.distributed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/cluster/pipeline.yml"
LAUNCH_TIMEOUT = 300  # seconds; a launch that takes longer fails the test
EXIT_GRACE = 15       # seconds for every rank process to be gone after its launcher exits
RANK_LINE = re.compile(r"rank (\d+)/(\d+) \(local (\d+)/(\d+)\) from ([a-z ]+):")
TAG_VARIABLE = "NEOX_CLUSTER_TEST_RUN"  # forwarded through launcher_env: finds a run's processes


class Run:
    """One training launch: its directory, its tag, and what it left behind."""

    def __init__(self, cluster, root: Path, name: str):
        self.cluster, self.dir, self.tag = cluster, root / name, f"{name}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)

    def overrides(self, **extra) -> list[str]:
        # A free port: 29500 may be taken by another job on a shared machine.
        values = {"log_dir": str(self.dir / "logs"), "save": str(self.dir / "ckpt"),
                  "launcher_env": f"[{TAG_VARIABLE}]", "master_port": free_port(), **extra}
        return ["--override", *(f"{k}={v}" for k, v in values.items())]

    def env(self, **extra) -> dict:
        # A secret-looking variable from the default set: forwarded by name, never printed.
        return self.cluster.env(**{TAG_VARIABLE: self.tag, "WANDB_API_KEY": f"secret-{self.tag}"}, **extra)

    def launch(self, cmd: list[str], env: dict | None = None) -> str:
        try:
            result = self.cluster.run(cmd, timeout=LAUNCH_TIMEOUT, env=env or self.env())
        finally:
            self.assert_no_process_left()
        (self.dir / "output.txt").write_text(result.stdout)
        assert result.returncode == 0, f"{cmd[:3]} exited {result.returncode}:\n{result.stdout[-6000:]}"
        return result.stdout

    def assert_no_process_left(self):
        """Every process of the run, on every node, is gone soon after its launcher; what
        is left is killed (so a failure does not slow the next test) and fails the test."""
        deadline = time.monotonic() + EXIT_GRACE
        while (left := processes_tagged(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"still running {EXIT_GRACE} s after the launcher exited: {left}"

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.dir / "logs" / "metrics.jsonl").read_text().splitlines()]

    def losses(self) -> dict[int, float]:
        return {row["iteration"]: row["train/lm_loss"] for row in self.metrics() if "train/lm_loss" in row}


def processes_tagged(tag: str) -> list[int]:
    """PIDs of the processes (on any simulated node: all share this machine) carrying the
    run's tag in their environment."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get(TAG_VARIABLE) == tag:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def rank_sources(output: str, world_size: int) -> set[str]:
    """Each rank printed exactly one startup line; the sources they named."""
    lines = [m.groups() for m in RANK_LINE.finditer(output)]
    assert sorted(int(rank) for rank, *_ in lines) == list(range(world_size)), output[-4000:]
    assert {int(world) for _, world, *_ in lines} == {world_size}
    return {source for *_, source in lines}


def deepy(run: Run, hostfile: Path | None, **overrides) -> list[str]:
    cmd = [sys.executable, "deepy.py", "train.py", CONFIG]
    if hostfile is not None:
        cmd += ["-H", str(hostfile)]
    return cmd + run.overrides(**overrides)


def assert_same_losses(run: Run, reference: dict[int, float], steps=(1, 2, 3, 4)):
    got = run.losses()
    assert sorted(got) == list(steps), got
    assert {s: got[s] for s in steps} == {s: reference[s] for s in steps}


# ---------------------------------------------------------------- one-node references

@pytest.fixture(scope="session")
def cluster_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster_runs")


@pytest.fixture(scope="session")
def reference_pp3(cluster, cluster_runs):
    """The 3-stage layout on one node (deepy -> torchrun, 3 CPU ranks)."""
    run = Run(cluster, cluster_runs, "one_node_pp3")
    run.launch(deepy(run, None, num_gpus=3))
    return run.losses()


@pytest.fixture(scope="session")
def reference_pp2_dp2(cluster, cluster_runs):
    run = Run(cluster, cluster_runs, "one_node_pp2_dp2")
    run.launch(deepy(run, None, num_gpus=4, pipe_parallel_size=2))
    return run.losses()


@pytest.fixture(scope="session")
def pdsh_pp3(cluster, cluster_runs):
    run = Run(cluster, cluster_runs, "pdsh_pp3")
    hostfile = cluster.hostfile(run.dir, {node: 1 for node in cluster.nodes})
    output = run.launch(deepy(run, hostfile, master_addr="node1"))
    return run, output


# ---------------------------------------------------------------- the five paths

def test_pdsh_hostfile_pipeline_matches_one_node(pdsh_pp3, reference_pp3):
    run, output = pdsh_pp3
    assert rank_sources(output, 3) == {"deepspeed"}  # DeepSpeed's launch.py on each node
    assert all(m.group(4) == "1" for m in RANK_LINE.finditer(output))  # one rank per node
    assert {line.split(":")[0] for line in output.splitlines() if RANK_LINE.search(line)} == {
        "node1", "node2", "node3"}
    assert_same_losses(run, reference_pp3)
    # L2E acted on the middle stage (after its 3 exact warm-up steps, from the threshold).
    last = run.metrics()[-1]
    assert last["l2e/selected_frac/layer_1"] > 0 and last["train/l2e_loss"] != 0
    summary_names = output[output.index("environment forwarded to every rank"):]
    assert TAG_VARIABLE in summary_names and "WANDB_API_KEY" in summary_names


def test_slurm_launcher_pipeline_matches_one_node_without_ssh(cluster, cluster_runs, reference_pp3):
    run = Run(cluster, cluster_runs, "slurm_pp3")
    hostfile = cluster.hostfile(run.dir, {node: 1 for node in cluster.nodes})
    # No ssh at all: a PATH whose ssh fails proves deepy never calls it on this path.
    no_ssh = run.dir / "no_ssh"
    no_ssh.mkdir()
    (no_ssh / "ssh").write_text("#!/bin/sh\necho 'ssh was called' >&2\nexit 255\n")
    (no_ssh / "ssh").chmod(0o755)
    env = run.env()
    env["PATH"] = f"{no_ssh}:{env['PATH']}"
    output = run.launch(deepy(run, hostfile, launcher="slurm"), env=env)
    assert rank_sources(output, 3) == {"slurm"} and "ssh was called" not in output
    assert_same_losses(run, reference_pp3)
    assert f"secret-{run.tag}" not in output


def test_sbatch_script_two_ranks_per_node_matches_one_node(cluster, cluster_runs, reference_pp2_dp2):
    """docs/launching.md's sbatch recipe: deepy in the batch script, nodes and tasks per
    node from the allocation (no hostfile)."""
    run = Run(cluster, cluster_runs, "sbatch_pp2_dp2")
    script = run.dir / "job.sh"
    deepy_cmd = shlex.join(deepy(run, None, launcher="slurm", pipe_parallel_size=2))
    script.write_text(f"#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=2\ncd {REPO_ROOT}\n{deepy_cmd}\n")
    log = run.dir / "job.out"
    run.launch(["sbatch", "--wait", f"--output={log}", str(script)])
    output = log.read_text()
    lines = [m.groups() for m in RANK_LINE.finditer(output)]
    assert sorted((int(r), int(local), int(per_node)) for r, _, local, per_node, _ in lines) == [
        (0, 0, 2), (1, 1, 2), (2, 0, 2), (3, 1, 2)], output[-4000:]
    assert rank_sources(output, 4) == {"slurm"}
    assert_same_losses(run, reference_pp2_dp2)


def test_openmpi_launcher_pipeline_matches_one_node(cluster, cluster_runs, reference_pp3):
    run = Run(cluster, cluster_runs, "openmpi_pp3")
    hostfile = cluster.hostfile(run.dir, {node: 1 for node in cluster.nodes})
    output = run.launch(deepy(run, hostfile, launcher="openmpi"))
    assert rank_sources(output, 3) == {"openmpi"}
    assert_same_losses(run, reference_pp3)
    assert f"secret-{run.tag}" not in output


def test_srun_only_resumes_the_pdsh_checkpoint_across_nodes(cluster, cluster_runs, pdsh_pp3, reference_pp3):
    pdsh_run, _ = pdsh_pp3
    run = Run(cluster, cluster_runs, "srun_only_resume")
    cmd = ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
           sys.executable, "-u", "train.py", CONFIG, "--load", str(pdsh_run.dir / "ckpt"),
           "--iteration", "2", *run.overrides()]
    output = run.launch(cmd)
    assert rank_sources(output, 3) == {"slurm"}
    assert_same_losses(run, reference_pp3, steps=(3, 4))


def test_torchrun_only_pipeline_matches_one_node(cluster, cluster_runs, reference_pp3):
    run = Run(cluster, cluster_runs, "torchrun_only_pp3")
    env = run.env()
    exports = " ".join(f"{k}={env[k]}" for k in ("PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS",
                                                 "PYTHONUNBUFFERED", TAG_VARIABLE, "WANDB_MODE"))
    # What a user types on node K (here on all three at once through pdsh, %n = K).
    torchrun = (f"cd {REPO_ROOT} && env {exports} {sys.executable} -m torch.distributed.run "
                f"--nnodes 3 --node_rank %n --nproc_per_node 1 --master_addr node1 "
                f"--master_port {free_port()} train.py {CONFIG} {shlex.join(run.overrides())}")
    output = run.launch(["pdsh", "-R", "ssh", "-w", ",".join(cluster.nodes), torchrun], env=env)
    assert rank_sources(output, 3) == {"torchrun"}
    assert_same_losses(run, reference_pp3)
