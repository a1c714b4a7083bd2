"""One figure per analysis, laid out like the paper's (Agg backend: no display needed).

Conventions (so that a figure cannot mislead): every model or run has its own colour and
its name in the legend (L2E vs control is a difference of kind, not of size, so no shades
of one hue); bars start at zero; an axis is logarithmic only when its values span more
than a decade; titles name the dataset, the site and the pooling the numbers come from;
layers that L2E inhibited while training are shaded, and the axis says in whose model;
every figure says how many seeds stand behind each model and, with several, shows mean ± sd
(error bars or bands: ``result["sd"]``, megatron.analysis.seeds).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402

from megatron.analysis.seeds import seed_note  # noqa: E402


def _distinct(count: int):
    """One clearly different colour per model/run, in the order given."""
    return [plt.cm.tab10(i % 10) for i in (3, 0, 1, 2, 4, 5, 6, 7, 8, 9)[:max(count, 1)]]


def _context(results: list[dict]) -> str:
    """"dataset genre, block_output (mean-pooled)" from the studies' metadata."""
    def one(key):
        values = list(dict.fromkeys(str(r.get(key, "")) for r in results if r.get(key)))
        return "/".join(values)

    dataset, site, pooling = one("dataset"), one("site"), one("pooling")
    parts = [f"dataset {dataset}" if dataset else "", site + (f" ({pooling}-pooled)" if pooling else "")]
    return ", ".join(p for p in parts if p)


def _inhibited(results: list[dict]) -> tuple[list[int], list[str]]:
    """The layers L2E inhibited in any of the models, and the models it inhibited them in."""
    owners = [r["model"] for r in results if r.get("inhibited_layers")]
    return sorted({int(l) for r in results for l in r.get("inhibited_layers", [])}), owners


def _seeds(results: list[dict]) -> str:
    return seed_note({str(r["model"]): r.get("seeds", 1) for r in results})


def _sd(result: dict, key: str, *index):
    """The sd of ``result[key][index...]`` over seeds, or None (one seed)."""
    value = result.get("sd", {}).get(key)
    for i in index:
        value = None if value is None else value[i]
    return value


def _errors(sds):
    """``yerr`` for matplotlib: None when no value has an sd."""
    return None if all(s is None for s in sds) else [0.0 if s is None else s for s in sds]


def _mark_layers(ax, layers, inhibited, owners=(), positions=None) -> None:
    """Integer layer ticks; inhibited layers shaded grey, labelled "(inhibited)", and the
    axis label names the models they were inhibited in (the others only tracked or plain)."""
    positions = list(range(len(layers))) if positions is None else list(positions)
    ax.set_xticks(positions, [f"{l}\n(inhibited)" if l in inhibited else str(l) for l in layers])
    for x, l in zip(positions, layers):
        if l in inhibited:
            ax.axvspan(x - 0.5, x + 0.5, color="0.9", zorder=0)
    whose = f"while training {', '.join(map(str, owners))}" if owners else "by L2E in training"
    ax.set_xlabel("layer" + (f"  (grey: layers inhibited {whose})" if inhibited else ""))


def _y_scale(ax, values) -> None:
    """Logarithmic only when the positive values span more than a decade; else linear from 0."""
    v = np.asarray([x for x in np.ravel(values) if np.isfinite(x) and x > 0])
    if len(v) and v.max() / v.min() > 10:
        ax.set_yscale("log")
        # ticks at 1, 2, 5 x 10^k, written 0.5, 2, 10 rather than 5×10⁻¹
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0, top=1.15 * v.max() if len(v) else None)


def _save(fig, path, rect=(0, 0, 1, 1)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bar_pairs(ax, names, first, second, labels, title, errors=(None, None)):
    """Two bars per model from zero, each labelled with its value (± sd over seeds if given)."""
    x = np.arange(len(names))
    for offset, values, label, colour, yerr in ((-0.2, first, labels[0], "tab:purple", errors[0]),
                                                (0.2, second, labels[1], "tab:gray", errors[1])):
        bars = ax.bar(x + offset, values, 0.4, label=label, color=colour, yerr=yerr, capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.15 * max(max(first), max(second)))
    ax.set_ylabel("mean MS")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8)


def plot_ms_validation(results: list[dict], path) -> Path:
    """Fig. 3: (a) φ_ℓ vs φ_ℓ⁻ of monosemantic neurons, (b) φ_ℓ vs random neurons' φ_ℓ*."""
    names = [r["model"] for r in results]
    method = results[0].get("method", "threshold")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.3))
    errors = {k: _errors([_sd(r, k) for r in results])
              for k in ("mean_phi_l", "mean_phi_l_minus", "mean_phi_star_random")}
    _bar_pairs(a, names, [r["mean_phi_l"] for r in results], [r["mean_phi_l_minus"] for r in results],
               ("φ_ℓ (inputs with the feature)", "φ_ℓ⁻ (inputs without)"),
               f"(a) top neurons by single-neuron probing ({method})",
               (errors["mean_phi_l"], errors["mean_phi_l_minus"]))
    _bar_pairs(b, names, [r["mean_phi_l"] for r in results], [r["mean_phi_star_random"] for r in results],
               ("φ_ℓ of the probed neurons", f"φ_ℓ* of {len(results[0]['random'])} random neurons"),
               "(b) probed vs random neurons", (errors["mean_phi_l"], errors["mean_phi_star_random"]))
    fig.suptitle(f"MS validation (paper Fig. 3): {_context(results)}\n{_seeds(results)}", fontsize=11)
    return _save(fig, path)


def plot_ks(results: list[dict], path) -> Path:
    """Fig. 4: K-S statistic per model, grouped by feature dataset."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(3 + 2 * len(datasets), 4))
    for m, (model, colour) in enumerate(zip(models, _distinct(len(models)))):
        values = {r["dataset"]: (r["ks"], _sd(r, "ks")) for r in results if r["model"] == model}
        x = [d + (m - (len(models) - 1) / 2) * width for d in range(len(datasets))]
        bars = ax.bar(x, [values.get(d, (np.nan,))[0] for d in datasets], width, color=colour, label=model,
                      yerr=_errors([values.get(d, (0, None))[1] for d in datasets]), capsize=3)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(datasets)), [f"dataset {d}" if d else "features" for d in datasets])
    ax.set_ylabel("K-S statistic, MS(ℓ*) vs MS(all)")
    ax.set_ylim(0, 1)
    ax.set_title(f"K-S statistic (paper Fig. 4), {results[0].get('site', '')}, "
                 f"{results[0].get('neurons', '')} random neurons per model\n{_seeds(results)}", fontsize=10)
    ax.legend()
    return _save(fig, path)


def plot_ms_layers(results: list[dict], path) -> Path:
    """Fig. 5: mean φ_ℓ* per layer, one line per model."""
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    values = []
    layers = sorted({int(l) for r in results for l in r["mean_phi_star"]})
    for r, colour in zip(results, _distinct(len(results))):
        own = sorted(map(int, r["mean_phi_star"]))
        y = [r["mean_phi_star"][str(l)] for l in own]
        values += y
        ax.errorbar(own, y, yerr=_errors([_sd(r, "mean_phi_star", str(l)) for l in own]), fmt="o-",
                    color=colour, capsize=3, label=r["model"])
    _mark_layers(ax, layers, *_inhibited(results), positions=layers)
    ax.set_ylabel("mean φ_ℓ* (fresh statistics over the dataset)")
    _y_scale(ax, values)
    ax.set_title(f"mean φ_ℓ* per layer over all collected neurons (paper Fig. 5)\n{_context(results)}\n"
                 f"{_seeds(results)}", fontsize=9)
    ax.legend()
    return _save(fig, path)


def plot_fkr(results: list[dict], path) -> Path:
    """Figs. 6 and 11: FKR over the inhibition rate (each minimum marked and labelled) and per layer."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r, colour in zip(results, _distinct(len(results))):
        percent = 100 * np.asarray(r["rates"])
        a.errorbar(percent, r["fkr"], yerr=_errors(_sd(r, "fkr") or [None]), fmt="o-", color=colour,
                   capsize=3, label=r["model"])
        best = int(np.argmin(r["fkr"]))
        a.plot(percent[best], r["fkr"][best], "v", color=colour, ms=11, mec="black")
        a.annotate(f"min {r['fkr'][best]:.3f} at {percent[best]:g}%", (percent[best], r["fkr"][best]),
                   textcoords="offset points", xytext=(8, -14), ha="left", fontsize=8, color=colour)
        layers = sorted(map(int, r["fkr_at_layer_rate"]))
        b.errorbar(layers, [r["fkr_at_layer_rate"][str(l)] for l in layers], fmt="o-", color=colour,
                   yerr=_errors([_sd(r, "fkr_at_layer_rate", str(l)) for l in layers]), capsize=3,
                   label=r["model"])
    a.set_xscale("log")  # the rates span two decades (0.1% ... 10%)
    a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    a.set_xticks(100 * np.asarray(results[0]["rates"]))
    a.set_xlabel("inhibition rate ρ (share of neurons selected)")
    a.set_ylabel("False Killing Rate (mean over layers)")
    a.set_ylim(0, 1)  # a rate: the whole range, so that gaps between models keep their size
    a.set_title("FKR vs ρ (paper Fig. 6); ▼ = each model's minimum", fontsize=10)
    a.legend()
    layers = sorted({int(l) for r in results for l in r["fkr_at_layer_rate"]})
    _mark_layers(b, layers, *_inhibited(results), positions=layers)
    b.set_ylim(0, 1)
    b.set_ylabel(f"FKR at ρ = {100 * results[0]['layer_rate']:g}%")
    b.set_title(f"FKR per layer at ρ = {100 * results[0]['layer_rate']:g}% (paper Fig. 11)", fontsize=10)
    b.legend()
    fig.suptitle(f"False Killing Rate: {_context(results)}; {_seeds(results)}", fontsize=11)
    return _save(fig, path)


def plot_probe(results: list[dict], path) -> Path:
    """App. B Fig. 10: F1 of the top probed neurons, one group of bars per model."""
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    saturated = 0
    for m, (r, colour) in enumerate(zip(results, _distinct(len(results)))):
        f1 = r["top_f1"]
        saturated += sum(v >= 0.999 for v in f1)
        ax.bar(m + np.linspace(-0.35, 0.35, len(f1)), f1, 0.7 / max(len(f1), 1), color=colour,
               label=r["model"], yerr=_errors(_sd(r, "top_f1") or [None]), capsize=2)
        ax.hlines(np.mean(f1), m - 0.4, m + 0.4, color="black", lw=1)
        ax.annotate(f"mean {np.mean(f1):.3f}", (m, 1.0), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=8)
    ax.set_xticks(range(len(results)), [r["model"] for r in results], rotation=20)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"F1 of the top {len(results[0]['top_f1'])} neurons by rank (line: mean)")
    note = f"\n{saturated} bars at F1 = 1: this dataset is too easy to rank neurons" if saturated else ""
    ax.set_title(f"single-neuron probing ({results[0]['method']}), {_context(results)}{note}\n{_seeds(results)}",
                 fontsize=9)
    return _save(fig, path)


def plot_thresholds(runs: dict[str, dict], path) -> Path:
    """Fig. 12: τ (thick) and the batch's top-ρ MS quantile (thin, dashed; a sampled
    estimate, docs/l2e.md §3) over steps, one panel per layer, one colour per run; with
    several seeds the mean line and a ± sd band. ``runs``: {name: aggregate_series(...)}."""
    kinds = ("tau", "batch_quantile")
    layers = sorted({int(l) for s in runs.values() for kind in kinds for l in s.get(kind, {})})
    fig, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 4.4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        values = []
        for (name, series), colour in zip(runs.items(), _distinct(len(runs))):
            for kind, style in (("tau", dict(lw=2.2, ls="-")), ("batch_quantile", dict(lw=1.0, ls="--"))):
                points = series[kind].get(str(layer))
                if not points:
                    continue
                steps = np.asarray([p[0] for p in points])
                y = np.asarray([p[1] for p in points])
                values += list(y)
                label = "τ" if kind == "tau" else "batch top-ρ MS quantile (sampled estimate)"
                ax.plot(steps, y, color=colour, **style, label=f"{name}: {label}")
                if series["seeds"] > 1:
                    sd = np.asarray([p[2] for p in points])
                    ax.fill_between(steps, y - sd, y + sd, color=colour, alpha=0.2, lw=0)
        _y_scale(ax, values)
        ax.set_xlabel("iteration")
        ax.set_ylabel("MS (φ) against the run's running statistics")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.legend(fontsize=7)
    counts = {name: series["seeds"] for name, series in runs.items()}
    fig.suptitle("online: moving threshold τ vs the batch's top-ρ MS quantile (paper Fig. 12)\n"
                 "scored against stale running statistics, so this overstates the offline effect; "
                 + seed_note(counts) + (", band = ± sd" if max(counts.values()) > 1 else ""), fontsize=10)
    return _save(fig, path)


def plot_compare(summary: dict, path, note: str = "", inhibited_by=()) -> Path:
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
        shown = [i for i in layers if any(key in summary[v]["layers"].get(str(i), {}) for v in variants)]
        for k, (variant, colour) in enumerate(zip(variants, _distinct(len(variants)))):
            rows = summary[variant]["layers"]
            values = [rows.get(str(i), {}).get(key, (np.nan, None)) for i in shown]
            x = np.arange(len(shown)) + (k - (len(variants) - 1) / 2) * width
            ax.bar(x, [v[0] for v in values], width, yerr=_errors([v[1] for v in values]), capsize=2,
                   color=colour, label=f"{variant} (n={summary[variant]['seeds']})")
        _mark_layers(ax, shown, inhibited, owners=inhibited_by)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("mean ± sd over seeds")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(variants), fontsize=9)
    fig.suptitle("tiny demo (configs/local/tiny.yml), block output, ρ = 2%: L2E vs monitor-only control"
                 + (f"\n{note}" if note else ""), fontsize=11)
    return _save(fig, path, rect=(0, 0.07, 1, 1))
