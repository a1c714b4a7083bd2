"""Every way a run ends leaves no process behind and gives the right exit status.

Pipeline runs through deepy.py with the default num_workers (2 DataLoader readers per
rank): after the last step (one rank, in deepy's own process: the cheapest launch), and
on 2 stages through torchrun (deepy -> torchrun -> 2 ranks -> 2 readers each) after
SIGTERM to the launcher (the ranks save one checkpoint together), after a one-line error
on every rank (divergence), after an unexpected exception on one rank, and after one rank
stops answering (SIGSTOP: its peer's watchdog names it and ends the job). The launcher
must exit by itself within ENDING_BOUND_S of the last metrics line, with the ranks'
status, and take every process it started with it.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from test_resume import ROOT, TINY, tiny_overrides

RUN_MARK = "NEOX_ENDING_TEST_RUN"  # inherited by every process of a run, readers included
ENDING_BOUND_S = 90  # generous for a loaded 2-core box; a run that does not end never does
RUN_TIMEOUT_S = 400

# Run as the launched script (named train.py, so deepy's checks still run): rank 1 raises
# at its third step while rank 0 waits for it inside the pipeline's send/receive.
CRASH_ON_RANK_1 = f"""
import os, runpy
from megatron.training import loop

train_step = loop.train_step

def crash_on_rank_1(trainer, batches, iteration, *args, **kwargs):
    if iteration == 2 and os.environ["RANK"] == "1":
        raise RuntimeError("injected fault on rank 1")
    return train_step(trainer, batches, iteration, *args, **kwargs)

loop.train_step = crash_on_rank_1
runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")
"""


def _launch(tmp_path, ending, ranks):
    overrides = tiny_overrides(tmp_path, num_gpus=ranks, pipe_parallel_size=ranks, train_iters=4,
                               lr_decay_iters=4, checkpoint_factor=10**6, log_interval=1)
    script = ROOT / "train.py"
    if ending in ("preemption", "hung_rank"):
        overrides.update(train_iters=100000, lr_decay_iters=100000, peer_heartbeat_timeout_seconds=6)
    elif ending == "one_line_error":
        # finite (the config refuses .inf), but the gradient norm overflows once L2E
        # scores (step 2): the first non-finite step ends the run
        overrides.update(nan_tolerance=1, l2e={**overrides["l2e"], "loss_weight": 1e38})
    elif ending == "crash":
        script = tmp_path / "train.py"
        script.write_text(CRASH_ON_RANK_1)
    cmd = [sys.executable, str(ROOT / "deepy.py"), str(script), TINY,
           "--override", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    # Rank variables inherited from an enclosing job must not make the launcher or torchrun
    # look like ranks (they would get the SIGTERM and end the run with an error).
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               WANDB_MODE="disabled", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", **{RUN_MARK: str(tmp_path)})
    log = open(tmp_path / "launcher.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _steps_logged(metrics) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _silent_for(metrics, seconds) -> bool:
    return metrics.exists() and time.time() - metrics.stat().st_mtime > seconds


def _stop_rank_1(proc):
    import megatron.processes

    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if megatron.processes.is_rank(p) and p.environ()["RANK"] == "1"]
    assert len(ranks) == 1, ranks
    ranks[0].suspend()


STOPS = {"preemption": lambda proc: proc.send_signal(signal.SIGTERM), "hung_rank": _stop_rank_1}


def _run_to_its_end(proc, metrics, stop=None) -> dict:
    """Wait for the launcher to exit, calling ``stop(proc)`` once two steps are logged;
    returns every process it started (pid -> psutil.Process) seen meanwhile."""
    family = {}
    deadline = time.time() + RUN_TIMEOUT_S
    while proc.poll() is None and time.time() < deadline and not _silent_for(metrics, ENDING_BOUND_S):
        try:
            family.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            break
        if stop and _steps_logged(metrics) >= 2:
            stop(proc)
            stop = None
        time.sleep(0.25)
    return family


def processes_marked(variable: str, value: str) -> list[str]:
    """Live processes on this machine whose environment has ``variable=value``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get(variable) == value:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or ())[:160]}")
        except psutil.Error:
            continue
    return found


def survivors(variable: str, value: str, grace_s: float = 15) -> list[str]:
    """Processes of a run still there after ``grace_s`` (readers die with their rank by a
    kernel signal, a moment after it)."""
    deadline = time.time() + grace_s
    while processes_marked(variable, value) and time.time() < deadline:
        time.sleep(0.5)
    return processes_marked(variable, value)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ending,ranks,status", [("last_step", 1, 0), ("preemption", 2, 0),
                                                 ("one_line_error", 2, 2), ("crash", 2, 1), ("hung_rank", 2, 1)])
def test_every_ending_leaves_no_process_and_exits_with_the_ranks_status(tmp_path, ending, ranks, status):
    metrics = tmp_path / "logs" / "metrics.jsonl"
    proc = _launch(tmp_path, ending, ranks)
    family = {}
    try:
        family = _run_to_its_end(proc, metrics, STOPS.get(ending))
        ended = time.time()
        output = (tmp_path / "launcher.log").read_text()
        assert proc.poll() is not None, f"the launcher did not end:\n{output[-3000:]}"
        assert proc.returncode == status, output[-3000:]
        assert ended - metrics.stat().st_mtime < ENDING_BOUND_S, f"ended {ended - metrics.stat().st_mtime:.0f} s after its last line"
        assert len(family) >= (1 if ranks == 1 else 3), sorted(family)  # readers; or torchrun and 2 ranks
        assert survivors(RUN_MARK, str(tmp_path)) == []
    finally:
        for leftover in [*family.values(), psutil.Process(proc.pid)] if proc.poll() is None else family.values():
            try:
                leftover.kill()
            except psutil.Error:
                pass
    save = tmp_path / "full"
    if ending == "last_step":
        assert (save / "latest").read_text() == "global_step4" and _steps_logged(metrics) == 4
    elif ending == "preemption":
        assert "deepy: SIGTERM: asking the ranks to save a checkpoint and exit (2 signalled here" in output
        tag = (save / "latest").read_text()
        assert int(tag.removeprefix("global_step")) >= 2
        assert sorted(p.name for p in (save / tag).glob("rank_*_extra_state.pt")) == [
            "rank_00000_extra_state.pt", "rank_00001_extra_state.pt"]
    elif ending == "one_line_error":
        errors = {line for line in output.splitlines() if line.startswith("error:")}
        assert len(errors) == 1 and "training diverged" in errors.pop()  # the same line from each rank
        assert "Traceback" not in output
    elif ending == "crash":
        assert "RuntimeError: injected fault on rank 1" in output
    else:
        assert f"error: rank 1 on {os.uname().nodename} has not answered for" in output


@pytest.mark.parametrize("kept", [True, False])
def test_a_rank_outlives_the_reader_of_its_output(tmp_path, kept):
    # pdsh/ssh, srun or mpirun carry a rank's output; if the carrier dies first, a rank
    # stopping to save must still save (and exit 0), not die of BrokenPipeError.
    saved = tmp_path / "saved"
    code = ("import pathlib, sys\n"
            "from megatron.processes import keep_running_without_output\n"
            f"{'keep_running_without_output()' if kept else ''}\n"
            "for _ in range(100):\n"
            "    print('x' * 1000, flush=True)\n"
            "    print('y', file=sys.stderr)\n"
            "pathlib.Path(sys.argv[1]).write_text('saved')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(saved)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    proc.stdout.close()
    proc.stderr.close()
    status = proc.wait(timeout=60)
    assert (status == 0 and saved.read_text() == "saved") if kept else (status != 0 and not saved.exists())
