"""Stopping a multi-node job on the simulated cluster: the stop signal reaches every rank
on every node, they save one checkpoint together, the launcher waits for them and exits
0, and nothing of the job is left on any node.

Every process of a job is found by a variable set in the launching shell and forwarded to
every rank (``launcher_env``), so the check covers deepy, pdsh/srun/mpirun, ssh, the
per-node launchers, the ranks and their DataLoader readers.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from megatron.launcher import free_port

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "training"))
from test_endings import survivors  # noqa: E402
from test_resume import ROOT, TINY, tiny_overrides  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.distributed, pytest.mark.slow]
JOB_MARK = "NEOX_STOP_TEST_JOB"
STOP_BOUND_S = 120


def _wait_for_steps(metrics, steps, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the job ended before it was stopped"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"{metrics} did not reach {steps} steps in {timeout} s")


def _assert_stopped_and_saved(tmp_path, proc, output):
    try:
        status = proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the launcher did not exit within {STOP_BOUND_S} s:\n{output.read_text()[-3000:]}")
    assert status == 0, output.read_text()[-3000:]
    save = tmp_path / "full"
    tag = (save / "latest").read_text()
    assert int(tag.removeprefix("global_step")) >= 2
    assert sorted(p.name for p in (save / tag).glob("rank_*_extra_state.pt")) == [
        "rank_00000_extra_state.pt", "rank_00001_extra_state.pt"]
    assert survivors(JOB_MARK, str(tmp_path)) == []


def _deepy_command(tmp_path, hostfile=None, **extra) -> list[str]:
    # a free port: 29500 may be taken by another job on a shared machine
    overrides = tiny_overrides(tmp_path, pipe_parallel_size=2, train_iters=100000, lr_decay_iters=100000,
                               checkpoint_factor=10**6, log_interval=1, launcher_env=[JOB_MARK],
                               master_port=free_port(), **extra)
    return [sys.executable, str(ROOT / "deepy.py"), "train.py", TINY, *(["-H", str(hostfile)] if hostfile else []),
            "--override", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]


def _start_job(cluster, tmp_path, cmd):
    """``cmd`` in its own session (so a failed test can kill all of it), output in job.log."""
    output = tmp_path / "job.log"
    with open(output, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env(**{JOB_MARK: str(tmp_path)}), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, output


def _stop_after_two_steps(cluster, tmp_path, cmd, stop) -> str:
    """Start ``cmd``, call ``stop(proc)`` once two steps are logged; the job's output."""
    proc, output = _start_job(cluster, tmp_path, cmd)
    try:
        _wait_for_steps(tmp_path / "logs" / "metrics.jsonl", 2, proc)
        stop(proc)
        _assert_stopped_and_saved(tmp_path, proc, output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return output.read_text()


def test_sigterm_to_deepy_on_pdsh_saves_on_every_node(cluster, tmp_path):
    """DeepSpeed's pdsh runner would kill pdsh at once (cutting the ranks' output, so a rank
    printing every step died before saving) and exit 1 after a second."""
    hostfile = cluster.hostfile(tmp_path, {"node1": 1, "node2": 1})
    text = _stop_after_two_steps(cluster, tmp_path, _deepy_command(tmp_path, hostfile),
                                 lambda proc: proc.send_signal(signal.SIGTERM))
    assert "asking the ranks on 2 node(s) to save" in text
    # the simulated nodes share one machine, so each node's request finds both ranks
    assert "SIGUSR1 to rank 0 " in text and "SIGUSR1 to rank 1 " in text


def test_scancel_batch_term_to_deepy_on_slurm_saves_on_every_node(cluster, tmp_path):
    """docs/launching.md's recipe: ``exec`` deepy in the batch script, ``--signal=B:TERM``
    (here sent at once by scancel): deepy passes SIGUSR1 to srun, which passes it to every
    rank (srun would kill the ranks 30 s after a SIGTERM)."""
    script = tmp_path / "job.sh"
    deepy = " ".join(f"'{a}'" for a in _deepy_command(tmp_path, launcher="slurm"))
    script.write_text(f"#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1\ncd {ROOT}\nexec {deepy}\n")
    name = f"neox-stop-{uuid.uuid4().hex[:8]}"
    sbatch = ["sbatch", "--wait", f"--job-name={name}", f"--output={tmp_path / 'batch.log'}", str(script)]

    def scancel(proc):
        job = subprocess.run(["squeue", "--noheader", "--format=%i", f"--name={name}"],
                             env=cluster.env(), capture_output=True, text=True, check=True).stdout.split()
        assert len(job) == 1, job
        subprocess.run(["scancel", "--signal=TERM", "--batch", job[0]], env=cluster.env(), check=True)

    _stop_after_two_steps(cluster, tmp_path, sbatch, scancel)
    text = (tmp_path / "batch.log").read_text()
    assert "deepy: SIGTERM: asking the ranks to save" in text
    assert text.count("received SIGUSR1: will save a checkpoint") == 2


def test_sigterm_to_deepy_on_openmpi_saves_on_every_node(cluster, tmp_path):
    """deepy passes SIGUSR1 to mpirun, which hands it to every rank (on SIGTERM mpirun
    kills the ranks within a second)."""
    hostfile = cluster.hostfile(tmp_path, {"node2": 1, "node3": 1})
    text = _stop_after_two_steps(cluster, tmp_path, _deepy_command(tmp_path, hostfile, launcher="openmpi"),
                                 lambda proc: proc.send_signal(signal.SIGTERM))
    assert "mpirun: Forwarding signal 10 to job" in text
    assert text.count("received SIGUSR1: will save a checkpoint") == 2


def test_a_stopped_rank_ends_the_slurm_job_naming_it(cluster, tmp_path):
    """SIGSTOP to one rank: its peer's watchdog names it within peer_heartbeat_timeout_seconds
    and exits 1, srun ends the job (--kill-on-bad-exit), and deepy exits non-zero."""
    hostfile = cluster.hostfile(tmp_path, {"node1": 1, "node2": 1})
    cmd = _deepy_command(tmp_path, hostfile, launcher="slurm", peer_heartbeat_timeout_seconds=6)
    proc, output = _start_job(cluster, tmp_path, cmd)
    try:
        _wait_for_steps(tmp_path / "logs" / "metrics.jsonl", 2, proc)
        rank_1 = [p for p in psutil.process_iter() if _is_job_rank(p, str(tmp_path), "1")]
        assert len(rank_1) == 1, rank_1
        rank_1[0].suspend()
        status = proc.wait(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.read_text()
    assert status != 0, text[-3000:]
    assert "error: rank 1 on " in text and "has not answered for" in text, text[-3000:]
    assert survivors(JOB_MARK, str(tmp_path)) == []


def _is_job_rank(proc, job: str, slurm_procid: str) -> bool:
    """srun's task ``slurm_procid`` of ``job``: not one of its DataLoader readers (its children)."""
    try:
        environ = proc.environ()
        return (environ.get(JOB_MARK) == job and environ.get("SLURM_PROCID") == slurm_procid
                and "train.py" in proc.cmdline() and "train.py" not in proc.parent().cmdline())
    except psutil.Error:
        return False
