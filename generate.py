"""Generate text from a checkpoint with GPT-NeoX's generation keys.

    python deepy.py generate.py CONFIG.yml ... [--load CHECKPOINT] [--iteration N]
    python generate.py configs/local/tiny.yml configs/text_generation.yml

Keys (configs/text_generation.yml): text_gen_type (unconditional | input-file |
interactive), sample_input_file, sample_output_file, num_samples, maximum_tokens,
prompt_end, temperature, top_k, top_p (all 0: greedy), recompute (no KV cache); the
output is NeoX's JSON lines (megatron/text_generation.py).

One process loads the whole model whatever the checkpoint's tensor/pipeline layout
(``megatron.load_model``), on the GPU when there is one. Launched on several ranks, every
rank builds its part as training does (the config's layout must be the checkpoint's)
and all ranks decode together: with pipe_parallel_size 0 (tensor parallelism only) the
KV cache is kept; a DeepSpeed pipeline (pipe_parallel_size >= 1) recomputes the whole
sequence for every token, as ``recompute: true`` does.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron.config.launch_args import consume
from megatron.errors import CheckpointError, cli_main


def checkpoint_dir(args) -> Path:
    path = args.load
    if not path and args.save and Path(args.save, "latest").is_file():
        path = args.save  # a config that trained and saved, used as-is
    if not path:
        raise CheckpointError("generate: no checkpoint; set `load` in the config or pass --load DIR")
    if not Path(path).exists():
        raise CheckpointError(f"generate: checkpoint directory {path} does not exist")
    return Path(path)


def single_process_logits_fn(args, checkpoint: Path):
    """(logits_fn, max_positions): the whole model in this process, on the GPU if any."""
    from megatron import load_model
    from megatron.eval import module_logits_fn

    model = load_model(checkpoint, iteration=args.iteration)
    if torch.cuda.is_available():
        dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
        model = model.to("cuda", dtype)
    return module_logits_fn(model), model.cfg.max_position_embeddings


@cli_main
def main(argv=None):
    from megatron.eval.loading import pick_tokenizer
    from megatron.text_generation import Generator, run

    args = consume(argv, prog="generate.py")
    checkpoint = checkpoint_dir(args)
    tokenizer = pick_tokenizer(args, checkpoint, args.iteration)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megatron.training.inference import load_parallel_model

        args.set_vocab_size(tokenizer.vocab_size)
        logits_fn, groups = load_parallel_model(args, str(checkpoint), args.iteration)
        max_positions, is_writer = args.max_position_embeddings, groups.rank == 0
    else:
        logits_fn, max_positions = single_process_logits_fn(args, checkpoint)
        is_writer = True
    run(Generator(logits_fn, tokenizer, args, max_positions=max_positions), args, is_writer=is_writer)


if __name__ == "__main__":
    main()
