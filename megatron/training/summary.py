"""The run summary: what a run is about to do, in numbers, before step 1.

Printed on rank 0 as a YAML block, saved as ``configs/run_summary.yml`` in every
checkpoint (beside the config files, so a checkpoint says which layout, batch and data
produced it) and added to the wandb config / TensorBoard text. The values are derived
ones a config does not spell out: the data-parallel size and gradient accumulation,
parameter counts, tokens per step, how many samples and epochs the data gives and
whether the index maps came from the cache, the L2E sites, and the config keys that
are accepted but change nothing here.
"""
from __future__ import annotations

import os

import torch.distributed as dist
import yaml

from megatron.config.loading import SUMMARY_FILE
from megatron.model import parameter_counts
from megatron.multinode import forwarded_names


def _dataset(ds) -> dict | list | None:
    """Documents, tokens, samples, epochs and index-map cache state of one split."""
    if ds is None:
        return None
    if hasattr(ds, "datasets"):  # a blend: one entry per component
        return [{"weight": round(float(w), 6), **_dataset(d)} for d, w in zip(ds.datasets, ds.weights)]
    indexed = ds.indexed_dataset
    out = {"prefix": indexed.prefix, "samples": len(ds)}
    if hasattr(ds, "index_cache"):
        out.update({
            "documents": ds.num_documents, "tokens": ds.num_tokens, "epochs": ds.num_epochs,
            "index_map": ("hit" if ds.index_cache["hit"] else "miss (built now)"),
            "index_map_files": sorted(ds.index_cache["paths"]),
        })
    else:  # pre-shuffled rows: one sample per item, read in order
        out.update({"rows": len(indexed), "tokens": int(indexed.sizes.sum()),
                    "order": "pre-shuffled"})
    return out


def _l2e(args) -> dict | str:
    cfg = args.l2e
    if not cfg.enabled:
        return "off"
    layers = cfg.resolve_layers(args.num_layers)
    width = args.hidden_size if cfg.site == "block_output" else (args.intermediate_size or 4 * args.hidden_size)
    neurons = args.seq_length * width
    return {
        "layers": layers, "site": cfg.site, "neurons_per_layer": neurons,
        "neurons_total": neurons * len(layers), "rate": cfg.rate,
        "selected_per_sample_per_layer": round(neurons * cfg.rate),
        "retrieval": cfg.retrieval, "inhibition": cfg.inhibition, "loss_weight": cfg.loss_weight,
    }


def build_summary(args, tokenizer_vocab: int, datasets, notes: dict | None = None) -> dict:
    total, non_embedding = parameter_counts(args.model_config())
    tokens_per_step = args.train_batch_size * args.seq_length
    zero = (args.zero_optimization or {}).get("stage", 0)
    log_dir = args.log_dir or "logs"
    summary = {
        "layout": {
            "world_size": args.world_size, "data_parallel": args.data_parallel_size,
            "tensor_parallel": args.model_parallel_size,
            "pipeline_parallel": max(args.pipe_parallel_size, 1),
            "pipeline_module": args.pipe_parallel_size >= 1,
        },
        "batch": {
            "micro_batch": args.train_micro_batch_size_per_gpu,
            "gradient_accumulation": args.gradient_accumulation_steps,
            "data_parallel": args.data_parallel_size, "global_batch": args.train_batch_size,
            "tokens_per_step": tokens_per_step,
        },
        "model": {
            "params_total": total, "params_non_embedding": non_embedding,
            "layers": args.num_layers, "hidden_size": args.hidden_size,
            "heads": args.num_attention_heads, "seq_length": args.seq_length,
            "vocab": tokenizer_vocab, "padded_vocab": args.padded_vocab_size,
        },
        "training": {
            "precision": args.precision, "zero_stage": zero,
            "activation_checkpointing": args.checkpoint_activations,
            "train_iters": args.train_iters,
            "samples": args.train_iters * args.train_batch_size,
            "tokens": args.train_iters * tokens_per_step,
            "lr": args.lr, "min_lr": args.min_lr, "lr_decay_style": args.lr_decay_style,
        },
        "data": {split: _dataset(ds) for split, ds in zip(("train", "valid", "test"), datasets)},
        "l2e": _l2e(args),
        "outputs": {
            "checkpoints": os.path.abspath(args.save) if args.save else "not saved (no 'save')",
            "load": os.path.abspath(args.load) if args.load else None,
            "metrics": os.path.abspath(os.path.join(log_dir, "metrics.jsonl")),
            "tensorboard": args.tensorboard_dir, "wandb": args.wandb_project if args.use_wandb else None,
        },
    }
    # Names only: values may be secrets (WANDB_API_KEY, HF_TOKEN).
    summary["environment forwarded to every rank"] = forwarded_names(args.launcher_env) or "none"
    no_effect = [f"{key} ({why})" for key, why in args.no_effect_keys()]
    if no_effect:
        summary["accepted, no effect here"] = no_effect
    if notes:
        summary["checks"] = dict(notes)
    return summary


def announce(args, tokenizer_vocab: int, datasets, logger=None, notes: dict | None = None) -> dict:
    """Print the summary (rank 0), keep it for every checkpoint's configs/ and hand it to
    wandb/TensorBoard. ``notes``: extra one-line results to show, e.g. preflight checks."""
    summary = build_summary(args, tokenizer_vocab, datasets, notes)
    text = yaml.safe_dump(summary, sort_keys=False, width=120)
    args.config_files = {**(args.config_files or {}), SUMMARY_FILE: text}
    if not dist.is_initialized() or dist.get_rank() == 0:
        rule = "-" * 30
        print(f"{rule} run summary {rule}\n{text.rstrip()}\n{rule}------------{rule}", flush=True)
    if logger is not None:
        logger.record_config(summary, text)
    return summary
