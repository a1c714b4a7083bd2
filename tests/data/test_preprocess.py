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


def austen_tok():
    return build_tokenizer(hf(AUSTEN_BPE))


def files_of(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


@pytest.fixture
def existing_dataset(tmp_path):
    """A dataset at tmp_path/out/ds_text_document, and the bytes of that folder."""
    jsonl = write_jsonl(tmp_path / "old.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    preprocess([jsonl], str(tmp_path / "out" / "ds"), hf(AUSTEN_BPE), progress=False)
    return str(tmp_path / "out" / "ds"), files_of(tmp_path / "out")


def many_docs(n):
    return [json.dumps({"text": f"Chapter {i}. Emma Woodhouse, handsome."}) for i in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_reprocessing_keeps_the_old_dataset(tmp_path, existing_dataset, workers):
    prefix, before = existing_dataset
    bad = write_jsonl(tmp_path / "new.jsonl", many_docs(300) + ["{broken"] + many_docs(300))
    with pytest.raises(DataError, match="new.jsonl:301: not valid JSON"):
        preprocess([bad], prefix, hf(AUSTEN_BPE), workers=workers, progress=False)
    assert files_of(tmp_path / "out") == before  # byte-identical, no orphan files
    latin1 = tmp_path / "new2.jsonl"
    latin1.write_bytes("\n".join(many_docs(200) + ['{"text": "café"}']).encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        preprocess([str(latin1)], prefix, hf(AUSTEN_BPE), workers=workers, progress=False)
    assert files_of(tmp_path / "out") == before


@pytest.mark.parametrize("error", [RuntimeError("tokenizer crashed"), KeyboardInterrupt()])
def test_interrupted_reprocessing_keeps_the_old_dataset(tmp_path, existing_dataset, monkeypatch,
                                                         error):
    from tools.datasets import preprocess_data

    prefix, before = existing_dataset
    good = write_jsonl(tmp_path / "new.jsonl", many_docs(500))
    encode, calls = preprocess_data.Encoder.__call__, []

    def fail_mid_stream(self, item):
        calls.append(item)
        if len(calls) == 250:
            raise error
        return encode(self, item)

    monkeypatch.setattr(preprocess_data.Encoder, "__call__", fail_mid_stream)
    with pytest.raises(type(error)):
        preprocess([good], prefix, hf(AUSTEN_BPE), progress=False)
    assert files_of(tmp_path / "out") == before
    monkeypatch.setattr(preprocess_data.Encoder, "__call__", encode)
    preprocess([good], prefix, hf(AUSTEN_BPE), progress=False)  # a good run replaces it
    assert sorted(files_of(tmp_path / "out")) == sorted(before)
    assert len(MMapIndexedDataset(f"{prefix}_text_document")) == 500


def test_txt_file_and_paragraph_documents(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Chapter 1\nIt is a truth.\n\n\nChapter 2\nEmma.\n", encoding="utf-8")
    notes = tmp_path / "notes.txt.gz"
    with gzip.open(notes, "wt", encoding="utf-8") as f:
        f.write("One note.\n\nAnother note.")
    tok = austen_tok()
    preprocess([str(book), str(notes)], str(tmp_path / "files"), hf(AUSTEN_BPE), progress=False)
    ds = MMapIndexedDataset(str(tmp_path / "files_text_document"))
    assert [tok.detokenize(ds[i].tolist()) for i in range(len(ds))] == [
        book.read_text(), "One note.\n\nAnother note."]
    preprocess([str(book), str(notes)], str(tmp_path / "paras"), hf(AUSTEN_BPE),
               txt_paragraphs=True, append_eod=True, progress=False)
    ds = MMapIndexedDataset(str(tmp_path / "paras_text_document"))
    assert [tok.detokenize(ds[i][:-1].tolist()) for i in range(len(ds))] == [
        "Chapter 1\nIt is a truth.\n", "Chapter 2\nEmma.\n", "One note.\n", "Another note."]


def test_jsonl_zst_and_ftfy(tmp_path):
    import zstandard

    lines = [json.dumps({"text": t}) for t in ["The Mr. Knightley", "caf\u00c3\u00a9 au lait"]]
    compressor = zstandard.ZstdCompressor()
    frames = [compressor.compress((line + "\n").encode()) for line in lines]  # two frames
    (tmp_path / "pile.jsonl.zst").write_bytes(b"".join(frames))
    tok = austen_tok()
    for fix, second in [(False, "caf\u00c3\u00a9 au lait"), (True, "café au lait")]:
        preprocess([str(tmp_path / "pile.jsonl.zst")], str(tmp_path / f"o{fix}"), hf(AUSTEN_BPE),
                   fix_text=fix, progress=False)
        ds = MMapIndexedDataset(str(tmp_path / f"o{fix}_text_document"))
        assert [tok.detokenize(ds[i].tolist()) for i in range(2)] == ["The Mr. Knightley", second]


def test_neox_command_line_works(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "in.jsonl", many_docs(30))
    main(["--input", jsonl, "--output-prefix", str(tmp_path / "neox"), "--vocab", AUSTEN_BPE,
          "--dataset-impl", "mmap", "--tokenizer-type", "HFTokenizer", "--append-eod",
          "--workers", "2", "--log-interval", "7", "--num-docs", "30", "--jsonl-keys", "text",
          "--ftfy"])
    assert "30 documents" in capsys.readouterr().err
    ds = MMapIndexedDataset(str(tmp_path / "neox_text_document"))
    assert len(ds) == 30 and ds[0][-1] == austen_tok().eod
    with pytest.raises(SystemExit) as e:
        main(["--input", jsonl, "--output-prefix", str(tmp_path / "o"), "--vocab", AUSTEN_BPE,
              "--tokenizer-type", "HFTokenizer", "--dataset-impl", "lazy"])
    assert e.value.code == 2 and "--dataset-impl lazy: only mmap" in capsys.readouterr().err


def test_non_utf8_input_is_one_line_with_the_byte_offset(tmp_path, capsys):
    head = (json.dumps({"text": "fine"}) + "\n").encode()
    (tmp_path / "latin.jsonl").write_bytes(head + '{"text": "café"}\n'.encode("latin-1"))
    (tmp_path / "latin.txt").write_bytes("Ça va\n".encode("cp1252"))
    for name, offset, line in [("latin.jsonl", len(head) + 13, 2), ("latin.txt", 0, 1)]:
        with pytest.raises(SystemExit) as e:
            main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-type", "HFTokenizer", "--vocab-file", AUSTEN_BPE])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err
        assert f"{name}: not UTF-8 at byte offset {offset} (line {line})" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin.jsonl", "latin.txt"]


def _group_alive(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("signame,workers", [("SIGTERM", 1), ("SIGINT", 2)])
def test_sigterm_mid_run_keeps_the_old_dataset(tmp_path, existing_dataset, signame, workers):
    """SIGTERM, or Ctrl-C (SIGINT to the whole process group, tokenizer workers included):
    one line, no traceback, the status 128 + signal, the old dataset untouched."""
    import os
    import signal
    import subprocess
    import time

    signum = getattr(signal, signame)
    prefix, before = existing_dataset
    big = write_jsonl(tmp_path / "big.jsonl", many_docs(100_000))
    script = Path(__file__).resolve().parents[2] / "tools" / "datasets" / "preprocess_data.py"
    proc = subprocess.Popen([sys.executable, str(script), "--input", big, "--output-prefix", prefix,
                             "--tokenizer-type", "HFTokenizer", "--vocab-file", AUSTEN_BPE, "--workers", str(workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not any(".tmp-" in name for name in os.listdir(tmp_path / "out")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C reaches every process of the job
        assert proc.wait(timeout=60) == 128 + signum
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr
        message = (f"preprocess_data: stopped by {signame}; its temporary files are removed and any dataset "
                   f"already at --output-prefix is unchanged")
        assert stderr.replace("\r", "\n").splitlines().count(message) == 1, stderr  # beside the progress bar
        deadline = time.time() + 10
        while _group_alive(proc.pid) and time.time() < deadline:  # the tokenizer workers went with it
            time.sleep(0.05)
        assert not _group_alive(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert files_of(tmp_path / "out") == before


def test_truncated_or_foreign_compressed_input_is_named(tmp_path):
    import zstandard

    text = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3000)).encode()
    packed = zstandard.ZstdCompressor().compress(text)
    (tmp_path / "cut.jsonl.zst").write_bytes(packed[:-6])  # a download cut short
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text)[:-40])
    (tmp_path / "plain.jsonl.zst").write_bytes(text)  # not compressed at all
    for name, why in [("cut.jsonl.zst", "truncated"), ("cut.jsonl.gz", "end-of-stream"),
                      ("plain.jsonl.zst", "frame")]:
        with pytest.raises(DataError, match=f"{name}: unreadable .*{why}.*zstd -t"):
            preprocess([str(tmp_path / name)], str(tmp_path / "o"), hf(AUSTEN_BPE), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]
