"""Fixtures of the checkpoint tests (helpers live in ckpt_testlib.py)."""
import pytest

from ckpt_testlib import _load_tool, make_hf_dir


@pytest.fixture(scope="session")
def hf_to_neox():
    return _load_tool("convert_hf_to_neox").main


@pytest.fixture(scope="session")
def neox_to_hf():
    return _load_tool("convert_neox_to_hf").main


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """Sequential residual + tanh GELU: non-default flags, so config loss would show."""
    return make_hf_dir(tmp_path_factory.mktemp("hf"), use_parallel_residual=False, hidden_act="gelu_pytorch_tanh")
