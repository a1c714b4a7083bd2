"""Tensor-parallel layers and loss equal the single-process computation (gloo ranks)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import run_distributed
from tp_helpers import gather
from megatron.model import MLP, ModelConfig
from megatron.parallel import (
    ColumnParallelLinear,
    ParallelGroups,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_tensor_parallel,
    gather_from_tensor_parallel_region,
    vocab_parallel_cross_entropy,
)


def _mlp_body(rank, world_size):
    """Column -> GELU -> row linear (the MLP) against the unsharded MLP: outputs and grads."""
    groups = ParallelGroups.build(pp=1, tp=world_size)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=8, num_layers=1, num_heads=2)
    full = MLP(cfg)
    with torch.no_grad():
        full.dense_4h_to_h.bias.normal_()  # a non-zero bias, so the bias split is tested
    x = torch.randn(2, 3, 8)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = full(x_ref)
    (y_ref * torch.arange(8.0)).sum().backward()

    tp = apply_tensor_parallel(copy.deepcopy(full), groups)
    assert isinstance(tp.dense_h_to_4h, ColumnParallelLinear) and isinstance(tp.dense_4h_to_h, RowParallelLinear)
    y = tp(x_tp)
    (y * torch.arange(8.0)).sum().backward()
    g = groups.tp_group
    return dict(
        y=(y - y_ref).abs().max().item(),
        x_grad=(x_tp.grad - x_ref.grad).abs().max().item(),
        col_w=(gather(tp.dense_h_to_4h.weight.grad, g, 0) - full.dense_h_to_4h.weight.grad).abs().max().item(),
        col_b=(gather(tp.dense_h_to_4h.bias.grad, g, 0) - full.dense_h_to_4h.bias.grad).abs().max().item(),
        row_w=(gather(tp.dense_4h_to_h.weight.grad, g, 1) - full.dense_4h_to_h.weight.grad).abs().max().item(),
        # each rank's bias shard is a summand of the full bias, so its grad is the full grad
        row_b=(tp.dense_4h_to_h.bias.grad - full.dense_4h_to_h.bias.grad).abs().max().item(),
        row_b_sum=(gather(tp.dense_4h_to_h.bias.data, g, 0).view(world_size, -1).sum(0)
                   - full.dense_4h_to_h.bias).abs().max().item(),
        local_out=tp.dense_h_to_4h.out_features,
    )


def _tp2_body(rank, world_size):
    return _mlp_body(rank, world_size), _vocab_body(rank, world_size)


@pytest.fixture(scope="module")
def tp2_results():
    """One pair of processes for all the tp=2 layer checks (spawning is the slow part)."""
    return run_distributed(_tp2_body, world_size=2)


@pytest.mark.distributed
def test_column_row_linear_tp2_matches_single_process(tp2_results):
    for r, _ in tp2_results:
        assert r["local_out"] == 16  # 4h / tp
        for key in ("y", "x_grad", "col_w", "col_b", "row_w", "row_b", "row_b_sum"):
            assert r[key] < 1e-5, (key, r[key])


class _EmbedHead(nn.Module):
    """Vocab-parallel embedding and head, named as in GPTNeoX so apply_tensor_parallel finds them."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.final_linear = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.final_linear(torch.tanh(self.word_embeddings(ids)))


def _vocab_body(rank, world_size):
    groups = ParallelGroups.build(pp=1, tp=world_size)
    torch.manual_seed(0)
    vocab = 16
    full = _EmbedHead(vocab, 6)
    ids = torch.randint(0, vocab, (3, 5))
    labels = torch.randint(0, vocab, (3, 5))
    logits_ref = full(ids) * 30  # large logits exercise the max-subtraction
    loss_ref = F.cross_entropy(logits_ref.view(-1, vocab), labels.view(-1), reduction="none").view(3, 5)
    loss_ref.mean().backward()

    tp = apply_tensor_parallel(copy.deepcopy(full), groups)
    assert isinstance(tp.word_embeddings, VocabParallelEmbedding)
    shard = tp(ids) * 30
    loss = vocab_parallel_cross_entropy(shard, labels, groups.tp_group)
    loss.mean().backward()
    g = groups.tp_group
    logits = gather_from_tensor_parallel_region(shard.detach(), g)
    return dict(
        loss=(loss - loss_ref).abs().max().item(),
        loss_dtype=str(loss.dtype),
        logits=(logits - logits_ref).abs().max().item(),
        emb_grad=(gather(tp.word_embeddings.weight.grad, g, 0) - full.word_embeddings.weight.grad).abs().max().item(),
        head_grad=(gather(tp.final_linear.weight.grad, g, 0) - full.final_linear.weight.grad).abs().max().item(),
    )


@pytest.mark.distributed
def test_vocab_embedding_and_cross_entropy_tp2(tp2_results):
    for _, r in tp2_results:
        assert r["loss_dtype"] == "torch.float32"
        for key in ("loss", "logits", "emb_grad", "head_grad"):
            assert r[key] < 1e-4, (key, r[key])


@pytest.mark.distributed
def test_vocab_embedding_and_cross_entropy_tp4():
    for r in run_distributed(_vocab_body, world_size=4):
        for key in ("loss", "logits", "emb_grad", "head_grad"):
            assert r[key] < 1e-4, (key, r[key])


def test_single_rank_layers_are_plain_layers():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    col, lin = ColumnParallelLinear(6, 10), nn.Linear(6, 10)
    lin.load_state_dict(col.state_dict())
    assert torch.equal(col(x), lin(x))
    logits, labels = torch.randn(4, 10, dtype=torch.float16), torch.randint(0, 10, (4,))
    ce = vocab_parallel_cross_entropy(logits, labels, None)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, F.cross_entropy(logits.float(), labels, reduction="none"))
