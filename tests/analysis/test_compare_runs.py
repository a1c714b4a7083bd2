"""compare_runs.py's pieces that need no training: held-out windows, mean ± sd, table, figure;
and the figure conventions of megatron.analysis.plots."""
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from analysis_synth import load_tool

from megatron.analysis import plots
from megatron.data.data_utils import split_boundaries
from megatron.data.indexed_dataset import MMapIndexedDataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare():
    return load_tool("compare_runs")


def test_heldout_windows_are_the_validation_chapters(compare):
    windows = compare.heldout_windows()
    data = MMapIndexedDataset(str(REPO / "data" / "austen_bpe4k_text_document"))
    _, start, stop, _ = split_boundaries("949,50,1", len(data))
    valid = np.concatenate([data.get(i) for i in range(start, stop)])
    assert windows.shape[1] == 128 and len(windows) == len(valid) // 128 > 100
    assert np.array_equal(windows.flatten().numpy(), valid[:windows.numel()])
    first_train_tokens = np.concatenate([data.get(i) for i in range(3)])[:128]
    assert not any(np.array_equal(w.numpy(), first_train_tokens) for w in windows)


def _run(loss, fresh, running=None):
    layers = {str(i): {"heldout_fresh": fresh + i, "phi_star": 2.0} for i in range(4)}
    for i in (1, 2):
        layers[str(i)].update(tau=0.5, batch_quantile=0.5)
        if running is not None:
            layers[str(i)]["heldout_running"] = running
    return {"validation_loss": loss, "layers": layers}


def test_summary_table_and_figure(compare, tmp_path):
    measured = {"L2E 1": _run(4.8, 5.0, 0.4), "L2E 2": _run(4.9, 6.0, 0.6),
                "monitor 1": _run(4.9, 5.5, 5.0), "monitor 2": _run(5.1, 5.5, 5.0),
                "L2E momentum 1": _run(4.8, 5.0, 1.0), "L2E momentum 2": _run(4.8, 5.0, 1.0)}
    summary = json.loads(json.dumps(compare.summarise(measured)))
    assert summary["L2E"]["validation_loss"] == pytest.approx([4.85, np.std([4.8, 4.9], ddof=1)])
    assert summary["L2E"]["layers"]["1"]["heldout_fresh"] == pytest.approx([6.5, np.std([6.0, 7.0], ddof=1)])
    assert "heldout_running" not in summary["monitor"]["layers"]["0"]  # inhibited layers only
    table = "\n".join(compare.markdown(summary, [1, 2]))
    assert "| held-out top-2% MS, running statistics | 1 | 0.5 ± 0.14 | 5 ± 0 | 1 ± 0 |" in table
    assert (plots.plot_compare(summary, tmp_path / "c.png")).stat().st_size > 10_000


def test_axis_is_logarithmic_only_past_a_decade():
    fig, (a, b) = plt.subplots(1, 2)
    plots._y_scale(a, [0.9, 1.0, 5.0])
    plots._y_scale(b, [0.3, 5.0])
    assert a.get_yscale() == "linear" and a.get_ylim()[0] == 0
    assert b.get_yscale() == "log"
    plt.close(fig)
