"""Tensor- and pipeline-parallel evaluation scores exactly like one process.

A tiny run trains one step (tp=2 or pp=2 on two ranks; a one-stage pipeline on one),
running lm-eval during training and saving at step 0 (Pythia's extra_save_iters) and
at the end; the same ranks then run eval.py on the saved checkpoint, which builds the
model as training does. The single-process fast path (``load_model``) must give the
same accuracy and the same log-likelihood for every request.
"""
import importlib.util
import json
from pathlib import Path

import pytest

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "local" / "tiny.yml")
TASK = "tiny_mc"
DOCS, CHOICES = 12, 4  # tests/eval/data/mc.jsonl


def write_run_config(tmp_path, task_dir, **extra) -> str:
    """A complete config file for a 1-step tiny run (its checkpoints keep this text)."""
    from megatron.config import NeoXArgs

    overrides = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "seq_length": 32, "max_position_embeddings": 32,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "train_iters": 1, "lr_decay_iters": 1, "warmup": 0.0,
        "log_interval": 1, "eval_interval": 1, "eval_iters": 0,
        "eval_tasks": [TASK], "eval_include_path": str(task_dir),
        "data_path": str(ROOT / "data" / "austen_bpe4k_text_document"),
        "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json"),
        "log_dir": str(tmp_path / "logs"), "save": str(tmp_path / "ckpt"),
        "checkpoint_factor": None, "extra_save_iters": [0],
        "l2e": {"enabled": True, "layers": [0, 1], "rate": 0.05, "loss_weight": 1.0e-3, "warmup_steps": 0},
        **extra,
    }
    config = tmp_path / "run.yml"
    config.write_text(json.dumps(NeoXArgs.from_ymls([TINY], overrides=overrides).to_dict()))
    return str(config)


def request_loglikelihoods(out: dict) -> list[float]:
    """Every (document, choice) log-likelihood of TASK, in document order."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for s in samples for resp in s["resps"]]


def _train_then_eval_cli(rank, world_size, config, output):
    """pretrain, then ``eval.py CONFIG`` as ``deepy.py`` would launch it on every rank."""
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    pretrain(NeoXArgs.from_ymls([config]))
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    eval_cli.main([config, "--checkpoint", str(Path(output).parent / "ckpt"), "--batch_size", "3",
                   "--log_samples", "--output", output])


def single_process(config):
    from megatron import load_model
    from megatron.config import NeoXArgs
    from megatron.eval import evaluate_tasks, module_logits_fn
    from megatron.tokenizer import build_tokenizer

    args = NeoXArgs.from_ymls([config])
    model = load_model(args.save)
    out = evaluate_tasks(module_logits_fn(model), build_tokenizer(args), [TASK], max_length=32,
                         batch_size=3, include_path=args.eval_include_path, log_samples=True)
    return out["results"][TASK]["acc,none"], request_loglikelihoods(out)


@pytest.mark.parametrize("layout,world_size", [
    ({"model_parallel_size": 2}, 2),
    ({"pipe_parallel_size": 2}, 2),
    ({"pipe_parallel_size": 1}, 1),  # Pythia's configs: a DeepSpeed pipeline of one stage
], ids=["tp2", "pp2", "pp1"])
def test_parallel_eval_matches_single_process(tmp_path, task_dir, layout, world_size):
    config = write_run_config(tmp_path, task_dir, **layout)
    output = tmp_path / "results.json"
    run_distributed(_train_then_eval_cli, world_size=world_size, args=(config, str(output)),
                    init_deepspeed=True)
    acc, loglikelihoods = single_process(config)

    parallel = json.loads(output.read_text())
    assert len(loglikelihoods) == DOCS * CHOICES
    assert parallel["results"][TASK]["acc,none"] == acc
    assert request_loglikelihoods(parallel) == pytest.approx(loglikelihoods, abs=1e-5)

    # Training ran lm-eval at step 1 and saved the initialisation (extra_save_iters: [0]).
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if f"eval/{TASK}_acc" in line]
    assert [line["iteration"] for line in evals] == [1]
    assert evals[0][f"eval/{TASK}_acc"] == acc  # the weights of the step-1 checkpoint
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*")) == ["global_step0", "global_step1"]


def test_hf_checkpoint_with_a_parallel_config_is_a_clear_error(tmp_path, task_dir):
    from megatron.config import NeoXArgs
    from megatron.errors import CheckpointError

    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    (tmp_path / "config.json").write_text("{}")
    args = NeoXArgs.from_ymls([write_run_config(tmp_path, task_dir, model_parallel_size=2)])
    with pytest.raises(CheckpointError, match="HF checkpoint"):
        eval_cli.build_logits_fn(args, tmp_path, None, tokenizer=None)
