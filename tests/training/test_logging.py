"""metrics.jsonl contents, averaging, resume truncation, console line, NeoX's FLOPs formula."""
import json
import math
import os
import time
import types
from pathlib import Path

import pytest

from megatron.training.logging import MetricsLogger, training_flops_per_iteration

GROUPS = types.SimpleNamespace(dp_size=2, tp_size=1, pp_size=1)


def make_args(tmp_path, **overrides):
    values = dict(log_dir=str(tmp_path / "logs"), use_wandb=False, tensorboard_dir=None,
                  wandb_project="neox", train_iters=30, log_interval=10,
                  train_batch_size=4, seq_length=8, num_layers=2, hidden_size=4,
                  padded_vocab_size=16, checkpoint_activations=False, peak_theoretical_tflops=None,
                  wall_clock_breakdown=False, wandb_init_all_ranks=False)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def read(tmp_path):
    return [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]


def step_metrics(loss, lr=1e-3):
    return {"train/lm_loss": loss, "train/learning_rate": lr, "train/loss_scale": 4096.0,
            "train/skipped_iters": 0, "train/nan_iters": 0, "train/l2e_loss": 0.01, "l2e/tau_mean": 0.3}


def test_flops_formula_matches_hand_computation():
    # B=2, s=8, L=2, h=4, V=16: 24·c·2·8·2·4² = 12288·c; × (1 + 8/24 + 16/128) = ×35/24 -> 17920·c
    args = make_args(Path("unused"), train_batch_size=2)
    assert training_flops_per_iteration(args) == pytest.approx(53760)
    args.checkpoint_activations = True
    assert training_flops_per_iteration(args) == pytest.approx(71680)


def test_log_step_averages_losses_and_adds_runtime_keys(tmp_path, capsys):
    args = make_args(tmp_path)
    logger = MetricsLogger(args, GROUPS)
    for it in range(1, 11):
        logger.log_step(it, step_metrics(float(it), lr=it * 1e-4))
    logger.log_eval(10, {"validation/lm_loss": 2.0})
    logger.close()
    train, val = read(tmp_path)
    assert train["iteration"] == 10
    assert train["train/lm_loss"] == pytest.approx(5.5)  # mean of 1..10
    assert train["train/learning_rate"] == pytest.approx(1e-3)  # latest value
    dt = train["runtime/iteration_time"]
    assert dt > 0 and train["runtime/steps_per_sec"] == pytest.approx(1 / dt)
    assert train["runtime/tokens_per_sec"] == pytest.approx(4 * 8 / dt)
    assert train["runtime/flops_per_sec_per_gpu"] == pytest.approx(training_flops_per_iteration(args) / (dt * 2))
    assert train["l2e/tau_mean"] == 0.3
    assert val["validation/lm_loss_ppl"] == pytest.approx(math.exp(2.0))
    out = capsys.readouterr().out
    assert "iteration       10/      30" in out and "lm_loss: 5.500000E+00" in out
    assert "l2e_loss: 1.000000E-02" in out and "loss scale: 4096.0" in out


def test_nan_losses_are_left_out_of_the_mean_and_all_nan_is_null(tmp_path):
    logger = MetricsLogger(make_args(tmp_path, log_interval=2), GROUPS)
    for it, loss in enumerate([1.0, float("nan"), float("nan"), float("inf")], start=1):
        logger.log_step(it, step_metrics(loss))
    assert [r["train/lm_loss"] for r in read(tmp_path)] == [1.0, None]


def test_resume_drops_lines_past_the_resumed_iteration(tmp_path):
    first = MetricsLogger(make_args(tmp_path, log_interval=1), GROUPS)
    for it in range(1, 8):
        first.log_step(it, step_metrics(float(it)))
    first.close()
    # Crashed after 7 but the last checkpoint was at 4: the resumed run logs 5.. again.
    resumed = MetricsLogger(make_args(tmp_path, log_interval=1), GROUPS)
    for it in (5, 6):
        resumed.log_step(it, step_metrics(-float(it)))
    assert [(r["iteration"], r["train/lm_loss"]) for r in read(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, -5.0), (6, -6.0)]


def test_tensorboard_receives_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    tb_dir = tmp_path / "tb"
    logger = MetricsLogger(make_args(tmp_path, tensorboard_dir=str(tb_dir), log_interval=1), GROUPS)
    logger.log_step(1, step_metrics(1.0))
    logger.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())


def test_rows_carry_timestamp_consumed_samples_tokens_eta_and_mfu(tmp_path, capsys):
    args = make_args(tmp_path, peak_theoretical_tflops=100.0)
    logger = MetricsLogger(args, GROUPS)
    before = time.time()
    for it in range(1, 21):
        logger.log_step(it, {**step_metrics(1.0), "train/grad_norm": 0.5})
    first, second = read(tmp_path)
    assert before <= first["timestamp"] <= second["timestamp"] <= time.time()
    assert (first["train/consumed_samples"], second["train/consumed_samples"]) == (40, 80)
    assert second["train/consumed_tokens"] == 80 * 8
    dt = second["runtime/iteration_time"]
    assert second["runtime/eta_seconds"] == pytest.approx(10 * dt)
    model_flops = training_flops_per_iteration(args, recompute=False)
    assert second["runtime/mfu"] == pytest.approx(model_flops / (dt * 2 * 100e12))
    out = capsys.readouterr().out
    assert "consumed samples: 80" in out and "ETA: 0:00:00" in out and "grad norm: 0.500" in out
    assert "MFU: " in out and "tokens: 640" in out


def test_wall_clock_breakdown_goes_to_the_log_line_not_every_micro_step(tmp_path, capsys):
    from deepspeed.utils.timer import SynchronizedWallClockTimer

    engine = types.SimpleNamespace(timers=SynchronizedWallClockTimer())
    logger = MetricsLogger(make_args(tmp_path, wall_clock_breakdown=True, log_interval=2), GROUPS, engine=engine)
    for it in (1, 2):
        for _ in range(3):  # micro-batches: DeepSpeed calls timers.log after each
            engine.timers("fwd_microstep").start()
            time.sleep(0.002)
            engine.timers("fwd_microstep").stop()
            engine.timers.log(["fwd_microstep"])
        logger.log_step(it, step_metrics(1.0))
    (row,) = read(tmp_path)
    assert row["timers/fwd_microstep"] >= 3 * 2.0  # ms per step: three micro-batches of 2 ms
    out = capsys.readouterr().out
    assert "time (ms)" not in out and out.count("fwd_microstep") == 1


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged = kwargs, []
        self.id = kwargs.get("id") or "fresh-run-id"
        self.config = types.SimpleNamespace(update=lambda d, allow_val_change: self.logged.append(("config", d)))

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        pass


def test_wandb_gets_host_team_group_name_and_the_run_summary(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: _FakeRun(**kwargs))
    args = make_args(tmp_path, use_wandb=True, wandb_host="https://wandb.example.org",
                     wandb_team="lab", wandb_group="sweep", wandb_run_name="l2e-70m",
                     to_dict=lambda derived=False: {"num_layers": 2, "lr": 1e-3} if derived else {})
    logger = MetricsLogger(args, GROUPS)
    logger.record_config({"batch": {"global_batch": 4}}, "batch: ...")
    logger.log_step(10, step_metrics(1.0))
    run = logger.wandb
    assert os.environ["WANDB_BASE_URL"] == "https://wandb.example.org"
    assert (run.kwargs["entity"], run.kwargs["group"], run.kwargs["name"]) == ("lab", "sweep", "l2e-70m")
    assert run.kwargs["config"]["lr"] == 1e-3  # derived values too
    assert ("config", {"run_summary": {"batch": {"global_batch": 4}}}) in run.logged
    assert any(step == 10 for step, _ in run.logged)


class _Clock:
    """A perf_counter the test advances: step times without sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_step_time_and_eta_count_training_steps_only(tmp_path, capsys, monkeypatch):
    """Eval and save inside an interval are left out of ms/iteration and the ETA (and shown
    beside them); the ETA follows a moving average, not the last interval alone."""
    from megatron.training import logging as metrics_logging

    clock = _Clock()
    monkeypatch.setattr(metrics_logging.time, "perf_counter", clock)
    logger = MetricsLogger(make_args(tmp_path, train_iters=40), GROUPS)
    for it in range(1, 21):
        clock.now += 1.0  # a 1 s training step
        logger.log_step(it, step_metrics(1.0))
        if it == 10:
            with logger.outside_training("eval"):
                clock.now += 100.0
            with logger.outside_training("save"):
                clock.now += 50.0
    for it in range(21, 31):
        clock.now += 4.0  # the machine got busy
        logger.log_step(it, step_metrics(1.0))
    logger.close()
    first, second, third = read(tmp_path)
    assert first["runtime/iteration_time"] == pytest.approx(1.0)
    assert second["runtime/iteration_time"] == pytest.approx(1.0)  # not (10 + 150) / 10
    assert (second["runtime/eval_seconds"], second["runtime/save_seconds"]) == (100.0, 50.0)
    assert second["runtime/eta_seconds"] == pytest.approx(20 * 1.0)
    assert third["runtime/iteration_time"] == pytest.approx((10 + 10 + 40) / 30)  # the window's mean
    assert third["runtime/eta_seconds"] == pytest.approx(10 * 2.0)
    assert "eval_seconds" not in third
    out = capsys.readouterr().out.splitlines()
    assert "not in the step time (s): eval 100.0, save 50.0" in out[1]
    assert "elapsed time per iteration (ms): 1000.0" in out[1] and "not in the step time" not in out[2]
    assert logger.training_seconds == pytest.approx(60.0)
    assert logger.outside_totals == {"eval": 100.0, "save": 50.0}


def test_console_line_shows_tau_and_selected_fraction_per_layer(tmp_path, capsys):
    logger = MetricsLogger(make_args(tmp_path, log_interval=1), GROUPS)
    logger.log_step(1, {**step_metrics(1.0), "l2e/tau/layer_12": 7.25, "l2e/selected_frac/layer_12": 0.0203,
                        "l2e/tau/layer_2": 1.5, "l2e/selected_frac/layer_2": 0.0197})
    logger.close()
    out = capsys.readouterr().out
    assert "layer 2 tau: 1.5 selected: 1.97% | layer 12 tau: 7.25 selected: 2.03%" in out


def test_tensorboard_resume_continues_the_step_axis(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tb"
    args = make_args(tmp_path, tensorboard_dir=str(tb_dir), log_interval=1)
    first = MetricsLogger(args, GROUPS)
    for it in (1, 2, 3):  # interrupted after step 3, last checkpoint at step 1
        first.log_step(it, step_metrics(float(it)))
    first.close()
    resumed = MetricsLogger(args, GROUPS, start_iteration=1)
    for it in (2, 3, 4):
        resumed.log_step(it, step_metrics(10.0 * it))
    resumed.close()
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    scalars = events.Scalars("train/lm_loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == [1.0, 20.0, 30.0, 40.0]


def test_wandb_resume_continues_the_checkpoints_run(tmp_path, monkeypatch):
    """The run id goes into the run summary; a logger started from a checkpoint whose
    summary names it reopens that run in its group."""
    wandb = pytest.importorskip("wandb")
    import yaml

    from megatron.training.summary import closing_summary

    monkeypatch.setattr(wandb, "init", lambda **kwargs: _FakeRun(**kwargs))
    args = make_args(tmp_path, use_wandb=True, wandb_host="https://wandb.example.org", wandb_team=None,
                     wandb_group="seeds", wandb_run_name=None, to_dict=lambda derived=False: {})
    fresh = MetricsLogger(args, GROUPS)
    assert "id" not in fresh.wandb.kwargs and fresh.wandb_run_id == "fresh-run-id"
    checkpoint = tmp_path / "ckpt" / "global_step10"
    (checkpoint / "configs").mkdir(parents=True)
    (checkpoint / "configs" / "run_summary.yml").write_text(
        yaml.safe_dump({"outputs": {"wandb_run_id": fresh.wandb_run_id}}))
    resumed = MetricsLogger(args, GROUPS, start_iteration=10, checkpoint_dir=str(checkpoint))
    kwargs = resumed.wandb.kwargs
    assert (kwargs["id"], kwargs["resume"], kwargs["group"]) == ("fresh-run-id", "allow", "seeds")
    args.save = str(tmp_path / "ckpt")
    assert closing_summary(args, resumed, 10, 10, 1.0, None)["wandb_run_id"] == "fresh-run-id"


@pytest.mark.parametrize("rank", [0, 1])
def test_other_ranks_print_only_their_own_problems(rank, capsys):
    import logging

    from megatron.console import THIS_RANK, route_console_output

    handler = route_console_output(rank)
    log = logging.getLogger("megatron.test_console")
    try:
        log.warning("accepted, no effect here: shared config warning")
        log.warning("this rank's own disk is short", extra=THIS_RANK)
        log.error("this rank failed")
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    prefix = "" if rank == 0 else "[rank 1] "
    assert ("shared config warning" in err) == (rank == 0)
    assert f"{prefix}this rank's own disk is short" in err and f"{prefix}this rank failed" in err
