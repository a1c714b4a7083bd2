"""Checking YAML values against the schema's type annotations.

YAML is lenient in ways NeoX configs rely on: ``hidden-dropout: 0`` is an int where a
float is meant, and PyYAML reads ``1e-5`` (no dot) as a string. Both are accepted
for float keys; everything else must match the annotation.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Union

from megatron.errors import ConfigError


def nearest_hint(key: str, valid) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or nothing."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def type_name(annotation) -> str:
    """Readable name of an annotation, for error messages and the docs table."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation) -> Any:
    """Return ``value`` converted to ``annotation`` or raise _Mismatch."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin is list or annotation is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if annotation is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    raise TypeError(f"schema uses an unsupported annotation {annotation!r}")


def literal_choices(annotation) -> tuple:
    """The allowed strings of a Literal (possibly inside Optional/Union), else ()."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return tuple(c for a in typing.get_args(annotation) for c in literal_choices(a))
    return ()


def check_value(key: str, value: Any, annotation, source: str) -> Any:
    """Coerce ``value`` to the key's type or raise a ConfigError naming key, type, file."""
    try:
        return _coerce(value, annotation)
    except _Mismatch:
        pass
    choices = literal_choices(annotation)
    if isinstance(value, str) and choices:
        raise ConfigError(
            f"{source}: {key}={value!r} is not one of {list(choices)}"
            f"{nearest_hint(value, choices)}"
        )
    raise ConfigError(
        f"{source}: {key} expects {type_name(annotation)}, got {value!r} "
        f"({type(value).__name__}); fix the value in that file"
    )
