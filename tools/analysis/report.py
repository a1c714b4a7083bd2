"""Run every analysis over a list of models (or arms of seeds) and write one page (Markdown
+ HTML) that opens with what the numbers allow one to conclude, then the figures.

    python tools/analysis/report.py --models 70m=pythia-70m 410m=pythia-410m \
        --features data/features/languages.jsonl data/features/code.jsonl \
        [--runs L2E=runs/a/logs/metrics.jsonl monitor=runs/b/logs/metrics.jsonl] --out report

    # an L2E arm against its control, three seeds each (mean ± sd everywhere):
    python tools/analysis/report.py --models L2E=s1/checkpoints,s2/checkpoints,s3/checkpoints \
        monitor=m1/checkpoints,m2/checkpoints,m3/checkpoints --features data/features/genre.jsonl \
        --runs L2E=s1/logs/metrics.jsonl,s2/logs/metrics.jsonl,s3/logs/metrics.jsonl monitor=... \
        --heldout data/austen_bpe4k_text_document --out report

Models are given small to large as ``[NAME=]PATH[,PATH...]`` (our checkpoint folders or HF
GPT-NeoX folders), one path per seed; a NAME given twice gathers the paths of both.
Activations land in OUT/activations/DATASET/NAME[_SEED] (kept with --reuse). When exactly
one arm was trained with L2E inhibiting and one without (its monitor-only or plain
control), report.md opens with a verdict table; name the ``--runs`` arms like the
``--models`` arms so that it includes the online measure.
"""
import argparse
import html
import json
import math
import re
from pathlib import Path

import _common
from collect_activations import add_collect_args, collect
from threshold_curve import parse_runs, write_threshold_curve

from megatron.analysis import fkr, ks_scale, ms_layers, ms_validation, probe, read_threshold_series
from megatron.analysis.collect import MANIFEST, inhibited_layers
from megatron.analysis.plots import plot_fkr, plot_ks, plot_ms_layers, plot_ms_validation, plot_probe
from megatron.analysis.seeds import SPREAD_FACTOR, fmt_mean_sd, mean_sd, seed_note, verdict
from megatron.errors import UserError, cli_main

PER_DATASET = [  # (name, study, plot, title)
    ("ms_validation", ms_validation, plot_ms_validation, "MS validation against probing (Fig. 3)"),
    ("ms_layers", ms_layers, plot_ms_layers, "Mean φ_ℓ* per layer (Fig. 5)"),
    ("fkr", fkr, plot_fkr, "False Killing Rate (Figs. 6, 11)"),
    ("probe", probe, plot_probe, "Top neurons by single-neuron probing (Fig. 10)"),
]

# Which way inhibiting monosemantic neurons should move each measure, and why (docs/l2e_spec.md §8).
EXPECTED = {
    "online": ("down", "the regularizer lowers log (z − z̄)² of the selected neurons against the running "
                       "mean z̄: it acts on exactly this number"),
    "heldout_running": ("down", "the same scoring as training, on text no run trained on"),
    "heldout_fresh": ("down", "only if the activations' tails really get lighter; the regularizer does not "
                              "act on fresh statistics directly, so expect a smaller fall"),
    "phi_star": ("down", "a less monosemantic neuron has a lower mean MS on its most related feature"),
    "ks": ("down", "MS on inputs of a neuron's feature ℓ* less distinct from MS on all inputs"),
    "fkr": ("up", "fewer high-MS events fall on their neuron's feature once monosemantic responses are "
                  "inhibited; our inference, the paper reports FKR for Pythia only"),
}

CAVEAT = ("**Online vs offline.** Training scores φ against *running* statistics accumulated since "
          "step 0. L2E's large online fall (training-time top-ρ MS, Fig. 12, and held-out text scored "
          "with the run's running statistics) is mostly distance from those stale statistics: scored "
          "against fresh statistics of the same held-out text (as the paper's offline analyses, and every "
          "feature-set figure below, do) the fall is a fraction of it. Read the fresh-statistics rows, φ*, "
          "K-S and FKR for how monosemantic the trained model is; read the online rows for what the "
          "regularizer acted on.")


def collect_all(arms, feature_files, out, args) -> dict:
    """{dataset: [[activation folder per seed] per arm]}, collecting what is missing."""
    folders = {}
    for features in feature_files:
        dataset = Path(features).stem
        for name, paths in arms.items():
            seeds = []
            for k, path in enumerate(paths, 1):
                folder = out / "activations" / dataset / (name if len(paths) == 1 else f"{name}_{k}")
                if not (args.reuse and (folder / MANIFEST).is_file()):
                    collect(path, features, folder, args, name)
                seeds.append(folder)
            folders.setdefault(dataset, []).append(seeds)
    return folders


def heldout_all(arms, args) -> dict:
    """{arm: [{layer: {"heldout_fresh": q, "heldout_running": q}} per seed]} on --heldout text."""
    from megatron.analysis.collect import load_model_and_tokenizer
    from megatron.analysis.heldout import heldout_ms, heldout_windows, running_statistics

    windows = heldout_windows(args.heldout, args.heldout_split, args.heldout_seq)
    if not len(windows):
        raise UserError(f"--heldout {args.heldout}: its validation split ({args.heldout_split}) has fewer "
                        f"than {args.heldout_seq} tokens; pass a larger dataset or a smaller --heldout-seq")
    measured = {}
    for name, paths in arms.items():
        for path in paths:
            model, _ = load_model_and_tokenizer(path)
            measured.setdefault(name, []).append(heldout_ms(model, windows, running_statistics(path)))
    return measured


def per_seed(result: dict) -> list[dict]:
    return result.get("per_seed", [result])


def layer_mean(values: dict, layers) -> float:
    return sum(values[str(l)] for l in layers) / len(layers)


def roles(inhibited: dict) -> tuple[str, str] | None:
    """(L2E arm, control arm) when exactly one arm inhibited layers and one did not."""
    treated = [a for a, layers in inhibited.items() if layers]
    control = [a for a, layers in inhibited.items() if not layers]
    return (treated[0], control[0]) if len(treated) == 1 and len(control) == 1 else None


def verdict_table(pair, layers, counts: dict, datasets: dict, heldout: dict, runs: dict) -> list[str]:
    """The opening table: per measure, L2E vs control as mean ± sd, the direction, and
    whether the difference is beyond the seed spread; every value from the figures' data."""
    treated, control = pair
    rows = []  # (measure, key in EXPECTED, {arm: value per seed} or None when not measured)
    logged = set(pair) <= set(runs) and all(str(l) in series["batch_quantile"]
                                            for a in pair for series in runs[a] for l in layers)
    if logged:
        final = {a: [layer_mean({str(l): series["batch_quantile"][str(l)][-1][1] for l in layers}, layers)
                     for series in runs[a]] for a in pair}
        rows.append(("online top-ρ MS, last logged training batch (sampled estimate)", "online", final))
    else:
        rows.append(("online top-ρ MS, last logged training batch", "online", None))
    for key, label in (("heldout_running", "held-out top-2% MS, the run's running statistics"),
                       ("heldout_fresh", "held-out top-2% MS, fresh statistics")):
        values = None
        if heldout and all(all(key in seed[l] for l in layers for seed in heldout[a]) for a in pair):
            values = {a: [sum(seed[l][key] for l in layers) / len(layers) for seed in heldout[a]] for a in pair}
        rows.append((label, key, values))
    for dataset, results in datasets.items():
        by = {k: {r["model"]: r for r in results[k]} for k in ("ms_layers", "fkr", "ks_scale")}
        rows += [
            (f"φ* ({dataset}, Fig. 5)", "phi_star",
             {a: [layer_mean(r["mean_phi_star"], layers) for r in per_seed(by["ms_layers"][a])] for a in pair}),
            (f"K-S ({dataset}, Fig. 4)", "ks", {a: [r["ks"] for r in per_seed(by["ks_scale"][a])] for a in pair}),
            (f"FKR at ρ = 2% ({dataset}, Fig. 11)", "fkr",
             {a: [layer_mean(r["fkr_at_layer_rate"], layers) for r in per_seed(by["fkr"][a])] for a in pair}),
        ]
    lines = [f"## Verdict: {treated} vs {control}", "",
             f"Layers {', '.join(map(str, layers))} (those L2E inhibited in {treated}), mean over them; "
             f"{seed_note({a: counts[a] for a in pair})}. "
             f"\"Beyond the seed spread\" = |Δ| > {SPREAD_FACTOR:g} pooled seed sds, a rough screen, "
             "not a significance test.", "",
             f"| measure | L2E expected to | {treated} | {control} | moved | beyond the seed spread? |",
             "|---|---|---|---|---|---|"]
    for label, key, values in rows:
        expected, why = EXPECTED[key]
        if values is None:
            hint = "--runs named like --models, logging these layers" if key == "online" else "--heldout"
            lines.append(f"| {label} | go {expected} ({why}) | – | – | not measured (pass {hint}) | – |")
            continue
        v = verdict(expected, values[treated], values[control])
        moved = f"{v['moved']} ({'as expected' if v['as_expected'] else 'not as expected'})"
        if v["beyond_spread"] is None:
            spread = "cannot tell (one seed)"
        else:
            size = "the seeds agree exactly" if math.isinf(v["delta_in_sds"]) else f"{v['delta_in_sds']:.1f} sd"
            spread = f"{'yes' if v['beyond_spread'] else 'no'} ({size})"
        lines.append(f"| {label} | go {expected} ({why}) | {fmt_mean_sd(v['treated'])} | "
                     f"{fmt_mean_sd(v['control'])} | {moved} | {spread} |")
    return lines + ["", CAVEAT, ""]


def summary(dataset, results) -> list[str]:
    """Per model, the numbers the dataset's figures show, mean ± sd over its seeds."""
    rows = [f"## Dataset: {dataset}", "",
            "| model | seeds | φ_ℓ, top probed (Fig. 3a) | φ_ℓ⁻ (Fig. 3a) | φ*, all collected neurons, "
            "mean over layers (Fig. 5) | FKR at ρ = 2%, mean over layers (Fig. 11) | lowest FKR (Fig. 6) | "
            "top-probe F1 (Fig. 10) |", "|---|---|---|---|---|---|---|---|"]
    for v, m, f, p in zip(*(results[k] for k in ("ms_validation", "ms_layers", "fkr", "probe"))):
        layers = list(m["mean_phi_star"])
        phi_star = mean_sd([layer_mean(r["mean_phi_star"], layers) for r in per_seed(m)])
        fkr_2 = mean_sd([layer_mean(r["fkr_at_layer_rate"], layers) for r in per_seed(f)])
        best = f["rates"].index(f["best_rate"])
        f1 = mean_sd([sum(r["top_f1"]) / len(r["top_f1"]) for r in per_seed(p)])
        rows.append(f"| {v['model']} | {v.get('seeds', 1)} | "
                    f"{fmt_mean_sd((v['mean_phi_l'], v['sd'].get('mean_phi_l')))} | "
                    f"{fmt_mean_sd((v['mean_phi_l_minus'], v['sd'].get('mean_phi_l_minus')))} | "
                    f"{fmt_mean_sd(phi_star)} | {fmt_mean_sd(fkr_2)} | "
                    f"{fmt_mean_sd((f['fkr'][best], f['sd']['fkr'][best] if f['sd'].get('fkr') else None))} "
                    f"at {100 * f['best_rate']:g}% | {fmt_mean_sd(f1)} |")
    return rows + [""]


def heldout_table(heldout: dict) -> list[str]:
    arms = list(heldout)
    layers = sorted({l for a in arms for seed in heldout[a] for l in seed})
    lines = ["## Held-out text, top-2% MS per layer", "",
             "| layer | statistics | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for key, label in (("heldout_fresh", "fresh"), ("heldout_running", "the run's running")):
        for l in layers:
            cells = [fmt_mean_sd(mean_sd([s[l][key] for s in heldout[a]]))
                     if all(key in s[l] for s in heldout[a]) else "–" for a in arms]
            if any(c != "–" for c in cells):
                lines.append(f"| {l} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


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
            body.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(line)) + "</p>")
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>neox-l2e analysis</title>\n"
                                     + "\n".join(body) + "\n")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]PATH[,PATH...]",
                   help="one arm per entry, one path per seed")
    p.add_argument("--features", nargs="+", required=True, metavar="JSONL")
    p.add_argument("--runs", nargs="*", default=[], metavar="[NAME=]METRICS_JSONL[,...]")
    p.add_argument("--heldout", default=None, metavar="DATA_PREFIX",
                   help="a .bin/.idx dataset whose validation split is scored (fresh and running statistics)")
    p.add_argument("--heldout-split", default="949,50,1", help="the split the runs trained with")
    p.add_argument("--heldout-seq", type=int, default=128, help="window length: the runs' seq_length")
    p.add_argument("--out", required=True)
    p.add_argument("--reuse", action="store_true", help="keep activation folders collected before")
    p.add_argument("--top", type=int, default=10, help="probed monosemantic neurons")
    p.add_argument("--ks-neurons", type=int, default=1000)
    add_collect_args(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    arms = _common.parse_arms(args.models, lambda path: Path(path).name)
    inhibited = {name: inhibited_layers(paths[0]) for name, paths in arms.items()}
    folders = collect_all(arms, args.features, out, args)
    heldout = heldout_all(arms, args) if args.heldout else {}

    counts = {name: len(paths) for name, paths in arms.items()}
    lines = ["# Monosemanticity report", "",
             f"Arms (seeds): {', '.join(f'{n} ({c})' for n, c in counts.items())}. "
             f"Features: {', '.join(args.features)}. Site {args.site}, pooling {args.pooling}, up to "
             f"{args.neurons} random neurons per layer.", ""]
    if all(c == 1 for c in counts.values()):
        lines += ["**One seed per arm**: no number below has an error bar, and any difference between "
                  "models may be seed noise. Give several runs per arm (`--models L2E=a,b,c`) to see "
                  "the spread.", ""]
    options = {"ms_validation": {"top": args.top, "seed": args.seed}, "probe": {"top": args.top},
               "fkr": {}, "ms_layers": {}}
    results, body = {}, []
    for dataset, dirs in folders.items():
        results[dataset] = {name: _common.run_study(name, study, plot, dirs, out / dataset, **options[name])
                            for name, study, plot, _ in PER_DATASET}
        results[dataset]["ks_scale"] = _common.run_study("ks_scale", ks_scale, plot_ks, dirs, out / dataset,
                                                         num_neurons=args.ks_neurons, seed=args.seed)
        body += summary(dataset, results[dataset])
        for name, _, _, title in PER_DATASET:
            body += [f"### {title}", "", f"![{name}]({dataset}/{name}.png)", ""]

    ks = [r for dataset in results.values() for r in dataset["ks_scale"]]
    (out / "ks_scale.json").write_text(json.dumps(ks, indent=1))
    plot_ks(ks, out / "ks_scale.png")
    body += ["## K-S statistic across models (Fig. 4)", "", "| dataset | model | K-S | largest p-value |",
             "|---|---|---|---|"]
    body += [f"| {r['dataset']} | {r['model']} | {fmt_mean_sd((r['ks'], r['sd'].get('ks')))} | "
             f"{max(s['pvalue'] for s in per_seed(r)):.2g} |" for r in ks]
    body += ["", "![ks_scale](ks_scale.png)", ""]
    if heldout:
        body += heldout_table(heldout)
    runs = {}
    if args.runs:
        run_arms = _common.parse_arms(args.runs, lambda path: Path(path).resolve().parent.parent.name)
        runs = {name: [read_threshold_series(p) for p in paths] for name, paths in run_arms.items()}
        write_threshold_curve(parse_runs(args.runs), out)
        body += ["## Threshold of top-ρ MS during training (Fig. 12, online)", "",
                 "τ and the batch's top-ρ MS quantile (a sampled estimate: `l2e.diagnostics_samples` pairs "
                 "per micro-batch) against the run's running statistics; see the caveat above.", "",
                 "![threshold_curve](threshold_curve.png)", ""]
    pair = roles(inhibited)
    if pair:
        lines += verdict_table(pair, inhibited[pair[0]], counts, results, heldout, runs)
    else:
        lines += ["No verdict table: it needs exactly one arm trained with L2E inhibiting and one without "
                  f"(inhibited layers per arm: {inhibited}).", "", CAVEAT, ""]
    write_pages(lines + body, out)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")


if __name__ == "__main__":
    main()
