"""Print a config's model size as JSON, without allocating any weights.

    python tools/describe_model.py configs/pythia/70M.yml configs/local_setup.yml

The model is built on the meta device, so even 12B takes well under a second.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.errors import cli_main  # noqa: E402

NEOX_20B_VOCAB = 50277  # ids of the GPT-NeoX-20B tokenizer every Pythia model uses


SHIPPED_20B_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "data", "tokenizers", "20B_tokenizer.json")


def _uses_shipped_20b_tokenizer(args) -> bool:
    """Pythia's configs name no tokenizer, or the 20B one at GPT-NeoX's cluster path
    (/fsx/...): the repository's copy is the same file."""
    given = args.vocab_file
    named_20b = given is None or os.path.basename(given) == os.path.basename(SHIPPED_20B_TOKENIZER)
    return named_20b and os.path.isfile(SHIPPED_20B_TOKENIZER)


def vocab_size_of(args, override):
    """Tokenizer ids: --vocab-size, else the config's tokenizer (the shipped 20B tokenizer
    when the config names none), else NeoX-20B's 50,277 with a warning."""
    if override is not None:
        return override
    if args.vocab_file and os.path.isfile(args.vocab_file):
        from megatron.tokenizer import build_tokenizer

        return build_tokenizer(args).vocab_size
    if _uses_shipped_20b_tokenizer(args):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(SHIPPED_20B_TOKENIZER).get_vocab_size()
    print(f"describe_model: vocab_file {args.vocab_file} is not readable; assuming the "
          f"GPT-NeoX-20B tokenizer's {NEOX_20B_VOCAB} ids (use --vocab-size to change)", file=sys.stderr)
    return NEOX_20B_VOCAB


def describe(args) -> dict:
    from megatron.model import parameter_counts

    cfg = args.model_config()
    total, non_embedding = parameter_counts(cfg)
    head_dim = cfg.hidden_size // cfg.num_heads
    return {
        "total_params": total,
        "non_embedding_params": non_embedding,
        "padded_vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "head_dim": head_dim,
        "rotary_dims": int(head_dim * cfg.rotary_pct),
        "intermediate_size": cfg.intermediate_size or 4 * cfg.hidden_size,
        "seq_length": args.seq_length,
        "tied_embeddings": cfg.tie_embeddings,
        "gelu": "tanh" if cfg.gelu_tanh else "exact",
        "precision": args.precision,
        "model_parallel_size": args.model_parallel_size,
        "pipe_parallel_size": args.pipe_parallel_size,
    }


@cli_main
def main(argv=None):
    from megatron.config import NeoXArgs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="YAML config files (merged)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocab size before padding")
    ns = p.parse_args(argv)
    args = NeoXArgs.from_ymls(ns.configs)
    args.set_vocab_size(vocab_size_of(args, ns.vocab_size))
    print(json.dumps(describe(args), indent=2))


if __name__ == "__main__":
    main()
