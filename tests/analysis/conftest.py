"""Fixtures for the analysis tests (helpers live in analysis_synth.py)."""
import numpy as np
import pytest
from analysis_synth import planted_layer, write_activation_folder


@pytest.fixture
def planted_folder(tmp_path):
    """Layers 0-2 of noise; layer 1 column 5 fires on label 3, layer 2 column 9 drops on label 7."""
    rng = np.random.default_rng(0)
    layers = {}
    for layer, planted in ((0, ()), (1, ((5, 3, +1),)), (2, ((9, 7, -1),))):
        layers[layer], labels = planted_layer(rng, planted=planted)
    return write_activation_folder(tmp_path / "acts", layers, labels)
