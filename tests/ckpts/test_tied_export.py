"""A checkpoint trained with tied embeddings (no_weight_tying: false) on pp=0, where the
pipeline module keeps the tied head as a second `word_embeddings.weight`, exports to HF
with tie_word_embeddings and the same logits as our model, and imports back."""
import json

import pytest
import torch

from ckpt_testlib import REPO, _load_tool
from distributed import run_distributed
from megatron.checkpoint import load_model

pytestmark = pytest.mark.slow  # one real 1-step training run (~15 s)

TINY = str(REPO / "configs" / "local" / "tiny.yml")


def _train_tied(rank, world_size, save, log_dir):
    from megatron.config import NeoXArgs
    from megatron.training import pretrain

    overrides = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                 "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
                 "gradient_accumulation_steps": 1, "train_iters": 1, "lr_decay_iters": 1,
                 "eval_iters": 0, "num_workers": 0, "pipe_parallel_size": 0, "no_weight_tying": False,
                 "data_path": str(REPO / "data" / "austen_bpe4k_text_document"),
                 "vocab_file": str(REPO / "data" / "tokenizers" / "austen_bpe4k.json"),
                 "save": save, "log_dir": log_dir, "checkpoint_factor": 1, "l2e": {"enabled": False}}
    pretrain(NeoXArgs.from_ymls([TINY], overrides=overrides))


def test_trained_tied_checkpoint_exports_with_equal_logits_and_imports_back(tmp_path):
    from transformers import GPTNeoXForCausalLM

    save = tmp_path / "run"
    run_distributed(_train_tied, world_size=1, args=(str(save), str(tmp_path / "logs")), init_deepspeed=True,
                    timeout=600)
    module = torch.load(save / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "sequential.6.word_embeddings.weight" in module  # the tied head, as training saves it

    _load_tool("convert_neox_to_hf").main(["--input", str(save), "--output", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    ours = load_model(save)
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
        assert (hf(ids).logits - expected).abs().max().item() <= 1e-5

    _load_tool("convert_hf_to_neox").main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back")])
    back = load_model(tmp_path / "back")
    assert back.cfg.tie_embeddings and back.head.final_linear.weight is back.embed.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(back(ids), expected)
