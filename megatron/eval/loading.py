"""What eval.py and generate.py need around a checkpoint: its tokenizer, its iteration,
and a results file name that says which run, step and tasks it holds."""
from __future__ import annotations

import re
from pathlib import Path

from megatron.errors import TokenizerError

STEP = re.compile(r"^global_step(\d+)$")
CHECKPOINT_FOLDER_NAMES = ("checkpoints", "checkpoint", "ckpt", "ckpts")


def is_hf_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / "config.json").is_file()


def pick_tokenizer(neox_args, checkpoint: Path, iteration=None, tokenizer_path=None):
    """The tokenizer to use, first found of: ``tokenizer_path`` (a tokenizer.json or a
    folder holding one), the config's ``vocab-file``, the checkpoint's own tokenizer.json,
    the tokenizer named by the checkpoint's saved config."""
    from megatron.tokenizer import build_tokenizer
    from megatron.tokenizer.tokenizer import HFTokenizer

    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"--tokenizer {tokenizer_path}: no such file; pass an HF "
                                 "tokenizer.json or a folder that holds one")
        return HFTokenizer(str(path))
    if neox_args is not None and neox_args.vocab_file:
        return build_tokenizer(neox_args)
    if (checkpoint / "tokenizer.json").is_file():
        return HFTokenizer(str(checkpoint / "tokenizer.json"))
    from megatron.checkpoint import checkpoint_neox_args, resolve_step_dir

    saved = checkpoint_neox_args(resolve_step_dir(checkpoint, iteration))
    if saved is not None and saved.vocab_file and Path(saved.vocab_file).is_file():
        return build_tokenizer(saved)
    raise TokenizerError(f"no tokenizer for {checkpoint}: pass --tokenizer PATH (a tokenizer.json), "
                         "a config whose vocab-file exists, or put tokenizer.json in the checkpoint")


def checkpoint_iteration(checkpoint: Path, iteration=None) -> int | None:
    """The training step of the weights that will be loaded (None for an HF directory)."""
    if is_hf_checkpoint(checkpoint):
        return None
    from megatron.checkpoint import resolve_step_dir

    match = STEP.match(resolve_step_dir(checkpoint, iteration).name)
    return int(match.group(1)) if match else iteration


def run_name(checkpoint: Path) -> str:
    """runs/tiny/checkpoints[/global_step300] -> "tiny"; /models/pythia-70m -> "pythia-70m"."""
    path = Path(checkpoint).resolve()
    if STEP.match(path.name):
        path = path.parent
    if path.name in CHECKPOINT_FOLDER_NAMES:
        path = path.parent
    return path.name or "run"


def results_path(checkpoint: Path, iteration: int | None, tasks, prefix: str = "",
                 limit: int | None = None) -> Path:
    """``eval_results/<run>_iter<N>_<tasks>.json`` (``<prefix>_iter<N>_<tasks>.json`` when
    the config sets ``eval_results_prefix``; ``-limit<L>`` before ``.json`` when only
    ``limit`` documents per task were scored), never an existing file: a repeat gets
    ``.1``, ``.2``, ... before ``.json``."""
    names = "-".join(tasks)
    if len(names) > 80:  # a long task list would exceed filename limits
        names = f"{'-'.join(tasks[:3])}-and{len(tasks) - 3}more"
    step = f"_iter{iteration}" if iteration is not None else ""
    stem = f"{prefix or Path('eval_results') / run_name(checkpoint)}{step}_{names}"
    if limit is not None:
        stem += f"-limit{limit}"
    return unused_path(Path(f"{stem}.json"))


def unused_path(path: Path) -> Path:
    """``path`` if it does not exist, else the first free ``name.K.json``."""
    candidate, k = path, 0
    while candidate.exists():
        k += 1
        candidate = path.with_suffix(f".{k}{path.suffix}")
    return candidate
