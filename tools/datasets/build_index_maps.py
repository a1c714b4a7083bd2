"""Build GPT-NeoX's cached index maps ahead of training, so the run starts without them.

    python tools/datasets/build_index_maps.py --config configs/pythia/160M.yml my_data.yml \\
        [--world-size 64]

builds every cache the run will look for, from the same code and sample counts
training uses (train/valid/test, each *_data_paths component with its 0.5% blend
margin, the split of a data_path), and prints their paths. --world-size is needed only
when the config leaves train_batch_size to the GPU count. One dataset by hand:

    python tools/datasets/build_index_maps.py --data-path PREFIX --num-samples 147164160 \\
        --seq-length 2048 --seed 1234 --name train_0

--name train_0/valid_0/... use every document (as *_data_paths do); train/valid/test
use that part of --split (as data_path does). The files are written next to the data,
{prefix}_{name}_indexmap_{N}ns_{S}sl_{seed}s_{doc,sample,shuffle}_idx.npy, the same
files GPT-NeoX v1.0 writes, each under a temporary name renamed when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from megatron.data.data_utils import (build_train_valid_test_datasets, index_caches,  # noqa: E402
                                      split_boundaries)
from megatron.data.gpt2_dataset import GPT2Dataset  # noqa: E402
from megatron.data.indexed_dataset import MMapIndexedDataset  # noqa: E402
from megatron.errors import ConfigError, cli_main  # noqa: E402

SPLIT_NAMES = ("train", "valid", "test")


def run_args(config_paths, world_size=None):
    """The run's NeoXArgs, with the batch size it will have on ``world_size`` ranks."""
    from megatron.config import NeoXArgs

    args = NeoXArgs.from_ymls(config_paths)
    if world_size is not None:
        args.configure_world(world_size)
    elif "train_batch_size" not in args._batch_given:
        raise ConfigError(f"{', '.join(config_paths)}: train_batch_size is not set, so the "
                          f"sample counts depend on the GPU count; pass --world-size N (all "
                          f"GPUs of the run) or set train_batch_size")
    return args


def caches_for_config(config_paths, world_size=None) -> list[dict]:
    """Build (or find) the index maps a run of these configs uses: index_caches' dicts."""
    datasets = build_train_valid_test_datasets(run_args(config_paths, world_size), blend=False)
    return [cache for dataset in datasets for cache in index_caches(dataset)]


def caches_for_dataset(prefix, name, num_samples, seq_length, seed, split) -> list[dict]:
    indexed = MMapIndexedDataset(prefix)
    if name in SPLIT_NAMES:
        bounds = split_boundaries(split, len(indexed))
        i = SPLIT_NAMES.index(name)
        documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
    else:
        documents = np.arange(len(indexed), dtype=np.int32)
    if len(documents) == 0:
        raise ConfigError(f"--split {split!r} gives {name} no documents of {prefix}")
    dataset = GPT2Dataset(name, prefix, documents, indexed, num_samples, seq_length, seed)
    return index_caches(dataset)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", help="the run's YAML files: build all its caches")
    p.add_argument("--world-size", type=int, help="with --config: the run's total GPU count")
    p.add_argument("--data-path", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--name", default="train_0", help="train_0 for train_data_paths[0]; "
                   "train/valid/test for that part of a data_path split")
    p.add_argument("--split", default="969,30,1", help="with --name train/valid/test")
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.data_path):
        p.error("give either --config or --data-path (with --num-samples)")
    if args.config:
        caches = caches_for_config(args.config, args.world_size)
    else:
        if args.num_samples is None:
            p.error("--data-path needs --num-samples")
        caches = caches_for_dataset(args.data_path, args.name, args.num_samples,
                                    args.seq_length, args.seed, args.split)
    if not caches:
        print("no index maps needed (pre-shuffled data only)")
    for cache in caches:
        print(f"{cache['name']}: {'found' if cache['hit'] else 'built'}")
        for path in cache["paths"]:
            print(f"  {path}")


if __name__ == "__main__":
    main()
