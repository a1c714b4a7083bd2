"""A tiny run explains itself: the startup summary, metrics rows, grad norm, checkpoint
validation, profiling and the keys that have no effect."""
import json
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "local" / "tiny.yml")
DATA = ROOT / "data" / "austen_bpe4k_text_document"


def _pretrain(rank, world_size, overrides):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    return pretrain(NeoXArgs.from_ymls([TINY], overrides=overrides))


def _overrides(tmp_path):
    for suffix in (".bin", ".idx"):  # a private copy: its index maps start uncached
        shutil.copy(f"{DATA}{suffix}", tmp_path / f"austen{suffix}")
    return {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2, "train_iters": 2, "lr_decay_iters": 2,
        "log_interval": 1, "eval_interval": 0, "eval_iters": 0, "l2e": {"enabled": False},
        "data_path": str(tmp_path / "austen"), "num_workers": 1,
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(tmp_path / "logs"), "save": str(tmp_path / "ckpt"),
        "checkpoint_factor": None, "extra_save_iters": [0],
        "checkpoint_validation_with_forward_pass": True, "wall_clock_breakdown": True,
        "profile": True, "profile_step_start": 2, "profile_step_stop": 2,
        "rope_fusion": True, "sequence_parallel": True,
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    overrides = _overrides(tmp_path)
    log = tmp_path / "stdout.txt"
    # The spawned rank writes to our fd 1; point it at a file to read the console back.
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        try:
            started = time.time()
            run_distributed(_pretrain, world_size=1, args=(overrides,), init_deepspeed=True)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    return types.SimpleNamespace(path=tmp_path, overrides=overrides, started=started,
                                 console=log.read_text())


def _args(overrides):
    from megatron.config import NeoXArgs

    args = NeoXArgs.from_ymls([TINY], overrides=overrides)
    args.configure_world(1)
    args.set_vocab_size(4096)
    return args


@pytest.mark.slow  # shares one ~15 s training run (the tiny_run fixture)
def test_summary_block_has_the_right_numbers(tiny_run):
    from megatron.data.data_utils import split_boundaries
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.model import parameter_counts

    assert "run summary" in tiny_run.console
    saved = yaml.safe_load((tiny_run.path / "ckpt" / "global_step2" / "configs" / "run_summary.yml").read_text())
    assert saved["layout"] == {"world_size": 1, "data_parallel": 1, "tensor_parallel": 1,
                               "pipeline_parallel": 1, "pipeline_module": False}
    assert saved["batch"] == {"micro_batch": 2, "gradient_accumulation": 2, "data_parallel": 1,
                              "global_batch": 4, "tokens_per_step": 4 * 32}
    total, non_embedding = parameter_counts(_args(tiny_run.overrides).model_config())
    assert (saved["model"]["params_total"], saved["model"]["params_non_embedding"]) == (total, non_embedding)
    assert non_embedding < total
    assert saved["training"]["samples"] == 8 and saved["training"]["precision"] == "fp32"
    indexed = MMapIndexedDataset(str(tiny_run.path / "austen"))
    bounds = split_boundaries("949,50,1", len(indexed))
    train = saved["data"]["train"]
    assert train["documents"] == bounds[1] - bounds[0]
    assert train["tokens"] == int(indexed.sizes[: bounds[1]].sum())
    assert train["epochs"] == 1 and train["samples"] == (train["tokens"] - 1) // 32
    assert train["index_map"].startswith("miss") and all(Path(p).is_file() for p in train["index_map_files"])
    assert saved["l2e"] == "off"
    assert saved["outputs"]["checkpoints"] == str(tiny_run.path / "ckpt")
    # ignored keys are named at startup, with the reason
    no_effect = saved["accepted, no effect here"]
    assert any(k.startswith("rope_fusion (") for k in no_effect)
    assert any(k.startswith("sequence_parallel (") for k in no_effect)
    assert "rope_fusion (" in tiny_run.console
    # the summary does not break rebuilding the arguments from the checkpoint
    from megatron.config import NeoXArgs

    configs = tiny_run.path / "ckpt" / "global_step2" / "configs"
    again = NeoXArgs.from_config_dir(configs)
    assert again.num_layers == 2 and again.rope_fusion
    # configs/*.yml passed as they are (deepy.py train.py ckpt/configs/*.yml): summary skipped
    files = sorted(str(p) for p in configs.glob("*.yml") if p.name != "command_line_overrides.yml")
    assert any(f.endswith("run_summary.yml") for f in files)
    assert NeoXArgs.from_ymls(files).num_layers == 4  # tiny.yml's own value, without overrides


@pytest.mark.slow  # shares one ~15 s training run (the tiny_run fixture)
def test_start_says_scratch_and_the_end_summary_says_what_the_run_did(tiny_run):
    console = tiny_run.console
    assert "starting from scratch: no 'load' is set; fresh weights at step 0" in console
    block = console.split("run finished", 1)[1].split("\n", 1)[1].rsplit("\n---", 1)[0]
    closing = yaml.safe_load(block)
    assert closing["steps"] == {"from": 0, "to": 2, "this_run": 2, "of": 2}
    assert closing["tokens_this_run"] == 2 * 4 * 32
    rows = [json.loads(line) for line in (tiny_run.path / "logs" / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if "train/lm_loss" in r][-1]
    assert closing["final_train_lm_loss"] == {"iteration": 2, "value": round(last_train["train/lm_loss"], 6)}
    assert closing["final_valid_lm_loss"] is None  # eval_interval 0
    assert closing["checkpoint"] == str(tiny_run.path / "ckpt" / "global_step2")
    assert closing["metrics"] == str(tiny_run.path / "logs" / "metrics.jsonl")
    seconds = closing["seconds"]
    assert set(seconds) == {"wall", "training_steps", "save"}  # no load: nothing was loaded
    assert 0 < seconds["training_steps"] + seconds["save"] <= seconds["wall"]


@pytest.mark.slow  # shares one ~15 s training run (the tiny_run fixture)
def test_metrics_rows_have_timestamp_consumed_samples_and_timers(tiny_run):
    rows = [json.loads(line) for line in (tiny_run.path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert tiny_run.started <= r["timestamp"] <= time.time()
        assert r["train/consumed_samples"] == 4 * r["iteration"]
        assert r["train/consumed_tokens"] == 4 * 32 * r["iteration"]
        assert r["train/grad_norm"] > 0
        assert any(k.startswith("timers/") for k in r)  # wall_clock_breakdown, per log line
    assert "time (ms) |" not in tiny_run.console  # DeepSpeed's per-micro-batch prints


@pytest.mark.slow  # shares one ~15 s training run (the tiny_run fixture)
def test_grad_norm_equals_plain_pytorch_reference(tiny_run):
    """Step 1's logged train/grad_norm is clip_grad_norm_'s norm for the same weights and batch."""
    from megatron.checkpoint.layout import load_model
    from megatron.data.data_utils import build_train_valid_test_datasets, get_batch, make_data_iterator
    from megatron.training.engine import lm_loss

    args = _args({**tiny_run.overrides, "num_workers": 0})
    model = load_model(tiny_run.path / "ckpt" / "global_step0").train()
    train_ds, _, _ = build_train_valid_test_datasets(args)
    micro_batches = make_data_iterator(train_ds, args, 0, 1)
    for _ in range(args.gradient_accumulation_steps):
        tokens, labels, mask = get_batch(next(micro_batches)["text"], eod_token=0)
        (lm_loss(model(tokens), labels, mask) / args.gradient_accumulation_steps).backward()
    reference = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf")))
    rows = [json.loads(line) for line in (tiny_run.path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/grad_norm"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow  # shares one ~15 s training run (the tiny_run fixture)
def test_checkpoint_validation_passes_and_catches_wrong_weights(tiny_run):
    from megatron.checkpoint.layout import load_model
    from megatron.errors import CheckpointError
    from megatron.parallel import ParallelGroups
    from megatron.training.checkpoint_validation import validate_checkpoint

    assert tiny_run.console.count("reproduces the live model") == 2  # steps 0 and 2
    ckpt = tiny_run.path / "ckpt" / "global_step2"
    args = _args(tiny_run.overrides)
    model = load_model(ckpt)
    live = types.SimpleNamespace(model=model, tp_group=None)
    validate_checkpoint(args, live, ParallelGroups.single(), str(ckpt), 4096)
    with torch.no_grad():
        model.blocks[0].mlp.dense_h_to_4h.weight.mul_(3.0)
    with pytest.raises(CheckpointError, match="does not hold the trained weights"):
        validate_checkpoint(args, live, ParallelGroups.single(), str(ckpt), 4096)


@pytest.mark.slow  # shares one ~15 s training run (the tiny_run fixture)
def test_profile_trace_is_written_for_the_chosen_steps(tiny_run):
    trace = tiny_run.path / "logs" / "profile" / "rank00000_steps2-2.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert len(events) > 10


def test_index_map_cache_hit_is_reported(tmp_path):
    from megatron.data.gpt2_dataset import GPT2Dataset
    from megatron.data.indexed_dataset import MMapIndexedDataset

    for suffix in (".bin", ".idx"):
        shutil.copy(f"{DATA}{suffix}", tmp_path / f"austen{suffix}")
    indexed = MMapIndexedDataset(str(tmp_path / "austen"))
    docs = np.arange(10, dtype=np.int32)
    first = GPT2Dataset("train", str(tmp_path / "austen"), docs, indexed, 20, 32, 1)
    second = GPT2Dataset("train", str(tmp_path / "austen"), docs, indexed, 20, 32, 1)
    assert (first.index_cache["hit"], second.index_cache["hit"]) == (False, True)
    assert second.index_cache["paths"] == first.index_cache["paths"]


@pytest.mark.parametrize("key, stage, match", [
    ("log_grad_norm", 1, "sharded by ZeRO stage 1"),
    ("log_grad_pct_zeros", 2, "sharded by ZeRO stage 2"),
    ("log_optimizer_states", 1, "flat shards"),
    ("log_param_norm", 3, "ZeRO stage 3"),
])
def test_per_parameter_logging_that_zero_shards_is_a_one_line_error(key, stage, match):
    from megatron.errors import ConfigError
    from megatron.parallel import ParallelGroups
    from megatron.training.norms import StepNorms

    args = types.SimpleNamespace(log_grad_norm=False, log_grad_pct_zeros=False,
                                 log_param_norm=False, log_optimizer_states=False)
    setattr(args, key, True)
    engine = types.SimpleNamespace(optimizer=object(), zero_optimization_stage=lambda: stage,
                                   module=torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=match):
        StepNorms(args, engine, ParallelGroups.single())


def test_inspect_checkpoint_reads_the_batch_the_run_recorded(tmp_path):
    """A checkpoint saved by a resumed run on fewer ranks: its configs/ re-derive batch 4
    for one rank, its own record says 8 = 4 x 2; inspect shows the record (the run summary,
    else DeepSpeed's ds_config) and says where it read it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_ckpt", ROOT / "tools" / "ckpts" / "inspect_checkpoint.py")
    inspect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inspect)
    args = _args({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1})
    assert args.train_batch_size == 4
    (tmp_path / "configs").mkdir()
    ds_config = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}
    info = types.SimpleNamespace(meta={"ds_config": ds_config})
    summary = tmp_path / "configs" / "run_summary.yml"
    summary.write_text(yaml.safe_dump({"batch": {"micro_batch": 4, "gradient_accumulation": 2, "global_batch": 8}}))
    line = inspect.config_summary(args, inspect.recorded_batch(tmp_path, info))
    assert "global batch 8 (micro 4 x accumulation 2; configs/run_summary.yml)" in line
    summary.unlink()
    line = inspect.config_summary(args, inspect.recorded_batch(tmp_path, info))
    assert "global batch 12 (micro 4 x accumulation 3; DeepSpeed's ds_config)" in line
    line = inspect.config_summary(args, inspect.recorded_batch(tmp_path, types.SimpleNamespace(meta={})))
    assert "global batch 4 (micro 4 x accumulation 1; no record" in line
