"""NeoXArgs: the validated, derived configuration of one run.

    args = NeoXArgs.from_ymls(["configs/pythia/70M.yml", "configs/local_setup.yml"])
    args.configure_world(8)          # dp, and the batch triple, for 8 ranks
    args.set_vocab_size(50277)       # -> padded_vocab_size 50304
    cfg = args.model_config()        # megatron.model.ModelConfig

Derivation follows GPT-NeoX's ``calculate_derived`` (reference §2): batch triple,
data-parallel size, precision, lr, attention types per layer, padded vocab.
"""
import base64
import binascii
import dataclasses
import importlib.util
import json
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron.config import checks, compat
from megatron.config.l2e import L2EConfig
from megatron.config.loading import merge_yamls, normalize_key
from megatron.config.schema import (
    NO_EFFECT_KEYS, CheckpointArgs, DataArgs, EvalArgs, GenerationArgs, L2EArgs, LauncherArgs,
    LoggingArgs, ModelArgs, OptimizerArgs, ParallelArgs, PerformanceArgs, TrainingArgs,
)
from megatron.config.types import check_value, nearest_hint
from megatron.errors import ConfigError

# Command-line overrides, saved next to the YAML files in every checkpoint's configs/.
OVERRIDES_FILE = "command_line_overrides.yml"

log = logging.getLogger(__name__)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
              "gradient_accumulation_steps")
NEOX_CONFIG_FLAG = "--neox_config"  # deepy.py -> rank: the validated config
TOKENIZER_PATH_KEYS = ("vocab_file", "merge_file")
REQUIRED_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
_warned_no_ops: set = set()
_noted_batches: set = set()
PYTHIA_TRAIN_BATCH = 1024  # sequences per step of every Pythia model (2,097,152 tokens)


def _set_nested(mapping, path: list[str], value, key: str):
    """A copy of ``mapping`` (a config block such as ``l2e``) with ``path`` set to ``value``,
    for dotted overrides like ``l2e.inhibition=none``; other keys of the block are kept."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"--override {key}: '{key.split('.')[0]}' is not a mapping; "
                          f"override the whole key instead")
    out = dict(mapping)
    head, *rest = path
    out[head] = _set_nested(out.get(head), rest, value, key) if rest else value
    return out


@dataclass
class NeoXArgs(ModelArgs, ParallelArgs, OptimizerArgs, TrainingArgs, DataArgs,
               CheckpointArgs, LoggingArgs, EvalArgs, GenerationArgs, LauncherArgs,
               PerformanceArgs, L2EArgs):
    """Every GPT-NeoX key as a flat attribute, plus ours (``l2e``, ``data_preshuffled``,
    ``nan_tolerance``, ``eval_num_fewshot``)."""

    # Set per instance by _build; plain class attributes, so not config keys.
    _sources = {}
    _batch_given = {}

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_ymls(cls, paths, overrides: dict | None = None) -> "NeoXArgs":
        """Load, merge (disjoint), apply command-line overrides, validate and derive.

        The overrides are kept beside the raw YAML texts (as ``OVERRIDES_FILE``), so a
        checkpoint's ``configs/`` folder rebuilds exactly the run's arguments.
        """
        values, sources, texts = merge_yamls(paths)
        _resolve_tokenizer_paths(values, sources)
        for key, value in (overrides or {}).items():
            top, *path = normalize_key(key).split(".")
            values[top] = _set_nested(values.get(top), path, value, key) if path else value
            sources[top] = "command line"
        if overrides:
            texts = {**texts, OVERRIDES_FILE: yaml.safe_dump(dict(overrides), sort_keys=False)}
        return cls._build(values, sources, texts)

    @classmethod
    def from_config_dir(cls, folder) -> "NeoXArgs | None":
        """The arguments saved in a checkpoint's ``configs/`` folder (None if it has none)."""
        folder = Path(folder)
        files = sorted(p for p in folder.glob("*.y*ml") if p.name != OVERRIDES_FILE)
        if not files:
            return None
        overrides_path = folder / OVERRIDES_FILE
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else None
        args = cls.from_ymls([str(p) for p in files], overrides=overrides)
        from megatron.tokenizer import resolve_tokenizer_path

        for key in TOKENIZER_PATH_KEYS:  # else the copy the checkpoint carries (global_stepN/tokenizer/)
            setattr(args, key, resolve_tokenizer_path(getattr(args, key), str(folder.parent)))
        return args

    @classmethod
    def from_dict(cls, d: dict, config_files: dict | None = None, announce: bool = True) -> "NeoXArgs":
        """Inverse of :meth:`to_dict`; ``config_files`` may also sit inside ``d``.
        ``announce=False``: no warnings about no-op keys (someone gave them already)."""
        d = {normalize_key(k): v for k, v in d.items()}
        embedded = d.pop("config_files", None)
        files = config_files if config_files is not None else embedded
        return cls._build(d, {k: "config dict" for k in d}, files or {}, announce)

    @classmethod
    def _build(cls, values: dict, sources: dict, texts: dict, announce: bool = True) -> "NeoXArgs":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        checks.check_computed_keys({k: sources[k] for k in values if values[k] is not None})
        kwargs = {}
        for key, value in values.items():
            src = sources[key]
            if key == "l2e":
                kwargs[key] = L2EConfig.from_dict(value, source=src)
            elif key in fields:
                kwargs[key] = check_value(key, value, hints[key], src)
                _check_supported(key, kwargs[key], fields[key], src)
            elif key in compat.NEOX_RUNTIME_KEYS:
                continue
            elif key in compat.NEOX_ONLY_DEFAULTS:
                if not compat.is_neox_default(key, value):
                    raise ConfigError(f"{src}: {key}={value!r} is not supported by neox-l2e; "
                                      f"remove the key")
            else:
                valid = [*fields, *compat.NEOX_ONLY_DEFAULTS]
                raise ConfigError(f"{src}: unknown key '{key}'{nearest_hint(key, valid)}")
        args = cls(**kwargs)
        args.config_files = dict(texts)
        args._sources = dict(sources)
        args._batch_given = {k: kwargs[k] for k in BATCH_KEYS if kwargs.get(k) is not None}
        if announce:
            args._warn_no_ops(set(values) & compat.NEOX_RUNTIME_KEYS)
        args._derive()
        return args

    def _where(self, *keys) -> str:
        """The files that set ``keys``, for error messages."""
        srcs = sorted({self._sources[k] for k in keys if k in self._sources})
        return ", ".join(srcs or sorted(self.config_files or {}) or ["config"])

    def no_effect_keys(self) -> list[tuple[str, str]]:
        """(key, why) for the NeoX keys this config sets away from their default that
        change nothing here."""
        fields = self.__dataclass_fields__
        out = []
        for key, why in NO_EFFECT_KEYS.items():
            f = fields[key]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if getattr(self, key) != default:
                out.append((key, why))
        return out

    def _warn_no_ops(self, runtime_keys=()) -> None:
        """Once per process and key."""
        runtime = [(key, "GPT-NeoX computes it at run time and writes it into its argument dumps")
                   for key in sorted(runtime_keys)]
        for key, why in self.no_effect_keys() + runtime:
            if key not in _warned_no_ops:
                _warned_no_ops.add(key)
                log.warning("accepted, no effect here: %s (%s)", key, why)

    # ---- derived values -----------------------------------------------------------

    def _derive(self) -> None:
        for key in REQUIRED_KEYS:
            if getattr(self, key) is None:
                raise ConfigError(f"{self._where(*REQUIRED_KEYS)}: required key '{key}' is "
                                  f"missing; add it to one of the config files")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        checks.check_ranges(self, self._where)
        checks.check_blocks(self, self._where)
        checks.check_data_weights(self, self._where)
        self._check_shapes()
        self.attention_config = self._expand_attention()
        self.precision = self._derive_precision()
        self._derive_lr()
        checks.check_lr(self, self._where)
        self.is_pipe_parallel = self.pipe_parallel_size >= 1
        for split in ("train", "valid", "test"):
            paths = getattr(self, f"{split}_data_paths")
            if paths and getattr(self, f"{split}_data_weights") is None:
                setattr(self, f"{split}_data_weights", [1.0] * len(paths))
        self.l2e.validate(self.num_layers, source=self._where("l2e"))
        # not the real world yet (configure_world is called again with it): no batch note
        self.configure_world(self.world_size or self._implied_world(), note_batch=False)

    def _implied_world(self) -> int:
        """The world the config describes: the one its full batch triple implies, else the
        smallest possible (one data-parallel rank). configure_world() sets the real one."""
        ranks_per_replica = max(self.pipe_parallel_size, 1) * self.model_parallel_size
        tb, mbs, gas = (self._batch_given.get(k) for k in BATCH_KEYS)
        if None not in (tb, mbs, gas) and mbs * gas > 0 and tb % (mbs * gas) == 0:
            return ranks_per_replica * max(tb // (mbs * gas), 1)
        return ranks_per_replica

    def _check_shapes(self) -> None:
        h, heads, L = self.hidden_size, self.num_attention_heads, self.num_layers
        tp, pp = self.model_parallel_size, self.pipe_parallel_size
        where = self._where("hidden_size", "num_attention_heads")
        if h % heads:
            raise ConfigError(f"{where}: num_attention_heads={heads} must divide "
                              f"hidden_size={h}")
        if tp < 1 or heads % tp:
            raise ConfigError(f"{self._where('model_parallel_size')}: model_parallel_size={tp} "
                              f"must divide num_attention_heads={heads}")
        if pp > L:
            raise ConfigError(f"{self._where('pipe_parallel_size')}: pipe_parallel_size={pp} "
                              f"exceeds num_layers={L}; use at most {L} stages")
        if self.seq_length > self.max_position_embeddings:
            raise ConfigError(f"{self._where('seq_length')}: seq_length={self.seq_length} "
                              f"exceeds max_position_embeddings="
                              f"{self.max_position_embeddings}")
        if self.num_kv_heads not in (None, heads):
            raise ConfigError(f"{self._where('num_kv_heads')}: num_kv_heads (grouped-query "
                              f"attention) is not supported by neox-l2e; remove it")

    def _expand_attention(self) -> list[str]:
        """[[["flash"], 6]] -> ["flash"] * 6; an already expanded list passes through."""
        L, spec = self.num_layers, self.attention_config
        where = self._where("attention_config")
        if spec is None:
            return ["global"] * L
        if all(isinstance(t, str) for t in spec):
            types = list(spec)
        else:
            well_formed = all(isinstance(item, list) and len(item) == 2
                              and isinstance(item[0], list) and isinstance(item[1], int)
                              for item in spec)
            if not well_formed:
                raise ConfigError(f"{where}: attention_config must look like "
                                  f"[[[\"flash\"], {L}]], got {spec!r}")
            types = [t for kinds, repeat in spec for _ in range(repeat) for t in kinds]
        if len(types) != L:
            raise ConfigError(f"{where}: attention_config names {len(types)} layers but "
                              f"num_layers={L}")
        for t in types:
            if t in compat.NEOX_ATTENTION_TYPES and t not in compat.ATTENTION_TYPES:
                raise ConfigError(f"{where}: attention type '{t}' is not supported by "
                                  f"neox-l2e; use 'global' or 'flash'")
            if t not in compat.ATTENTION_TYPES:
                raise ConfigError(f"{where}: unknown attention type '{t}'"
                                  f"{nearest_hint(t, compat.NEOX_ATTENTION_TYPES)}")
        return types

    def _derive_precision(self) -> str:
        """fp16 dict (type bfloat16 means bf16, as in NeoX's Pythia-1B) or bf16 dict; a
        ``precision`` key alone is honoured, as in NeoX."""
        fp16, bf16 = self.fp16 or {}, self.bf16 or {}
        found = None
        if fp16.get("enabled", False):
            found = "bfloat16" if fp16.get("type") in ("bfloat16", "bf16") else "fp16"
        if bf16.get("enabled", False):
            if found == "fp16":
                raise ConfigError(f"{self._where('fp16', 'bf16')}: fp16 and bf16 are both "
                                  f"enabled; enable one")
            found = "bfloat16"
        if None not in (self.precision, found) and self.precision != found:
            raise ConfigError(f"{self._where('precision')}: precision={self.precision!r} but "
                              f"the fp16/bf16 dicts say {found!r}; make them agree")
        return found or self.precision or "fp32"

    def _derive_lr(self) -> None:
        """lr comes from optimizer.params.lr (NeoX); a top-level lr must agree with it."""
        given = self.lr if "lr" in self._sources else None
        if self.optimizer is None:
            if given is not None:
                raise ConfigError(f"{self._where('lr')}: lr is read from optimizer.params.lr; "
                                  f"write optimizer: {{type: Adam, params: {{lr: {given:g}}}}} "
                                  f"instead of lr")
            return
        params = self.optimizer.get("params", {})
        if "type" not in self.optimizer or not isinstance(params, dict):
            raise ConfigError(f"{self._where('optimizer')}: optimizer must look like "
                              f"{{type: Adam, params: {{lr: ...}}}}, got {self.optimizer!r}")
        self.lr = None
        if "lr" in params:
            self.lr = check_value("optimizer.params.lr", params["lr"], float,
                                  self._where("optimizer"))
        if given is not None and given != self.lr:
            raise ConfigError(f"{self._where('lr')}: lr={given:g} would be ignored: the "
                              f"learning rate is optimizer.params.lr (={self.lr}); set that "
                              f"instead, e.g. --override optimizer.params.lr={given:g}")

    def configure_world(self, world_size: int, note_batch: bool = True) -> None:
        """Set world/data-parallel size and fill the batch triple for ``world_size`` ranks;
        ``note_batch``: say so when a Pythia config's batch comes out other than Pythia's."""
        pp, tp = max(self.pipe_parallel_size, 1), self.model_parallel_size
        if world_size < 1 or world_size % (pp * tp):
            raise ConfigError(
                f"{self._where('pipe_parallel_size', 'model_parallel_size')}: world size "
                f"{world_size} is not a multiple of pipe_parallel_size*model_parallel_size = "
                f"{pp}*{tp}; change the GPU count or the parallel sizes")
        dp = world_size // (pp * tp)
        tb, mbs, gas = (self._batch_given.get(k) for k in BATCH_KEYS)
        where = self._where(*BATCH_KEYS)
        if tb is None and mbs is None:
            raise ConfigError(f"{where}: set train_micro_batch_size_per_gpu or "
                              f"train_batch_size")
        world = f"data-parallel size {dp} (world {world_size})"
        if mbs is None:
            gas = gas or 1
            if tb % (gas * dp):
                raise ConfigError(f"{where}: train_batch_size={tb} is not divisible by "
                                  f"gradient_accumulation_steps={gas} x {world}; change it "
                                  f"or set train_micro_batch_size_per_gpu")
            mbs = tb // (gas * dp)
        elif tb is None:
            gas = gas or 1
            tb = mbs * gas * dp
        elif gas is None:
            if tb % (mbs * dp):
                raise ConfigError(f"{where}: train_batch_size={tb} is not divisible by "
                                  f"train_micro_batch_size_per_gpu={mbs} x {world}; change "
                                  f"one of them or set gradient_accumulation_steps")
            gas = tb // (mbs * dp)
        if tb != mbs * gas * dp:
            raise ConfigError(
                f"{where}: train_batch_size={tb} must equal train_micro_batch_size_per_gpu="
                f"{mbs} x gradient_accumulation_steps={gas} x data-parallel size {dp} "
                f"(world {world_size}); fix one or leave one out to derive it")
        self.train_batch_size, self.train_micro_batch_size_per_gpu = tb, mbs
        self.gradient_accumulation_steps = gas
        self.world_size, self.data_parallel_size = world_size, dp
        if note_batch:
            self._note_pythia_batch()

    def _note_pythia_batch(self) -> None:
        """GPT-NeoX's Pythia YAMLs give only the micro-batch (and accumulation): the global
        batch then follows the GPU count, and only Pythia's own count gives Pythia's 1,024."""
        if "train_batch_size" in self._batch_given or self.train_batch_size == PYTHIA_TRAIN_BATCH:
            return
        source = self._sources.get("train_micro_batch_size_per_gpu", "")
        if "pythia" not in source.lower():
            return
        mbs, gas, dp = self.train_micro_batch_size_per_gpu, self.gradient_accumulation_steps, self.data_parallel_size
        keep = f"set train_batch_size={PYTHIA_TRAIN_BATCH} (tools/plan_run.py proposes layouts for it)"
        if PYTHIA_TRAIN_BATCH % (mbs * gas) == 0:
            gpus = PYTHIA_TRAIN_BATCH // (mbs * gas) * self.world_size // dp
            keep += f" or train on {gpus} GPUs"
        note = (f"{source}: training with a global batch of {self.train_batch_size} sequences (micro-batch "
                f"{mbs} x accumulation {gas} x data-parallel {dp}), not Pythia's {PYTHIA_TRAIN_BATCH}; "
                f"to keep Pythia's, {keep}")
        if note not in _noted_batches:
            _noted_batches.add(note)
            log.warning(note)

    def set_vocab_size(self, vocab_size: int) -> int:
        """Pad the tokenizer's vocab to a multiple of divisible_by * model_parallel_size."""
        multiple = self.make_vocab_size_divisible_by * self.model_parallel_size
        self.padded_vocab_size = math.ceil(vocab_size / multiple) * multiple
        return self.padded_vocab_size

    # ---- views ----------------------------------------------------------------------

    def to_dict(self, derived: bool = False) -> dict:
        """Non-default values under NeoX key names, JSON-able.

        Derived values are left out unless ``derived``: ``from_dict`` recomputes them,
        so the dict stays valid when the world size changes.
        """
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "config_files" or (f.metadata["derived"] and not derived):
                continue
            if f.name in BATCH_KEYS and not derived and f.name not in self._batch_given:
                continue
            value = getattr(self, f.name)
            if f.name == "l2e":
                value = value.to_dict()
                if value:
                    out["l2e"] = value
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if value != default:
                out[f.name] = value
        return out

    def model_config(self):
        """The architecture as a :class:`megatron.model.ModelConfig`."""
        from megatron.model import ModelConfig

        if self.padded_vocab_size is None:
            raise ConfigError("padded_vocab_size is unknown: build the tokenizer (or call "
                              "args.set_vocab_size(n)) before building the model")
        return ModelConfig(
            vocab_size=self.padded_vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rotary_pct=self.rotary_pct,
            rotary_base=float(self.rotary_emb_base),
            parallel_residual=self.gpt_j_residual,
            layernorm_eps=self.layernorm_epsilon,
            gelu_tanh=self.bias_gelu_fusion,
            intermediate_size=self.intermediate_size,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            tie_embeddings=not self.no_weight_tying,
            init_method=self.init_method,
            output_layer_init_method=self.output_layer_init_method,
            init_std=self.init_method_std,
            attention_impl=self.attention_impl(),
        )

    def attention_impl(self) -> str:
        """'flash' only when the config asks for it and flash-attn can run (CUDA)."""
        import torch

        wants_flash = "flash" in (self.attention_config or [])
        if wants_flash and torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
            return "flash"
        return "sdpa"

    # ---- how deepy.py hands this config to every rank (megatron.config.launch_args) -------

    def launch_argument(self) -> str:
        """The value of ``--neox_config``: urlsafe base64 of JSON, so all ranks rebuild
        identical arguments without re-reading files that might differ between nodes."""
        payload = {"args": self.to_dict(), "config_files": self.config_files or {}}
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()

    @classmethod
    def from_launch_argument(cls, b64: str) -> "NeoXArgs":
        try:
            payload = json.loads(base64.urlsafe_b64decode(b64.encode()).decode())
            values, files = payload["args"], payload["config_files"]
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise ConfigError(f"{NEOX_CONFIG_FLAG} does not hold a config written by deepy.py; "
                              f"launch with deepy.py or pass YAML files") from None
        # deepy.py loaded this config and warned about its no-op keys; the run summary lists them
        return cls.from_dict(values, config_files=files, announce=False)


def _resolve_tokenizer_paths(values: dict, sources: dict) -> None:
    """A relative tokenizer path that does not exist from the working directory is taken
    relative to the config file that sets it, so configs can travel with their tokenizer."""
    from megatron.tokenizer import resolve_tokenizer_path

    for key in TOKENIZER_PATH_KEYS:
        if isinstance(values.get(key), str):
            values[key] = resolve_tokenizer_path(values[key], str(Path(sources[key]).parent))


def _check_supported(key: str, value, field, source: str) -> None:
    supported = field.metadata["supported"]
    if supported is not None and value not in supported:
        shown = ", ".join(repr(s) for s in supported)
        raise ConfigError(f"{source}: {key}={value!r} is not supported by neox-l2e "
                          f"(supported: {shown})")
