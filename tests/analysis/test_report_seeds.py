"""Several seeds per arm in the report: mean ± sd, a verdict computed from the numbers,
"one seed" said wherever there is only one, and summary numbers equal to the figures' data."""
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from analysis_synth import load_tool, planted_layer, write_activation_folder

from megatron.analysis import fkr, ks_scale, ms_layers
from megatron.analysis.seeds import SPREAD_FACTOR, aggregate, verdict
from megatron.analysis.thresholds import aggregate_series

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    return load_tool("report")


def _arm(tmp_path, name, seeds, planted, inhibited):
    """``seeds`` activation folders of one arm: layers 0-2, ``planted`` neurons in layers 1 and 2."""
    folders = []
    for seed in range(seeds):
        rng = np.random.default_rng(100 * seed + len(name))
        layers = {}
        for layer in (0, 1, 2):
            layers[layer], labels = planted_layer(rng, planted=planted if layer else ())
        folders.append(write_activation_folder(tmp_path / f"{name}_{seed}", layers, labels, name=name,
                                               inhibited_layers=inhibited))
    return folders


def _studies(report, arms, out):
    common = report._common
    results = {name: common.run_study(name, study, plot, arms, out, **opts)
               for name, study, plot, opts in (("ms_validation", report.ms_validation, report.plot_ms_validation,
                                                {"top": 3}),
                                               ("ms_layers", ms_layers, report.plot_ms_layers, {}),
                                               ("fkr", fkr, report.plot_fkr, {}),
                                               ("probe", report.probe, report.plot_probe, {"top": 3}))}
    results["ks_scale"] = common.run_study("ks_scale", ks_scale, report.plot_ks, arms, out, num_neurons=60)
    return results


def _row(lines, prefix):
    return next(l for l in lines if l.startswith(prefix)).strip("|").split(" | ")


def test_verdict_rule():
    down = verdict("down", [1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert down["moved"] == "down" and down["as_expected"] and down["beyond_spread"]
    assert down["delta_in_sds"] == pytest.approx(1.0 / 0.1)
    overlap = verdict("down", [1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert overlap["beyond_spread"] is False and overlap["as_expected"]
    up = verdict("down", [2.0], [1.0])
    assert up["moved"] == "up" and not up["as_expected"] and up["beyond_spread"] is None


def test_aggregate_means_and_sds_over_seeds():
    seeds = [{"model": "L2E", "mean_phi_star": {"1": v, "2": 2 * v}} for v in (1.0, 2.0, 3.0)]
    out = aggregate("ms_layers", seeds)
    assert out["seeds"] == 3 and out["mean_phi_star"] == {"1": 2.0, "2": 4.0}
    assert out["sd"]["mean_phi_star"]["2"] == pytest.approx(2.0)
    assert aggregate("ms_layers", seeds[:1])["sd"]["mean_phi_star"] == {"1": None, "2": None}
    series = [{"tau": {"1": [[10, a], [20, b]]}, "batch_quantile": {}} for a, b in ((1.0, 3.0), (2.0, 5.0))]
    assert aggregate_series(series)["tau"]["1"][1] == [20, 4.0, pytest.approx(math.sqrt(2))]


def test_three_seeds_give_mean_sd_and_a_verdict_from_the_numbers(report, tmp_path):
    # the control's layers 1-2 carry planted monosemantic neurons; L2E's carry none
    planted = tuple((c, c % 10, 1) for c in range(8))
    arms = [_arm(tmp_path, "L2E", 3, (), (1, 2)), _arm(tmp_path, "monitor", 3, planted, ())]
    out = tmp_path / "figs"
    results = _studies(report, arms, out)
    lines = report.verdict_table(("L2E", "monitor"), [1, 2], {"L2E": 3, "monitor": 3},
                                 {"synthetic": results}, {}, {})
    row = _row(lines, "| φ* (synthetic")
    figure = json.loads((out / "ms_layers.json").read_text())
    per_arm = {r["model"]: [np.mean([s["mean_phi_star"][l] for l in ("1", "2")]) for s in r["per_seed"]]
               for r in figure}
    for cell, arm in ((row[2], "L2E"), (row[3], "monitor")):
        assert cell == f"{statistics.mean(per_arm[arm]):.3g} ± {statistics.stdev(per_arm[arm]):.2g}"
    pooled = math.sqrt((statistics.variance(per_arm["L2E"]) + statistics.variance(per_arm["monitor"])) / 2)
    beyond = abs(statistics.mean(per_arm["L2E"]) - statistics.mean(per_arm["monitor"])) > SPREAD_FACTOR * pooled
    assert row[4] == "down (as expected)" and row[5].startswith("yes" if beyond else "no")
    assert _row(lines, "| online top-ρ MS")[4].startswith("not measured")
    assert any("Online vs offline" in l for l in lines)
    assert all(r["seeds"] == 3 and r["sd"]["mean_phi_star"]["1"] is not None for r in figure)


def test_one_seed_says_so_and_summary_equals_the_figures(report, tmp_path):
    planted = ((5, 3, 1),)
    arms = [_arm(tmp_path, "L2E", 1, (), (1, 2)), _arm(tmp_path, "monitor", 1, planted, ())]
    out = tmp_path / "figs"
    results = _studies(report, arms, out)
    lines = report.verdict_table(("L2E", "monitor"), [1, 2], {"L2E": 1, "monitor": 1},
                                 {"synthetic": results}, {}, {})
    assert "cannot tell (one seed)" in _row(lines, "| K-S (synthetic")[5]
    assert "one seed per model" in " ".join(lines)
    table = report.summary("synthetic", results)
    layers = json.loads((out / "ms_layers.json").read_text())
    fkr_data = json.loads((out / "fkr.json").read_text())
    for model, mono, fk in zip(("L2E", "monitor"), layers, fkr_data):
        cells = _row(table, f"| {model} |")
        assert cells[1] == "1"
        assert cells[4] == f"{np.mean(list(mono['mean_phi_star'].values())):.3g} (one seed)"
        assert cells[5] == f"{np.mean(list(fk['fkr_at_layer_rate'].values())):.3g} (one seed)"
    # the figure of a two-model plot names whose layers are shaded
    import matplotlib.pyplot as plt

    from megatron.analysis import plots
    fig, ax = plt.subplots()
    plots._mark_layers(ax, [0, 1, 2], *plots._inhibited(layers))
    assert "grey: layers inhibited while training L2E)" in ax.get_xlabel()
    plt.close(fig)


def test_arms_parse_commas_and_repeats(report):
    arms = report._common.parse_arms(["L2E=a,b", "L2E=c", "m=d", "some/path/e"], lambda p: Path(p).name)
    assert arms == {"L2E": ["a", "b", "c"], "m": ["d"], "e": ["some/path/e"]}


def test_heldout_scores_fresh_and_running_statistics():
    import torch

    from megatron.analysis.heldout import heldout_ms
    from megatron.model import GPTNeoX, ModelConfig

    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, rotary_pct=0.25)).eval()
    windows = torch.randint(0, 64, (12, 6))
    # running statistics of layer 1 centred at 0 with variance 4: phi = z^2 / 4
    running = {1: {"n": 100, "weight": 100.0, "mean": torch.zeros(6, 16), "M2": torch.full((6, 16), 4.0 * 99)}}
    scores = heldout_ms(model, windows, running, rate=0.1)
    z = {}
    hooks = [b.register_forward_hook(lambda m, x, out, i=i: z.__setitem__(i, out.detach().float()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()

    def kth_from_top(phi):  # the value with 10% of all values at or above it
        flat = np.sort(phi.flatten().numpy())
        return float(flat[len(flat) - round(0.1 * len(flat))])

    z0 = z[0].numpy().astype(np.float64)
    fresh = torch.from_numpy((z0 - z0.mean(0)) ** 2 / z0.var(0, ddof=1))
    assert scores[0]["heldout_fresh"] == pytest.approx(kth_from_top(fresh), rel=1e-4)
    assert scores[1]["heldout_running"] == pytest.approx(kth_from_top(z[1] ** 2 / 4), rel=1e-5)
    assert "heldout_running" not in scores[0]
