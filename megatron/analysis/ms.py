"""Monosemanticity Score statistics over a labelled dataset (l2e_spec.md §8, paper §3).

Shapes: ``z`` and ``phi`` are ``[n, N]`` (n samples, N neurons), ``labels`` is ``[n]``
with ids in ``0 .. num_labels-1``. Offline, the mean and variance are those of the
dataset itself, not running estimates as in training.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def ms(z, eps: float = 1e-12) -> np.ndarray:
    """φ(z_ij) = (z_ij − z̄_j)² / S²_j over the n samples (paper eq. 1)."""
    z = np.asarray(z, dtype=np.float64)
    variance = np.maximum(z.var(axis=0, ddof=1), eps)
    return (z - z.mean(axis=0)) ** 2 / variance


def label_means(phi, labels, num_labels: int) -> np.ndarray:
    """φ_ℓ for every label and neuron, ``[num_labels, N]`` (paper eq. 2, left)."""
    onehot = np.eye(num_labels)[labels]  # [n, num_labels]
    counts = onehot.sum(axis=0)[:, None]
    return onehot.T @ phi / np.maximum(counts, 1)


def complement_means(phi, labels, num_labels: int) -> np.ndarray:
    """φ_ℓ⁻: mean MS over the inputs *without* label ℓ, ``[num_labels, N]`` (eq. 2, right)."""
    onehot = np.eye(num_labels)[labels]
    outside = 1.0 - onehot
    return outside.T @ phi / np.maximum(outside.sum(axis=0)[:, None], 1)


def relative_feature(phi, labels, num_labels: int) -> np.ndarray:
    """ℓ*_j = argmax_ℓ φ_ℓ of neuron j, ``[N]`` (paper eq. 3)."""
    return label_means(phi, labels, num_labels).argmax(axis=0)


def ks_statistic(phi, labels, star) -> tuple[float, float]:
    """Two-sample K-S between MS values of inputs in ℓ*_j and of all inputs (paper §3.2).

    Both sets pool every given neuron, so one number summarises a model (Fig. 4).
    """
    in_star = np.asarray(labels)[:, None] == np.asarray(star)[None, :]
    result = stats.ks_2samp(phi[in_star], phi.ravel())
    return float(result.statistic), float(result.pvalue)


def false_killing_rate(phi, labels, star, rates) -> np.ndarray:
    """FKR(ρ) for each rate ρ (paper eq. 4).

    τ_k is the k-th largest φ over all (i, j) of the layer, k = ρ·n·N; a selected pair
    (φ_ij ≥ τ_k) is a false kill when input i does not carry neuron j's ℓ*_j. Ties at τ_k
    are all selected, as the indicator in eq. 4 says.
    """
    phi = np.asarray(phi, dtype=np.float64)
    false = (np.asarray(labels)[:, None] != np.asarray(star)[None, :]).ravel()
    order = np.argsort(-phi.ravel(), kind="stable")
    descending = phi.ravel()[order]
    false_so_far = np.cumsum(false[order])
    out = []
    for rate in rates:
        k = int(np.clip(np.ceil(rate * descending.size), 1, descending.size))
        selected = np.searchsorted(-descending, -descending[k - 1], side="right")
        out.append(false_so_far[selected - 1] / selected)
    return np.asarray(out)
