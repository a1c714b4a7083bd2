"""Training metrics: metrics.jsonl, a NeoX-like console line, tqdm, wandb, TensorBoard.

Keys follow GPT-NeoX (reference §8) so curves overlay Pythia's wandb runs:
``train/lm_loss`` stays pure cross-entropy and the L2E regulariser is logged under its
own ``train/l2e_loss`` / ``l2e/*`` keys. Only global rank 0 writes anything.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch.distributed as dist

from megatron.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


def training_flops_per_iteration(args) -> float:
    """NeoX's model-FLOPs estimate for one optimizer step of the whole global batch:
    24·c·B·s·L·h²·(1 + s/(6h) + V/(16·L·h)); c = 4 with activation checkpointing
    (the forward runs twice), else 3 (forward + 2× for backward)."""
    c = 4 if args.checkpoint_activations else 3
    B, s, L, h, V = (args.train_batch_size, args.seq_length, args.num_layers,
                     args.hidden_size, args.padded_vocab_size)
    return 24 * c * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))


def _json_number(value):
    """Strict JSON has no NaN/inf: write null (the skipped/NaN counters tell why)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Call ``log_step`` once per optimizer step; a line is written every ``log_interval``.

    Loss keys (``*_loss``) are averaged over the steps since the last written line, as
    NeoX averages over ``log_interval``; every other key keeps its latest value.
    ``runtime/*`` keys are measured here, from wall clock between written lines.
    Metrics must already be reduced onto global rank 0, the only rank that writes.
    """

    def __init__(self, args, groups):
        self.args = args
        self.world_size = groups.dp_size * groups.tp_size * groups.pp_size
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        self.flops_per_iteration = training_flops_per_iteration(args)
        self._losses: dict[str, list[float]] = {}
        self._last_time, self._last_iteration = time.perf_counter(), None
        self._truncated = False
        self.path = self.wandb = self.tensorboard = self.progress = None
        if not self.is_writer:
            return
        log_dir = args.log_dir or "logs"
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, METRICS_FILE)
        if args.use_wandb:
            self.wandb = self._start_wandb(args)
        if args.tensorboard_dir:
            self.tensorboard = self._start_tensorboard(args.tensorboard_dir)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=args.train_iters, unit="it", dynamic_ncols=True)

    @staticmethod
    def _start_wandb(args):
        import wandb

        # No API key means no account: keep the run on disk, `wandb sync` it later.
        if "WANDB_API_KEY" not in os.environ:
            os.environ.setdefault("WANDB_MODE", "offline")
        return wandb.init(project=args.wandb_project, config=args.to_dict(), dir=args.log_dir or None)

    @staticmethod
    def _start_tensorboard(log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "tensorboard_dir is set but the tensorboard package is missing; "
                "pip install tensorboard or remove tensorboard_dir"
            ) from e
        return SummaryWriter(log_dir=log_dir)

    # ------------------------------------------------------------------ writing

    def _append(self, record: dict) -> None:
        """Append one line; the first line of a (resumed) run first drops every line at
        or after its iteration, so a restart never leaves duplicate steps."""
        if not self._truncated and os.path.exists(self.path):
            kept = [r for r in _read_jsonl(self.path) if r["iteration"] < record["iteration"]]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        self._truncated = True
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _emit(self, iteration: int, metrics: dict) -> None:
        record = {"iteration": iteration}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        self._append(record)
        if self.wandb is not None:
            self.wandb.log(metrics, step=iteration)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, iteration)

    # ------------------------------------------------------------------ public

    def log_step(self, iteration: int, metrics: dict) -> None:
        if not self.is_writer:
            return
        for key, value in metrics.items():
            if key.endswith("_loss"):
                self._losses.setdefault(key, []).append(float(value))
        if self._last_iteration is None:  # first step of this (re)started run
            self._last_iteration = iteration - 1
        if self.progress is not None:
            self.progress.update(iteration - self.progress.n)
        if iteration % self.args.log_interval and iteration != self.args.train_iters:
            return

        now = time.perf_counter()
        dt = (now - self._last_time) / max(1, iteration - self._last_iteration)
        self._last_time, self._last_iteration = now, iteration
        merged = dict(metrics)
        for key, values in self._losses.items():
            finite = [v for v in values if math.isfinite(v)]
            merged[key] = sum(finite) / len(finite) if finite else math.nan
        self._losses.clear()
        samples_per_sec = self.args.train_batch_size / dt
        merged.update({
            "runtime/iteration_time": dt,
            "runtime/steps_per_sec": 1.0 / dt,
            "runtime/samples_per_sec": samples_per_sec,
            "runtime/tokens_per_sec": samples_per_sec * self.args.seq_length,
            "runtime/flops_per_sec_per_gpu": self.flops_per_iteration / (dt * self.world_size),
        })
        self._emit(iteration, merged)
        self._print(iteration, merged)

    def log_eval(self, iteration: int, metrics: dict) -> None:
        """``validation/lm_loss``; ``validation/lm_loss_ppl`` is added when absent."""
        if not self.is_writer:
            return
        metrics = dict(metrics)
        if "validation/lm_loss" in metrics:
            metrics.setdefault("validation/lm_loss_ppl", math.exp(min(20.0, metrics["validation/lm_loss"])))
        self._emit(iteration, metrics)
        parts = " | ".join(f"{k}: {v:.6E}" for k, v in metrics.items())
        self._write_console(f" validation results at iteration {iteration} | {parts}")

    def _print(self, iteration: int, m: dict) -> None:
        parts = [
            f" iteration {iteration:8d}/{self.args.train_iters:8d}",
            f"elapsed time per iteration (ms): {m['runtime/iteration_time'] * 1000:.1f}",
            f"tokens/s: {m.get('runtime/tokens_per_sec', math.nan):.0f}",
            f"learning rate: {m.get('train/learning_rate', math.nan):.3E}",
            f"approx flops per GPU: {m['runtime/flops_per_sec_per_gpu'] / 1e12:.2f}TFLOPS",
            f"lm_loss: {m.get('train/lm_loss', math.nan):.6E}",
        ]
        if "train/l2e_loss" in m:
            parts.append(f"l2e_loss: {m['train/l2e_loss']:.6E}")
        if "train/loss_scale" in m:
            parts.append(f"loss scale: {m['train/loss_scale']:.1f}")
        parts.append(f"number of skipped iterations: {int(m.get('train/skipped_iters', 0)):3d}")
        parts.append(f"number of nan iterations: {int(m.get('train/nan_iters', 0)):3d}")
        self._write_console(" | ".join(parts) + " |")

    def _write_console(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line)  # keeps the bar below the text
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
