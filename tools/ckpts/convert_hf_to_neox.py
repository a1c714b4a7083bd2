"""Convert an HF GPT-NeoX/Pythia directory into a GPT-NeoX checkpoint (our training format).

    python tools/ckpts/convert_hf_to_neox.py --hf pythia-70m --output ckpts/pythia-70m [--tp 2]

Writes OUTPUT/global_step{N}/ (per-layer files or the pp=0 layout, mp_rank files,
configs/model.yml, checksums.json) and OUTPUT/latest; the HF tokenizer.json, if any, is
copied to global_step{N}/tokenizer/tokenizer.json and named in the YAML by a path relative
to configs/ (the checkpoint can be moved). `load: OUTPUT` with `iteration: N` continues
training at step N+1 (docs/checkpoints.md).

An OUTPUT that already holds checkpoints is refused unless --force; even then an existing
global_stepN is never overwritten and an existing `latest` is left alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

from megatron.checkpoint import (  # noqa: E402
    check_output_free, neox_args_dict, neox_model_yaml, save_neox_checkpoint,
)
from megatron.errors import ConfigError, cli_main  # noqa: E402
from megatron.model.hf import read_hf_checkpoint  # noqa: E402

NEOX_VOCAB_MULTIPLE = 128
TOKENIZER_COPY = "tokenizer/tokenizer.json"  # inside global_stepN/, as our training saves carry it


def vocab_divisor(padded_vocab: int, tp: int, tokenizer_vocab: int | None) -> int:
    """make-vocab-size-divisible-by that makes NeoX re-derive exactly `padded_vocab`.

    NeoX pads the tokenizer's vocab up to a multiple of divisor * tp; Pythia's 128 works
    unless the HF model was padded for a different tp (e.g. 6.9B: 50432 at tp 2), in which
    case padded_vocab / tp itself is the one divisor that reproduces it.
    """
    step = NEOX_VOCAB_MULTIPLE * tp
    n = tokenizer_vocab if tokenizer_vocab is not None else padded_vocab
    if -(-n // step) * step == padded_vocab:
        return NEOX_VOCAB_MULTIPLE
    return padded_vocab // tp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json with model_type gpt_neox)")
    p.add_argument("--output", required=True, help="NeoX checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel (model_parallel_size) shards to write")
    p.add_argument("--pp-layout", choices=["layers", "sequential"], default="layers",
                   help="'layers': per-layer files (pipe_parallel_size >= 1); 'sequential': pp=0 layout")
    p.add_argument("--iteration", type=int, default=0, help="step number to record (global_stepN)")
    p.add_argument("--force", action="store_true",
                   help="add the checkpoint to an OUTPUT that already holds others (never replaces any)")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    check_output_free(args.output, args.iteration, args.force)  # before the (slow) read
    cfg, sd = read_hf_checkpoint(args.hf)
    if args.tp < 1 or cfg.num_heads % args.tp or cfg.vocab_size % args.tp or cfg.ffn_size % args.tp:
        raise ConfigError(
            f"--tp {args.tp}: must divide heads ({cfg.num_heads}), vocab ({cfg.vocab_size}) "
            f"and MLP width ({cfg.ffn_size})"
        )
    out = Path(args.output)
    tokenizer = Path(args.hf) / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    tokenizer_vocab = None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        tokenizer_vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    divisor = vocab_divisor(cfg.vocab_size, args.tp, tokenizer_vocab)
    tokenizer_type = "HFTokenizer" if tokenizer is not None else None
    yml = neox_model_yaml(
        cfg,
        tp=args.tp,
        pp=1 if args.pp_layout == "layers" else 0,
        make_vocab_size_divisible_by=divisor,
        tokenizer_type=tokenizer_type,
        vocab_file=f"../{TOKENIZER_COPY}" if tokenizer is not None else None,  # relative to configs/
    )
    step = save_neox_checkpoint(
        out, sd, cfg, args.iteration, tp=args.tp, layout=args.pp_layout,
        args=neox_args_dict(cfg, args.tp, divisor, tokenizer_type), config_files={"model.yml": yml},
        extra_files={TOKENIZER_COPY: tokenizer} if tokenizer is not None else None, force=args.force,
    )  # fmt: skip
    if tokenizer is None:
        print(f"note: {args.hf} has no tokenizer.json; set tokenizer_type and vocab_file in the training config")
    print(f"wrote {step} (tp={args.tp}, layout={args.pp_layout})")


if __name__ == "__main__":
    main()
