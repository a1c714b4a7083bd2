"""tools/plan_run.py: fields, consistency of the memory model, exact parameter counts."""
import importlib.util
import itertools
import json
import os
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
ROOT = os.path.join(TOOLS, "..")


def _tool():
    sys.path.insert(0, TOOLS)
    spec = importlib.util.spec_from_file_location("plan_run", os.path.join(TOOLS, "plan_run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(model="70M", gpus=24, l2e=True, **overrides):
    from megatron.config import NeoXArgs

    configs = [os.path.join(ROOT, "configs", "pythia", f"{model}.yml")]
    if l2e:
        configs.append(os.path.join(ROOT, "configs", "l2e", model, "l2e.yml"))
    base = {"train_batch_size": 1008, "train_micro_batch_size_per_gpu": 21, "gradient_accumulation_steps": 2}
    if gpus != 24:
        base = {"train_batch_size": None, "gradient_accumulation_steps": 1}
    args = NeoXArgs.from_ymls(configs, overrides={**base, "train_iters": 14300, **overrides})
    args.set_vocab_size(50277)
    return _tool().plan(args, gpus, 80.0)


@pytest.mark.parametrize("model,count", [("70M", 70_426_624), ("410M", 405_334_016), ("2-8B", 2_775_208_960)])
def test_params_total_is_pythias_exact_count(model, count):
    assert _plan(model)["params_total"] == count


def test_fields_and_their_consistency():
    p = _plan("410M")
    m = p["memory_gib"]
    for key in ("weights", "gradients", "optimizer", "activations", "l2e", "total",
                "activations_with_checkpointing", "activations_without_checkpointing"):
        assert m[key] >= 0, key
    parts = ("weights", "gradients", "optimizer", "zero_buckets", "activations", "l2e", "overhead")
    assert m["total"] == pytest.approx(sum(m[k] for k in parts), abs=0.01)
    assert p["fits"] == (p["margin_gib"] >= 0) and p["margin_gib"] == pytest.approx(80.0 - m["total"], abs=0.01)
    assert p["data_parallel_size"] == 24 and p["gradient_accumulation_steps"] == 2
    assert p["tokens_per_step"] == 1008 * 2048
    assert p["est_hours"] == pytest.approx(p["est_step_seconds"] * 14300 / 3600, rel=1e-2)
    # 6 N T dominates the FLOPs; attention adds 12 L s h T
    assert 6 * 405e6 * p["tokens_per_step"] < p["flops_per_step"] < 8 * 405e6 * p["tokens_per_step"]


def test_zero1_optimizer_memory_halves_when_dp_doubles():
    small, large = _plan("410M", gpus=8), _plan("410M", gpus=16)
    assert large["data_parallel_size"] == 2 * small["data_parallel_size"]
    assert large["memory_gib"]["optimizer"] == pytest.approx(small["memory_gib"]["optimizer"] / 2, rel=1e-3)
    assert large["memory_gib"]["weights"] == small["memory_gib"]["weights"]


def test_checkpointing_lowers_activations_and_l2e_adds_memory():
    on = _plan("410M", checkpoint_activations=True)
    off = _plan("410M", checkpoint_activations=False)
    assert on["memory_gib"]["activations"] < off["memory_gib"]["activations"]
    assert on["memory_gib"]["activations_without_checkpointing"] == off["memory_gib"]["activations"]
    assert _plan("410M", l2e=False)["memory_gib"]["l2e"] == 0 < on["memory_gib"]["l2e"]


def test_tensor_parallelism_splits_the_weights():
    p1, p2 = _plan("2-8B"), _plan("2-8B", model_parallel_size=2, gradient_accumulation_steps=4)
    assert p2["memory_gib"]["weights"] == pytest.approx(p1["memory_gib"]["weights"] / 2, rel=0.01)


def test_cli_json_and_config_errors(capsys):
    tool = _tool()
    cfg = [os.path.join(ROOT, "configs", "pythia", "70M.yml")]
    tool.main(cfg + ["--gpus", "32", "--gpu-memory-gib", "80", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["data_parallel_size"] == 32 and out["fits"] is True
    with pytest.raises(SystemExit) as e:  # bad input: a one-line error, no proposals
        tool.main(cfg + ["--gpus", "0", "--gpu-memory-gib", "80"])
    assert e.value.code == 2 and "--gpus must be >= 1" in capsys.readouterr().err


def test_pipeline_bubble_lengthens_the_step():
    flat = _plan("410M", gpus=8)
    piped = _plan("410M", gpus=8, pipe_parallel_size=2, gradient_accumulation_steps=2)  # same batch
    assert piped["train_batch_size"] == flat["train_batch_size"]
    assert piped["pipeline_bubble"] == pytest.approx((2 + 2 - 1) / 2)
    assert piped["est_step_seconds"] == pytest.approx(flat["est_step_seconds"] * piped["pipeline_bubble"], rel=1e-3)


def test_batch_that_does_not_divide_gets_layouts_that_keep_it(capsys, monkeypatch):
    """The README's example: 2.8B's 1,024 sequences on 24 GPUs. Every proposal keeps the
    batch, is planned by the same model as a plain plan, and pp 3 x dp 8 comes first."""
    tool = _tool()
    monkeypatch.chdir(ROOT)  # the config paths in the messages as the docs quote them
    cfg = ["configs/pythia/2-8B.yml", "configs/l2e/2-8B/l2e.yml"]
    overrides = ["--override", "train_iters=14300", "lr_decay_iters=14300"]  # docs/l2e.md §8's command
    tool.main(cfg + ["--gpus", "24", "--gpu-memory-gib", "80", "--json", *overrides])
    out = json.loads(capsys.readouterr().out)
    assert "not divisible" in out["problem"] and out["train_batch_size"] == 1024
    layouts = out["layouts"]
    assert len(layouts) >= 2
    for p in layouts:
        tp, pp, dp = p["tensor_parallel_size"], p["pipe_parallel_size"], p["data_parallel_size"]
        assert tp * pp * dp == 24 and p["train_batch_size"] == 1024
        assert p["train_micro_batch_size_per_gpu"] * p["gradient_accumulation_steps"] * dp == 1024
    best = layouts[0]
    assert (best["tensor_parallel_size"], best["pipe_parallel_size"], best["data_parallel_size"]) == (1, 3, 8)
    assert best["fits"]
    # the same numbers as planning that layout directly
    direct = _plan("2-8B", pipe_parallel_size=3, train_batch_size=1024, train_micro_batch_size_per_gpu=16,
                   gradient_accumulation_steps=8)
    assert best["memory_gib"] == direct["memory_gib"] and best["est_step_seconds"] == direct["est_step_seconds"]
    keys = [(not p["fits"], p["tensor_parallel_size"], p["est_step_seconds"]) for p in layouts]
    assert keys == sorted(keys)
    # below and above on tp 1 x pp 1 x dp 24: 1008 = 24 x 42 (14 x 3); 1032 = 24 x 43 is
    # skipped (43 is prime: micro-batch 1), 1056 = 24 x 44 (11 x 4) is the next
    nearest = {p["train_batch_size"]: p for p in out["nearest_batches"]}
    assert sorted(nearest) == [1008, 1056]
    assert all(p["data_parallel_size"] == 24 and p["train_micro_batch_size_per_gpu"] >= 8 for p in nearest.values())
    tool.main(cfg + ["--gpus", "24", "--gpu-memory-gib", "80", *overrides])  # the table form exits 0 too
    printed = capsys.readouterr().out.splitlines()
    assert "pipe_parallel_size=3" in printed[-1]
    # docs/l2e.md §8 quotes this output (rows left out as "..."): every quoted line is printed
    doc = open(os.path.join(ROOT, "docs", "l2e.md")).read().split("$ python tools/plan_run.py configs/pythia/2-8B.yml")[1]
    block = itertools.takewhile(lambda line: not line or line.startswith("    "), doc.split("\n")[2:])
    quoted = [line.strip() for line in block if line.strip() not in ("", "...")]
    assert len(quoted) >= 6
    assert [line for line in quoted if line not in {p.strip() for p in printed}] == []
