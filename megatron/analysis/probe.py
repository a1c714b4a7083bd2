"""Single-neuron probing (sparse probing with k = 1, Gurnee et al. 2023).

For each neuron and label, how well does the neuron's value alone tell the label's
inputs from the others? The score is the best in-sample F1 of a one-threshold
classifier (``value ≥ t`` or ``value ≤ t``: a monosemantic neuron may move either way,
paper Fig. 2), or of a 1-D logistic regression. The top neurons by F1 are the
"monosemantic" neurons that validate MS (paper §3.1).
"""
from __future__ import annotations

import numpy as np

METHODS = ("threshold", "logistic")


def probe_f1(z, labels, num_labels: int, method: str = "threshold") -> np.ndarray:
    """F1 of every (label, neuron) pair, ``[num_labels, N]``."""
    if method not in METHODS:
        raise ValueError(f"probe method {method!r}: choose one of {METHODS}")
    z = np.asarray(z, dtype=np.float64)
    targets = [np.asarray(labels) == label for label in range(num_labels)]
    if method == "logistic":
        return np.stack([logistic_f1(z, y) for y in targets])
    up, down = _Sweep(z), _Sweep(-z)  # one sort per direction serves every label
    return np.stack([np.maximum(up.best_f1(y), down.best_f1(y)) for y in targets])


def threshold_f1(z, y) -> np.ndarray:
    """Best F1 over all thresholds and both directions, per neuron ``[N]``."""
    z = np.asarray(z, dtype=np.float64)
    return np.maximum(_Sweep(z).best_f1(y), _Sweep(-z).best_f1(y))


class _Sweep:
    """Every threshold of ``value ≥ t`` per neuron: predicting the top k values positive.

    With TP_k true positives among the top k, F1 = 2·TP_k / (P + k).
    """

    def __init__(self, z):
        self.order = np.argsort(-z, axis=0, kind="stable")
        descending = np.take_along_axis(z, self.order, axis=0)
        # A threshold cannot split equal values: only cuts after the last of a tie count.
        self.cut = np.ones_like(descending, dtype=bool)
        self.cut[:-1] = descending[:-1] != descending[1:]
        self.k = np.arange(1, z.shape[0] + 1)[:, None]

    def best_f1(self, y) -> np.ndarray:
        tp = np.cumsum(y[self.order], axis=0)
        return np.where(self.cut, 2 * tp / (y.sum() + self.k), 0.0).max(axis=0)


def logistic_f1(z, y, steps: int = 25, ridge: float = 1.0) -> np.ndarray:
    """F1 of a 1-D logistic regression p = σ(w·ẑ + b) per neuron, fitted by Newton steps.

    The ridge on w keeps separable neurons (the interesting ones) from diverging.
    """
    z = (z - z.mean(axis=0)) / np.maximum(z.std(axis=0), 1e-12)
    y = y.astype(np.float64)[:, None]
    w = np.zeros(z.shape[1])
    b = np.zeros(z.shape[1])
    for _ in range(steps):  # all neurons at once: each has its own 2×2 Newton system
        p = 1.0 / (1.0 + np.exp(-np.clip(w * z + b, -30, 30)))
        r = p * (1 - p)
        g_w, g_b = ((p - y) * z).sum(0) + ridge * w, (p - y).sum(0)
        h_ww, h_wb, h_bb = (r * z * z).sum(0) + ridge, (r * z).sum(0), r.sum(0) + 1e-12
        det = h_ww * h_bb - h_wb ** 2
        w = w - (h_bb * g_w - h_wb * g_b) / det
        b = b - (h_ww * g_b - h_wb * g_w) / det
    predicted = (w * z + b) >= 0
    tp = (predicted & (y > 0)).sum(0)
    return 2 * tp / np.maximum(predicted.sum(0) + y.sum(), 1)
