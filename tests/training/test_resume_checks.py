"""A resume refuses inputs that would silently change what training means (tokenizer
content, seq_length, training data and blend weights), in one line naming each
difference, unless allow_changed_inputs; moved data is accepted with a warning.

Each case compares a config with a checkpoint directory holding what save_checkpoint
writes for this purpose (configs/ and tokenizer/): no training needed."""
import json
import logging
import shutil

import pytest

from megatron.config import NeoXArgs
from megatron.errors import CheckpointError, ConfigError
from megatron.checkpoint.resume_checks import check_resume_inputs, check_steps_left
from test_resume import ROOT, TINY, tiny_overrides

DATA = str(ROOT / "data" / "austen_bpe4k_text_document")
VOCAB = ROOT / "data" / "tokenizers" / "austen_bpe4k.json"


def _args(tmp_path, **extra):
    return NeoXArgs.from_ymls([TINY], overrides=tiny_overrides(tmp_path, **extra))


def _checkpoint(tmp_path, args):
    """A step directory as save_checkpoint leaves it, for the parts the checks read."""
    step = tmp_path / "save" / "global_step5"
    (step / "configs").mkdir(parents=True)
    for name, text in args.config_files.items():
        (step / "configs" / name).write_text(text)
    (step / "tokenizer").mkdir()
    shutil.copyfile(VOCAB, step / "tokenizer" / VOCAB.name)
    return str(step)


def _refusal(args, step):
    with pytest.raises(CheckpointError) as info:
        check_resume_inputs(args, step)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"load: {step} was trained on other inputs: ")
    assert message.endswith("or set allow_changed_inputs: true to change them on purpose")
    return message


def test_same_inputs_pass(tmp_path):
    args = _args(tmp_path)
    check_resume_inputs(args, _checkpoint(tmp_path, args))


def test_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    step = _checkpoint(tmp_path, _args(tmp_path))
    spec = json.loads(VOCAB.read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]  # same size, two tokens swapped
    vocab[first], vocab[second] = vocab[second], vocab[first]
    other = tmp_path / "other_tokenizer.json"
    other.write_text(json.dumps(spec))
    message = _refusal(_args(tmp_path, vocab_file=str(other)), step)
    assert f"tokenizer {other} (sha256 " in message and f"is not the checkpoint's {step}/tokenizer/{VOCAB.name}" in message
    # A copy of the same file elsewhere (another name, another directory) is the same tokenizer.
    copy = tmp_path / "copy.json"
    shutil.copyfile(VOCAB, copy)
    check_resume_inputs(_args(tmp_path, vocab_file=str(copy)), step)


def test_every_difference_is_named_in_one_line(tmp_path):
    saved = _args(tmp_path, data_path=None, train_data_paths=[DATA, DATA], train_data_weights=[1.0, 1.0],
                  valid_data_paths=[DATA], test_data_paths=[DATA])
    step = _checkpoint(tmp_path, saved)
    changed = _args(tmp_path, seq_length=16, data_path=None, train_data_paths=[DATA, DATA],
                    train_data_weights=[1.0, 3.0], valid_data_paths=[DATA], test_data_paths=[DATA])
    message = _refusal(changed, step)
    assert "seq_length 32 -> 16" in message and "train_data_weights [1.0, 1.0] -> [1.0, 3.0]" in message
    other_files = _args(tmp_path, data_path=None, train_data_paths=[DATA, DATA + "_other"],
                        train_data_weights=[1.0, 1.0], valid_data_paths=[DATA], test_data_paths=[DATA])
    assert f"train_data_paths [{DATA!r}, {DATA!r}] -> [{DATA!r}, {DATA + '_other'!r}]" in _refusal(other_files, step)


def test_moved_data_and_other_validation_data_only_warn(tmp_path, caplog):
    step = _checkpoint(tmp_path, _args(tmp_path))
    moved = str(tmp_path / "elsewhere" / "austen_bpe4k_text_document")
    with caplog.at_level(logging.WARNING):
        check_resume_inputs(_args(tmp_path, data_path=moved, valid_data_paths=[DATA]), step)
    warning = caplog.messages[-1]
    assert warning.startswith(f"resuming {step} with changed inputs (accepted): data_path [{DATA!r}] -> [{moved!r}]")
    assert f"valid_data_paths [] -> [{DATA!r}]" in warning


def test_allow_changed_inputs_accepts_and_finetune_checks_only_the_tokenizer(tmp_path, caplog):
    step = _checkpoint(tmp_path, _args(tmp_path))
    with caplog.at_level(logging.WARNING):
        check_resume_inputs(_args(tmp_path, seq_length=16, allow_changed_inputs=True), step)
    assert "seq_length 32 -> 16" in caplog.messages[-1]
    check_resume_inputs(_args(tmp_path, seq_length=16, finetune=True), step)


def test_a_checkpoint_past_train_iters_names_the_fix(tmp_path):
    check_steps_left(_args(tmp_path), "ckpt", 10)  # train_iters 10: the run is complete, not past
    with pytest.raises(CheckpointError, match=r"^load: ckpt is at iteration 12, past train_iters=10, so there is "
                                              r"nothing left to train; raise train_iters above 12"):
        check_steps_left(_args(tmp_path), "ckpt", 12)


@pytest.mark.parametrize("weights", [[1.0, -0.5], [0.0, 0.0]])
def test_blend_weights_must_be_non_negative_with_a_positive_sum(tmp_path, weights):
    with pytest.raises(ConfigError, match=r"train_data_weights must be non-negative numbers with a positive sum"):
        _args(tmp_path, data_path=None, train_data_paths=[DATA, DATA], train_data_weights=weights)
