"""Training-step time: our DeepSpeed engine vs transformers' GPTNeoXForCausalLM + torch AdamW.

Both sides train the same architecture (fp32, same batch, AdamW, clipping 1.0) on CPU or
one GPU. Repetitions are interleaved (ours, HF, ours, HF, ...) so drift in machine load
hits both alike; we report median step times and ours/HF.

    python tools/bench/bench_train_step.py                  # tiny and 70M-shaped, seq 128
    python tools/bench/bench_train_step.py --shapes tiny --reps 10 --seq 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402  (sets up the one-process world before torch/deepspeed)

import torch  # noqa: E402

from megatron.errors import cli_main  # noqa: E402

SHAPES = {  # layers, hidden, heads, vocab (padded), micro-batch
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab=4096, mbs=8),
    "70m": dict(num_layers=6, hidden_size=512, num_attention_heads=8, vocab=50304, mbs=4),
}


def _neox_args(shape: dict, seq: int):
    from megatron.config import NeoXArgs

    args = NeoXArgs.from_dict({
        "num_layers": shape["num_layers"], "hidden_size": shape["hidden_size"],
        "num_attention_heads": shape["num_attention_heads"], "seq_length": seq,
        "max_position_embeddings": seq, "rotary_pct": 0.25, "gpt_j_residual": True,
        "no_weight_tying": True, "train_micro_batch_size_per_gpu": shape["mbs"],
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
        "train_iters": 10**6, "gradient_clipping": 1.0, "weight_decay": 0.1,
    })
    args.configure_world(1)
    args.set_vocab_size(shape["vocab"])
    return args


def _ours(args):
    """A step function over our engine (DeepSpeed ZeRO-0 fp32, pp=0) and its batch."""
    run = stack.Run(args)
    return lambda: run.step()["lm_loss"], run.micro[:2]


def _hf(args, batch, device, autocast=None):
    """The same model and optimizer step written the plain transformers way (fp32
    weights; ``autocast`` = torch.bfloat16 trains in mixed precision, as HF's Trainer)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.max_position_embeddings, rotary_pct=args.rotary_pct,
        use_parallel_residual=True, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = GPTNeoXForCausalLM(cfg).to(device).train()
    # fused on every device, as transformers' Trainer default (adamw_torch_fused) and ours
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    tokens, labels = batch

    def step():
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench(name: str, seq: int, reps: int, warmup: int) -> dict:
    device = stack.device()
    args = _neox_args(SHAPES[name], seq)
    ours, batch = _ours(args)
    steps = {"ours": ours, "hf": _hf(args, batch, device)}
    med = {k: statistics.median(v) for k, v in stack.interleaved(steps, reps, warmup).items()}
    return {"shape": name, "seq": seq, "mbs": args.train_micro_batch_size_per_gpu, "device": str(device),
            "ours_ms": 1000 * med["ours"], "hf_ms": 1000 * med["hf"], "ratio": med["ours"] / med["hf"]}


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=25)  # tiny-shape medians of ~9 steps swing ±5% on a shared CPU
    p.add_argument("--warmup", type=int, default=2)
    ns = p.parse_args(argv)
    print(f"{'shape':6} {'seq':>4} {'mbs':>4} {'ours ms':>9} {'HF ms':>9} {'ours/HF':>8}  device")
    for name in ns.shapes:
        r = bench(name, ns.seq, ns.reps, ns.warmup)
        print(f"{r['shape']:6} {r['seq']:>4} {r['mbs']:>4} {r['ours_ms']:>9.1f} {r['hf_ms']:>9.1f} "
              f"{r['ratio']:>8.3f}  {r['device']}", flush=True)


if __name__ == "__main__":
    main()
