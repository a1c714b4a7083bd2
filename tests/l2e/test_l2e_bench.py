"""tools/bench/l2e_overhead.py runs end to end on a very small problem."""
import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench", "l2e_overhead.py")


def _tool():
    spec = importlib.util.spec_from_file_location("l2e_overhead", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_variant():
    r = _tool().benchmark("tiny", reps=2, steps=1, batch=1, seq=16)
    assert set(r["median_step_s"]) == {"plain", "l2e", "topk"}
    assert all(t > 0 for t in r["min_step_s"].values())
    assert all(0 < f < 1 for f in r["l2e_time_frac"].values())


def test_bad_arguments_are_user_errors():
    with pytest.raises(SystemExit) as e:
        _tool().main(["--reps", "0"])
    assert e.value.code == 2
