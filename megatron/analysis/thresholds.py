"""τ and the batch quantile per layer over training steps, read from metrics.jsonl.

Training logs (docs/l2e.md §3) write one JSON object per log interval with
``iteration`` and, per L2E layer i, ``l2e/tau/layer_i`` and ``l2e/batch_quantile/layer_i``
(the batch's top-ρ quantile, estimated from ``l2e.diagnostics_samples`` sampled pairs
when a micro-batch has more).
Paper Fig. 12 compares these between an L2E run and a monitor-only run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from megatron.errors import DataError

KEY = re.compile(r"^l2e/(tau|batch_quantile)/layer_(\d+)$")


def read_threshold_series(path) -> dict:
    """``{"tau": {layer: [[iteration, value], ...]}, "batch_quantile": {...}}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found; pass a run's logs/metrics.jsonl")
    series = {"tau": {}, "batch_quantile": {}}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON; metrics.jsonl holds one object per line") from None
            if "iteration" not in record:
                continue
            for key, value in record.items():
                match = KEY.match(key)
                if match and value is not None:
                    series[match[1]].setdefault(match[2], []).append([record["iteration"], float(value)])
    if not series["tau"] and not series["batch_quantile"]:
        raise DataError(f"{path}: no l2e/tau/layer_* or l2e/batch_quantile/layer_* keys; "
                        "was the run trained with l2e enabled (or inhibition: none to monitor)?")
    return series


def aggregate_series(seeds: list[dict]) -> dict:
    """Several seeds' ``read_threshold_series`` -> ``{"seeds": n, kind: {layer: [[iteration,
    mean, sd], ...]}}`` over the iterations every seed logged (sd None for one seed)."""
    from megatron.analysis.seeds import mean_sd

    out = {"seeds": len(seeds)}
    for kind in ("tau", "batch_quantile"):
        layers = set.intersection(*(set(s[kind]) for s in seeds))
        out[kind] = {}
        for layer in sorted(layers, key=int):
            by_step = [dict(map(tuple, s[kind][layer])) for s in seeds]
            common = sorted(set.intersection(*(set(b) for b in by_step)))
            out[kind][layer] = [[step, *mean_sd([b[step] for b in by_step])] for step in common]
    return out
