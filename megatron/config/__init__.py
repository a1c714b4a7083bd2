"""GPT-NeoX-compatible configuration: load, merge, validate and derive YAML configs.

Owns ``NeoXArgs`` (NeoX's key names, one validated schema), the L2E block and the
launch encoding deepy.py hands to every rank. Sits near the bottom: it may import
errors, model (``ModelConfig``), tokenizer (path resolution) and parallel (how a rank
learns the world size), and nothing that trains, loads or evaluates."""
from megatron.config.l2e import L2EConfig
from megatron.config.launch_args import consume as consume_launch_args
from megatron.config.neox_args import NeoXArgs
from megatron.errors import ConfigError

__all__ = ["NeoXArgs", "L2EConfig", "ConfigError", "consume_launch_args"]
