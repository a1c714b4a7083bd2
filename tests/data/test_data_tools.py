"""The data tools agree with training: build_index_maps.py --config builds the caches a
run then finds, and write_preshuffled.py writes the stream a run reads through the
index maps, so pre-shuffled training sees the same batches."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distributed import run_distributed
from megatron.config import NeoXArgs
from megatron.data.data_utils import (build_train_valid_test_datasets, index_caches,
                                      make_data_iterator)
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.data.preshuffled_dataset import PreshuffledDataset

ROOT = Path(__file__).resolve().parents[2]
SEQ = 16
MODEL = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ,
         "max_position_embeddings": SEQ, "train_micro_batch_size_per_gpu": 2,
         "gradient_accumulation_steps": 2, "train_iters": 12, "eval_interval": 5,
         "eval_iters": 2, "seed": 77, "tokenizer_type": "CharLevelTokenizer"}


def write_docs(prefix, count, seed=0):
    rng = np.random.default_rng(seed)
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(count):
        builder.add_item(rng.integers(1, 500, size=rng.integers(3, 60)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def batches(args, dp_size=2):
    """Every micro-batch each data-parallel rank reads in the run, rank by rank."""
    train = build_train_valid_test_datasets(args)[0]
    count = args.train_iters * args.gradient_accumulation_steps
    streams = [make_data_iterator(train, args, rank, dp_size) for rank in range(dp_size)]
    return [torch.cat([b["text"] for b in itertools.islice(stream, count)]) for stream in streams]


def test_build_index_maps_config_caches_are_hits_at_train_time(tmp_path, capsys):
    from tools.datasets.build_index_maps import main

    a, b = write_docs(tmp_path / "a", 40, 1), write_docs(tmp_path / "b", 25, 2)
    model = write_yaml(tmp_path / "model.yml", MODEL)
    runs = {
        "blend": {"train_data_paths": [a, b], "train_data_weights": [2.0, 1.0],
                  "valid_data_paths": [b], "test_data_paths": [a]},
        "split": {"data_path": a, "split": "7,2,1"},
    }
    for name, data_keys in runs.items():
        data = write_yaml(tmp_path / f"{name}.yml", data_keys)
        with pytest.raises(SystemExit) as e:  # the batch size depends on the GPU count
            main(["--config", model, data])
        assert e.value.code == 2 and "--world-size" in capsys.readouterr().err
        main(["--config", model, data, "--world-size", "2"])
        printed = [line.strip() for line in capsys.readouterr().out.splitlines()
                   if line.startswith("  ")]
        args = NeoXArgs.from_ymls([model, data])
        args.configure_world(2)  # the run: 2 ranks, train_batch_size 8
        caches = [c for ds in build_train_valid_test_datasets(args) for c in index_caches(ds)]
        assert len(caches) == (4 if name == "blend" else 3)
        assert all(cache["hit"] for cache in caches), caches
        assert sorted(p for c in caches for p in c["paths"]) == sorted(printed)
    # the blend's margin: train_0 asks ceil(12 steps * 8 * 2/3 * 1.005) samples
    assert Path(f"{a}_train_0_indexmap_65ns_{SEQ}sl_77s_doc_idx.npy").is_file()


def test_write_preshuffled_gives_the_batches_of_the_index_maps(tmp_path):
    from tools.datasets.write_preshuffled import main

    source = write_docs(tmp_path / "corpus", 60)
    model = write_yaml(tmp_path / "model.yml", {**MODEL, "train_batch_size": 8})
    maps_run = write_yaml(tmp_path / "maps.yml", {"data_path": source, "split": "8,1,1"})
    main(["--config", model, maps_run, "--output", str(tmp_path / "pre" / "document")])
    pre_run = write_yaml(tmp_path / "pre.yml", {
        "train_data_paths": [str(tmp_path / "pre" / "document")], "data_preshuffled": True,
        "valid_data_paths": [source]})
    pre_args = NeoXArgs.from_ymls([model, pre_run])
    assert len(MMapIndexedDataset(str(tmp_path / "pre" / "document"))) == 12 * 8
    assert isinstance(build_train_valid_test_datasets(pre_args)[0], PreshuffledDataset)
    for want, got in zip(batches(NeoXArgs.from_ymls([model, maps_run])), batches(pre_args)):
        assert torch.equal(want, got)
    # --data-path mode: the order of a run with train_data_paths (a 0.5% larger shuffle)
    main(["--data-path", source, "--num-samples", "96", "--seq-length", str(SEQ), "--seed", "77",
          "--output", str(tmp_path / "pre2" / "document")])
    paths_run = write_yaml(tmp_path / "paths.yml", {"train_data_paths": [source]})
    pre2 = NeoXArgs.from_ymls([model, write_yaml(tmp_path / "pre2.yml", {
        "train_data_paths": [str(tmp_path / "pre2" / "document")], "data_preshuffled": True})])
    want, got = batches(NeoXArgs.from_ymls([model, paths_run])), batches(pre2)
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert not torch.equal(want[0], batches(NeoXArgs.from_ymls([model, maps_run]))[0])


def _train_both(rank, world_size, maps_overrides, pre_overrides):
    from megatron.training import pretrain

    tiny = str(ROOT / "configs" / "local" / "tiny.yml")
    return [pretrain(NeoXArgs.from_ymls([tiny], overrides=o))["lm_loss"]
            for o in (maps_overrides, pre_overrides)]


@pytest.mark.slow
@pytest.mark.distributed
def test_training_on_the_written_file_reproduces_the_losses(tmp_path):
    from tools.datasets.write_preshuffled import main

    austen = str(ROOT / "data" / "austen_bpe4k_text_document")
    common = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
              "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 2, "train_iters": 3, "lr_decay_iters": 3,
              "eval_interval": 0, "eval_iters": 0, "save": None, "checkpoint_factor": None,
              "log_dir": str(tmp_path / "logs"), "log_interval": 1,
              "vocab_file": str(ROOT / "data" / "tokenizers" / "austen_bpe4k.json")}
    maps = {**common, "data_path": austen, "split": "949,50,1"}
    config = tmp_path / "run.yml"
    tiny = yaml.safe_load(open(ROOT / "configs" / "local" / "tiny.yml"))
    config.write_text(yaml.safe_dump({**tiny, **maps}))
    main(["--config", str(config), "--world-size", "1", "--output", str(tmp_path / "document")])
    pre = {**common, "data_path": None, "train_data_paths": [str(tmp_path / "document")],
           "data_preshuffled": True}
    [(want, got)] = run_distributed(_train_both, world_size=1, args=(maps, pre),
                                    init_deepspeed=True, timeout=300)
    assert len(want) == 3 and want == got
