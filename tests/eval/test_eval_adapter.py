"""The lm-eval adapter scores like ``lm_eval --model hf`` on the same tiny model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-NeoX saved in HF format with a BPE tokenizer trained on the fly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line for f in (HERE / "data").glob("*.jsonl") for line in f.read_text().splitlines()]
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", pad_token="<|padding|>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).eval().save_pretrained(out)
    return out


def _ours(model_dir, task_dir, tasks, tokenizer_dir=None):
    from megatron import load_model
    from megatron.eval import evaluate_tasks, module_logits_fn
    from megatron.tokenizer.tokenizer import HFTokenizer

    model = load_model(model_dir)
    tokenizer = HFTokenizer(str((tokenizer_dir or model_dir) / "tokenizer.json"))
    return evaluate_tasks(module_logits_fn(model), tokenizer, tasks, max_length=128,
                          batch_size=3, include_path=str(task_dir))["results"]


def _hf(hf_dir, task_dir, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                          tasks=tasks, device="cpu", batch_size=3, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          log_samples=False)
    return out["results"]


def test_adapter_matches_lm_eval_hf(hf_dir, task_dir):
    tasks = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    ours, theirs = _ours(hf_dir, task_dir, tasks), _hf(hf_dir, task_dir, tasks)
    assert ours["tiny_mc"]["acc,none"] == theirs["tiny_mc"]["acc,none"]
    assert ours["tiny_mc"]["acc_norm,none"] == theirs["tiny_mc"]["acc_norm,none"]
    assert ours["tiny_gen"]["exact_match,none"] == theirs["tiny_gen"]["exact_match,none"]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["tiny_ppl"][metric] == pytest.approx(theirs["tiny_ppl"][metric], rel=1e-5)
    # A random 2-layer model is near-uniform: perplexity must be large but finite.
    assert 10 < ours["tiny_ppl"]["word_perplexity,none"] < float("inf")


def test_unknown_task_is_a_clear_error(hf_dir, task_dir):
    from megatron.errors import UserError

    with pytest.raises(UserError, match="unknown lm-eval task"):
        _ours(hf_dir, task_dir, ["no_such_task"])


def test_eval_cli_writes_json(hf_dir, task_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(hf_dir),
         "--eval_tasks", "tiny_mc", "--num_fewshot", "0", "--include_path", str(task_dir),
         "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert results["num_fewshot"] == 0


def test_eval_cli_missing_checkpoint_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(tmp_path / "nope"),
         "--eval_tasks", "tiny_mc"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "ckpts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_neox_checkpoint_scores_like_lm_eval_hf_on_its_conversion(hf_dir, task_dir, tmp_path):
    """Our checkpoint through our adapter == its HF conversion through `lm_eval --model hf`."""
    neox, back = tmp_path / "neox", tmp_path / "hf_back"
    _tool("convert_hf_to_neox")(["--hf", str(hf_dir), "--output", str(neox), "--tp", "2"])
    _tool("convert_neox_to_hf")(["--input", str(neox), "--output", str(back)])
    assert (neox / "latest").is_file() and (back / "config.json").is_file()
    tasks = ["tiny_mc", "tiny_ppl"]
    ours = _ours(neox, task_dir, tasks, tokenizer_dir=hf_dir)
    theirs = _hf(back, task_dir, tasks)
    assert ours["tiny_mc"]["acc,none"] == theirs["tiny_mc"]["acc,none"]
    assert ours["tiny_mc"]["acc_norm,none"] == theirs["tiny_mc"]["acc_norm,none"]
    assert ours["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        theirs["tiny_ppl"]["word_perplexity,none"], rel=1e-5)
