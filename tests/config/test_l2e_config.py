"""The nested ``l2e:`` block: validation and layer presets (l2e_spec.md §5-6)."""
import pytest

from megatron.config import ConfigError, L2EConfig, NeoXArgs


@pytest.mark.parametrize("preset, L, expect", [
    ("mid2", 24, [11, 12]), ("mid2", 6, [2, 3]), ("mid2", 7, [2, 3]),
    ("mid_third", 24, list(range(8, 17))), ("mid_third", 6, [2, 3, 4]),
    ("top_bottom", 24, [0, 23]), ("top_bottom", 1, [0]), ("mid2", 1, [0]),
])
def test_presets(preset, L, expect):
    assert L2EConfig(layers=preset).resolve_layers(L) == expect


def test_explicit_layers_sorted_and_range_checked():
    assert L2EConfig(layers=[5, 1, 5]).resolve_layers(6) == [1, 5]
    with pytest.raises(ConfigError, match=r"\[6\] out of range for num_layers=6"):
        L2EConfig(layers=[0, 6]).resolve_layers(6)


def test_from_dict_parses_spec_block():
    cfg = L2EConfig.from_dict({"enabled": True, "layers": [10, 11], "rate": 0.02,
                               "loss-weight": 1.0e-11, "retrieval": "topk",
                               "inhibition": "none", "site": "mlp_act"})
    assert cfg.enabled and cfg.layers == [10, 11] and cfg.loss_weight == 1e-11
    assert (cfg.retrieval, cfg.inhibition, cfg.site) == ("topk", "none", "mlp_act")
    assert cfg.to_dict() == {"enabled": True, "layers": [10, 11], "retrieval": "topk",
                             "inhibition": "none", "site": "mlp_act"}


@pytest.mark.parametrize("block, pattern", [
    ({"rate": 0.0}, r"rate must lie in \(0, 1\)"),
    ({"rate": 1.5}, r"rate must lie in \(0, 1\)"),
    ({"loss_weight": -1.0}, "loss_weight must be >= 0"),
    ({"inhibition": "regularise"}, "did you mean 'regularize'"),
    ({"layers": "middle2"}, "did you mean 'mid2'"),
    ({"ratee": 0.1}, "unknown key 'l2e.ratee'.*did you mean 'rate'"),
    ({"layers": []}, "empty list"),
    ({"warmup_steps": "ten"}, "l2e.warmup_steps expects int"),
])
def test_bad_values_are_config_errors(block, pattern):
    with pytest.raises(ConfigError, match=pattern):
        L2EConfig.from_dict(block, source="run.yml")


def test_layer_index_checked_against_model_depth():
    base = {"num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8,
            "train_micro_batch_size_per_gpu": 1}
    args = NeoXArgs.from_dict({**base, "l2e": {"enabled": True, "layers": "mid2"}})
    assert args.l2e.enabled and args.l2e.resolve_layers(args.num_layers) == [1, 2]
    with pytest.raises(ConfigError, match="out of range for num_layers=4"):
        NeoXArgs.from_dict({**base, "l2e": {"layers": [4]}})
