"""Synthetic activation folders with planted monosemantic neurons (known answers), and
the analysis CLIs loaded as modules."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

NUM_LABELS = 10
PER_LABEL = 20


def planted_layer(rng, neurons=40, planted=()):
    """Noise neurons, except each (column, label, sign) in ``planted`` jumps by 6σ·sign on that label."""
    labels = np.repeat(np.arange(NUM_LABELS), PER_LABEL)
    z = rng.standard_normal((len(labels), neurons))
    for column, label, sign in planted:
        z[:, column] = 0.1 * rng.standard_normal(len(labels)) + sign * 6.0 * (labels == label)
    return z, labels


def write_activation_folder(path, layers: dict, labels, name="model", dataset="synthetic", inhibited_layers=()):
    """The folder layout of megatron.analysis.collect (manifest + one .npy per layer)."""
    path.mkdir(parents=True, exist_ok=True)
    for layer, z in layers.items():
        np.save(path / f"layer_{layer:03d}.npy", z.astype(np.float32))
    np.save(path / "labels.npy", labels)
    np.save(path / "inputs.npy", np.arange(len(labels)))
    manifest = {"name": name, "model": name, "dataset": dataset, "site": "block_output", "pooling": "mean",
                "layers": sorted(layers), "num_layers": max(layers) + 1,
                "neurons": {str(l): list(range(z.shape[1])) for l, z in layers.items()},
                "label_names": [f"label{i}" for i in range(NUM_LABELS)], "inputs": len(labels),
                "rows": len(labels), "dropped_empty_inputs": 0, "max_tokens": 8, "seed": 0,
                "inhibited_layers": list(inhibited_layers)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


TOOLS = Path(__file__).resolve().parents[2] / "tools" / "analysis"
sys.path.insert(0, str(TOOLS))  # the CLIs import their shared _common module


def load_tool(name: str):
    """tools/analysis/NAME.py as a module (the CLIs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
