"""The paper's studies on activation folders with planted monosemantic neurons."""
import numpy as np
from analysis_synth import planted_layer, write_activation_folder

from megatron.analysis import fkr, ks_scale, ms_layers, ms_validation, open_activations, probe


def test_probe_ranks_planted_neurons_first(planted_folder):
    top = probe(open_activations(planted_folder), top=3)["top"]
    assert {(r["layer"], r["neuron"], r["label"]) for r in top[:2]} == {(1, 5, "label3"), (2, 9, "label7")}
    assert np.isclose(top[0]["f1"], 1.0) and np.isclose(top[1]["f1"], 1.0)
    assert top[2]["f1"] < 0.7


def test_ms_validation_separates_planted_from_random(planted_folder):
    result = ms_validation(open_activations(planted_folder), top=2, random=10, seed=0)
    assert {r["neuron"] for r in result["monosemantic"]} == {5, 9}
    # A planted neuron's MS is large on its label and tiny elsewhere (Fig. 3a) ...
    assert result["mean_phi_l"] > 5 and result["mean_phi_l_minus"] < 0.2
    # ... and far above what random noise neurons reach even on their best label (Fig. 3b).
    assert result["mean_phi_l"] > 2 * result["mean_phi_star_random"]
    assert len(result["random"]) == 10


def test_layer_profile_and_ks_rank_monosemantic_model_higher(tmp_path):
    rng = np.random.default_rng(0)
    mono, noisy = {}, {}
    for layer in range(2):
        mono[layer], labels = planted_layer(rng, neurons=20, planted=[(j, j % 10, 1) for j in range(20)])
        noisy[layer], _ = planted_layer(rng, neurons=20)
    mono_acts = open_activations(write_activation_folder(tmp_path / "m", mono, labels, name="mono"))
    noisy_acts = open_activations(write_activation_folder(tmp_path / "n", noisy, labels, name="noisy"))
    assert ks_scale(mono_acts, num_neurons=30)["ks"] > 0.85  # 1 - 1/10 for a perfect layer
    assert ks_scale(noisy_acts, num_neurons=30)["ks"] < 0.3
    assert ks_scale(mono_acts, num_neurons=30)["neurons"] == 30
    mono_profile, noisy_profile = ms_layers(mono_acts)["mean_phi_star"], ms_layers(noisy_acts)["mean_phi_star"]
    assert set(mono_profile) == {"0", "1"}
    assert all(mono_profile[k] > 3 * noisy_profile[k] for k in mono_profile)


def test_fkr_minimum_sits_at_the_planted_rate(tmp_path):
    rng = np.random.default_rng(0)
    layers = {}
    for layer in range(2):
        layers[layer], labels = planted_layer(rng, neurons=20, planted=[(j, j % 10, 1) for j in range(20)])
    acts = open_activations(write_activation_folder(tmp_path / "a", layers, labels))
    result = fkr(acts, rates=[0.02, 0.1, 0.3], layer_rate=0.05)
    assert result["rates"] == [0.02, 0.05, 0.1, 0.3]
    assert np.allclose(result["fkr"][:3], 0) and result["fkr"][3] > 0.5
    assert result["best_rate"] == 0.02
    assert set(result["fkr_at_layer_rate"]) == {"0", "1"}
