"""How well the moving threshold tracks the batch's top-rho MS quantile, per batch size and rule.

One model of the demo's shape (configs/local/tiny.yml: h128, 4 layers, mid2 = layers 1
and 2) is trained with AdamW at the demo's batch of 8 on the Austen corpus. Every step,
for each batch size B, a fresh batch of B sequences goes forward (no backward) through the
blocks up to the last inhibited layer with one monitor-only L2E per rule attached, at
default settings otherwise (rate 0.02, warmup_steps 10, threshold_lr 1). So every tracker
sees the same moving model (its activations change scale as it trains, and the running
statistics of the first steps are few-sample and heavy-tailed), and only B and the rule
differ. Reported per (B, rule, layer) over steps 30-60:

  gap       median |tau - q| / q, tau = the threshold this step selected with, q = the step's
            exact (1 - rate) quantile of phi over the batch (l2e/batch_quantile)
  selected  mean k*/N (target: the rate)

    python tools/bench/l2e_tracker.py                      # batches 8 64 512, seq 64
    python tools/bench/l2e_tracker.py --batches 8 64 --seq 128 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a source checkout

from megatron.config.l2e import L2EConfig
from megatron.errors import ConfigError, cli_main
from megatron.l2e import L2E, l2e_blocks
from megatron.model.gpt_neox import GPTNeoX, ModelConfig

RULES = ("additive", "multiplicative")
DATA = ROOT / "data" / "austen_bpe4k_text_document.bin"
TINY = dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, rotary_pct=0.25,
            init_method="small_init", output_layer_init_method="wang_init")


def token_batches(seq: int, seed: int):
    """Random windows of seq + 1 tokens from the Austen corpus: ``draw(b) -> [b, seq + 1]``."""
    tokens = np.memmap(DATA, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(seed)

    def draw(b: int) -> torch.Tensor:
        starts = rng.integers(0, len(tokens) - seq - 1, size=b)
        return torch.from_numpy(np.stack([tokens[s:s + seq + 1] for s in starts]).astype(np.int64))

    return draw


def track(batches: list[int], steps: int, seq: int, window: tuple[int, int], seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    cfg = ModelConfig(**TINY, max_position_embeddings=seq)
    model = GPTNeoX(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    draw = token_batches(seq, seed)
    trackers = {}
    for b in batches:
        for rule in RULES:
            l2e_cfg = L2EConfig(enabled=True, inhibition="none", threshold_update=rule)
            blocks = l2e_blocks(dict(enumerate(model.blocks)), l2e_cfg, cfg.num_layers)
            trackers[b, rule] = L2E.attach(blocks, l2e_cfg, seq_length=seq, hidden_size=cfg.hidden_size)
    layers = sorted(next(iter(trackers.values())).sites)
    last = max(layers)
    record = {key: {i: [] for i in layers} for key in trackers}
    for it in range(steps):
        tokens = draw(8)  # the demo's training step
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for b in batches:
            x = model.embed(draw(b)[:, :-1])
            pair = [trackers[b, rule] for rule in RULES]
            for l2e in pair:
                l2e.begin_step(it, 1.0, log=True)
            for block in model.blocks[:last + 1]:
                x = block(x)
            for rule, l2e in zip(RULES, pair):
                tau = {i: s.retrieval.tau for i, s in l2e.sites.items()}  # the one selected with
                m = l2e.end_step()
                for i in layers:
                    q = m.get(f"l2e/batch_quantile/layer_{i}")
                    if q is not None and window[0] <= it <= window[1]:
                        record[b, rule][i].append((abs(tau[i] - q) / q, m[f"l2e/selected_frac/layer_{i}"]))
    rows = []
    for (b, rule), per_layer in record.items():
        for i, pairs in per_layer.items():
            rows.append({"batch": b, "rule": rule, "layer": i, "seq": seq, "steps": len(pairs),
                         "gap_median": statistics.median(p[0] for p in pairs),
                         "selected_mean": statistics.mean(p[1] for p in pairs)})
    return rows


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=61)
    p.add_argument("--window", type=int, nargs=2, default=[30, 60], help="first and last step scored")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    if min(a.batches) < 1 or a.seq < 2 or not 0 <= a.window[0] <= a.window[1] < a.steps:
        raise ConfigError("--batches must be >= 1, --seq >= 2 and --window within [0, --steps)")
    rows = track(a.batches, a.steps, a.seq, tuple(a.window))
    print(f"seq {a.seq}, steps {a.window[0]}-{a.window[1]}: median |tau - q| / q, mean selected fraction")
    print("| batch | rule | layer | median \\|τ − q\\|/q | selected |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['rule']} | {r['layer']} | {100 * r['gap_median']:.1f}% "
              f"| {100 * r['selected_mean']:.2f}% |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
