"""Feature datasets: building balanced sets, reading JSONL, and the shipped sets."""
import json
from collections import Counter
from pathlib import Path

import pytest

from megatron.analysis import balance, gather_sources, read_features, write_features
from megatron.errors import DataError

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "features"


def test_balance_caps_dedupes_and_filters():
    texts = ["aaaa", "aaaa", "bb", "cccc", "dddd", "eeee", "ffff", "gggg"]
    labels = ["x", "x", "x", "x", "y", "y", "y", "z"]
    fs = balance(texts, labels, per_label=2, min_chars=3, seed=0)
    counts = Counter(fs.labels)
    # x keeps 2 of its 2 distinct long texts ("aaaa" once, "bb" too short); z has 1 < 2: dropped.
    assert counts == {"x": 2, "y": 2}
    assert sorted(t for t, l in zip(fs.texts, fs.labels) if l == "x") == ["aaaa", "cccc"]
    assert fs.label_names == ["x", "y"]


def test_balance_is_seeded():
    texts = [f"text {i}" for i in range(40)]
    labels = ["a", "b"] * 20
    first = balance(texts, labels, per_label=5, seed=1).texts
    assert first == balance(texts, labels, per_label=5, seed=1).texts
    assert first != balance(texts, labels, per_label=5, seed=2).texts


def test_folders_and_jsonl_round_trip(tmp_path):
    (tmp_path / "by_dir" / "python").mkdir(parents=True)
    (tmp_path / "by_dir" / "python" / "a.py").write_text("print(1)")
    (tmp_path / "by_dir" / "python" / "b.py").write_text("print(2)")
    (tmp_path / "by_file").mkdir()
    (tmp_path / "by_file" / "prose.txt").write_text("first paragraph\n\nsecond paragraph")
    texts, labels = gather_sources([tmp_path / "by_dir", tmp_path / "by_file"])
    assert sorted(zip(labels, texts)) == [("prose", "first paragraph"), ("prose", "second paragraph"),
                                          ("python", "print(1)"), ("python", "print(2)")]
    write_features(balance(texts, labels, per_label=2), tmp_path / "out.jsonl")
    fs = read_features(tmp_path / "out.jsonl")
    assert Counter(fs.labels) == {"prose": 2, "python": 2}
    assert fs.label_ids() == [fs.label_names.index(l) for l in fs.labels]


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_features(path)


@pytest.mark.parametrize("name", ["languages", "code", "genre"])
def test_shipped_datasets_are_balanced_and_small(name):
    path = SHIPPED / f"{name}.jsonl"
    assert path.stat().st_size < 1_000_000
    counts = Counter(read_features(path).labels)
    assert len(counts) >= 8 and set(counts.values()) == {40}
