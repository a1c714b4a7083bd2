"""Convert a GPT-NeoX checkpoint (ours or NeoX's, any TP size, either layout) to HF.

    python tools/ckpts/convert_neox_to_hf.py --input ckpts/run --output hf/run [--iteration 1000]

The output loads with `GPTNeoXForCausalLM.from_pretrained(OUTPUT)`. TP shards are merged
(row-parallel biases summed). The tokenizer is saved alongside: --tokenizer FILE, else the
run's `vocab-file` (found from the working directory, next to the saved YAML, or as the
copy every checkpoint carries in global_stepN/tokenizer/). When there is none, or it is not
an HF tokenizer.json, the output has no tokenizer and the tool says why.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

from megatron.checkpoint import checkpoint_neox_args, read_neox_checkpoint, resolve_step_dir  # noqa: E402
from megatron.errors import TokenizerError, cli_main  # noqa: E402
from megatron.model.hf import write_hf_checkpoint  # noqa: E402


def tokenizer_file(step: Path, given: str | None = None) -> tuple[Path | None, str]:
    """(the HF tokenizer.json to export with the model, or None; why not when None)."""
    if given is not None:
        if not Path(given).is_file():
            raise TokenizerError(f"--tokenizer: {given} does not exist; pass an HF tokenizer.json")
        return Path(given), ""
    neox_args = checkpoint_neox_args(step)
    if neox_args is None:
        return None, f"{step} has no configs/*.yml naming a tokenizer; pass --tokenizer FILE"
    if neox_args.tokenizer_type != "HFTokenizer":
        return None, (f"its tokenizer_type {neox_args.tokenizer_type} has no HF tokenizer.json form here; "
                      f"pass --tokenizer FILE")
    path = Path(neox_args.vocab_file or "")
    if not neox_args.vocab_file or not path.is_file():
        return None, (f"vocab_file {neox_args.vocab_file} is not found and {step}/tokenizer/ holds no copy; "
                      f"pass --tokenizer FILE")
    return path, ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint save dir (with 'latest') or a global_stepN dir")
    p.add_argument("--output", required=True, help="HF directory to write")
    p.add_argument("--iteration", type=int, default=None, help="step to convert (default: 'latest')")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer.json to save with the model "
                                                     "(default: the run's own, see above)")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    step = resolve_step_dir(args.input, args.iteration)
    cfg, sd = read_neox_checkpoint(step)
    tokenizer, why_not = tokenizer_file(step, args.tokenizer)
    write_hf_checkpoint(args.output, cfg, sd, tokenizer_file=tokenizer)
    print(f"wrote {args.output} from {step}" + (f" with tokenizer {tokenizer}" if tokenizer
                                                 else f" WITHOUT a tokenizer: {why_not}"))


if __name__ == "__main__":
    main()
