"""MS statistics and the paper's eq. 2-4 on data whose answer is known by construction."""
import numpy as np
from scipy import stats

from megatron.analysis import (complement_means, false_killing_rate, ks_statistic, label_means, ms,
                               relative_feature)


def perfectly_monosemantic(num_labels=10, per_label=20, neurons=30, seed=0):
    """Neuron j is 1 exactly on inputs of label j % num_labels (plus tiny noise), else 0."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_labels), per_label)
    owner = np.arange(neurons) % num_labels
    z = (labels[:, None] == owner[None, :]) + 0.01 * rng.standard_normal((len(labels), neurons))
    return z, labels, owner


def test_ms_is_squared_standardised_deviation():
    z = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])
    phi = ms(z)
    mean, var = z[:, 0].mean(), z[:, 0].var(ddof=1)
    assert np.allclose(phi[:, 0], (z[:, 0] - mean) ** 2 / var)
    # Over a dataset the MS values average to (n-1)/n: the sample variance's definition.
    assert np.allclose(phi.mean(axis=0), 2 / 3)


def test_constant_neuron_scores_zero_not_nan():
    assert np.all(ms(np.ones((5, 2))) == 0)


def test_label_means_and_complement_match_a_direct_loop():
    z, labels, _ = perfectly_monosemantic(num_labels=3, per_label=4, neurons=5)
    phi = ms(z)
    inside, outside = label_means(phi, labels, 3), complement_means(phi, labels, 3)
    for label in range(3):
        assert np.allclose(inside[label], phi[labels == label].mean(axis=0))
        assert np.allclose(outside[label], phi[labels != label].mean(axis=0))


def test_relative_feature_recovers_each_neurons_planted_label():
    z, labels, owner = perfectly_monosemantic()
    assert np.array_equal(relative_feature(ms(z), labels, 10), owner)


def test_fkr_of_perfectly_monosemantic_layer():
    z, labels, owner = perfectly_monosemantic()
    phi = ms(z)
    # 1/10 of all (input, neuron) pairs fire: inhibiting up to 10% kills only true pairs;
    # at 20% the extra 10% are all false kills.
    fkr = false_killing_rate(phi, labels, owner, [0.01, 0.05, 0.1, 0.2])
    assert np.allclose(fkr, [0, 0, 0, 0.5])


def test_fkr_counts_every_tie_at_the_threshold():
    phi = np.array([[2.0, 1.0], [1.0, 0.0]])
    labels, star = np.array([0, 1]), np.array([0, 0])
    # k = 1 -> τ = 2: one pair, input 0 carries ℓ* = 0 -> FKR 0.
    # k = 2 -> τ = 1: two tied pairs, (0,1) and (1,0); input 1 is not label 0 -> 1/3 false.
    assert np.allclose(false_killing_rate(phi, labels, star, [0.25, 0.5]), [0.0, 1 / 3])


def test_ks_of_planted_monosemantic_neurons_is_one_minus_label_share():
    z, labels, owner = perfectly_monosemantic()
    statistic, pvalue = ks_statistic(ms(z), labels, owner)
    # Every in-ℓ* value exceeds every other value; they are 1/10 of the universal set.
    assert np.isclose(statistic, 0.9)
    assert pvalue < 1e-10


def test_ks_of_same_distribution_is_near_zero():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 500)
    phi = ms(rng.standard_normal((len(labels), 50)))
    statistic, _ = ks_statistic(phi, labels, np.zeros(50, dtype=int))  # ℓ* fixed, not data-chosen
    assert statistic < 0.05
    assert np.isclose(statistic, stats.ks_2samp(phi[labels == 0].ravel(), phi.ravel()).statistic)
