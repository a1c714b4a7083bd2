"""Labelled feature datasets: JSONL records ``{"text": ..., "label": ...}``.

They play the role of Gurnee et al.'s (2023) feature datasets in the paper's analyses
(§3): every input x carries one label ℓ, and C(θ, ℓ) is the set of a neuron's values on
the inputs labelled ℓ.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from megatron.errors import DataError


@dataclass
class FeatureSet:
    texts: list[str]
    labels: list[str]
    label_names: list[str] = field(default_factory=list)  # sorted distinct labels

    def __post_init__(self):
        if not self.label_names:
            self.label_names = sorted(set(self.labels))

    def label_ids(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.labels]

    def __len__(self) -> int:
        return len(self.texts)


def read_features(path) -> FeatureSet:
    """Read a labelled JSONL file; every line needs a string "text" and a "label"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature dataset not found; build one with tools/analysis/build_features.py")
    texts, labels = [], []
    for lineno, record in _jsonl_records(path):
        if not isinstance(record.get("text"), str) or "label" not in record:
            raise DataError(f"{path}:{lineno}: each record needs a string 'text' and a 'label'")
        texts.append(record["text"])
        labels.append(str(record["label"]))
    if len(set(labels)) < 2:
        raise DataError(f"{path}: a feature dataset needs at least 2 distinct labels, found {len(set(labels))}")
    return FeatureSet(texts, labels)


def write_features(features: FeatureSet, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(features.texts, features.labels):
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def gather_sources(sources) -> tuple[list[str], list[str]]:
    """Collect (texts, labels) from JSONL files and folders.

    A folder contributes one label per subfolder (every file inside is one record) or,
    when it holds plain files only, one label per file stem (every blank-line-separated
    paragraph is one record).
    """
    texts, labels = [], []
    for source in map(Path, sources):
        if source.is_file() and source.suffix == ".jsonl":
            fs = read_features(source)
            texts += fs.texts
            labels += fs.labels
        elif source.is_dir():
            for entry in sorted(source.iterdir()):
                if entry.is_dir():
                    for file in sorted(p for p in entry.rglob("*") if p.is_file()):
                        texts.append(_read_text(file))
                        labels.append(entry.name)
                elif entry.is_file():
                    for paragraph in _read_text(entry).split("\n\n"):
                        texts.append(paragraph)
                        labels.append(entry.stem)
        else:
            raise DataError(f"{source}: not a .jsonl file or a folder; pass labelled JSONL files or label folders")
    return texts, labels


def balance(texts, labels, *, per_label: int, seed: int = 0, min_chars: int = 1,
            max_chars: int | None = None, labels_keep=None) -> FeatureSet:
    """A balanced set: deduplicated, length-filtered, ``per_label`` random records per label.

    Labels with fewer than ``per_label`` usable records are dropped with the others kept
    balanced, because the analyses compare per-label means and an unbalanced label would
    dominate ℓ* and the False Killing Rate.
    """
    seen, by_label = set(), {}
    for text, label in zip(texts, labels):
        text = text.strip()
        if max_chars is not None:
            text = text[:max_chars]
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if len(text) < min_chars or digest in seen or (labels_keep and label not in labels_keep):
            continue
        seen.add(digest)
        by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    out_texts, out_labels = [], []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < per_label:
            continue
        for text in rng.sample(pool, per_label):
            out_texts.append(text)
            out_labels.append(label)
    if len(set(out_labels)) < 2:
        raise DataError(f"fewer than 2 labels have {per_label} usable records; lower --per-label or --min-chars")
    return FeatureSet(out_texts, out_labels)


def _jsonl_records(path: Path):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; remove it or convert it") from None
