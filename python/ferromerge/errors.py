"""Python-side error types; the engine's own errors live in ``ferromerge._core`` and are re-exported here."""

from __future__ import annotations

from ._core import InputError, MergeError, OutputError, ParameterError

__all__ = ["CompatWarning", "ConfigError", "InputError", "MergeError", "OutputError", "ParameterError"]


class ConfigError(ParameterError):
    """The merge config is malformed: YAML syntax, an unknown or not-yet-supported key, a bad value.

    A subclass of ``ParameterError`` so that callers catching parameter problems catch config problems too.
    """


class CompatWarning(UserWarning):
    """Something mergekit 0.1.5 accepts and merges, which a careful tool would question: a parameter the method does
    not use, a misspelled or misplaced key, a boolean read as a number. ferromerge does what mergekit does (ignores
    it, or reads the value as mergekit's pydantic does) and says so once per key, naming where it is in the config
    (``models[1].parameters.gamma``). The CLI prints it as ``ferromerge: warning: ...``; ``strict=True`` (``--strict``)
    makes each one a ``ConfigError`` instead.
    """
