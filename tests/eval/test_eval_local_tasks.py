"""eval.py as a user runs it: our local Austen tasks (configs/eval_tasks), results named
after run, step and tasks, stderr by default, deepy's --include_path, and a Hub task
without network failing in one line."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "configs" / "eval_tasks"
TOKENIZER = ROOT / "data" / "tokenizers" / "austen_bpe4k.json"
STEP = 7


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/austen/checkpoints/global_step7: a random tiny model whose saved config names
    the Austen tokenizer, and a run config (model keys + load) for deepy."""
    from megatron.checkpoint.layout import neox_model_yaml, save_neox_checkpoint
    from megatron.model import GPTNeoX, ModelConfig, init_weights

    root = tmp_path_factory.mktemp("runs") / "austen"
    cfg = ModelConfig(vocab_size=4096, hidden_size=32, num_layers=2, num_heads=4,
                      max_position_embeddings=64, rotary_pct=0.25, init_std=0.3)
    model = GPTNeoX(cfg)
    init_weights(model, cfg, generator=torch.Generator().manual_seed(0))
    model_yaml = neox_model_yaml(cfg, pp=0, tokenizer_type="HFTokenizer", vocab_file=str(TOKENIZER))
    checkpoints = root / "checkpoints"
    save_neox_checkpoint(checkpoints, model.state_dict(), cfg, STEP, layout="sequential",
                         config_files={"model.yml": model_yaml})
    (root / "run.yml").write_text(model_yaml + f"load: {checkpoints}\n")
    return root


def _eval_main():
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_deepy_eval_with_include_path_names_results_by_run_step_and_task(run_dir, tmp_path):
    """`deepy.py eval.py CONFIG --include_path DIR`: the file name carries the run, the
    checkpoint's step and the task; perplexity gets a bootstrapped stderr."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deepy.py"), str(ROOT / "eval.py"), str(run_dir / "run.yml"),
         "--include_path", str(TASKS_DIR), "--eval_tasks", "austen_last_word"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval_results" / f"austen_iter{STEP}_austen_last_word.json"
    assert out.is_file(), list((tmp_path / "eval_results").iterdir())
    results = json.loads(out.read_text())
    assert results["iteration"] == STEP
    metrics = results["results"]["austen_last_word"]
    assert metrics["perplexity,none"] > 1 and metrics["perplexity_stderr,none"] > 0
    assert "perplexity=" in proc.stdout and "±" in proc.stdout  # the console shows the stderr


def test_example_tasks_stderr_and_no_overwrite(run_dir, tmp_path, monkeypatch, capsys):
    """The three example tasks (a few documents each) with --tokenizer; stderr by default
    for means; a repeat run writes a second file instead of replacing the first; --limit
    marks the file name and the JSON and warns."""
    monkeypatch.chdir(tmp_path)
    main = _eval_main()
    tasks = ["austen_mc", "austen_last_word", "austen_completion"]
    argv = ["--checkpoint", str(run_dir / "checkpoints"), "--tokenizer", str(TOKENIZER),
            "--eval_tasks", *tasks, "--include_path", str(TASKS_DIR), "--limit", "4"]
    main(argv)
    main(argv)
    first = tmp_path / "eval_results" / f"austen_iter{STEP}_{'-'.join(tasks)}-limit4.json"
    second = first.with_name(first.name.replace(".json", ".1.json"))
    assert first.is_file() and second.is_file()
    saved = json.loads(first.read_text())
    assert saved["limit"] == 4 and "only the first 4 documents" in saved["warning"]
    out, err = capsys.readouterr()
    assert out.count(f"eval: evaluating {run_dir / 'checkpoints'} at step {STEP} on austen_mc") == 2
    assert "finetune" not in out + err
    assert err.count("eval: warning: --limit 4: only the first 4 documents of each task") == 2
    assert "(LIMITED: first 4 documents per task)" in out
    results = saved["results"]
    assert results == json.loads(second.read_text())["results"]
    mc, last, gen = (results[t] for t in tasks)
    # a number, not lm-eval's "N/A" (what bootstrap_iters 0 gives); 0 when all 4 agree
    assert 0 <= mc["acc,none"] <= 1 and isinstance(mc["acc_stderr,none"], float)
    assert last["perplexity_stderr,none"] > 0
    assert 0 <= gen["exact_match,none"] <= 1 and isinstance(gen["exact_match_stderr,none"], float)


def test_missing_tokenizer_names_the_flag(tmp_path):
    from megatron.errors import TokenizerError
    from megatron.eval.loading import pick_tokenizer

    with pytest.raises(TokenizerError, match="--tokenizer"):
        pick_tokenizer(None, tmp_path, tokenizer_path=tmp_path / "nope.json")


def _eval_error(run_dir, tmp_path, capsys, name: str, dataset_lines: str) -> str:
    """The stderr error line of eval.py on a copy of austen_mc whose dataset is replaced."""
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(
        (TASKS_DIR / "austen_mc.yaml").read_text()
        .replace("task: austen_mc", f"task: {name}")
        .replace("custom_dataset: !function austen.load\ndataset_kwargs: {file: austen_mc.jsonl}",
                 dataset_lines))
    with pytest.raises(SystemExit) as exit_info:
        _eval_main()(["--checkpoint", str(run_dir / "checkpoints"), "--eval_tasks", name,
                      "--include_path", str(tasks)])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1, error
    return error[0]


def test_unreachable_or_missing_task_data_is_a_one_line_error(run_dir, tmp_path, monkeypatch, capsys):
    """A dataset on the Hub that is not in the cache, without network (the test session
    runs with HF_DATASETS_OFFLINE=1, as an offline cluster node should), and a local
    data file that does not exist."""
    monkeypatch.chdir(tmp_path)
    error = _eval_error(run_dir, tmp_path, capsys, "hub_task", "dataset_path: neox-l2e-tests/not-cached")
    assert "task 'hub_task'" in error and "without network" in error
    assert "HF_HOME" in error and "docs/eval.md" in error
    error = _eval_error(run_dir, tmp_path, capsys, "file_task",
                        f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {tmp_path}/nope.jsonl}}}}")
    assert "task 'file_task'" in error and "nope.jsonl" in error and "without network" not in error
