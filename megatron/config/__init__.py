"""GPT-NeoX-compatible configuration: load, merge, validate and derive YAML configs."""
from megatron.config.l2e import L2EConfig
from megatron.config.neox_args import NeoXArgs
from megatron.errors import ConfigError

__all__ = ["NeoXArgs", "L2EConfig", "ConfigError"]
