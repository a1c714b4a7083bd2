"""NeoX YAMLs (the repo's Pythia configs) -> the DeepSpeed config we pass to initialize."""
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from megatron.config import NeoXArgs
from megatron.errors import ConfigError
from megatron.training.ds_config import build_ds_config

PYTHIA = Path(__file__).resolve().parents[2] / "configs" / "pythia"


def _args(name, world_size, **overrides):
    args = NeoXArgs.from_ymls([str(PYTHIA / name)], overrides=overrides)
    args.configure_world(world_size)
    return args


def test_pythia_70m_fp16_dynamic_loss_scale_and_zero1_pass_through():
    args = _args("70M.yml", 32)
    cfg = build_ds_config(args)
    assert cfg["train_batch_size"] == 1024 == cfg["train_micro_batch_size_per_gpu"] * \
        cfg["gradient_accumulation_steps"] * 32
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert cfg["fp16"]["initial_scale_power"] == 12 and not cfg["bf16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 1 and "cpu_offload" not in cfg["zero_optimization"]
    assert cfg["gradient_clipping"] == 1.0
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours are client objects


def test_pythia_1b_fp16_dict_of_type_bfloat16_means_bf16():
    cfg = build_ds_config(_args("1B.yml", 64))
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and "type" not in cfg["bf16"]


def test_deepspeed_accepts_the_config_for_one_rank():
    args = _args("70M.yml", 1, train_batch_size=None, gradient_accumulation_steps=2)
    ds = DeepSpeedConfig(build_ds_config(args))  # parses and checks the batch triple
    assert ds.train_batch_size == args.train_micro_batch_size_per_gpu * 2
    assert ds.zero_optimization_stage == 1 and ds.float16_config.enabled


def test_zero2_with_pipeline_is_a_config_error():
    args = _args("70M.yml", 32, zero_optimization={"stage": 2})
    assert args.pipe_parallel_size == 1
    args.pipe_parallel_size = 2
    args.configure_world(32)
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_ds_config(args)
