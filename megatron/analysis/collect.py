"""One forward pass of a model over a feature dataset, keeping chosen neurons' values.

Sites (as in l2e_spec.md §1): ``block_output`` is a block's return value (H channels),
``mlp_act`` the 4H MLP activation after GELU. A neuron here is one channel; its value
for an input is the mean over the input's real tokens (``pooling="mean"``, the paper's
setting) or, with ``pooling="token"``, every (input, position) is its own sample.

Values go straight to one ``.npy`` memmap per layer, ``[rows, neurons]`` float32, so
10^4 inputs × 10^3 neurons × all layers never sit in memory together. Right padding is
exact: the model is causal, so pad tokens after an input never reach its real tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron.analysis.features import FeatureSet
from megatron.errors import DataError, TokenizerError, UserError

SITES = ("block_output", "mlp_act")
POOLINGS = ("mean", "token")
MANIFEST = "manifest.json"


@dataclass
class Activations:
    """A collected activation folder: per-layer ``[rows, neurons]`` arrays + row labels."""

    path: Path
    manifest: dict
    labels: np.ndarray  # [rows] label id of each row
    inputs: np.ndarray  # [rows] index of the input each row came from

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def label_names(self) -> list[str]:
        return self.manifest["label_names"]

    def neurons(self, layer: int) -> np.ndarray:
        return np.asarray(self.manifest["neurons"][str(layer)])

    def values(self, layer: int) -> np.ndarray:
        """``[rows, neurons]`` read-only memmap of one layer."""
        return np.load(self.path / f"layer_{layer:03d}.npy", mmap_mode="r")


def open_activations(path) -> Activations:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise DataError(f"{path}: no {MANIFEST}; collect activations first with tools/analysis/collect_activations.py")
    manifest = json.loads((path / MANIFEST).read_text())
    return Activations(path, manifest, np.load(path / "labels.npy"), np.load(path / "inputs.npy"))


def as_encoder(tokenizer):
    """A ``str -> list[int]`` from a megatron tokenizer, a ``tokenizers.Tokenizer`` or a callable."""
    if hasattr(tokenizer, "tokenize"):
        return tokenizer.tokenize
    if hasattr(tokenizer, "encode"):
        return lambda text: tokenizer.encode(text).ids
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"cannot tokenize with {type(tokenizer).__name__}")


def load_model_and_tokenizer(model_path, tokenizer_path=None):
    """``megatron.load_model(model_path)`` and its tokenizer.

    The tokenizer is ``tokenizer_path`` (a tokenizer.json) if given, else the
    tokenizer.json inside the model folder (HF dirs ship one) or next to it, else the
    one the run's saved config names (``tokenizer-type``/``vocab-file`` of our checkpoints).
    """
    import megatron

    model_path = Path(model_path)
    candidates = [Path(tokenizer_path)] if tokenizer_path else [
        model_path / "tokenizer.json", model_path.parent / "tokenizer.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        tokenizer = _tokenizer_json(found)
    elif tokenizer_path is None and not (model_path / "config.json").is_file():
        tokenizer = _run_tokenizer(model_path)
    else:
        raise TokenizerError(f"{candidates[0]}: tokenizer not found; pass --tokenizer PATH/tokenizer.json")
    return megatron.load_model(model_path), tokenizer


def inhibited_layers(model_path) -> list[int]:
    """The layers L2E inhibited while training this checkpoint (from its saved config);
    [] for a monitor-only or plain run and for HF folders."""
    from megatron.checkpoint import checkpoint_neox_args, resolve_step_dir

    model_path = Path(model_path)
    if (model_path / "config.json").is_file():
        return []
    args = checkpoint_neox_args(resolve_step_dir(model_path))
    cfg = getattr(args, "l2e", None)
    if cfg is None or not cfg.enabled or cfg.inhibition == "none":
        return []
    return cfg.resolve_layers(args.num_layers)


def _tokenizer_json(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None


def _run_tokenizer(checkpoint: Path):
    from megatron.checkpoint import checkpoint_neox_args, resolve_step_dir
    from megatron.tokenizer import build_tokenizer

    args = checkpoint_neox_args(resolve_step_dir(checkpoint))
    if args is None:
        raise TokenizerError(f"{checkpoint}: the checkpoint saved no config naming its tokenizer; "
                             "pass --tokenizer PATH/tokenizer.json")
    return build_tokenizer(args)


def collect_activations(model, tokenizer, features: FeatureSet, out_dir, *, layers=None,
                        site="block_output", num_neurons=1000, pooling="mean", batch_size=8,
                        max_tokens=512, seed=0, name="model", source=None, dataset="",
                        inhibited_layers=()) -> Activations:
    """Run ``model`` over ``features`` and write the activation folder ``out_dir``;
    ``inhibited_layers`` (see `inhibited_layers`) is recorded for the figures."""
    if site not in SITES:
        raise UserError(f"site {site!r}: choose one of {', '.join(SITES)}")
    if pooling not in POOLINGS:
        raise UserError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    num_layers = len(model.blocks)
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise UserError(f"layers {layers}: the model has layers 0..{num_layers - 1}")

    # Positions past the trained context are out of distribution: never go beyond it.
    max_tokens = min(max_tokens, getattr(getattr(model, "cfg", None), "max_position_embeddings", max_tokens))
    encode = as_encoder(tokenizer)
    ids = [encode(text)[:max_tokens] for text in features.texts]
    kept = [i for i, x in enumerate(ids) if x]  # an empty text has no token to pool over
    if not kept:
        raise DataError("no feature text produced any token; check the dataset and tokenizer")
    lengths = np.array([len(ids[i]) for i in kept])
    rows = lengths if pooling == "token" else np.ones_like(lengths)
    first_row = np.concatenate([[0], np.cumsum(rows)[:-1]])
    label_ids = np.asarray(features.label_ids())[kept]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "labels.npy", np.repeat(label_ids, rows))
    np.save(out_dir / "inputs.npy", np.repeat(np.asarray(kept), rows))

    captured, neurons, arrays = {}, {}, {}
    rng = np.random.default_rng(seed)
    modules = {l: model.blocks[l] if site == "block_output" else model.blocks[l].mlp.act for l in layers}
    hooks = [m.register_forward_hook(_capture(captured, neurons, l, num_neurons, rng, stop=l == layers[-1]))
             for l, m in modules.items()]
    device = next(model.parameters()).device
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc=f"collect {name}", unit="batch"):
                batch = order[start:start + batch_size]
                tokens = torch.zeros(len(batch), int(lengths[batch].max()), dtype=torch.long)
                for b, k in enumerate(batch):
                    tokens[b, :lengths[k]] = torch.tensor(ids[kept[k]])
                try:
                    model(tokens.to(device))
                except _LastLayerDone:
                    pass
                for l in layers:
                    h = captured.pop(l)
                    if l not in arrays:
                        arrays[l] = np.lib.format.open_memmap(
                            out_dir / f"layer_{l:03d}.npy", mode="w+", dtype=np.float32,
                            shape=(int(rows.sum()), len(neurons[l])))
                    for b, k in enumerate(batch):
                        z = h[b, :lengths[k]]
                        r = first_row[k]
                        if pooling == "mean":
                            arrays[l][r] = z.mean(axis=0)
                        else:
                            arrays[l][r:r + lengths[k]] = z
    finally:
        for hook in hooks:
            hook.remove()
    for array in arrays.values():
        array.flush()

    manifest = {
        "name": name, "model": str(source) if source else name, "dataset": dataset,
        "site": site, "pooling": pooling, "layers": layers,
        "num_layers": num_layers, "neurons": {str(l): neurons[l].tolist() for l in layers},
        "label_names": features.label_names, "inputs": len(kept), "rows": int(rows.sum()),
        "dropped_empty_inputs": len(ids) - len(kept), "max_tokens": max_tokens, "seed": seed,
        "inhibited_layers": sorted(inhibited_layers),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return open_activations(out_dir)


class _LastLayerDone(Exception):
    """Raised by the last collected layer's hook: the rest of the forward (later blocks,
    the vocabulary head, a third of Pythia-70M's FLOPs) is not needed."""


def _capture(store: dict, neurons: dict, layer: int, count: int, rng, stop: bool):
    """A hook keeping only the sampled neurons of ``layer``, so a batch never holds all
    layers' full width (8 × 512 tokens × 4H × 32 layers would be 5 GB for Pythia-2.8B)."""
    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if layer not in neurons:  # the width is known only at the first forward
            width = h.shape[-1]
            neurons[layer] = np.sort(rng.choice(width, size=min(count, width), replace=False))
        store[layer] = h[..., torch.as_tensor(neurons[layer], device=h.device)].float().cpu().numpy()
        if stop:
            raise _LastLayerDone
    return hook
