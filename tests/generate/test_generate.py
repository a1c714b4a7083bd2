"""generate.py: NeoX's keys and JSON-lines output; greedy decoding equals HF `generate` on
the exported model; the KV cache changes nothing; tensor parallelism (2 real ranks)
decodes exactly like one process."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "local" / "tiny.yml"
TOKENIZER = ROOT / "data" / "tokenizers" / "austen_bpe4k.json"
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome, clever, and rich",
           "Sir Walter Elliot"]
NEOX_RECORD_KEYS = {"context", "text", "length", "finished", "message", "duration_seconds"}


def _tool(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random HF GPT-NeoX (Austen vocabulary) -> our tp=2 checkpoint -> HF export."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False))
    with torch.no_grad():  # spread the logits out: no near-ties for argmax to flip on
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(root / "hf_src")
    neox, export = root / "neox", root / "hf_export"
    _tool(ROOT / "tools" / "ckpts" / "convert_hf_to_neox.py", "to_neox")(
        ["--hf", str(root / "hf_src"), "--output", str(neox), "--tp", "2", "--pp-layout", "sequential"])
    _tool(ROOT / "tools" / "ckpts" / "convert_neox_to_hf.py", "to_hf")(
        ["--input", str(neox), "--output", str(export)])
    (root / "prompts.txt").write_text("\n\n".join(PROMPTS) + "\n")
    return root


def write_config(root: Path, name: str, **keys) -> Path:
    """tiny.yml with the test model's shape, its checkpoint and generation keys."""
    from megatron.config import NeoXArgs

    overrides = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                 "seq_length": 128, "max_position_embeddings": 128, "vocab_file": str(TOKENIZER),
                 "l2e": {"enabled": False}, "load": str(root / "neox"),
                 "sample_input_file": str(root / "prompts.txt"), "maximum_tokens": 12, **keys}
    path = root / name
    path.write_text(json.dumps(NeoXArgs.from_ymls([str(TINY)], overrides=overrides).to_dict()))
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "duration_seconds"} for r in records]


def test_greedy_input_file_equals_hf_generate_on_the_export(checkpoints):
    from transformers import GPTNeoXForCausalLM

    from megatron.tokenizer.tokenizer import HFTokenizer

    output = checkpoints / "greedy.jsonl"
    config = write_config(checkpoints, "greedy.yml", text_gen_type="input-file",
                          sample_output_file=str(output))
    _tool(ROOT / "generate.py", "generate_cli")([str(config)])
    records = read_records(output)
    assert [r["context"] for r in records] == PROMPTS  # split on prompt_end, empties dropped
    assert all(set(r) == NEOX_RECORD_KEYS for r in records)

    tokenizer = HFTokenizer(str(TOKENIZER))
    hf = GPTNeoXForCausalLM.from_pretrained(checkpoints / "hf_export").eval()
    for record in records:
        ids = tokenizer.tokenize(record["context"])
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                          eos_token_id=tokenizer.eod, pad_token_id=tokenizer.eod)[0, len(ids):].tolist()
        finished = tokenizer.eod in out
        new = out[: out.index(tokenizer.eod)] if finished else out
        assert record["text"] == tokenizer.detokenize(new)
        assert (record["length"], record["finished"]) == (len(new), finished)
    assert sum(r["length"] for r in records) > 12  # real completions, not all stopped at once


def test_kv_cache_and_recompute_sample_the_same_tokens(checkpoints):
    """Unconditional sampling (temperature, top_k, top_p) with one seed: identical samples
    with and without the cache; the samples differ from one another."""
    from megatron import load_model
    from megatron.config import NeoXArgs
    from megatron.eval import module_logits_fn
    from megatron.tokenizer import build_tokenizer
    from megatron.text_generation import Generator, run

    model = load_model(checkpoints / "neox")
    outputs = []
    for recompute in (False, True):
        output = checkpoints / f"uncond_{recompute}.jsonl"
        args = NeoXArgs.from_ymls([str(write_config(
            checkpoints, "uncond.yml", text_gen_type="unconditional", num_samples=3,
            temperature=0.9, top_k=50, top_p=0.95, recompute=recompute,
            sample_output_file=str(output)))])
        generator = Generator(module_logits_fn(model), build_tokenizer(args), args, max_positions=128)
        assert generator.use_cache == (not recompute)
        records = run(generator, args, is_writer=True)
        assert without_timing(read_records(output)) == without_timing(records)
        outputs.append(without_timing(records))
    assert outputs[0] == outputs[1]
    assert len({r["text"] for r in outputs[0]}) == 3 and all(r["context"] == "" for r in outputs[0])


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_generation_equals_one_process(checkpoints):
    """`deepy.py generate.py` on 2 CPU ranks (model_parallel_size 2, the checkpoint's
    layout, KV cache on) writes the same completions as one process."""
    one, two = checkpoints / "tp1.jsonl", checkpoints / "tp2.jsonl"
    _tool(ROOT / "generate.py", "generate_cli")([str(write_config(
        checkpoints, "tp1.yml", text_gen_type="input-file", sample_output_file=str(one)))])
    config = write_config(checkpoints, "tp2.yml", text_gen_type="input-file", sample_output_file=str(two),
                          model_parallel_size=2, pipe_parallel_size=0, num_gpus=2)
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), str(ROOT / "generate.py"), str(config)],
                          cwd=checkpoints, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert without_timing(read_records(two)) == without_timing(read_records(one))


def test_generation_keys_are_checked(tmp_path):
    from megatron.config import NeoXArgs
    from megatron.errors import ConfigError
    from megatron.text_generation import Sampling, read_prompts

    with pytest.raises(ConfigError, match="text_gen_type"):
        NeoXArgs.from_ymls([str(TINY)], overrides={"text_gen_type": "precompute"})
    with pytest.raises(ConfigError, match="top_p"):
        Sampling.from_args(NeoXArgs.from_ymls([str(TINY)], overrides={"top_p": 1.5}))
    (tmp_path / "p.txt").write_text("a###b###  ###")
    assert read_prompts(tmp_path / "p.txt", "###") == ["a", "b"]


def test_maximum_tokens_beyond_the_context_is_named(caplog):
    """maximum_tokens 100000 on a 16-token context: a warning up front, and each completion
    that stopped at the context says so (instead of ending silently short)."""
    from megatron.config import NeoXArgs
    from megatron.text_generation import Generator
    from megatron.tokenizer.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(str(TOKENIZER))
    never_ends = tokenizer.eod + 7

    def logits_fn(batch):
        logits = torch.zeros(batch.shape[0], batch.shape[1], tokenizer.vocab_size)
        logits[..., never_ends] = 1.0
        return logits

    args = NeoXArgs.from_ymls([str(TINY)], overrides={"maximum_tokens": 100000})
    generator = Generator(logits_fn, tokenizer, args, max_positions=16)
    assert ("maximum_tokens 100000 is beyond the model's context of 16 tokens (max_position_embeddings): "
            "completions stop when prompt + completion fill it; lower maximum_tokens to at most 15") in caplog.text
    record = generator.complete("")  # the prompt is one end-of-document token
    assert record["length"] == 15 and not record["finished"]
    assert record["message"] == ("stopped at the context limit: prompt + completion reached max_position_embeddings "
                                 "16 tokens before maximum_tokens 100000")
    generator.max_new_tokens = 4  # stopping at maximum_tokens is what was asked: no message
    assert generator.complete("")["message"] is None
