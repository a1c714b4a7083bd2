"""--override KEY=VALUE with dotted keys: one entry of a block, the rest of it kept."""
import os

import pytest

from megatron.config import ConfigError, NeoXArgs
from megatron.config.launch_args import config_parser, load_from_namespace

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "fixtures", "tiny.yml")  # l2e: enabled, layers [0, 1], rate 0.05


def load(*overrides):
    return load_from_namespace(config_parser("train.py", with_script=False).parse_args(
        [TINY, "--override", *overrides]))


def test_dotted_key_sets_one_entry_and_keeps_the_block():
    args = load("l2e.inhibition=none", "l2e.warmup-steps=3")
    assert args.l2e.inhibition == "none"
    assert args.l2e.warmup_steps == 3
    # the file's other l2e entries survive
    assert args.l2e.enabled and args.l2e.layers == [0, 1] and args.l2e.rate == 0.05


def test_dotted_key_reaches_nested_dicts():
    args = load("optimizer.params.lr=0.01", "zero_optimization.stage=1")
    assert args.optimizer == {"type": "Adam", "params": {"lr": 0.01}}
    assert args.zero_optimization["stage"] == 1


def test_whole_block_override_still_replaces_it():
    args = load("l2e={enabled: true, inhibition: none}")
    assert args.l2e.inhibition == "none" and args.l2e.rate == 0.02  # back to the default


def test_dotted_key_into_a_scalar_is_a_config_error():
    with pytest.raises(ConfigError, match="train_iters"):
        load("train_iters.x=3")


def test_dotted_key_typo_names_the_block_key():
    with pytest.raises(ConfigError, match="l2e.inhibtion"):
        load("l2e.inhibtion=none")


def test_overrides_are_saved_with_the_config_files(tmp_path):
    """A checkpoint's configs/ folder rebuilds the run's arguments, command-line overrides included."""
    from pathlib import Path

    from megatron.config.neox_args import OVERRIDES_FILE

    tiny = Path(__file__).resolve().parents[2] / "configs" / "local" / "tiny.yml"
    args = NeoXArgs.from_ymls([str(tiny)], overrides={"hidden_size": 64, "l2e.inhibition": "none"})
    assert OVERRIDES_FILE in args.config_files
    for name, text in args.config_files.items():
        (tmp_path / name).write_text(text)
    saved = NeoXArgs.from_config_dir(tmp_path)
    assert saved.hidden_size == 64 and saved.l2e.inhibition == "none"
    assert saved.to_dict() == args.to_dict()
    assert NeoXArgs.from_config_dir(tmp_path / "missing") is None


def test_eval_flags_become_config_keys():
    """`deepy.py eval.py CONFIG --eval_tasks ... --num_fewshot 5`, as NeoX's deepy takes them."""
    args = load_from_namespace(config_parser("eval.py", with_script=False).parse_args(
        [TINY, "--eval_tasks", "piqa", "sciq", "--num_fewshot", "5", "--iteration", "7"]))
    assert args.eval_tasks == ["piqa", "sciq"]
    assert args.eval_num_fewshot == 5 and args.iteration == 7
