"""Plan a training run before booking GPUs: per-GPU memory, whether it fits, how long it takes.

    python tools/plan_run.py configs/pythia/2-8B.yml configs/l2e/2-8B/l2e.yml \\
        --gpus 24 --gpu-memory-gib 80 --override train_iters=14300 [--json]

The configs are merged by the training loader (same errors, same ``--override``). Memory
is an estimate per GPU of the busiest rank, in GiB (2^30 bytes):

  weights      parameters of one model shard (tp x pp split), in the training precision
  gradients    16-bit (or fp32) gradients, partitioned over dp from ZeRO stage 2, plus
               the fp32 gradient partition DeepSpeed keeps for mixed precision
  optimizer    Adam moments (and the fp32 master copy in mixed precision), partitioned
               over dp from ZeRO stage 1
  zero_buckets DeepSpeed's contiguous reduce buckets (ZeRO 1/2: reduce_bucket_size
               elements, twice with overlap_comm)
  activations  what one micro-batch keeps for backward (18 tensors of [b, s, h] per block,
               counted from megatron/model/gpt_neox.py; attention scores are never stored:
               SDPA / flash) plus the logits and their fp32 log-softmax; with activation
               checkpointing each block keeps its input and one block is recomputed at a
               time. Both variants are reported; the total uses the config's choice.
  l2e          statistics (mean, M2, step sums, frozen variance: 5 fp32 [S, W] per
               inhibited layer) + the per-forward buffers of megatron/l2e (z in fp32, d,
               d2, mask, the saved L_MS gradient: ~17 bytes per (sample, neuron) of one
               layer) + the saved gradient of every inhibited layer without checkpointing
  overhead     CUDA context, NCCL and allocator slack (--overhead-gib, default 1.0)

Time: model FLOPs per step = 6 N T + 12 L s h T (T tokens per step, N parameters doing
matmuls, i.e. without the input embedding; the second term is attention's QK^T and AV),
over (GPUs x peak x MFU). MFU counts model FLOPs only (recomputation is part of the
inefficiency); the default 0.40 is typical of well-tuned GPT-NeoX runs on A100/H100 and
an assumption, not a measurement: pass --mfu from a measured run (gpu_check.py's
throughput check) when you have one. With pipeline stages (pp > 1) the 1F1B schedule
idles each stage for pp - 1 of its gas + pp - 1 micro-batch slots, so the step takes
(gas + pp - 1) / gas times longer; tensor-parallel communication is not modelled.

When the configured global batch does not divide over the GPUs, the planner proposes
instead of failing: every layout of the same GPU count (tp x pp x dp, micro-batch,
accumulation) that keeps the batch, each planned as above, best first (fits, then less
tensor parallelism, whose per-layer all-reduces the time model leaves out, then step
time), and the nearest batch sizes that the configured layout can take.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # describe_model

from megatron.errors import ConfigError, cli_main  # noqa: E402

GIB = 2**30
DEFAULT_MFU = 0.40
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, bf16/fp16 dense; the table is in tools/bench/gpu_check.py
ACTIVATION_TENSORS_PER_BLOCK = 18  # [b, s, h]-sized tensors a block saves for backward
L2E_BYTES_PER_NEURON = 17  # z.float(), d, d2, g (fp32) and the mask, during one hook
MAX_TENSOR_PARALLEL = 8  # one node's GPUs: tensor parallelism across nodes is not proposed


def _shard_params(args) -> dict:
    """Parameter counts of the model's parts (meta device: no memory)."""
    import torch

    from megatron.model import GPTNeoX

    with torch.device("meta"):
        model = GPTNeoX(args.model_config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    head = 0 if args.model_config().tie_embeddings else count(model.head)
    return {"embed": count(model.embed), "block": count(model.blocks[0]), "head": head,
            "final_norm": count(model.final_norm)}


def training_flops(args, matmul_params: int | None = None) -> float:
    """Model FLOPs of one optimizer step: 6 N T + 12 L s h T, N = parameters doing matmuls
    (all but the input embedding), T = tokens per step."""
    if matmul_params is None:
        from describe_model import describe

        matmul_params = describe(args)["total_params"] - _shard_params(args)["embed"]
    tokens = args.train_batch_size * args.seq_length
    return 6 * matmul_params * tokens + 12 * args.num_layers * args.seq_length * args.hidden_size * tokens


def plan(args, gpus: int, gpu_memory_gib: float, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
         mfu: float = DEFAULT_MFU, overhead_gib: float = 1.0) -> dict:
    """The plan for ``args`` (vocab size set) on ``gpus`` GPUs of ``gpu_memory_gib`` each."""
    from describe_model import describe

    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must lie in (0, 1], got {mfu}")
    if peak_tflops <= 0 or gpu_memory_gib <= 0:
        raise ConfigError("--peak-tflops and --gpu-memory-gib must be > 0")
    args.configure_world(gpus)
    tp, pp, dp = args.model_parallel_size, max(args.pipe_parallel_size, 1), args.data_parallel_size
    L, h, s, V = args.num_layers, args.hidden_size, args.seq_length, args.padded_vocab_size
    b, gas = args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps
    params_total = describe(args)["total_params"]
    parts = _shard_params(args)

    # the busiest stage: ceil(L/pp) blocks and the larger of the two ends
    ends = parts["embed"] + parts["head"] + parts["final_norm"]
    if pp > 1:
        ends = max(parts["embed"], parts["head"] + parts["final_norm"])
    blocks_here = math.ceil(L / pp)
    shard = (blocks_here * parts["block"] + ends) / tp

    half = args.precision in ("fp16", "bfloat16")
    width = 2 if half else 4
    zero = dict(args.zero_optimization or {})
    stage = int(zero.get("stage", 0))
    optimizer_bytes = (12 if half else 8) * shard  # (fp32 master +) Adam m, v
    gradient_bytes = width * shard / (dp if stage >= 2 else 1)
    if half:  # fp32 gradients for the fp32 master (partitioned under ZeRO)
        gradient_bytes += 4 * shard / (dp if stage >= 1 else 1)
    if stage >= 1:
        optimizer_bytes /= dp
    buckets = 0.0
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        buckets = float(zero.get("reduce_bucket_size", 5e8)) * width * (2 if zero.get("overlap_comm", False) else 1)

    tokens = b * s
    per_block = tokens * h * ACTIVATION_TENSORS_PER_BLOCK * width / tp
    logits = tokens * V / tp * (width + 8 + (4 if half else 0))  # logits, fp32 copy, log-softmax
    in_flight = min(pp, gas)  # 1F1B: the first stage holds up to pp micro-batches
    full = in_flight * blocks_here * per_block + logits
    checkpointed = in_flight * blocks_here * tokens * h * width + per_block + logits

    l2e = 0.0
    if args.l2e.enabled:
        inhibited = len(args.l2e.resolve_layers(L))
        w = (h if args.l2e.site == "block_output" else 4 * h) // tp
        saved = 0 if args.checkpoint_activations else inhibited * in_flight * 4 * tokens * w
        l2e = inhibited * 5 * 4 * s * w + L2E_BYTES_PER_NEURON * tokens * w + saved

    activations = checkpointed if args.checkpoint_activations else full
    memory = {"weights": width * shard, "gradients": gradient_bytes, "optimizer": optimizer_bytes,
              "zero_buckets": buckets, "activations": activations, "l2e": l2e,
              "overhead": overhead_gib * GIB}
    memory = {k: v / GIB for k, v in memory.items()}
    memory["total"] = sum(memory.values())
    memory["activations_without_checkpointing"] = full / GIB
    memory["activations_with_checkpointing"] = checkpointed / GIB

    tokens_per_step = args.train_batch_size * s
    flops = training_flops(args, params_total - parts["embed"])
    pipeline_bubble = (gas + pp - 1) / gas  # 1F1B: pp - 1 idle slots per stage and step
    step_seconds = flops / (gpus * peak_tflops * 1e12 * mfu) * pipeline_bubble
    return {
        "gpus": gpus, "gpu_memory_gib": gpu_memory_gib,
        "memory_gib": {k: round(v, 3) for k, v in memory.items()},
        "fits": memory["total"] <= gpu_memory_gib,
        "margin_gib": round(gpu_memory_gib - memory["total"], 3),
        "params_total": params_total,
        "params_per_gpu": int(shard),
        "precision": args.precision, "zero_stage": stage,
        "tensor_parallel_size": tp, "pipe_parallel_size": pp,
        "data_parallel_size": dp,
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": gas,
        "train_batch_size": args.train_batch_size,
        "tokens_per_step": tokens_per_step,
        "checkpoint_activations": bool(args.checkpoint_activations),
        "l2e_layers": args.l2e.resolve_layers(L) if args.l2e.enabled else [],
        "flops_per_step": flops,
        "peak_tflops": peak_tflops, "mfu": mfu, "pipeline_bubble": round(pipeline_bubble, 4),
        "est_step_seconds": round(step_seconds, 4),
        "train_iters": args.train_iters,
        "est_hours": round(step_seconds * (args.train_iters or 0) / 3600, 2),
    }


def format_plan(p: dict) -> str:
    m = p["memory_gib"]
    lines = [f"{p['params_total']:,} parameters; {p['gpus']} GPUs = tp {p['tensor_parallel_size']} x "
             f"pp {p['pipe_parallel_size']} x dp {p['data_parallel_size']}; micro-batch "
             f"{p['train_micro_batch_size_per_gpu']} x accumulation {p['gradient_accumulation_steps']}"
             f" -> {p['train_batch_size']} sequences, {p['tokens_per_step']:,} tokens per step",
             f"{p['precision']}, ZeRO stage {p['zero_stage']}, activation checkpointing "
             f"{'on' if p['checkpoint_activations'] else 'off'}, L2E layers {p['l2e_layers'] or 'none'}",
             "", "per-GPU memory (GiB)"]
    for key in ("weights", "gradients", "optimizer", "zero_buckets", "activations", "l2e", "overhead", "total"):
        lines.append(f"  {key:13s} {m[key]:9.2f}")
    lines.append(f"  (activations: {m['activations_without_checkpointing']:.2f} without checkpointing, "
                 f"{m['activations_with_checkpointing']:.2f} with)")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines += [f"{verdict} in {p['gpu_memory_gib']} GiB (margin {p['margin_gib']:+.2f} GiB)", "",
              f"step: {p['flops_per_step']:.3e} FLOPs -> {p['est_step_seconds']:.3f} s at MFU "
              f"{p['mfu']:.2f} of {p['peak_tflops']:.0f} TFLOP/s per GPU"
              + (f" and x{p['pipeline_bubble']:.3f} for the pipeline bubble" if p["pipeline_bubble"] > 1 else "")
              + f"; {p['train_iters']} steps -> {p['est_hours']:.1f} h"]
    return "\n".join(lines)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _plan_layout(args, vocab_size: int, gpus: int, tp: int, pp: int, batch: int, settings: dict) -> dict | None:
    """Plan ``args`` as tp x pp x dp with global batch ``batch``: the configured micro-batch
    (or the largest divisor of the per-rank batch below it), smaller ones only when it does
    not fit; None when the batch does not split over dp."""
    dp = gpus // (tp * pp)
    if batch % dp:
        return None
    per_rank = batch // dp
    configured = args._batch_given.get("train_micro_batch_size_per_gpu") or per_rank
    micro_batches = sorted((d for d in _divisors(per_rank) if d <= configured), reverse=True)
    chosen = None
    for micro in micro_batches:
        candidate = copy.copy(args)
        candidate.model_parallel_size = tp
        # pipe_parallel_size 0 and 1 both mean one stage; keep the config's choice of module
        candidate.pipe_parallel_size = pp if pp > 1 else min(args.pipe_parallel_size, 1)
        candidate._batch_given = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro,
                                  "gradient_accumulation_steps": per_rank // micro}
        candidate.set_vocab_size(vocab_size)
        chosen = plan(candidate, gpus, **settings)
        if chosen["fits"]:
            break
    return chosen


def _nearest_per_rank(start: int, micro_batch: int, direction: int) -> int:
    """The first per-rank batch from ``start`` in ``direction`` that splits into micro-batches
    of at least half ``micro_batch`` (a prime per-rank batch would force micro-batch 1);
    0 when none is left below."""
    per_rank = start
    while per_rank > 0:
        if per_rank <= micro_batch or any(per_rank % m == 0 for m in range(micro_batch, (micro_batch + 1) // 2 - 1, -1)):
            return per_rank
        per_rank += direction
    return 0


def propose(args, vocab_size: int, gpus: int, **settings) -> dict:
    """The layouts of ``gpus`` GPUs that keep the configured global batch, best first, and
    the nearest batch sizes the configured tp x pp layout takes."""
    batch = args._batch_given["train_batch_size"]
    layouts = []
    for tp in _divisors(gpus):
        if tp > MAX_TENSOR_PARALLEL or args.num_attention_heads % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp <= args.num_layers:
                layout = _plan_layout(args, vocab_size, gpus, tp, pp, batch, settings)
                if layout is not None:
                    layouts.append(layout)
    layouts.sort(key=lambda p: (not p["fits"], p["tensor_parallel_size"], p["est_step_seconds"]))

    tp, pp = args.model_parallel_size, max(args.pipe_parallel_size, 1)
    if gpus % (tp * pp):
        tp = pp = 1
    dp = gpus // (tp * pp)
    configured = args._batch_given.get("train_micro_batch_size_per_gpu") or batch // dp or 1
    nearest = sorted({dp * _nearest_per_rank(batch // dp, configured, -1),
                      dp * _nearest_per_rank(-(-batch // dp), configured, +1)} - {batch, 0})
    return {"train_batch_size": batch, "gpus": gpus, "layouts": layouts,
            "nearest_batches": [_plan_layout(args, vocab_size, gpus, tp, pp, b, settings) for b in nearest]}


def _overrides(p: dict) -> str:
    return (f"model_parallel_size={p['tensor_parallel_size']} pipe_parallel_size={p['pipe_parallel_size']} "
            f"train_batch_size={p['train_batch_size']} train_micro_batch_size_per_gpu="
            f"{p['train_micro_batch_size_per_gpu']} gradient_accumulation_steps={p['gradient_accumulation_steps']}")


def _layout_row(p: dict) -> str:
    return (f"  tp {p['tensor_parallel_size']:<2d} x pp {p['pipe_parallel_size']:<2d} x dp {p['data_parallel_size']:<4d}"
            f" micro {p['train_micro_batch_size_per_gpu']:>3d} x accumulation {p['gradient_accumulation_steps']:<4d}"
            f" {p['memory_gib']['total']:7.1f} GiB  {'fits' if p['fits'] else 'DOES NOT FIT':12s}"
            f" {p['est_step_seconds']:7.2f} s/step  {p['est_hours']:7.1f} h")


def format_proposals(problem: str, proposals: dict) -> str:
    batch, gpus = proposals["train_batch_size"], proposals["gpus"]
    lines = [f"as configured: {problem}", ""]
    if proposals["layouts"]:
        lines.append(f"layouts of {gpus} GPUs that keep train_batch_size={batch}, best first "
                     f"(fits, less tensor parallelism, step time):")
        lines += [_layout_row(p) for p in proposals["layouts"]]
    else:
        lines.append(f"no layout of {gpus} GPUs keeps train_batch_size={batch}")
    if proposals["nearest_batches"]:
        lines += ["", "nearest batch sizes on the configured layout:"]
        for p in proposals["nearest_batches"]:
            change = (p["train_batch_size"] - batch) / batch
            lines.append(_layout_row(p) + f"  batch {p['train_batch_size']} ({change:+.1%} tokens per step)")
    best = (proposals["layouts"] or proposals["nearest_batches"])[0]
    lines += ["", f"plan one in full: --override {_overrides(best)}"]
    return "\n".join(lines)


@cli_main
def main(argv=None):
    from describe_model import vocab_size_of

    from megatron.config.launch_args import config_parser, load_from_namespace

    p = config_parser("plan_run.py", with_script=False)
    p.description = __doc__.splitlines()[0]
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the whole job")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU, GiB")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="dense bf16/fp16 peak of one GPU (default: H100 SXM, 989)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation (default 0.40)")
    p.add_argument("--overhead-gib", type=float, default=1.0, help="CUDA context + allocator slack per GPU")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocab before padding (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ns = p.parse_args(argv)
    if ns.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {ns.gpus}")
    args = load_from_namespace(ns)
    vocab_size = vocab_size_of(args, ns.vocab_size)
    args.set_vocab_size(vocab_size)
    settings = {"gpu_memory_gib": ns.gpu_memory_gib, "peak_tflops": ns.peak_tflops, "mfu": ns.mfu,
                "overhead_gib": ns.overhead_gib}
    try:
        result = plan(copy.copy(args), ns.gpus, **settings)
    except ConfigError as problem:
        if args._batch_given.get("train_batch_size") is None:
            raise  # no batch to keep: the loader's message is the answer
        proposals = propose(args, vocab_size, ns.gpus, **settings)
        if not proposals["layouts"] and not proposals["nearest_batches"]:
            raise
        print(json.dumps({"problem": str(problem), **proposals}, indent=2) if ns.json
              else format_proposals(str(problem), proposals))
        return
    print(json.dumps(result, indent=2) if ns.json else format_plan(result))


if __name__ == "__main__":
    main()
