"""A disk that fills up in the middle of a real save: train.py prints the documented
line, removes the partial global_stepN.tmp, keeps the previous checkpoint named in
`latest`, and exits 2 with its DataLoader workers (no process left behind).

The full disk is a small tmpfs (root may mount one: CI and the dev machines run as
root); the first checkpoint fits in it, the second does not."""
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from distributed import free_port
from test_resume import ROOT, TINY, tiny_overrides

pytestmark = pytest.mark.slow  # one real 2-step training process (~20 s)

TMPFS_SIZE = "5m"  # a tiny checkpoint is ~3.7 MB: one fits, two do not


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_disk_full_mid_save_is_one_line_and_the_process_exits(tmp_path, small_disk):
    save = small_disk / f"save-{uuid.uuid4().hex[:8]}"  # unique: finds this run's processes
    overrides = tiny_overrides(tmp_path, save=str(save), train_iters=2, lr_decay_iters=2, checkpoint_factor=1,
                               num_workers=2)
    argv = [f"{k}={v}" for k, v in overrides.items() if not isinstance(v, dict)]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "PYTHONPATH": str(ROOT)}
    env.pop("NEOX_L2E_TRACEBACK", None)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: a leftover worker cannot hold a pipe
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), TINY, "--override", *argv,
                                 "l2e.enabled=false"], stdout=stdout, stderr=stderr, cwd=ROOT, env=env, timeout=300)
    lines = err.read_text().strip().splitlines()
    assert result.returncode == 2, lines[-20:]
    assert "Traceback" not in err.read_text()
    assert re.fullmatch(rf"error: save: disk full writing global_step2 to {save} \([0-9.]+ [MG]iB free, a checkpoint "
                        rf"needs about [0-9.]+ [MG]iB\); free space there or point save at a larger disk, then "
                        rf"resume \({save}/global_step1 is intact\)", lines[-1]), lines[-1]
    assert sorted(os.listdir(save)) == ["checkpoint_health.json", "global_step1", "latest"]  # no global_step2.tmp
    assert (save / "latest").read_text() == "global_step1"
    assert _processes_mentioning(str(save)) == []  # the DataLoader workers ended with their rank
