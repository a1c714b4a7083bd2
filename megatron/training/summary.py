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
from megatron.training.logging import format_duration


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
    if logger is not None and logger.wandb_run_id:  # a resume continues this wandb run
        summary["outputs"]["wandb_run_id"] = logger.wandb_run_id
    text = yaml.safe_dump(summary, sort_keys=False, width=120)
    args.config_files = {**(args.config_files or {}), SUMMARY_FILE: text}
    if not dist.is_initialized() or dist.get_rank() == 0:
        rule = "-" * 30
        print(f"{rule} run summary {rule}\n{text.rstrip()}\n{rule}------------{rule}", flush=True)
    if logger is not None:
        logger.record_config(summary, text)
    return summary


def closing_summary(args, logger, start_iteration: int, iteration: int, wall_seconds: float,
                    last_checkpoint: str | None) -> dict:
    """What the run did: steps, tokens, time (training vs load/eval/save), the last logged
    losses and where its checkpoints and logs are."""
    steps = iteration - start_iteration
    last = logger.last_values

    def loss(key):
        return {"iteration": last[key][0], "value": round(last[key][1], 6)} if key in last else None

    log_dir = args.log_dir or "logs"
    return {
        "steps": {"from": start_iteration, "to": iteration, "this_run": steps, "of": args.train_iters},
        "tokens_this_run": steps * args.train_batch_size * args.seq_length,
        "wall_time": format_duration(wall_seconds),
        # the rest of the wall time is startup: building the model, the data, DeepSpeed
        "seconds": {"wall": round(wall_seconds, 1), "training_steps": round(logger.training_seconds, 1),
                    **{kind: round(t, 1) for kind, t in sorted(logger.outside_totals.items())}},
        "final_train_lm_loss": loss("train/lm_loss"),
        "final_valid_lm_loss": loss("validation/lm_loss"),
        "checkpoint": os.path.abspath(last_checkpoint) if last_checkpoint else "none saved (no 'save')",
        "metrics": os.path.abspath(os.path.join(log_dir, "metrics.jsonl")),
        "tensorboard": os.path.abspath(args.tensorboard_dir) if args.tensorboard_dir else None,
        "wandb_run_id": logger.wandb_run_id,
    }


def announce_end(args, logger, start_iteration: int, iteration: int, wall_seconds: float,
                 last_checkpoint: str | None) -> dict | None:
    """Print the closing summary on rank 0 (the only rank with the logged values)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    closing = closing_summary(args, logger, start_iteration, iteration, wall_seconds, last_checkpoint)
    text = yaml.safe_dump(closing, sort_keys=False, width=120).rstrip()
    rule = "-" * 30
    print(f"{rule} run finished {rule}\n{text}\n{rule}-------------{rule}", flush=True)
    return closing
