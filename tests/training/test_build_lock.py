"""A torch-extensions build lock left by a killed DeepSpeed build is reported with the
file to delete, instead of hanging every later launch; a live build's lock is not."""
import os
import subprocess
import sys
import time

import pytest

from megatron.training.robustness import StaleBuildLockError, check_extension_locks
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


def test_lock_held_open_by_a_live_build_or_just_taken_is_left_alone(tmp_path):
    path = _lock(tmp_path, age_s=120)
    with open(path):  # a builder holds its lock file open until it releases it
        check_extension_locks(str(tmp_path))
    os.utime(path)  # fresh: the builder may still be starting
    check_extension_locks(str(tmp_path))


def test_across_nodes_only_age_tells(tmp_path):
    path = _lock(tmp_path, age_s=120)
    check_extension_locks(str(tmp_path), single_node=False)  # maybe another node's live build
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    with pytest.raises(StaleBuildLockError):
        check_extension_locks(str(tmp_path), single_node=False)


def test_warm_deepspeed_exits_with_the_file_to_delete(tmp_path):
    path = _lock(tmp_path, age_s=120)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "warm_deepspeed.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: a DeepSpeed op build was killed")
