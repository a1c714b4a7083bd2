"""GPT-NeoX-compatible configuration: load, merge, validate and derive YAML configs."""
from megatron.config.l2e import L2EConfig
from megatron.config.launch_args import consume as consume_launch_args
from megatron.config.neox_args import NeoXArgs
from megatron.errors import ConfigError

__all__ = ["NeoXArgs", "L2EConfig", "ConfigError", "consume_launch_args"]
