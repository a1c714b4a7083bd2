"""Everything about checkpoints: what is on disk, how it is written, how it is read back.

The package sits below training/ and eval/ (it imports neither) and above config/,
model/ and parallel/. Its modules, bottom up:

- ``collective``: the rank/barrier helpers a save or load needs.
- ``files``: what a checkpoint directory holds, checksums, integrity and shape checks.
- ``layout``: GPT-NeoX's names and layer numbering, tensor-parallel merge/split, the
  converters' weights-only checkpoints, HF-side loading.
- ``tags``: ``global_stepN`` tags, ``latest`` and the atomic publish; pruning.
- ``health``: which checkpoints are trustworthy (the run's own losses decide).
- ``save_dir``: one writer per save directory, and never overwriting progress.
- ``rng``, ``weights``, ``elastic``: RNG states, weights-only sources, another layout.
- ``save`` and ``load``: the two calls training makes.

Training, eval and tools use the names below, never a module inside.
"""
from megatron.checkpoint.tags import checkpoint_tag, extra_state_name, list_checkpoints
from megatron.checkpoint.elastic import MOMENTS, SourceCheckpoint
from megatron.checkpoint.files import (
    EXTRA_STATE_SUFFIX, checkpoint_files, checksum_problems, load_torch, read_checkpoint_info, read_checksums,
)
from megatron.checkpoint.health import CheckpointHealth
from megatron.checkpoint.layout import (
    LAYER_FILE, MP_FILE, check_output_free, checkpoint_neox_args, layer_prefixes, load_model, merge_tp_shards,
    neox_args_dict, neox_model_yaml, read_neox_checkpoint, resolve_step_dir, save_neox_checkpoint, split_tp_tensor,
)
from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.save import save_checkpoint, should_save
from megatron.checkpoint.save_dir import check_planned_saves, check_save_step, lock_save_dir

__all__ = [
    "CheckpointHealth", "EXTRA_STATE_SUFFIX", "LAYER_FILE", "MOMENTS", "MP_FILE", "SourceCheckpoint",
    "check_output_free", "check_planned_saves", "check_save_step", "checkpoint_files", "checkpoint_neox_args",
    "checkpoint_tag", "checksum_problems", "extra_state_name", "layer_prefixes", "list_checkpoints",
    "load_checkpoint", "load_model", "load_torch", "lock_save_dir", "merge_tp_shards", "neox_args_dict",
    "neox_model_yaml", "read_checkpoint_info", "read_checksums", "read_neox_checkpoint", "resolve_step_dir",
    "save_checkpoint", "save_neox_checkpoint", "should_save", "split_tp_tensor",
]
