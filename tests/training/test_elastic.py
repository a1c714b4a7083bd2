"""Elastic resume: save at step 6 on one parallel layout, continue to step 10 on another;
steps 7-10 match the uninterrupted run (fp32, gloo, L2E regularize on).

One module-scoped fixture runs everything in three process launches: the uninterrupted
references on one and on two processes, then the resumed runs on the other count.
"""
import pytest

from distributed import run_distributed
from test_resume import TINY, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# name: (world size, layout keys)
LAYOUTS = {
    "pp0": (1, {}),
    "dp1_zero1": (1, {"zero_optimization": {"stage": 1}}),
    "tp2": (2, {"model_parallel_size": 2}),
    "pp2": (2, {"pipe_parallel_size": 2}),
    "dp2_zero1": (2, {"zero_optimization": {"stage": 1}}),
    "dp2_zero2": (2, {"zero_optimization": {"stage": 2}}),
}
# (saved on, resumed on)
PAIRS = [("pp0", "tp2"), ("tp2", "pp0"), ("pp0", "pp2"), ("pp2", "pp0"),
         ("dp2_zero1", "dp1_zero1"), ("dp1_zero1", "dp2_zero1"), ("dp2_zero2", "pp0")]
REL_TOL = 1e-5


def _run_all(rank, world_size, runs):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    return {name: pretrain(NeoXArgs.from_ymls([TINY], overrides=o)) for name, o in runs}


def _reference(tmp_path, name):
    return tiny_overrides(tmp_path / name, **LAYOUTS[name][1], checkpoint_factor=6)


def _resumed(tmp_path, source, target):
    out = tmp_path / f"{source}-to-{target}"
    return tiny_overrides(out, **LAYOUTS[target][1], load=str(tmp_path / source / "full"), iteration=6,
                          checkpoint_factor=100)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    out = {}
    for size in (1, 2):  # references (and resumes onto `size` from the other size's references)
        runs = [(n, _reference(tmp, n)) for n, (ws, _) in LAYOUTS.items() if ws == size]
        runs += [(f"{s}->{t}", _resumed(tmp, s, t)) for s, t in PAIRS
                 if LAYOUTS[t][0] == size and LAYOUTS[s][0] != size and s in out]
        out.update(run_distributed(_run_all, world_size=size, args=(runs,), init_deepspeed=True, timeout=900)[0])
    runs = [(f"{s}->{t}", _resumed(tmp, s, t)) for s, t in PAIRS if LAYOUTS[t][0] == 1 and f"{s}->{t}" not in out]
    out.update(run_distributed(_run_all, world_size=1, args=(runs,), init_deepspeed=True, timeout=900)[0])
    return out


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_resume_on_another_layout_continues_the_run(results, source, target):
    full, resumed = results[source], results[f"{source}->{target}"]
    assert resumed["iteration"] == 10 and len(resumed["lm_loss"]) == 4
    for step, (want, got) in enumerate(zip(full["lm_loss"][6:], resumed["lm_loss"]), start=7):
        assert abs(got - want) <= REL_TOL * abs(want), f"step {step}: {got} vs uninterrupted {want}"
