"""Errors that mean "the user gave us something we cannot use".

The CLI turns these into one line on stderr and exit code 2; everything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import os


class InputError(ValueError):
    """A bad input file, tensor, prompt or model name. The message names the input."""

    def __init__(self, source: object, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{_describe(source)}: {problem}")


class ConfigError(InputError):
    """A configuration file or key that is missing, unknown or of the wrong type."""


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt, unsafe, or made for another decoder."""


def existing_file(source, kind: str):
    """Path of a user's input file, or InputError: missing, a directory, or zero bytes."""
    from pathlib import Path

    path = Path(source)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, f"is a directory, not {kind} file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (zero bytes)")
    return path


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__ if not isinstance(source, str) else source
