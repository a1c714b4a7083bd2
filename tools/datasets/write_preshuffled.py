"""Write a dataset's training stream as a Pythia-style pre-shuffled file.

    python tools/datasets/write_preshuffled.py --config my_run.yml [--world-size N] \\
        --output data/mycorpus_preshuffled/document
    python tools/datasets/write_preshuffled.py --data-path data/mycorpus_text_document \\
        --num-samples 4800 --seq-length 2048 --seed 1234 --output data/pre/document

Row k of the output is the k-th training sample, seq_length+1 tokens, in exactly the
order training reads them through the index maps: with --config, the train set of that
run (data_path split, blends, weights, margins, all as training builds them) for
train_iters x train_batch_size samples; with --data-path (one or more, --weights), the
order of a run with `train_data_paths` set to them and that many samples. A run with
`data_preshuffled: true` on the output then sees the same batches at every step, and
the rows a checkpoint at step N has seen are [0, N x train_batch_size) — as with
EleutherAI's pile-*-pythia-preshuffled. Tokens keep the source dtype. The pair is
written under temporary names and renamed when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.data.blendable_dataset import BlendableDataset  # noqa: E402
from megatron.data.data_utils import build_train_valid_test_datasets, num_samples  # noqa: E402
from megatron.data.indexed_dataset import DatasetWriter  # noqa: E402
from megatron.errors import ConfigError, cli_main  # noqa: E402
from tools.datasets.build_index_maps import run_args  # noqa: E402


def paths_args(paths, weights, samples: int, seq_length: int, seed: int):
    """The data keys of a run with train_data_paths=paths that reads ``samples`` samples."""
    return SimpleNamespace(
        train_data_paths=list(paths), train_data_weights=weights, valid_data_paths=None,
        test_data_paths=None, valid_data_weights=None, test_data_weights=None,
        data_path=None, data_impl="mmap", data_preshuffled=False,
        weight_by_num_documents=False, seq_length=seq_length, seed=seed,
        train_iters=samples, train_batch_size=1, eval_interval=None, eval_iters=0,
        use_shared_fs=True)


def _token_dtype(dataset):
    parts = dataset.datasets if isinstance(dataset, BlendableDataset) else [dataset]
    return np.result_type(*(part.indexed_dataset.dtype for part in parts))


def write_preshuffled(args, output: str, samples: int | None = None,
                      progress: bool = True) -> int:
    """Write the first ``samples`` (default: all the run reads) training samples of
    ``args`` to ``output``.{bin,idx}, one row each; returns the row count."""
    train = build_train_valid_test_datasets(args)[0]
    needed = num_samples(args)[0]
    samples = needed if samples is None else samples
    if train is None:
        raise ConfigError("the config has no train data (data_path or train_data_paths)")
    if not 0 < samples <= len(train):
        raise ConfigError(f"--num-samples {samples}: the train set has {len(train)} samples")
    dtype = _token_dtype(train)
    with DatasetWriter(output, dtype) as writer:
        for k in tqdm(range(samples), unit=" rows", disable=not progress, mininterval=1.0):
            writer.builder.add_item(train[k]["text"].astype(dtype))
            writer.builder.end_document()
    print(f"wrote {output}.{{bin,idx}}: {samples:,} rows of {args.seq_length + 1} tokens "
          f"({np.dtype(dtype).name})", file=sys.stderr)
    return samples


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", help="a run's YAML files: write its train stream")
    p.add_argument("--world-size", type=int, help="with --config: the run's total GPU count")
    p.add_argument("--data-path", nargs="+", help="dataset prefixes, as train_data_paths")
    p.add_argument("--weights", nargs="+", type=float, help="with --data-path: one per path")
    p.add_argument("--num-samples", type=int,
                   help="rows to write (with --config default: train_iters x train_batch_size)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", required=True, help="output prefix, e.g. DIR/document")
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.data_path):
        p.error("give either --config or --data-path")
    if args.config:
        run = run_args(args.config, args.world_size)
    else:
        if args.num_samples is None:
            p.error("--data-path needs --num-samples")
        run = paths_args(args.data_path, args.weights, args.num_samples, args.seq_length,
                         args.seed)
    write_preshuffled(run, args.output, args.num_samples)


if __name__ == "__main__":
    main()
