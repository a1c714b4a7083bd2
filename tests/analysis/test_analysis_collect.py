"""Activation collection on a tiny random GPTNeoX: pooled values equal a manual forward."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from megatron.analysis import FeatureSet, collect_activations
from megatron.analysis.collect import as_encoder, load_model_and_tokenizer
from megatron.errors import TokenizerError, UserError
from megatron.model import GPTNeoX, ModelConfig

TEXTS = ["hello world", "a", "the quick brown fox jumps", "", "zz top", "monosemantic neurons"]
LABELS = ["en", "x", "en", "x", "x", "en"]


def encode(text):
    return [ord(c) % 61 for c in text]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTNeoX(ModelConfig(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2)).eval()


def manual(model, text, layer, site, max_tokens):
    """The site's output for one unpadded input, [tokens, width]."""
    module = model.blocks[layer] if site == "block_output" else model.blocks[layer].mlp.act
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.tensor([encode(text)[:max_tokens]]))
    handle.remove()
    return seen[0][0].numpy()


@pytest.mark.parametrize("site,width", [("block_output", 16), ("mlp_act", 64)])
def test_mean_pooled_values_equal_manual_forward(model, tmp_path, site, width):
    acts = collect_activations(model, encode, FeatureSet(TEXTS, LABELS), tmp_path, layers=[0, 2], site=site,
                               num_neurons=10, batch_size=4, max_tokens=8, seed=3)
    kept = [t for t in TEXTS if t]  # the empty text has no token and is dropped
    assert acts.manifest["dropped_empty_inputs"] == 1
    assert list(acts.inputs) == [i for i, t in enumerate(TEXTS) if t]
    assert [acts.label_names[k] for k in acts.labels] == [LABELS[i] for i in acts.inputs]
    for layer in (0, 2):
        neurons = acts.neurons(layer)
        assert len(neurons) == 10 and len(set(neurons)) == 10 and neurons.max() < width
        values = acts.values(layer)
        assert values.shape == (len(kept), 10)
        for row, text in enumerate(kept):
            expected = manual(model, text, layer, site, 8)[:, neurons].mean(axis=0)
            np.testing.assert_allclose(values[row], expected, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "manifest.json").read_text())["site"] == site


def test_token_pooling_keeps_every_real_token(model, tmp_path):
    acts = collect_activations(model, encode, FeatureSet(TEXTS, LABELS), tmp_path, layers=[1],
                               num_neurons=100, pooling="token", batch_size=2, max_tokens=6)
    lengths = [min(len(t), 6) for t in TEXTS if t]
    assert acts.values(1).shape == (sum(lengths), 16)  # fewer neurons than asked: all of them
    rows = np.flatnonzero(acts.inputs == 2)
    np.testing.assert_allclose(acts.values(1)[rows], manual(model, TEXTS[2], 1, "block_output", 6),
                               rtol=1e-4, atol=1e-5)


def test_neuron_sample_follows_the_seed(model, tmp_path):
    def neurons(seed, folder):
        return collect_activations(model, encode, FeatureSet(TEXTS, LABELS), tmp_path / folder, layers=[0],
                                   site="mlp_act", num_neurons=5, seed=seed).neurons(0)
    assert np.array_equal(neurons(1, "a"), neurons(1, "b"))
    assert not np.array_equal(neurons(1, "a"), neurons(2, "c"))


def test_bad_layer_is_a_user_error(model, tmp_path):
    with pytest.raises(UserError, match="layers"):
        collect_activations(model, encode, FeatureSet(TEXTS, LABELS), tmp_path, layers=[3])


def test_our_checkpoint_brings_its_own_tokenizer(tmp_path):
    from megatron.checkpoint.layout import neox_model_yaml, save_neox_checkpoint

    vocab = Path(__file__).resolve().parents[2] / "data" / "tokenizers" / "austen_bpe4k.json"
    cfg = ModelConfig(vocab_size=4096, hidden_size=16, num_layers=2, num_heads=2)
    yml = neox_model_yaml(cfg, tokenizer_type="HFTokenizer", vocab_file=str(vocab))
    save_neox_checkpoint(tmp_path / "ck", GPTNeoX(cfg).state_dict(), cfg, 10, config_files={"model.yml": yml})
    model, tokenizer = load_model_and_tokenizer(tmp_path / "ck")
    assert len(model.blocks) == 2
    assert as_encoder(tokenizer)("Hello world") == Tokenizer.from_file(str(vocab)).encode("Hello world").ids


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(TokenizerError, match="--tokenizer"):
        load_model_and_tokenizer(tmp_path, tokenizer_path=tmp_path / "nope.json")


def test_inputs_are_cut_to_the_models_context(tmp_path):
    torch.manual_seed(0)
    short = GPTNeoX(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                max_position_embeddings=4)).eval()
    acts = collect_activations(short, encode, FeatureSet(TEXTS, LABELS), tmp_path, pooling="token", max_tokens=512)
    assert acts.manifest["max_tokens"] == 4
    assert acts.manifest["rows"] == sum(min(len(t), 4) for t in TEXTS)


@pytest.mark.gpu
def test_collection_on_cuda_matches_cpu(model, tmp_path):
    features = FeatureSet(TEXTS, LABELS)
    on_cpu = collect_activations(model, encode, features, tmp_path / "cpu", num_neurons=8)
    on_gpu = collect_activations(model.to("cuda"), encode, features, tmp_path / "gpu", num_neurons=8)
    model.to("cpu")
    for layer in on_cpu.layers:
        np.testing.assert_allclose(on_gpu.values(layer), on_cpu.values(layer), rtol=1e-3, atol=1e-4)
