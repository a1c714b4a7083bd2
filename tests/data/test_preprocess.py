import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.errors import DataError, TokenizerError
from megatron.tokenizer import build_tokenizer
from tools.datasets.austen import austen_documents
from tools.datasets.preprocess_data import main, preprocess

DATA = Path(__file__).resolve().parents[2] / "data"
NEOX_20B = str(DATA / "tokenizers" / "20B_tokenizer.json")
AUSTEN_BPE = str(DATA / "tokenizers" / "austen_bpe4k.json")
TEXTS = ["Hello world", "It is a truth universally acknowledged,\nthat a single man...", "é ünïcode 😀"]


def hf(path):
    return SimpleNamespace(tokenizer_type="HFTokenizer", vocab_file=path)


def write_jsonl(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("vocab_file, workers", [(NEOX_20B, 1), (AUSTEN_BPE, 2)])
def test_preprocess_gives_the_tokenizers_tokens(tmp_path, vocab_file, workers):
    jsonl = write_jsonl(tmp_path / "in.jsonl.gz", [json.dumps({"text": t}) for t in TEXTS])
    preprocess([jsonl], str(tmp_path / "out"), hf(vocab_file), append_eod=True,
               workers=workers, progress=False)
    ds = MMapIndexedDataset(str(tmp_path / "out_text_document"))
    tok = build_tokenizer(hf(vocab_file))
    assert ds.dtype == np.uint16 and len(ds) == 3 and list(ds.doc_idx) == [0, 1, 2, 3]
    for item, text in zip((ds[i] for i in range(3)), TEXTS):
        assert item.tolist() == tok.tokenize(text) + [tok.eod]
        assert tok.detokenize(item[:-1].tolist()) == text


def test_20b_tokenizer_facts():
    tok = build_tokenizer(hf(NEOX_20B))
    assert tok.tokenize("Hello world") == [12092, 1533]
    assert (tok.eod, tok.vocab_size) == (0, 50277)


def test_bad_lines_report_file_and_line(tmp_path):
    jsonl = write_jsonl(tmp_path / "bad.jsonl",
                        [json.dumps({"text": "ok"}), "{not json", json.dumps({"txt": "x"}), "[1]"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        preprocess([jsonl], str(tmp_path / "o"), hf(AUSTEN_BPE), progress=False)
    stats = preprocess([jsonl], str(tmp_path / "o"), hf(AUSTEN_BPE), on_error="skip", progress=False)
    assert stats["skipped"] == 3 and stats["documents"] == 1


def test_cli_exits_2_with_the_location(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), json.dumps({"body": "b"})])
    with pytest.raises(SystemExit) as e:
        main(["--input", jsonl, "--output-prefix", str(tmp_path / "o"),
              "--tokenizer-type", "HFTokenizer", "--vocab-file", AUSTEN_BPE])
    assert e.value.code == 2
    assert "bad.jsonl:2: no string field 'text'" in capsys.readouterr().err


def test_zst_without_zstandard_is_clear(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="x.jsonl.zst is zstd-compressed; `pip install zstandard`"):
        preprocess([str(path)], str(tmp_path / "o"), hf(AUSTEN_BPE), progress=False)


def test_tokenizer_errors_name_the_key(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_file: .*missing.json does not exist"):
        build_tokenizer(hf(str(tmp_path / "missing.json")))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(TokenizerError, match="vocab_file: .*junk.json is not a readable"):
        build_tokenizer(hf(str(tmp_path / "junk.json")))
    with pytest.raises(TokenizerError, match="tokenizer_type"):
        build_tokenizer(SimpleNamespace(tokenizer_type="SPMTokenizer"))


def test_build_tokenizer_sets_the_padded_vocab():
    calls = []
    args = SimpleNamespace(tokenizer_type="CharLevelTokenizer", set_vocab_size=calls.append)
    tok = build_tokenizer(args)
    assert calls == [512] and tok.eod == 0
    assert tok.detokenize(tok.tokenize("Emma, ä")) == "Emma, ä"


def test_embedded_demo_data_is_the_austen_chapters():
    ds = MMapIndexedDataset(str(DATA / "austen_bpe4k_text_document"))
    tok = build_tokenizer(hf(AUSTEN_BPE))
    chapters = austen_documents()
    assert len(ds) == len(chapters) == 269
    for i in (0, 100, 268):
        assert ds[i][-1] == tok.eod
        assert tok.detokenize(ds[i][:-1].tolist()) == chapters[i]


def test_gpt2_bpe_files_tokenize_like_the_same_bpe(tmp_path):
    from tokenizers import Tokenizer

    vocab, merges = Tokenizer.from_file(AUSTEN_BPE).model.save(str(tmp_path))
    gpt2 = build_tokenizer(SimpleNamespace(tokenizer_type="GPT2BPETokenizer",
                                           vocab_file=vocab, merge_file=merges))
    ref = build_tokenizer(hf(AUSTEN_BPE))
    assert (gpt2.vocab_size, gpt2.eod) == (4096, 0)
    for text in TEXTS:
        assert gpt2.tokenize(text) == ref.tokenize(text)
        assert gpt2.detokenize(gpt2.tokenize(text)) == text
    with pytest.raises(TokenizerError, match="merge_file"):
        build_tokenizer(SimpleNamespace(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab,
                                        merge_file=None))
