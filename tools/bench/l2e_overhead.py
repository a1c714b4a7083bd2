"""Step-time overhead of L2E (moving threshold) and of MEmeL-style top-k retrieval.

One training step = forward + cross-entropy + backward + AdamW step of a GPTNeoX. The
three variants (plain, L2E, top-k; both L2E variants use the regularizer on the mid2
layers) each get their own identically initialised model and optimizer, and are timed
in interleaved repetitions (the order rotating every repetition) so that drifts of a
shared machine hit all of them alike. Reported per variant: the median and the minimum
step time and their ratios to plain, and L2E's own measure of its share of the step
(`runtime/l2e_time_frac`: time inside the hooks, begin_step and end_step), which a busy
machine disturbs far less than a difference of two step times.

    python tools/bench/l2e_overhead.py --shape tiny --reps 7 --steps 5
    python tools/bench/l2e_overhead.py --shape 70m --reps 5 --steps 2 --batch 4

With ``--log-intervals 1 10`` the variants are instead plain and L2E at those
``log_interval`` values, gathering its diagnostics (l2e/batch_quantile, l2e_loss, ...) on
the steps the training loop would (`diagnostics_due`), plus ``l2e_every_step``: the
diagnostics on every step (``l2e.diagnostics_interval: 1``), which prices one of them,
and ``l2e_every_exact``: the same with the exact quantile (``diagnostics_samples: 0``).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402

from megatron.config.l2e import L2EConfig
from megatron.errors import ConfigError, cli_main
from megatron.l2e import L2E, l2e_blocks
from megatron.l2e.metrics import diagnostics_due
from megatron.model.gpt_neox import GPTNeoX, ModelConfig

SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4),
    "70m": dict(vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8),
}
VARIANTS = {  # name -> (retrieval, log interval (None = never), other L2E settings)
    "plain": (None, None, {}),
    "l2e": ("moving_threshold", None, {}),
    "topk": ("topk", None, {}),
}


def log_interval_variants(intervals: list[int]) -> dict:
    variants = {"plain": (None, None, {})}
    variants.update({f"l2e_log{n}": ("moving_threshold", n, {}) for n in intervals})
    variants["l2e_every_step"] = ("moving_threshold", 1, {"diagnostics_interval": 1})
    # what every step cost before diagnostics_interval and sampling existed
    variants["l2e_every_exact"] = ("moving_threshold", 1, {"diagnostics_interval": 1, "diagnostics_samples": 0})
    return variants


def build(shape: str, retrieval: str | None, seq: int, **l2e_settings):
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[shape], rotary_pct=0.25, gelu_tanh=True, max_position_embeddings=seq)
    model = GPTNeoX(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    l2e = None
    if retrieval is not None:
        l2e_cfg = L2EConfig(enabled=True, retrieval=retrieval, warmup_steps=2, **l2e_settings)
        blocks = l2e_blocks(dict(enumerate(model.blocks)), l2e_cfg, cfg.num_layers)
        l2e = L2E.attach(blocks, l2e_cfg, seq_length=seq, hidden_size=cfg.hidden_size)
    return model, opt, l2e


def train_step(model, opt, l2e, tokens, iteration, log_interval=None) -> float:
    """One step; returns L2E's own share of it (0 for plain)."""
    if l2e is not None:
        log = log_interval is not None and diagnostics_due(iteration + 1, log_interval,
                                                           l2e.cfg.diagnostics_interval)
        l2e.begin_step(iteration, 1.0, log=log)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return l2e.end_step()["runtime/l2e_time_frac"] if l2e is not None else 0.0


def benchmark(shape: str, reps: int, steps: int, batch: int, seq: int, variants: dict = VARIANTS) -> dict:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq + 1), generator=gen)
    runs = {name: build(shape, retrieval, seq, **settings) for name, (retrieval, _, settings) in variants.items()}
    iteration = {name: 0 for name in runs}

    own_share = {name: [] for name in runs}

    def run(name, n):
        for _ in range(n):
            own_share[name].append(train_step(*runs[name], tokens, iteration[name], variants[name][1]))
            iteration[name] += 1

    names = list(runs)
    for name in names:  # past the threshold warm-up, allocator and caches settled
        run(name, 4)
        own_share[name].clear()
    reps_s = stack.interleaved({name: functools.partial(run, name, steps) for name in names}, reps, warmup=0)
    times = {name: [t / steps for t in ts] for name, ts in reps_s.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    return {
        "shape": shape, "batch": batch, "seq": seq, "reps": reps, "steps_per_rep": steps,
        "threads": torch.get_num_threads(),
        "median_step_s": median,
        "min_step_s": fastest,
        "overhead_median": {n: median[n] / median["plain"] - 1.0 for n in names[1:]},
        "overhead_min": {n: fastest[n] / fastest["plain"] - 1.0 for n in names[1:]},
        "l2e_time_frac": {n: statistics.mean(own_share[n]) for n in names[1:]},
    }


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES) + ["all"], default="all")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--log-intervals", type=int, nargs="+",
                   help="compare L2E logging its diagnostics at these intervals instead")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.reps < 1 or a.steps < 1 or a.batch < 1 or min(a.log_intervals or [1]) < 1:
        raise ConfigError("--reps, --steps, --batch and --log-intervals must be >= 1")
    variants = log_interval_variants(a.log_intervals) if a.log_intervals else VARIANTS
    results = []
    for shape in (sorted(SHAPES) if a.shape == "all" else [a.shape]):
        r = benchmark(shape, a.reps, a.steps, a.batch, a.seq, variants)
        results.append(r)
        print(f"{shape} (batch {a.batch}, seq {a.seq}, {a.reps} reps x {a.steps} steps)")
        for n in r["median_step_s"]:
            line = (f"  {n:14s} median {r['median_step_s'][n] * 1e3:8.1f} ms   "
                    f"min {r['min_step_s'][n] * 1e3:8.1f} ms")
            if n != "plain":
                line += (f"   vs plain: median {100 * r['overhead_median'][n]:+.1f}%  "
                         f"min {100 * r['overhead_min'][n]:+.1f}%   "
                         f"own share {100 * r['l2e_time_frac'][n]:.2f}%")
            print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
