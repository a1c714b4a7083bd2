"""tools/bench/gpu_check.py: the --smoke run (every check's code path on CPU) and its report."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench", "gpu_check.py")
NAMES = ["bf16_train", "fp16_train", "attention_parity", "throughput", "hf_step_ratio", "l2e_overhead", "l2e_train"]
CUDA_ONLY = {"fp16_train", "attention_parity"}  # fp16 and flash-attn kernels


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; a GPU runs the real check")
def test_smoke_run_reports_every_check(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, TOOL, "--smoke", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    report = json.loads(out.read_text())
    assert {"device", "torch", "checks"} <= set(report) and report["device"] == "cpu"
    assert [c["name"] for c in report["checks"]] == NAMES
    for c in report["checks"]:
        assert c["status"] in ("pass", "fail", "skip") and isinstance(c["detail"], str) and c["detail"]
        expected = "skip" if c["name"] in CUDA_ONLY else "pass"
        assert c["status"] == expected, f"{c['name']}: {c['status']}: {c['detail']}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert [s["shape"] for s in checks["throughput"]["shapes"]] == ["160M", "410M", "1B"]
    assert all(s["tokens_per_s"] > 0 and s["peak_memory_gib"] > 0 for s in checks["throughput"]["shapes"])
    assert checks["hf_step_ratio"]["ratio"] > 0
    assert [r["shape"] for r in checks["l2e_overhead"]["shapes"]] == ["70M", "410M", "2-8B"]
    losses = checks["bf16_train"]["losses"]
    assert losses[-1] < losses[0]
    assert "table" not in report and "bf16_train" in proc.stdout  # the table is printed


def test_a_crashing_check_is_a_failure_and_the_run_goes_on():
    checker = _tool().Checker(smoke=True, peak_tflops=None)
    checker.checks = lambda: {"bf16_train": lambda: 1 / 0}
    result = checker.run("bf16_train")
    assert result["status"] == "fail" and result["detail"].startswith("ZeroDivisionError")
    assert result["name"] == "bf16_train" and result["seconds"] >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_the_full_run_is_a_one_line_error():
    proc = subprocess.run([sys.executable, TOOL], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr and "Traceback" not in proc.stderr


def test_shapes_shrink_to_fit_memory_and_time():
    checker = _tool().Checker(smoke=False, peak_tflops=989.0)  # the GPU logic, without a GPU
    # 1B's weights, gradients and Adam states alone are ~19 GiB: the micro-batch goes to 1,
    # then layers go until plan_run's estimate fits 85% of 20 GiB
    args, note = checker._fit("1B", budget_s=1e6, memory_gib=20.0)
    assert args.train_micro_batch_size_per_gpu == 1 and args.num_layers < 16
    assert "micro-batch 1 instead of 4 (memory)" in note and f"{args.num_layers} of 16 layers (memory)" in note
    args, note = checker._fit("410M", budget_s=1e-3, memory_gib=1e4)  # no time at all: 2 layers
    assert args.num_layers == 2 and note == "; shrunk: 2 of 24 layers (time)"
    args, note = checker._fit("160M", budget_s=1e6, memory_gib=1e4)
    assert note == "" and args.num_layers == 12 and args.train_micro_batch_size_per_gpu == 32
