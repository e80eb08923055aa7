"""A YAML config that merges LoRA adapters into one adapter (``adapters:`` instead of ``models:``), read and checked
into an ``AdaptersConfig`` whose ``arguments()`` are ``ferromerge.merge_adapters``' keywords (``_run.run`` routes
such a config there; nothing here merges).

The schema (README, "Merging LoRA adapters from a config")::

    merge_method: knots_ties          # a merge_adapters combination type: cat, linear, ties, svd, knots_ties, ...
    base_model: org/base-model        # optional: the output's base_model_name_or_path (default: the first adapter's)
    adapters:                         # required, not empty: PEFT adapter directories or Hub ids in the local cache
      - adapter: ./lora-math
        weight: 0.7                   # optional, default 1 (or parameters: {weight: 0.7}, mergekit's place)
      - adapter: org/lora-code
    parameters:                       # optional
      rank: 16                        # SVD and KnOTS types: the output rank
      density: 0.5                    # the pruning types: fraction kept (DARE: keep probability)
      majority_sign: total            # total | frequency
      svd_clamp: 0.99                 # SVD types: clamp quantile
      exact: false                    # SVD types: exact instead of randomized SVD
    out_dtype: bfloat16               # optional (or dtype): the output's dtype (default: the adapters')

A key the schema does not declare, and a parameter it does not know, are ignored with a ``CompatWarning`` naming its
place (``leniency.Lenient``: a ``ConfigError`` with ``strict``); ``models:``, ``slices:`` or ``modules:`` beside
``adapters:`` is a ``ConfigError`` (one config is one kind of merge). Values are checked here, with their place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError
from ..io.dtypes import ST_NAME
from .leniency import Lenient, suggest
from .resolve import not_a_model_merge, read_config
from .schema import validation_message

__all__ = ["AdaptersConfig", "PARAMETERS", "is_adapters_config", "load_adapters_config", "parse_adapters_config"]

#: the top-level ``parameters:`` an adapter merge reads
PARAMETERS = ("rank", "density", "majority_sign", "svd_clamp", "exact")
#: the keys of a model merge, which an adapter merge cannot also have
MODEL_KEYS = ("models", "slices", "modules")


class AdapterEntry(BaseModel):
    """One item of ``adapters:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str
    weight: Any = None
    parameters: dict[str, Any] | None = None


class RawAdaptersConfig(BaseModel):
    """An adapter-merge config as written, keys and types checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    adapters: list[AdapterEntry]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None


@dataclass(frozen=True)
class AdaptersConfig:
    """A checked adapter-merge config."""

    combination: str
    #: (adapter path or Hub id, weight), in config order
    adapters: tuple[tuple[str, float], ...]
    rank: int | None
    density: float | None
    majority_sign: str
    svd_clamp: float | None
    exact: bool
    dtype: str | None
    base_model: str | None
    #: the config text as given (YAML), or a dump of the mapping
    text: str

    def arguments(self) -> dict[str, Any]:
        """``merge_adapters``' keyword arguments (all but ``out`` and the run's own: seed, threads, ...)."""
        return {
            "adapters": list(self.adapters),
            "combination": self.combination,
            "rank": self.rank,
            "density": self.density,
            "majority_sign": self.majority_sign,
            "svd_clamp": self.svd_clamp,
            "exact": self.exact,
            "dtype": self.dtype,
            "base_model": self.base_model,
        }


def is_adapters_config(data: Any) -> bool:
    """Whether parsed config data is an adapter merge (a mapping with an ``adapters:`` key)."""
    return isinstance(data, Mapping) and "adapters" in data


def load_adapters_config(
    source: str | os.PathLike[str] | Mapping[str, Any], combinations: Sequence[str], *, strict: bool = False
) -> AdaptersConfig | None:
    """The adapter-merge config at ``source`` (a path, YAML text or a mapping, as ``load_config`` reads them), or
    None when it is not one (then, and when it cannot be read, ``load_config`` says what it is).
    ``combinations``: the merge types ``merge_method`` may name (``merge_adapters``')."""
    try:
        data, text, origin = read_config(source)
    except ConfigError:
        return None
    if not is_adapters_config(data):
        return None
    return parse_adapters_config(data, combinations, text=text, origin=origin, strict=strict)


def parse_adapters_config(
    data: Mapping[str, Any],
    combinations: Sequence[str],
    *,
    text: str | None = None,
    origin: str = "config",
    strict: bool = False,
) -> AdaptersConfig:
    """Check already-parsed adapter-merge config data (see the module docstring)."""
    if any(data.get(k) for k in MODEL_KEYS):
        raise not_a_model_merge(data, origin)
    lenient = Lenient(strict)
    data = _known(data, RawAdaptersConfig, "", lenient)
    entries = data.get("adapters")
    if isinstance(entries, list):
        data["adapters"] = [_known(e, AdapterEntry, f"adapters[{i}].", lenient) if isinstance(e, Mapping) else e
                            for i, e in enumerate(entries)]
    if "merge_method" not in data:
        raise ConfigError(f"{origin}: merge_method: missing (e.g. merge_method: knots_ties)")
    try:
        raw = RawAdaptersConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(f"{origin}: {validation_message(e)}") from None
    if raw.merge_method not in combinations:
        close = suggest(raw.merge_method, combinations)
        hint = f"did you mean {close!r}? " if close else ""
        raise ConfigError(
            f"{origin}: merge_method: {raw.merge_method!r} is no adapter merge type ({hint}one of "
            f"{', '.join(combinations)})"
        )
    if not raw.adapters:
        raise ConfigError(f"{origin}: adapters: empty; list the adapters to merge ({{adapter: PATH, weight: W}})")
    adapters = tuple(_entry(e, i, origin, lenient) for i, e in enumerate(raw.adapters))
    params = dict(raw.parameters or {})
    for name in params:
        if name not in PARAMETERS:
            close = suggest(name, PARAMETERS)
            why = f"did you mean {close!r}?" if close else f"known: {', '.join(PARAMETERS)}"
            if name == "weight":
                why = "a weight belongs to one adapter: adapters[i].weight"
            lenient.warn(f"parameters.{name}: adapter merges have no parameter {name!r} ({why}); ignored")
    if raw.base_model is not None and not raw.base_model.strip():
        raise ConfigError(f"{origin}: base_model: empty")
    return AdaptersConfig(
        combination=raw.merge_method,
        adapters=adapters,
        rank=_rank(params.get("rank"), origin),
        density=_fraction(params.get("density"), "parameters.density", origin),
        majority_sign=_majority_sign(params.get("majority_sign", "total"), origin),
        svd_clamp=_fraction(params.get("svd_clamp"), "parameters.svd_clamp", origin),
        exact=_flag(params.get("exact", False), "parameters.exact", origin),
        dtype=_dtype(raw.out_dtype if raw.out_dtype is not None else raw.dtype,
                     "out_dtype" if raw.out_dtype is not None else "dtype", origin),
        base_model=raw.base_model,
        text=text if text is not None else yaml.safe_dump(raw.model_dump(exclude_none=True), sort_keys=False),
    )


def _known(entry: Mapping[Any, Any], model: type[BaseModel], prefix: str, lenient: Lenient) -> dict[Any, Any]:
    """``entry``'s keys that ``model`` declares; every other one is reported (``lenient``) and dropped."""
    fields = sorted(model.model_fields)
    out = {}
    for key, value in entry.items():
        if key in fields:
            out[key] = value
            continue
        close = suggest(str(key), fields)
        why = f"did you mean {close!r}?" if close else f"known: {', '.join(fields)}"
        lenient.warn(f"{prefix}{key}: unknown key of an adapter merge ({why}); ignored")
    return out


def _entry(entry: AdapterEntry, i: int, origin: str, lenient: Lenient) -> tuple[str, float]:
    where = f"adapters[{i}]"
    if not entry.adapter.strip():
        raise ConfigError(f"{origin}: {where}.adapter: empty")
    weight = entry.weight
    params = entry.parameters or {}
    for name in params:
        if name != "weight":
            lenient.warn(f"{where}.parameters.{name}: adapter merges take only a weight per adapter (set {name} in "
                         "the top-level parameters); ignored")
    if "weight" in params:
        if weight is not None:
            raise ConfigError(f"{origin}: {where}: weight given twice (weight: and parameters.weight); give one")
        weight = params["weight"]
        where_w = f"{where}.parameters.weight"
    else:
        where_w = f"{where}.weight"
    if weight is None:
        return entry.adapter, 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{origin}: {where_w}: expected a finite number, got {weight!r}")
    return entry.adapter, float(weight)


def _rank(value: Any, origin: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{origin}: parameters.rank: expected a positive integer, got {value!r}")
    return value


def _fraction(value: Any, where: str, origin: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{origin}: {where}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _majority_sign(value: Any, origin: str) -> str:
    if value not in ("total", "frequency"):
        raise ConfigError(f"{origin}: parameters.majority_sign: expected total or frequency, got {value!r}")
    return str(value)


def _flag(value: Any, where: str, origin: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{origin}: {where}: expected true or false, got {value!r}")
    return value


def _dtype(value: str | None, where: str, origin: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.")
    if name not in ST_NAME:
        raise ConfigError(f"{origin}: {where}: unsupported dtype {value!r}; use one of {', '.join(ST_NAME)}")
    return name
