"""The ``l2e:`` block of a config: where and how monosemantic neurons are inhibited.

Field names and meanings follow ``l2e_spec.md`` §6; the layer presets follow §5.
"""

import dataclasses
from dataclasses import dataclass
from typing import Literal, Union

from megatron.config.types import check_value, nearest_hint
from megatron.errors import ConfigError

LAYER_PRESETS = ("mid2", "mid_third", "top_bottom")


@dataclass
class L2EConfig:
    """L2E settings; ``enabled: false`` (the default) leaves training untouched."""

    enabled: bool = False
    layers: Union[Literal["mid2", "mid_third", "top_bottom"], list[int]] = "mid2"
    rate: float = 0.02
    loss_weight: float = 1.0e-11
    warmup_steps: int = 10
    retrieval: Literal["moving_threshold", "topk"] = "moving_threshold"
    inhibition: Literal["regularize", "reverse_deactivation", "none"] = "regularize"
    site: Literal["block_output", "mlp_act"] = "block_output"
    sync_stats: bool = True
    threshold_lr: float = 1.0
    # multiplicative: scale-free step, no tuning across batch sizes; additive: paper eq. 6
    threshold_update: Literal["multiplicative", "additive"] = "multiplicative"
    # 1.0: cumulative statistics since step 0 (the paper); beta < 1: exponentially moving,
    # the old state weighted by beta each step (a window of ~1/(1 - beta) steps)
    stats_momentum: float = 1.0
    eps: float = 1.0e-12
    # diagnostics (metrics.py): l2e/batch_quantile, l2e/mean_selected_ms, l2e/grad_ratio and
    # train/l2e_loss are gathered on log steps at most once per diagnostics_interval steps,
    # l2e/batch_quantile from diagnostics_samples random (sample, neuron) pairs (0 = exact)
    diagnostics_interval: int = 10
    diagnostics_samples: int = 8192

    @classmethod
    def from_dict(cls, d: dict, source: str = "l2e") -> "L2EConfig":
        """Build from a YAML mapping; ``source`` names where it came from in errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: 'l2e' must be a mapping of L2E options, got {d!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for raw_key, value in d.items():
            key = str(raw_key).replace("-", "_")
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key 'l2e.{raw_key}'{nearest_hint(key, fields)}"
                )
            values[key] = check_value(f"l2e.{key}", value, fields[key].type, source)
        cfg = cls(**values)
        cfg.validate(source=source)
        return cfg

    def to_dict(self) -> dict:
        """Non-default values only, so a round trip through YAML stays short."""
        default = L2EConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def validate(self, num_layers: int | None = None, source: str = "l2e") -> None:
        """Range checks; layer indices are checked once the layer count is known."""
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"{source}: l2e.rate must lie in (0, 1), got {self.rate}")
        for name in ("loss_weight", "threshold_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{source}: l2e.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.stats_momentum <= 1.0:
            raise ConfigError(f"{source}: l2e.stats_momentum must lie in (0, 1] (1 = cumulative), "
                              f"got {self.stats_momentum}")
        if self.eps <= 0:
            raise ConfigError(f"{source}: l2e.eps must be > 0, got {self.eps}")
        if self.diagnostics_interval < 1:
            raise ConfigError(f"{source}: l2e.diagnostics_interval must be >= 1, got {self.diagnostics_interval}")
        if self.diagnostics_samples < 0:
            raise ConfigError(f"{source}: l2e.diagnostics_samples must be >= 0 (0 = exact), "
                              f"got {self.diagnostics_samples}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{source}: l2e.warmup_steps must be >= 0, got {self.warmup_steps}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError(f"{source}: l2e.layers is an empty list; name at least one layer")
        if num_layers is not None:
            self.resolve_layers(num_layers, source)

    def resolve_layers(self, num_layers: int, source: str = "l2e") -> list[int]:
        """The 0-based indices of the inhibited blocks (spec §5)."""
        L = num_layers
        if self.layers == "mid2":
            chosen = [L // 2 - 1, L // 2] if L >= 2 else [0]
        elif self.layers == "mid_third":
            chosen = list(range(L // 3, 2 * L // 3 + 1))
        elif self.layers == "top_bottom":
            chosen = [0, L - 1] if L >= 2 else [0]
        else:
            chosen = list(self.layers)
            bad = [i for i in chosen if not 0 <= i < L]
            if bad:
                raise ConfigError(
                    f"{source}: l2e.layers {bad} out of range for num_layers={L}; "
                    f"use indices 0..{L - 1}"
                )
        return sorted(set(chosen))
