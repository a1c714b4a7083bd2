"""Activation checkpointing applied from outside: same gradients, recompute context entered."""
import contextlib
import copy

import torch

from megatron.model import GPTNeoX, ModelConfig
from megatron.parallel import apply_activation_checkpointing

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, rotary_pct=0.25,
                  max_position_embeddings=16, hidden_dropout=0.1)


def test_checkpointed_model_has_same_grads_and_recomputes_in_context():
    torch.manual_seed(0)
    plain = GPTNeoX(CFG)
    ckpt = copy.deepcopy(plain)
    events = []

    @contextlib.contextmanager
    def recompute():
        events.append("enter")
        yield

    apply_activation_checkpointing(ckpt, recompute_context=recompute)
    act_calls = []  # a hook inside the block, where L2E reads activations
    ckpt.blocks[1].mlp.act.register_forward_hook(lambda m, i, o: act_calls.append(torch.is_grad_enabled()))
    tokens = torch.randint(0, 64, (2, 10))
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks; checkpointing must replay them in recompute
        loss = model(tokens).logsumexp(-1).mean()
        assert events == []  # the recompute context is never entered in forward
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    assert len(events) == CFG.num_layers  # one recomputation per block, in backward only
    assert len(act_calls) == 2  # forward + recompute; L2E tells them apart by the context
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    assert set(plain.state_dict()) == set(ckpt.state_dict())  # names unchanged by checkpointing
