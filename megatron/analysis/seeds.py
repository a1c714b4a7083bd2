"""Several trainings (seeds) per arm: mean ± sd of the studies' numbers, and the verdict
of an L2E arm against its control that a reader may draw from them.

An *arm* is one training recipe (e.g. "L2E", "monitor"); each of its seeds gives one
study result. ``aggregate`` turns an arm's results into one result of the same shape
whose plotted numbers are means over seeds, with their sample sds under ``"sd"``
(``None`` everywhere when there is only one seed: one seed has no spread to show).
"""
from __future__ import annotations

import math
import statistics

# The numbers of each study that figures and summaries use; these get mean ± sd.
STUDY_KEYS = {
    "ms_validation": ("mean_phi_l", "mean_phi_l_minus", "mean_phi_star_random"),
    "ms_layers": ("mean_phi_star",),
    "fkr": ("fkr", "fkr_at_layer_rate"),
    "probe": ("top_f1",),
    "ks_scale": ("ks", "pvalue"),
}

# How far apart two arms' means must be, in pooled seed sds, to count as "beyond the spread".
SPREAD_FACTOR = 2.0


def mean_sd(values) -> tuple[float, float | None]:
    """Mean and sample sd (ddof 1); sd ``None`` for a single value."""
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _combine(values):
    """(mean tree, sd tree) of equally shaped floats, lists or dicts of them."""
    first = values[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(k in v for v in values)]
        pairs = {k: _combine([v[k] for v in values]) for k in keys}
        return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
    if isinstance(first, (list, tuple)):
        length = min(len(v) for v in values)
        pairs = [_combine([v[i] for v in values]) for i in range(length)]
        return [m for m, _ in pairs], [s for _, s in pairs]
    return mean_sd(values)


def aggregate(study: str, results: list[dict]) -> dict:
    """One arm's seeds -> one result: the first seed's metadata (``model`` is the arm's
    name, as its seeds were collected under it), ``seeds`` = how many, each of
    ``STUDY_KEYS[study]`` as the mean over seeds with its sd in ``result["sd"]``, and
    (with several seeds) every seed's own result under ``per_seed``."""
    out = {**results[0], "seeds": len(results), "sd": {}}
    for key in STUDY_KEYS.get(study, ()):
        out[key], out["sd"][key] = _combine([r[key] for r in results])
    if study == "fkr":  # the minimum of the mean curve, as the figure marks it
        out["best_rate"] = out["rates"][min(range(len(out["fkr"])), key=out["fkr"].__getitem__)]
    if len(results) > 1:
        out["per_seed"] = results
    return out


def seed_note(counts: dict[str, int]) -> str:
    """The line every figure and the report carry about how many seeds stand behind it."""
    if all(n == 1 for n in counts.values()):
        return "one seed per model: no error bars, any difference may be seed noise"
    return "mean ± sd over seeds (" + ", ".join(f"{name}: {n}" for name, n in counts.items()) + ")"


def verdict(expected: str, treated: list[float], control: list[float]) -> dict:
    """What the numbers allow one to say about one measure (``expected``: "down" or "up").

    ``moved`` is the sign of mean(treated) − mean(control); ``beyond_spread`` is whether
    |Δ| exceeds ``SPREAD_FACTOR`` pooled seed sds (√((sd_t² + sd_c²)/2)) and ``None`` when
    either arm has a single seed, where no spread is known.
    """
    (m_t, sd_t), (m_c, sd_c) = mean_sd(treated), mean_sd(control)
    delta = m_t - m_c
    moved = "down" if delta < 0 else "up" if delta > 0 else "unchanged"
    out = {"treated": (m_t, sd_t), "control": (m_c, sd_c), "delta": delta, "moved": moved,
           "as_expected": moved == expected, "seeds": (len(treated), len(control))}
    if sd_t is None or sd_c is None:
        out.update(beyond_spread=None, delta_in_sds=None)
        return out
    pooled = math.sqrt((sd_t ** 2 + sd_c ** 2) / 2)
    in_sds = abs(delta) / pooled if pooled > 0 else math.inf
    out.update(beyond_spread=in_sds > SPREAD_FACTOR, delta_in_sds=in_sds)
    return out


def fmt_mean_sd(pair, digits: int = 3) -> str:
    """"4.32 ± 0.11", or "4.32 (one seed)" when there is no sd."""
    mean, sd = pair
    return f"{mean:.{digits}g} (one seed)" if sd is None else f"{mean:.{digits}g} ± {sd:.2g}"
