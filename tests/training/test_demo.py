"""The CPU demo (configs/local/tiny.yml, shrunk) trains on the embedded corpus: loss falls."""
import json
import os
import subprocess
import sys
from pathlib import Path

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "local" / "tiny.yml")


def _pretrain(rank, world_size, overrides):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    args = NeoXArgs.from_ymls([TINY], overrides=overrides)
    return pretrain(args)


def test_tiny_demo_trains_and_loss_falls(tmp_path):
    overrides = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 64, "max_position_embeddings": 64,
        "train_micro_batch_size_per_gpu": 4,
        "train_iters": 30, "lr_decay_iters": 30, "warmup": 0.1,
        "log_interval": 10, "eval_interval": 30, "eval_iters": 2,
        "data_path": str(ROOT / "data" / "austen_bpe4k_text_document"),
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(tmp_path / "logs"), "save": str(tmp_path / "ckpt"), "checkpoint_factor": None,
    }
    (result,) = run_distributed(_pretrain, world_size=1, args=(overrides,), init_deepspeed=True)
    losses = result["lm_loss"]
    assert result["iteration"] == 30 and len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step30"
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "train/lm_loss" in m]
    assert len(logged) == 3  # log_interval 10 over 30 iterations
    assert any("train/l2e_loss" in m for m in logged)  # tiny.yml trains with L2E
    assert any("validation/lm_loss" in m for m in lines)


def test_train_cli_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text('{"num_layerz": 2}\n')
    env = dict(os.environ, WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(bad)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "num_layers" in proc.stderr


def test_pipeline_pretrain_with_eval_and_checkpoint(tmp_path):
    overrides = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 32, "max_position_embeddings": 32, "pipe_parallel_size": 2,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "train_iters": 6, "lr_decay_iters": 6, "log_interval": 3, "eval_interval": 3, "eval_iters": 1,
        "data_path": str(ROOT / "data" / "austen_bpe4k_text_document"),
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(tmp_path / "logs"), "save": str(tmp_path / "ckpt"), "checkpoint_factor": 3,
    }
    results = run_distributed(_pretrain, world_size=2, args=(overrides,), init_deepspeed=True)
    assert results[0]["lm_loss"] == results[1]["lm_loss"]  # the last stage's loss, on both stages
    assert len(results[0]["lm_loss"]) == 6
    ckpt = tmp_path / "ckpt" / "global_step6"
    # NeoX's pipeline layout: one file per layer (embed 0, blocks 2-3, norm 5, head 6)
    assert sorted(p.name for p in ckpt.glob("layer_*")) == [
        f"layer_{i:02d}-model_00-model_states.pt" for i in (0, 2, 3, 5, 6)]
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert sum("validation/lm_loss" in m for m in lines) == 2
