"""Evaluate a checkpoint with lm-eval.

    python deepy.py eval.py CONFIG.yml ... --eval_tasks arc_challenge piqa sciq --num_fewshot 0
    python eval.py --checkpoint runs/tiny/checkpoints --eval_tasks piqa --num_fewshot 5
    python eval.py --checkpoint /models/pythia-70m --eval_tasks sciq    # any HF GPT-NeoX dir

The checkpoint is ``--checkpoint`` or the config's ``load``; the tokenizer is the
config's, else the ``tokenizer.json`` inside an HF directory, else the one named by
the checkpoint's saved config. Results go to ``--output`` (default
``{eval_results_prefix}eval_results.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron.errors import CheckpointError, TokenizerError, cli_main


def parse_cli(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="NeoX YAML config files (optional with --checkpoint)")
    p.add_argument("--neox_config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help="our/NeoX checkpoint dir or HF GPT-NeoX dir")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--eval_tasks", nargs="+", default=None, help="lm-eval task names")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--include_path", default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--bootstrap_iters", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", default=None, help="results JSON path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_neox_args(cli):
    if not (cli.configs or cli.neox_config):
        return None
    from megatron.config import NeoXArgs

    if cli.neox_config:
        args = NeoXArgs.from_launch_argument(cli.neox_config)
    else:
        args = NeoXArgs.from_ymls(cli.configs)
    args.configure_world(int(os.environ.get("WORLD_SIZE", "1")))
    return args


def pick_tokenizer(neox_args, checkpoint: Path, iteration=None):
    from megatron.tokenizer import build_tokenizer
    from megatron.tokenizer.tokenizer import HFTokenizer

    if neox_args is not None and neox_args.vocab_file:
        return build_tokenizer(neox_args)
    if (checkpoint / "tokenizer.json").is_file():
        return HFTokenizer(str(checkpoint / "tokenizer.json"))
    from megatron.checkpoint_format import checkpoint_neox_args, resolve_step_dir

    saved = checkpoint_neox_args(resolve_step_dir(checkpoint, iteration))
    if saved is not None and saved.vocab_file and Path(saved.vocab_file).is_file():
        return build_tokenizer(saved)
    raise TokenizerError(f"no tokenizer for {checkpoint}: pass a config whose vocab-file exists, "
                         "or put tokenizer.json in the checkpoint directory")


@cli_main
def main(argv=None):
    cli = parse_cli(sys.argv[1:] if argv is None else argv)
    neox_args = load_neox_args(cli)
    path = cli.checkpoint or (neox_args.load if neox_args is not None else None)
    if not path:
        raise CheckpointError("eval: no checkpoint; pass --checkpoint DIR or set `load` in the config")
    checkpoint = Path(path)
    if not checkpoint.exists():
        raise CheckpointError(f"eval: checkpoint directory {checkpoint} does not exist")
    if cli.iteration is None and neox_args is not None:
        cli.iteration = getattr(neox_args, "iteration", None)
    tasks = cli.eval_tasks or (neox_args.eval_tasks if neox_args is not None else None) or []
    num_fewshot = cli.num_fewshot
    if num_fewshot is None:
        num_fewshot = getattr(neox_args, "eval_num_fewshot", 0) or 0

    from megatron import load_model
    from megatron.eval import evaluate_tasks, module_logits_fn

    model = load_model(checkpoint, iteration=cli.iteration)
    tokenizer = pick_tokenizer(neox_args, checkpoint, cli.iteration)
    start = time.time()
    out = evaluate_tasks(module_logits_fn(model), tokenizer, tasks,
                         max_length=model.cfg.max_position_embeddings, num_fewshot=num_fewshot,
                         batch_size=cli.batch_size, limit=cli.limit, include_path=cli.include_path,
                         bootstrap_iters=cli.bootstrap_iters, seed=cli.seed)
    out.update(checkpoint=str(checkpoint), iteration=cli.iteration, num_fewshot=num_fewshot,
               limit=cli.limit, seconds=round(time.time() - start, 2))
    prefix = getattr(neox_args, "eval_results_prefix", "") or ""
    target = Path(cli.output or f"{prefix}eval_results.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, target)
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"results written to {target}")


if __name__ == "__main__":
    main()
