"""One figure per analysis, laid out like the paper's (Agg backend: no display needed).

Models are coloured from light to dark in the order given, as in the paper, where
larger models are darker.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def _distinct(count: int):
    """One clearly different colour per model/run, in the order given (L2E vs control is a
    difference of kind, not of size: no shades of one hue)."""
    return [plt.cm.tab10(i % 10) for i in (3, 0, 1, 2, 4, 5, 6, 7, 8, 9)[:max(count, 1)]]


def _mark_layers(ax, layers, inhibited) -> None:
    """Layer ticks at 0..len-1, inhibited layers shaded grey and labelled "(L2E)"."""
    ax.set_xticks(range(len(layers)), [f"{l}\n(inhibited)" if l in inhibited else str(l) for l in layers])
    for k, l in enumerate(layers):
        if l in inhibited:
            ax.axvspan(k - 0.5, k + 0.5, color="0.92", zorder=0)
    ax.set_xlabel("layer")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bar_pairs(ax, names, first, second, labels, title):
    x = np.arange(len(names))
    ax.bar(x - 0.2, first, 0.4, label=labels[0], color="tab:blue")
    ax.bar(x + 0.2, second, 0.4, label=labels[1], color="tab:orange")
    ax.set_xticks(x, names, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("mean MS")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)


def plot_ms_validation(results: list[dict], path) -> Path:
    """Fig. 3: (a) φ_ℓ vs φ_ℓ⁻ of monosemantic neurons, (b) φ_ℓ vs random neurons' φ_ℓ*."""
    names = [r["model"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    _bar_pairs(a, names, [r["mean_phi_l"] for r in results], [r["mean_phi_l_minus"] for r in results],
               ("φ_ℓ (with feature)", "φ_ℓ⁻ (without)"), "(a) top probed neurons")
    _bar_pairs(b, names, [r["mean_phi_l"] for r in results], [r["mean_phi_star_random"] for r in results],
               ("φ_ℓ monosemantic", "φ_ℓ* random"), "(b) monosemantic vs random neurons")
    return _save(fig, path)


def plot_ks(results: list[dict], path) -> Path:
    """Fig. 4: K-S statistic per model, grouped by feature dataset."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2 + 2 * len(datasets), 4))
    for m, (model, colour) in enumerate(zip(models, _shades(len(models)))):
        values = {r["dataset"]: r["ks"] for r in results if r["model"] == model}
        x = [d + (m - (len(models) - 1) / 2) * width for d in range(len(datasets))]
        ax.bar(x, [values.get(d, np.nan) for d in datasets], width, color=colour, label=model)
    ax.set_xticks(range(len(datasets)), [d or "features" for d in datasets])
    ax.set_ylabel("K-S statistic, MS(ℓ*) vs MS(all)")
    ax.set_ylim(0, 1)
    ax.legend()
    return _save(fig, path)


def plot_ms_layers(results: list[dict], path) -> Path:
    """Fig. 5: mean φ_ℓ* per layer, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r, colour in zip(results, _shades(len(results))):
        layers = sorted(map(int, r["mean_phi_star"]))
        ax.plot(layers, [r["mean_phi_star"][str(l)] for l in layers], "o-", color=colour, label=r["model"])
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean φ_ℓ*")
    ax.set_yscale("log")
    ax.legend()
    return _save(fig, path)


def plot_fkr(results: list[dict], path) -> Path:
    """Figs. 6 and 11: FKR over the inhibition rate (minimum marked) and per layer."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r, colour in zip(results, _shades(len(results))):
        percent = 100 * np.asarray(r["rates"])
        a.plot(percent, r["fkr"], "o-", color=colour, label=r["model"])
        a.axvline(100 * r["best_rate"], color="red", lw=0.8, ls="--")
        layers = sorted(map(int, r["fkr_at_layer_rate"]))
        b.plot(layers, [r["fkr_at_layer_rate"][str(l)] for l in layers], "o-", color=colour, label=r["model"])
    a.set_xscale("log")
    a.set_xlabel("inhibited neurons (%)")
    a.set_ylabel("False Killing Rate (mean over layers)")
    a.set_title("FKR vs inhibition rate (red: minimum)")
    a.legend()
    b.set_xlabel("layer")
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.set_ylabel(f"FKR at {100 * results[0]['layer_rate']:g}%")
    b.set_title("FKR per layer")
    b.legend()
    return _save(fig, path)


def plot_probe(results: list[dict], path) -> Path:
    """App. B Fig. 10: F1 of the top probed neurons, one group of bars per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, (r, colour) in enumerate(zip(results, _shades(len(results)))):
        f1 = [row["f1"] for row in r["top"]]
        ax.bar(m + np.linspace(-0.35, 0.35, len(f1)), f1, 0.7 / max(len(f1), 1), color=colour)
        ax.hlines(np.mean(f1), m - 0.4, m + 0.4, color="black", lw=1)
    ax.set_xticks(range(len(results)), [r["model"] for r in results], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"F1 of the top {len(results[0]['top'])} neurons (line: mean)")
    ax.set_title(f"single-neuron probing ({results[0]['method']})")
    return _save(fig, path)


def plot_thresholds(runs: dict[str, dict], path) -> Path:
    """Fig. 12: τ (thick) and the batch's exact top-ρ quantile (thin) per layer over steps.

    One line style per run (the first solid, the next dashed, ...), one colour per layer.
    """
    styles = ["-", "--", ":", "-."]
    layers = sorted({int(l) for s in runs.values() for kind in s.values() for l in kind})
    colours = dict(zip(layers, plt.cm.tab10(np.arange(len(layers)) % 10)))
    fig, ax = plt.subplots(figsize=(10, 4))
    for r, (name, series) in enumerate(runs.items()):
        for kind, lw in (("tau", 2.0), ("batch_quantile", 0.8)):
            for layer, points in sorted(series[kind].items(), key=lambda kv: int(kv[0])):
                steps, values = np.asarray(points).T
                ax.plot(steps, values, styles[r % len(styles)], lw=lw, color=colours[int(layer)],
                        label=f"{name} layer {layer} {'τ' if kind == 'tau' else 'batch quantile'}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MS threshold")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_compare(summary: dict, path) -> Path:
    """compare_runs.py: per layer, mean ± sd over seeds of the offline and running top-2% MS
    and of φ*, one colour per variant, bars from zero, inhibited layers marked."""
    panels = [("heldout_fresh", "held-out top-2% MS\n(fresh statistics)"),
              ("heldout_running", "held-out top-2% MS\n(the run's running statistics)"),
              ("phi_star", "φ* on genre.jsonl\n(fresh statistics, mean-pooled)")]
    variants = list(summary)
    layers = sorted({int(i) for v in variants for i in summary[v]["layers"]})
    inhibited = sorted({int(i) for v in variants for i, row in summary[v]["layers"].items()
                        if "heldout_running" in row})
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for k, (variant, colour) in enumerate(zip(variants, _distinct(len(variants)))):
            rows = summary[variant]["layers"]
            values = [rows.get(str(i), {}).get(key, (np.nan, 0.0)) for i in layers]
            x = np.arange(len(layers)) + (k - (len(variants) - 1) / 2) * width
            ax.bar(x, [v[0] for v in values], width, yerr=[v[1] for v in values], capsize=2,
                   color=colour, label=f"{variant} (n={summary[variant]['seeds']})")
        _mark_layers(ax, layers, inhibited)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("mean ± sd over seeds")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("tiny demo (configs/local/tiny.yml), block output, ρ = 2%: L2E vs monitor-only control")
    return _save(fig, path)
