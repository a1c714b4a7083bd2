"""Build a balanced labelled feature dataset (JSONL {"text", "label"}) for the analyses.

    python tools/analysis/build_features.py SRC [SRC ...] --out data/features/x.jsonl \
        --per-label 40 --min-chars 200 --max-chars 800 --seed 0

SRC is a labelled .jsonl file, or a folder with one subfolder per label (each file one
record) or one file per label (each blank-line-separated paragraph one record).
"""
import argparse

import _common  # noqa: F401  (puts the repo on sys.path)

from megatron.analysis import balance, gather_sources, write_features
from megatron.errors import cli_main


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--per-label", type=int, default=40, help="records kept per label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-chars", type=int, default=1, help="drop shorter texts")
    p.add_argument("--max-chars", type=int, default=None, help="truncate longer texts")
    p.add_argument("--labels", nargs="+", default=None, help="keep only these labels")
    args = p.parse_args(argv)
    texts, labels = gather_sources(args.sources)
    features = balance(texts, labels, per_label=args.per_label, seed=args.seed, min_chars=args.min_chars,
                       max_chars=args.max_chars, labels_keep=args.labels)
    write_features(features, args.out)
    print(f"wrote {args.out}: {len(features)} records, {len(features.label_names)} labels "
          f"({', '.join(features.label_names)})")


if __name__ == "__main__":
    main()
