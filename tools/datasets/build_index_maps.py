"""Build (or check) GPT-NeoX's cached index maps for one dataset ahead of training.

    python tools/datasets/build_index_maps.py --data-path data/austen_bpe4k_text_document \\
        --num-samples 147164160 --seq-length 2048 --seed 1234 --name train_0

Writes {prefix}_{name}_indexmap_{N}ns_{S}sl_{seed}s_{doc,sample,shuffle}_idx.npy next to
the data (or in --cache-dir), the same files GPT-NeoX v1.0 writes, so training starts
without the build. Uses every document of the dataset, as NeoX does for *_data_paths.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from megatron.data.gpt2_dataset import index_map_paths, load_or_build_index_maps  # noqa: E402
from megatron.data.indexed_dataset import MMapIndexedDataset  # noqa: E402
from megatron.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="dataset prefix (without .bin/.idx)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--name", default="train_0", help="train_0 for train_data_paths[0]; "
                   "'train' for a data_path split (which uses only the train documents)")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)
    indexed = MMapIndexedDataset(args.data_path)
    documents = np.arange(len(indexed), dtype=np.int32)
    start = time.time()
    doc_idx, sample_idx, _ = load_or_build_index_maps(
        args.data_path, args.name, indexed.sizes, documents, args.num_samples,
        args.seq_length, args.seed, args.cache_dir)
    paths = index_map_paths(args.data_path, args.name, args.num_samples, args.seq_length,
                            args.seed, args.cache_dir)
    epochs = len(doc_idx) // len(documents)
    print(f"{paths['sample_idx']}: {len(sample_idx) - 1:,} samples, {epochs} epoch(s) of "
          f"{len(documents):,} documents ({time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
