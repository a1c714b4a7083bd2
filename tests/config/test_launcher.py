"""deepy.py: the DeepSpeed command it builds, and real CPU launches."""
import json
import os
import subprocess
import sys

import pytest

from megatron.config import ConfigError, NeoXArgs
from megatron.config.launch_args import consume
from megatron.launcher import build_launch_command, count_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(HERE, "fixtures", "tiny.yml")
RANK_SCRIPT = os.path.join(HERE, "fixtures", "rank_script.py")


def tiny(**overrides):
    return NeoXArgs.from_ymls([TINY], overrides=overrides)


def runner_options(cmd):
    """The part of the command before the user script."""
    return cmd[: cmd.index("train.py")]


def test_defaults_pass_no_runner_options():
    cmd = build_launch_command(tiny(), "train.py", ["--x"])
    assert runner_options(cmd) == []
    assert cmd[1:3] == ["--x", "--neox_config"]
    assert NeoXArgs.from_launch_argument(cmd[3]) == tiny()


def test_a_rank_launched_by_deepy_does_not_repeat_the_launchers_config_warnings(caplog, monkeypatch):
    from megatron.config import neox_args

    monkeypatch.setattr(neox_args, "_warned_no_ops", set())  # as in a fresh launcher process
    cmd = build_launch_command(tiny(rope_fusion=True), "train.py")
    assert [r.getMessage() for r in caplog.records if "rope_fusion" in r.getMessage()]  # the launcher's
    monkeypatch.setattr(neox_args, "_warned_no_ops", set())  # as in a fresh rank process
    caplog.clear()
    assert NeoXArgs.from_launch_argument(cmd[cmd.index("--neox_config") + 1]).rope_fusion
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]


def test_hostfile_include_and_ports(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    args = tiny(hostfile=str(hostfile), include="node1:0,1@node2:0,1", num_gpus=4,
                master_port=1234, master_addr="10.0.0.1")
    opts = runner_options(build_launch_command(args, "train.py"))
    assert opts == ["--hostfile", str(hostfile), "--include", "node1:0,1@node2:0,1",
                    "--master_port", "1234", "--master_addr", "10.0.0.1"]  # num_gpus dropped
    assert count_ranks(args, local_devices=0) == 4


def test_hostfile_num_nodes_and_num_gpus_count_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\nnode1 slots=8\nnode2 slots=8\nnode3 slots=8\n")
    args = tiny(hostfile=str(hostfile), num_nodes=2, num_gpus=4, exclude=None)
    assert runner_options(build_launch_command(args, "train.py")) == [
        "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "4"]
    assert count_ranks(args, local_devices=0) == 8
    assert count_ranks(tiny(hostfile=str(hostfile), exclude="node3"), 0) == 16


def test_bad_hostfile_is_a_config_error(tmp_path):
    bad = tmp_path / "hostfile"
    bad.write_text("node1 gpus=8\n")
    with pytest.raises(ConfigError, match="hostfile"):
        count_ranks(tiny(hostfile=str(bad)), 0)
    with pytest.raises(ConfigError, match="does not exist"):
        count_ranks(tiny(hostfile=str(tmp_path / "missing")), 0)


@pytest.mark.parametrize("launcher", ["openmpi", "mvapich"])
def test_mpi_launchers_force_multi(launcher):
    opts = runner_options(build_launch_command(tiny(launcher=launcher), "train.py"))
    assert opts == ["--launcher", launcher, "--force_multi"]


def test_deepspeed_runner_accepts_the_command(tmp_path):
    from deepspeed.launcher.runner import parse_args

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\n")
    args = tiny(hostfile=str(hostfile), launcher="mvapich", master_port=1234)
    parsed = parse_args(build_launch_command(args, "train.py", ["--flag"]))
    assert parsed.user_script == "train.py" and parsed.launcher == "mvapich"
    assert parsed.force_multi and parsed.master_port == 1234
    assert parsed.user_args[:2] == ["--flag", "--neox_config"]


def test_consume_accepts_yaml_paths_or_encoded_config(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_yaml = consume([TINY, "--iteration", "3"])
    assert from_yaml.iteration == 3 and from_yaml.data_parallel_size == 2
    encoded = build_launch_command(from_yaml, "train.py")[-1]
    from_b64 = consume(["--local_rank=1", "--neox_config", encoded])
    assert from_b64 == from_yaml and from_b64.config_files["tiny.yml"].startswith("# A tiny")
    with pytest.raises(ConfigError, match="neox_config"):
        consume(["--neox_config", "not-base64!"])


def test_override_sets_keys_over_the_files(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = consume([TINY, "--override", "train_iters=14300",
                                       "hidden-dropout=0.2"])
    assert args.train_iters == 14300 and args.hidden_dropout == 0.2
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        consume([TINY, "--override", "train_iters"])


def _deepy(tmp_path, *configs):
    out = tmp_path / "out.json"
    env = dict(os.environ, RANK_SCRIPT_OUT=str(out), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "deepy.py"), RANK_SCRIPT,
                           *configs], env=env, capture_output=True, text=True, timeout=240)
    return proc, out


def test_cli_config_error_exits_2(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("num_layer: 2\n")
    proc, _ = _deepy(tmp_path, str(bad))
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "did you mean 'num_layers'" in proc.stderr


def test_single_cpu_rank_runs_in_process(tmp_path, monkeypatch):
    import torch

    from megatron.launcher import main

    out = tmp_path / "out.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on GPU CI
    monkeypatch.setenv("RANK_SCRIPT_OUT", str(out))
    saved = list(sys.argv), list(sys.path), dict(os.environ)
    try:
        assert main([RANK_SCRIPT, TINY]) == 0
    finally:
        sys.argv, sys.path = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
    result = json.loads(out.read_text())
    assert result == {"same_config": True, "world": 1, "world_size_arg": 1, "num_layers": 2,
                      "l2e_layers": [0, 1], "config_files": ["tiny.yml"]}


def test_two_cpu_ranks_get_identical_config(tmp_path):
    two = tmp_path / "two_ranks.yml"
    two.write_text('{"num_gpus": 2}\n')
    proc, out = _deepy(tmp_path, TINY, str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_config"] and result["world"] == 2 and result["world_size_arg"] == 2
    assert result["config_files"] == ["tiny.yml", "two_ranks.yml"]
