"""NeoX's LR schedule (reference §4) and the optimizer's parameter groups."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron.errors import CheckpointError, ConfigError
from megatron.training.optimizer import AnnealingLR, param_groups


def _args(**kw):
    base = dict(lr=1e-3, min_lr=1e-4, warmup=0.01, lr_decay_iters=1000, lr_decay_fraction=None,
                train_iters=1000, lr_decay_style="cosine")
    base.update(kw)
    return SimpleNamespace(**base)


def _schedule(**kw):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return opt, AnnealingLR.from_args(opt, _args(**kw))


def _formula(n, lr_max=1e-3, min_lr=1e-4, W=10.0, D=1000):
    """The reference's formula written out independently (held at min_lr past D)."""
    n = min(n, D)
    if n <= W:
        return lr_max * max(1, n) / W
    return max(min_lr, min_lr + (lr_max - min_lr) * 0.5 * (1 + math.cos(math.pi * (n - W) / (D - W))))


def test_cosine_matches_reference_formula_at_every_step():
    opt, sched = _schedule()
    for n in range(0, 1200):
        assert opt.param_groups[0]["lr"] == pytest.approx(_formula(n), rel=1e-12), n
        sched.step()


def test_warmup_peak_and_floor():
    opt, sched = _schedule()
    lrs = []
    for _ in range(1100):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(1e-4)  # max(1, 0)/W of the peak: the first step is not wasted
    assert lrs[10] == pytest.approx(1e-3)  # warmup ends at W = 0.01 * 1000
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[1000] == pytest.approx(1e-4) and lrs[1099] == pytest.approx(1e-4)


def test_linear_and_constant_styles():
    opt, sched = _schedule(lr_decay_style="linear", warmup=0.0)
    sched.step(505)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 + 9e-4 * (1 - 505 / 1000))
    opt, sched = _schedule(lr_decay_style="constant", warmup=0.0)
    sched.step(700)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_state_dict_resumes_position():
    opt, sched = _schedule()
    sched.step(123)
    opt2, sched2 = _schedule()
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.num_iters == 123


def test_bad_decay_style_is_config_error():
    with pytest.raises(ConfigError, match="lr_decay_style"):
        _schedule(lr_decay_style="noam")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 4)
        self.ln = torch.nn.LayerNorm(4)


def test_param_groups_follow_neox_decay_rules():
    m = _Tiny()
    groups = param_groups(m, weight_decay=0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m.emb.weight), id(m.lin.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_checkpoint_schedule_settings_follow_neox_rules():
    _, saved = _schedule()
    saved.step(300)
    state = saved.state_dict()
    _, same = _schedule()
    same.load_state_dict(state)
    assert same.num_iters == 300 and same.get_lr() == saved.get_lr()
    _, longer = _schedule(lr_decay_iters=2000)
    differs = r"warmup_iter 10.0 \(config: 20.0\), end_iter 1000 \(config: 2000\); set override_lr_scheduler"
    with pytest.raises(CheckpointError, match=differs):
        longer.load_state_dict(state)
    _, overridden = _schedule(lr_decay_iters=2000, override_lr_scheduler=True)
    overridden.load_state_dict(state)  # the config's schedule at the checkpoint's position
    assert overridden.decay_iters == 2000 and overridden.num_iters == 300
    _, kept = _schedule(lr_decay_iters=2000, use_checkpoint_lr_scheduler=True)
    kept.load_state_dict(state)
    assert kept.decay_iters == 1000 and kept.get_lr() == saved.get_lr()
    with pytest.raises(ConfigError, match="both true"):
        _schedule(override_lr_scheduler=True, use_checkpoint_lr_scheduler=True)


def test_rewarmup_ramps_from_the_continued_position_and_survives_a_resume():
    opt, sched = _schedule()
    sched.start_at(500, rewarmup_iters=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[:4] == pytest.approx([_formula(500 + i) * (i + 1) / 4 for i in range(4)], rel=1e-12)
    assert lrs[4:] == pytest.approx([_formula(504), _formula(505)], rel=1e-12)
    opt2, resumed = _schedule()
    opt3, mid = _schedule()
    mid.start_at(500, rewarmup_iters=4)
    mid.step(2)
    resumed.load_state_dict(mid.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[2], rel=1e-12)
