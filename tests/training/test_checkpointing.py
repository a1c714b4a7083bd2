"""Atomic save / exact load of checkpoints, on a tiny in-process DeepSpeed engine."""
import errno
import json
import multiprocessing
import os
import random
import types

import numpy as np
import pytest
import torch

from megatron.errors import CheckpointError
from megatron import checkpoint as ckpt
from megatron.checkpoint import rng
from distributed import free_port


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    dist.destroy_process_group()


def make_args(tmp_path, **overrides):
    values = dict(
        save=str(tmp_path / "ckpt") if tmp_path else None, load=None, iteration=None, finetune=False,
        no_load_optim=False, no_load_rng=False,
        checkpoint_factor=5, checkpoint_scale="linear", extra_save_iters=[0, 1, 2, 4],
        keep_last_n_checkpoints=None,
        config_files={"tiny.yml": "num_layers: 2\n"},
        num_layers=2, hidden_size=8, num_attention_heads=2, max_position_embeddings=16,
        make_vocab_size_divisible_by=8, padded_vocab_size=16, tokenizer_type="CharLevel",
        model_parallel_size=1,
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


class FakeL2E:
    """Holds state the way megatron.l2e.L2E does: tensors and plain numbers."""

    def __init__(self):
        self.tau = torch.zeros(3)
        self.steps = 0

    def state_dict(self):
        return {"tau": self.tau.clone(), "steps": self.steps}

    def load_state_dict(self, sd):
        self.tau, self.steps = sd["tau"].clone(), sd["steps"]


def make_engine(seed=0, zero_stage=0):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    config = {
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def train_step(engine):
    x = torch.randn(2, 4)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def params(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def test_should_save_follows_factor_and_extra_iters(tmp_path):
    args = make_args(tmp_path)
    assert [i for i in range(12) if ckpt.should_save(args, i)] == [0, 1, 2, 4, 5, 10]
    args.checkpoint_scale, args.checkpoint_factor, args.extra_save_iters = "log", 3, None
    assert [i for i in range(100) if ckpt.should_save(args, i)] == [1, 3, 9, 27, 81]
    args.save = None
    assert not ckpt.should_save(args, 5)


def test_save_load_roundtrip_restores_weights_optimizer_rng_and_l2e(tmp_path):
    args = make_args(tmp_path)
    engine, l2e = make_engine(), FakeL2E()
    train_step(engine)
    l2e.tau, l2e.steps = torch.tensor([0.1, 0.2, 0.3]), 7
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    ckpt.save_checkpoint(args, 1, engine, None, l2e)
    expected_next = (random.random(), np.random.rand(), torch.rand(1))
    continued = [train_step(engine) for _ in range(2)]

    saved = tmp_path / "ckpt"
    assert (saved / "latest").read_text() == "global_step1"
    assert (saved / "global_step1" / "configs" / "tiny.yml").read_text() == "num_layers: 2\n"
    assert not any(name.endswith(".tmp") for name in os.listdir(saved))

    args.load = args.save
    fresh, fresh_l2e = make_engine(seed=1), FakeL2E()
    assert ckpt.load_checkpoint(args, fresh, None, fresh_l2e) == 1
    assert fresh_l2e.steps == 7 and torch.equal(fresh_l2e.tau, torch.tensor([0.1, 0.2, 0.3]))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_next
    # Same RNG, weights and optimizer state: the continuation is bit-identical.
    assert [train_step(fresh) for _ in range(2)] == continued


@pytest.mark.gpu
def test_cuda_rng_state_roundtrips_through_weights_only_file(tmp_path):
    state = rng.rng_state()
    expected = torch.rand(4, device="cuda")
    torch.save(state, tmp_path / "rng.pt")
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_extra_state_loads_with_weights_only(tmp_path):
    args = make_args(tmp_path)
    l2e = FakeL2E()
    l2e.steps = {np.int64(1): np.float64(0.5)}  # numpy scalars, even as keys, must not break loading
    ckpt.save_checkpoint(args, 3, make_engine(), None, l2e)
    extra = torch.load(tmp_path / "ckpt" / "global_step3" / "rank_00000_extra_state.pt", weights_only=True)
    assert extra["iteration"] == 3 and set(extra["rng"]) >= {"python", "numpy", "torch"}
    assert extra["l2e"]["steps"] == {1: 0.5}
    ds_state = torch.load(tmp_path / "ckpt" / "global_step3" / "mp_rank_00_model_states.pt", weights_only=True)
    assert ds_state["iteration"] == 3 and ds_state["args"]["num_layers"] == 2


def test_keep_last_n_prunes_oldest(tmp_path):
    args = make_args(tmp_path, keep_last_n_checkpoints=2)
    engine = make_engine()
    for it in (1, 2, 3, 4):
        ckpt.save_checkpoint(args, it, engine, None)
    assert [t for _, t in ckpt.list_checkpoints(args.save)] == ["global_step3", "global_step4"]


def test_resave_same_tag_replaces_it(tmp_path):
    args = make_args(tmp_path)
    engine = make_engine()
    ckpt.save_checkpoint(args, 2, engine, None)
    train_step(engine)
    ckpt.save_checkpoint(args, 2, engine, None)
    args.load = args.save
    fresh = make_engine(seed=3)
    ckpt.load_checkpoint(args, fresh, None)
    assert all(torch.equal(a, b) for a, b in zip(params(fresh), params(engine)))
    assert sorted(os.listdir(args.save)) == ["global_step2", "latest"]


def test_load_errors_are_clear(tmp_path):
    args = make_args(tmp_path, load=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(args, None, None)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "global_step3").mkdir()
    args.load = str(tmp_path / "stray")
    with pytest.raises(CheckpointError, match="no 'latest'"):
        ckpt.load_checkpoint(args, None, None)
    args.iteration = 9
    with pytest.raises(CheckpointError, match="global_step9 does not exist"):
        ckpt.load_checkpoint(args, None, None)


def test_fresh_run_with_save_equal_load_starts_at_zero(tmp_path):
    args = make_args(tmp_path)
    args.load = args.save
    assert ckpt.load_checkpoint(args, None, None) == 0
    args.load = None
    assert ckpt.load_checkpoint(args, None, None) == 0


def _rewrite_meta(step_dir, **changes):
    """Edit mp_rank_00_model_states.pt as another tool would have written it."""
    path = step_dir / "mp_rank_00_model_states.pt"
    meta = torch.load(path, weights_only=False)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    torch.save(meta, path)
    (step_dir / "checksums.json").unlink(missing_ok=True)


def _optimizer_moments(engine):
    return [s["exp_avg"].clone() for s in engine.optimizer.state_dict()["state"].values()]


def _saved_at_4(tmp_path, zero_stage=0, **arg_overrides):
    args = make_args(tmp_path, **arg_overrides)
    engine = make_engine(zero_stage=zero_stage)
    train_step(engine)
    ckpt.save_checkpoint(args, 4, engine, None)
    args.load = args.save
    return args, engine, tmp_path / "ckpt" / "global_step4"


def test_missing_extra_state_is_an_error_not_a_restart(tmp_path):
    args, _, step = _saved_at_4(tmp_path)
    (step / "rank_00000_extra_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank_00000_extra_state.pt is missing; restore the file"):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)
    args.checkpoint_verify = False  # without the manifest the load itself names the file and the way out
    with pytest.raises(CheckpointError, match=r"rank_00000_extra_state.pt is missing.*no_load_rng: true"):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)
    args.no_load_rng = True  # the documented way on: weights, optimizer and iteration, fresh RNG
    fresh = make_engine(seed=5)
    assert ckpt.load_checkpoint(args, fresh, None) == 4


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_neox_native_checkpoint_continues_with_its_optimizer(tmp_path, zero_stage):
    args, engine, step = _saved_at_4(tmp_path, zero_stage=zero_stage)
    (step / "rank_00000_extra_state.pt").unlink()
    _rewrite_meta(step, neox_l2e_saved=None)  # NeoX writes no extra state and no marker
    fresh = make_engine(seed=5, zero_stage=zero_stage)
    assert ckpt.load_checkpoint(args, fresh, None) == 4
    assert all(torch.equal(a, b) for a, b in zip(params(fresh), params(engine)))
    if zero_stage == 0:
        assert all(torch.equal(a, b) for a, b in zip(_optimizer_moments(fresh), _optimizer_moments(engine)))


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_weights_only_checkpoint_continues_at_its_iteration(tmp_path, zero_stage):
    args, engine, step = _saved_at_4(tmp_path, zero_stage=zero_stage)
    (step / "rank_00000_extra_state.pt").unlink()
    for shard in step.glob("*_optim_states.pt"):
        shard.unlink()
    _rewrite_meta(step, neox_l2e_saved=None, optimizer=None, lr_scheduler=None)
    fresh = make_engine(seed=5, zero_stage=zero_stage)
    assert ckpt.load_checkpoint(args, fresh, None) == 4  # a converter's --iteration 4 continues at 5
    loaded = params(fresh)
    assert all(torch.equal(a, b) for a, b in zip(loaded, params(engine)))
    # The optimizer's own fp32 copy was refreshed: a step moves from the loaded weights.
    train_step(fresh)
    assert max((a - b).abs().max().item() for a, b in zip(params(fresh), loaded)) < 0.05
    args.finetune = True
    assert ckpt.load_checkpoint(args, make_engine(seed=6, zero_stage=zero_stage), None) == 0


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_no_save_optim_and_rng_are_honoured(tmp_path, capsys, zero_stage):
    args, engine, step = _saved_at_4(tmp_path, zero_stage=zero_stage, no_save_optim=True, no_save_rng=True)
    meta = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    assert meta["optimizer"] is None and meta["neox_l2e_saved"] == {"optimizer": False, "rng": False}
    assert not list(step.glob("*_optim_states.pt")) and engine.save_zero_checkpoint == (zero_stage > 0)
    assert torch.load(step / "rank_00000_extra_state.pt", weights_only=True)["rng"] is None
    fresh = make_engine(seed=5, zero_stage=zero_stage)
    assert ckpt.load_checkpoint(args, fresh, None) == 4
    assert all(torch.equal(a, b) for a, b in zip(params(fresh), params(engine)))
    if zero_stage == 0:
        assert not fresh.optimizer.state_dict()["state"]  # moments start at zero
    line = capsys.readouterr().out.splitlines()[-1]
    assert "weights ✓" in line and "optimizer ✗ (fresh: not in the checkpoint)" in line
    assert "rng ✗ (not saved)" in line and "data at sample 8" in line


def test_checksums_cover_every_file(tmp_path):
    _, _, step = _saved_at_4(tmp_path)
    manifest = json.loads((step / "checksums.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == ["configs/tiny.yml", "mp_rank_00_model_states.pt",
                                         "rank_00000_extra_state.pt"]


def _flip_byte_inside(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,verify,message", [
    (_truncate, True, r"mp_rank_00_model_states.pt does not match its checksum"),
    (_truncate, False, r"mp_rank_00_model_states.pt is truncated"),
    (_flip_byte_inside, True, r"mp_rank_00_model_states.pt does not match its checksum.*checkpoint_verify: false"),
    (lambda p: p.write_bytes(b"not a checkpoint"), False, r"mp_rank_00_model_states.pt is not a torch checkpoint"),
])
def test_damaged_file_is_named(tmp_path, damage, verify, message):
    args, _, step = _saved_at_4(tmp_path, checkpoint_verify=verify)
    damage(step / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)


def test_other_model_shape_names_the_dimension(tmp_path):
    args, _, _ = _saved_at_4(tmp_path)
    args.hidden_size = 16
    with pytest.raises(CheckpointError, match=r"hidden_size=8, the config asks for 16"):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)


# --- crash during save --------------------------------------------------------------

class Crash(BaseException):
    """Stands for the process dying: nothing in the save path may catch it."""


def _die_on_nth_call(monkeypatch, module, name, nth, die):
    original, calls = getattr(module, name), [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            die()
        return original(*a, **k)

    monkeypatch.setattr(module, name, dying)


def _assert_step1_survives_and_next_save_cleans_up(args, saved_params, engine):
    assert (open(os.path.join(args.save, "latest")).read()) == "global_step1"
    args.load = args.save
    fresh = make_engine(seed=9)
    assert ckpt.load_checkpoint(args, fresh, None) == 1
    assert all(torch.equal(a, b) for a, b in zip(params(fresh), saved_params))
    ckpt.save_checkpoint(args, 2, engine, None)
    assert not any(n.endswith(".tmp") for n in os.listdir(args.save))
    assert open(os.path.join(args.save, "latest")).read() == "global_step2"


def _raise_crash():
    raise Crash


@pytest.mark.parametrize("target,nth", [
    ((torch, "save"), 1),      # inside DeepSpeed's model_states write
    ((torch, "save"), 2),      # our extra state
    ((os, "rename"), 1),       # publishing the tag
    ((os, "replace"), 1),      # writing `latest`
])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, target, nth):
    args = make_args(tmp_path)
    engine = make_engine()
    ckpt.save_checkpoint(args, 1, engine, None)
    saved_params = params(engine)
    train_step(engine)
    with monkeypatch.context() as patch:
        _die_on_nth_call(patch, *target, nth, _raise_crash)
        with pytest.raises(Crash):
            ckpt.save_checkpoint(args, 2, engine, None)
    _assert_step1_survives_and_next_save_cleans_up(args, saved_params, engine)


def test_interrupted_resave_of_latest_tag_recovers_the_parked_copy(tmp_path, monkeypatch):
    args = make_args(tmp_path)
    engine = make_engine()
    ckpt.save_checkpoint(args, 1, engine, None)
    saved_params = params(engine)
    train_step(engine)
    with monkeypatch.context() as patch:
        # rename #1 parks the old global_step1, rename #2 would move the new one in
        _die_on_nth_call(patch, os, "rename", 2, _raise_crash)
        with pytest.raises(Crash):
            ckpt.save_checkpoint(args, 1, engine, None)
    assert not os.path.exists(os.path.join(args.save, "global_step1"))
    _assert_step1_survives_and_next_save_cleans_up(args, saved_params, engine)


def _save_then_die_in_second_save(save_dir):
    """Child process: save step 1, then os._exit while DeepSpeed writes step 2."""
    from _pytest.monkeypatch import MonkeyPatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    args = make_args(None, save=save_dir)
    engine = make_engine()
    ckpt.save_checkpoint(args, 1, engine, None)
    torch.save([p.detach() for p in engine.module.parameters()], os.path.join(save_dir, "params_at_1.pt"))
    train_step(engine)
    _die_on_nth_call(MonkeyPatch(), torch, "save", 1, lambda: os._exit(17))
    ckpt.save_checkpoint(args, 2, engine, None)


def test_process_killed_during_save_keeps_previous_checkpoint(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    child = multiprocessing.get_context("spawn").Process(target=_save_then_die_in_second_save, args=(save_dir,))
    child.start()
    child.join(300)
    assert child.exitcode == 17
    assert os.path.isdir(os.path.join(save_dir, "global_step2.tmp"))  # it died mid-save
    saved_params = torch.load(os.path.join(save_dir, "params_at_1.pt"), weights_only=True)
    _assert_step1_survives_and_next_save_cleans_up(make_args(tmp_path), saved_params, make_engine())


# ---------------------------------------------------------------------------
# A full disk at save: one line naming the directory and the space needed, no .tmp left.


def _disk_full_after(monkeypatch, writes: int, error):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > writes:
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   # what torch.save itself raises on a full disk
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")])
def test_disk_full_at_save_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch, error):
    args = make_args(tmp_path)
    engine = make_engine()
    train_step(engine)
    ckpt.save_checkpoint(args, 1, engine, None)
    train_step(engine)
    _disk_full_after(monkeypatch, 1, error)  # the model states fit, the next file does not
    with pytest.raises(CheckpointError) as err:
        ckpt.save_checkpoint(args, 2, engine, None)
    message = str(err.value)
    assert "\n" not in message and f"disk full writing global_step2 to {args.save}" in message
    assert "a checkpoint needs about" in message and "global_step1 is intact" in message
    saved = tmp_path / "ckpt"
    assert sorted(os.listdir(saved)) == ["global_step1", "latest"]
    assert (saved / "latest").read_text() == "global_step1"


def test_other_parallel_layout_is_named(tmp_path):
    args, _, step = _saved_at_4(tmp_path)
    # As a 2-rank data-parallel save records it (the client-state `layout` dict).
    _rewrite_meta(step, layout={"tp": 1, "pp": 0, "dp": 2, "zero_stage": 0, "world_size": 2})
    with pytest.raises(CheckpointError, match=r"another parallel layout \(dp 2->1, world_size 2->1\).*finetune"):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)
    # Without the dict, the layout is read from the files: DeepSpeed's mp/dp sizes.
    _rewrite_meta(step, layout=None, mp_world_size=2)
    with pytest.raises(CheckpointError, match=r"another parallel layout \(tp 2->1\)"):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)


def test_requeued_job_does_not_retrain_over_its_newer_checkpoints(tmp_path):
    args, engine, _ = _saved_at_4(tmp_path)  # the starting point, e.g. a converted step 4
    args.save = str(tmp_path / "run")
    ckpt.save_checkpoint(args, 6, engine, None)  # the run got to step 6 before being requeued
    with pytest.raises(CheckpointError, match=r"already holds global_step6, newer than step 4.*set load: .*run"):
        ckpt.load_checkpoint(args, make_engine(seed=5), None)
    args.load = args.save
    assert ckpt.load_checkpoint(args, make_engine(seed=5), None) == 6
