"""The simulated cluster (simcluster.py) as a session fixture, and helpers for its tests.

    def test_x(cluster):                       # skipped unless root on Linux
        cluster.on_node("node2", "hostname")
        cluster.hostfile(tmp_path, {"node1": 2, "node2": 2})
        result = cluster.run(["srun", ...], timeout=120)   # its process group dies on timeout
        assert not cluster.processes_mentioning(str(tmp_path))

The cluster is brought up once per session and torn down at its end, unless it was
already up (e.g. started by .ci/run), which then owns its teardown.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.launcher import RANK_VARIABLES

sys.path.insert(0, str(Path(__file__).parent))
import simcluster  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


class Cluster:
    nodes = simcluster.NODES

    def env(self, **extra) -> dict:
        """A launching process's environment: slurm found, this checkout first on the path."""
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        # An earlier in-process run in this pytest process leaves RANK/WORLD_SIZE behind; a
        # shell launching a job has none (a rank reads them before slurm's or MPI's).
        inherited = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        return dict(inherited, **simcluster.slurm_environment(), PYTHONPATH=path,
                    DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)

    def on_node(self, node: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return simcluster.on_node(node, command, timeout=timeout)

    @staticmethod
    def hostfile(directory: Path, slots: dict[str, int]) -> Path:
        path = Path(directory) / "hostfile"
        path.write_text("".join(f"{node} slots={n}\n" for node, n in slots.items()))
        return path

    def run(self, cmd: list[str], timeout: float, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run a launcher in its own process group; on timeout kill the group and fail."""
        proc = subprocess.Popen(cmd, env=env or self.env(), cwd=kwargs.pop("cwd", REPO_ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{cmd[0]} did not exit within {timeout} s:\n{out[-4000:]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")

    @staticmethod
    def processes_mentioning(text: str) -> list[str]:
        """Live processes (on any node: they all share this machine) whose command line
        contains ``text``: a run's leftovers, when ``text`` is unique to the run."""
        import psutil

        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(proc.info["cmdline"] or ())
            if text in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                found.append(f"{proc.pid}: {cmdline[:200]}")
        return found


@pytest.fixture(scope="session")
def cluster():
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the simulated cluster needs root on Linux (.ci/run provides it)")
    started_here = not simcluster.is_up()
    try:
        simcluster.up()
    except (simcluster.ClusterUnavailable, OSError, subprocess.CalledProcessError) as e:
        if started_here:
            simcluster.down()  # what did start
        pytest.skip(f"the simulated cluster cannot start here: {e}")
    yield Cluster()
    if started_here:
        simcluster.down()
