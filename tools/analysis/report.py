"""Run every analysis over a list of models and write one page (Markdown + HTML) with the figures.

    python tools/analysis/report.py --models 70m=pythia-70m 410m=pythia-410m \
        --features data/features/languages.jsonl data/features/code.jsonl \
        [--runs L2E=runs/a/logs/metrics.jsonl monitor=runs/b/logs/metrics.jsonl] --out report

Models are given small to large ([NAME=]PATH; our checkpoint folders or HF GPT-NeoX
folders). Activations land in OUT/activations/DATASET/NAME (kept with --reuse).
"""
import argparse
import html
from pathlib import Path

import _common
from collect_activations import add_collect_args, collect
from threshold_curve import parse_runs, write_threshold_curve

from megatron.analysis import fkr, ks_scale, ms_layers, ms_validation, probe
from megatron.analysis.collect import MANIFEST
from megatron.analysis.plots import plot_fkr, plot_ks, plot_ms_layers, plot_ms_validation, plot_probe
from megatron.errors import cli_main

PER_DATASET = [  # (name, study, plot, title)
    ("ms_validation", ms_validation, plot_ms_validation, "MS validation against probing (Fig. 3)"),
    ("ms_layers", ms_layers, plot_ms_layers, "Mean φ_ℓ* per layer (Fig. 5)"),
    ("fkr", fkr, plot_fkr, "False Killing Rate (Figs. 6, 11)"),
    ("probe", probe, plot_probe, "Top neurons by single-neuron probing (Fig. 10)"),
]


def collect_all(models, feature_files, out, args) -> dict:
    """{dataset: [activation folder per model]}, collecting what is missing."""
    folders = {}
    for features in feature_files:
        dataset = Path(features).stem
        for spec in models:
            name, _, path = spec.rpartition("=")
            name = name or Path(path).name
            folder = out / "activations" / dataset / name
            if not (args.reuse and (folder / MANIFEST).is_file()):
                collect(path, features, folder, args, name)
            folders.setdefault(dataset, []).append(folder)
    return folders


def summary(dataset, results) -> list[str]:
    rows = ["| model | φ_ℓ (mono) | φ_ℓ⁻ | φ_ℓ* (random) | best FKR rate | min FKR | top-probe F1 |",
            "|---|---|---|---|---|---|---|"]
    for v, f, p in zip(results["ms_validation"], results["fkr"], results["probe"]):
        mean_f1 = sum(r["f1"] for r in p["top"]) / len(p["top"])
        rows.append(f"| {v['model']} | {v['mean_phi_l']:.3g} | {v['mean_phi_l_minus']:.3g} | "
                    f"{v['mean_phi_star_random']:.3g} | {100 * f['best_rate']:g}% | {min(f['fkr']):.3f} | "
                    f"{mean_f1:.3f} |")
    return [f"## Dataset: {dataset}", ""] + rows + [""]


def write_pages(lines: list[str], out: Path) -> None:
    """The Markdown page, and the same page as HTML (headings, tables, images, text)."""
    (out / "report.md").write_text("\n".join(lines) + "\n")
    body, table = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                cells = (f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
                table.append("<tr>" + "".join(cells) + "</tr>")
            continue
        if table:
            body.append("<table border=1 cellpadding=4>" + "".join(table) + "</table>")
            table = []
        if line.startswith("!["):
            alt, src = line[2:-1].split("](")
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}" style="max-width:100%"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>neox-l2e analysis</title>\n"
                                     + "\n".join(body) + "\n")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]PATH")
    p.add_argument("--features", nargs="+", required=True, metavar="JSONL")
    p.add_argument("--runs", nargs="*", default=[], metavar="[NAME=]METRICS_JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--reuse", action="store_true", help="keep activation folders collected before")
    p.add_argument("--top", type=int, default=10, help="probed monosemantic neurons")
    p.add_argument("--ks-neurons", type=int, default=1000)
    add_collect_args(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    folders = collect_all(args.models, args.features, out, args)

    lines = ["# Monosemanticity report", "",
             f"Models: {', '.join(args.models)}. Features: {', '.join(args.features)}. "
             f"Site {args.site}, pooling {args.pooling}, up to {args.neurons} random neurons per layer.", ""]
    options = {"ms_validation": {"top": args.top, "seed": args.seed}, "probe": {"top": args.top},
               "fkr": {}, "ms_layers": {}}
    for dataset, dirs in folders.items():
        results = {name: _common.run_study(name, study, plot, dirs, out / dataset, **options[name])
                   for name, study, plot, _ in PER_DATASET}
        lines += summary(dataset, results)
        for name, _, _, title in PER_DATASET:
            lines += [f"### {title}", "", f"![{name}]({dataset}/{name}.png)", ""]

    all_dirs = [d for dirs in folders.values() for d in dirs]
    ks = _common.run_study("ks_scale", ks_scale, plot_ks, all_dirs, out,
                           num_neurons=args.ks_neurons, seed=args.seed)
    lines += ["## K-S statistic across models (Fig. 4)", "", "| dataset | model | K-S | p-value |", "|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['model']} | {r['ks']:.3f} | {r['pvalue']:.2g} |" for r in ks]
    lines += ["", "![ks_scale](ks_scale.png)", ""]
    if args.runs:
        write_threshold_curve(parse_runs(args.runs), out)
        lines += ["## Threshold of top-ρ MS during training (Fig. 12)", "",
                  "![threshold_curve](threshold_curve.png)", ""]
    write_pages(lines, out)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")


if __name__ == "__main__":
    main()
