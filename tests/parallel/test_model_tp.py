"""A tiny GPTNeoX with tp=2 equals tp=1 from the same full weights (loss and merged grads)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from tp_helpers import gather, merged_grad
from megatron.model import GPTNeoX, ModelConfig, init_weights
from megatron.parallel import (
    LayerInit,
    ParallelGroups,
    apply_tensor_parallel,
    build_model,
    vocab_parallel_cross_entropy,
)

CFG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, rotary_pct=0.25, max_position_embeddings=16)


def _model_body(rank, world_size, tie):
    groups = ParallelGroups.build(pp=1, tp=world_size)
    cfg = ModelConfig(**CFG, tie_embeddings=tie)
    torch.manual_seed(0)
    ref = GPTNeoX(cfg)
    init_weights(ref, cfg, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # non-zero biases so bias sharding is exercised
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    tokens = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12))
    loss_ref = F.cross_entropy(ref(tokens).view(-1, 64), labels.view(-1))
    loss_ref.backward()

    model = apply_tensor_parallel(copy.deepcopy(ref), groups)
    loss = vocab_parallel_cross_entropy(model(tokens), labels, groups.tp_group).mean()
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    grad_err = {n: (merged_grad(n, p.grad, groups.tp_group) - ref_grads[n].grad).abs().max().item()
                for n, p in model.named_parameters()}
    tied = model.head.final_linear.weight is model.embed.word_embeddings.weight
    return dict(loss=loss.item(), loss_ref=loss_ref.item(), grad_err=grad_err, tied=tied,
                heads=model.blocks[0].attention.query_key_value.out_features // (3 * cfg.head_dim))


def _tp2_body(rank, world_size):
    return dict(untied=_model_body(rank, world_size, False), tied=_model_body(rank, world_size, True),
                init=_sharded_init_body(rank, world_size))


@pytest.fixture(scope="module")
def tp2_results():
    """One pair of processes for all the tp=2 model checks (spawning is the slow part)."""
    return run_distributed(_tp2_body, world_size=2)


@pytest.mark.distributed
@pytest.mark.parametrize("tie", [False, True])
def test_gpt_neox_tp2_equals_tp1(tp2_results, tie):
    for r in (rank_results["tied" if tie else "untied"] for rank_results in tp2_results):
        assert r["heads"] == 2  # 4 heads over 2 ranks
        assert r["tied"] == tie
        assert abs(r["loss"] - r["loss_ref"]) < 1e-5
        worst = max(r["grad_err"], key=r["grad_err"].get)
        assert r["grad_err"][worst] < 1e-5, (worst, r["grad_err"][worst])


def _sharded_init_body(rank, world_size):
    groups = ParallelGroups.build(pp=1, tp=world_size)
    cfg = ModelConfig(**CFG)
    a, b = (build_model(LayerInit(cfg, groups, seed=7, per_rank_shards=True)) for _ in "ab")
    qkv = a.blocks[0].attention.query_key_value.weight
    other = gather(qkv.detach(), groups.tp_group, 0).chunk(world_size)[1 - rank]
    return dict(
        same_seed_equal=all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())),
        shards_differ=not torch.equal(qkv, other),
        blocks_differ=not torch.equal(qkv, a.blocks[1].attention.query_key_value.weight),
        qkv_std=qkv.std().item(),
        out_std=a.blocks[0].attention.dense.weight.std().item(),
        bias_zero=bool((a.blocks[0].attention.dense.bias == 0).all()),
    )


@pytest.mark.distributed
def test_sharded_init_is_per_rank_and_deterministic(tp2_results):
    cfg = ModelConfig(**CFG)
    for r in (rank_results["init"] for rank_results in tp2_results):
        assert r["same_seed_equal"] and r["shards_differ"] and r["blocks_differ"] and r["bias_zero"]
        assert abs(r["qkv_std"] - cfg.init_std) < 0.004  # "normal" on the input side
        assert r["out_std"] < r["qkv_std"] * 0.7  # "scaled_normal" 0.02/sqrt(2L) on the output side


def test_indivisible_heads_is_a_config_error():
    from megatron.errors import ConfigError
    from megatron.parallel.apply import check_tp_divisibility

    with pytest.raises(ConfigError, match="num_attention_heads 4 is not divisible by model_parallel_size 3"):
        check_tp_divisibility(ModelConfig(**CFG), 3)


def _engine_body(rank, world_size, zero_stage):
    """A tp=2 model (pp=0) driven by a DeepSpeed engine through our mpu adapter."""
    import deepspeed

    groups = ParallelGroups.build(pp=0, tp=2)
    cfg = ModelConfig(**CFG)
    ref = GPTNeoX(cfg)
    init_weights(ref, cfg, generator=torch.Generator().manual_seed(1))
    model = apply_tensor_parallel(copy.deepcopy(ref), groups)
    ds_config = {"train_batch_size": 2 * groups.dp_size, "train_micro_batch_size_per_gpu": 2,
                 "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=groups.mpu,
                                      model_parameters=list(model.parameters()))
    g = torch.Generator().manual_seed(2)  # every tp rank must see the same batch
    tokens, labels = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    losses = []
    for _ in range(2):
        loss = vocab_parallel_cross_entropy(engine(tokens), labels, groups.tp_group).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return dict(losses=losses, ref=F.cross_entropy(ref(tokens).view(-1, 64), labels.view(-1)).item())


@pytest.mark.distributed
def test_deepspeed_engine_accepts_our_mpu():
    for r in run_distributed(_engine_body, world_size=2, args=(1,), init_deepspeed=True):
        assert abs(r["losses"][0] - r["ref"]) < 1e-5
        assert r["losses"][1] < r["losses"][0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_single_process_sharded_init_and_checkpointing(device):
    from megatron.parallel import apply_activation_checkpointing

    cfg = ModelConfig(**CFG)
    groups = ParallelGroups.single()
    a, b = (build_model(LayerInit(cfg, groups, seed=7, device=torch.device(device), per_rank_shards=True))
            for _ in "ab")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    apply_activation_checkpointing(b)
    tokens = torch.randint(0, 64, (2, 12), device=device)
    for m in (a, b):
        m(tokens).float().logsumexp(-1).mean().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
