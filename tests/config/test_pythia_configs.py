"""Our Pythia configs and GPT-NeoX's unchanged ones load and describe Pythia exactly."""
import json
import os

import pytest

from megatron.config import NeoXArgs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SIZES = ["14M", "31M", "70M", "160M", "410M", "1B", "1-4B", "2-8B", "6-9B", "12B"]
# Pythia's published parameter counts (total, non-embedding), neox_reference.md §11.
PYTHIA_COUNTS = {
    "14M": (14_067_712, 1_189_888), "31M": (30_494_720, 4_739_072),
    "70M": (70_426_624, 18_915_328), "160M": (162_322_944, 85_056_000),
    "410M": (405_334_016, 302_311_424), "1B": (1_011_781_632, 805_736_448),
    "1-4B": (1_414_647_808, 1_208_602_624), "2-8B": (2_775_208_960, 2_517_652_480),
    "6-9B": (6_857_302_016, 6_444_163_072), "12B": (11_846_072_320, 11_327_027_200),
}
PADDED_VOCAB = {"6-9B": 50432, "12B": 50688}
LR = {"14M": 1e-3, "31M": 1e-3, "70M": 1e-3, "160M": 6e-4, "410M": 3e-4, "1B": 2.5e-4,
      "1-4B": 2e-4, "2-8B": 1.6e-4, "6-9B": 1.2e-4, "12B": 1.2e-4}


def ours(size):
    return [os.path.join(ROOT, "configs", "pythia", f"{size}.yml"),
            os.path.join(ROOT, "configs", "local_setup.yml")]


def neox(size):
    # NeoX's 14M/31M carry their own data paths and vocab file, like local_setup.yml.
    files = [os.path.join(HERE, "neox_configs", "pythia", f"{size}.yml")]
    if size not in ("14M", "31M"):
        files.append(os.path.join(HERE, "neox_configs", "local_setup.yml"))
    return files


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("which", [ours, neox])
def test_pythia_config_loads_with_pythia_values(size, which):
    args = NeoXArgs.from_ymls(which(size))
    assert args.lr == pytest.approx(LR[size]) and args.min_lr == pytest.approx(LR[size] / 10)
    assert args.seq_length == 2048 and args.rotary_pct == 0.25
    assert args.gpt_j_residual and args.no_weight_tying and args.bias_gelu_fusion
    assert args.lr_decay_style == "cosine" and args.train_iters == 143000
    assert args.precision == ("bfloat16" if size == "1B" else "fp16")
    assert args.set_vocab_size(50277) == PADDED_VOCAB.get(size, 50304)
    assert len(args.config_files) == len(which(size))


@pytest.mark.parametrize("size", SIZES)
def test_our_configs_keep_pythia_global_batch_at_any_gpu_count(size):
    args = NeoXArgs.from_ymls(ours(size))
    assert args.train_batch_size == 1024
    wide = args.model_parallel_size * 32
    args.configure_world(wide)
    assert args.train_batch_size == 1024 and args.data_parallel_size == 32


@pytest.mark.parametrize("size", ["6-9B", "12B"])
def test_large_models_use_default_init(size):
    args = NeoXArgs.from_ymls(ours(size))
    assert (args.init_method, args.output_layer_init_method) == ("normal", "scaled_normal")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("which", [ours, neox])
def test_describe_model_gives_pythia_parameter_counts(size, which):
    pytest.importorskip("megatron.model")
    from tools.describe_model import describe

    args = NeoXArgs.from_ymls(which(size))
    args.set_vocab_size(50277)
    d = describe(args)
    assert (d["total_params"], d["non_embedding_params"]) == PYTHIA_COUNTS[size]


def test_describe_model_cli_reads_the_shipped_tokenizer(capsys, tmp_path):
    """NeoX's /fsx path to the 20B tokenizer (local_setup.yml) or none: the repository's
    copy is read, silently; an unreadable other tokenizer gets the warning and NeoX-20B's ids."""
    pytest.importorskip("megatron.model")
    from tools.describe_model import main

    main(ours("70M"))
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["total_params"] == PYTHIA_COUNTS["70M"][0] and d["padded_vocab_size"] == 50304
    assert "describe_model" not in err
    model_only = [c for c in ours("70M") if not c.endswith("local_setup.yml")]
    for vocab_file, warned in ((None, False), ("/nowhere/other.json", True)):
        extra = tmp_path / "vocab.yml"
        extra.write_text(f'{{"vocab_file": "{vocab_file}"}}' if vocab_file else "{}")
        main([*model_only, str(extra)])
        out, err = capsys.readouterr()
        assert json.loads(out)["padded_vocab_size"] == 50304
        assert ("describe_model: vocab_file /nowhere/other.json is not readable" in err) == warned
    main([*ours("70M"), "--vocab-size", "50305"])
    assert json.loads(capsys.readouterr()[0])["padded_vocab_size"] == 50432


@pytest.mark.parametrize("size,gpus,batch,keep_gpus", [("410M", 24, 768, 32), ("2-8B", 24, 384, 64)])
def test_neox_pythia_batch_that_follows_the_gpu_count_is_said_once(size, gpus, batch, keep_gpus, caplog):
    """GPT-NeoX's Pythia YAMLs set only the micro-batch: on 24 GPUs the batch is not
    Pythia's 1,024, and one line says which it is and how to keep Pythia's."""
    from megatron.config import neox_args

    neox_args._noted_batches.clear()  # said once per process: forget earlier tests' lines
    args = NeoXArgs.from_ymls(neox(size))
    caplog.clear()
    args.configure_world(gpus)
    args.configure_world(gpus)  # the launcher's and the rank's call: still one line
    notes = [r.getMessage() for r in caplog.records if "not Pythia's 1024" in r.getMessage()]
    assert len(notes) == 1 and args.train_batch_size == batch
    assert f"global batch of {batch} sequences" in notes[0] and f"train on {keep_gpus} GPUs" in notes[0]
    assert "train_batch_size=1024" in notes[0]
    caplog.clear()
    NeoXArgs.from_ymls(neox(size)).configure_world(keep_gpus)  # Pythia's own count: nothing to say
    assert not [r for r in caplog.records if "Pythia's" in r.getMessage()]
