"""Loading, merging, validation and derivation of NeoX YAML configs."""
import json
import logging

import pytest
import torch

from megatron.config import ConfigError, NeoXArgs

BASE = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 32,
    "train_micro_batch_size_per_gpu": 2,
}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(**extra):
    return NeoXArgs.from_dict({**BASE, **extra})


def test_dash_and_underscore_are_the_same_key(tmp_path):
    a = write(tmp_path, "a.yml", '{"num-layers": 4, "hidden_size": 64, '
                                 '"num-attention-heads": 4, "seq-length": 32}')
    b = write(tmp_path, "b.yml", "train-micro-batch-size-per-gpu: 3\n")
    args = NeoXArgs.from_ymls([a, b])
    assert (args.num_layers, args.num_attention_heads, args.train_micro_batch_size_per_gpu) \
        == (4, 4, 3)
    assert set(args.config_files) == {"a.yml", "b.yml"}
    assert "num-layers" in args.config_files["a.yml"]


def test_json_with_comments_and_trailing_comma(tmp_path):
    a = write(tmp_path, "a.yml", '# comment\n{\n  "num_layers": 4, # why\n  "hidden_size": 64,\n'
                                 '  "num_attention_heads": 4,\n  "seq_length": 32,\n'
                                 '  "train_batch_size": 8,\n}\n')
    assert NeoXArgs.from_ymls([a]).train_batch_size == 8


def test_duplicate_key_across_files_names_both_files(tmp_path):
    a = write(tmp_path, "a.yml", "num_layers: 4\n")
    b = write(tmp_path, "b.yml", "num-layers: 6\n")
    with pytest.raises(ConfigError, match=r"num_layers.*a\.yml.*b\.yml"):
        NeoXArgs.from_ymls([a, b])


def test_same_key_spelled_twice_in_one_file(tmp_path):
    a = write(tmp_path, "a.yml", "num_layers: 4\nnum-layers: 6\n")
    with pytest.raises(ConfigError, match="num_layers"):
        NeoXArgs.from_ymls([a])


def test_unknown_key_suggests_nearest(tmp_path):
    a = write(tmp_path, "a.yml", "num_layer: 4\n")
    with pytest.raises(ConfigError, match=r"a\.yml.*num_layer.*did you mean 'num_layers'"):
        NeoXArgs.from_ymls([a])


def test_wrong_type_names_key_type_and_file(tmp_path):
    a = write(tmp_path, "a.yml", 'num_layers: "four"\n')
    with pytest.raises(ConfigError, match=r"a\.yml: num_layers expects int"):
        NeoXArgs.from_ymls([a])


def test_bad_enum_value_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        NeoXArgs.from_dict({**BASE, "lr_decay_style": "cosin"})


def test_missing_and_invalid_yaml_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="nope.yml"):
        NeoXArgs.from_ymls([missing])
    bad = write(tmp_path, "bad.yml", "{num_layers: 4,,}\n")
    with pytest.raises(ConfigError, match="bad.yml.*not valid YAML"):
        NeoXArgs.from_ymls([bad])


def test_float_keys_accept_ints_and_pyyaml_exponent_strings():
    args = load(hidden_dropout=0, layernorm_epsilon="1e-6")
    assert args.hidden_dropout == 0.0 and isinstance(args.hidden_dropout, float)
    assert args.layernorm_epsilon == 1e-6


@pytest.mark.parametrize("given, world, expect", [
    (dict(train_micro_batch_size_per_gpu=4), 8, (32, 4, 1)),
    (dict(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2), 8, (64, 4, 2)),
    (dict(train_batch_size=64, train_micro_batch_size_per_gpu=4), 8, (64, 4, 2)),
    (dict(train_batch_size=64, gradient_accumulation_steps=4), 8, (64, 2, 4)),
    (dict(train_batch_size=64), 8, (64, 8, 1)),
])
def test_batch_triple_is_filled(given, world, expect):
    d = {k: v for k, v in BASE.items() if k != "train_micro_batch_size_per_gpu"}
    args = NeoXArgs.from_dict({**d, **given})
    args.configure_world(world)
    got = (args.train_batch_size, args.train_micro_batch_size_per_gpu,
           args.gradient_accumulation_steps)
    assert got == expect
    assert got[0] == got[1] * got[2] * args.data_parallel_size


def test_batch_that_does_not_close_names_the_three_numbers():
    args = load(train_batch_size=16, gradient_accumulation_steps=2)
    assert args.data_parallel_size == 4  # the full triple implies dp = 16 / (2 * 2)
    with pytest.raises(ConfigError, match=r"train_batch_size=16.*=2 .*=2 .*size 8"):
        args.configure_world(8)
    with pytest.raises(ConfigError, match=r"train_batch_size=10.*=2 .*=2 "):
        load(train_batch_size=10, gradient_accumulation_steps=2)


def test_data_parallel_size_counts_pp0_as_one():
    args = load(model_parallel_size=2, pipe_parallel_size=0)
    args.configure_world(8)
    assert args.data_parallel_size == 4 and not args.is_pipe_parallel
    args = load(model_parallel_size=2, pipe_parallel_size=2)
    args.configure_world(8)
    assert args.data_parallel_size == 2 and args.is_pipe_parallel
    with pytest.raises(ConfigError, match="world size 6"):
        args.configure_world(6)


@pytest.mark.parametrize("vocab, mp, padded", [(50277, 1, 50304), (50277, 2, 50432),
                                               (50277, 4, 50688), (256, 1, 256),
                                               (257, 1, 384)])
def test_padded_vocab(vocab, mp, padded):
    args = load(model_parallel_size=mp)
    assert args.set_vocab_size(vocab) == padded == args.padded_vocab_size
    assert padded % (128 * mp) == 0 and padded - vocab < 128 * mp


def test_lr_and_precision_are_derived():
    args = load(optimizer={"type": "Adam", "params": {"lr": 6e-4}})
    assert args.lr == 6e-4 and args.precision == "fp32"
    assert load(fp16={"enabled": True}).precision == "fp16"
    assert load(bf16={"enabled": True}).precision == "bfloat16"
    assert load(fp16={"enabled": True, "type": "bfloat16"}).precision == "bfloat16"
    assert load(precision="bfloat16").precision == "bfloat16"
    with pytest.raises(ConfigError, match="precision"):
        load(precision="fp16", bf16={"enabled": True})


def test_attention_config_expands_per_layer():
    args = load(attention_config=[[["flash"], 2], [["global"], 2]])
    assert args.attention_config == ["flash", "flash", "global", "global"]
    assert load().attention_config == ["global"] * 4
    with pytest.raises(ConfigError, match="must look like"):
        load(attention_config=[["flash", 4]])
    with pytest.raises(ConfigError, match="names 3 layers"):
        load(attention_config=[[["flash"], 3]])
    with pytest.raises(ConfigError, match="'sparse_fixed' is not supported by neox-l2e"):
        load(attention_config=[[["sparse_fixed"], 4]])


@pytest.mark.parametrize("extra, pattern", [
    (dict(num_attention_heads=5), "must divide hidden_size=64"),
    (dict(model_parallel_size=8), "model_parallel_size=8 must divide"),
    (dict(pipe_parallel_size=5), "exceeds num_layers=4"),
    (dict(pos_emb="alibi"), "pos_emb='alibi' is not supported by neox-l2e"),
    (dict(norm="rmsnorm"), "norm='rmsnorm' is not supported by neox-l2e"),
    (dict(moe_num_experts=8), "moe_num_experts=8 is not supported by neox-l2e"),
    (dict(num_kv_heads=2), "num_kv_heads"),
])
def test_inconsistent_or_unsupported_values(extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load(**extra)


def test_neox_only_keys_at_default_and_runtime_keys_are_accepted():
    args = load(moe_num_experts=1, rpe_num_buckets=32, git_hash="abc", rank=3)
    assert "git_hash" not in args.to_dict() and "moe_num_experts" not in args.to_dict()


def test_no_op_flag_warns_once(caplog):
    from megatron.config import neox_args

    neox_args._warned_no_ops.discard("rope_fusion")
    with caplog.at_level(logging.WARNING):
        load(rope_fusion=True)
        load(rope_fusion=True)
    hits = [r for r in caplog.records if "rope_fusion" in r.getMessage()]
    assert len(hits) == 1


def test_to_dict_round_trip_is_json_and_keeps_only_non_defaults():
    args = load(rotary_pct=0.25, gpt_j_residual=True, l2e={"enabled": True},
                optimizer={"type": "Adam", "params": {"lr": 1e-3}})
    d = json.loads(json.dumps(args.to_dict()))
    assert d["rotary_pct"] == 0.25 and d["l2e"] == {"enabled": True}
    assert "seed" not in d and "lr" not in d
    again = NeoXArgs.from_dict(d, config_files={"x.yml": "{}"})
    assert again.lr == 1e-3 and again.config_files == {"x.yml": "{}"}
    again.config_files = args.config_files
    assert again == args
    full = args.to_dict(derived=True)
    assert full["lr"] == 1e-3 and full["train_batch_size"] == 2


def test_overrides_apply_last(tmp_path):
    a = write(tmp_path, "a.yml", json.dumps({**BASE, "iteration": 5}))
    args = NeoXArgs.from_ymls([a], overrides={"iteration": 7, "eval-tasks": ["piqa"]})
    assert args.iteration == 7 and args.eval_tasks == ["piqa"]


def test_model_config_mapping():
    args = load(rotary_pct=0.25, gpt_j_residual=True, bias_gelu_fusion=True,
                no_weight_tying=True, init_method="small_init", hidden_dropout=0.1,
                attention_config=[[["flash"], 4]])
    args.set_vocab_size(1000)
    cfg = args.model_config()
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_layers) == (1024, 4, 4)
    assert cfg.gelu_tanh and cfg.parallel_residual and not cfg.tie_embeddings
    assert cfg.rotary_pct == 0.25 and cfg.init_method == "small_init"
    assert cfg.hidden_dropout == 0.1 and cfg.max_position_embeddings == 32
    # The CPU fallback of a config that asks for flash attention.
    if not torch.cuda.is_available():
        assert cfg.attention_impl == "sdpa"


@pytest.mark.gpu
def test_flash_requested_on_cuda_uses_flash_when_installed():
    import importlib.util

    args = load(attention_config=[[["flash"], 4]])
    expect = "flash" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert args.attention_impl() == expect
    assert load().attention_impl() == "sdpa"


def test_model_config_needs_vocab():
    with pytest.raises(ConfigError, match="set_vocab_size"):
        load().model_config()
