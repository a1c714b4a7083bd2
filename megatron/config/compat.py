"""GPT-NeoX keys that neox-l2e knows but does not implement.

A NeoX config may name any of these. At NeoX's default value they change nothing, so
they are accepted and dropped; any other value would change the model or the run in a
way we do not reproduce, so it is a ConfigError rather than a silently different run.
Keys NeoX computes for itself at run time (rank, git hash, copies of other keys) are
dropped whatever their value.
"""

# NeoX key -> NeoX default (from megatron/neox_arguments/neox_args.py).
NEOX_ONLY_DEFAULTS = {
    # model variants: RMSNorm/ScaleNorm, relative positions, sparse attention, Mamba,
    # RWKV, Transformer Engine, weight sharing, soft prompts, MoE, muP
    "mlp_multiple_of": 1, "expansion_factor": None, "rmsnorm_fusion": False,
    "rms_norm_epsilon": 1e-8, "scalenorm_epsilon": 1e-8, "rpe_num_buckets": 32,
    "rpe_max_distance": 128, "opt_pos_emb_offset": 0, "sparsity_config": None,
    "num_unique_layers": None, "param_sharing_style": "grouped",
    "use_flashattn_swiglu": False, "gmlp_attn_dim": 64, "soft_prompt_tuning": None,
    "mamba_selective_scan_fusion": False, "mamba_causal_conv_fusion": False,
    "mamba_inner_func_fusion": False, "mamba_selective_fp32_params": True,
    "mamba_use_bias_in_conv": True, "mamba_use_bias_in_linears": False,
    "dim_att": None, "head_size": None, "ffn_dim": None,
    "te_columnparallel": False, "te_rowparallel": False, "te_layernorm_mlp": False,
    "te_mha": False, "te_fp8_format": "hybrid", "te_fp8_wgrad": True,
    "te_fp8_amax_history_len": 1, "te_fp8_amax_compute_algo": "most_recent",
    "te_fp8_margin": 0, "te_fp8_mha": False,
    "moe_num_experts": 1, "moe_expert_interval": 1, "moe_top_k": 1,
    "moe_router_type": "sinkhorn", "moe_lbl_in_fp32": False, "moe_jitter_eps": None,
    "use_mup": False, "coord_check": False, "save_base_shapes": False,
    "base_shapes_file": None, "mup_init_scale": 1.0, "mup_attn_temp": 1.0,
    "mup_output_temp": 1.0, "mup_embedding_mult": 1.0, "mup_rp_embedding_mult": 1.0,
    "mup_width_scale": 2,
    # online RL / weight serving
    "serve_model_weights": False, "weight_server_port": 6000,
    "online_dataserver_ips": "localhost", "online_dataserver_ports": 10000,
    # optimizers and DeepSpeed features we do not wire up
    "use_bnb_optimizer": False, "scheduler": None, "sparse_gradients": False, "amp": None,
    "curriculum_learning": None, "curriculum_seqlen": 0, "flops_profiler": None,
    "communication_data_type": None, "autotuning": None, "autotuning_run": None,
    "activation_checkpointing": None, "sparse_attention": None, "data_efficiency": None,
    "tensorboard": None, "wandb": None, "csv_monitor": None, "elasticity": None,
    "comms_logger": None, "compression_training": None, "checkpoint": None,
    # preference / reward training and their data paths
    "train_label_data_paths": None, "train_reward_data_paths": None,
    "test_label_data_paths": None, "test_reward_data_paths": None,
    "valid_label_data_paths": None, "valid_reward_data_paths": None,
    "pos_train_data_paths": None, "neg_train_data_paths": None,
    "pos_train_label_data_paths": None, "neg_train_label_data_paths": None,
    "pos_valid_data_paths": None, "neg_valid_data_paths": None,
    "pos_valid_label_data_paths": None, "neg_valid_label_data_paths": None,
    "pos_test_data_paths": None, "neg_test_data_paths": None,
    "pos_test_label_data_paths": None, "neg_test_label_data_paths": None,
    "dpo_fp32": True, "dpo_reference_free": False, "dpo_beta": 0.1, "kto_fp32": True,
    "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0, "z_loss": 0.0,
    "kto_beta": 0.1, "fp32_reinforce": True, "kl_impl": "mse", "kl_div_beta": 0.1,
    "reinforce_leave_one_out": False,
    # misc training features
    "s3_path": None, "s3_chunk_size": 104857600, "train_epochs": None,
    "char_level_ppl": False, "use_comet": None, "comet_workspace": None,
    "comet_project": None, "comet_experiment_name": None, "comet_tags": None,
    "comet_others": None, "log_gradient_noise_scale": False,
    "gradient_noise_scale_n_batches": 5, "gradient_noise_scale_cpu_offload": False,
    "lazy_mpu_init": False, "short_seq_prob": 0.1, "adlr_autoresume": False,
    "adlr_autoresume_interval": 1000, "onnx_safe": False, "deepscale": False,
    "deepscale_config": None,
    # fp16 loss-scale duplicates: DeepSpeed reads the fp16 dict instead
    "loss_scale": None, "hysteresis": 2, "loss_scale_window": 1000.0, "min_scale": 1.0,
    # text generation extras (generate.py's own keys are in the schema)
    "precompute_model_name": None, "return_logits": False,
}

# Values NeoX computes and writes into its own argument dumps.
NEOX_RUNTIME_KEYS = frozenset({
    "git_hash", "global_num_gpus", "local_rank", "rank", "user_script", "do_train",
    "do_valid", "do_test", "batch_size", "clip_grad", "dynamic_loss_scale",
    "optimizer_type", "zero_stage", "zero_reduce_scatter", "zero_contiguous_gradients",
    "zero_reduce_bucket_size", "zero_allgather_bucket_size",
    "comet_experiment",
})

# attention_config types and what we run them as.
ATTENTION_TYPES = ("global", "flash")
NEOX_ATTENTION_TYPES = ("global", "local", "sparse_fixed", "sparse_variable", "bigbird",
                        "bslongformer", "gmlp", "amlp", "flash", "rwkv", "mamba")


def is_neox_default(key: str, value) -> bool:
    """True when ``value`` is NeoX's default for a key we do not implement."""
    default = NEOX_ONLY_DEFAULTS[key]
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value) == default
    return value == default
