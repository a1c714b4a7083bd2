"""A torch-extensions build lock left by a killed DeepSpeed build is reported with the
file to delete, instead of hanging every later launch; a live build's lock is not."""
import os
import subprocess
import sys
import threading
import time

import pytest

from megatron.parallel.extension_locks import StaleBuildLockError, check_extension_locks
from test_resume import ROOT


def _lock(root, age_s):
    path = root / "py312_cpu" / "deepspeed_shm_comm" / "lock"
    path.parent.mkdir(parents=True)
    path.write_text("")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_lock_of_a_killed_build_is_reported(tmp_path):
    path = _lock(tmp_path, age_s=120)
    with pytest.raises(StaleBuildLockError, match=f"delete it \\(rm {path}\\)"):
        check_extension_locks(str(tmp_path))


def _release_after(path, seconds, holder=None):
    """A build finishing: it closes and deletes its lock."""
    def release():
        time.sleep(seconds)
        if holder is not None:
            holder.close()
        path.unlink()
    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_lock_of_a_live_build_is_waited_on_with_a_message_until_released(tmp_path, capsys):
    path = _lock(tmp_path, age_s=120)
    holder = open(path)  # a builder holds its lock file open until it releases it
    thread = _release_after(path, 0.5, holder)
    check_extension_locks(str(tmp_path), poll_s=0.05)
    thread.join()
    assert not path.exists()
    assert (f"waiting for the DeepSpeed op build lock {path} (a build on this machine holds it, 120 s old); it is "
            f"taken as stale, and the launch stops naming it, once it is 3600 s old") in capsys.readouterr().err


def test_a_just_taken_lock_nobody_holds_is_waited_on_then_named(tmp_path, capsys):
    path = _lock(tmp_path, age_s=0)
    started = time.monotonic()
    with pytest.raises(StaleBuildLockError, match=f"delete it \\(rm {path}\\)"):
        check_extension_locks(str(tmp_path), grace_s=0.3, poll_s=0.05)
    assert time.monotonic() - started >= 0.3  # waited for the grace period first, not forever
    assert f"waiting for the DeepSpeed op build lock {path} (maybe a build that is starting" in capsys.readouterr().err


def test_across_nodes_only_age_tells(tmp_path):
    path = _lock(tmp_path, age_s=120)
    thread = _release_after(path, 0.3)  # maybe another node's live build: waited on
    check_extension_locks(str(tmp_path), single_node=False, poll_s=0.05)
    thread.join()
    path = _lock(tmp_path / "again", age_s=7200)
    with pytest.raises(StaleBuildLockError):
        check_extension_locks(str(tmp_path / "again"), single_node=False)


def test_warm_deepspeed_exits_with_the_file_to_delete(tmp_path):
    path = _lock(tmp_path, age_s=120)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "warm_deepspeed.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: a DeepSpeed op build was killed")
