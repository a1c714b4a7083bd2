"""Pythia's pre-shuffled Pile: items already cut to seq_length+1 tokens and in training order.

EleutherAI/pile-*-pythia-preshuffled stores the exact sample stream Pythia trained on,
one 2049-token item per sample. No index maps: sample k is item k, so step t of a run
with global batch B reads items [t*B, (t+1)*B), which is what makes a Pythia run (or
its stepN checkpoint) resumable with the same data.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.errors import DataError


class PreshuffledDataset(torch.utils.data.Dataset):
    """Rows [0, num_rows) of the file (all by default), row k being sample k.

    ``rows_hint`` says where a smaller ``num_rows`` came from, for the error message.
    """

    def __init__(self, indexed_dataset: MMapIndexedDataset, seq_length: int,
                 num_samples: int | None = None, num_rows: int | None = None,
                 rows_hint: str = ""):
        self.indexed_dataset = indexed_dataset
        self.num_rows = len(indexed_dataset) if num_rows is None else num_rows
        ds, width = indexed_dataset, seq_length + 1
        # O(1) check that every item is `width` tokens: the first and last are, and the
        # last starts exactly where N-1 full rows end.
        last_start = (len(ds) - 1) * width * ds.dtype.itemsize
        if ds.sizes[0] != width or ds.sizes[-1] != width or ds.pointers[-1] != last_start:
            raise DataError(f"{ds.prefix}: data_preshuffled needs items of seq_length+1 = "
                            f"{width} tokens (found {int(ds.sizes[0])}); set data_preshuffled: "
                            f"false for document-level data, or fix seq_length")
        if num_samples is not None and num_samples > self.num_rows:
            share = f" ({rows_hint}: raise it)" if self.num_rows < len(ds) else ""
            raise DataError(f"{ds.prefix}: {num_samples} samples needed (train_iters x "
                            f"train_batch_size) but the pre-shuffled train data has "
                            f"{self.num_rows} rows{share}; lower train_iters")

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.num_rows:
            raise IndexError(f"row {k} out of range for {self.num_rows} train rows")
        return {"text": self.indexed_dataset[k].astype(np.int64)}

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Items [start, stop) as one int64 [stop-start, seq_length+1] array."""
        return self.indexed_dataset.rows(start, stop).astype(np.int64)
