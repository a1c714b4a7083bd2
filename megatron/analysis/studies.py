"""The paper's analyses (§3, App. B), each computed from one model's collected activations.

Every function takes an :class:`~megatron.analysis.collect.Activations` and returns a
JSON-able dict; the CLIs in tools/analysis/ run them over several models and plot.
"""
from __future__ import annotations

import numpy as np

from megatron.analysis.collect import Activations
from megatron.analysis.ms import (complement_means, false_killing_rate, ks_statistic,
                                  label_means, ms)
from megatron.analysis.probe import probe_f1

FKR_RATES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)


def _about(acts: Activations) -> dict:
    """What every study result carries for its figure: model, dataset, site, pooling and
    the layers L2E inhibited while the model trained (empty for a control or a foreign model)."""
    m = acts.manifest
    return {"model": acts.name, "dataset": m.get("dataset", ""), "site": m.get("site", ""),
            "pooling": m.get("pooling", ""), "inhibited_layers": m.get("inhibited_layers", [])}


def _layer_ms(acts: Activations, layer: int):
    """φ ``[rows, N]``, φ_ℓ ``[labels, N]`` and ℓ* ``[N]`` of one layer."""
    z = np.asarray(acts.values(layer), dtype=np.float64)
    phi = ms(z)
    by_label = label_means(phi, acts.labels, len(acts.label_names))
    return phi, by_label, by_label.argmax(axis=0)


def _random_columns(acts: Activations, count: int, seed: int) -> dict:
    """``count`` neurons drawn uniformly from all collected layers: {layer: columns}."""
    sizes = [len(acts.neurons(layer)) for layer in acts.layers]
    picks = np.random.default_rng(seed).choice(sum(sizes), size=min(count, sum(sizes)), replace=False)
    offsets = np.cumsum([0] + sizes)
    chosen = {}
    for i, layer in enumerate(acts.layers):
        columns = np.sort(picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i])
        if len(columns):
            chosen[layer] = columns
    return chosen


def probe(acts: Activations, top: int = 10, method: str = "threshold") -> dict:
    """The ``top`` neurons (over all collected layers) by single-neuron probing F1."""
    rows = []
    for layer in acts.layers:
        z = np.asarray(acts.values(layer), dtype=np.float64)
        f1 = probe_f1(z, acts.labels, len(acts.label_names), method)
        for j in np.argsort(-f1.max(axis=0))[:top]:
            rows.append({"layer": layer, "neuron": int(acts.neurons(layer)[j]), "column": int(j),
                         "label": acts.label_names[int(f1[:, j].argmax())], "f1": float(f1[:, j].max())})
    rows.sort(key=lambda r: -r["f1"])
    return {**_about(acts), "method": method, "top": rows[:top], "top_f1": [r["f1"] for r in rows[:top]]}


def ms_validation(acts: Activations, top: int = 10, random: int = 10, seed: int = 0,
                  method: str = "threshold") -> dict:
    """Fig. 3: φ_ℓ vs φ_ℓ⁻ for the top probed neurons (a); their φ_ℓ vs φ_ℓ* of random neurons (b)."""
    monosemantic = probe(acts, top, method)["top"]
    by_layer = {}
    for r in monosemantic:
        by_layer.setdefault(r["layer"], []).append(r)
    for layer, rs in by_layer.items():
        phi, by_label, _ = _layer_ms(acts, layer)
        outside = complement_means(phi, acts.labels, len(acts.label_names))
        for r in rs:
            label = acts.label_names.index(r["label"])
            r["phi_l"], r["phi_l_minus"] = float(by_label[label, r["column"]]), float(outside[label, r["column"]])

    randoms = []
    for layer, columns in _random_columns(acts, random, seed).items():
        _, by_label, star = _layer_ms(acts, layer)
        randoms += [{"layer": layer, "neuron": int(acts.neurons(layer)[j]),
                     "label": acts.label_names[int(star[j])], "phi_star": float(by_label[star[j], j])}
                    for j in columns]
    return {
        **_about(acts), "method": method, "monosemantic": monosemantic, "random": randoms,
        "mean_phi_l": float(np.mean([r["phi_l"] for r in monosemantic])),
        "mean_phi_l_minus": float(np.mean([r["phi_l_minus"] for r in monosemantic])),
        "mean_phi_star_random": float(np.mean([r["phi_star"] for r in randoms])),
    }


def ks_scale(acts: Activations, num_neurons: int = 1000, seed: int = 0) -> dict:
    """Fig. 4: K-S statistic of MS(ℓ*) vs MS(all) over ``num_neurons`` random neurons."""
    phis, stars = [], []
    for layer, columns in _random_columns(acts, num_neurons, seed).items():
        phi, _, star = _layer_ms(acts, layer)
        phis.append(phi[:, columns])
        stars.append(star[columns])
    statistic, pvalue = ks_statistic(np.hstack(phis), acts.labels, np.concatenate(stars))
    return {**_about(acts), "ks": statistic,
            "pvalue": pvalue, "neurons": int(sum(len(s) for s in stars))}


def ms_layers(acts: Activations) -> dict:
    """Fig. 5: mean φ_ℓ* over the sampled neurons of every layer."""
    means = {}
    for layer in acts.layers:
        _, by_label, star = _layer_ms(acts, layer)
        means[str(layer)] = float(by_label[star, np.arange(len(star))].mean())
    return {**_about(acts), "num_layers": acts.manifest["num_layers"], "mean_phi_star": means}


def fkr(acts: Activations, rates=FKR_RATES, layer_rate: float = 0.02) -> dict:
    """Figs. 6 and 11: FKR(ρ) per layer, its mean over layers, and FKR per layer at ``layer_rate``."""
    rates = sorted(set(rates) | {layer_rate})
    per_layer = {}
    for layer in acts.layers:
        phi, _, star = _layer_ms(acts, layer)
        per_layer[str(layer)] = false_killing_rate(phi, acts.labels, star, rates).tolist()
    curve = np.mean(list(per_layer.values()), axis=0)
    at = rates.index(layer_rate)
    return {
        **_about(acts), "num_layers": acts.manifest["num_layers"], "rates": rates,
        "fkr": curve.tolist(), "best_rate": rates[int(curve.argmin())],
        "fkr_per_layer": per_layer, "layer_rate": layer_rate,
        "fkr_at_layer_rate": {layer: values[at] for layer, values in per_layer.items()},
    }
