"""build_trainer builds this rank's layers one at a time: never the whole model, never
more than one full-size layer alive, and weights that depend on (seed, layer) only.

Cross-layout equality of the initial weights (tp=2, pp=2 vs one process) is checked bit
for bit in test_equivalence.py, on the runs it already makes.
"""
import gc
import weakref
from pathlib import Path

import torch

from distributed import run_distributed
from megatron.model import ModelConfig
from megatron.parallel import LayerInit, ParallelGroups, build_model

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "local" / "tiny.yml")
BASE = {
    "num_layers": 3, "hidden_size": 32, "num_attention_heads": 4,
    "seq_length": 16, "max_position_embeddings": 16,
    "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
    "train_iters": 10, "lr_decay_iters": 10,
    "l2e": {"enabled": False}, "save": None, "log_dir": None,
}


class FullSizeWatch:
    """Wraps the model classes' constructors to see every instance built with real
    storage (the meta device costs nothing) and how many are alive at once."""

    def __init__(self, classes):
        self.alive: list[weakref.ref] = []
        self.built: list[str] = []
        self.peak = 0
        for cls in classes:
            self._wrap(cls)

    def _wrap(self, cls):
        original, watch = cls.__init__, self

        def __init__(module, *args, **kwargs):
            original(module, *args, **kwargs)
            if any(not p.is_meta for p in module.parameters()):
                watch._record(module)

        cls.__init__ = __init__

    def _record(self, module):
        gc.collect()  # count only what is really still referenced
        self.alive = [r for r in self.alive if r() is not None]
        self.alive.append(weakref.ref(module))
        self.built.append(type(module).__name__)
        self.peak = max(self.peak, len(self.alive))


def _first_weights(trainer) -> dict:
    return {k.removeprefix("sequential."): v.detach().clone().numpy()
            for k, v in trainer.engine.module.state_dict().items()}


def _build_body(rank, world_size):
    from megatron.config import NeoXArgs
    from megatron.model import gpt_neox
    from megatron.training.engine import build_trainer

    watch = FullSizeWatch([gpt_neox.GPTNeoX, gpt_neox.Embedding, gpt_neox.Block, gpt_neox.FinalNorm, gpt_neox.Head])
    results = {}
    for name, overrides in (("pp0", {}), ("pp1", {"pipe_parallel_size": 1}),
                            ("per_rank", {"init_per_rank_shards": True})):
        args = NeoXArgs.from_ymls([TINY], overrides={**BASE, **overrides})
        args.configure_world(world_size)
        args.set_vocab_size(100)
        watch.peak, watch.built = 0, []
        trainer = build_trainer(args, ParallelGroups.build(max(1, args.pipe_parallel_size), 1))
        results[name] = {"weights": _first_weights(trainer), "peak": watch.peak, "built": list(watch.built)}
        del trainer
    return results


def test_build_trainer_holds_at_most_one_full_layer_and_same_weights_for_pp0_and_pipeline():
    (r,) = run_distributed(_build_body, world_size=1, init_deepspeed=True)
    L = BASE["num_layers"]
    for name in ("pp0", "pp1"):
        assert "GPTNeoX" not in r[name]["built"], name  # never the whole model with real storage
        assert len(r[name]["built"]) == L + 3, (name, r[name]["built"])  # each layer drawn once, full size
        assert r[name]["peak"] == 1, (name, r[name]["built"])
    pp0, pp1 = r["pp0"]["weights"], r["pp1"]["weights"]
    assert pp0.keys() == pp1.keys()
    assert all((pp0[k] == pp1[k]).all() for k in pp0)
    # NeoX's per-rank draw is a different (tp-dependent) stream, drawn at shard size:
    # no full-size layer at all.
    per_rank = r["per_rank"]
    assert per_rank["built"] == []
    qkv = "2.attention.query_key_value.weight"
    assert not (per_rank["weights"][qkv] == pp0[qkv]).all()


def test_layer_weights_depend_on_seed_and_layer_index_only():
    common = dict(vocab_size=64, hidden_size=32, num_heads=4, output_layer_init_method="normal")
    small, deep = (build_model(LayerInit(ModelConfig(num_layers=n, **common), ParallelGroups.single(), seed=3))
                   for n in (2, 5))
    other_seed = build_model(LayerInit(ModelConfig(num_layers=2, **common), ParallelGroups.single(), seed=4))
    for name, p in small.named_parameters():
        if name.startswith(("embed.", "blocks.0.", "blocks.1.")):
            assert torch.equal(p, deep.get_parameter(name)), name
    w = "blocks.0.attention.query_key_value.weight"
    assert not torch.equal(small.get_parameter(w), small.get_parameter(w.replace("0", "1", 1)))
    assert not torch.equal(small.get_parameter(w), other_seed.get_parameter(w))


def test_build_model_materialises_everything_and_keeps_ties():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, tie_embeddings=True)
    model = build_model(LayerInit(cfg, ParallelGroups.single(), seed=3))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.head.final_linear.weight is model.embed.word_embeddings.weight
    assert model(torch.randint(0, 64, (1, 5))).isfinite().all()
