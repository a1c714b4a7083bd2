"""Elastic resume: save at step 6 on one parallel layout, continue to step 10 on another;
steps 7-10 match the uninterrupted run (fp32, gloo, L2E regularize on).

One module-scoped fixture runs everything in three process launches: the uninterrupted
references on one and on two processes, then the resumed runs on the other count.
"""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megatron.checkpoint import elastic
from test_resume import ROOT, TINY, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# name: (world size, layout keys)
LAYOUTS = {
    "pp0": (1, {}),
    "dp1_zero1": (1, {"zero_optimization": {"stage": 1}}),
    "tp2": (2, {"model_parallel_size": 2}),
    "pp2": (2, {"pipe_parallel_size": 2}),
    "dp2_zero1": (2, {"zero_optimization": {"stage": 1}}),
    "dp2_zero2": (2, {"zero_optimization": {"stage": 2}}),
    "dp2_zero3": (2, {"zero_optimization": {"stage": 3}}),
}
# (saved on, resumed on)
PAIRS = [("pp0", "tp2"), ("tp2", "pp0"), ("pp0", "pp2"), ("pp2", "pp0"),
         ("dp2_zero1", "dp1_zero1"), ("dp1_zero1", "dp2_zero1"), ("dp2_zero2", "pp0"),
         ("dp2_zero3", "pp0"), ("pp0", "dp2_zero3")]
REL_TOL = 1e-5


def _reshard_cli():
    spec = importlib.util.spec_from_file_location("reshard", ROOT / "tools" / "ckpts" / "reshard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


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


def _strip_layout(save_dir, old_dir):
    """A checkpoint as saved before layouts were recorded (and before checksums were)."""
    shutil.copytree(save_dir, old_dir)
    for path in Path(old_dir).glob("global_step*/mp_rank_*_model_states.pt"):
        meta = torch.load(path, weights_only=False)
        del meta["layout"]
        torch.save(meta, path)
    for manifest in Path(old_dir).glob("global_step*/checksums.json"):
        manifest.unlink()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    out = {}
    for size in (1, 2):  # references (and resumes onto `size` from the other size's references)
        runs = [(n, _reference(tmp, n)) for n, (ws, _) in LAYOUTS.items() if ws == size]
        runs += [(f"{s}->{t}", _resumed(tmp, s, t)) for s, t in PAIRS
                 if LAYOUTS[t][0] == size and LAYOUTS[s][0] != size and s in out]
        if size == 2:  # the offline route: reshard the pp0 checkpoint to tp2 and resume there
            _reshard_cli()(["--input", str(tmp / "pp0" / "full"), "--iteration", "6",
                            "--output", str(tmp / "resharded_tp2"), "--tp", "2", "--pp", "0"])
            runs.append(("resharded->tp2", tiny_overrides(tmp / "resharded-run", **LAYOUTS["tp2"][1],
                                                          load=str(tmp / "resharded_tp2"), checkpoint_factor=100)))
        out.update(run_distributed(_run_all, world_size=size, args=(runs,), init_deepspeed=True, timeout=900)[0])
    runs = [(f"{s}->{t}", _resumed(tmp, s, t)) for s, t in PAIRS if LAYOUTS[t][0] == 1 and f"{s}->{t}" not in out]
    # a checkpoint from before layouts were recorded: the layout is inferred from its files
    _strip_layout(tmp / "dp2_zero1" / "full", tmp / "old_dp2_zero1" / "full")
    runs.append(("old_dp2_zero1->dp1_zero1", _resumed(tmp, "old_dp2_zero1", "dp1_zero1")))
    out.update(run_distributed(_run_all, world_size=1, args=(runs,), init_deepspeed=True, timeout=900)[0])
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_resume_on_another_layout_continues_the_run(results, source, target):
    full, resumed = results[source], results[f"{source}->{target}"]
    assert resumed["iteration"] == 10 and len(resumed["lm_loss"]) == 4
    for step, (want, got) in enumerate(zip(full["lm_loss"][6:], resumed["lm_loss"]), start=7):
        assert abs(got - want) <= REL_TOL * abs(want), f"step {step}: {got} vs uninterrupted {want}"


def _l2e_at_step_10(save_dir):
    source = elastic.SourceCheckpoint(str(Path(save_dir) / "global_step10"))
    return source.merged_l2e(source.extra_states())


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_l2e_state_continues_across_layouts(results, source, target):
    """τ, counters and the full-width statistics at step 10 match the uninterrupted run's."""
    tmp = results["tmp"]
    want, got = _l2e_at_step_10(tmp / source / "full"), _l2e_at_step_10(tmp / f"{source}-to-{target}" / "full")
    assert got["iteration"] == want["iteration"] and got["layers"].keys() == want["layers"].keys() == {0, 1}
    for layer, w in want["layers"].items():
        g = got["layers"][layer]
        assert (g["n"], g["scored_steps"], g["warmup_samples"]) == (w["n"], w["scored_steps"], w["warmup_samples"])
        assert g["tau"] == pytest.approx(w["tau"], rel=1e-4)
        for key in ("mean", "M2"):
            torch.testing.assert_close(g[key], w[key], rtol=1e-4, atol=1e-6)


def test_checkpoint_without_recorded_layout_resumes_on_another(results):
    full, resumed = results["dp2_zero1"], results["old_dp2_zero1->dp1_zero1"]
    assert resumed["iteration"] == 10
    for want, got in zip(full["lm_loss"][6:], resumed["lm_loss"]):
        assert abs(got - want) <= REL_TOL * abs(want)


def test_resharded_checkpoint_resumes_on_its_layout(results):
    full, resumed = results["pp0"], results["resharded->tp2"]
    assert resumed["iteration"] == 10
    for want, got in zip(full["lm_loss"][6:], resumed["lm_loss"]):
        assert abs(got - want) <= REL_TOL * abs(want)


def _module(step_dir, tp_rank=0):
    return torch.load(Path(step_dir) / f"mp_rank_{tp_rank:02d}_model_states.pt", weights_only=False)["module"]


def test_reshard_round_trip_tp1_tp2_tp1_is_bit_exact(results, tmp_path):
    tmp = results["tmp"]
    _reshard_cli()(["--input", str(tmp / "resharded_tp2"), "--output", str(tmp_path / "back"), "--tp", "1",
                    "--pp", "0"])
    before, after = _module(tmp / "pp0" / "full" / "global_step6"), _module(tmp_path / "back" / "global_step6")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # to a pipeline and back through the reader: the same full tensors
    _reshard_cli()(["--input", str(tmp_path / "back"), "--output", str(tmp_path / "pp2"), "--tp", "1", "--pp", "2"])
    source, piped = (elastic.SourceCheckpoint(str(d / "global_step6")) for d in (tmp_path / "back", tmp_path / "pp2"))
    assert sorted(source.names()) == sorted(piped.names())
    for name in source.names():
        for what in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(source.full(name, what), piped.full(name, what)), (name, what)
    # the tp2 files really are shards: the row-parallel bias is halved, the qkv rows split
    shard = _module(tmp / "resharded_tp2" / "global_step6", 1)
    key = "sequential.2.attention.dense.bias"
    assert torch.equal(shard[key], before[key] / 2)
    assert shard["sequential.2.attention.query_key_value.weight"].shape[0] * 2 == \
        before["sequential.2.attention.query_key_value.weight"].shape[0]


def test_reshard_refuses_an_existing_output(results, capsys):
    tmp = results["tmp"]
    with pytest.raises(SystemExit) as e:
        _reshard_cli()(["--input", str(tmp / "pp0" / "full"), "--output", str(tmp / "tp2"), "--tp", "2", "--pp", "0"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_layout_of_a_checkpoint_without_one_is_inferred_from_its_files(results, tmp_path):
    for name in ("pp2", "dp2_zero1", "tp2"):
        step = results["tmp"] / name / "full" / "global_step6"
        recorded = elastic.saved_layout(str(step))
        _strip_layout(step.parent, tmp_path / name)
        inferred = elastic.saved_layout(str(tmp_path / name / "global_step6"))
        for key in ("dp", "tp", "pp", "zero_stage", "world_size", "train_batch_size", "precision"):
            assert inferred[key] == recorded[key], (name, key)
    # ZeRO-0 without recorded names: weights readable, the optimizer refused with the way out
    old, new = (elastic.SourceCheckpoint(str(d)) for d in (tmp_path / "tp2" / "global_step6", step))
    name = "2.attention.dense.bias"
    assert torch.equal(old.full(name), new.full(name)) and new.full(name, "exp_avg") is not None
    assert old.full(name, "exp_avg") is None and "no_load_optim: true" in old.no_optimizer_reason


def test_data_stream_continues_at_the_consumed_sample_after_a_batch_change():
    import types

    from megatron.data.data_utils import make_data_iterator

    class Numbered:  # item k is a row of k's
        def __len__(self):
            return 64

        def __getitem__(self, k):
            return {"text": torch.full((3,), k)}

    def first_items(it, n):
        return [int(k) for _ in range(n) for k in next(it)["text"][:, 0]]

    before = types.SimpleNamespace(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4)
    after = types.SimpleNamespace(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    # 6 steps of global batch 8 consumed items 0..47; continuing with batch 4 reads 48, 49, ...
    assert first_items(make_data_iterator(Numbered(), before, 0, 1, 6), 2) == [48, 49, 50, 51]
    assert first_items(make_data_iterator(Numbered(), after, 0, 1, 6, start_sample=48), 2) == [48, 49, 50, 51]
    assert first_items(make_data_iterator(Numbered(), after, 0, 1, 6), 1) == [24, 25]  # iteration x new batch
