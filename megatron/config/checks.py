"""Checks a merged config must pass before launch: the keys of nested DeepSpeed-style
blocks, value ranges, and derived keys set by hand.

Every failure is one ConfigError naming the file, the key and the fix. A typo inside a
block (``optimizer.params.betaz``) would otherwise be dropped silently by the code that
reads the block, and an out-of-range value would fail much later as a traceback.
"""
from __future__ import annotations

import math

from megatron.config.types import check_value, nearest_hint
from megatron.errors import ConfigError

# DeepSpeed 0.19's fp16 / bf16 / ZeRO config fields (pydantic names and aliases; kept in
# sync by tests/config/test_strict_config.py), plus NeoX's `type` switch (bf16 via fp16)
# and the redundant `"fp16": true` every Pythia config carries inside its fp16 block.
FP16_KEYS = frozenset({
    "enabled", "type", "fp16", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
    "hysteresis", "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"})
BF16_KEYS = frozenset({
    "enabled", "type", "immediate_grad_update", "check_grad_overflow",
    "bf16_master_weights_and_grads", "bf16_optimizer_states"})
ZERO_KEYS = frozenset({
    "stage", "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
    "reduce_bucket_size", "contiguous_gradients", "cpu_offload", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "offload_optimizer", "offload_param", "sub_group_size",
    "elastic_checkpoint", "load_from_fp32_weights", "ignore_unused_parameters",
    "legacy_stage1", "round_robin_gradients", "use_multi_rank_bucket_allreduce",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "mics_shard_size", "mics_hierarchical_params_gather",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "compute_grad_norm", "enable_sanity_checks",
    "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "max_live_parameters",
    "stage3_max_live_parameters", "max_reuse_distance", "stage3_max_reuse_distance",
    "prefetch_bucket_size", "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold",
    "stage3_model_persistence_threshold", "module_granularity_threshold",
    "stage3_module_granularity_threshold", "allgather_sequential",
    "stage3_allgather_sequential", "use_all_reduce_for_fetch_params",
    "stage3_use_all_reduce_for_fetch_params", "leaf_module", "parameter_alignment",
    "save_muon_momentum_buffer_in_memory", "zenflow"})
OPTIMIZER_KEYS = frozenset({"type", "params"})
# What our AdamW reads (megatron/training/optimizer.py); NeoX's Pythia configs use these.
OPTIMIZER_PARAM_KEYS = frozenset({"lr", "betas", "eps"})
MOVED_PARAM_KEYS = {"weight_decay": "set the top-level weight_decay key instead"}

AT_LEAST_1 = (
    "num_layers", "hidden_size", "num_attention_heads", "seq_length",
    "max_position_embeddings", "intermediate_size", "num_kv_heads", "train_batch_size",
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_iters",
    "lr_decay_iters", "model_parallel_size", "make_vocab_size_divisible_by", "log_interval",
    "steps_per_print", "checkpoint_num_layers", "exit_interval", "keep_last_n_checkpoints",
    "distributed_timeout_minutes")
AT_LEAST_0 = (
    "peer_heartbeat_timeout_seconds", "pipe_parallel_size", "eval_interval", "eval_iters", "num_workers", "nan_tolerance",
    "seed", "min_lr", "weight_decay", "gradient_clipping", "eval_num_fewshot", "iteration",
    "profile_step_start", "profile_step_stop")
POSITIVE = ("layernorm_epsilon", "init_method_std", "rotary_emb_base",
            "peak_theoretical_tflops", "checkpoint_factor", "gradient_predivide_factor")
# key: (low, high, high included)
FRACTIONS = {"warmup": (0.0, 1.0, False), "hidden_dropout": (0.0, 1.0, False),
             "attention_dropout": (0.0, 1.0, False), "rotary_pct": (0.0, 1.0, True),
             "lr_decay_fraction": (0.0, 1.0, True)}
# Derived keys a config may not set: they are computed, so a hand-set value would be
# silently replaced. (`lr` and `precision` may be set when they agree; see NeoXArgs.)
COMPUTED_KEYS = {
    "padded_vocab_size": "it is the tokenizer's vocab size padded to a multiple of "
                         "make_vocab_size_divisible_by x model_parallel_size",
    "world_size": "it is the number of launched ranks (num_gpus x nodes)",
    "data_parallel_size": "it is world size / (pipe_parallel_size x model_parallel_size)",
    "is_pipe_parallel": "it follows pipe_parallel_size",
}


def check_block_keys(block_name: str, block, valid, source: str, moved: dict | None = None):
    """Every key of a nested block must be one the code reads."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: '{block_name}' must be a mapping, got {block!r}")
    for key in block:
        if key in valid:
            continue
        if moved and key in moved:
            raise ConfigError(f"{source}: {block_name}.{key} is not read here; {moved[key]}")
        raise ConfigError(f"{source}: unknown key '{block_name}.{key}'"
                          f"{nearest_hint(str(key), sorted(valid))}; remove or fix it")


def check_blocks(args, where) -> None:
    """Keys of optimizer, optimizer.params, zero_optimization, fp16 and bf16, and the
    values our optimizer reads (``where(key)`` names the file that set a key)."""
    check_block_keys("fp16", args.fp16, FP16_KEYS, where("fp16"))
    check_block_keys("bf16", args.bf16, BF16_KEYS, where("bf16"))
    check_block_keys("zero_optimization", args.zero_optimization, ZERO_KEYS,
                     where("zero_optimization"))
    stage = (args.zero_optimization or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where('zero_optimization')}: zero_optimization.stage={stage!r} "
                          f"must be 0, 1, 2 or 3")
    if args.optimizer is None:
        return
    src = where("optimizer")
    check_block_keys("optimizer", args.optimizer, OPTIMIZER_KEYS, src)
    params = args.optimizer.get("params", {})
    check_block_keys("optimizer.params", params, OPTIMIZER_PARAM_KEYS, src, MOVED_PARAM_KEYS)
    # YAML reads 1e-8 (no dot) as a string: coerced like top-level float keys
    betas = check_value("optimizer.params.betas", params.get("betas", [0.9, 0.999]),
                        list[float], src)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{src}: optimizer.params.betas must be two numbers in [0, 1), "
                          f"e.g. [0.9, 0.95]; got {betas!r}")
    eps = check_value("optimizer.params.eps", params.get("eps", 1e-8), float, src)
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"{src}: optimizer.params.eps must be a number > 0, got {eps!r}")


def _range_error(where, key, value, rule):
    return ConfigError(f"{where(key)}: {key} must be {rule}, got {value!r}; fix the value")


def check_ranges(args, where) -> None:
    """Every numeric key inside its meaningful range; NaN and inf nowhere."""
    l2e_values = {f"l2e.{k}": v for k, v in vars(args.l2e).items()}
    for key, value in {**vars(args), **l2e_values}.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where(key.split('.')[0])}: {key} must be a finite number, "
                              f"got {value!r}; fix the value")
    for rule, keys, ok in (("an integer >= 1", AT_LEAST_1, lambda v: v >= 1),
                           (">= 0", AT_LEAST_0, lambda v: v >= 0),
                           ("> 0", POSITIVE, lambda v: v > 0)):
        for key in keys:
            value = getattr(args, key)
            if value is not None and not ok(value):
                raise _range_error(where, key, value, rule)
    for key, (low, high, high_included) in FRACTIONS.items():
        value = getattr(args, key)
        inside = value is None or (low <= value < high or (high_included and value == high))
        if not inside:
            bracket = "]" if high_included else ")"
            raise _range_error(where, key, value, f"in [{low:g}, {high:g}{bracket}")
    if None not in (args.profile_step_start, args.profile_step_stop) \
            and args.profile_step_stop < args.profile_step_start:
        raise ConfigError(f"{where('profile_step_stop')}: profile_step_stop="
                          f"{args.profile_step_stop} is before profile_step_start="
                          f"{args.profile_step_start}; swap them")
    bad_iters = [i for i in args.extra_save_iters or () if i < 0]
    if bad_iters:
        raise _range_error(where, "extra_save_iters", bad_iters, "a list of steps >= 0")


def check_data_weights(args, where) -> None:
    """Blend weights are shares of the mix: none negative and some positive (normalising
    [1.0, -0.5] would train on a -1.0 share)."""
    for split in ("train", "valid", "test"):
        key = f"{split}_data_weights"
        weights = getattr(args, key)
        if weights is None:
            continue
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"{where(key)}: {key} must be non-negative numbers with a positive "
                              f"sum (each path's share of the mix), got {list(weights)}; fix the weights")


def check_lr(args, where) -> None:
    """lr finite and >= 0; above min_lr unless the schedule is constant (where lr equal
    to min_lr is a plain constant rate)."""
    lr, min_lr = args.lr, args.min_lr
    if lr is None:
        return
    src = where("optimizer", "min_lr")
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"{src}: optimizer.params.lr must be a finite number >= 0, got {lr!r}")
    if lr < min_lr or (lr == min_lr and args.lr_decay_style != "constant" and lr > 0):
        raise ConfigError(
            f"{src}: optimizer.params.lr={lr:g} must be above min_lr={min_lr:g}, or the decay "
            f"never happens (the schedule would train at min_lr); lower min_lr or raise lr"
            + (" (or set lr_decay_style: constant)" if lr == min_lr else ""))


def check_computed_keys(given: dict) -> None:
    """``given``: key -> source for the keys the user set."""
    for key, why in COMPUTED_KEYS.items():
        if key in given:
            raise ConfigError(f"{given[key]}: {key} is computed, not set ({why}); remove it")
