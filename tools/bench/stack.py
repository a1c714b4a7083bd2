"""What the benches share: a one-process world, our real training stack on a synthetic
batch (NeoXArgs -> build_trainer -> train_step through the DeepSpeed engine),
interleaved timing and peak-memory readings.

Import this before torch touches CUDA or DeepSpeed picks an accelerator: it fills in the
single-process launch variables (as ``python train.py`` does) and, without CUDA, selects
DeepSpeed's CPU accelerator.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _key, _value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29533"), ("WANDB_MODE", "disabled")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

NEOX_20B_VOCAB = 50277


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_world() -> None:
    """torch.distributed for a world of one (nccl on a GPU, gloo on CPU), once."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def config_args(configs: list[str], overrides: dict | None = None, vocab: int = NEOX_20B_VOCAB):
    """NeoXArgs from the repo's YAMLs (paths relative to the checkout) + overrides, for
    one process with ``vocab`` tokenizer ids."""
    from megatron.config import NeoXArgs

    args = NeoXArgs.from_ymls([str(ROOT / c) for c in configs], overrides=overrides)
    args.configure_world(1)
    args.set_vocab_size(vocab)
    return args


class Run:
    """A trainer of our stack on synthetic tokens; ``step()`` is one optimizer step
    through ``megatron.training.loop.train_step``.

    By default every micro-batch is the same fixed batch (timing; a loss that falls
    fast). ``fresh=True`` draws new uniform tokens for every micro-batch instead: i.i.d.
    samples, as L2E's running statistics assume (a repeated batch is a population of
    a few samples, whose scores tie)."""

    def __init__(self, args, seed: int = 0, fresh: bool = False):
        from megatron.parallel import ParallelGroups
        from megatron.training.engine import build_trainer

        init_world()
        torch.manual_seed(args.seed)
        self.args = args
        self.trainer = build_trainer(args, ParallelGroups.build(1, 1))
        self.fresh = fresh
        self._generator = torch.Generator(device=device()).manual_seed(seed)
        self.micro = self._draw()
        self.iteration = 0

    def _draw(self):
        shape = (self.args.train_micro_batch_size_per_gpu, self.args.seq_length + 1)
        text = torch.randint(0, self.args.padded_vocab_size, shape, generator=self._generator, device=device())
        tokens, labels = text[:, :-1], text[:, 1:]
        return tokens, labels, torch.ones_like(tokens, dtype=torch.float32)

    def _batches(self):
        while True:
            tokens, labels, mask = self._draw() if self.fresh else self.micro
            # a pipeline engine (pipe_parallel_size >= 1, as in the Pythia configs) takes
            # DeepSpeed's ((inputs,), (labels, mask)) format
            yield ((tokens,), (labels, mask)) if self.trainer.is_pipe else (tokens, labels, mask)

    def step(self, log: bool = False) -> dict:
        from megatron.training.loop import train_step

        metrics = train_step(self.trainer, self._batches(), self.iteration, log=log)
        self.iteration += 1
        return metrics

    @property
    def tokens_per_step(self) -> int:
        return self.args.train_batch_size * self.args.seq_length


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Wall seconds of ``fn()``, with the GPU's queued work inside the interval."""
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def interleaved(steps: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each ``steps[name]()`` ``reps`` times, the order rotating every repetition so
    that drift of the machine's load hits all of them alike; warm-up calls first."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(timed(steps[name]))
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


class PeakMemory:
    """Peak bytes held by tensors inside the ``with`` block, above what was held on entry.

    On a GPU: the CUDA caching allocator's statistics (``max_memory_allocated``). On CPU,
    where torch keeps no allocator statistics, the running sum of the allocation and
    free events that torch's profiler records for the CPU allocator (``profile_memory``):
    tensors only, no interpreter, library or malloc-arena memory."""

    def __enter__(self) -> "PeakMemory":
        self.bytes = 0
        if torch.cuda.is_available():
            synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._profiler.__exit__(*exc)
        events = [e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()  # negative for frees
            self.bytes = max(self.bytes, live)
