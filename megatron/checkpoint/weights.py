"""Put weights into this rank's part of the DeepSpeed engine, from any source.

From files in the run's own layout (``load_module_only``), or from one full state dict
(an HF directory, or a NeoX-layout checkpoint of another tp/pp) cut to this rank's
tensor-parallel shard and pipeline stage (``load_full_weights``). Errors name the file.
"""
from __future__ import annotations

import os

from megatron.errors import CheckpointError
from megatron.checkpoint import files


def refresh_master_weights(engine) -> None:
    # ZeRO and mixed precision keep their own fp32 copy of the weights: refresh it, or the
    # next step would write the old weights back.
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def load_module_only(engine, ckpt_dir: str) -> None:
    """Weights from files in this run's own layout (same tp; layer files iff pipelined)."""
    module = engine.module
    if hasattr(module, "load_state_dir"):  # deepspeed.pipe.PipelineModule: layer_XX files
        check_files_exist(own_layer_files(engine, ckpt_dir))
        module.load_state_dir(ckpt_dir, checkpoint_engine=engine.checkpoint_engine, strict=True)
    else:
        path = os.path.join(ckpt_dir, f"mp_rank_{engine.checkpoint_mp_rank:02d}_model_states.pt")
        _load_state_checked(module, files.load_torch(path)["module"], path)
    refresh_master_weights(engine)


def _load_state_checked(module, state: dict, source: str, strict: bool = True):
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # size mismatch / missing keys: name the first one
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[1:3])
        raise CheckpointError(f"load: {source} does not fit this model ({detail}); check the model "
                              f"keys of the config against the checkpoint's configs/") from e


def load_full_weights(engine, groups, sd: dict, num_layers: int, source: str) -> None:
    """Weights given as one full state dict (our GPTNeoX names) into this rank's shard.

    Any layout: the tensor-parallel shard is cut here, and each pipeline stage takes its
    own layers. Every rank holds the whole model in CPU memory meanwhile.
    """
    from megatron.checkpoint.layout import model_to_layer_state_dicts, split_tp_shards
    from megatron.parallel import layer_modules

    tp = groups.tp_size if groups is not None else 1
    shard = split_tp_shards(sd, tp)[groups.tp_rank] if tp > 1 else sd
    layers = model_to_layer_state_dicts(shard, num_layers)
    model = getattr(engine.module, "model", engine.module)  # SequentialGPTNeoX wraps the GPTNeoX
    seen = set()
    for idx, module in layer_modules(model).items():
        if id(module) in seen:  # a tied head is the embedding module
            continue
        seen.add(id(module))
        if idx not in layers:
            raise CheckpointError(f"load: {source} has no weights for pipeline layer {idx}; it is incomplete")
        result = _load_state_checked(module, layers[idx], f"{source} (layer {idx})", strict=False)
        missing = [k for k in result.missing_keys if k in dict(module.named_parameters())]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"load: {source} layer {idx} does not fit this model (missing {missing}, "
                                  f"unexpected {result.unexpected_keys}); check the model keys of the config")
    refresh_master_weights(engine)


def load_checkpoint_weights(args, engine, groups, info) -> None:
    """Weights only from a NeoX-layout checkpoint, whatever its tp and pipeline layout."""
    pipelined_ckpt = any(n.startswith("layer_") for n in os.listdir(info.path))
    same_tp = info.layout.get("tp") == (groups.tp_size if groups is not None else 1)
    if same_tp and pipelined_ckpt == hasattr(engine.module, "load_state_dir"):
        load_module_only(engine, info.path)
        return
    from megatron.checkpoint.layout import read_neox_checkpoint

    _, sd = read_neox_checkpoint(info.path)
    load_full_weights(engine, groups, sd, args.num_layers, info.path)


def check_files_exist(paths: list[str], hint: str = "") -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise CheckpointError(f"load: {path} is missing; the checkpoint is incomplete, load another "
                                  f"'iteration'{hint}")


def own_layer_files(engine, ckpt_dir: str) -> list[str]:
    """The per-layer files this pipeline stage reads (DeepSpeed asserts without a name when one is missing)."""
    module = engine.module
    if not hasattr(module, "ckpt_layer_path"):
        return []
    return [module.ckpt_layer_path(ckpt_dir, i) for i, f in enumerate(module.forward_funcs)
            if hasattr(f, "load_state_dict")]
