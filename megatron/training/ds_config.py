"""NeoXArgs -> the DeepSpeed config dict passed to ``deepspeed.initialize``.

The optimizer and scheduler are ours (client objects), so no "optimizer"/"scheduler"
sections are emitted. NeoX's precision dicts pass through with their own keys:
a ``fp16`` dict with ``type: bfloat16`` (Pythia-1B's style) means bf16.
"""
from __future__ import annotations

from megatron.errors import ConfigError


def _precision_sections(args) -> dict:
    fp16 = dict(args.fp16 or {})
    bf16 = dict(args.bf16 or {})
    if args.precision == "fp16":
        fp16.pop("type", None)
        fp16["enabled"] = True
        return {"fp16": fp16, "bf16": {"enabled": False}}
    if args.precision == "bfloat16":
        bf16_out = {k: v for k, v in bf16.items() if k != "type"}
        bf16_out["enabled"] = True
        return {"fp16": {"enabled": False}, "bf16": bf16_out}
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}}


def build_ds_config(args) -> dict:
    """The DeepSpeed JSON config for this run (batch triple, ZeRO, precision, clipping)."""
    mbs, gas = args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps
    if args.train_batch_size != mbs * gas * args.data_parallel_size:
        raise ConfigError(
            f"train_batch_size={args.train_batch_size} != train_micro_batch_size_per_gpu={mbs} "
            f"x gradient_accumulation_steps={gas} x data parallel size={args.data_parallel_size}; fix one of them"
        )
    zero = dict(args.zero_optimization or {})
    zero.setdefault("stage", 0)
    if zero["stage"] > 1 and args.pipe_parallel_size > 1:
        raise ConfigError(
            f"zero_optimization.stage={zero['stage']} cannot be combined with pipe_parallel_size="
            f"{args.pipe_parallel_size}; DeepSpeed pipelines support ZeRO stage 0 or 1"
        )
    # NeoX YAMLs use the offload switch cpu_offload, which DeepSpeed has deprecated.
    if zero.pop("cpu_offload", False):
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_batch_size": args.train_batch_size,
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(args.gradient_clipping or 0.0),
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our MetricsLogger reports progress
        "wall_clock_breakdown": bool(args.wall_clock_breakdown),
        # Our optimizer is a plain torch one; tell ZeRO that it is safe to wrap it.
        "zero_allow_untested_optimizer": True,
        "prescale_gradients": bool(args.prescale_gradients),
        "gradient_predivide_factor": float(args.gradient_predivide_factor),
    }
    if args.fp32_allreduce:
        config["communication_data_type"] = "fp32"
    if args.data_types:
        config["data_types"] = dict(args.data_types)
    config.update(_precision_sections(args))
    config.update(args.deepspeed_extra_args or {})
    return config
