"""Rewrite a training checkpoint for another parallel layout, offline.

    python tools/ckpts/reshard.py --input ckpts/run --output ckpts/run_tp2 --tp 2 --pp 0 [--dp 4] [--zero 1]

Reads any checkpoint of ours (any dp, tp, pp, ZeRO stage 0-2) and writes
``OUTPUT/global_stepN`` with the target's files: ``mp_rank_XX_model_states.pt`` per
tensor-parallel rank (the pp=0 ``module`` or, for --pp >= 1, NeoX's
``layer_XX-model_YY`` files), Adam's fp32 state keyed by parameter name inside each
mp_rank file, the LR schedule and iteration, and a ``rank_*_extra_state.pt`` per target
rank with its slice of the L2E state. Training resumes from it on the target layout
(``load: OUTPUT``) through the elastic loader; tools that read weights only
(convert_neox_to_hf.py, load_model, eval) take it as they take any NeoX checkpoint.
``--dp``/``--zero`` only label the layout (the optimizer state is stored unpartitioned).
Memory: the output of one tensor-parallel rank (weights and moments), then the next.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

import torch  # noqa: E402

from megatron.checkpoint import (  # noqa: E402
    LAYER_FILE, MOMENTS, MP_FILE, SourceCheckpoint, resolve_step_dir, split_tp_tensor,
)
from megatron.errors import CheckpointError, cli_main  # noqa: E402
from megatron.parallel.groups import build_topology  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint save dir (with 'latest') or a global_stepN dir")
    p.add_argument("--output", required=True, help="new save dir to create (must not exist)")
    p.add_argument("--iteration", type=int, default=None, help="step to convert (default: 'latest')")
    p.add_argument("--tp", type=int, required=True, help="target model_parallel_size")
    p.add_argument("--pp", type=int, required=True, help="target pipe_parallel_size (0: no pipeline)")
    p.add_argument("--dp", type=int, default=None, help="target data-parallel size (default: the input's)")
    p.add_argument("--zero", type=int, default=None, help="target ZeRO stage label (default: the input's)")
    return p.parse_args(argv)


def _shards(source: SourceCheckpoint, name: str, tp: int) -> tuple[list, list | None, int]:
    """(weight shards, per-shard {moment: tensor} or None, Adam step) of one parameter."""
    weights = [w.clone() for w in split_tp_tensor(name, source.full(name), tp)]
    moments = {k: source.full(name, k) for k in MOMENTS}
    if any(v is None for v in moments.values()):
        return weights, None, 0
    per_rank = [{k: split_tp_tensor(name, v, tp, moment=True)[r].clone() for k, v in moments.items()}
                for r in range(tp)]
    return weights, per_rank, source.step(name)


def write_rank_files(source: SourceCheckpoint, out: Path, tp: int, pp: int, layout: dict) -> None:
    """mp_rank_{t} (+ layer files) for every target tensor-parallel rank t."""
    meta0 = source.meta[0]
    by_rank = [{"module": {}, "state": {}, "names": []} for _ in range(tp)]
    layer_files: dict[tuple[int, int], dict] = {}
    for name in source.names():
        weights, moments, step = _shards(source, name, tp)
        idx, key = name.split(".", 1)
        for t in range(tp):
            if pp == 0:
                by_rank[t]["module"][f"sequential.{name}"] = weights[t]
            else:
                layer_files.setdefault((int(idx), t), {})[key] = weights[t]
            if moments is not None:
                by_rank[t]["state"][len(by_rank[t]["names"])] = {"step": torch.tensor(float(step)), **moments[t]}
                by_rank[t]["names"].append(name)
    for (idx, t), layer in layer_files.items():
        torch.save(layer, out / LAYER_FILE.format(idx=idx, tp=t))
    for t, rank in enumerate(by_rank):
        torch.save({
            "module": rank["module"] or None,
            "optimizer": {"state": rank["state"], "param_groups": [{"params": list(rank["state"])}]},
            "lr_scheduler": meta0.get("lr_scheduler"),
            "iteration": meta0.get("iteration"), "global_steps": meta0.get("global_steps"),
            "global_samples": meta0.get("global_samples"), "skipped_steps": meta0.get("skipped_steps", 0),
            "args": {**(meta0.get("args") or {}), "model_parallel_size": tp},
            "dp_world_size": layout["dp"], "mp_world_size": tp,
            "layout": {**layout, "tp_rank": t, "pp_rank": 0, "param_names": [rank["names"]]},
        }, out / MP_FILE.format(tp=t))


def write_extra_states(source: SourceCheckpoint, out: Path, layout: dict) -> None:
    """rank_*_extra_state.pt for every target rank: its tp slice of every L2E layer."""
    extras = source.extra_states()
    topology = build_topology(layout["world_size"], layout["pp"], layout["tp"])
    first = extras[min(extras)] if extras else {}
    merged = {dp: source.merged_l2e(extras, dp) for dp in range(layout["dp"])} if extras else {}
    for rank in range(layout["world_size"]):
        coord = topology.get_coord(rank)
        l2e = merged.get(coord.data)
        if l2e is not None:
            l2e = {"iteration": l2e["iteration"], "layers": {
                layer: {**sd, **{k: sd[k].chunk(layout["tp"], dim=-1)[coord.model].clone() for k in ("mean", "M2")}}
                for layer, sd in l2e["layers"].items()}}
        own = extras.get(rank, first)
        torch.save({"iteration": own.get("iteration", source.meta[0].get("iteration")), "rng": own.get("rng"),
                    "l2e": l2e}, out / f"rank_{rank:05d}_extra_state.pt")


def reshard(step: Path, output: Path, tp: int, pp: int, dp: int | None = None, zero: int | None = None) -> Path:
    if output.exists():
        raise CheckpointError(f"--output {output} already exists; choose a new directory (nothing is overwritten)")
    if tp < 1 or pp < 0:
        raise CheckpointError(f"--tp {tp} / --pp {pp}: need tp >= 1 and pp >= 0")
    source = SourceCheckpoint(str(step))
    saved = source.layout
    dp = dp or saved["dp"]
    layout = {**saved, "dp": dp, "tp": tp, "pp": pp, "world_size": dp * tp * max(pp, 1),
              "zero_stage": saved["zero_stage"] if zero is None else zero, "resharded": True}
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    out = tmp / step.name
    out.mkdir(parents=True)
    write_rank_files(source, out, tp, pp, layout)
    write_extra_states(source, out, layout)
    if (step / "configs").is_dir():
        shutil.copytree(step / "configs", out / "configs")
    (tmp / "latest").write_text(step.name)
    os.replace(tmp, output)
    return output / step.name


@cli_main
def main(argv=None):
    args = parse_args(argv)
    step = resolve_step_dir(args.input, args.iteration)
    written = reshard(step, Path(args.output), args.tp, args.pp, args.dp, args.zero)
    print(f"wrote {written} for tp={args.tp} pp={args.pp} from {step}; resume with load: {args.output} "
          f"and model_parallel_size: {args.tp}, pipe_parallel_size: {args.pp}")


if __name__ == "__main__":
    main()
