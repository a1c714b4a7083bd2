"""Rebuild the JSONL files of the example tasks from the Austen novels in data/austen
(public domain). Deterministic: ``python configs/eval_tasks/make_data.py``."""
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
NOVELS = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
          "sensesensibility": "Sense and Sensibility"}


def sentences(novel: str) -> list[str]:
    text = (HERE.parents[1] / "data" / "austen" / f"{novel}.txt").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", text)
    # Split after . ! ? but not after a title such as "Mrs." (a lookbehind is fixed-width).
    parts = re.split(r"(?<=[.!?])(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)\s+", text)
    return [s.strip() for s in parts if s.strip()[:1].isupper()]


def plain(s: str, lo: int, hi: int) -> bool:
    """A sentence of lo..hi words without quotes, dialogue dashes or chapter headings."""
    return lo <= len(s.split()) <= hi and not re.search(r"[\"_\[\]]|--|Chapter|CHAPTER", s)


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / "data" / f"{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main():
    rng = random.Random(20240601)
    (HERE / "data").mkdir(exist_ok=True)
    mc, last_word, completion = [], [], []
    for label, novel in enumerate(NOVELS):
        pool = sentences(novel)
        for s in rng.sample([s for s in pool if plain(s, 15, 40)], 5):
            mc.append({"passage": s, "choices": list(NOVELS.values()), "label": label})
        for s in rng.sample([s for s in pool if plain(s, 10, 30) and re.search(r" [a-z]+\.$", s)], 6):
            words = s[:-1].split()
            last_word.append({"context": " ".join(words[:-1]), "target": words[-1]})
        for s in rng.sample([s for s in pool if plain(s, 6, 12) and s.endswith(".")], 4):
            words = s[:-1].split()
            cut = len(words) - 2
            completion.append({"context": " ".join(words[:cut]), "answer": " ".join(words[cut:])})
    write("austen_mc", mc)
    write("austen_last_word", last_word)
    write("austen_completion", completion)


if __name__ == "__main__":
    main()
