"""The NeoX config schema: one dataclass per group, NeoX key names and defaults.

Each field's ``metadata`` holds its help text (rendered into configs/neox_arguments.md)
and, for keys whose other NeoX values change the math in ways we do not implement,
the tuple of ``supported`` values. ``NeoXArgs`` inherits all groups, so every key is a
flat attribute (``args.num_layers``) as in GPT-NeoX.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from megatron.config.l2e import L2EConfig

INIT_METHODS = Literal[
    "normal", "scaled_normal", "orthogonal", "scaled_orthogonal", "xavier_uniform",
    "xavier_normal", "wang_init", "small_init", "single_residual_scaled_normal",
]
SUPPORTED_INITS = ("normal", "scaled_normal", "small_init", "wang_init")
# Why some NeoX keys change nothing here (shared reasons).
SDPA_FUSES = "attention runs through SDPA or flash-attn, which fuse the softmax themselves"
UNFUSED = "a CUDA kernel fusion; the same math runs unfused"
TORCH_CHECKPOINT = "activation checkpointing is torch.utils.checkpoint, one block at a time"


def arg(default, help: str, supported: tuple | None = None, derived: bool = False,
        no_effect: str | None = None):
    """A schema field: default (copied if mutable), help text, optional supported values,
    and for NeoX keys accepted without effect here, the reason (listed at startup)."""
    meta = {"help": help, "supported": supported, "derived": derived, "no_effect": no_effect}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    num_layers: Optional[int] = arg(None, "Number of transformer blocks L.")
    hidden_size: Optional[int] = arg(None, "Width h of the residual stream.")
    num_attention_heads: Optional[int] = arg(None, "Attention heads; must divide hidden_size.")
    seq_length: Optional[int] = arg(None, "Training sequence length in tokens.")
    max_position_embeddings: Optional[int] = arg(None, "Longest sequence the model accepts.")
    intermediate_size: Optional[int] = arg(None, "MLP width; null means 4 * hidden_size.")
    pos_emb: Literal["learned", "rotary", "sinusoidal", "rpe", "alibi", "none"] = arg(
        "rotary", "Position embedding. Only rotary is implemented (NeoX's own default is "
        "'learned'; every Pythia config sets rotary).", supported=("rotary",))
    rotary_pct: float = arg(1.0, "Fraction of each head's channels that are rotated.")
    rotary_emb_base: float = arg(10000.0, "Rotary frequency base.")
    gpt_j_residual: bool = arg(False, "Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)).")
    gpt_j_tied: bool = arg(False, "One shared LayerNorm in parallel-residual blocks.",
                           supported=(False,))
    no_weight_tying: bool = arg(False, "Untie the output head from the input embedding.")
    norm: Literal["layernorm", "rmsnorm", "non_parametric_layernorm", "scalenorm",
                  "te_rmsnorm", "te_layernorm"] = arg(
        "layernorm", "Normalisation layer.", supported=("layernorm",))
    layernorm_epsilon: float = arg(1.0e-5, "LayerNorm epsilon.")
    activation: Literal["gelu", "geglu", "relu", "softsign", "swish", "mish", "silu",
                        "reglu", "swiglu", "bilinear", "glu"] = arg(
        "gelu", "MLP activation.", supported=("gelu",))
    bias_gelu_fusion: bool = arg(
        False, "NeoX's fused bias+GELU kernel, which is the tanh approximation; here it "
        "selects tanh GELU (true) or exact erf GELU (false). No kernel is needed.")
    attention_config: Optional[list] = arg(
        None, "Attention type per layer, e.g. [[[\"flash\"], 6]]. 'global' and 'flash' "
        "are supported; flash runs flash-attn when installed on CUDA, else SDPA.")
    num_kv_heads: Optional[int] = arg(None, "Grouped-query attention heads; only null or "
                                            "num_attention_heads (plain attention).")
    sliding_window_width: Optional[int] = arg(None, "Sliding-window attention width.",
                                              supported=(None,))
    use_qk_layernorm: bool = arg(False, "LayerNorm on queries and keys.", supported=(False,))
    use_bias_in_norms: bool = arg(True, "Bias in LayerNorms.", supported=(True,))
    use_bias_in_attn_linear: bool = arg(True, "Bias in attention linears.", supported=(True,))
    use_bias_in_mlp: bool = arg(True, "Bias in MLP linears.", supported=(True,))
    init_method: INIT_METHODS = arg(
        "normal", "Init of QKV, MLP-in, embedding and head.", supported=SUPPORTED_INITS)
    output_layer_init_method: INIT_METHODS = arg(
        "scaled_normal", "Init of attention.dense and MLP-out.", supported=SUPPORTED_INITS)
    init_method_std: float = arg(0.02, "Standard deviation of 'normal' init.")
    init_per_rank_shards: bool = arg(
        False, "Ours. false: initial weights depend only on seed and layer, the same for any "
        "tp/pp layout. true: NeoX's per-rank draw, each tensor-parallel shard from its own "
        "generator (weights then depend on model_parallel_size).")
    hidden_dropout: float = arg(0.0, "Dropout on attention and MLP outputs.")
    attention_dropout: float = arg(0.0, "Dropout on attention probabilities.")
    make_vocab_size_divisible_by: int = arg(128, "Vocab is padded to a multiple of this "
                                                 "times model_parallel_size.")
    padded_vocab_size: Optional[int] = arg(None, "Set from the tokenizer's vocab size "
                                                 "(args.set_vocab_size).", derived=True)
    output_layer_parallelism: Literal["column"] = arg("column", "How the head is split.")
    precision: Optional[Literal["fp16", "fp32", "bfloat16"]] = arg(
        None, "Derived from the fp16/bf16 dicts (an fp16 dict with type bfloat16 "
        "means bfloat16).", derived=True)


@dataclass
class ParallelArgs:
    pipe_parallel_size: int = arg(0, "Pipeline stages; 0 = no pipeline module (counts as 1).")
    model_parallel_size: int = arg(1, "Tensor-parallel ranks.")
    pipe_partition_method: str = arg("type:transformer|mlp", "DeepSpeed pipeline partitioning.")
    distributed_backend: str = arg("nccl", "torch.distributed backend.",
                                   no_effect="nccl on GPUs and gloo on CPU are chosen "
                                             "automatically")
    world_size: Optional[int] = arg(None, "Total ranks.", derived=True)
    data_parallel_size: Optional[int] = arg(None, "world / (pp * tp).", derived=True)
    is_pipe_parallel: bool = arg(False, "pipe_parallel_size >= 1.", derived=True)


@dataclass
class OptimizerArgs:
    optimizer: Optional[dict] = arg(None, "DeepSpeed-style {type, params: {lr, betas, eps}}.")
    lr: Optional[float] = arg(None, "Derived from optimizer.params.lr.", derived=True)
    min_lr: float = arg(0.0, "Floor of the decayed learning rate.")
    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = arg(
        "linear", "Learning-rate decay after warmup.")
    lr_decay_iters: Optional[int] = arg(None, "Decay length; null means train_iters.")
    lr_decay_fraction: Optional[float] = arg(None, "Decay length as a fraction of train_iters.")
    warmup: float = arg(0.01, "Warmup steps as a fraction of the decay iterations.")
    override_lr_scheduler: bool = arg(False, "Take lr, min_lr, warmup, decay length and style "
                                             "from the config when they differ from the "
                                             "checkpoint's (the position is still restored).")
    use_checkpoint_lr_scheduler: bool = arg(False, "Take those schedule settings from the "
                                                   "checkpoint instead of the config.")
    lr_rewarmup_iters: int = arg(0, "Ours: after loading weights without optimizer state at "
                                    "step N > 0, ramp the scheduled lr linearly from 0 over "
                                    "this many steps (0: continue the schedule unchanged).")
    weight_decay: float = arg(0.1, "Decoupled weight decay (not on biases and norms).")
    gradient_clipping: float = arg(1.0, "Global gradient-norm clip.")
    zero_optimization: Optional[dict] = arg(None, "DeepSpeed ZeRO config dict.")
    fp16: Optional[dict] = arg(None, "DeepSpeed fp16 dict (loss scaling).")
    bf16: Optional[dict] = arg(None, "DeepSpeed bf16 dict.")
    fp32_allreduce: bool = arg(False, "All-reduce gradients in fp32.")
    prescale_gradients: bool = arg(False, "DeepSpeed prescale_gradients.")
    gradient_predivide_factor: float = arg(1.0, "DeepSpeed gradient_predivide_factor.")
    data_types: Optional[dict] = arg(None, "DeepSpeed data_types dict (grad_accum_dtype).")


@dataclass
class TrainingArgs:
    train_batch_size: Optional[int] = arg(None, "Global batch = micro_batch * grad_accum * dp.")
    train_micro_batch_size_per_gpu: Optional[int] = arg(None, "Micro-batch per rank.")
    gradient_accumulation_steps: Optional[int] = arg(
        None, "Micro-batches per step; filled from the other two (1 if only the micro "
        "batch is given).")
    train_iters: Optional[int] = arg(None, "Optimizer steps to train.")
    seed: int = arg(1234, "Seed for init, data order and dropout.")
    checkpoint_activations: bool = arg(False, "Recompute activations in the backward pass.")
    checkpoint_num_layers: int = arg(1, "Blocks per activation-checkpoint chunk.",
                                     no_effect="each block is its own chunk")
    eod_mask_loss: bool = arg(False, "Do not train on predicting end-of-document tokens.")
    exit_interval: Optional[int] = arg(None, "Stop after this many iterations of this run.")
    nan_tolerance: int = arg(10, "Consecutive non-finite (skipped) steps before the run stops.")
    finetune: bool = arg(False, "Load weights only; start at iteration 0 with a fresh "
                                "optimizer, schedule, RNG and L2E state.")
    deepspeed: bool = arg(True, "Train with DeepSpeed (always).", supported=(True,))
    deepspeed_extra_args: Optional[dict] = arg(None, "Extra keys merged into the DeepSpeed "
                                                     "config.")


@dataclass
class DataArgs:
    data_path: Optional[str] = arg(None, "One .bin/.idx prefix, split by `split`.")
    train_data_paths: Optional[list[str]] = arg(None, "Training prefixes (blended).")
    valid_data_paths: Optional[list[str]] = arg(None, "Validation prefixes.")
    test_data_paths: Optional[list[str]] = arg(None, "Test prefixes.")
    train_data_weights: Optional[list[float]] = arg(None, "Blend weights of train paths.")
    valid_data_weights: Optional[list[float]] = arg(None, "Blend weights of valid paths.")
    test_data_weights: Optional[list[float]] = arg(None, "Blend weights of test paths.")
    weight_by_num_documents: bool = arg(False, "Weights from document counts.")
    weighted_sampler_alpha: float = arg(1.0, "Temperature of document-count weights.")
    data_impl: Literal["infer", "mmap", "cached"] = arg(
        "infer", "Indexed dataset format.", supported=("infer", "mmap"))
    split: str = arg("969, 30, 1", "train/valid/test split of data_path.")
    num_workers: int = arg(2, "DataLoader worker processes reading each rank's samples "
                              "(0: read in the training process).")
    data_preshuffled: bool = arg(False, "The data is Pythia's pre-shuffled stream of "
                                        "2049-token rows: step t reads rows [t*B, (t+1)*B).")
    pack_impl: Literal["packed", "pack_until_overflow", "unpacked"] = arg(
        "packed", "Sample packing.", supported=("packed",))
    dataset_impl: Literal["gpt2", "pairwise", "online"] = arg(
        "gpt2", "Dataset kind.", supported=("gpt2",))
    train_impl: Literal["normal", "dpo", "rm", "kto", "reinforce"] = arg(
        "normal", "Training objective.", supported=("normal",))
    allow_chopped: bool = arg(True, "Allow samples cut at the sequence length.",
                              no_effect="samples are always packed, none is chopped")
    tokenizer_type: Literal["GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer",
                            "SPMTokenizer", "CharLevelTokenizer", "TiktokenTokenizer"] = arg(
        "GPT2BPETokenizer", "Tokenizer kind.")
    vocab_file: Optional[str] = arg(None, "Tokenizer file (HF tokenizer.json or GPT-2 vocab).")
    merge_file: Optional[str] = arg(None, "GPT-2 BPE merges file.")


@dataclass
class CheckpointArgs:
    save: Optional[str] = arg(None, "Directory to write checkpoints to.")
    load: Optional[str] = arg(None, "Directory to resume from.")
    checkpoint_factor: Optional[Union[int, float]] = arg(None, "Save every N steps (linear) "
                                                               "or at powers of N (log).")
    checkpoint_scale: Literal["linear", "log"] = arg("linear", "Save schedule.")
    extra_save_iters: Optional[list[int]] = arg(None, "Extra steps to save at.")
    keep_last_n_checkpoints: Optional[int] = arg(None, "Delete older checkpoints.")
    no_save_optim: bool = arg(False, "Do not save optimizer state (a load of such a checkpoint "
                                     "starts a fresh optimizer).")
    no_save_rng: bool = arg(False, "Do not save RNG states.")
    no_load_optim: bool = arg(False, "Start a fresh optimizer; the LR schedule still continues "
                                     "at the checkpoint's step (NeoX restarts it).")
    no_load_rng: bool = arg(False, "Do not restore RNG states (also resumes a checkpoint whose "
                                   "per-rank extra state is lost; L2E state then starts new).")
    iteration: Optional[int] = arg(None, "Load this iteration instead of `latest`; with an "
                                         "HF directory as `load`, the step the weights are "
                                         "from (training continues at iteration + 1).")
    overwrite_checkpoints: bool = arg(False, "Ours: let this run replace checkpoints that already "
                                             "exist in `save` (refused by default, before step 1).")
    checkpoint_verify: bool = arg(True, "Ours: check every file of a checkpoint against its "
                                        "checksums.json before loading it.")
    allow_changed_inputs: bool = arg(False, "Ours: resume although the tokenizer, seq_length "
                                            "or training data (prefixes, blend weights) differ "
                                            "from the checkpoint's (refused otherwise).")
    config_files: Optional[dict] = arg(None, "Raw YAML texts by file name; filled by the "
                                             "loader and saved in every checkpoint.")


@dataclass
class LoggingArgs:
    log_dir: Optional[str] = arg(None, "Directory for logs and metrics.jsonl.")
    log_interval: int = arg(100, "Steps between console/metric lines.")
    tensorboard_dir: Optional[str] = arg(None, "TensorBoard directory (off when null).")
    use_wandb: Optional[bool] = arg(None, "Log to Weights & Biases.")
    wandb_project: str = arg("neox", "wandb project.")
    wandb_group: Optional[str] = arg(None, "wandb group.")
    wandb_run_name: Optional[str] = arg(None, "wandb run name.")
    wandb_team: Optional[str] = arg(None, "wandb entity.")
    wandb_host: str = arg("https://api.wandb.ai", "wandb server (WANDB_BASE_URL when unset).")
    wandb_init_all_ranks: bool = arg(False, "Start wandb on every rank (one group, a run per "
                                            "rank for system metrics; rank 0 logs training).")
    log_grad_norm: bool = arg(False, "Log per-parameter gradient norms (gradient_norms/*, "
                                     "before clipping) every log_interval; ZeRO stage 0. "
                                     "train/grad_norm, the global norm, is always logged.")
    log_param_norm: bool = arg(False, "Log per-parameter norms (parameter_norms/*) every "
                                      "log_interval.")
    log_grad_pct_zeros: bool = arg(False, "Log the fraction of exactly-zero gradient entries "
                                          "per parameter (pct_grad_zeros/*); ZeRO stage 0.")
    log_optimizer_states: bool = arg(False, "Log the norms of Adam's moments per parameter "
                                            "(optimizer_state_norms/{exp_avg,exp_avg_sq}/*) "
                                            "every log_interval; fp32, ZeRO stage 0.")
    peak_theoretical_tflops: Optional[float] = arg(
        None, "Per-GPU peak TFLOPS (e.g. 989 for H100 bf16): adds runtime/mfu and runtime/hfu "
        "and MFU in the log line.")
    steps_per_print: int = arg(10, "DeepSpeed's own print interval.",
                               no_effect="DeepSpeed's prints are off; our log line follows "
                                         "log_interval")
    wall_clock_breakdown: bool = arg(False, "DeepSpeed's timers, as timers/* (ms per step) on "
                                            "each log line instead of a print per micro-batch.")


@dataclass
class EvalArgs:
    eval_interval: int = arg(1000, "Steps between validation-loss evaluations.")
    eval_iters: int = arg(100, "Validation batches per evaluation.")
    eval_tasks: Optional[list[str]] = arg(None, "lm-eval tasks for eval.py (and every "
                                                "eval_interval when set).")
    eval_num_fewshot: int = arg(0, "Few-shot examples for eval_tasks.")
    eval_include_path: Optional[str] = arg(None, "Folder of extra lm-eval task YAMLs (local tasks "
                                                 "for eval_tasks).")
    eval_results_prefix: str = arg("", "Prefix of the eval results JSON file.")


@dataclass
class GenerationArgs:
    """generate.py (NeoX's text-generation keys and defaults)."""

    text_gen_type: Literal["unconditional", "input-file", "interactive"] = arg(
        "unconditional", "generate.py mode: num_samples samples from an empty context, one "
        "completion per prompt of sample_input_file, or prompts typed at the terminal "
        "(NeoX has no default; generate.py would fail without one).")
    sample_input_file: Optional[str] = arg(None, "Prompts for input-file mode, separated by "
                                                 "prompt_end.")
    sample_output_file: Optional[str] = arg(
        "samples.txt", "JSON lines written by generate.py (context, text, length, finished, "
        "message, duration_seconds); null in input-file mode means "
        "<sample_input_file>.output.jsonl.")
    num_samples: int = arg(1, "Samples in unconditional mode.")
    maximum_tokens: int = arg(64, "Most tokens generated per prompt.")
    prompt_end: str = arg("\n", "Separator between prompts in sample_input_file (default: "
                                   "a newline).")
    temperature: float = arg(0.0, "Softmax temperature; 0 with top_k 0 and top_p 0 is greedy.")
    top_k: int = arg(0, "Sample from the k most likely tokens (0: all).")
    top_p: float = arg(0.0, "Nucleus sampling: the smallest set with this probability "
                            "(0: off).")
    recompute: bool = arg(False, "Recompute the whole sequence for each new token instead of "
                                 "using the KV cache (several ranks with pipe_parallel_size "
                                 ">= 1 always do).")


@dataclass
class LauncherArgs:
    hostfile: Optional[str] = arg(None, "DeepSpeed hostfile: 'host slots=N' per line.")
    include: Optional[str] = arg(None, "Hosts/GPUs to use, e.g. 'node1:0,1@node2'.")
    exclude: Optional[str] = arg(None, "Hosts/GPUs to skip.")
    num_nodes: int = arg(-1, "Use the first N hosts of the hostfile (-1: all).")
    num_gpus: Optional[int] = arg(None, "GPUs per node (CPU: processes).")
    master_port: int = arg(29500, "Rendezvous port.")
    master_addr: Optional[str] = arg(None, "Rendezvous address.")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm"] = arg(
        "pdsh", "Multi-node launcher: pdsh (DeepSpeed's runner over ssh), slurm (srun, no "
        "ssh), openmpi (mpirun) or mvapich (DeepSpeed's runner); docs/launching.md.")
    force_multi: bool = arg(False, "Use the multi-node launcher even on one node.")
    no_ssh_check: bool = arg(False, "Skip DeepSpeed's passwordless-ssh check.")
    comment: Optional[str] = arg(None, "slurm --comment.")
    account: Optional[str] = arg(None, "slurm --account.")
    deepspeed_slurm: bool = arg(False, "NeoX: ranks read SLURM_* variables.",
                                no_effect="a rank started by srun always reads them")
    deepspeed_mpi: bool = arg(False, "NeoX: ranks discover their rank through MPI.",
                              no_effect="a rank started by mpirun always reads OMPI_COMM_WORLD_*")
    launcher_env: list[str] = arg(
        [], "More environment variables deepy.py passes to every rank, by name or fnmatch "
        "pattern (e.g. [MY_TOKEN, 'AWS_*']), on top of the default set (WANDB_*, HF_*, "
        "OMP_NUM_THREADS, DS_*, PYTHONPATH, CUDA_*, NCCL_*, TORCH_*, ...; docs/launching.md).")
    distributed_timeout_minutes: int = arg(
        10, "Collective timeout: a rank waiting this long in a collective (a peer hung or "
        "gone) fails and ends the job. Must exceed the longest time one rank works alone "
        "between collectives (a checkpoint save, building data indices).")
    peer_heartbeat_timeout_seconds: int = arg(
        120, "A rank whose heartbeat has not moved for this long (stopped, hung or gone) ends "
        "the job: its peers name it in one line and exit (0: off; docs/launching.md).")


@dataclass
class PerformanceArgs:
    """CUDA kernels, memory tricks and profiling. Most are accepted so NeoX configs load
    and change nothing here; each says why, and a run lists the ones its config sets."""

    scaled_upper_triang_masked_softmax_fusion: bool = arg(
        False, "Fused causal softmax.", no_effect=SDPA_FUSES)
    scaled_masked_softmax_fusion: bool = arg(False, "Fused masked softmax.", no_effect=SDPA_FUSES)
    bias_dropout_fusion: bool = arg(False, "Fused bias+dropout.", no_effect=UNFUSED)
    layernorm_fusion: bool = arg(False, "Fused LayerNorm kernel.", no_effect=UNFUSED)
    rope_fusion: bool = arg(False, "Fused rotary kernel.", no_effect=UNFUSED)
    fused_kernels_build_path: Optional[str] = arg(None, "Where NeoX JIT-builds kernels.",
                                                  no_effect="no kernels are built")
    fp16_lm_cross_entropy: bool = arg(False, "Cross-entropy in fp16.",
                                      no_effect="the loss is always computed in fp32")
    apply_query_key_layer_scaling: bool = arg(
        False, "fp16 overflow trick.", no_effect="it leaves the math unchanged")
    attention_softmax_in_fp32: bool = arg(False, "Softmax precision.",
                                          no_effect="SDPA chooses the softmax precision")
    use_cpu_initialization: bool = arg(False, "Init weights on CPU first.",
                                       no_effect="every layer is drawn on CPU already")
    partition_activations: bool = arg(
        False, "Shard checkpointed activations over TP.",
        no_effect="checkpointed activations stay whole on each tensor-parallel rank")
    synchronize_each_layer: bool = arg(False, "CUDA sync per checkpointed layer.",
                                       no_effect="no per-layer synchronisation is needed")
    contiguous_checkpointing: bool = arg(False, "Contiguous checkpoint buffers.",
                                         no_effect=TORCH_CHECKPOINT)
    checkpoint_in_cpu: bool = arg(False, "Offload checkpointed activations.",
                                  no_effect=TORCH_CHECKPOINT)
    deepspeed_activation_checkpointing: bool = arg(True, "Use DeepSpeed's checkpointing.",
                                                   no_effect=TORCH_CHECKPOINT)
    profile_backward: bool = arg(False, "Profile the backward pass.",
                                 no_effect="the `profile` trace covers the backward pass")
    sequence_parallel: bool = arg(
        False, "Megatron sequence parallelism.",
        no_effect="activations are not split along the sequence: same math, more "
                  "activation memory per tensor-parallel rank")
    rotary_save_freqs_buffer: bool = arg(False, "Save inv_freq in checkpoints.",
                                         no_effect="rotary frequencies are recomputed")
    use_shared_fs: bool = arg(True, "Index maps built once on a shared filesystem (else "
                                    "once per node).")
    mmap_warmup: bool = arg(False, "Touch every page of the mmap at start.",
                            no_effect="pages are read on first use; a full read first only "
                                      "delays the start")
    checkpoint_validation_with_forward_pass: bool = arg(
        False, "After each save, reload the checkpoint on rank 0 and check that it gives the "
        "live model's loss on a fixed batch (CheckpointError otherwise).")
    memory_profiling: bool = arg(
        False, "Record memory over steps profile_step_start..stop: a CUDA allocator snapshot "
        "per rank (memory_profiling_path, default <log_dir>/memory), on CPU memory columns "
        "in the profiler trace.")
    memory_profiling_path: Optional[str] = arg(None, "Where to write memory snapshots.")
    profile: bool = arg(False, "torch.profiler trace of steps profile_step_start..stop "
                               "(rank 0) in <log_dir>/profile/.")
    profile_step_start: int = arg(10, "First profiled step.")
    profile_step_stop: int = arg(12, "Last profiled step.")
    dump_state: bool = arg(False, "DeepSpeed dump_state.",
                           no_effect="DeepSpeed's dump_state is not wired up")


@dataclass
class L2EArgs:
    l2e: L2EConfig = field(default_factory=L2EConfig, metadata={
        "help": "Nested L2E block (see the L2E table below).", "supported": None,
        "derived": False, "no_effect": None})


GROUPS = (ModelArgs, ParallelArgs, OptimizerArgs, TrainingArgs, DataArgs, CheckpointArgs,
          LoggingArgs, EvalArgs, GenerationArgs, LauncherArgs, PerformanceArgs, L2EArgs)
NO_EFFECT_KEYS = {f.name: f.metadata["no_effect"] for g in GROUPS for f in dataclasses.fields(g)
                  if f.metadata["no_effect"]}
