"""Is L2E's effect real? Train the CPU demo over seeds and measure it independently.

Trains configs/local/tiny.yml unchanged (300 steps) for each variant and seed:

    L2E             the demo (regularizer on layers 1 and 2)
    monitor         its control, ``l2e.inhibition=none`` (training untouched)
    L2E momentum    the demo with ``l2e.stats_momentum=0.99`` (statistics over ~100 steps)

and reports mean ± sd over seeds of: validation loss; the final training-time tau and
batch top-2% MS quantile (the sampled diagnostic, docs/l2e.md §3) per inhibited layer
(from metrics.jsonl); and, on text no run
trained on, per layer:

  held-out top-2% MS, fresh      exact 98% quantile of phi over every (sequence, position,
                                 channel) of 128-token windows of the Austen validation split
                                 (whole chapters), phi scored against the mean and variance
                                 of those windows themselves (offline, as the paper's analyses)
  held-out top-2% MS, running    the same windows scored against the run's own running
                                 statistics from its checkpoint, as training scores them
                                 (inhibited layers only)
  phi* (genre)                   mean phi_l* per layer on data/features/genre.jsonl, fresh
                                 statistics, mean-pooled (tools/analysis/ms_layers.py)

Writes OUT/compare.md (the table), OUT/compare.json and OUT/compare.png.

    python tools/analysis/compare_runs.py --out runs/compare [--seeds 1234 1235 1236] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import torch

from megatron.analysis import collect_activations, ms_layers, read_features
from megatron.analysis.collect import inhibited_layers, load_model_and_tokenizer
from megatron.analysis.heldout import heldout_ms, running_statistics
from megatron.analysis.heldout import heldout_windows as windows_of
from megatron.analysis.plots import plot_compare
from megatron.analysis.seeds import fmt_mean_sd, mean_sd
from megatron.errors import UserError, cli_main
from megatron.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "local" / "tiny.yml"
VARIANTS = {"L2E": [], "monitor": ["l2e.inhibition=none"], "L2E momentum": ["l2e.stats_momentum=0.99"]}
RATE = 0.02
ROWS = [  # (key, label, per inhibited layer only)
    ("tau", "training τ (final)", True),
    ("batch_quantile", "training top-2% MS (final batch, sampled estimate)", True),
    ("heldout_running", "held-out top-2% MS, running statistics", True),
    ("heldout_fresh", "held-out top-2% MS, fresh statistics", False),
    ("phi_star", "φ* genre, fresh statistics", False),
]


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant.replace(' ', '_')}_{seed}"


def train_all(out: Path, seeds, jobs: int, reuse: bool) -> dict:
    """Launch every (variant, seed) training, ``jobs`` at a time; returns wall seconds per run."""
    pending = [(v, s) for v in VARIANTS for s in seeds]
    if reuse:
        pending = [(v, s) for v, s in pending if not (run_dir(out, v, s) / "done").is_file()]
    running, walls = {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            variant, seed = pending.pop(0)
            d = run_dir(out, variant, seed)
            d.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "train.py"), str(TINY), "--override", f"seed={seed}",
                   f"log_dir={d / 'logs'}", f"save={d / 'checkpoints'}",
                   "overwrite_checkpoints=true",  # a rerun without --reuse retrains these runs on purpose
                   *VARIANTS[variant]]
            env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
            log = open(d / "train.log", "w")
            running[variant, seed] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                      time.time(), log)
            print(f"training {variant} seed {seed} -> {d}", flush=True)
        time.sleep(2)
        for key, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            d = run_dir(out, *key)
            if proc.returncode != 0:
                raise UserError(f"training {key[0]} seed {key[1]} failed (exit {proc.returncode}); see {d / 'train.log'}")
            walls[f"{key[0]} {key[1]}"] = time.time() - t0
            (d / "done").write_text(f"{walls[f'{key[0]} {key[1]}']:.0f} s\n")
    return walls


def heldout_windows() -> torch.Tensor:
    """tiny.yml's validation split (chapters no run trains on) in 128-token windows."""
    return windows_of(ROOT / "data" / "austen_bpe4k_text_document", "949,50,1", 128)


def measure(d: Path, windows: torch.Tensor, genre) -> dict:
    """Every number of one run (see the module docstring)."""
    lines = [json.loads(line) for line in (d / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [m["validation/lm_loss"] for m in lines if "validation/lm_loss" in m]
    last = [m for m in lines if any(k.startswith("l2e/batch_quantile/") for k in m)][-1]
    inhibited = sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith("l2e/batch_quantile/"))
    result = {"validation_loss": valid[-1], "layers": {}}
    for i in inhibited:
        result["layers"][i] = {"tau": last[f"l2e/tau/layer_{i}"],
                               "batch_quantile": last[f"l2e/batch_quantile/layer_{i}"]}

    model, tokenizer = load_model_and_tokenizer(d / "checkpoints")
    for i, row in heldout_ms(model, windows, running_statistics(d / "checkpoints"), RATE).items():
        result["layers"].setdefault(i, {}).update(row)
    acts = collect_activations(model, tokenizer, genre, d / "activations_genre", name=d.name, dataset="genre",
                               inhibited_layers=inhibited_layers(d / "checkpoints"))
    for layer, value in ms_layers(acts)["mean_phi_star"].items():
        result["layers"][int(layer)]["phi_star"] = value
    return result


def summarise(measured: dict) -> dict:
    """{variant: {"validation_loss": (mean, sd), "layers": {i: {key: (mean, sd)}}}} over seeds."""
    out = {}
    for variant in VARIANTS:
        runs = [r for name, r in measured.items() if name.rsplit(" ", 1)[0] == variant]
        layers = sorted({int(i) for r in runs for i in r["layers"]})
        out[variant] = {
            "seeds": len(runs),
            "validation_loss": mean_sd([r["validation_loss"] for r in runs]),
            "layers": {i: {key: mean_sd([r["layers"][str(i)][key] for r in runs])
                           for key, _, _ in ROWS if key in runs[0]["layers"][str(i)]} for i in layers},
        }
    return out


def markdown(summary: dict, seeds) -> list[str]:
    variants = list(summary)
    lines = [f"mean ± sd over seeds {', '.join(map(str, seeds))}; layers 1 and 2 are inhibited "
             f"(ρ = 2%); held-out = Austen validation-split chapters; φ* on genre.jsonl.", "",
             "| measure | layer | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants),
             "| validation loss | | " + " | ".join(fmt_mean_sd(summary[v]["validation_loss"]) for v in variants) + " |"]
    layers = sorted(summary[variants[0]]["layers"])
    for key, label, inhibited_only in ROWS:
        for i in layers:
            cells = [summary[v]["layers"].get(i, {}).get(key) for v in variants]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {label} | {i} | " + " | ".join(fmt_mean_sd(c) if c else "–" for c in cells) + " |")
    return lines


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (each one CPU thread)")
    p.add_argument("--reuse", action="store_true", help="keep trainings that finished before")
    args = p.parse_args(argv)
    if args.jobs < 1 or not args.seeds:
        raise UserError("--jobs must be >= 1 and --seeds non-empty")
    out = Path(args.out)
    t0 = time.time()
    walls = train_all(out, args.seeds, args.jobs, args.reuse)
    t_train = time.time() - t0
    windows, genre = heldout_windows(), read_features(ROOT / "data" / "features" / "genre.jsonl")
    measured = {f"{v} {s}": measure(run_dir(out, v, s), windows, genre) for v in VARIANTS for s in args.seeds}
    measured = json.loads(json.dumps(measured))  # layer keys as strings, as read back later
    summary = summarise(measured)
    lines = markdown(summary, args.seeds)
    timing = (f"Wall time: {t_train:.0f} s training ({len(walls)} runs, {args.jobs} at a time), "
              f"{time.time() - t0:.0f} s in all.")
    (out / "compare.md").write_text("\n".join(lines + ["", timing]) + "\n")
    (out / "compare.json").write_text(json.dumps({"runs": measured, "summary": summary, "walls": walls,
                                                  "held_out_windows": len(windows)}, indent=1))
    plot_compare(json.loads(json.dumps(summary)), out / "compare.png",
                 note="L2E momentum = L2E with l2e.stats_momentum 0.99; held-out = Austen validation chapters",
                 inhibited_by=[v for v, extra in VARIANTS.items() if "l2e.inhibition=none" not in extra])
    print("\n".join(lines + ["", timing]))
    print(f"wrote {out / 'compare.md'}, compare.json and compare.png")


if __name__ == "__main__":
    main()
