"""The embedded Jane Austen corpus (data/austen/*.txt), one document per chapter."""
from __future__ import annotations

import re
from pathlib import Path

AUSTEN_DIR = Path(__file__).resolve().parents[2] / "data" / "austen"
CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$", re.MULTILINE)


def chapters(text: str) -> list[str]:
    """Split a novel at its chapter headings; the title page joins chapter 1."""
    starts = [m.start() for m in CHAPTER.finditer(text)]
    bounds = [0] + starts[1:] + [len(text)]
    return [text[a:b].strip() + "\n" for a, b in zip(bounds, bounds[1:])]


def austen_documents(directory: Path = AUSTEN_DIR) -> list[str]:
    """Every chapter of the six novels, novels in file-name order."""
    return [c for path in sorted(directory.glob("*.txt"))
            for c in chapters(path.read_text(encoding="utf-8"))]
