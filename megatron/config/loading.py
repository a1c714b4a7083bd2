"""Reading NeoX YAML files and merging them as a disjoint union.

A key may be set in only one file (GPT-NeoX's rule: nothing silently overrides), and
``-`` and ``_`` in top-level keys mean the same. Every value remembers the file it
came from, so later errors can name it. A key repeated inside one mapping (YAML
would silently keep the last) is an error too, at any depth.
"""
import os

import yaml

from megatron.errors import ConfigError

# The run summary (megatron.training.summary) saved in every checkpoint's configs/
# beside the config files; it describes the run and is not a config.
SUMMARY_FILE = "run_summary.yml"


def normalize_key(key) -> str:
    return str(key).replace("-", "_")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(problem=f"key '{key}' is set twice (lines {first_line} and {line})")
        self.key, self.line = key, line


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not repeat a key."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # resolves `<<:` merge keys first, as SafeLoader does
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in first_line:
                raise DuplicateKeyError(key, line, first_line[key])
            first_line.setdefault(key, line)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """``yaml.safe_load`` that refuses repeated keys (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(e: yaml.YAMLError) -> str:
    """`` line N`` and the parser's one-line complaint, for ConfigError messages."""
    where = getattr(e, "problem_mark", None)
    line = f" line {where.line + 1}" if where is not None else ""
    if isinstance(e, DuplicateKeyError):
        line = f" line {e.line}"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{line}: {problem}" if line else f" {problem}"


def read_yaml(path: str) -> tuple[str, dict]:
    """(raw text, top-level mapping with normalised keys) of one config file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}; check the path") from None
    try:
        data = parse_yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{yaml_problem(e)}; YAML would keep only the last, "
                          f"remove one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}:{yaml_problem(e)} (not valid YAML); fix the syntax") from None
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
    """Merge files into (values, key -> source file, basename -> raw text).

    A checkpoint's run summary (``SUMMARY_FILE``) is skipped, so ``configs/*.yml`` of a
    checkpoint can be passed as they are."""
    values, sources, texts = {}, {}, {}
    for path in paths:
        name = os.path.basename(path)
        if name == SUMMARY_FILE:
            continue
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
