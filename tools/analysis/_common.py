"""What every analysis CLI shares: the repo on sys.path, activation folders in, JSON + PNG out."""
from __future__ import annotations

import json
import sys
from pathlib import Path

# The CLIs run as `python tools/analysis/x.py` from a checkout that may not be pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.analysis import open_activations  # noqa: E402
from megatron.analysis.seeds import aggregate  # noqa: E402


def add_io_args(parser):
    parser.add_argument("--activations", nargs="+", required=True, metavar="DIR",
                        help="activation folders from collect_activations.py, one per model (small to large)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON and PNG")


def parse_arms(specs, default_name) -> dict[str, list[str]]:
    """``NAME=PATH[,PATH...]`` (one path per seed) or ``PATH`` -> {NAME: [paths]}; a NAME
    given twice collects the paths of both (``L2E=a L2E=b`` = ``L2E=a,b``). An unnamed
    PATH is named ``default_name(PATH)``."""
    arms = {}
    for spec in specs:
        name, _, paths = spec.rpartition("=")
        for path in filter(None, paths.split(",")):
            arms.setdefault(name or default_name(path), []).append(path)
    return arms


def output_name(study: str, method: str) -> str:
    """``probe`` for the default threshold probe, ``probe_logistic`` otherwise: one option's
    figure never overwrites another's."""
    return study if method == "threshold" else f"{study}_{method}"


def run_study(name: str, study, plot, arms, out_dir, **options) -> list[dict]:
    """``study(acts, **options)`` for every activation folder, one result per arm (mean ±
    sd over its seeds, megatron.analysis.seeds) -> ``out/name.json``; ``plot`` -> ``out/name.png``.

    ``arms``: lists of folders, one list per arm (its seeds, collected under the arm's
    name), or plain folders, each a one-seed arm.
    """
    results = []
    for dirs in arms:
        per_seed = [study(open_activations(d), **options) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
        results.append(aggregate(study.__name__, per_seed))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.json and .png")
    return results
