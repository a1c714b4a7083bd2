"""User-facing errors.

Every problem caused by what the user gave us (a config, a data file, a checkpoint,
a tokenizer) is raised as a subclass of :class:`UserError`. Entry points wrap their
``main`` with :func:`cli_main`, which prints the one-line message and exits with
status 2 instead of showing a traceback from deep inside the code.
"""
from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input; its message names the file/key and the fix."""


class ConfigError(UserError):
    """Bad YAML config: unknown key, duplicate key, wrong type, inconsistent values."""


class DataError(UserError):
    """Bad dataset: corrupt .idx/.bin, empty dataset, too few samples, bad jsonl."""


class CheckpointError(UserError):
    """Bad checkpoint directory: missing layer files, not GPT-NeoX, wrong shapes."""


class TokenizerError(UserError):
    """Missing or unreadable tokenizer files."""


def cli_main(fn):
    """Decorator for entry points: UserError -> 'error: ...' on stderr, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("NEOX_L2E_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
