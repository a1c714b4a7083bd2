"""Single-neuron probing finds planted neurons with F1 = 1, in either direction."""
import numpy as np
import pytest

from analysis_synth import planted_layer

from megatron.analysis import probe_f1
from megatron.analysis.probe import threshold_f1


@pytest.mark.parametrize("method", ["threshold", "logistic"])
@pytest.mark.parametrize("sign", [+1, -1])
def test_planted_neuron_has_f1_one_and_noise_less(planted_layer_data, method, sign):
    z, labels = planted_layer_data(sign)
    f1 = probe_f1(z, labels, 10, method)
    assert f1.shape == (10, z.shape[1])
    assert np.isclose(f1[3, 5], 1.0)
    noise = np.delete(f1, 5, axis=1)
    assert noise.max() < 0.7


@pytest.fixture
def planted_layer_data():
    def make(sign):
        return planted_layer(np.random.default_rng(0), planted=((5, 3, sign),))
    return make


def test_threshold_f1_matches_brute_force():
    rng = np.random.default_rng(2)
    z = rng.integers(0, 4, size=(30, 6)).astype(float)  # many ties
    y = rng.random(30) < 0.3
    best = []
    for j in range(6):
        scores = []
        for t in np.unique(z[:, j]):
            for predicted in (z[:, j] >= t, z[:, j] <= t):
                tp = (predicted & y).sum()
                scores.append(2 * tp / (predicted.sum() + y.sum()))
        best.append(max(scores))
    assert np.allclose(threshold_f1(z, y), best)
