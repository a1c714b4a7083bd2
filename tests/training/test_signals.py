"""SIGTERM to the deepy.py launcher of a 2-rank torchrun run: the ranks save one
checkpoint together, the launcher waits for them and exits 0, and nothing survives."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from test_resume import ROOT, TINY, tiny_overrides


def _wait_for_steps(metrics, steps, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"{metrics} did not reach {steps} steps in {timeout} s")


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_launcher_saves_on_every_rank_and_leaves_no_process(tmp_path):
    overrides = tiny_overrides(tmp_path, num_gpus=2, train_iters=100000, lr_decay_iters=100000,
                               checkpoint_factor=10**6, log_interval=1)
    cmd = [sys.executable, str(ROOT / "deepy.py"), str(ROOT / "train.py"), TINY,
           "--override", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    # Rank variables inherited from an enclosing job must not make the launcher or torchrun
    # look like ranks (they would get the SIGTERM and end the run with an error).
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_steps(tmp_path / "logs" / "metrics.jsonl", 2, proc)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 3  # torchrun and its two ranks
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    save = tmp_path / "full"
    tag = (save / "latest").read_text()
    assert int(tag.removeprefix("global_step")) >= 2
    assert sorted(p.name for p in (save / tag).glob("rank_*_extra_state.pt")) == [
        "rank_00000_extra_state.pt", "rank_00001_extra_state.pt"]
    time.sleep(1)
    assert [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert "asking 2 rank(s) to save" in (tmp_path / "launcher.log").read_text()
