"""Resume a checkpoint on another parallel layout (data, tensor, pipe parallel size, ZeRO stage).

DeepSpeed can only reload the layout it saved. Here every piece of the checkpoint is
read back by NeoX parameter name instead, which no layout changes: ``"{layer}.{key}"``
with NeoX's pipeline layer index (``"2.attention.dense.weight"``), the same for the pp=0
module (``sequential.2.…``), a pipeline stage (``2.…``) and its tied embedding
(``tied_modules.embed.…`` is layer 0).

``SourceCheckpoint`` finds, for every name, where each tensor-parallel shard of the
weight, the fp32 master weight and the two Adam moments live: in the pp=0 ``module``,
in ``layer_XX-model_YY`` files, in the ZeRO-0 optimizer state of an mp_rank file
(indexed through the parameter names each rank records in its ``layout``), as fragments
of the flat ZeRO-1/2 (or bf16) partitions, found through DeepSpeed's own
``param_slice_mappings``, or as ZeRO-3's padded per-parameter pieces. ``load_other_layout``
then walks this rank's parameters one at a time: merge the source shards into the full
tensor (`merge_tp_tensor`, which sums row-parallel bias shards), cut this rank's slice,
and install it into whatever optimizer the engine runs (our AdamW, DeepSpeed's fp16/bf16
wrapper with its fp32 copies, the fp32 partition fragments its ZeRO-1/2 and bf16
optimizers link to each parameter, or ZeRO-3's ``set_full_hp_param``). Files are
memory-mapped, so the peak is one full parameter with its two moments, plus this rank's
shards.

L2E statistics are per channel slice of a tp rank; they are concatenated in tp order
and re-cut. The global batch stays the checkpoint's unless the config pins
``train_batch_size``; either way the data continues at the consumed-sample count
(DeepSpeed's ``global_samples``), said in one line.
"""
from __future__ import annotations

import glob
import logging
import os
import re

import torch
import torch.distributed as dist

from megatron.checkpoint import collective, rng
from megatron.checkpoint.files import ZERO3_PREFIX, engine_state_file
from megatron.checkpoint.layout import merge_tp_tensor, split_tp_tensor
from megatron.errors import CheckpointError
from megatron.parallel.groups import build_topology

log = logging.getLogger(__name__)

_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_EXTRA_FILE = re.compile(r"^rank_(\d+)_extra_state\.pt$")
# What must match for DeepSpeed's own loader; anything else goes through this module.
_ENGINE_KEYS = ("dp", "tp", "pp", "zero_stage", "precision")
MOMENTS = ("exp_avg", "exp_avg_sq")


def canonical_name(name: str) -> str:
    """Engine parameter name -> the layout-free ``"{layer}.{key}"``."""
    name = name.removeprefix("module.").removeprefix("sequential.")
    if name.startswith("tied_modules.embed."):
        name = "0." + name[len("tied_modules.embed."):]
    if not name.split(".", 1)[0].isdigit():
        raise CheckpointError(f"parameter {name!r} is not under a NeoX layer index; cannot map it across layouts")
    return name


# ----------------------------------------------------------------------------- layouts


def current_layout(args, engine) -> dict:
    """This run's layout, as saved in every checkpoint's client state (``layout``)."""
    return {
        "dp": args.data_parallel_size, "tp": args.model_parallel_size, "pp": args.pipe_parallel_size,
        "zero_stage": engine.zero_optimization_stage(), "world_size": args.world_size,
        "train_batch_size": args.train_batch_size,
        "train_micro_batch_size_per_gpu": args.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "precision": args.precision,
        "train_batch_size_explicit": "train_batch_size" in args._batch_given,
    }


def _per_parameter_groups(optimizer) -> list[list] | None:
    """The model parameters per param group of an optimizer that keeps one state (and one
    fp32 master) per parameter: our AdamW at ZeRO-0, or DeepSpeed's unfused fp16/bf16
    wrapper around it. None for the flat-partition optimizers (ZeRO, BF16_Optimizer)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, torch.optim.Optimizer):
        return [g["params"] for g in optimizer.param_groups]
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return optimizer.fp16_groups
    return None


def _optimizer_param_names(engine) -> list[list[str]] | None:
    """Per param group, the names behind a per-parameter optimizer state, which DeepSpeed
    saves indexed by position only (the partitioned optimizers save names themselves)."""
    groups = _per_parameter_groups(engine.optimizer)
    if groups is None:
        return None
    try:
        names = {id(p): canonical_name(n) for n, p in engine.module.named_parameters()}
    except CheckpointError:  # not a NeoX module: saving goes on, another layout cannot take its optimizer
        return None
    groups = [[names.get(id(p)) for p in g] for g in groups]
    return None if any(n is None for g in groups for n in g) else groups


def layout_state(args, engine, groups) -> dict:
    """The ``layout`` entry of this rank's client state: the run's layout, where this
    rank sits in it, and the names behind its optimizer state."""
    return {**current_layout(args, engine), "pp_rank": groups.pp_rank, "tp_rank": groups.tp_rank,
            "param_names": _optimizer_param_names(engine)}


def _load(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"load: {path} is missing; the checkpoint is incomplete")
    try:  # our own checkpoint: DeepSpeed's files hold dataclasses, so not weights_only
        try:  # memory-mapped: tensors are paged in when read, one parameter at a time
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)  # the legacy (pre-zip) format
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"load: {path} is unreadable ({e}); the checkpoint is damaged") from e


def _precision(ds_config: dict) -> str:
    if (ds_config.get("bf16") or {}).get("enabled"):
        return "bfloat16"
    return "fp16" if (ds_config.get("fp16") or {}).get("enabled") else "fp32"


def infer_layout(ckpt_dir: str, meta0: dict) -> dict:
    """The layout of a checkpoint saved before ``layout`` was recorded, from its files."""
    names = os.listdir(ckpt_dir)
    embed_files = [n for n in names if n.startswith("layer_00-model_")]
    mp_files = [n for n in names if re.match(r"^(zero_pp_rank_0_)?mp_rank_\d+_model_states\.pt$", n)]
    tp = len(embed_files) or len(mp_files)
    pp = len(mp_files) // tp if embed_files else 0  # layer files: a DeepSpeed pipeline (pp >= 1)
    ds = meta0.get("ds_config") or {}
    dp = int(meta0.get("dp_world_size") or 1)
    return {
        "dp": dp, "tp": tp, "pp": pp, "zero_stage": int((ds.get("zero_optimization") or {}).get("stage", 0)),
        "world_size": dp * tp * max(pp, 1), "train_batch_size": ds.get("train_batch_size"),
        "train_micro_batch_size_per_gpu": ds.get("train_micro_batch_size_per_gpu"),
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps"),
        "precision": _precision(ds), "train_batch_size_explicit": False,
    }


def saved_layout(ckpt_dir: str) -> dict | None:
    """The checkpoint's layout, recorded or inferred; None when it has no model-state file
    we know (DeepSpeed's loader then reports what is wrong)."""
    path = engine_state_file(ckpt_dir)
    if not os.path.isfile(path):
        return None
    meta0 = _load(path)
    return meta0.get("layout") or infer_layout(ckpt_dir, meta0)


def needs_elastic(saved: dict | None, current: dict) -> bool:
    """True when DeepSpeed's loader cannot read ``saved`` into this run."""
    if saved is None:
        return False
    return saved.get("resharded", False) or any(saved.get(k) != current.get(k) for k in _ENGINE_KEYS)


def describe(layout: dict) -> str:
    return (f"dp={layout['dp']} tp={layout['tp']} pp={layout['pp']} ZeRO-{layout['zero_stage']} "
            f"{layout['precision']}")


# ----------------------------------------------------------------------------- reading


def _adam_state(saved_optimizer: dict) -> dict:
    """Our AdamW's state_dict, also when DeepSpeed's fp16/bf16 wrapper nests it."""
    return saved_optimizer.get("optimizer_state_dict", saved_optimizer)


def _group_state(osd: dict, g: int) -> dict:
    """Adam's state of flat partition ``g`` in a ZeRO optimizer file (stage 1/2, bf16 or 3)."""
    base = osd["base_optimizer_state"] if "base_optimizer_state" in osd else osd["optimizer_state_dict"]
    return base["state"][g] if isinstance(base, dict) else base[g]  # a list: "elastic" ZeRO checkpoints


class SourceCheckpoint:
    """Every tensor of a checkpoint, by layout-free parameter name, read lazily."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.layout = saved_layout(ckpt_dir)
        if self.layout is None:
            raise CheckpointError(f"load: {ckpt_dir} has no mp_rank_00_model_states.pt; not a checkpoint of ours")
        # by the files, not the label: a resharded checkpoint says the target's ZeRO stage
        self.zero3 = os.path.basename(engine_state_file(ckpt_dir)).startswith(ZERO3_PREFIX)
        model_file = re.compile(r"^zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt$" if self.zero3
                                else r"^mp_rank_(\d+)_model_states\.pt$")
        self.meta = {int(m.group(1)): _load(os.path.join(ckpt_dir, n))
                     for n in sorted(os.listdir(ckpt_dir)) if (m := model_file.match(n))}
        self.tp = self.layout["tp"]
        self._files: dict[str, dict] = {}
        self.shapes: dict[str, dict[int, torch.Size]] = {}  # name -> tp rank -> shard shape
        self.weight_at: dict[str, dict[int, tuple]] = {}  # name -> tp rank -> where the weight is
        self.optim_at: dict[str, dict[int, tuple]] = {}  # name -> tp rank -> where its Adam state is
        self.no_optimizer_reason = "it holds no optimizer state for it; set no_load_optim: true"
        self._index_weights()
        self._index_optimizer()

    # -- where things are

    def _tp_rank(self, mp: int) -> int:
        layout = self.meta[mp].get("layout")
        return layout["tp_rank"] if layout else mp % self.tp

    def file(self, name: str) -> dict:
        if name not in self._files:
            self._files[name] = _load(os.path.join(self.dir, name))
        return self._files[name]

    def _index_weights(self):
        if self.zero3:  # the module holds empty placeholders; the weights are the fp32 partitions
            for mp, meta in self.meta.items():
                for group in meta["param_shapes"]:
                    for key, shape in group.items():
                        self.shapes.setdefault(canonical_name(key), {})[self._tp_rank(mp)] = shape
                        self.weight_at.setdefault(canonical_name(key), {})[self._tp_rank(mp)] = ("zero3",)
            return
        if self.layout["pp"] == 0:
            for mp, meta in self.meta.items():
                for key, t in (meta.get("module") or {}).items():
                    name = canonical_name(key)
                    self.weight_at.setdefault(name, {})[self._tp_rank(mp)] = ("module", mp, key)
                    self.shapes.setdefault(name, {})[self._tp_rank(mp)] = t.shape
            return
        for path in sorted(glob.glob(os.path.join(self.dir, "layer_*-model_*-model_states.pt"))):
            base = os.path.basename(path)
            idx, tp_rank = (int(x) for x in re.match(r"^layer_(\d+)-model_(\d+)-", base).groups())
            for key, t in self.file(base).items():
                name = f"{idx}.{key}"
                self.weight_at.setdefault(name, {})[tp_rank] = ("layer", base, key)
                self.shapes.setdefault(name, {})[tp_rank] = t.shape

    def _index_optimizer(self):
        zero_files = sorted((int(m.group(2)), int(m.group(1)), n) for n in os.listdir(self.dir)
                            if (m := _ZERO_FILE.match(n)))
        if zero_files:  # ZeRO-1/2 or bf16: fragments of flat partitions, one file per (mp, dp)
            for mp, dp, base in zero_files:
                for key, g, start, numel in self._fragments(mp, base):
                    entry = self.optim_at.setdefault(canonical_name(key), {})
                    entry.setdefault(self._tp_rank(mp), ("zero", []))[1].append((dp, base, g, start, numel))
            for entry in self.optim_at.values():
                for _, fragments in entry.values():
                    fragments.sort()
            return
        for mp, meta in self.meta.items():  # ZeRO-0: a per-parameter state indexed by position
            optimizer = meta.get("optimizer")
            if not optimizer:
                continue
            names = (meta.get("layout") or {}).get("param_names")
            if names is None:  # an error only if the optimizer is wanted (not with no_load_optim)
                self.no_optimizer_reason = (
                    f"its ZeRO-0 optimizer state has no parameter names (saved before layouts were recorded); "
                    f"resume with its layout ({describe(self.layout)}) or set no_load_optim: true")
                continue
            for g, (group, group_names) in enumerate(zip(_adam_state(optimizer)["param_groups"], names)):
                for i, (index, name) in enumerate(zip(group["params"], group_names)):
                    self.optim_at.setdefault(name, {})[self._tp_rank(mp)] = ("plain", mp, index, g, i)

    def _fragments(self, mp: int, base: str):
        """(name, group, start, numel) of every parameter's piece in one ZeRO optimizer file."""
        osd = self.file(base)["optimizer_state_dict"]
        if not self.zero3:
            if "param_slice_mappings" not in osd:
                raise CheckpointError(f"load: {base} has no param_slice_mappings (DeepSpeed too old); "
                                      "resume with the layout it was saved with")
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                for key, frag in mapping.items():
                    yield key, g, frag.start, frag.numel
            return
        # ZeRO-3 cuts every parameter into dp equal (padded) pieces; a rank's sub-group
        # partitions hold its pieces back to back, in param_shapes order.
        sizes = [t.numel() for t in osd["fp32_flat_groups"]]
        g, offset = 0, 0
        for group in self.meta[mp]["param_shapes"]:
            for key, shape in group.items():
                piece = -(-shape.numel() // self.layout["dp"])
                while offset + piece > sizes[g]:
                    g, offset = g + 1, 0
                yield key, g, offset, piece
                offset += piece

    # -- reading one parameter

    def names(self) -> list[str]:
        return list(self.weight_at)

    def _weight_shard(self, name: str, tp_rank: int) -> torch.Tensor:
        kind, where, key = self.weight_at[name][tp_rank]
        return self.meta[where]["module"][key] if kind == "module" else self.file(where)[key]

    def _optim_shard(self, name: str, tp_rank: int, what: str) -> torch.Tensor | None:
        """One tp shard of ``what`` (``master``, ``exp_avg``, ``exp_avg_sq``); None if not saved."""
        where = self.optim_at.get(name, {}).get(tp_rank)
        if where is None:
            return None
        if where[0] == "plain":
            _, mp, index, g, i = where
            optimizer = self.meta[mp]["optimizer"]
            if what == "master":  # DeepSpeed's fp16/bf16 wrapper keeps fp32 copies; else the weights are
                return optimizer["fp32_groups"][g][i] if "fp32_groups" in optimizer else None
            state = _adam_state(optimizer)["state"].get(index)
            return state[what] if state else None
        parts = []
        for _, base, g, start, numel in where[1]:
            osd = self.file(base)["optimizer_state_dict"]
            if what == "master":
                flat = osd["fp32_flat_groups" if self.zero3 else "single_partition_of_fp32_groups"][g]
            else:
                flat = _group_state(osd, g)[what]
            parts.append(flat.narrow(0, start, numel))
        shape = self.shapes[name][tp_rank]
        return torch.cat(parts)[:shape.numel()].view(shape)  # ZeRO-3 pads the last piece

    def step(self, name: str) -> int:
        """Adam's step count of ``name`` (0 when no optimizer state was saved)."""
        where = self.optim_at.get(name, {}).get(0)
        if where is None:
            return 0
        if where[0] == "plain":
            state = _adam_state(self.meta[where[1]]["optimizer"])["state"].get(where[2])
            return int(state["step"]) if state else 0
        _, base, g, _, _ = where[1][0]
        osd = self.file(base)["optimizer_state_dict"]
        return int(osd.get("base_optimizer_state_step", _group_state(osd, g).get("step", 0)))

    def full(self, name: str, what: str = "master") -> torch.Tensor | None:
        """The full fp32 tensor ``what`` of parameter ``name``, merged over the source tp ranks."""
        if name not in self.weight_at:
            raise CheckpointError(f"load: {self.dir} has no parameter {name}; the model shape changed")
        parts = []
        for t in range(self.tp):
            if t not in self.weight_at[name]:
                raise CheckpointError(f"load: {self.dir} lacks tensor-parallel shard {t} of {name}; it is incomplete")
            shard = self._optim_shard(name, t, what)
            if shard is None:
                if what != "master":
                    return None
                shard = self._weight_shard(name, t)
            parts.append(shard.float())
        return merge_tp_tensor(name, parts, moment=what != "master")

    # -- everything else

    def extra_states(self) -> dict[int, dict]:
        """{source global rank: its rank_*_extra_state.pt}."""
        found = {}
        for name in os.listdir(self.dir):
            match = _EXTRA_FILE.match(name)
            if match:
                found[int(match.group(1))] = torch.load(os.path.join(self.dir, name), map_location="cpu",
                                                        weights_only=True)
        return found

    def merged_l2e(self, extras: dict[int, dict], dp_rank: int = 0) -> dict | None:
        """Full-width L2E state of every layer: each layer's statistics from the source tp
        ranks that hold it (any pipeline stage), concatenated along the channel axis."""
        layout = self.layout
        topology = build_topology(layout["world_size"], layout["pp"], self.tp)
        by_layer: dict[int, dict[int, dict]] = {}
        iteration = None
        for rank, extra in sorted(extras.items()):
            state = extra.get("l2e")
            coord = topology.get_coord(rank)
            if state is None or coord.data != dp_rank % layout["dp"]:
                continue
            iteration = state["iteration"]
            for layer, sd in state["layers"].items():
                by_layer.setdefault(layer, {})[coord.model] = sd
        if iteration is None:
            return None
        layers = {}
        for layer, shards in by_layer.items():
            first = shards[0]
            merged = {k: v for k, v in first.items() if not torch.is_tensor(v)}
            for k in ("mean", "M2"):
                merged[k] = torch.cat([shards[t][k] for t in range(self.tp)], dim=-1)
            layers[layer] = merged
        return {"iteration": iteration, "layers": layers}


# ----------------------------------------------------------------------------- installing


def _engine_params(engine) -> list[tuple[str, torch.nn.Parameter]]:
    seen, params = set(), []
    for key, p in engine.module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append((canonical_name(key), p))
    return params


def _adam_step_tensor(step: int, group: dict, device) -> torch.Tensor:
    # torch's AdamW keeps `step` as a float32 tensor, on the parameter's device when fused
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")


def _slice(name: str, full: torch.Tensor, tp_rank: int, tp: int, moment: bool = False) -> torch.Tensor:
    return split_tp_tensor(name, full, tp, moment=moment)[tp_rank]


def _masters(optimizer) -> dict | None:
    """{id(model parameter): (its fp32 master, its Adam param group)} for a per-parameter
    optimizer (the master is the parameter itself for our AdamW); None for flat partitions."""
    groups = _per_parameter_groups(optimizer)
    if groups is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        return {id(p): (p, g) for g in optimizer.param_groups for p in g["params"]}
    base_groups = optimizer.optimizer.param_groups  # the wrapper's fp32 copies, group by group
    return {id(p): (m, base_groups[g]) for g, (lps, ms) in enumerate(zip(groups, optimizer.fp32_groups))
            for p, m in zip(lps, ms)}


def _param_state(source: SourceCheckpoint, name: str, tp_rank: int, tp: int, load_optim: bool):
    """This rank's slice of ``name``'s fp32 weight and, if wanted, of its two Adam moments."""
    weight = _slice(name, source.full(name), tp_rank, tp)
    moments = {k: source.full(name, k) for k in MOMENTS} if load_optim else {}
    if load_optim and any(v is None for v in moments.values()):
        raise CheckpointError(f"load: cannot restore the Adam state of {name} from {source.dir}: "
                              f"{source.no_optimizer_reason}")
    return weight, {k: _slice(name, v, tp_rank, tp, moment=True) for k, v in moments.items()}


def _install_zero3(optimizer, source: SourceCheckpoint, params, tp_rank: int, tp: int, load_optim: bool) -> None:
    """ZeRO-3: DeepSpeed's own per-parameter setters write this rank's piece of the fp32
    partitions (and of Adam's state); the working copies are then refreshed from them."""
    base = optimizer.optimizer
    flats = optimizer.fp32_partitioned_groups_flat
    if load_optim:
        step = source.step(params[0][0])
        for i, flat in enumerate(flats):
            group = base.param_groups[optimizer.sub_group_to_group_id[i]]
            base.state[flat] = {"step": _adam_step_tensor(step, group, flat.device),
                                **{k: torch.zeros_like(flat) for k in MOMENTS}}
    with torch.no_grad():
        for name, p in params:
            weight, moments = _param_state(source, name, tp_rank, tp, load_optim)
            optimizer.set_full_hp_param(weight, p)
            for k, v in moments.items():
                optimizer.set_full_hp_param(v, p, k)
        for working, master in zip(optimizer.fp16_partitioned_groups_flat, flats):
            working.data.copy_(master.data)


def install_state(engine, source: SourceCheckpoint, tp_rank: int, tp: int, load_optim: bool = True) -> None:
    """Put ``source``'s weights (and Adam state) into this rank's engine, one parameter at a time."""
    optimizer = engine.optimizer
    params = _engine_params(engine)
    if engine.zero_optimization_stage() == 3:
        _install_zero3(optimizer, source, params, tp_rank, tp, load_optim)
        return
    masters = _masters(optimizer)
    if masters is None and not all(hasattr(p, "_hp_mapping") for _, p in params):
        raise CheckpointError(
            f"load: this run's optimizer ({type(optimizer).__name__}: ZeRO stage {engine.zero_optimization_stage()}) "
            "cannot take a checkpoint from another layout; run with ZeRO stage 0-3 and our AdamW, or resume "
            "with the layout the checkpoint was saved with"
        )
    base = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer
    if load_optim and masters is None:  # DeepSpeed's flat fp32 partitions: one Adam state per param group
        for group in base.param_groups:
            flat = group["params"][0]
            base.state[flat] = {"step": None, **{k: torch.zeros_like(flat) for k in MOMENTS}}
    with torch.no_grad():
        for name, p in params:
            weight, moments = _param_state(source, name, tp_rank, tp, load_optim)
            p.data.copy_(weight)
            if masters is not None:
                master, group = masters[id(p)]
                master.data.copy_(weight)
                if load_optim:
                    base.state[master] = {"step": _adam_step_tensor(source.step(name), group, master.device),
                                          **{k: v.to(master.device).clone() for k, v in moments.items()}}
                continue
            mapping = p._hp_mapping
            if mapping is None:  # no element of this parameter in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            mapping.hp_fragment.data.copy_(weight.flatten().narrow(0, lp.start, lp.numel))
            if load_optim:
                group = base.param_groups[mapping.param_group_index]
                state = base.state[group["params"][0]]
                for k, v in moments.items():
                    state[k].narrow(0, hp.start, hp.numel).copy_(v.flatten().narrow(0, lp.start, lp.numel))
                state["step"] = _adam_step_tensor(source.step(name), group, p.device)
    if load_optim and masters is None:
        for group in base.param_groups:  # a group none of whose fragments are here still steps
            state = base.state[group["params"][0]]
            if state["step"] is None:
                state["step"] = _adam_step_tensor(source.step(params[0][0]), group, group["params"][0].device)
        if hasattr(optimizer, "_hp_optimizer_states_linked"):
            optimizer._hp_optimizer_states_linked = False  # re-link the fragments to the new state


# ----------------------------------------------------------------------------- batch, L2E, RNG


def _keep_global_batch(args, engine, saved: dict) -> None:
    """The checkpoint's global batch, unless the config pins train_batch_size; one line either way."""
    old, new = saved.get("train_batch_size"), args.train_batch_size
    if old is None or old == new:
        return
    if "train_batch_size" in args._batch_given:
        collective.say(f"global batch {old} -> {new} (train_batch_size in the config); the data continues at sample "
             f"{engine.global_samples:,}, where the checkpoint stopped")
        return
    per_step = args.train_micro_batch_size_per_gpu * args.data_parallel_size
    if old % per_step:
        raise CheckpointError(
            f"load: the checkpoint's global batch {old} is not a multiple of train_micro_batch_size_per_gpu="
            f"{args.train_micro_batch_size_per_gpu} x {args.data_parallel_size} data-parallel ranks; set "
            f"train_batch_size (to keep {old} or choose another) or another micro-batch size"
        )
    engine.set_train_batch_size(old)
    args.train_batch_size, args.gradient_accumulation_steps = old, old // per_step
    collective.say(f"global batch {old} kept from the checkpoint: gradient_accumulation_steps={args.gradient_accumulation_steps} "
         f"on {args.data_parallel_size} data-parallel ranks (set train_batch_size to change it)")


def _load_l2e(l2e, source: SourceCheckpoint, extras: dict, groups, sync_stats: bool) -> None:
    merged = source.merged_l2e(extras, groups.dp_rank)
    if merged is None:
        log.info("%s holds no L2E state; L2E starts fresh", source.dir)
        return
    if not sync_stats and source.layout["dp"] != groups.dp_size:
        collective.say(f"L2E: sync_stats is off, so statistics were per data-parallel rank; rank r continues from the "
             f"checkpoint's rank r mod {source.layout['dp']}")
    layers = {}
    for layer, sd in merged["layers"].items():
        layers[layer] = {**sd, **{k: sd[k].chunk(groups.tp_size, dim=-1)[groups.tp_rank].clone()
                                  for k in ("mean", "M2")}}
    l2e.load_state_dict({"iteration": merged["iteration"], "layers": layers})


def load_other_layout(args, engine, groups, ckpt_dir: str, l2e=None) -> int:
    """Restore the checkpoint in ``ckpt_dir`` saved on another layout; returns its iteration."""

    source = SourceCheckpoint(ckpt_dir)
    saved = source.layout
    meta0 = source.meta[0]
    load_optim = not args.no_load_optim
    install_state(engine, source, groups.tp_rank, groups.tp_size, load_optim=load_optim)
    # The schedule's position is the iteration's, with or without the optimizer (NeoX's no_load_optim).
    if meta0.get("lr_scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta0["lr_scheduler"])
    iteration = int(meta0.get("iteration", meta0.get("global_steps", 0)))
    engine.global_steps = int(meta0.get("global_steps", iteration))
    engine.global_samples = int(meta0.get("global_samples", iteration * (saved.get("train_batch_size") or 0)))
    engine.skipped_steps = int(meta0.get("skipped_steps", 0))
    _keep_global_batch(args, engine, saved)
    extras = source.extra_states()
    if not args.no_load_rng and extras.get(collective.rank(), {}).get("rng") is not None:
        rng.set_rng_state(extras[collective.rank()]["rng"])  # per process: the same stream only where this rank existed
    if l2e is not None:
        _load_l2e(l2e, source, extras, groups, args.l2e.sync_stats)
    collective.say(f"resumed {ckpt_dir} at iteration {iteration} on another layout: saved {describe(saved)}, "
         f"now {describe(current_layout(args, engine))}")
    return iteration
