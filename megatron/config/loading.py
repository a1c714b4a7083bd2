"""Reading NeoX YAML files and merging them as a disjoint union.

A key may be set in only one file (GPT-NeoX's rule: nothing silently overrides), and
``-`` and ``_`` in top-level keys mean the same. Every value remembers the file it
came from, so later errors can name it.
"""
import os

import yaml

from megatron.errors import ConfigError


def normalize_key(key) -> str:
    return str(key).replace("-", "_")


def read_yaml(path: str) -> tuple[str, dict]:
    """(raw text, top-level mapping with normalised keys) of one config file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}; check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{line} is not valid YAML ({problem}); fix the syntax") from None
    if data is None:
        return text, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    values = {}
    for raw_key, value in data.items():
        key = normalize_key(raw_key)
        if key in values:
            raise ConfigError(f"{path}: key '{key}' is set twice (as '-' and '_' spellings); "
                              f"keep one")
        values[key] = value
    return text, values


def merge_yamls(paths) -> tuple[dict, dict, dict]:
    """Merge files into (values, key -> source file, basename -> raw text)."""
    values, sources, texts = {}, {}, {}
    for path in paths:
        name = os.path.basename(path)
        if name in texts:
            raise ConfigError(f"two config files are both named {name}; rename one "
                              f"(checkpoints store configs by file name)")
        texts[name], data = read_yaml(path)
        for key, value in data.items():
            if key in sources:
                raise ConfigError(f"key '{key}' is set in both {sources[key]} and {path}; "
                                  f"config files are merged without overriding, remove one")
            values[key], sources[key] = value, path
    return values, sources, texts
