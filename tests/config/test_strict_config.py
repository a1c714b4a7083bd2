"""What used to slip through silently or as a late traceback is one ConfigError line."""
import json
import math

import pytest

from megatron.config import ConfigError, NeoXArgs
from megatron.config import checks
from megatron.config.launch_args import config_parser, load_from_namespace

BASE = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}}}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(fn, *a, **k) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*a, **k)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def load(**extra):
    return NeoXArgs.from_dict({**BASE, **extra})


def test_duplicate_key_in_one_file_names_file_key_and_lines(tmp_path):
    path = write(tmp_path, "dup.yml", json.dumps(BASE)[:-1] + ',\n"seq_length": 64}')
    msg = error(NeoXArgs.from_ymls, [path])
    assert "dup.yml" in msg and "'seq_length' is set twice" in msg and "line 2" in msg


def test_duplicate_key_inside_a_block(tmp_path):
    path = write(tmp_path, "dup.yml", "num_layers: 4\noptimizer:\n  type: Adam\n"
                                      "  params:\n    lr: 0.1\n    lr: 0.2\n")
    msg = error(NeoXArgs.from_ymls, [path])
    assert "dup.yml: line 6" in msg and "'lr' is set twice (lines 5 and 6)" in msg


@pytest.mark.parametrize("block, typo, hint", [
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betaz": [0.9, 0.9]}}},
     "optimizer.params.betaz", "betas"),
    ({"optimizer": {"type": "Adam", "parms": {"lr": 1e-3}}}, "optimizer.parms", "params"),
    ({"zero_optimization": {"stage": 1, "overlap_com": True}}, "zero_optimization.overlap_com",
     "overlap_comm"),
    ({"fp16": {"enabled": False, "loss_scale_windw": 100}}, "fp16.loss_scale_windw",
     "loss_scale_window"),
    ({"bf16": {"enable": True}}, "bf16.enable", "enabled"),
    ({"l2e": {"enabled": True, "rat": 0.1}}, "l2e.rat", "rate"),
])
def test_unknown_key_inside_a_block_names_the_nearest(block, typo, hint):
    msg = error(load, **block)
    assert f"unknown key '{typo}'" in msg and f"did you mean '{hint}'" in msg


def test_weight_decay_inside_optimizer_params_points_to_the_top_level_key():
    msg = error(load, optimizer={"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1}})
    assert "optimizer.params.weight_decay" in msg and "top-level weight_decay" in msg


def test_block_key_lists_match_deepspeed():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    def names(model):
        return {n for name, f in model.model_fields.items() for n in (name, f.alias) if n}

    assert names(DeepSpeedFP16Config) <= checks.FP16_KEYS
    assert names(DeepSpeedBF16Config) <= checks.BF16_KEYS
    assert names(DeepSpeedZeroConfig) <= checks.ZERO_KEYS


@pytest.mark.parametrize("lr, min_lr, style, ok", [
    (1e-4, 1e-3, "cosine", False), (1e-3, 1e-3, "cosine", False),
    (1e-3, 1e-3, "constant", True), (1e-3, 1e-4, "cosine", True), (0.0, 0.0, "linear", True),
])
def test_lr_must_exceed_min_lr(lr, min_lr, style, ok):
    extra = dict(optimizer={"type": "Adam", "params": {"lr": lr}}, min_lr=min_lr,
                 lr_decay_style=style)
    if ok:
        assert load(**extra).lr == lr
    else:
        assert "must be above min_lr" in error(load, **extra)


@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf")])
def test_negative_or_nan_lr(lr):
    msg = error(load, optimizer={"type": "Adam", "params": {"lr": lr}})
    assert "lr" in msg and ("finite" in msg or ">= 0" in msg)


def test_hand_set_lr_must_agree_with_optimizer_params():
    assert load(lr=1e-3).lr == 1e-3
    msg = error(load, lr=5e-4)
    assert "optimizer.params.lr" in msg and "--override optimizer.params.lr=0.0005" in msg
    base = {k: v for k, v in BASE.items() if k != "optimizer"}
    assert "optimizer.params.lr" in error(NeoXArgs.from_dict, {**base, "lr": 1e-3})


@pytest.mark.parametrize("key", ["padded_vocab_size", "world_size", "data_parallel_size"])
def test_computed_keys_cannot_be_set(key):
    msg = error(load, **{key: 8})
    assert f"{key} is computed, not set" in msg and "remove it" in msg


@pytest.mark.parametrize("key, value, rule", [
    ("seq_length", 0, ">= 1"), ("seq_length", -4, ">= 1"), ("num_layers", 0, ">= 1"),
    ("train_micro_batch_size_per_gpu", 0, ">= 1"), ("gradient_accumulation_steps", 0, ">= 1"),
    ("train_iters", 0, ">= 1"), ("log_interval", 0, ">= 1"), ("min_lr", -1.0, ">= 0"),
    ("weight_decay", -0.1, ">= 0"), ("warmup", 1.5, "in [0, 1)"),
    ("hidden_dropout", 1.0, "in [0, 1)"), ("rotary_pct", 1.5, "in [0, 1]"),
    ("init_method_std", 0.0, "> 0"), ("num_workers", -1, ">= 0"),
    ("gradient_clipping", float("nan"), "finite"), ("layernorm_epsilon", float("inf"), "finite"),
])
def test_value_ranges(key, value, rule):
    msg = error(load, **{key: value})
    assert key in msg and rule in msg and repr(value) in msg


def test_nan_inside_l2e_block():
    msg = error(load, l2e={"enabled": True, "loss_weight": float("nan")})
    assert "l2e.loss_weight must be a finite number" in msg


def test_batch_messages_do_not_contradict_themselves():
    base = {k: v for k, v in BASE.items() if k != "train_micro_batch_size_per_gpu"}
    msg = error(NeoXArgs.from_dict, {**base, "train_micro_batch_size_per_gpu": 0})
    assert msg.endswith("train_micro_batch_size_per_gpu must be an integer >= 1, got 0; fix the value")
    args = NeoXArgs.from_dict({**base, "train_batch_size": 8, "gradient_accumulation_steps": 2})
    msg = error(args.configure_world, 8)
    assert "train_batch_size=8 is not divisible by gradient_accumulation_steps=2 x " \
           "data-parallel size 8" in msg


def parse(tmp_path, *overrides):
    path = write(tmp_path, "base.yml", json.dumps(BASE))
    ns = config_parser("train.py", with_script=False).parse_args([path, "--override", *overrides])
    return load_from_namespace(ns)


def test_key_repeated_in_override(tmp_path):
    msg = error(parse, tmp_path, "train_iters=10", "train-iters=20")
    assert "'train-iters' is already set" in msg
    msg = error(parse, tmp_path, "l2e={enabled: true}", "l2e.rate=0.1")
    assert "'l2e.rate' is already set" in msg


def test_malformed_yaml_in_override_value(tmp_path):
    msg = error(parse, tmp_path, "l2e={enabled: true")
    assert "--override 'l2e={enabled: true'" in msg and "not valid YAML" in msg


def test_seq_length_zero_from_override(tmp_path):
    assert "seq_length must be an integer >= 1, got 0" in error(parse, tmp_path, "seq_length=0")
    assert math.isclose(parse(tmp_path, "optimizer.params.lr=0.002").lr, 0.002)



def test_yaml_exponent_strings_in_optimizer_params_are_numbers(tmp_path):
    """PyYAML reads 1e-08 (no dot) as a string; it is a number here, as at top level."""
    lines = [f"{k}: {v}" for k, v in BASE.items() if k != "optimizer"]
    lines.append("optimizer: {type: Adam, params: {lr: 1e-03, eps: 1e-08}}")
    args = NeoXArgs.from_ymls([write(tmp_path, "run.yml", "\n".join(lines) + "\n")])
    assert args.lr == 1e-3
    assert "eps must be a number > 0" in error(load, optimizer={"type": "Adam", "params": {"lr": 1e-3, "eps": "-1e-08"}})
