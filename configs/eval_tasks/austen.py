"""Dataset loader of the example tasks: their JSONL files live in data/ next to this file,
so the tasks run from any working directory and never touch the network."""
from pathlib import Path

import datasets


def load(file: str, **metadata) -> datasets.DatasetDict:
    """lm-eval calls this with the task's ``metadata`` and ``dataset_kwargs`` (``file``)."""
    path = Path(__file__).parent / "data" / file
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    return datasets.DatasetDict({"test": rows})
