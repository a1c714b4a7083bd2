"""The fp32 / ZeRO-0 / pp=0 fast path (torch foreach clipping) trains like DeepSpeed's own clipping."""
from pathlib import Path

import numpy as np
import torch

from distributed import run_distributed

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "local" / "tiny.yml")
# A clipping norm far below the gradient norm, so every step is clipped.
BASE = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
    "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
    "train_iters": 20, "lr_decay_iters": 20, "gradient_clipping": 0.05,
    "l2e": {"enabled": False}, "save": None, "log_dir": None,
}


def _train(rank, world_size, steps):
    from megatron.config import NeoXArgs
    from megatron.parallel import ParallelGroups
    from megatron.training.engine import build_trainer
    from megatron.training.loop import train_step

    groups = ParallelGroups.build(1, 1)
    tokens = torch.from_numpy(np.random.RandomState(0).randint(0, 256, size=(2, 33)))
    batch = (tokens[:, :-1], tokens[:, 1:], torch.ones(2, 32))
    out = {}
    for name in ("fast", "deepspeed"):
        args = NeoXArgs.from_ymls([TINY], overrides=BASE)
        args.configure_world(world_size)
        args.set_vocab_size(256)
        trainer = build_trainer(args, groups)
        engine = trainer.engine
        replaced = "clip_fp32_gradients" in vars(engine)
        if name == "deepspeed":  # back to the engine class's own method
            del engine.clip_fp32_gradients
        flat = lambda: torch.cat([p.detach().flatten() for p in engine.module.parameters()]).numpy()  # noqa: E731
        start = flat()
        losses = [train_step(trainer, iter([batch]), it)["lm_loss"] for it in range(steps)]
        out[name] = {"losses": losses, "start": start, "weights": flat(), "replaced": replaced}
    return out


def test_foreach_clipping_matches_deepspeed_clipping():
    (out,) = run_distributed(_train, world_size=1, args=(4,), init_deepspeed=True)
    assert out["fast"]["replaced"], "the fast path was not installed for fp32 / ZeRO-0 / pp=0"
    np.testing.assert_allclose(out["fast"]["losses"], out["deepspeed"]["losses"], rtol=1e-6)
    fast, ds = out["fast"], out["deepspeed"]
    np.testing.assert_array_equal(fast["start"], ds["start"])
    # Same updates up to float rounding. (Element-wise closeness is too strict: Adam turns
    # rounding-level gradients, e.g. of the key bias, into lr-sized steps.)
    update = np.linalg.norm(fast["weights"] - fast["start"])
    assert update > 0
    assert np.linalg.norm(fast["weights"] - ds["weights"]) < 1e-3 * update
