"""Python-side error types; the engine's own errors live in ``ferromerge._core`` and are re-exported here."""

from __future__ import annotations

from ._core import InputError, MergeError, OutputError, ParameterError

__all__ = ["ConfigError", "InputError", "MergeError", "OutputError", "ParameterError"]


class ConfigError(ParameterError):
    """The merge config is malformed: YAML syntax, an unknown or not-yet-supported key, a bad value.

    A subclass of ``ParameterError`` so that callers catching parameter problems catch config problems too.
    """
