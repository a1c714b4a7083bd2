"""Each damaged or mismatched checkpoint gives one CheckpointError naming the file (or the
dimension) and the fix; `train.py` prints it as one line and exits 2; inspect_checkpoint.py
describes a good checkpoint and names the damage in a bad one.

One real tiny training run (pipelined, so the checkpoint has per-layer files, L2E on)
saves step 2; each case damages a copy of it and tries to resume from it.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port, run_distributed
from test_resume import ROOT, TINY, tiny_overrides

pytestmark = pytest.mark.slow  # one real training run, then a resume attempt per case (~30 s)

STEP = "global_step2"
LAYER = "layer_03-model_00-model_states.pt"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap_two_tokens(path):
    """Another tokenizer of the same vocabulary size."""
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(spec))


# (name, damage to the copied step dir, config changes, expected message parts or None
# for a checkpoint that loads)
CASES = [
    ("truncated", lambda step: _truncate(step / LAYER), {"checkpoint_verify": False},
     [f"{STEP}/{LAYER} is truncated", "load another 'iteration'"]),
    ("checksum", lambda step: _flip_byte(step / LAYER), {},
     [f"{STEP}/{LAYER} does not match its checksum", "checkpoint_verify: false"]),
    ("missing layer file", lambda step: (step / LAYER).unlink(), {"checkpoint_verify": False},
     [f"{STEP}/{LAYER} is missing", "the checkpoint is incomplete"]),
    ("missing extra state", lambda step: (step / "rank_00000_extra_state.pt").unlink(), {"checkpoint_verify": False},
     [f"{STEP}/rank_00000_extra_state.pt is missing", "no_load_rng: true"]),
    ("empty latest", lambda step: (step.parent / "latest").write_text(""), {},
     ["latest is empty; write the step to resume into it (one of ['global_step2'])", "'iteration' key"]),
    ("past train_iters", lambda step: None, {"train_iters": 1, "lr_decay_iters": 1, "override_lr_scheduler": True},
     [f"{STEP} is at iteration 2, past train_iters=1", "raise train_iters above 2"]),
    ("other tokenizer", lambda step: _swap_two_tokens(step / "tokenizer" / "austen_bpe4k.json"),
     {"checkpoint_verify": False}, ["was trained on other inputs: tokenizer ", "allow_changed_inputs: true"]),
    ("other seq_length", lambda step: None, {"seq_length": 16},
     ["was trained on other inputs: seq_length 32 -> 16"]),
    # no_load_rng alone recovers from a lost extra state (its checksum is not asked for)
    ("missing extra state, no_load_rng", lambda step: (step / "rank_00000_extra_state.pt").unlink(),
     {"no_load_rng": True}, None),
    ("wrong hidden size", lambda step: None, {"hidden_size": 64},
     ["holds a model with hidden_size=32, the config asks for 64"]),
    # Same shapes, other meaning: caught from the checkpoint's configs/.
    ("other residual form", lambda step: None, {"gpt_j_residual": False},
     ["holds a model with gpt_j_residual=True, the config asks for False"]),
]


def _base(tmp_path, **extra):
    return tiny_overrides(tmp_path, **{"pipe_parallel_size": 1, "train_iters": 2, "lr_decay_iters": 2,
                                       "checkpoint_factor": 2, **extra})


def _train_then_load_damaged(rank, world_size, tmp, full, attempts):
    from megatron.config import NeoXArgs
    from megatron.errors import CheckpointError
    from megatron.training import pretrain

    pretrain(NeoXArgs.from_ymls([TINY], overrides=full))
    messages = []
    for name, overrides in attempts:
        damaged = f"{tmp}/{name}"
        shutil.copytree(f"{tmp}/full", damaged)
        DAMAGE[name](Path(damaged) / STEP)
        try:
            pretrain(NeoXArgs.from_ymls([TINY], overrides={**overrides, "load": damaged}))
            messages.append(None)
        except CheckpointError as e:
            messages.append(str(e))
    return messages


DAMAGE = {name: damage for name, damage, _, _ in CASES}


@pytest.fixture(scope="module")
def damaged_messages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    attempts = [(name, _base(tmp, **{"save": None, "train_iters": 3, **changes})) for name, _, changes, _ in CASES]
    messages = run_distributed(_train_then_load_damaged, world_size=1, init_deepspeed=True, timeout=600,
                               args=(str(tmp), _base(tmp), attempts))[0]
    return tmp, dict(zip([c[0] for c in CASES], messages))


@pytest.mark.parametrize("name,parts", [(c[0], c[3]) for c in CASES if c[3] is not None])
def test_damaged_checkpoint_gives_one_named_error(damaged_messages, name, parts):
    message = damaged_messages[1][name]
    assert message is not None, f"{name}: the damaged checkpoint was loaded"
    assert "\n" not in message and message.startswith("load: ")
    for part in parts:
        assert part in message, (name, message)


def test_loadable_cases_load(damaged_messages):
    for name in [c[0] for c in CASES if c[3] is None]:
        assert damaged_messages[1][name] is None, (name, damaged_messages[1][name])


def _inspect(*argv):
    spec = importlib.util.spec_from_file_location("inspect_ckpt", ROOT / "tools" / "ckpts" / "inspect_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_inspect_checkpoint(damaged_messages, capsys):
    tmp, _ = damaged_messages
    assert _inspect(str(tmp / "full")) == 0
    out = capsys.readouterr().out
    for expected in ("kind        neox-l2e checkpoint", "iteration   2", "layout      tp 1  pp 1  dp 1  zero_stage 0  world_size 1  precision fp32",
                     "model       layers 2  hidden 32  heads 4", "global batch 4 (micro 2 x accumulation 2; configs/run_summary.yml)",
                     "L2E         layer 0: tau", "layer 1: tau", "checksums ok (sha256", "\nOK\n"):
        assert expected in out, expected
    assert _inspect(str(tmp / "truncated"), "--no-checksums") == 1
    out = capsys.readouterr().out
    assert f"PROBLEM     {tmp}/truncated/{STEP}/{LAYER} is truncated" in out
    assert _inspect(str(tmp / "missing layer file")) == 1
    assert f"PROBLEM     {tmp}/missing layer file/{STEP}/{LAYER} is missing" in capsys.readouterr().out


def test_train_py_prints_the_error_as_one_line(damaged_messages):
    tmp, _ = damaged_messages
    overrides = {**_base(tmp, save=str(tmp / "cli_save"), train_iters=3), "load": str(tmp / "checksum")}
    argv = [f"{k}={v}" for k, v in overrides.items() if not isinstance(v, dict)]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), TINY, "--override", *argv, "l2e.enabled=false"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: load: ") and f"{LAYER} does not match its checksum" in last
