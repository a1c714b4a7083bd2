"""GPT-NeoX checkpoint layout <-> our model's state dicts, and `load_model`.

A NeoX checkpoint directory looks like

    save/latest                                   "global_step1000"
    save/global_step1000/configs/*.yml            the run's YAML files
    save/global_step1000/mp_rank_00_model_states.pt          iteration, args (+ `module` when pp=0)
    save/global_step1000/layer_00-model_00-model_states.pt   one file per pipeline layer and TP rank

Pipeline layer numbering: embedding 0, block i -> i+2, final norm L+3, head L+4
(1 and L+2 are parameter-free functions and have no file). Under tensor parallelism
each rank holds a shard; `merge_tp_shards`/`split_tp_shards` convert between shards
and the full tensors our model uses.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from megatron.checkpoint.files import MP_FILE, write_checksums
from megatron.errors import CheckpointError
from megatron.model import GPTNeoX, ModelConfig
from megatron.model.hf import read_hf_checkpoint

LAYER_FILE = "layer_{idx:02d}-model_{tp:02d}-model_states.pt"
STEP_DIR = re.compile(r"global_step(\d+)$")

# ----------------------------------------------------------------------------- layer numbering


def layer_prefixes(num_layers: int) -> dict[int, str]:
    """Pipeline layer index -> the prefix of that layer's parameters in our model."""
    blocks = {i + 2: f"blocks.{i}." for i in range(num_layers)}
    return {0: "embed.", **blocks, num_layers + 3: "final_norm.", num_layers + 4: "head."}


# HEAD NeoX renamed the MLP; v1.0 (and Pythia) use HF's names, which we keep.
_MLP_RENAMES = {"mlp.linear1.": "mlp.dense_h_to_4h.", "mlp.linear2.": "mlp.dense_4h_to_h."}
# Keys that hold no model weights: v1.0's persisted rotary buffer and L2E's statistics.
_DROPPED = re.compile(r"(^|\.)(attention\.rotary_emb\.inv_freq$|l2e\.)")


def _normalise_layer_key(key: str) -> str | None:
    if _DROPPED.search(key):
        return None
    for old, new in _MLP_RENAMES.items():
        key = key.replace(old, new)
    return key


def model_to_layer_state_dicts(model_or_sd, num_layers: int | None = None) -> dict[int, dict]:
    """{pipeline layer index: that layer's state dict}, keys as in NeoX's layer files."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    num_layers = num_layers if num_layers is not None else model_or_sd.cfg.num_layers
    layers = {}
    for idx, prefix in layer_prefixes(num_layers).items():
        layer = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and _normalise_layer_key(k)}
        if layer:
            layers[idx] = layer
    return layers


def layer_state_dicts_to_model(layers: dict[int, dict], num_layers: int) -> dict:
    """Inverse of `model_to_layer_state_dicts`; accepts v1.0 and HEAD key names."""
    prefixes = layer_prefixes(num_layers)
    sd = {}
    for idx, layer in layers.items():
        if idx not in prefixes:
            raise CheckpointError(f"layer index {idx} does not exist in a {num_layers}-layer GPT-NeoX")
        for key, tensor in layer.items():
            key = _normalise_layer_key(key)
            if key is not None:
                sd[prefixes[idx] + key] = tensor
    return sd


# ----------------------------------------------------------------------------- tensor parallel shards

_COLUMN = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
           "word_embeddings.weight", "final_linear.weight")  # fmt: skip
_ROW = ("attention.dense.weight", "dense_4h_to_h.weight")
# Each rank adds its own row-parallel bias before the all-reduce (gpt-j residual): the sum is the bias.
_ROW_BIAS = ("attention.dense.bias", "dense_4h_to_h.bias")


def merge_tp_tensor(key: str, parts: list, moment: bool = False) -> torch.Tensor:
    """The full tensor `key` from its tp shards, in rank order.

    ``moment``: an Adam moment rather than a weight. The moments of a row-parallel bias
    shard are those of the full bias (every shard gets the full bias's gradient), so they
    are equal across ranks, not summed.
    """
    if key.endswith(_COLUMN):
        return torch.cat(parts, dim=0)
    if key.endswith(_ROW):
        return torch.cat(parts, dim=1)
    if key.endswith(_ROW_BIAS) and not moment:
        return torch.stack(parts).sum(0)
    return torch.stack(parts).mean(0)  # replicated: averaged in case the copies drifted apart


def split_tp_tensor(key: str, t: torch.Tensor, tp: int, moment: bool = False) -> list:
    """Inverse of `merge_tp_tensor`: the `tp` shards (views) of the full tensor `key`."""
    if key.endswith(_COLUMN):
        parts = t.chunk(tp, dim=0)
    elif key.endswith(_ROW):
        parts = t.chunk(tp, dim=1)
    elif key.endswith(_ROW_BIAS) and not moment:
        parts = [t / tp] * tp
    else:
        parts = [t] * tp
    if len(parts) != tp or any(p.shape != parts[0].shape for p in parts):
        raise CheckpointError(
            f"{key}: shape {tuple(t.shape)} does not split evenly over {tp} tensor-parallel ranks; choose another tp"
        )
    return list(parts)


def merge_tp_shards(shards: list[dict]) -> dict:
    """Full tensors from per-rank shards (any key prefix; v1.0/HEAD names both accepted)."""
    shards = [{_normalise_layer_key(k): v for k, v in s.items() if _normalise_layer_key(k)} for s in shards]
    return {key: merge_tp_tensor(key, [s[key] for s in shards]) for key in shards[0]}


def split_tp_shards(sd: dict, tp: int) -> list[dict]:
    """Inverse of `merge_tp_shards`: the state dict each of `tp` ranks holds."""
    shards = [{} for _ in range(tp)]
    for key, t in sd.items():
        for shard, part in zip(shards, split_tp_tensor(key, t, tp)):
            shard[key] = part.clone()  # own storage: torch.save of a view writes the whole base tensor
    return shards


# ----------------------------------------------------------------------------- writing


def neox_args_dict(cfg: ModelConfig, tp: int, make_vocab_size_divisible_by: int, tokenizer_type=None) -> dict:
    """The `args` summary NeoX stores in every mp_rank file."""
    return dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        padded_vocab_size=cfg.vocab_size,
        tokenizer_type=tokenizer_type,
        model_parallel_size=tp,
    )


def neox_model_yaml(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, make_vocab_size_divisible_by: int = 128,
                    tokenizer_type: str | None = None, vocab_file: str | None = None) -> str:  # fmt: skip
    """A NeoX YAML with the model keys that reproduce `cfg`."""
    keys = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "seq_length": cfg.max_position_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "pos_emb": "rotary",
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_base,
        "no_weight_tying": not cfg.tie_embeddings,
        "gpt_j_residual": cfg.parallel_residual,
        "layernorm_epsilon": cfg.layernorm_eps,
        "activation": "gelu",
        "bias_gelu_fusion": cfg.gelu_tanh,
        "hidden_dropout": cfg.hidden_dropout,
        "attention_dropout": cfg.attention_dropout,
        "init_method": cfg.init_method,
        "output_layer_init_method": cfg.output_layer_init_method,
        "init_method_std": cfg.init_std,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "model_parallel_size": tp,
        "pipe_parallel_size": pp,
        "train_micro_batch_size_per_gpu": 1,  # NeoX requires a batch size; this file is about the model
    }
    if cfg.attention_impl == "flash":
        keys["attention_config"] = [[["flash"], cfg.num_layers]]
    if cfg.intermediate_size is not None:
        keys["intermediate_size"] = cfg.intermediate_size
    if tokenizer_type is not None:
        keys["tokenizer_type"] = tokenizer_type
    if vocab_file is not None:
        keys["vocab_file"] = vocab_file
    return yaml.safe_dump({k.replace("_", "-"): v for k, v in keys.items()}, sort_keys=False)


def existing_checkpoints(directory) -> list[str]:
    """What in ``directory`` marks it as holding checkpoints: ``latest`` and global_stepN dirs."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name == "latest" or STEP_DIR.match(p.name))


def check_output_free(save_dir, iteration: int, force: bool = False) -> None:
    """A converter never damages a run: refuse a directory holding checkpoints (unless
    ``force``) and, always, an existing global_step{iteration}."""
    save_dir = Path(save_dir)
    existing = existing_checkpoints(save_dir)
    if existing and not force:
        raise CheckpointError(f"{save_dir} already holds checkpoints ({', '.join(existing[:4])}); write to a "
                              f"new directory, or pass --force to add global_step{iteration} beside them")
    if (save_dir / f"global_step{iteration}").exists():
        raise CheckpointError(f"{save_dir / f'global_step{iteration}'} already exists and is never overwritten; "
                              f"pick another --iteration or --output")


def save_neox_checkpoint(save_dir, sd: dict, cfg: ModelConfig, iteration: int, *, tp: int = 1,
                         layout: str = "layers", args: dict | None = None,
                         config_files: dict[str, str] | None = None,
                         extra_files: dict[str, Path] | None = None, force: bool = False) -> Path:  # fmt: skip
    """Write `save_dir/global_step{iteration}` in NeoX's layout and point `latest` at it.

    layout "layers" writes per-layer files (NeoX with pp >= 1); "sequential" writes the
    pp=0 layout (`module` with `sequential.{idx}.` keys inside each mp_rank file).
    ``extra_files`` (relative name -> source) are copied in, e.g. the tokenizer.
    Everything is written to a temporary directory first, so a crash leaves no half
    checkpoint. A directory already holding checkpoints is refused unless ``force``; even
    then an existing global_stepN is never replaced and an existing `latest` never touched.
    """
    if layout not in ("layers", "sequential"):
        raise ValueError(f"layout must be 'layers' or 'sequential', not {layout!r}")
    save_dir = Path(save_dir)
    tag = f"global_step{iteration}"
    check_output_free(save_dir, iteration, force)
    save_dir.mkdir(parents=True, exist_ok=True)
    tmp = save_dir / f".{tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "configs").mkdir(parents=True)
    args = args if args is not None else neox_args_dict(cfg, tp, 128)
    for rank, shard in enumerate(split_tp_shards(sd, tp)):
        layers = model_to_layer_state_dicts(shard, cfg.num_layers)
        meta = {"iteration": iteration, "args": args, "global_steps": iteration, "mp_world_size": tp, "module": None}
        if layout == "layers":
            for idx, layer in layers.items():
                torch.save(layer, tmp / LAYER_FILE.format(idx=idx, tp=rank))
        else:
            meta["module"] = {f"sequential.{idx}.{k}": v for idx, layer in layers.items() for k, v in layer.items()}
        torch.save(meta, tmp / MP_FILE.format(tp=rank))
    for name, text in (config_files or {}).items():
        (tmp / "configs" / name).write_text(text)
    for name, source in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / name)
    write_checksums(str(tmp))
    os.rename(tmp, save_dir / tag)
    latest = save_dir / "latest"
    if not latest.exists():
        latest_tmp = save_dir / f".latest.tmp-{os.getpid()}"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, latest)
    return save_dir / tag


# ----------------------------------------------------------------------------- reading


def resolve_step_dir(path, iteration: int | None = None) -> Path:
    """The `global_stepN` directory meant by a save dir (+ `latest` or `iteration`) or a step dir."""
    path = Path(path)
    if STEP_DIR.search(path.name) and iteration is None:
        step = path
    elif iteration is not None:
        step = (path.parent if STEP_DIR.search(path.name) else path) / f"global_step{iteration}"
    elif (path / "latest").is_file():
        step = path / (path / "latest").read_text().strip()
    else:
        raise CheckpointError(
            f"{path}: no 'latest' file and not a global_stepN directory; pass --iteration or a step dir"
        )
    if not step.is_dir():
        raise CheckpointError(f"{step}: checkpoint directory does not exist")
    return step


def _load(path: Path, trusted_pickle: bool = False):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file; the checkpoint is incomplete")
    try:  # mp_rank files hold numpy RNG states, which weights_only refuses
        return torch.load(path, map_location="cpu", weights_only=not trusted_pickle)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint file ({e})") from e


def checkpoint_neox_args(step: Path):
    """NeoXArgs from the run's saved YAML files (and overrides), or None when it has none."""
    from megatron.config import NeoXArgs

    return NeoXArgs.from_config_dir(step / "configs")


def _tp_size(step: Path) -> int:
    embeds = list(step.glob("layer_00-model_*-model_states.pt"))
    return len(embeds) or len(list(step.glob("mp_rank_*_model_states.pt")))


def _read_rank_layers(step: Path, rank: int, num_layers: int, tied: bool, meta0: dict) -> dict[int, dict]:
    """{layer index: state dict} of one TP rank, from per-layer files or the pp=0 `module`.

    With tied embeddings the head layer only repeats the embedding (training's pp=0
    `module` holds it as `sequential.{L+4}.word_embeddings.weight`): it is skipped."""
    tied_head = num_layers + 4 if tied else None
    if any(step.glob(f"layer_*-model_{rank:02d}-model_states.pt")):
        wanted = [i for i in layer_prefixes(num_layers) if i != tied_head]
        return {i: _load(step / LAYER_FILE.format(idx=i, tp=rank)) for i in wanted}
    mp_file = step / MP_FILE.format(tp=rank)
    module = (meta0 if rank == 0 else _load(mp_file, trusted_pickle=True)).get("module")
    if not module:
        raise CheckpointError(
            f"{mp_file}: no 'module' weights and no layer_*-model_{rank:02d} files; the checkpoint is incomplete"
        )
    if not any(k.startswith("sequential.") for k in module):
        return model_to_layer_state_dicts(module, num_layers)  # saved straight from our GPTNeoX
    layers: dict[int, dict] = {}
    for key, t in module.items():
        idx, name = key[len("sequential.") :].split(".", 1)
        if int(idx) != tied_head:
            layers.setdefault(int(idx), {})[name] = t
    return layers


def _model_config(neox_args, meta_args: dict, vocab_size: int) -> ModelConfig:
    if neox_args is not None:
        neox_args.set_vocab_size(vocab_size)
        return dataclasses.replace(neox_args.model_config(), vocab_size=vocab_size)
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=meta_args["hidden_size"],
        num_layers=meta_args["num_layers"],
        num_heads=meta_args["num_attention_heads"],
        max_position_embeddings=meta_args.get("max_position_embeddings", 2048),
    )


def read_neox_checkpoint(path, iteration: int | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, full-size state dict of our GPTNeoX) from a NeoX-layout checkpoint.

    The architecture comes from the run's `configs/*.yml` when present (they hold every
    flag); otherwise from the `args` summary in the mp_rank file, with our defaults.
    """
    step = resolve_step_dir(path, iteration)
    tp = _tp_size(step)
    if tp == 0:
        raise CheckpointError(
            f"{step}: no layer_*-model_states.pt or mp_rank_*_model_states.pt files; not a NeoX checkpoint"
        )
    meta0 = _load(step / MP_FILE.format(tp=0), trusted_pickle=True)
    meta_args = meta0.get("args") or {}
    neox_args = checkpoint_neox_args(step)
    if neox_args is not None:
        num_layers, tied = neox_args.num_layers, not neox_args.no_weight_tying
    elif "num_layers" in meta_args:
        num_layers, tied = meta_args["num_layers"], False
    else:
        raise CheckpointError(
            f"{step}: no configs/*.yml and no 'args' in the mp_rank file; cannot tell the model shape"
        )
    shards = [
        layer_state_dicts_to_model(_read_rank_layers(step, r, num_layers, tied, meta0), num_layers)
        for r in range(tp)
    ]
    sd = merge_tp_shards(shards)
    cfg = _model_config(neox_args, meta_args, sd["embed.word_embeddings.weight"].shape[0])
    return cfg, sd


def model_from_state_dict(cfg: ModelConfig, sd: dict, source="checkpoint") -> GPTNeoX:
    """An fp32 CPU GPTNeoX holding `sd`, built on the meta device so weights are not allocated twice."""
    sd = {k: v.float() for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd.setdefault("head.final_linear.weight", sd.get("embed.word_embeddings.weight"))
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0:2]
        raise CheckpointError(f"{source}: weights do not match the config ({' '.join(first_line)})") from e
    if cfg.tie_embeddings:
        model.head.final_linear.weight = model.embed.word_embeddings.weight
    return model


def load_model(path, iteration: int | None = None) -> GPTNeoX:
    """Our/NeoX checkpoint (save dir or global_stepN) or an HF GPT-NeoX directory -> eval fp32 CPU model."""
    path = Path(path)
    if (path / "config.json").is_file():
        cfg, sd = read_hf_checkpoint(path)
    else:
        cfg, sd = read_neox_checkpoint(path, iteration)
    return model_from_state_dict(cfg, sd, source=str(path)).eval()
