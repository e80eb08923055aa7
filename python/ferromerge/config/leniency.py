"""What mergekit 0.1.5 accepts and a careful tool would question: the compat warnings of one config load.

mergekit reads a config with pydantic models that ignore keys they do not declare (pydantic's default,
``extra="ignore"``, which no model of ``mergekit/config.py`` or ``mergekit/tokenizer/config.py`` overrides) and
looks up only the parameters its method declares. So a misspelled or misplaced key, and a parameter the method does not use, are silently dropped there;
here they are dropped too (the merge is mergekit's), each with one ``CompatWarning`` naming its place and, where
one is close, the key that was probably meant. ``Lenient`` raises them (or, strict, turns the first into a
``ConfigError``); ``drop_unknown_keys`` is the walk over the config's mappings that finds the unknown keys.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from ..errors import CompatWarning, ConfigError
from ..tokenizer.config import ModelTokenSource, TokenEmbedding, TokenizerSettings, ZeroSource
from .schema import ModelEntry, ModuleEntry, RawConfig, SliceEntry, SourceEntry

#: what mergekit does with whatever a warning is about, the tail of most messages
IGNORED = "ignored, as mergekit ignores it"


class Lenient:
    """The compat warnings of one config load: each message once (``warnings.warn`` with ``CompatWarning``), or,
    with ``strict``, a ``ConfigError`` at the first."""

    def __init__(self, strict: bool = False, *, quiet: bool = False) -> None:
        self.strict = strict
        #: say nothing (a part already reported as a whole: the form of a parameter that is ignored anyway)
        self.quiet = quiet
        self.seen: list[str] = []

    def warn(self, message: str) -> None:
        if self.quiet or message in self.seen:
            return
        self.seen.append(message)
        if self.strict:
            raise ConfigError(f"{message} (strict mode: mergekit accepts this, ferromerge would warn and go on)")
        warnings.warn(CompatWarning(message), stacklevel=2)


#: for checks whose remarks would repeat one already made
QUIET = Lenient(quiet=True)


def suggest(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (a likely misspelling of it), or None when none is close (difflib's
    ratio below ``cutoff``)."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def drop_unknown_keys(data: Mapping[str, Any], parameters: frozenset[str], lenient: Lenient) -> dict[str, Any]:
    """``data`` (the whole config) without the keys that neither mergekit nor ferromerge declares, each reported
    (``lenient.warn``) with the key probably meant. ``parameters``: every method parameter name, to recognise one
    written beside ``parameters:`` instead of under it. Values that are not mappings where one is expected are
    left for the schema to refuse, as mergekit does."""
    out = _known(data, RawConfig, "", parameters, lenient)
    for key in ("models", "slices"):
        if key in out:
            out[key] = _entries(out[key], key, "", parameters, lenient)
    modules = out.get("modules")
    if isinstance(modules, Mapping):
        out["modules"] = {}
        for name, module in modules.items():
            where = f"modules.{name}"
            if isinstance(module, Mapping):
                module = _known(module, ModuleEntry, f"{where}.", parameters, lenient)
                for key in ("models", "slices"):
                    if key in module:
                        module[key] = _entries(module[key], key, f"{where}.", parameters, lenient)
            out["modules"][name] = module
    tokenizer = out.get("tokenizer")
    if isinstance(tokenizer, Mapping):
        tokenizer = _known(tokenizer, TokenizerSettings, "tokenizer.", frozenset(), lenient)
        tokens = tokenizer.get("tokens")
        if isinstance(tokens, Mapping):
            tokenizer["tokens"] = {tok: _token(entry, f"tokenizer.tokens[{tok!r}]", lenient)
                                   for tok, entry in tokens.items()}
        out["tokenizer"] = tokenizer
    return out


def _entries(items: Any, key: str, prefix: str, parameters: frozenset[str], lenient: Lenient) -> Any:
    """``models:`` or ``slices:`` (a list of mappings; anything else is left for the schema)."""
    if not isinstance(items, list):
        return items
    model = ModelEntry if key == "models" else SliceEntry
    out = []
    for i, item in enumerate(items):
        where = f"{prefix}{key}[{i}]"
        if isinstance(item, Mapping):
            item = _known(item, model, f"{where}.", parameters, lenient)
            sources = item.get("sources")
            if key == "slices" and isinstance(sources, list):
                item["sources"] = [
                    _known(s, SourceEntry, f"{where}.sources[{j}].", parameters, lenient) if isinstance(s, Mapping)
                    else s
                    for j, s in enumerate(sources)
                ]
        out.append(item)
    return out


def _token(entry: Any, where: str, lenient: Lenient) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    entry = _known(entry, TokenEmbedding, f"{where}.", frozenset(), lenient)
    source = entry.get("source")
    kinds: dict[Any, type[BaseModel]] = {"zero": ZeroSource, "model_token": ModelTokenSource}
    kind = source.get("kind") if isinstance(source, Mapping) else None
    if isinstance(source, Mapping) and isinstance(kind, str) and kind in kinds:
        entry["source"] = _known(source, kinds[kind], f"{where}.source.", frozenset(), lenient)
    return entry


def _known(
    entry: Mapping[Any, Any], model: type[BaseModel], prefix: str, parameters: frozenset[str], lenient: Lenient
) -> dict[Any, Any]:
    """``entry``'s keys that ``model`` declares; every other one is reported and dropped."""
    fields = frozenset(model.model_fields)
    out = {}
    for key, value in entry.items():
        if key in fields:
            out[key] = value
        else:
            lenient.warn(_unknown_key_message(str(key), prefix, model, parameters))
    return out


def _unknown_key_message(key: str, prefix: str, model: type[BaseModel], parameters: frozenset[str]) -> str:
    place = f"{prefix}{key}"
    fields = frozenset(model.model_fields)
    close = suggest(key, fields)
    if key in parameters and "parameters" in fields:
        return (
            f"{place}: {key!r} is a method parameter, which belongs under {prefix}parameters "
            f"({prefix}parameters.{key}); {IGNORED} here"
        )
    if key == "layer_range" and model is ModelEntry:
        return f"{place}: a models: entry takes every layer (layer ranges need slices:); {IGNORED}"
    if close is not None:
        return f"{place}: unknown key (did you mean {close!r}?); {IGNORED}"
    # against every method's parameter names, only a near miss (``allow_negative_weights`` is no misspelling of
    # ``normalize_weights``)
    hint = suggest(key, parameters, cutoff=0.8) if "parameters" in fields else None
    if hint is not None:
        return (
            f"{place}: unknown key (did you mean the parameter {prefix}parameters.{hint}?); {IGNORED}"
        )
    return f"{place}: unknown key (known: {', '.join(sorted(fields))}); {IGNORED}"
