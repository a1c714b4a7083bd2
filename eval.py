"""Evaluate a checkpoint with lm-eval.

    python deepy.py eval.py CONFIG.yml ... --eval_tasks arc_challenge piqa sciq --num_fewshot 0
    python eval.py --checkpoint runs/tiny/checkpoints --eval_tasks austen_mc \
        --include_path configs/eval_tasks
    python eval.py --checkpoint /models/pythia-70m --eval_tasks sciq    # any HF GPT-NeoX dir

The checkpoint is ``--checkpoint`` or the config's ``load``; the tokenizer is
``--tokenizer``, else the config's, else the ``tokenizer.json`` inside an HF directory,
else the one named by the checkpoint's saved config. Results go to ``--output``, else
``eval_results/<run>_iter<N>_<tasks>.json`` (N read from the checkpoint; an existing
file is never replaced). ``--limit N`` scores only the first N documents of each task:
the default name ends in ``-limitN``, the JSON says so (``limit``, ``warning``) and the
console warns, so a quick check cannot pass for a full evaluation. Hub tasks need their datasets cached for offline use:
docs/eval.md.

One process evaluates the whole model (``megatron.load_model``). Launched on several
ranks (deepy, torchrun), or with a config whose model is split (model-parallel-size > 1,
pipe-parallel-size >= 1), every rank builds its part exactly as training does, loads
the checkpoint's weights into it, and scores the same requests; rank 0 writes the
results. The checkpoint must have the config's parallel layout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron.errors import CheckpointError, cli_main
from megatron.eval.harness import DEFAULT_BOOTSTRAP_ITERS
from megatron.eval.loading import (checkpoint_iteration, is_hf_checkpoint, pick_tokenizer, results_path,
                                   unused_path)


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
    p.add_argument("--bootstrap_iters", type=int, default=DEFAULT_BOOTSTRAP_ITERS,
                   help="resamples for the stderr of perplexity-like metrics (0: no stderr at "
                        "all); means such as acc have a closed form")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer.json (or a folder holding one)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", default=None,
                   help="results JSON path (default eval_results/<run>_iter<N>_<tasks>.json)")
    p.add_argument("--log_samples", action="store_true",
                   help="also write every request's scores (lm-eval's samples) to the JSON")
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


def is_multi_rank(neox_args) -> bool:
    """Launched on several ranks, or a config whose model is split (pp >= 1 builds a
    DeepSpeed pipeline even with one stage): build the model as training does."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return neox_args is not None and (neox_args.model_parallel_size > 1 or neox_args.pipe_parallel_size >= 1)


def build_logits_fn(neox_args, checkpoint: Path, iteration, tokenizer):
    """(logits_fn, max_length, writes_results) for this rank."""
    if not is_multi_rank(neox_args):
        from megatron import load_model
        from megatron.eval import module_logits_fn

        model = load_model(checkpoint, iteration=iteration)  # the fast path: no DeepSpeed
        return module_logits_fn(model), model.cfg.max_position_embeddings, True
    from megatron.checkpoint import checkpoint_neox_args, resolve_step_dir
    from megatron.training.inference import load_parallel_model

    if is_hf_checkpoint(checkpoint):
        raise CheckpointError(f"eval: {checkpoint} is an HF checkpoint; evaluate it in one process "
                              "(python eval.py --checkpoint DIR, without deepy or a parallel config)")
    args = neox_args or checkpoint_neox_args(resolve_step_dir(checkpoint, iteration))
    if args is None:
        raise CheckpointError(f"eval: {checkpoint} holds no configs/; pass the run's YAML configs")
    args.set_vocab_size(tokenizer.vocab_size)
    logits_fn, groups = load_parallel_model(args, str(checkpoint), iteration)
    return logits_fn, args.max_position_embeddings, groups.rank == 0


@cli_main
def main(argv=None):
    from megatron.console import route_console_output

    route_console_output()
    cli = parse_cli(sys.argv[1:] if argv is None else argv)
    neox_args = load_neox_args(cli)
    path = cli.checkpoint or (neox_args.load if neox_args is not None else None)
    if not path and neox_args is not None and neox_args.save and Path(neox_args.save, "latest").is_file():
        path = neox_args.save  # a config that trained and saved, evaluated as-is
        print(f"eval: `load` is not set; evaluating the run's `save` dir {path}", file=sys.stderr)
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
    include_path = cli.include_path or getattr(neox_args, "eval_include_path", None)

    from megatron.eval import evaluate_tasks

    tokenizer = pick_tokenizer(neox_args, checkpoint, cli.iteration, cli.tokenizer)
    iteration = checkpoint_iteration(checkpoint, cli.iteration)
    limited = limit_warning(cli.limit)
    if os.environ.get("RANK", "0") == "0":
        step = f" at step {iteration}" if iteration is not None else ""
        print(f"eval: evaluating {checkpoint}{step} on {', '.join(tasks) or 'no tasks'}, "
              f"{num_fewshot}-shot" + (f", first {cli.limit} documents per task" if cli.limit else ""), flush=True)
        if limited:
            print(f"eval: warning: {limited}", file=sys.stderr, flush=True)
    logits_fn, max_length, writer = build_logits_fn(neox_args, checkpoint, cli.iteration, tokenizer)
    start = time.time()
    # Every rank scores every request (the logits function is collective); rank 0 writes.
    out = evaluate_tasks(logits_fn, tokenizer, tasks, max_length=max_length, num_fewshot=num_fewshot,
                         batch_size=cli.batch_size, limit=cli.limit, include_path=include_path,
                         bootstrap_iters=cli.bootstrap_iters, seed=cli.seed, log_samples=cli.log_samples)
    if not writer:
        return
    out.update(checkpoint=str(checkpoint), iteration=iteration, num_fewshot=num_fewshot,
               limit=cli.limit, bootstrap_iters=cli.bootstrap_iters,
               seconds=round(time.time() - start, 2))
    if limited:
        out["warning"] = limited
    prefix = getattr(neox_args, "eval_results_prefix", "") or ""
    target = (unused_path(Path(cli.output)) if cli.output
              else results_path(checkpoint, iteration, tasks, prefix, limit=cli.limit))
    if cli.output and str(target) != cli.output:
        print(f"eval: {cli.output} exists; keeping it", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, target)
    for task, metrics in out["results"].items():
        shown = ", ".join(_with_stderr(k, v, metrics) for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"results written to {target}" + (f" (LIMITED: first {cli.limit} documents per task)" if limited else ""))


def limit_warning(limit: int | None) -> str | None:
    if limit is None:
        return None
    return (f"--limit {limit}: only the first {limit} documents of each task are scored; the scores "
            f"are not comparable with a full evaluation")


def _with_stderr(key: str, value: float, metrics: dict) -> str:
    name, _, filt = key.partition(",")
    stderr = metrics.get(f"{name}_stderr,{filt}")
    shown = f"{name}={value:.4f}"
    return shown + (f" ± {stderr:.4f}" if isinstance(stderr, float) else "")


if __name__ == "__main__":
    main()
