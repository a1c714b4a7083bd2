"""A full disk at save: one line naming the directory and the space needed, no partial
``.tmp`` left, ``latest`` and the earlier checkpoints untouched; pruning keeps the
newest (finite) checkpoint."""
import errno
import os

import pytest
import torch

from megatron.errors import CheckpointError
from megatron.training import checkpointing as ckpt
from test_checkpointing import make_args, make_engine, single_process_group, train_step  # noqa: F401


def _disk_full_after(monkeypatch, writes: int, error):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > writes:
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   # what torch.save itself raises on a full disk
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")])
def test_disk_full_at_save_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch, error):
    args = make_args(tmp_path)
    engine = make_engine()
    train_step(engine)
    ckpt.save_checkpoint(args, 1, engine, None)
    train_step(engine)
    _disk_full_after(monkeypatch, 1, error)  # the model states fit, the next file does not
    with pytest.raises(CheckpointError) as err:
        ckpt.save_checkpoint(args, 2, engine, None)
    message = str(err.value)
    assert "\n" not in message and f"disk full writing global_step2 to {args.save}" in message
    assert "a checkpoint needs about" in message and "global_step1 is intact" in message
    saved = tmp_path / "ckpt"
    assert sorted(os.listdir(saved)) == ["global_step1", "latest"]
    assert (saved / "latest").read_text() == "global_step1"


def test_pruning_keeps_latest_and_the_newest_others(tmp_path):
    args = make_args(tmp_path, keep_last_n_checkpoints=2)
    engine = make_engine()
    for it in (1, 2, 3):
        train_step(engine)
        ckpt.save_checkpoint(args, it, engine, None)
    saved = tmp_path / "ckpt"
    assert sorted(p for p in os.listdir(saved)) == ["global_step2", "global_step3", "latest"]
    # A resumed run re-saving an older step: `latest` moves there and is never pruned.
    ckpt.save_checkpoint(args, 2, engine, None)
    assert (saved / "latest").read_text() == "global_step2"
    assert "global_step2" in os.listdir(saved)
