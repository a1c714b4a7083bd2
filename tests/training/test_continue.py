"""Continue at step N from weights only (NeoX's `iteration` semantics), and `no_load_optim`.

One uninterrupted 10-step run saves at step 5; step 5 is exported to HF. Runs that load
the HF directory with `iteration: 5` (pp=0, and a one-stage pipeline), and one that loads
the full checkpoint with `no_load_optim: true`, all log at step 6 the uninterrupted run's loss (same weights,
same batch) and the same learning rates for steps 6-10 (the schedule continues at 5).
"""
import importlib.util
import json
from pathlib import Path

import pytest

from distributed import run_distributed
from test_resume import ROOT, TINY, tiny_overrides


def _convert_neox_to_hf(argv):
    spec = importlib.util.spec_from_file_location("neox_to_hf", ROOT / "tools" / "ckpts" / "convert_neox_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def _full_export_continue(rank, world_size, tmp, full, continued):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    pretrain(NeoXArgs.from_ymls([TINY], overrides=full))
    _convert_neox_to_hf(["--input", f"{tmp}/full", "--iteration", "5", "--output", f"{tmp}/hf5"])
    return [pretrain(NeoXArgs.from_ymls([TINY], overrides=o)) for o in continued]


def _metrics(log_dir):
    rows = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows}


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * abs(b)


@pytest.mark.slow
def test_continue_at_step_5_from_hf_export_and_with_no_load_optim(tmp_path, capfd):
    common = dict(l2e={"enabled": False}, log_interval=1, checkpoint_factor=5)
    full = tiny_overrides(tmp_path, **common)
    # L2E switched on at step 5: its statistics start empty (the lm loss is unaffected).
    from_hf = tiny_overrides(tmp_path, **{**common, "l2e": tiny_overrides(tmp_path)["l2e"]},
                             load=str(tmp_path / "hf5"), iteration=5, save=str(tmp_path / "cont"),
                             log_dir=str(tmp_path / "logs_hf"))
    # The HF weights go into any layout: here a one-stage DeepSpeed pipeline (layer modules).
    from_hf_pipe = tiny_overrides(tmp_path, **common, load=str(tmp_path / "hf5"), iteration=5, save=None,
                                  pipe_parallel_size=1, log_dir=str(tmp_path / "logs_hf_pipe"))
    no_optim = tiny_overrides(tmp_path, **common, load=str(tmp_path / "full"), iteration=5, no_load_optim=True,
                              save=None, log_dir=str(tmp_path / "logs_no_optim"))
    hf_run, pipe_run, no_optim_run = run_distributed(_full_export_continue, world_size=1, init_deepspeed=True,
                                                     timeout=600, args=(str(tmp_path), full,
                                                                        [from_hf, from_hf_pipe, no_optim]))[0]
    out = capfd.readouterr().out

    ref = _metrics(tmp_path / "logs")
    for name, run, log_dir in (("hf", hf_run, "logs_hf"), ("hf into a pipeline", pipe_run, "logs_hf_pipe"),
                               ("no_load_optim", no_optim_run, "logs_no_optim")):
        got = _metrics(tmp_path / log_dir)
        assert run["iteration"] == 10 and sorted(got) == [6, 7, 8, 9, 10], name
        assert _close(got[6]["train/lm_loss"], ref[6]["train/lm_loss"]), (name, got[6], ref[6])
        for step in range(6, 11):
            assert got[step]["train/learning_rate"] == ref[step]["train/learning_rate"], (name, step)
        # Fresh Adam moments: the trajectories part after the first update.
        assert got[7]["train/lm_loss"] != ref[7]["train/lm_loss"], name

    # The tokenizer travels: copied into every checkpoint, exported with the HF model.
    assert (tmp_path / "full" / "global_step5" / "tokenizer" / "austen_bpe4k.json").is_file()
    assert (tmp_path / "hf5" / "tokenizer.json").is_file()
    # Checkpoint numbering continues from 5, and the restored state is reported in one line.
    assert (tmp_path / "cont" / "latest").read_text() == "global_step10"
    hf_line = next(line for line in out.splitlines() if line.startswith(f"restored from {tmp_path}/hf5"))
    assert "weights ✓  optimizer ✗ (fresh)  schedule at 5  data at sample 20  L2E state ✗ (new" in hf_line
    no_optim_line = next(line for line in out.splitlines() if "optimizer ✗ (fresh: no_load_optim)" in line)
    assert "schedule at 5" in no_optim_line and "rng ✓" in no_optim_line
