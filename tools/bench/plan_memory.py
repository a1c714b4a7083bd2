"""tools/plan_run.py's memory prediction against a measured training run of our stack.

Each case runs in a fresh process: build the trainer (build_trainer, DeepSpeed engine),
train ``--steps`` steps on a synthetic batch, and compare plan_run's per-GPU total
(without its fixed CUDA overhead) with the measured peak of tensor memory
(`stack.PeakMemory`): ``torch.cuda.max_memory_allocated`` on a GPU; on CPU, which has
no allocator statistics, the running sum of the CPU allocator's allocation and free
events recorded by torch's profiler (tensors only, so no interpreter, library or
malloc-arena memory, as on a GPU).

    python tools/bench/plan_memory.py                 # tiny and 70M-shaped (seq 512)
    python tools/bench/plan_memory.py --case tiny
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402

from megatron.errors import cli_main  # noqa: E402

CASES = {
    "tiny": (["configs/local/tiny.yml"], {}),
    "70m": (["configs/pythia/70M.yml", "configs/l2e/70M/l2e.yml"],
            {"seq_length": 512, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 4,
             "gradient_accumulation_steps": 1, "fp16.enabled": False, "zero_optimization.stage": 0}),
}


def measure(case: str, steps: int) -> dict:
    sys.path.insert(0, str(stack.ROOT / "tools"))
    from describe_model import vocab_size_of
    from plan_run import plan

    configs, overrides = CASES[case]
    args = stack.config_args(configs, overrides)
    args.set_vocab_size(vocab_size_of(args, None if args.vocab_file else stack.NEOX_20B_VOCAB))
    predicted = plan(args, gpus=1, gpu_memory_gib=1e6, overhead_gib=0.0)
    stack.init_world()
    with stack.PeakMemory() as peak:
        run = stack.Run(args)
        for _ in range(steps):
            run.step()
    measured = peak.bytes / 2**30
    total = predicted["memory_gib"]["total"]
    return {"case": case, "device": str(stack.device()), "params": predicted["params_total"],
            "predicted_gib": total, "measured_gib": round(measured, 3),
            "predicted_over_measured": round(total / measured, 3), "breakdown_gib": predicted["memory_gib"]}


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the child process
    ns = p.parse_args(argv)
    if ns.inside:
        print(json.dumps(measure(ns.case[0], ns.steps)))
        return
    for case in ns.case:
        out = subprocess.run([sys.executable, __file__, "--inside", "--case", case, "--steps", str(ns.steps)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['case']:5s} {r['params']:>12,} params  predicted {r['predicted_gib']:.3f} GiB  "
              f"measured {r['measured_gib']:.3f} GiB  ratio {r['predicted_over_measured']:.3f}  ({r['device']})")
        print("      " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_gib"].items()), flush=True)


if __name__ == "__main__":
    main()
