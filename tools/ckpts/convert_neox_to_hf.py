"""Convert a GPT-NeoX checkpoint (ours or NeoX's, any TP size, either layout) to HF.

    python tools/ckpts/convert_neox_to_hf.py --input ckpts/run --output hf/run [--iteration 1000]

The output loads with `GPTNeoXForCausalLM.from_pretrained(OUTPUT)`. TP shards are merged
(row-parallel biases summed). When the run's YAML names a readable HF tokenizer file
(`vocab-file` with tokenizer-type HFTokenizer), the tokenizer is saved alongside.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

from megatron.checkpoint_format import checkpoint_neox_args, read_neox_checkpoint, resolve_step_dir  # noqa: E402
from megatron.errors import cli_main  # noqa: E402
from megatron.model.hf import write_hf_checkpoint  # noqa: E402


def tokenizer_file(step: Path) -> Path | None:
    neox_args = checkpoint_neox_args(step)
    if neox_args is None or neox_args.tokenizer_type != "HFTokenizer" or not neox_args.vocab_file:
        return None
    path = Path(neox_args.vocab_file)
    return path if path.is_file() else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint save dir (with 'latest') or a global_stepN dir")
    p.add_argument("--output", required=True, help="HF directory to write")
    p.add_argument("--iteration", type=int, default=None, help="step to convert (default: 'latest')")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    step = resolve_step_dir(args.input, args.iteration)
    cfg, sd = read_neox_checkpoint(step)
    tokenizer = tokenizer_file(step)
    write_hf_checkpoint(args.output, cfg, sd, tokenizer_file=tokenizer)
    print(f"wrote {args.output} from {step}" + (f" with tokenizer {tokenizer}" if tokenizer else ""))


if __name__ == "__main__":
    main()
