"""Tokenizer paths travel with configs and checkpoints (relative to the config file, or the
checkpoint's tokenizer/ copy when the original path is gone)."""
import shutil
import types

from megatron.config import NeoXArgs
from megatron.tokenizer import build_tokenizer

from ckpt_testlib import REPO

TOKENIZER = REPO / "data" / "tokenizers" / "austen_bpe4k.json"
MODEL = "num_layers: 2\nhidden_size: 32\nnum_attention_heads: 4\nseq_length: 32\ntrain_micro_batch_size_per_gpu: 1\n"


def test_relative_vocab_file_is_found_next_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "tok").mkdir(parents=True)
    shutil.copyfile(TOKENIZER, tmp_path / "cfg" / "tok" / "bpe.json")
    (tmp_path / "cfg" / "run.yml").write_text(MODEL + "tokenizer_type: HFTokenizer\nvocab_file: tok/bpe.json\n")
    monkeypatch.chdir(tmp_path)  # from here tok/bpe.json does not exist
    args = NeoXArgs.from_ymls([str(tmp_path / "cfg" / "run.yml")])
    assert args.vocab_file == str(tmp_path / "cfg" / "tok" / "bpe.json")
    assert build_tokenizer(args).vocab_size == 4096
    (tmp_path / "tok").mkdir()
    shutil.copyfile(TOKENIZER, tmp_path / "tok" / "bpe.json")  # found from the working directory: kept
    assert NeoXArgs.from_ymls([str(tmp_path / "cfg" / "run.yml")]).vocab_file == "tok/bpe.json"


def test_missing_tokenizer_is_taken_from_the_loaded_checkpoint(tmp_path, capsys):
    step = tmp_path / "ckpt" / "global_step3"
    (step / "tokenizer").mkdir(parents=True)
    shutil.copyfile(TOKENIZER, step / "tokenizer" / "austen_bpe4k.json")
    (tmp_path / "ckpt" / "latest").write_text("global_step3")
    args = types.SimpleNamespace(tokenizer_type="HFTokenizer", vocab_file="/moved/away/austen_bpe4k.json",
                                 load=str(tmp_path / "ckpt"), iteration=None)
    assert build_tokenizer(args).vocab_size == 4096
    assert args.vocab_file == str(step / "tokenizer" / "austen_bpe4k.json")
    assert "using the checkpoint's copy" in capsys.readouterr().out
