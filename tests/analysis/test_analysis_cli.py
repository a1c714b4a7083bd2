"""The analysis CLIs end to end on small inputs: JSON + PNG come out.

The CLIs' ``main(argv)`` run in-process (a subprocess costs seconds of imports each);
one test runs a real subprocess for the exit status and the error line.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "analysis"
sys.path.insert(0, str(TOOLS))  # the CLIs import their siblings (_common, collect_activations)


def run(tool, *args):
    """``tools/analysis/<tool>.py`` main() with ``args``; returns the exit status."""
    spec = importlib.util.spec_from_file_location(f"analysis_cli_{tool}", TOOLS / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def test_analysis_clis_write_json_and_png(planted_folder, tmp_path):
    out = tmp_path / "figs"
    for tool, extra in (("ms_validation", ["--top", "2"]), ("ks_scale", ["--neurons", "50"]),
                        ("ms_layers", []), ("fkr", ["--rates", "0.01", "0.1"]), ("probe", ["--top", "3"])):
        assert run(tool, "--activations", planted_folder, planted_folder, "--out", out, *extra) == 0
        assert (out / f"{tool}.png").stat().st_size > 1000
        assert len(json.loads((out / f"{tool}.json").read_text())) == 2  # one result per model
    top = json.loads((out / "probe.json").read_text())[0]["top"]
    assert {r["neuron"] for r in top[:2]} == {5, 9}
    before = (out / "probe.png").read_bytes()
    assert run("probe", "--activations", planted_folder, "--out", out, "--top", "3", "--method", "logistic") == 0
    assert (out / "probe.png").read_bytes() == before  # the logistic probe has its own files
    assert json.loads((out / "probe_logistic.json").read_text())[0]["method"] == "logistic"
    assert (out / "probe_logistic.png").stat().st_size > 1000


def test_threshold_curve(tmp_path):
    lines = []
    for it in range(10, 60, 10):
        lines.append({"iteration": it, "lm_loss": 5.0, "l2e/tau/layer_1": 10.0 / it,
                      "l2e/batch_quantile/layer_1": 11.0 / it, "l2e/tau/layer_2": 12.0 / it})
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    assert run("threshold_curve", "--runs", f"L2E={metrics}", metrics, "--out", tmp_path / "figs") == 0
    series = json.loads((tmp_path / "figs" / "threshold_curve.json").read_text())
    assert set(series) == {"L2E", "run"}  # unnamed runs are named after the run folder
    assert series["L2E"]["tau"]["2"][-1] == [50, 12.0 / 50, None]  # [iteration, mean, sd]: one seed, no sd
    assert series["L2E"]["seeds"] == 1
    assert set(series["L2E"]["batch_quantile"]) == {"1"}
    assert (tmp_path / "figs" / "threshold_curve.png").is_file()


def test_user_error_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), NEOX_L2E_TRACEBACK="")
    result = subprocess.run([sys.executable, str(TOOLS / "ms_layers.py"), "--activations", str(tmp_path / "missing"),
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "collect_activations.py" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_metrics_without_l2e_keys_is_a_user_error(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"iteration": 1, "lm_loss": 3}\n')
    assert run("threshold_curve", "--runs", tmp_path / "m.jsonl", "--out", tmp_path) == 2
    assert "l2e/tau" in capsys.readouterr().err


def test_build_features_cli(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / label / f"{i}.txt").write_text(f"{label} text number {i}")
    assert run("build_features", tmp_path / "src", "--out", tmp_path / "f.jsonl", "--per-label", "2") == 0
    records = [json.loads(l) for l in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in records) == ["a", "a", "b", "b"]


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A random 2-layer GPT-NeoX saved as an HF folder with the repo's 4k Austen tokenizer."""
    import torch

    from megatron.model import GPTNeoX, ModelConfig
    from megatron.model.hf import write_hf_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, hidden_size=16, num_layers=2, num_heads=2, rotary_pct=0.25)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    write_hf_checkpoint(folder, cfg, GPTNeoX(cfg).state_dict(),
                        tokenizer_file=REPO / "data" / "tokenizers" / "austen_bpe4k.json")
    return folder


def test_collect_and_report_on_a_tiny_hf_model(tiny_hf_model, tmp_path):
    features = tmp_path / "f.jsonl"
    lines = (REPO / "data" / "features" / "languages.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    keep = [r for r in records if r["label"] in ("en", "de", "fr")][:120:4]  # 30 short records, 3 labels
    features.write_text("\n".join(json.dumps(r) for r in keep) + "\n")
    assert run("collect_activations", "--model", tiny_hf_model, "--features", features, "--out",
               tmp_path / "acts", "--neurons", "8", "--max-tokens", "16", "--site", "mlp_act") == 0
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["layers"] == [0, 1] and manifest["rows"] == len(keep) and manifest["dataset"] == "f"
    assert np.load(tmp_path / "acts" / "layer_001.npy").shape == (len(keep), 8)

    out = tmp_path / "report"
    assert run("report", "--models", f"tiny={tiny_hf_model}", "--features", features, "--out", out,
               "--neurons", "8", "--max-tokens", "16", "--top", "3", "--ks-neurons", "10") == 0
    page = (out / "report.md").read_text()
    for figure in ("f/ms_validation.png", "f/fkr.png", "f/ms_layers.png", "f/probe.png", "ks_scale.png"):
        assert f"]({figure})" in page and (out / figure).is_file()
    assert '<img src="ks_scale.png"' in (out / "report.html").read_text()
    assert "One seed per arm" in page and "No verdict table" in page and "Online vs offline" in page
    assert "<b>One seed per arm</b>" in (out / "report.html").read_text()
