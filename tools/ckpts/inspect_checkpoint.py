"""Describe a checkpoint and check that every file of it is present and loadable.

    python tools/ckpts/inspect_checkpoint.py runs/tiny/checkpoints [--iteration 200]
    python tools/ckpts/inspect_checkpoint.py runs/tiny/checkpoints/global_step200

Prints the kind (ours, NeoX-native, weights-only), iteration, parallel layout, model
shape, a summary of the run's config and of the L2E state, then checks the files:
checksums (checksums.json, when the checkpoint has one; --no-checksums skips it), that
every .pt file loads, and that the files the layout implies exist. Exits 1 when a
problem is found (each printed on its own line), 2 when DIR is not a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

from megatron.checkpoint import (  # noqa: E402
    LAYER_FILE, MP_FILE, checkpoint_neox_args, layer_prefixes, resolve_step_dir,
)
from megatron.config.loading import SUMMARY_FILE  # noqa: E402
from megatron.errors import UserError, cli_main  # noqa: E402
from megatron import checkpoint as files  # noqa: E402

KIND_TEXT = {
    "full": "neox-l2e checkpoint: weights, optimizer, LR schedule, RNG, L2E state, data position",
    "neox": "NeoX-native: weights, optimizer and LR schedule; no per-rank extra state",
    "weights": "weights only (a converter's output): continues at its iteration with a fresh optimizer",
}


def recorded_batch(step: Path, info) -> tuple[tuple[int, int, int], str] | None:
    """(global, micro, accumulation) as the run that saved the checkpoint had them, and
    where that was read: its run summary, else DeepSpeed's copy of its config. The config
    files alone cannot say: the batch they give depends on the world they are loaded in."""
    summary = step / "configs" / SUMMARY_FILE
    if summary.is_file():
        batch = (yaml.safe_load(summary.read_text()) or {}).get("batch") or {}
        if None not in (got := tuple(batch.get(k) for k in ("global_batch", "micro_batch", "gradient_accumulation"))):
            return got, f"configs/{SUMMARY_FILE}"
    ds_config = info.meta.get("ds_config") or {}
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if None not in (got := tuple(ds_config.get(k) for k in keys)):
        return got, "DeepSpeed's ds_config"
    return None


def config_summary(args, batch: tuple[tuple[int, int, int], str] | None) -> str:
    if args is None:
        return "no configs/*.yml (shape from the mp_rank args summary)"
    if batch is None:
        batch = ((args.train_batch_size, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps),
                 "no record: re-derived from configs/, which may not be the run's world")
    (global_batch, micro, accumulation), source = batch
    return (f"train_iters {args.train_iters}, global batch {global_batch} (micro {micro} x accumulation "
            f"{accumulation}; {source}), seq {args.seq_length}, lr {args.lr} {args.lr_decay_style} "
            f"(warmup {args.warmup}, min {args.min_lr}), precision {args.precision}, tokenizer {args.tokenizer_type} {args.vocab_file or ''}".rstrip()
            + f", l2e {'on' if args.l2e.enabled else 'off'}")


def l2e_summary(info) -> list[str]:
    """One line per L2E layer found in the ranks' extra-state files."""
    layers = {}
    for name in info.extra_state_files:
        state = files.load_torch(str(Path(info.path) / name)).get("l2e")
        for idx, site in ((state or {}).get("layers") or {}).items():
            layers.setdefault(idx, site)
    return [f"layer {idx}: tau {float(site['tau']):.4g}, statistics over {int(site['n'])} samples "
            f"{tuple(site['mean'].shape)}, scored steps {int(site['scored_steps'])}"
            for idx, site in sorted(layers.items())]


def expected_files(info, tied: bool | None) -> list[str]:
    """Files the checkpoint must hold, from its kind, layout and model (``tied``: None if unknown)."""
    names = {p.name for p in Path(info.path).iterdir()}
    layout, num_layers = info.layout, info.model_args.get("num_layers")
    tp = layout.get("tp") or 1
    if not any(n.startswith("layer_") for n in names):
        wanted = [MP_FILE.format(tp=r) for r in range(tp)]
    elif num_layers is not None:
        head = num_layers + 4
        if tied is None:  # no configs/: a tied head has no file on any rank
            tied = not any(n.startswith(f"layer_{head:02d}-") for n in names)
        wanted = [LAYER_FILE.format(idx=i, tp=r) for r in range(tp) for i in layer_prefixes(num_layers)
                  if not (tied and i == head)]
    else:
        wanted = []
    if info.kind == "full" and layout.get("world_size"):
        wanted += [f"rank_{r:05d}{files.EXTRA_STATE_SUFFIX}" for r in range(layout["world_size"])]
    return wanted


def check_files(info, verify_checksums: bool, tied: bool | None) -> tuple[list[str], str]:
    problems = []
    manifest = files.read_checksums(info.path)
    if manifest is None:
        checksum_note = "no checksums.json (saved before checksums, or by another tool)"
    elif not verify_checksums:
        checksum_note = "checksums not checked (--no-checksums)"
    else:
        problems += files.checksum_problems(info.path, manifest)
        checksum_note = f"checksums {'FAILED' if problems else 'ok'} (sha256, {len(manifest)} files)"
    present = set(files.checkpoint_files(info.path))
    problems += [f"{Path(info.path) / name} is missing" for name in expected_files(info, tied)
                 if name not in present]
    for rel in sorted(present):
        if rel.endswith(".pt"):
            try:
                files.load_torch(str(Path(info.path) / rel), trusted=True)
            except UserError as e:
                problems.append(str(e).removeprefix("load: "))
    return problems, checksum_note


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="save dir (with 'latest') or a global_stepN dir")
    p.add_argument("--iteration", type=int, default=None, help="step to inspect (default: 'latest')")
    p.add_argument("--no-checksums", action="store_true", help="skip hashing the files")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    step = resolve_step_dir(args.checkpoint, args.iteration)
    info = files.read_checkpoint_info(str(step))
    shape = info.model_args
    shown = ("tp", "pp", "dp", "zero_stage", "world_size", "precision")  # not the per-rank entries
    layout = "  ".join(f"{k} {info.layout[k]}" for k in shown if info.layout.get(k) is not None)
    print(f"checkpoint  {step}")
    print(f"kind        {KIND_TEXT[info.kind]}")
    print(f"iteration   {info.iteration}")
    print(f"layout      {layout}")
    print(f"model       layers {shape.get('num_layers')}  hidden {shape.get('hidden_size')}  heads "
          f"{shape.get('num_attention_heads')}  padded vocab {shape.get('padded_vocab_size')}")
    problems, run_args = [], None
    try:
        run_args = checkpoint_neox_args(step)
    except UserError as e:
        problems.append(f"{step / 'configs'}: {e}")
    print(f"config      {config_summary(run_args, recorded_batch(step, info))}")
    print(f"state       optimizer {'yes' if info.has_optimizer else 'no'}, RNG {'yes' if info.has_rng else 'no'}")
    l2e = l2e_summary(info) if info.kind == "full" else []
    print("L2E         " + ("\n            ".join(l2e) if l2e else "none"))
    tied = None if run_args is None else not run_args.no_weight_tying
    file_problems, checksum_note = check_files(info, not args.no_checksums, tied)
    problems += file_problems
    print(f"files       {len(files.checkpoint_files(str(step)))} files, {checksum_note}")
    for problem in problems:
        print(f"PROBLEM     {problem}")
    print("OK" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
