"""Loading: what ``load`` names decides what is restored.

Our own checkpoint on the same layout resumes exactly (DeepSpeed's engine state plus
our per-rank extra state); on another layout elastic.py re-cuts it by parameter name; a
weights-only checkpoint, ``finetune`` or an HF GPT-NeoX directory give weights that
continue at a step. docs/checkpoints.md has the matrix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


from megatron.checkpoint import collective, elastic, files, resume_checks, rng, tags, weights
from megatron.errors import CheckpointError

@dataclass
class Restored:
    """What a load brought back; ``line()`` is the report printed at startup."""

    source: str
    iteration: int
    samples: int
    weights: str = "✓"
    optimizer: str = "✗ (fresh)"
    schedule_at: int = 0
    l2e: str = "– (off)"
    rng: str = "✗ (fresh)"

    def line(self) -> str:
        return (f"restored from {self.source}: weights {self.weights}  optimizer {self.optimizer}  "
                f"schedule at {self.schedule_at}  data at sample {self.samples:,}  "
                f"L2E state {self.l2e}  rng {self.rng}")


def _from_scratch(why: str) -> int:
    collective.say(f"starting from scratch: {why}; fresh weights at step 0")
    return 0


def _resolve_tag(args, directory: str) -> str | None:
    """The tag to load, or None for a fresh run writing into its own (empty) save dir."""
    if args.iteration is not None:  # NeoX's `iteration` key picks a specific step
        return tags.checkpoint_tag(args.iteration)
    tag = tags.read_latest(directory)
    if tag == "":
        available = [t for _, t in tags.list_checkpoints(directory)]
        raise CheckpointError(
            f"load: {os.path.join(directory, 'latest')} is empty; write the step to resume into it "
            f"(one of {available}) or pass it with the 'iteration' key")
    if tag is not None:
        return tag
    if os.path.abspath(directory) == os.path.abspath(args.save or "") and not tags.list_checkpoints(directory):
        return None
    raise CheckpointError(
        f"load: {directory} has no 'latest' file; pass the step with the 'iteration' key "
        f"or point 'load' at a directory written by save_checkpoint"
    )


def _tag_dir(directory: str, tag: str) -> str:
    path = os.path.join(directory, tag)
    if os.path.isdir(path):
        return tag
    if os.path.isdir(path + tags.PARKED_SUFFIX):  # a publish died between its two renames
        return tag + tags.PARKED_SUFFIX
    raise CheckpointError(
        f"load: checkpoint {path} does not exist; check 'load' / 'iteration' "
        f"(available: {[t for _, t in tags.list_checkpoints(directory)]})"
    )


def _layout_without_groups(args, engine) -> dict:
    """An engine built without parallel groups: no tensor parallelism, data-parallel
    over the whole world (elastic.current_layout describes a run with groups)."""
    _, world = collective.rank_world()
    return {"tp": 1, "pp": getattr(args, "pipe_parallel_size", 0), "dp": world,
            "zero_stage": engine.zero_optimization_stage(), "world_size": world}


def layout_differences(saved: dict, current: dict) -> list[str]:
    """``key saved->current`` for every layout key the checkpoint records and this run changes."""
    return [f"{k} {saved[k]}->{current[k]}" for k in current
            if saved.get(k) is not None and saved[k] != current[k]]


def _start_schedule(args, engine, iteration: int) -> None:
    """A load without scheduler state: the LR schedule continues at ``iteration``."""
    engine.global_steps = iteration
    engine.global_samples = iteration * engine.train_batch_size()
    if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "start_at"):
        engine.lr_scheduler.start_at(iteration, getattr(args, "lr_rewarmup_iters", 0))


def _schedule_position(engine, iteration: int) -> int:
    return getattr(engine.lr_scheduler, "num_iters", iteration)


def _report(restored: Restored) -> int:
    collective.say(restored.line())
    return restored.iteration


def _new_l2e_state(l2e) -> str:
    return "✗ (new: statistics start empty and warm up)" if l2e is not None else "– (off)"


def _continue_from_hf(args, engine, groups, l2e) -> int:
    """``load`` is an HF GPT-NeoX directory: its weights, continued at ``iteration`` (or 0)."""
    from megatron.model.hf import read_hf_checkpoint

    directory = args.load
    _refuse_older_source(args, args.iteration)
    cfg, sd = read_hf_checkpoint(directory)
    files.check_architecture(directory, cfg, args)
    weights.load_full_weights(engine, groups, sd, cfg.num_layers, directory)
    iteration = 0 if args.finetune else (args.iteration or 0)
    _start_schedule(args, engine, iteration)
    return _report(Restored(source=f"{directory} (HF)", iteration=iteration,
                            samples=iteration * engine.train_batch_size(),
                            schedule_at=_schedule_position(engine, iteration), l2e=_new_l2e_state(l2e)))


def _continue_from_weights(args, engine, groups, l2e, info, iteration: int) -> int:
    """Weights only (a converter's output, or ``finetune``), continued at ``iteration``."""
    weights.load_checkpoint_weights(args, engine, groups, info)
    _start_schedule(args, engine, iteration)
    if getattr(args, "evaluating", False):  # eval.py names what it evaluates; no schedule to report
        return iteration
    return _report(Restored(source=info.path, iteration=iteration, samples=iteration * engine.train_batch_size(),
                            weights="✓ (finetune: weights only)" if args.finetune else "✓",
                            schedule_at=_schedule_position(engine, iteration), l2e=_new_l2e_state(l2e)))


def _refuse_older_source(args, iteration: int | None) -> None:
    """A requeued job whose ``load`` still names its starting point (an HF directory, a
    converted or an older checkpoint) would retrain and re-save over its own newer
    checkpoints in ``save``: refuse, pointing at them."""
    save = getattr(args, "save", None)
    if args.finetune or not save or os.path.abspath(save) == os.path.abspath(args.load) or not os.path.isdir(save):
        return
    tag = tags.read_latest(save)
    match = tags.TAG_RE.match(tag or "")
    if match and int(match.group(1)) > (iteration or 0):
        raise CheckpointError(
            f"load: 'save' {save} already holds {tag}, newer than step {iteration or 0} loaded from {args.load}; "
            f"set load: {save} to resume it, or give this run another 'save' directory"
        )


def _load_other_layout(args, engine, groups, l2e, info) -> int:
    """The checkpoint was saved with another parallel layout than this run's (or by
    tools/ckpts/reshard.py): elastic.py reads it by parameter name."""
    iteration = elastic.load_other_layout(args, engine, groups, info.path, l2e)
    optimizer = "✓ (resharded)" if info.has_optimizer and not args.no_load_optim else "✗ (fresh)"
    return _report(Restored(source=f"{info.path} (another layout)", iteration=iteration,
                            samples=engine.global_samples, optimizer=optimizer,
                            schedule_at=_schedule_position(engine, iteration),
                            l2e="✓ (resharded)" if l2e is not None else "– (off)",
                            rng="✓ where the rank existed" if not args.no_load_rng else "✗ (fresh)"))


def _check_own_files(engine, directory: str, tag: str, load_optimizer: bool) -> None:
    """The files DeepSpeed will read for this rank exist (it would start a fresh optimizer
    without a word when a ZeRO shard is missing)."""
    own_layers = weights.own_layer_files(engine, os.path.join(directory, tag))
    weights.check_files_exist([engine._get_ckpt_name(directory, tag), *own_layers])
    if load_optimizer and engine.zero_optimization():
        weights.check_files_exist([engine._get_zero_ckpt_name(directory, tag)],
                                  " (or set no_load_optim: true to continue with a fresh optimizer)")


def _resume(args, engine, l2e, info, directory: str, tag: str) -> int:
    """Same layout: DeepSpeed restores weights, optimizer and schedule; our extra state the rest."""
    extra_path = os.path.join(info.path, tags.extra_state_name(collective.rank()))
    extra = None
    if info.kind == "full":
        if os.path.isfile(extra_path):
            extra = files.load_torch(extra_path)
        elif not args.no_load_rng:
            raise CheckpointError(
                f"load: {extra_path} is missing (this rank's iteration, RNG and L2E state); restore it, "
                f"load another 'iteration', or set no_load_rng: true to continue without RNG and L2E state"
            )
    load_optimizer = info.has_optimizer and not args.no_load_optim
    _check_own_files(engine, directory, tag, load_optimizer)
    try:
        path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"load: {e.filename} is missing; the checkpoint is incomplete, "
                              f"load another 'iteration'") from e
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "Missing key" not in str(e):
            raise
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[1:3])
        raise CheckpointError(f"load: {info.path} does not fit this model ({detail}); check the model keys "
                              f"of the config against the checkpoint's configs/") from e
    if path is None:
        raise CheckpointError(f"load: DeepSpeed could not read {info.path}; the checkpoint is incomplete")
    iteration = extra["iteration"] if extra is not None else info.iteration
    if iteration is None:
        raise CheckpointError(f"load: {info.path} records no iteration; set 'iteration' or 'finetune: true'")
    if not load_optimizer:
        weights.refresh_master_weights(engine)
        if hasattr(engine.lr_scheduler, "start_at"):  # fresh moments: the optional re-warm-up
            engine.lr_scheduler.start_at(engine.lr_scheduler.num_iters, getattr(args, "lr_rewarmup_iters", 0))
    restored = Restored(source=info.path, iteration=iteration, samples=iteration * engine.train_batch_size(),
                        schedule_at=_schedule_position(engine, iteration))
    if load_optimizer:
        restored.optimizer = "✓"
    elif not info.has_optimizer:
        restored.optimizer = "✗ (fresh: not in the checkpoint)"
    else:
        restored.optimizer = "✗ (fresh: no_load_optim)"
    restored.rng = _restore_rng(args, info, extra)
    restored.l2e = _restore_l2e(l2e, extra, info.path)
    return _report(restored)


def _restore_rng(args, info, extra) -> str:
    if args.no_load_rng:
        return "✗ (no_load_rng)"
    if extra is not None:
        if extra.get("rng") is None:
            return "✗ (not saved)"
        rng.set_rng_state(extra["rng"])
        return "✓"
    return "✓ (NeoX)" if rng.restore_neox_rng(info.meta) else "✗ (not saved)"


def _restore_l2e(l2e, extra, source: str) -> str:
    if l2e is None:
        return "– (off)"
    if extra is None or extra.get("l2e") is None:
        return _new_l2e_state(l2e)
    try:
        l2e.load_state_dict(extra["l2e"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"load: the L2E state in {source} does not fit this run's l2e config ({e}); "
                              f"use the l2e block it was saved with") from e
    return "✓"


def load_checkpoint(args, engine, groups, l2e=None) -> int:
    """Restore the run from ``args.load``; returns the iteration to continue from.

    ``load`` may be our checkpoint directory (everything restored exactly), a NeoX-native
    one (weights, optimizer, schedule, NeoX's RNG), a weights-only one (a converter's
    output: weights, continued at its recorded iteration) or an HF GPT-NeoX directory
    (weights, continued at ``iteration``). ``finetune`` takes the weights only and starts
    at 0. docs/checkpoints.md has the matrix. Collective: every rank calls it.
    """
    directory = args.load
    if not directory:
        return _from_scratch("no 'load' is set")
    if not os.path.isdir(directory):
        if os.path.abspath(directory) == os.path.abspath(args.save or ""):
            # first launch of a run that saves and resumes in one directory
            return _from_scratch(f"load {directory} does not exist yet (it is also 'save')")
        raise CheckpointError(f"load: directory {directory} does not exist; fix 'load' or remove it")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return _continue_from_hf(args, engine, groups, l2e)
    tag = _resolve_tag(args, directory)
    if tag is None:
        return _from_scratch(f"load {directory} holds no checkpoint yet")
    tag = _tag_dir(directory, tag)
    ckpt_dir = os.path.join(directory, tag)
    if getattr(args, "checkpoint_verify", True):
        files.verify_checksums(ckpt_dir, may_be_missing=files.EXTRA_STATE_SUFFIX if args.no_load_rng else None)
    files.check_torch_files(ckpt_dir)
    info = files.read_checkpoint_info(ckpt_dir)
    files.check_model_shape(ckpt_dir, info.model_args, args, saved_tp=info.layout.get("tp"))
    files.check_architecture(ckpt_dir, files.saved_model_config(info), args, saved_tp=info.layout.get("tp"))
    _refuse_older_source(args, info.iteration)
    resume_checks.check_steps_left(args, ckpt_dir, info.iteration)
    resume_checks.check_resume_inputs(args, ckpt_dir)

    if args.finetune:
        return _continue_from_weights(args, engine, groups, l2e, info, 0)
    if info.kind == "weights":
        return _continue_from_weights(args, engine, groups, l2e, info, info.iteration or 0)
    if groups is not None:  # elastic's own comparison also catches a resharded checkpoint
        if elastic.needs_elastic(elastic.saved_layout(info.path), elastic.current_layout(args, engine)):
            return _load_other_layout(args, engine, groups, l2e, info)
    elif layout_differences(info.layout, _layout_without_groups(args, engine)):
        changed = ", ".join(layout_differences(info.layout, _layout_without_groups(args, engine)))
        raise CheckpointError(
            f"load: {info.path} was saved with another parallel layout ({changed}); resume with the "
            f"layout it was saved with, or load its weights only with 'finetune: true'"
        )
    return _resume(args, engine, l2e, info, directory, tag)
