"""Time and peak memory of building NeoX index maps at Pile scale (synthetic sizes).

    python tools/bench/bench_index_maps.py [--docs 10000000] [--num-samples 10000000]

Document lengths are log-normal with a Pile-like mean of ~1,500 tokens and a long tail
(clipped to [1, 500k]); seq_length 2048, seed 1234. Reports wall time per map and the
peak resident memory of the process (ru_maxrss) over the sizes array baseline.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from megatron.data import gpt2_dataset as g  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=10_000_000)
    p.add_argument("--num-samples", type=int, default=10_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(6.6, 1.2, args.docs), 1, 500_000).astype(np.int32)
    documents = np.arange(args.docs, dtype=np.int32)
    base = peak_rss_mib()
    tokens = int(sizes.sum(dtype=np.int64))
    epochs = g.num_epochs(tokens, args.seq_length, args.num_samples)
    print(f"{args.docs:,} docs, {tokens:,} tokens (mean {tokens / args.docs:,.0f}), "
          f"{args.num_samples:,} samples of {args.seq_length} -> {epochs} epoch(s)")
    t0 = time.perf_counter()
    rs = np.random.RandomState(1234)
    doc_idx = g.build_doc_idx(documents, epochs, rs)
    t1 = time.perf_counter()
    sample_idx = g.build_sample_idx(sizes, doc_idx, args.seq_length, epochs * tokens)
    t2 = time.perf_counter()
    g.build_shuffle_idx(len(sample_idx) - 1, rs)
    t3 = time.perf_counter()
    print(f"doc_idx {t1 - t0:.2f}s  sample_idx {t2 - t1:.2f}s  shuffle_idx {t3 - t2:.2f}s  "
          f"total {t3 - t0:.2f}s")
    print(f"peak RSS {peak_rss_mib():,.0f} MiB ({peak_rss_mib() - base:,.0f} MiB above the "
          f"sizes array baseline of {base:,.0f} MiB)")


if __name__ == "__main__":
    main()
