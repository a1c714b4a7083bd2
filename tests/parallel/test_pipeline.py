"""DeepSpeed pipeline (pp=2) built from our layer list: loss and gradient parity, NeoX checkpoint files."""
import functools
import os

import pytest
import torch

from distributed import run_distributed
from megatron.model import ModelConfig
from megatron.parallel import (
    LayerInit,
    ParallelGroups,
    build_model,
    build_pipeline_module,
    layer_modules,
    local_blocks,
    vocab_parallel_cross_entropy,
)
from tp_helpers import merged_grad

pytestmark = pytest.mark.distributed

CFG = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, rotary_pct=0.25, max_position_embeddings=16)
MBS, GAS = 2, 2


def _lm_loss(logits, labels_and_mask, tp_group):
    labels, mask = labels_and_mask
    losses = vocab_parallel_cross_entropy(logits, labels, tp_group)
    return (losses * mask).sum() / mask.sum()


def _micro_batches():
    g = torch.Generator().manual_seed(3)
    for _ in range(GAS):
        tokens = torch.randint(0, 64, (MBS, 13), generator=g)
        mask = torch.ones(MBS, 12)
        mask[0, :3] = 0  # a real mask, so masked averaging is exercised
        yield tokens[:, :-1], tokens[:, 1:], mask


def _same_init_as_pp0(pipe, pp0):
    reference = layer_modules(pp0)
    return all(torch.equal(p, reference[idx].state_dict()[name])
               for idx, layer in layer_modules(pipe).items() for name, p in layer.state_dict().items())


def _grad_errors(pipe, full, tp_group):
    """Max |merged pipeline grad - reference grad| for each parameter of this stage."""
    reference = layer_modules(full)
    errors = {}
    for idx, layer in layer_modules(pipe).items():
        ref = dict(reference[idx].named_parameters())
        for name, p in layer.named_parameters():
            errors[f"{idx}.{name}"] = (merged_grad(name, p.grad, tp_group) - ref[name].grad).abs().max().item()
    return errors


def _pipeline_body(rank, world_size, pp, tp, tie, save_dir):
    import deepspeed

    groups = ParallelGroups.build(pp=pp, tp=tp)
    cfg = ModelConfig(**CFG, tie_embeddings=tie)
    # The reference is the whole tp=1 model: the stages' shards must start from its weights.
    full = build_model(LayerInit(cfg, ParallelGroups.single(), seed=5))
    pipe = build_pipeline_module(LayerInit(cfg, groups, seed=5), functools.partial(_lm_loss, tp_group=groups.tp_group),
                                 activation_checkpointing=True)
    # NeoX's per-rank shards are drawn by layer index too: the same as the pp=0 model with this tp.
    per_rank = LayerInit(cfg, groups, seed=5, per_rank_shards=True)
    same_init = _same_init_as_pp0(build_pipeline_module(per_rank, None), build_model(per_rank))
    ref_loss = sum(_lm_loss(full(t), (y, m), None) for t, y, m in _micro_batches()) / GAS
    ref_loss.backward()

    ds_config = {
        "train_batch_size": MBS * GAS * groups.dp_size,
        "train_micro_batch_size_per_gpu": MBS,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(model=pipe, config=ds_config,
                                      model_parameters=[p for p in pipe.parameters() if p.requires_grad])
    # Compare the gradients DeepSpeed hands the optimizer (after its tied-weight reduction).
    grad_errors, step = [], engine.optimizer.step

    def checked_step(*args, **kwargs):
        grad_errors.append(_grad_errors(pipe, full, groups.tp_group))
        return step(*args, **kwargs)

    engine.optimizer.step = checked_step
    losses = [engine.train_batch(data_iter=iter(((t,), (y, m)) for t, y, m in _micro_batches())).item()
              for _ in range(2)]
    engine.save_checkpoint(save_dir, tag="global_step2")
    return dict(losses=losses, ref_loss=ref_loss.item(), grad_errors=grad_errors[0], stage=groups.pp_rank,
                same_init=same_init, blocks=sorted(local_blocks(pipe)))


def _check(results):
    for r in results:  # DeepSpeed broadcasts the last stage's loss to every stage
        assert abs(r["losses"][0] - r["ref_loss"]) < 1e-5, r
        assert r["losses"][1] < r["losses"][0]
        assert r["same_init"]
        worst = max(r["grad_errors"], key=r["grad_errors"].get)
        assert r["grad_errors"][worst] < 1e-5, (worst, r["grad_errors"][worst])


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("ckpt"))
    results = run_distributed(_pipeline_body, world_size=2, args=(2, 1, False, save), init_deepspeed=True)
    return results, os.path.join(save, "global_step2")


def test_pp2_train_batch_loss_equals_single_process(pp2_run):
    results, _ = pp2_run
    assert [r["stage"] for r in results] == [0, 1]
    assert [r["blocks"] for r in results] == [[0, 1], [2, 3]]  # type:Block splits the blocks evenly
    _check(results)


@pytest.mark.slow
def test_pp2_tp2_tied_equals_single_process(tmp_path):
    """Tensor parallelism inside each stage, tied embeddings across the first and last stage."""
    results = run_distributed(_pipeline_body, world_size=4, args=(2, 2, True, str(tmp_path)), init_deepspeed=True)
    _check(results)
    files = os.listdir(tmp_path / "global_step2")
    L = CFG["num_layers"]
    assert {"layer_00-model_01-model_states.pt", f"layer_{L + 3:02d}-model_01-model_states.pt"} <= set(files)
    assert not any(f.startswith(f"layer_{L + 4:02d}") for f in files)  # the tied head is the embedding


def test_pp2_checkpoint_has_neox_layer_files(pp2_run):
    _, ckpt = pp2_run
    L = CFG["num_layers"]
    layer_files = sorted(f for f in os.listdir(ckpt) if f.startswith("layer_"))
    expected = [f"layer_{i:02d}-model_00-model_states.pt" for i in [0, *range(2, L + 2), L + 3, L + 4]]
    assert layer_files == expected
    assert "mp_rank_00_model_states.pt" in os.listdir(ckpt)
    keys = {f: set(torch.load(os.path.join(ckpt, f), weights_only=True)) for f in layer_files}
    assert keys[expected[0]] == {"word_embeddings.weight"}
    assert keys[expected[-2]] == {"norm.weight", "norm.bias"}
    assert keys[expected[-1]] == {"final_linear.weight"}
    assert "attention.query_key_value.weight" in keys[expected[1]]
    assert "mlp.dense_4h_to_h.bias" in keys[expected[1]]
