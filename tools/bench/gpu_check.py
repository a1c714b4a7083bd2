"""GPU acceptance run: every CUDA path of the stack, checked and timed in one command.

    python tools/bench/gpu_check.py --json gpu_check.json        # on one CUDA GPU, <= 8 min
    python tools/bench/gpu_check.py --smoke --json x.json        # CPU, tiny shapes (CI)

Checks (docs/BENCHMARKS.md says how to read the table):
  bf16_train, fp16_train  ~40 steps of the 160M shape at seq 2048 through our DeepSpeed
                          engine (fp16 with dynamic loss scaling): losses finite and
                          falling, step-1 loss within 1e-2 of fp32's
  attention_parity        SDPA vs flash-attn forward/backward in bf16 (skip without flash-attn)
  throughput              tokens/s, TFLOP/s, MFU, peak memory at 160M / 410M / 1B with the
                          configs' micro-batch and activation checkpointing
  hf_step_ratio           our step time / transformers GPTNeoXForCausalLM + torch AdamW, 410M
  l2e_overhead            L2E and top-k step time over plain at the 70M / 410M / 2.8B layer shapes
  l2e_train               30 steps of 70M with L2E in bf16 (128 fresh random sequences per
                          step): tau finite, selected fraction within [rho/2, 2 rho] after
                          the warm-up, l2e_loss finite

Every model is built by our stack (stack.Run: NeoXArgs from configs/pythia/*.yml with
overrides -> build_trainer -> train_step), one process. Each check has a time budget;
shapes are shrunk (fewer layers, smaller micro-batch) when the budget or the GPU's memory
needs it, and the check's detail says so. Exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402  (one-process world; CPU accelerator without CUDA)

import torch  # noqa: E402

from megatron.errors import ConfigError, cli_main  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, without sparsity.
# Matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = (
    ("H200", 989.0),        # H200 SXM: the H100 SXM's compute (1,979 is with sparsity)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),        # H100 SXM5
    ("A100", 312.0),        # A100 SXM4 and PCIe
)
BUDGET_S = {  # per check, on one GPU; start-up (imports, DeepSpeed) is ~30 s more
    "bf16_train": 45, "fp16_train": 45, "attention_parity": 15, "throughput": 120,
    "hf_step_ratio": 45, "l2e_overhead": 100, "l2e_train": 35,
}
HF_RATIO_LIMIT = 1.25  # ours / HF above this fails
L2E_OVERHEAD_LIMIT = 0.034  # the paper's largest L2E overhead; the target is 0.01
SMOKE = {  # every Pythia shape becomes this on CPU; the config's other keys are kept
    "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
    "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 2,
    "zero_optimization.reduce_bucket_size": 1_000_000, "zero_optimization.allgather_bucket_size": 1_000_000,
}
SMOKE_VOCAB = 512  # the 50k-row head would be most of a tiny model's CPU time

PRECISION = {
    "fp32": {"fp16": {"enabled": False}, "bf16": {"enabled": False}},
    "bf16": {"fp16": {"enabled": False}, "bf16": {"enabled": True}},
    "fp16": {"bf16": {"enabled": False}},  # the config's fp16 block: dynamic loss scaling
}


class Skip(Exception):
    """The check cannot run here (no CUDA kernel, package missing)."""


class Checker:
    def __init__(self, smoke: bool, peak_tflops: float | None):
        self.smoke = smoke
        self.cuda = torch.cuda.is_available()
        self.peak_tflops = peak_tflops or self._table_peak()
        self._fp32_first_loss = None
        self.deadline = math.inf

    @staticmethod
    def _table_peak() -> float | None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        return next((peak for key, peak in PEAK_TFLOPS if key in name), None)

    # ------------------------------------------------------------------ building

    def args(self, model: str, precision: str | None = None, l2e: bool = False, **overrides):
        """NeoXArgs of configs/pythia/<model>.yml (+ the L2E overlay), on one process."""
        configs = [f"configs/pythia/{model}.yml"] + ([f"configs/l2e/{model}/l2e.yml"] if l2e else [])
        values = {"train_batch_size": None, "gradient_accumulation_steps": 1, "log_interval": 1,
                  "wall_clock_breakdown": False,  # DeepSpeed's timers synchronize and print
                  # no lr warm-up, negligible decay: losses must fall within 40 steps
                  "warmup": 0.0, "train_iters": 10**4, "lr_decay_iters": 10**4,
                  **(SMOKE if self.smoke else {}), **overrides}
        if "num_layers" in values:  # Pythia's global flash attention, over the shrunk depth
            values["attention_config"] = [[["flash"], values["num_layers"]]]
        if precision is None and self.smoke:
            precision = "fp32"  # the configs' fp16 has no CPU kernels
        if precision is not None:
            values.update(PRECISION[precision])
        if self.smoke and precision == "bf16" and not self._bf16_ok():
            raise Skip("this CPU has no bf16 support in DeepSpeed")
        return stack.config_args(configs, values, vocab=SMOKE_VOCAB if self.smoke else stack.NEOX_20B_VOCAB)

    @staticmethod
    def _bf16_ok() -> bool:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().is_bf16_supported()

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    @staticmethod
    def release(*runs) -> None:
        """Free a finished trainer's memory before the next one is built."""
        for run in runs:
            run.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ checks

    def train_check(self, precision: str) -> dict:
        if precision == "fp16" and not self.cuda:
            raise Skip("fp16 training needs CUDA (DeepSpeed's CPU accelerator has no fp16)")
        shape = {} if self.smoke else {"train_micro_batch_size_per_gpu": 4}  # seq 2048 from the config
        if self._fp32_first_loss is None:
            reference = stack.Run(self.args("160M", "fp32", **shape))
            self._fp32_first_loss = reference.step()["lm_loss"]
            self.release(reference)
        run = stack.Run(self.args("160M", precision, **shape))
        losses, skipped = [], 0
        steps = 40 if not self.smoke else 12
        for _ in range(steps):
            m = run.step()
            losses.append(m["lm_loss"])
            skipped += bool(m["skipped"])
            if self.out_of_time() and len(losses) >= 10:
                break
        self.release(run)
        first_gap = abs(losses[0] - self._fp32_first_loss)
        finite = all(math.isfinite(x) for x in losses)
        falling = finite and sum(losses[-5:]) / 5 < losses[0] - 0.1
        ok = finite and falling and first_gap <= 1e-2
        detail = (f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, step-1 vs fp32 "
                  f"{first_gap:.1e}" + (f", {skipped} steps skipped by the loss scaler" if skipped else ""))
        if not ok:
            detail += "; " + ("non-finite loss" if not finite else "not falling" if not falling
                              else "step-1 loss differs from fp32 by more than 1e-2")
        return {"status": "pass" if ok else "fail", "detail": detail, "losses": losses,
                "step1_fp32_gap": first_gap, "skipped_steps": skipped}

    def attention_parity(self) -> dict:
        from megatron.model.gpt_neox import Attention, ModelConfig, _flash_attn_func

        if not self.cuda:
            raise Skip("flash-attn needs CUDA")
        if _flash_attn_func() is None:
            raise Skip("flash-attn is not installed (pip install flash-attn); SDPA is used")
        cfg = ModelConfig(vocab_size=8, hidden_size=768, num_layers=1, num_heads=12, rotary_pct=0.25,
                          max_position_embeddings=2048)
        torch.manual_seed(0)
        x = torch.randn(2, 2048, 768, device="cuda", dtype=torch.bfloat16)
        outputs = {}
        for impl in ("sdpa", "flash"):
            torch.manual_seed(1)
            cfg.attention_impl = impl
            attn = Attention(cfg).cuda().to(torch.bfloat16)
            xi = x.clone().requires_grad_(True)
            y = attn(xi)
            y.float().square().mean().backward()
            outputs[impl] = (y.detach().float(), xi.grad.float(), attn.query_key_value.weight.grad.float())
        diffs = [(a - b).abs().max().item() for a, b in zip(outputs["sdpa"], outputs["flash"])]
        scale = [a.abs().max().item() for a in outputs["sdpa"]]
        rel = [d / max(s, 1e-12) for d, s in zip(diffs, scale)]
        ok = max(rel) < 2e-2  # a few bf16 ulps of the largest value
        return {"status": "pass" if ok else "fail", "max_abs_diff_out": diffs[0], "max_abs_diff_grad_in": diffs[1],
                "max_abs_diff_grad_qkv": diffs[2],
                "detail": f"bf16 [2, 2048, 768], 12 heads: max |sdpa - flash| out {diffs[0]:.2e}, "
                          f"dx {diffs[1]:.2e}, dW_qkv {diffs[2]:.2e} (relative {max(rel):.1e}, limit 2e-2)"}

    def _fit(self, model: str, budget_s: float, memory_gib: float | None = None, **overrides):
        """Args for ``model`` shrunk until plan_run's memory estimate fits the GPU
        (``memory_gib``, default: this GPU's) and the estimated time of ~8 steps fits the
        budget; returns (args, note)."""
        sys.path.insert(0, str(stack.ROOT / "tools"))
        from plan_run import plan

        args = self.args(model, **overrides)
        if self.smoke:
            return args, ""
        full_layers, full_mbs = args.num_layers, args.train_micro_batch_size_per_gpu
        memory = memory_gib or torch.cuda.get_device_properties(0).total_memory / 2**30
        layers, mbs, layer_reasons = full_layers, full_mbs, set()
        while True:
            p = plan(args, 1, memory, self.peak_tflops or 300.0, mfu=0.3)
            too_big = p["memory_gib"]["total"] > 0.85 * memory
            too_slow = 8 * p["est_step_seconds"] > budget_s
            if too_big and mbs > 1:
                mbs //= 2
            elif (too_big or too_slow) and layers > 2:
                layers = max(2, layers // 2)
                layer_reasons |= ({"memory"} if too_big else set()) | ({"time"} if too_slow else set())
            else:
                break
            args = self.args(model, **{**overrides, "num_layers": layers, "train_micro_batch_size_per_gpu": mbs})
        notes = []
        if layers != full_layers:
            notes.append(f"{layers} of {full_layers} layers ({', '.join(sorted(layer_reasons))})")
        if mbs != full_mbs:
            notes.append(f"micro-batch {mbs} instead of {full_mbs} (memory)")
        return args, ("; shrunk: " + ", ".join(notes)) if notes else ""

    def _timed_steps(self, args):
        """A run of ``args``: one warm-up step, then up to 5 timed ones within the budget."""
        with stack.PeakMemory() as peak:
            run = stack.Run(args)
            try:
                run.step()
                times = []
                while len(times) < 5 and not (self.out_of_time() and times):
                    times.append(stack.timed(run.step))
            finally:
                self.release(run)
        return run, times, peak

    def throughput(self) -> dict:
        sys.path.insert(0, str(stack.ROOT / "tools"))
        from plan_run import training_flops

        results, budget = [], BUDGET_S["throughput"] / 3
        for model in ("160M", "410M", "1B"):
            args, note = self._fit(model, budget)
            try:
                run, times, peak = self._timed_steps(args)
            except torch.cuda.OutOfMemoryError:  # the estimate was low: once more at half the micro-batch
                gc.collect()
                torch.cuda.empty_cache()
                mbs = max(1, args.train_micro_batch_size_per_gpu // 2)
                note += f"; out of memory at micro-batch {args.train_micro_batch_size_per_gpu}, ran {mbs}"
                args = self.args(model, num_layers=args.num_layers, train_micro_batch_size_per_gpu=mbs)
                run, times, peak = self._timed_steps(args)
            step_s = stack.median(times)
            tflops = training_flops(args) / step_s / 1e12
            results.append({"shape": model, "layers": args.num_layers,
                            "micro_batch": args.train_micro_batch_size_per_gpu, "precision": args.precision,
                            "checkpoint_activations": bool(args.checkpoint_activations),
                            "step_s": step_s, "tokens_per_s": run.tokens_per_step / step_s, "tflops": tflops,
                            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                            "peak_memory_gib": peak.bytes / 2**30, "note": note.lstrip("; ")})
        detail = "; ".join(f"{r['shape']}{'' if not r['note'] else ' [' + r['note'] + ']'}: "
                           f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.1f} TFLOP/s"
                           + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
                           + f", {r['peak_memory_gib']:.2f} GiB" for r in results)
        if self.peak_tflops is None:
            detail += " (MFU: unknown GPU peak, pass --peak-tflops)"
        return {"status": "pass", "detail": detail, "shapes": results, "peak_tflops": self.peak_tflops}

    def hf_step_ratio(self) -> dict:
        import bench_train_step

        precision = "fp32" if self.smoke else "bf16"
        args, note = self._fit("410M", BUDGET_S["hf_step_ratio"] / 2, precision=precision,
                               checkpoint_activations=False,
                               **({} if self.smoke else {"train_micro_batch_size_per_gpu": 4}))
        ours, batch = bench_train_step._ours(args)
        hf = bench_train_step._hf(args, batch, stack.device(),
                                  autocast=torch.bfloat16 if precision == "bf16" else None)
        reps = 3 if self.smoke else 10
        times = stack.interleaved({"ours": ours, "hf": hf}, reps, warmup=2)
        ratio = stack.median(times["ours"]) / stack.median(times["hf"])
        gc.collect()
        ok = self.smoke or ratio <= HF_RATIO_LIMIT
        return {"status": "pass" if ok else "fail", "ratio": ratio,
                "ours_ms": 1e3 * stack.median(times["ours"]), "hf_ms": 1e3 * stack.median(times["hf"]),
                "detail": f"410M-shaped{note}, {precision}, micro-batch {args.train_micro_batch_size_per_gpu}: "
                          f"ours/HF {ratio:.3f} (median of {reps} interleaved; limit {HF_RATIO_LIMIT}"
                          f"{', not applied in --smoke' if self.smoke else ''})"}

    def l2e_overhead(self) -> dict:
        sys.path.insert(0, str(stack.ROOT / "tools"))
        from plan_run import training_flops

        rows = []
        for model in ("70M", "410M", "2-8B"):
            # the overhead is per inhibited layer: 4 layers (mid2 = 1, 2) keep every shape quick
            shape = {"num_layers": 4, "train_micro_batch_size_per_gpu": 4} if not self.smoke else {}
            variants = {"plain": {"l2e.enabled": False}, "l2e": {},
                        "topk": {"l2e.retrieval": "topk"}}
            runs = {name: stack.Run(self.args(model, l2e=True, **{"l2e.warmup_steps": 2, **shape, **v}))
                    for name, v in variants.items()}
            for run in runs.values():  # past the threshold's warm-up
                for _ in range(4):
                    run.step()
            reps = 3 if self.smoke else 15
            times = stack.interleaved({n: r.step for n, r in runs.items()}, reps, warmup=0)
            self.release(*runs.values())
            med = {n: stack.median(t) for n, t in times.items()}
            # The same two inhibited layers in the full-depth model: the added time over a plain
            # step scaled up by the FLOPs ratio of full to measured depth.
            measured = runs["plain"].args
            full = self.args(model, train_micro_batch_size_per_gpu=measured.train_micro_batch_size_per_gpu)
            scale = training_flops(full) / training_flops(measured)
            rows.append({"shape": model, "layers": measured.num_layers, "full_layers": full.num_layers,
                         "plain_ms": 1e3 * med["plain"], "l2e_ratio": med["l2e"] / med["plain"],
                         "topk_ratio": med["topk"] / med["plain"],
                         "l2e_full_depth": (med["l2e"] / med["plain"] - 1) / scale,
                         "topk_full_depth": (med["topk"] / med["plain"] - 1) / scale})
        worst = max(r["l2e_full_depth"] for r in rows)
        ok = self.smoke or worst <= L2E_OVERHEAD_LIMIT
        detail = "; ".join(f"{r['shape']} ({r['layers']} layers): L2E {100 * (r['l2e_ratio'] - 1):+.1f}%, "
                           f"top-k {100 * (r['topk_ratio'] - 1):+.1f}%; at {r['full_layers']} layers "
                           f"{100 * r['l2e_full_depth']:+.2f}% / {100 * r['topk_full_depth']:+.2f}%" for r in rows)
        detail += (f" (full depth, L2E target < +1%: {'met' if worst < 0.01 else 'not met'}; fails above "
                   f"+{100 * L2E_OVERHEAD_LIMIT:.1f}%{', not applied in --smoke' if self.smoke else ''})")
        return {"status": "pass" if ok else "fail", "detail": detail, "shapes": rows, "meets_target": worst < 0.01}

    def l2e_train(self) -> dict:
        precision = "bf16" if self.cuda else "fp32"
        # Fresh random sequences, 128 per step on the GPU (8 x 16 accumulated): the moving
        # threshold's warm-up needs statistics of more than a handful of samples (with 8
        # per step it starts far too high and takes hundreds of steps to come down,
        # docs/l2e.md "Tracking speed"); Pythia's steps have 1,024.
        # The paper's schedule (14.3k steps, 1% warm-up): at full learning rate from step 0
        # the activations drift faster than the running statistics follow.
        batch = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4 if self.smoke else 16,
                 "train_iters": 14300, "lr_decay_iters": 14300, "warmup": 0.01}
        args = self.args("70M", precision, l2e=True, **batch)
        run = stack.Run(args, fresh=True)
        steps = 30
        history = [run.step(log=(i == steps - 1)) for i in range(steps)]
        self.release(run)
        rho, layers = args.l2e.rate, args.l2e.resolve_layers(args.num_layers)
        warm = args.l2e.warmup_steps + 2  # statistics need two steps before anything is scored
        problems = []
        for i in layers:
            taus = [m[f"l2e/tau/layer_{i}"] for m in history]
            fracs = [m[f"l2e/selected_frac/layer_{i}"] for m in history[warm:]]
            if not all(math.isfinite(t) for t in taus):
                problems.append(f"layer {i}: tau not finite")
            outside = [f for f in fracs if not rho / 2 <= f <= 2 * rho]
            if outside:
                problems.append(f"layer {i}: selected fraction {outside[0]:.4f} outside [{rho / 2}, {2 * rho}]")
        l2e_loss = history[-1].get("train/l2e_loss", math.nan)
        if not math.isfinite(l2e_loss):
            problems.append("train/l2e_loss not finite")
        last = history[-1]
        detail = (f"{steps} steps of 70M{'-shaped (smoke)' if self.smoke else ''} in {precision}, "
                  f"{args.train_batch_size} fresh random sequences per step, layers {layers}: "
                  + ", ".join(f"tau {last[f'l2e/tau/layer_{i}']:.3g} frac {last[f'l2e/selected_frac/layer_{i}']:.4f}"
                              for i in layers) + f", l2e_loss {l2e_loss:.3g}")
        if problems:
            detail += "; " + "; ".join(problems)
        return {"status": "fail" if problems else "pass", "detail": detail, "l2e_loss": l2e_loss,
                "selected_frac": {str(i): last[f"l2e/selected_frac/layer_{i}"] for i in layers},
                "tau": {str(i): last[f"l2e/tau/layer_{i}"] for i in layers}}

    def checks(self) -> dict:
        return {"bf16_train": lambda: self.train_check("bf16"), "fp16_train": lambda: self.train_check("fp16"),
                "attention_parity": self.attention_parity, "throughput": self.throughput,
                "hf_step_ratio": self.hf_step_ratio, "l2e_overhead": self.l2e_overhead,
                "l2e_train": self.l2e_train}

    def run(self, name: str) -> dict:
        budget = BUDGET_S[name] * (0.5 if self.smoke else 1.0)
        t0 = time.perf_counter()
        self.deadline = t0 + budget
        try:
            result = self.checks()[name]()
        except Skip as e:
            result = {"status": "skip", "detail": str(e)}
        except Exception as e:  # a check that crashes is a failed check, and the others still run
            traceback.print_exc()
            result = {"status": "fail", "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        return {"name": name, **result, "seconds": round(seconds, 1), "budget_s": budget}


def device_name() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return "cpu"


def print_table(report: dict) -> None:
    mode = "smoke (CPU, tiny shapes)" if report["smoke"] else ""
    print(f"\ndevice: {report['device']}   torch {report['torch']}   {mode}")
    print(f"{'check':17s} {'status':6s} {'time':>7s}  detail")
    for c in report["checks"]:
        print(f"{c['name']:17s} {c['status']:6s} {c['seconds']:6.1f}s  {c['detail']}")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="every check's code path on CPU with tiny shapes")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: built-in table)")
    p.add_argument("--only", nargs="+", choices=list(BUDGET_S), help="run only these checks")
    ns = p.parse_args(argv)
    if not ns.smoke and not torch.cuda.is_available():
        raise ConfigError("gpu_check: no CUDA GPU visible; run on a GPU node or add --smoke for the CPU code paths")
    if ns.peak_tflops is not None and ns.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be > 0, got {ns.peak_tflops}")
    checker = Checker(ns.smoke, ns.peak_tflops)
    stack.init_world()
    report = {"device": device_name(), "torch": torch.__version__, "smoke": ns.smoke, "checks": []}
    for name in ns.only or BUDGET_S:
        report["checks"].append(checker.run(name))
        print(f"[gpu_check] {name}: {report['checks'][-1]['status']}", file=sys.stderr, flush=True)
    print_table(report)
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2, default=float))
    if any(c["status"] == "fail" for c in report["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
