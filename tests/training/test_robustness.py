"""NaN guard and preemption signal handling."""
import math
import os
import signal
import types

import pytest

from megatron.errors import UserError
from megatron.training.robustness import NonFiniteLossGuard, PreemptionHandler, TrainingError
from distributed import run_distributed
from test_resume import TINY, tiny_overrides

NAN = float("nan")


def test_guard_raises_after_tolerance_consecutive_nonfinite_steps(caplog):
    guard = NonFiniteLossGuard(types.SimpleNamespace(nan_tolerance=3))
    guard.last_checkpoint = "/ckpts/global_step1"
    for it, loss in enumerate([1.0, NAN, NAN, 2.0, NAN, float("inf")], start=1):
        guard.check(it, loss, skipped=not math.isfinite(loss))  # a finite step resets the run
    assert "iteration 2" in caplog.text
    with pytest.raises(TrainingError, match="iteration 7; the last good checkpoint is /ckpts/global_step1") as err:
        guard.check(7, 1.0, skipped=True, nonfinite=True)  # finite loss, NaN gradients
    assert isinstance(err.value, UserError)
    assert guard.metrics() == {"train/skipped_iters": 5, "train/nan_iters": 5}


def test_guard_counts_fp16_overflow_skips_without_raising():
    guard = NonFiniteLossGuard(types.SimpleNamespace(nan_tolerance=2))
    for it in range(1, 6):
        guard.check(it, 3.0, skipped=True)  # the loss scaler's routine overflow skip
    assert guard.metrics() == {"train/skipped_iters": 5, "train/nan_iters": 0}


def test_sigterm_sigint_and_sigusr1_set_the_flag_and_close_restores():
    previous = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        handler = PreemptionHandler()
        assert not handler.requested()
        os.kill(os.getpid(), sig)
        assert handler.requested()
        handler.close()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_second_sigint_stops_at_once():
    handler = PreemptionHandler()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.close()


def _one_rank_signalled(rank, world_size):
    handler = PreemptionHandler()
    before = handler.requested()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return before, handler.requested()


def test_all_ranks_agree_when_one_rank_is_signalled():
    assert run_distributed(_one_rank_signalled, world_size=2) == [(False, True), (False, True)]


def _pretrain_signalled_at_step_3(rank, world_size, overrides):
    from megatron.config import NeoXArgs
    from megatron.training import logging as metrics_logging
    from megatron.training import pretrain

    log_step = metrics_logging.MetricsLogger.log_step

    def log_step_then_signal(self, iteration, metrics):
        log_step(self, iteration, metrics)
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what slurm/k8s send before preempting

    metrics_logging.MetricsLogger.log_step = log_step_then_signal
    return pretrain(NeoXArgs.from_ymls([TINY], overrides=overrides))


def test_sigterm_during_training_saves_and_stops(tmp_path):
    overrides = tiny_overrides(tmp_path, train_iters=50, lr_decay_iters=50, checkpoint_factor=100)
    (result,) = run_distributed(_pretrain_signalled_at_step_3, world_size=1, args=(overrides,),
                                init_deepspeed=True)
    assert result["iteration"] == 3
    assert (tmp_path / "full" / "latest").read_text() == "global_step3"
