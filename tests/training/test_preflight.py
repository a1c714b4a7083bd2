"""Fail fast: unwritable directories, a too-small disk and data that does not fit the
model are one-line errors before step 1 (in deepy.py before any rank starts)."""
import collections
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from megatron.errors import ConfigError, DataError
from megatron.training import preflight
from test_resume import ROOT, TINY, tiny_overrides


def test_save_under_a_file_or_being_a_file_is_refused(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"save: {blocker} is a file"):
        preflight.check_writable_dir(str(blocker), "save")
    with pytest.raises(ConfigError, match="log_dir: cannot write to .*not_a_dir/logs"):
        preflight.check_writable_dir(str(blocker / "logs"), "log_dir")
    fine = tmp_path / "new" / "ckpts"
    preflight.check_writable_dir(str(fine), "save")
    assert fine.is_dir() and list(fine.iterdir()) == []  # the probe is gone


def test_read_only_directory_is_refused(tmp_path, monkeypatch):
    real_open = open

    def read_only_open(path, *args, **kwargs):  # root ignores chmod, so simulate EROFS
        if ".write_probe_" in str(path):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    with pytest.raises(ConfigError, match="tensorboard_dir: cannot write to .*Read-only file system"):
        preflight.check_writable_dir(str(tmp_path), "tensorboard_dir")


def test_disk_space_error_below_one_checkpoint_warning_below_two(tmp_path, monkeypatch, caplog):
    args = types.SimpleNamespace(save=str(tmp_path), precision="bfloat16", zero_optimization={"stage": 1})
    need = preflight.checkpoint_bytes(10**6, args)
    assert need == 14 * 10**6  # bf16 weights + fp32 master + two Adam moments
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: usage(0, 0, need - 1))
    with pytest.raises(ConfigError, match=f"save: {tmp_path} has .* GiB free but one checkpoint needs"):
        preflight.check_disk_space(args, 10**6)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: usage(0, 0, int(1.5 * need)))
    preflight.check_disk_space(args, 10**6)
    assert "room for only one checkpoint" in caplog.text


def _write_dataset(prefix, tokens_per_doc):
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in tokens_per_doc:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def test_token_ids_beyond_the_padded_vocab_are_refused_and_the_scan_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "CACHE_FILE", str(tmp_path / "cache.json"))
    prefix = str(tmp_path / "foreign")
    _write_dataset(prefix, [[1, 2, 3], [4, 9000, 5]])
    args = types.SimpleNamespace(data_path=prefix, train_data_paths=None, valid_data_paths=None,
                                 test_data_paths=None, vocab_file="bpe4k.json", tokenizer_type="HFTokenizer")
    with pytest.raises(DataError, match=r"foreign.bin: token id 9000 >= the padded vocabulary \(4096\)"):
        preflight.check_data(args, 4096)
    # Unchanged file: the cached maximum answers without reading the tokens again.
    monkeypatch.setattr(preflight, "_scan_max", None)
    preflight.check_data(args, 9001)


def _deepy(*override):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), str(ROOT / "train.py"), TINY,
                           "--override", *override], capture_output=True, text=True, env=env, timeout=300)


def test_deepy_refuses_an_unwritable_save_before_starting_ranks(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _deepy(f"save={tmp_path / 'file' / 'ckpts'}", f"log_dir={tmp_path / 'logs'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: save: cannot write to")
    assert "Traceback" not in result.stderr and not (tmp_path / "logs" / "metrics.jsonl").exists()


def _pretrain(rank, world_size, overrides):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    try:
        pretrain(NeoXArgs.from_ymls([TINY], overrides=overrides))
    except ConfigError as e:
        return str(e)


def test_pretrain_refuses_unwritable_log_dir_before_step_1(tmp_path):
    from distributed import run_distributed

    (tmp_path / "file").write_text("x")
    overrides = tiny_overrides(tmp_path, log_dir=str(tmp_path / "file"))
    (message,) = run_distributed(_pretrain, world_size=1, args=(overrides,), init_deepspeed=True)
    assert message.startswith("log_dir:") and "is a file" in message
    assert not (tmp_path / "full").exists() or not any((tmp_path / "full").glob("global_step*"))


def _check_foreign_data(rank, world_size, prefix, cache):
    preflight.CACHE_FILE = cache
    args = types.SimpleNamespace(data_path=prefix, train_data_paths=None, valid_data_paths=None,
                                 test_data_paths=None, vocab_file="v.json", tokenizer_type="HFTokenizer")
    try:
        preflight.check_data_on_rank0(args, 4096)
    except DataError as e:
        return str(e)


@pytest.mark.distributed
def test_rank0_scans_the_data_and_every_rank_raises(tmp_path):
    from distributed import run_distributed

    prefix = str(tmp_path / "foreign")
    _write_dataset(prefix, [[1, 9000]])
    messages = run_distributed(_check_foreign_data, world_size=2, args=(prefix, str(tmp_path / "c.json")))
    assert messages[0] == messages[1] and "token id 9000" in messages[0]
