"""HF -> NeoX checkpoint -> HF: bit-exact round trips, NeoX file layout, load_model, CLI errors."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXForCausalLM

from megatron.checkpoint.layout import LAYER_FILE, MP_FILE, load_model, read_neox_checkpoint
from megatron.config import NeoXArgs
from megatron.errors import CheckpointError
from megatron.model.hf import hf_to_model_state_dict

from ckpt_testlib import REPO, make_hf_dir

L = 3  # layers in the conftest model


def hf_logits(hf_dir, ids):
    with torch.no_grad():
        return GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).eval()(ids).logits


@pytest.mark.parametrize("tp", [1, 2])
def test_hf_neox_hf_round_trip_is_bit_exact(tmp_path, hf_dir, hf_to_neox, neox_to_hf, tp):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path / "neox"), "--tp", str(tp), "--iteration", "7"])
    neox_to_hf(["--input", str(tmp_path / "neox"), "--output", str(tmp_path / "hf")])

    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key

    c0 = json.loads((hf_dir / "config.json").read_text())
    c1 = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "layer_norm_eps", "use_parallel_residual",
                "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id"):  # fmt: skip
        assert c0[key] == c1[key], key
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # carried through the NeoX YAML's vocab-file
    ids = torch.randint(0, 128, (1, 16))
    assert torch.equal(hf_logits(tmp_path / "hf", ids), hf_logits(hf_dir, ids))


def test_tied_embeddings_round_trip(tmp_path, hf_to_neox, neox_to_hf):
    hf_dir = make_hf_dir(tmp_path / "hf", tie_word_embeddings=True)
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path / "neox"), "--tp", "2"])
    model = load_model(tmp_path / "neox")
    assert model.cfg.tie_embeddings and model.head.final_linear.weight is model.embed.word_embeddings.weight
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf_dir, ids)).abs().max().item() <= 1e-5
    neox_to_hf(["--input", str(tmp_path / "neox"), "--output", str(tmp_path / "back")])
    assert torch.equal(hf_logits(tmp_path / "back", ids), hf_logits(hf_dir, ids))


def test_neox_layout_files_and_tp_shards(tmp_path, hf_dir, hf_to_neox):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path), "--tp", "2", "--iteration", "5"])
    assert (tmp_path / "latest").read_text() == "global_step5"
    step = tmp_path / "global_step5"
    indices = sorted({int(p.name[6:8]) for p in step.glob("layer_*")})
    assert indices == [0, *range(2, L + 2), L + 3, L + 4]  # no files for the function layers 1 and L+2

    full = hf_to_model_state_dict(load_file(hf_dir / "model.safetensors"))
    shard = torch.load(step / LAYER_FILE.format(idx=2, tp=1), weights_only=True)
    assert torch.equal(shard["attention.query_key_value.weight"], full["blocks.0.attention.query_key_value.weight"][48:])
    assert torch.equal(shard["mlp.dense_4h_to_h.weight"], full["blocks.0.mlp.dense_4h_to_h.weight"][:, 64:])
    assert torch.equal(shard["attention.dense.bias"], full["blocks.0.attention.dense.bias"] / 2)
    assert torch.equal(shard["input_layernorm.weight"], full["blocks.0.input_layernorm.weight"])
    head = torch.load(step / LAYER_FILE.format(idx=L + 4, tp=0), weights_only=True)
    assert torch.equal(head["final_linear.weight"], full["head.final_linear.weight"][:64])

    meta = torch.load(step / MP_FILE.format(tp=0), weights_only=False)
    assert meta["iteration"] == 5
    assert meta["args"]["padded_vocab_size"] == 128 and meta["args"]["model_parallel_size"] == 2
    assert meta["args"]["num_layers"] == L and meta["args"]["tokenizer_type"] == "HFTokenizer"


def test_written_yaml_rebuilds_the_model_config(tmp_path, hf_dir, hf_to_neox):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path), "--tp", "2"])
    args = NeoXArgs.from_ymls([str(tmp_path / "global_step0" / "configs" / "model.yml")])
    args.set_vocab_size(100)  # the tokenizer's size: NeoX's padding must land on the HF vocab again
    cfg, _ = read_neox_checkpoint(tmp_path)
    assert args.model_config() == cfg
    assert cfg.vocab_size == 128 and cfg.gelu_tanh and not cfg.parallel_residual and cfg.rotary_pct == 0.25


def test_load_model_logits_equal_hf(tmp_path, hf_dir, hf_to_neox):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path), "--tp", "2"])
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf_dir, ids)
    for source in (tmp_path, tmp_path / "global_step0", hf_dir):
        model = load_model(source)
        assert not model.training and model.embed.word_embeddings.weight.dtype == torch.float32
        with torch.no_grad():
            assert (model(ids) - ref).abs().max().item() <= 1e-5, source


def test_sequential_layout_is_readable(tmp_path, hf_dir, hf_to_neox):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path), "--pp-layout", "sequential", "--tp", "2"])
    step = tmp_path / "global_step0"
    assert not list(step.glob("layer_*"))
    module = torch.load(step / MP_FILE.format(tp=0), weights_only=False)["module"]
    assert f"sequential.{L + 4}.final_linear.weight" in module
    _, sd = read_neox_checkpoint(tmp_path)
    full = hf_to_model_state_dict(load_file(hf_dir / "model.safetensors"))
    assert sd.keys() == full.keys() and all(torch.equal(sd[k], full[k]) for k in full)


def test_head_names_and_extra_buffers_are_read(tmp_path, hf_dir, hf_to_neox):
    """NeoX HEAD's linear1/linear2, v1.0's persisted inv_freq and L2E keys in a layer file."""
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path)])
    path = tmp_path / "global_step0" / LAYER_FILE.format(idx=3, tp=0)
    layer = torch.load(path, weights_only=True)
    renamed = {k.replace("dense_h_to_4h", "linear1").replace("dense_4h_to_h", "linear2"): v for k, v in layer.items()}
    renamed["attention.rotary_emb.inv_freq"] = torch.ones(2)
    renamed["l2e.threshold"] = torch.zeros(1)
    torch.save(renamed, path)
    _, sd = read_neox_checkpoint(tmp_path)
    assert torch.equal(sd["blocks.1.mlp.dense_4h_to_h.weight"], layer["mlp.dense_4h_to_h.weight"])
    assert not any("inv_freq" in k or "l2e" in k for k in sd)


def test_without_configs_the_args_summary_is_used(tmp_path, hf_dir, hf_to_neox):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path)])
    for p in (tmp_path / "global_step0" / "configs").iterdir():
        p.unlink()
    cfg, sd = read_neox_checkpoint(tmp_path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (L, 32, 4, 128)
    assert len(sd) == 4 + 12 * L


def test_iteration_picks_the_step(tmp_path, hf_to_neox):
    a, b = make_hf_dir(tmp_path / "a", seed=1), make_hf_dir(tmp_path / "b", seed=2)
    hf_to_neox(["--hf", str(a), "--output", str(tmp_path / "run"), "--iteration", "10"])
    hf_to_neox(["--hf", str(b), "--output", str(tmp_path / "run"), "--iteration", "20", "--force"])
    emb = lambda m: m.embed.word_embeddings.weight  # noqa: E731
    assert torch.equal(emb(load_model(tmp_path / "run")), emb(load_model(a)))  # `latest` it did not create: kept
    assert torch.equal(emb(load_model(tmp_path / "run", iteration=20)), emb(load_model(b)))


def test_converter_never_damages_a_run(tmp_path, hf_dir, hf_to_neox, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("global_step7")
    (run / "global_step7").mkdir()
    (run / "global_step7" / "marker").write_text("the run's own step 7")
    r = run_tool("convert_hf_to_neox", "--hf", str(hf_dir), "--output", str(run), "--iteration", "7")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "already holds checkpoints (global_step7, latest)" in r.stderr and "--force" in r.stderr
    with pytest.raises(SystemExit):
        hf_to_neox(["--hf", str(hf_dir), "--output", str(run), "--iteration", "7", "--force"])
    assert "global_step7 already exists and is never overwritten" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["global_step7", "latest"]
    assert (run / "global_step7" / "marker").read_text() == "the run's own step 7"
    assert (run / "latest").read_text() == "global_step7"


def test_tokenizer_travels_with_the_checkpoint(tmp_path, hf_dir, hf_to_neox, neox_to_hf, capsys):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path / "neox")])
    step = tmp_path / "neox" / "global_step0"
    assert (step / "tokenizer" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert "vocab-file: ../tokenizer/tokenizer.json" in (step / "configs" / "model.yml").read_text()
    (tmp_path / "neox").rename(tmp_path / "moved")  # relative paths: the checkpoint is relocatable
    neox_to_hf(["--input", str(tmp_path / "moved"), "--output", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    (tmp_path / "moved" / "global_step0" / "tokenizer" / "tokenizer.json").unlink()
    (tmp_path / "moved" / "global_step0" / "checksums.json").unlink()
    neox_to_hf(["--input", str(tmp_path / "moved"), "--output", str(tmp_path / "hf2")])
    out = capsys.readouterr().out
    assert "WITHOUT a tokenizer: vocab_file" in out and "--tokenizer" in out


def test_failed_write_leaves_nothing(tmp_path, hf_dir, hf_to_neox, monkeypatch):
    calls = []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path)])
    assert not (tmp_path / "latest").exists() and not (tmp_path / "global_step0").exists()


def run_tool(name, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "ckpts" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_missing_layer_file_exits_2_naming_it(tmp_path, hf_dir, hf_to_neox):
    hf_to_neox(["--hf", str(hf_dir), "--output", str(tmp_path / "neox")])
    (tmp_path / "neox" / "global_step0" / LAYER_FILE.format(idx=3, tp=0)).unlink()
    r = run_tool("convert_neox_to_hf", "--input", str(tmp_path / "neox"), "--output", str(tmp_path / "hf"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "layer_03-model_00-model_states.pt" in r.stderr


def test_non_neox_hf_dir_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    r = run_tool("convert_hf_to_neox", "--hf", str(tmp_path), "--output", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "gpt_neox" in r.stderr


def test_load_model_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(CheckpointError, match="latest"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_model(tmp_path)
