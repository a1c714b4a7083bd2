"""The save directory is one run's: divergence keeps (and names) the newest trustworthy
checkpoint, a second writer is refused while a killed one is taken over, and no run
replaces checkpoints that already exist unless told to."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import run_distributed
from megatron.launcher import free_port
from test_resume import ROOT, TINY, tiny_overrides

ENV = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def _env() -> dict:
    """A world of one on its own port (other runs may hold the default one)."""
    return dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
WAIT_S = 240  # bound on any one process here: a hang fails the test instead of blocking CI


def _steps(save: Path) -> list[str]:
    return sorted((p.name for p in save.iterdir() if p.name.startswith("global_step")),
                  key=lambda name: int(name[len("global_step"):]))


def _pretrain_each(rank, world_size, runs):
    """pretrain() every override dict in turn; a UserError is returned as its message."""
    from megatron.config import NeoXArgs
    from megatron.errors import UserError
    from megatron.training import pretrain

    out = []
    for overrides in runs:
        try:
            out.append(pretrain(NeoXArgs.from_ymls([TINY], overrides=overrides)))
        except UserError as e:
            out.append(str(e))
    return out


def _adam(lr):
    return {"type": "Adam", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1.0e-8}}


@pytest.mark.slow
def test_divergence_keeps_names_and_resumes_from_the_last_trustworthy_checkpoint(tmp_path):
    save = tmp_path / "full"
    good = tiny_overrides(tmp_path, checkpoint_factor=10, log_interval=10)
    # lr 1000 from the healthy step 10: step 11 wrecks the weights, every later step is
    # skipped as non-finite, and checkpoints keep coming every 2 steps (finite, garbage).
    diverge = tiny_overrides(tmp_path, load=str(save), checkpoint_factor=2, keep_last_n_checkpoints=2, nan_tolerance=4,
                             train_iters=20, lr_decay_iters=20, override_lr_scheduler=True, optimizer=_adam(1000.0))
    # the garbage global_step14 is replaced on purpose
    resume = tiny_overrides(tmp_path, load=str(save), iteration=10, train_iters=14, log_interval=1,
                            overwrite_checkpoints=True)
    (results,) = run_distributed(_pretrain_each, world_size=1, args=([good, diverge, resume],), init_deepspeed=True,
                                 timeout=600)
    error = results[1]
    assert isinstance(error, str) and error.startswith("training diverged"), error
    assert f"the last good checkpoint is {save / 'global_step10'}" in error
    verdicts = json.loads((save / "checkpoint_health.json").read_text())
    assert verdicts["global_step10"]["healthy"] and verdicts["global_step10"]["next_step_ok"]
    assert not verdicts["global_step12"]["healthy"] and "non-finite" in verdicts["global_step12"]["problems"][0]
    assert "iteration 15" in error  # 4 non-finite steps after the one that wrecked the weights
    kept = _steps(save)
    assert kept == ["global_step10", "global_step12", "global_step14"]  # the last two + the trustworthy one
    assert (save / "latest").read_text() == kept[-1] != "global_step10"
    losses = results[2]["lm_loss"]  # resumed from global_step10 at the config's lr
    assert len(losses) == 4 and all(abs(x - results[0]["lm_loss"][-1]) < 1.0 for x in losses), losses
    assert json.loads((save / "checkpoint_health.json").read_text())["global_step14"]["healthy"]


def test_loss_spike_and_nonfinite_steps_make_a_checkpoint_untrusted_and_revoke_the_previous(tmp_path):
    from megatron.checkpoint import health

    tracker = health.CheckpointHealth(str(tmp_path), is_writer=True)
    for step, loss in enumerate([3.0, 3.1, 2.9, 3.0], start=1):
        tracker.observe(step, loss, nonfinite=False)
    verdict = tracker.verdict()
    assert verdict["healthy"]
    (tmp_path / "global_step4").mkdir()
    health.record_verdict(str(tmp_path), "global_step4", verdict)
    tracker.saved(str(tmp_path / "global_step4"), verdict)
    tracker.observe(5, 3.0, nonfinite=True)  # a non-finite gradient: the batch, not step 4's weights
    assert tracker.last_good == str(tmp_path / "global_step4") and not tracker.verdict()["healthy"]
    assert health.read_verdicts(str(tmp_path))["global_step4"]["next_step_ok"] is True
    (tmp_path / "global_step6").mkdir()
    tracker.observe(6, 3.0, nonfinite=False)
    verdict6 = tracker.verdict()
    health.record_verdict(str(tmp_path), "global_step6", verdict6)
    tracker.saved(str(tmp_path / "global_step6"), verdict6)
    assert tracker.last_good == str(tmp_path / "global_step4")  # step 5 was non-finite
    tracker2 = health.CheckpointHealth(str(tmp_path), is_writer=True)
    tracker2.baseline.extend([3.0] * 5)
    tracker2.observe(1, 3.0 * health.LOSS_SPIKE_FACTOR + 0.1, nonfinite=False)
    assert "recent mean" in tracker2.verdict()["problems"][0]
    tracker2.saved(str(tmp_path / "global_step1"), tracker2.verdict())
    for step in range(2, 6):  # the loss stays at its new level: that level becomes the norm
        tracker2.observe(step, 3.0 * health.LOSS_SPIKE_FACTOR + 0.1, nonfinite=False)
    assert tracker2.verdict()["healthy"]
    assert health.protected_tags(str(tmp_path)) == {"global_step4"}


# ---------------------------------------------------------------------------
# one writer per save directory

HOLD_AT_STEP_1 = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from megatron.config import NeoXArgs
from megatron.training import loop, pretrain
real = loop.train_step
def held_step(trainer, batches, iteration, *args, **kwargs):
    if iteration == 1:  # the lock is held now: let the test start its second run
        Path({ready!r}).touch()
        deadline = time.time() + {wait}
        while not Path({go!r}).exists() and time.time() < deadline:
            time.sleep(0.2)
    return real(trainer, batches, iteration, *args, **kwargs)
loop.train_step = held_step
pretrain(NeoXArgs.from_ymls([{tiny!r}], overrides={overrides!r}))
"""


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + WAIT_S
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_second_run_on_a_save_dir_is_refused_naming_the_holder_and_the_first_finishes(tmp_path):
    overrides = tiny_overrides(tmp_path, train_iters=4, lr_decay_iters=4, checkpoint_factor=2)
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = HOLD_AT_STEP_1.format(tests=str(ROOT / "tests" / "training"), ready=str(ready), go=str(go),
                                   wait=WAIT_S, tiny=TINY, overrides=overrides)
    first = subprocess.Popen([sys.executable, "-c", script], env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, first)
        copied = {**overrides, "log_dir": str(tmp_path / "logs2")}  # the same save: a copy-pasted config
        flat = [f"{k}={json.dumps(v)}" for k, v in copied.items() if k != "l2e"]
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), TINY, "--override", *flat],
                                env=_env(), capture_output=True, text=True, timeout=WAIT_S)
        go.touch()
        out, err = first.communicate(timeout=WAIT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
    assert f"host {socket.gethostname()}, pid {first.pid}, since" in errors[0]
    assert "writer.lock" in errors[0] and "another 'save' directory" in errors[0]
    assert first.returncode == 0, err[-3000:]
    save = tmp_path / "full"
    assert _steps(save) == ["global_step2", "global_step4"] and (save / "latest").read_text() == "global_step4"
    assert not (save / "writer.lock").exists()  # released at the end


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron.checkpoint.save_dir import SaveDirLock; "
         f"SaveDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep({WAIT_S})"],
        env=ENV, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        from megatron.checkpoint.save_dir import SaveDirBusyError, SaveDirLock

        with pytest.raises(SaveDirBusyError, match=f"pid {holder.pid}"):
            SaveDirLock(str(tmp_path)).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=WAIT_S)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    lock = SaveDirLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / "writer.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "writer.lock").exists()


def test_lock_from_another_node_is_live_while_its_heartbeat_moves(tmp_path, monkeypatch):
    import threading

    from megatron.checkpoint import save_dir
    from megatron.checkpoint.save_dir import SaveDirBusyError, SaveDirLock

    monkeypatch.setattr(save_dir, "WATCH_S", 1.0)  # 75 s in a real run
    monkeypatch.setattr(save_dir, "POLL_S", 0.1)
    lock_file = tmp_path / "writer.lock"
    foreign = {"host": "node-elsewhere", "pid": 1, "since": time.time() - 3600}
    lock_file.write_text(json.dumps({**foreign, "heartbeat": 0}))
    stop = threading.Event()

    def beat():  # the holder on the other node is alive
        beats = 0
        while not stop.wait(0.02):
            beats += 1
            (tmp_path / "beat.new").write_text(json.dumps({**foreign, "heartbeat": beats}))
            os.replace(tmp_path / "beat.new", lock_file)  # atomic, as the real heartbeat

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(SaveDirBusyError, match="host node-elsewhere, pid 1, since"):
            SaveDirLock(str(tmp_path)).acquire()
    finally:
        stop.set()
        beating.join()
    lock = SaveDirLock(str(tmp_path))  # its heartbeat stopped: the node died
    lock.acquire()
    assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
    lock.release()
    assert not lock_file.exists()


def _lock_on_every_rank(rank, world_size, save):
    from types import SimpleNamespace

    from megatron.checkpoint.save_dir import SaveDirBusyError, lock_save_dir

    try:
        lock_save_dir(SimpleNamespace(save=save))
    except SaveDirBusyError as e:
        return str(e)
    return None


@pytest.mark.distributed
def test_every_rank_fails_together_when_rank_0_cannot_take_the_lock(tmp_path):
    # a holder on this host that is alive (the test itself): refused without watching a heartbeat
    now = time.time()
    (tmp_path / "writer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                      "since": now, "heartbeat": now}))
    messages = run_distributed(_lock_on_every_rank, world_size=2, args=(str(tmp_path),), timeout=120)
    assert messages[0] == messages[1] and f"pid {os.getpid()}, since" in messages[0]


# ---------------------------------------------------------------------------
# never overwrite progress


def test_a_converters_step_inside_a_run_is_never_replaced_by_the_run(tmp_path):
    from megatron.config import NeoXArgs
    from megatron.checkpoint.save_dir import OverwriteError, check_planned_saves

    # what `convert_hf_to_neox.py --output RUN --iteration 6 --force` leaves beside the run's steps
    for step in (2, 4, 6):
        (tmp_path / "full" / f"global_step{step}").mkdir(parents=True)
    args = NeoXArgs.from_ymls([TINY], overrides=tiny_overrides(tmp_path, train_iters=8, checkpoint_factor=2))
    with pytest.raises(OverwriteError, match="already holds global_step6, which this run .from step 4. would replace"):
        check_planned_saves(args, 4)
    args.overwrite_checkpoints = True
    check_planned_saves(args, 4)  # replacing them on purpose




@pytest.mark.slow
def test_rollback_and_copied_config_never_replace_existing_checkpoints(tmp_path, capfd):
    save = tmp_path / "full"
    base = dict(train_iters=8, lr_decay_iters=8, checkpoint_factor=2, log_interval=8)
    first = tiny_overrides(tmp_path, **base)
    rollback_over = tiny_overrides(tmp_path, **base, load=str(save), iteration=4)
    copied_config = tiny_overrides(tmp_path, **base)
    rollback_short = tiny_overrides(tmp_path, **{**base, "train_iters": 5}, load=str(save), iteration=4)
    (results,) = run_distributed(_pretrain_each, world_size=1, init_deepspeed=True, timeout=600,
                                 args=([first, rollback_over, copied_config, rollback_short],))
    _, over, copied, short = results
    assert "already holds global_step6, global_step8, which this run (from step 4) would replace" in over
    assert "overwrite_checkpoints: true" in over
    assert "already holds global_step2, global_step4, global_step6, global_step8" in copied
    assert short["iteration"] == 5
    assert _steps(save) == ["global_step2", "global_step4", "global_step5", "global_step6", "global_step8"]
    assert (save / "latest").read_text() == "global_step5"
    assert "rollback: resuming at step 4 keeps the newer global_step6, global_step8" in capfd.readouterr().out
