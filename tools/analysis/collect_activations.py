"""Collect neuron values of a model over a feature dataset (one forward pass, streamed to disk).

    python tools/analysis/collect_activations.py --model PATH --features data/features/languages.jsonl \
        --out acts/pythia-70m [--site block_output|mlp_act] [--neurons 1000] [--pooling mean|token]

PATH is one of our checkpoint folders or an HF GPT-NeoX folder (e.g. pythia-70m).
"""
import argparse
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)

from megatron.analysis import collect_activations, read_features
from megatron.analysis.collect import POOLINGS, SITES, inhibited_layers, load_model_and_tokenizer
from megatron.errors import UserError, cli_main


def parse_layers(text):
    if text == "all":
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers {text!r}: give 'all' or comma-separated indices like 2,3") from None


def add_collect_args(p):
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in/next to --model)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--site", choices=SITES, default="block_output")
    p.add_argument("--neurons", type=int, default=1000, help="random neurons kept per layer")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="mean over tokens (paper) or per token")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the forward runs, e.g. cuda for Pythia-2.8B")


def collect(model_path, features_path, out, args, name=None):
    model, tokenizer = load_model_and_tokenizer(model_path, args.tokenizer)
    return collect_activations(
        model.to(args.device), tokenizer, read_features(features_path), out, layers=parse_layers(args.layers),
        site=args.site, num_neurons=args.neurons, pooling=args.pooling, batch_size=args.batch_size,
        max_tokens=args.max_tokens, seed=args.seed, name=name or Path(model_path).name,
        source=model_path, dataset=Path(features_path).stem, inhibited_layers=inhibited_layers(model_path))


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None, help="model name in figures (default: folder name)")
    add_collect_args(p)
    args = p.parse_args(argv)
    acts = collect(args.model, args.features, args.out, args, args.name)
    print(f"wrote {args.out}: {acts.manifest['rows']} rows x layers {acts.layers}")


if __name__ == "__main__":
    main()
