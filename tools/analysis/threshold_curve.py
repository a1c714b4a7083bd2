"""Paper Fig. 12: τ and the batch's top-ρ MS quantile (a sampled estimate) per layer over
training steps, L2E run(s) against a monitor-only run (`l2e.inhibition: none`).

    python tools/analysis/threshold_curve.py --runs L2E=runs/tiny/logs/metrics.jsonl \
        monitor=runs/tiny-monitor/logs/metrics.jsonl --out figs

Several seeds of one run: ``L2E=a/logs/metrics.jsonl,b/logs/metrics.jsonl`` (or the name
repeated); the figure then shows mean ± sd.
"""
import argparse
import json
from pathlib import Path

import _common

from megatron.analysis import read_threshold_series
from megatron.analysis.thresholds import aggregate_series
from megatron.analysis.plots import plot_thresholds
from megatron.errors import cli_main


def parse_runs(specs) -> dict:
    """``NAME=PATH[,PATH...]`` or ``PATH`` (named after the run folder holding
    logs/metrics.jsonl) -> {NAME: aggregate_series of its seeds}."""
    arms = _common.parse_arms(specs, lambda path: Path(path).resolve().parent.parent.name)
    return {name: aggregate_series([read_threshold_series(p) for p in paths]) for name, paths in arms.items()}


def write_threshold_curve(runs: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "threshold_curve.json").write_text(json.dumps(runs, indent=1))
    plot_thresholds(runs, out_dir / "threshold_curve.png")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="[NAME=]METRICS_JSONL")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    write_threshold_curve(parse_runs(args.runs), args.out)
    print(f"wrote {args.out}/threshold_curve.json and .png")


if __name__ == "__main__":
    main()
