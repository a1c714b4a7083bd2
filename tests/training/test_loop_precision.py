"""Precision, ZeRO and activation-checkpointing settings reach DeepSpeed and train the same model."""
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.errors import ConfigError

from distributed import run_distributed

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "local" / "tiny.yml")
BASE = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
    "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
    "train_iters": 20, "lr_decay_iters": 20, "l2e": {"enabled": False}, "save": None, "log_dir": None,
}
FP16 = {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1}}  # Pythia's dict
CASES = {
    "fp32": {},
    "fp32_zero3": {"zero_optimization": {"stage": 3}},
    "fp32_recompute": {"checkpoint_activations": True},
    # Pythia-1B's spelling of bf16: an fp16 dict with type bfloat16
    "bf16_zero2": {"fp16": {"enabled": True, "type": "bfloat16"}, "zero_optimization": {"stage": 2}},
}


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


def _run_cases(rank, world_size, steps):
    from megatron.config import NeoXArgs
    from megatron.parallel import ParallelGroups
    from megatron.training.engine import build_trainer
    from megatron.training.loop import loss_scale, train_step

    groups = ParallelGroups.build(1, 1)
    tokens = torch.from_numpy(np.random.RandomState(0).randint(0, 256, size=(2, 33)))
    out = {}
    cases = {**CASES, "fp16": FP16} if _fp16_supported() else CASES
    for name, overrides in cases.items():
        args = NeoXArgs.from_ymls([TINY], overrides={**BASE, **overrides})
        args.configure_world(world_size)
        args.set_vocab_size(256)
        trainer = build_trainer(args, groups)
        batch = (tokens[:, :-1], tokens[:, 1:], torch.ones(2, 32))
        stream = iter([batch] * (steps * 2))
        losses = [train_step(trainer, stream, it)["lm_loss"] for it in range(steps)]
        dtype = next(trainer.engine.module.parameters()).dtype
        out[name] = {"losses": losses, "dtype": str(dtype), "scale": loss_scale(trainer.engine),
                     "zero": trainer.engine.zero_optimization_stage()}
    return out


def test_precisions_and_zero_stages_train_alike():
    (out,) = run_distributed(_run_cases, world_size=1, args=(4,), init_deepspeed=True)
    ref = out["fp32"]["losses"]
    assert ref[-1] < ref[0]  # the same batch four times: the loss must drop
    np.testing.assert_allclose(out["fp32_zero3"]["losses"], ref, rtol=1e-5)
    np.testing.assert_allclose(out["fp32_recompute"]["losses"], ref, rtol=1e-6)
    assert out["fp32_zero3"]["zero"] == 3 and out["bf16_zero2"]["zero"] == 2
    assert out["bf16_zero2"]["dtype"] == "torch.bfloat16"
    np.testing.assert_allclose(out["bf16_zero2"]["losses"], ref, rtol=2e-2)  # same trajectory, looser
    if "fp16" in out:  # this CPU's DeepSpeed accelerator may lack fp16 (then: the error below)
        assert out["fp16"]["dtype"] == "torch.float16" and out["fp16"]["scale"] == 2.0**12
        np.testing.assert_allclose(out["fp16"]["losses"], ref, rtol=2e-2)


def test_fp16_on_a_device_without_it_is_a_config_error():
    if _fp16_supported():
        pytest.skip("this device trains in fp16")
    from megatron.config import NeoXArgs
    from megatron.training.engine import check_precision_supported

    args = NeoXArgs.from_ymls([TINY], overrides={**BASE, **FP16})
    with pytest.raises(ConfigError, match="fp16.enabled"):
        check_precision_supported(args)
