"""Training metrics: metrics.jsonl, a NeoX-like console line, tqdm, wandb, TensorBoard.

Keys follow GPT-NeoX (reference §8) so curves overlay Pythia's wandb runs:
``train/lm_loss`` stays pure cross-entropy and the L2E regulariser is logged under its
own ``train/l2e_loss`` / ``l2e/*`` keys. Only global rank 0 writes anything.

Time per iteration, throughput and the ETA count training steps only: the loop brackets
checkpoint loading, evaluation and saving with ``outside_training``, and those seconds
are shown beside the line instead. The ETA uses the last ``ETA_WINDOW_LINES`` lines, so a
single slow interval does not swing it.

A resumed run continues its logs: the wandb run id is kept in every checkpoint's
``configs/run_summary.yml`` (outputs.wandb_run_id) and the resumed run reopens that run
(``resume="allow"``); TensorBoard writes to the same directory with the same step axis,
dropping events past the resumed step (``purge_step``) that an interrupted run wrote.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sys
import time

import torch.distributed as dist

from megatron.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
ETA_WINDOW_LINES = 10  # written lines the moving average of the step time spans


def training_flops_per_iteration(args, recompute: bool | None = None) -> float:
    """NeoX's model-FLOPs estimate for one optimizer step of the whole global batch:
    24·c·B·s·L·h²·(1 + s/(6h) + V/(16·L·h)); c = 4 with activation checkpointing
    (the forward runs twice), else 3 (forward + 2× for backward). ``recompute=False``
    gives the model FLOPs that MFU counts (NeoX's HFU counts the recomputation)."""
    recompute = args.checkpoint_activations if recompute is None else recompute
    c = 4 if recompute else 3
    B, s, L, h, V = (args.train_batch_size, args.seq_length, args.num_layers,
                     args.hidden_size, args.padded_vocab_size)
    return 24 * c * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))


def _json_number(value):
    """Strict JSON has no NaN/inf: write null (the skipped/NaN counters tell why)."""
    value = float(value)
    return value if math.isfinite(value) else None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class TimerSink:
    """DeepSpeed's ``wall_clock_breakdown`` timers, collected instead of printed.

    DeepSpeed prints a timer line after every micro-batch (several per step); we take
    its ``timers.log`` calls, add up the elapsed milliseconds and report them per step
    as ``timers/<name>`` on the logger's lines.
    """

    def __init__(self, engine):
        self.totals: dict[str, float] = {}
        timers = engine.timers

        def collect(names, normalizer=1.0, reset=True, memory_breakdown=False, ranks=None):
            for name in names:
                if name in timers.timers:
                    elapsed = timers.timers[name].elapsed(reset=reset) / normalizer
                    self.totals[name] = self.totals.get(name, 0.0) + elapsed

        timers.log = collect

    def drain(self, steps: int) -> dict:
        out = {f"timers/{name}": total / max(steps, 1) for name, total in self.totals.items()}
        self.totals.clear()
        return out


def recorded_wandb_run_id(checkpoint_dir: str | None) -> str | None:
    """The wandb run id a checkpoint's run logged to (its run summary), if any."""
    import yaml

    from megatron.config.loading import SUMMARY_FILE

    path = os.path.join(checkpoint_dir or "", "configs", SUMMARY_FILE)
    if not checkpoint_dir or not os.path.isfile(path):
        return None
    with open(path) as f:
        outputs = (yaml.safe_load(f) or {}).get("outputs") or {}
    return outputs.get("wandb_run_id")


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Call ``log_step`` once per optimizer step; a line is written every ``log_interval``.

    Loss keys (``*_loss``) are averaged over the steps since the last written line, as
    NeoX averages over ``log_interval``; every other key keeps its latest value.
    ``runtime/*`` keys are measured here, from wall clock between written lines less the
    time spent ``outside_training``. Metrics must already be reduced onto global rank 0,
    the only rank that writes. ``start_iteration`` / ``checkpoint_dir``: where a resumed
    run starts and the checkpoint it loaded (its wandb run is continued).
    """

    def __init__(self, args, groups, engine=None, start_iteration: int = 0, checkpoint_dir: str | None = None):
        self.args = args
        self.world_size = groups.dp_size * groups.tp_size * groups.pp_size
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        self.flops_per_iteration = training_flops_per_iteration(args)
        self.model_flops_per_iteration = training_flops_per_iteration(args, recompute=False)
        self.timers = TimerSink(engine) if engine is not None and args.wall_clock_breakdown else None
        self._losses: dict[str, list[float]] = {}
        self._last_time, self._last_iteration = time.perf_counter(), None
        self._outside_interval: dict[str, float] = {}  # since the last written line
        self.outside_totals: dict[str, float] = {}  # this run: load, eval, save seconds
        self.training_seconds = 0.0
        self._recent = collections.deque(maxlen=ETA_WINDOW_LINES)  # (steps, training seconds)
        self.last_values: dict[str, tuple[int, float]] = {}  # key -> (iteration, value)
        self._truncated = False
        self.path = self.wandb = self.tensorboard = self.progress = None
        if args.use_wandb and args.wandb_init_all_ranks:
            self.wandb = self._start_wandb(args)  # collective: every rank joins one group
        if not self.is_writer:
            return
        log_dir = args.log_dir or "logs"
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, METRICS_FILE)
        if args.use_wandb and not args.wandb_init_all_ranks:
            self.wandb = self._start_wandb(args, recorded_wandb_run_id(checkpoint_dir))
        if args.tensorboard_dir:
            self.tensorboard = self._start_tensorboard(args.tensorboard_dir, start_iteration)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=args.train_iters, unit="it", dynamic_ncols=True)

    @staticmethod
    def _start_wandb(args, run_id: str | None = None):
        """wandb on rank 0, or on every rank (``wandb_init_all_ranks``: one group, runs
        named by rank, for per-GPU system metrics; only rank 0 logs training metrics).
        ``run_id``: the run a resumed run continues."""
        import wandb

        # No API key means no account: keep the run on disk, `wandb sync` it later.
        if "WANDB_API_KEY" not in os.environ:
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_BASE_URL", args.wandb_host)
        group, name = args.wandb_group, args.wandb_run_name
        if args.wandb_init_all_ranks and dist.is_initialized():
            shared = [group or wandb.util.generate_id()]
            dist.broadcast_object_list(shared, src=0)
            group, rank = shared[0], dist.get_rank()
            name = f"{name or group}-rank{rank}"
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        return wandb.init(project=args.wandb_project, entity=args.wandb_team, group=group,
                          name=name, config=args.to_dict(derived=True), dir=args.log_dir or None, **resume)

    @property
    def wandb_run_id(self) -> str | None:
        """Kept in the run summary of every checkpoint, for the resume to continue."""
        return getattr(self.wandb, "id", None) if self.is_writer and not self.args.wandb_init_all_ranks else None

    def record_config(self, summary: dict, text: str) -> None:
        """The run summary (derived values) in the wandb config and as TensorBoard text."""
        if self.wandb is not None:
            self.wandb.config.update({"run_summary": summary}, allow_val_change=True)
        if self.tensorboard is not None:
            self.tensorboard.add_text("run_summary", f"```\n{text}\n```", 0)

    @staticmethod
    def _start_tensorboard(log_dir, start_iteration: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "tensorboard_dir is set but the tensorboard package is missing; "
                "pip install tensorboard or remove tensorboard_dir"
            ) from e
        # a resume drops what an interrupted run logged past its checkpoint, as metrics.jsonl does
        return SummaryWriter(log_dir=log_dir, purge_step=start_iteration + 1 if start_iteration else None)

    @contextlib.contextmanager
    def outside_training(self, kind: str):
        """Time spent on ``kind`` (load, eval, save): kept out of the step time and ETA."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add_outside_training(kind, time.perf_counter() - started)

    def add_outside_training(self, kind: str, seconds: float, before_logging: bool = False) -> None:
        """``before_logging``: spent before this logger started (the checkpoint load), so
        in the end summary's totals but in no line's interval."""
        if not before_logging:
            self._outside_interval[kind] = self._outside_interval.get(kind, 0.0) + seconds
        self.outside_totals[kind] = self.outside_totals.get(kind, 0.0) + seconds

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
        record = {"iteration": iteration, "timestamp": time.time()}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        self.last_values.update({k: (iteration, float(v)) for k, v in metrics.items()})
        self._append(record)
        if self.wandb is not None and self.is_writer:
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
        steps = max(1, iteration - self._last_iteration)
        outside = {f"runtime/{kind}_seconds": t for kind, t in self._outside_interval.items()}
        training = max(now - self._last_time - sum(self._outside_interval.values()), 0.0)
        self._outside_interval.clear()
        self.training_seconds += training
        self._recent.append((steps, training))
        # a moving average: one slow interval (first steps, a busy machine) does not swing the ETA
        dt = max(sum(t for _, t in self._recent) / sum(n for n, _ in self._recent), 1e-9)
        self._last_time, self._last_iteration = now, iteration
        merged = dict(metrics)
        for key, values in self._losses.items():
            finite = [v for v in values if math.isfinite(v)]
            merged[key] = sum(finite) / len(finite) if finite else math.nan
        self._losses.clear()
        samples_per_sec = self.args.train_batch_size / dt
        consumed = iteration * self.args.train_batch_size
        merged.update({
            "train/consumed_samples": consumed,
            "train/consumed_tokens": consumed * self.args.seq_length,
            "runtime/iteration_time": dt,
            "runtime/steps_per_sec": 1.0 / dt,
            "runtime/samples_per_sec": samples_per_sec,
            "runtime/tokens_per_sec": samples_per_sec * self.args.seq_length,
            "runtime/flops_per_sec_per_gpu": self.flops_per_iteration / (dt * self.world_size),
            "runtime/eta_seconds": (self.args.train_iters - iteration) * dt,
        })
        peak = self.args.peak_theoretical_tflops
        if peak:
            per_gpu = dt * self.world_size * peak * 1e12
            merged["runtime/mfu"] = self.model_flops_per_iteration / per_gpu
            merged["runtime/hfu"] = self.flops_per_iteration / per_gpu
        if self.timers is not None:
            merged.update(self.timers.drain(steps))
        merged.update(outside)
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
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} iteration {iteration:8d}/{self.args.train_iters:8d}",
            f"consumed samples: {m['train/consumed_samples']:.0f}",
            f"tokens: {_count(m['train/consumed_tokens'])}",
            f"elapsed time per iteration (ms): {m['runtime/iteration_time'] * 1000:.1f}",
            f"ETA: {format_duration(m['runtime/eta_seconds'])}",
            f"tokens/s: {m.get('runtime/tokens_per_sec', math.nan):.0f}",
            f"learning rate: {m.get('train/learning_rate', math.nan):.3E}",
            f"approx flops per GPU: {m['runtime/flops_per_sec_per_gpu'] / 1e12:.2f}TFLOPS",
        ]
        if "runtime/mfu" in m:
            parts.append(f"MFU: {m['runtime/mfu']:.1%}")
        parts.append(f"lm_loss: {m.get('train/lm_loss', math.nan):.6E}")
        if "train/grad_norm" in m:
            parts.append(f"grad norm: {m['train/grad_norm']:.3f}")
        if "train/l2e_loss" in m:
            parts.append(f"l2e_loss: {m['train/l2e_loss']:.6E}")
        for key in sorted((k for k in m if k.startswith("l2e/tau/layer_")), key=lambda k: int(k.rsplit("_", 1)[1])):
            layer = key.rsplit("_", 1)[1]
            frac = m.get(f"l2e/selected_frac/layer_{layer}", math.nan)
            parts.append(f"layer {layer} tau: {m[key]:.4g} selected: {frac:.2%}")
        if "train/loss_scale" in m:
            parts.append(f"loss scale: {m['train/loss_scale']:.1f}")
        parts.append(f"number of skipped iterations: {int(m.get('train/skipped_iters', 0)):3d}")
        parts.append(f"number of nan iterations: {int(m.get('train/nan_iters', 0)):3d}")
        outside = [f"{k[len('runtime/'):-len('_seconds')]} {v:.1f}" for k, v in m.items()
                   if k.startswith("runtime/") and k.endswith("_seconds") and k != "runtime/eta_seconds"]
        if outside:
            parts.append(f"not in the step time (s): {', '.join(outside)}")
        self._write_console(" | ".join(parts) + " |")
        timers = [f"{k.removeprefix('timers/')}: {v:.1f}" for k, v in m.items() if k.startswith("timers/")]
        if timers:
            self._write_console(" time per step (ms) | " + " | ".join(timers))

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
