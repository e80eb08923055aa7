"""Parameter settings as mergekit writes them, and their per-tensor resolution.

A setting is a scalar, a gradient (a list of values across the layers of an output slice), a ``{filter, value}``
mapping, or a list of such mappings. ``parse_setting`` validates one as written in the config; ``evaluate``
gives its value for one tensor (its name, and ``t``: the tensor's position within its output slice, in [0, 1]);
``resolve`` walks the precedence levels (source > slice > global) and returns the first value that applies.

Semantics (mergekit 0.1.5):

* gradient of numbers: piecewise-linear over evenly spaced anchors, evaluated at ``t``; of booleans or strings:
  the anchor at ``int(t·(n−1))``.
* filters: the first entry whose ``filter`` is a substring of the tensor name (or is null or ``"*"``) wins; when
  none matches, the setting gives nothing and resolution falls through to the next level.
* ``t = index / (layers − 1)`` for a layer of an output slice; a one-layer slice uses ``t = 1``; tensors outside
  the layers (embeddings, final norm, lm_head) use ``t = 0``, so they get a gradient's first value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import methods
from ..errors import ConfigError
from ..methods.spec import ParamSpec
from .leniency import IGNORED, Lenient, suggest


@dataclass(frozen=True)
class Const:
    """One value for every tensor."""

    value: Any


@dataclass(frozen=True)
class Gradient:
    """Values at evenly spaced anchors across the layers of an output slice (at least two)."""

    values: tuple[Any, ...]
    #: numbers interpolate; booleans and strings are picked
    numeric: bool


@dataclass(frozen=True)
class Filtered:
    """``[{filter, value}, ...]``: the first entry whose filter matches the tensor name applies."""

    #: (filter or None for "every tensor", value)
    entries: tuple[tuple[str | None, Const | Gradient], ...]


Setting = Const | Gradient | Filtered


def parse_setting(
    raw: Any, name: str, spec: ParamSpec | None, place: str, lenient: Lenient | None = None
) -> Setting | None:
    """Validate one setting as written at ``place`` (``models[0].parameters.density``) for parameter ``name``.

    The forms are mergekit's (its ``ParameterSetting``: a scalar, a gradient of scalars, ``{filter, value}`` or a
    list of those); a form mergekit refuses is a ``ConfigError`` here too. Each value is read as mergekit's
    pydantic reads it for the parameter's type (``methods.coerce``) and range-checked, so resolution never meets a
    bad value. ``spec`` None: the method does not use the parameter; only the form is checked (mergekit checks
    that much before ignoring it) and the result is None. An unfiltered ``{value: x}`` (or ``filter: "*"``), and a
    filter list whose first entry matches everything, are plain values; an empty list sets nothing (None), as in
    mergekit, with a compat warning.
    """
    if raw is None:
        # mergekit's ParameterSetting has no null: pydantic refuses the whole config
        raise ConfigError(f"{place}: no value (null); give a value, or remove the key")
    if isinstance(raw, Mapping):
        return _simplify(Filtered((_entry(raw, name, spec, place, lenient),)))
    if isinstance(raw, list):
        if not raw:
            if lenient is not None:
                lenient.warn(f"{place}: an empty list sets nothing; {IGNORED}")
            return None
        if any(isinstance(v, Mapping) for v in raw):
            if not all(isinstance(v, Mapping) for v in raw):
                raise ConfigError(f"{place}: a list mixing {{filter, value}} entries with plain values")
            return _simplify(
                Filtered(tuple(_entry(v, name, spec, f"{place}[{i}]", lenient) for i, v in enumerate(raw)))
            )
    return _value(raw, name, spec, place, lenient)


def _entry(
    raw: Mapping[str, Any], name: str, spec: ParamSpec | None, place: str, lenient: Lenient | None
) -> tuple[str | None, Const | Gradient]:
    if "value" not in raw:
        raise ConfigError(f"{place}: expected a value or {{filter, value}}, got {dict(raw)!r}")
    for key in raw:
        if key not in ("filter", "value"):
            # mergekit's ConditionalParameter ignores keys it does not declare
            if lenient is None:
                raise ConfigError(f"{place}: expected a value or {{filter, value}}, got {dict(raw)!r}")
            close = suggest(str(key), ("filter", "value"))
            hint = f"did you mean {close!r}?" if close else "a filter entry has filter and value"
            lenient.warn(f"{place}.{key}: unknown key ({hint}); {IGNORED}")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ConfigError(f"{place}.filter: expected a string (a substring of tensor names), got {flt!r}")
    if isinstance(raw["value"], Mapping) or (
        isinstance(raw["value"], list) and any(isinstance(v, Mapping) for v in raw["value"])
    ):
        raise ConfigError(f"{place}.value: filters cannot be nested")
    return (None if flt in (None, "*") else flt), _value(raw["value"], name, spec, f"{place}.value", lenient)


def _simplify(setting: Filtered) -> Setting:
    flt, value = setting.entries[0]
    return value if flt is None else setting


def _value(raw: Any, name: str, spec: ParamSpec | None, place: str, lenient: Lenient | None) -> Const | Gradient:
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{place}: an empty gradient; give at least one value")
        values = tuple(_scalar(spec, name, v, f"{place}[{i}]", lenient) for i, v in enumerate(raw))
        if len(values) == 1:
            return Const(values[0])
        return Gradient(values, numeric=spec is not None and spec.kind is float)
    return Const(_scalar(spec, name, raw, place, lenient))


def _scalar(spec: ParamSpec | None, name: str, raw: Any, place: str, lenient: Lenient | None) -> Any:
    """One value, read as mergekit reads it for ``spec`` (``methods.coerce``); a boolean read as a number is a
    compat warning (``weight: true`` is 1.0 to pydantic, rarely what was meant). ``spec`` None: any scalar (the form
    mergekit checks before it ignores the parameter)."""
    if spec is None:
        if raw is None or not isinstance(raw, (bool, int, float, str)):
            raise ConfigError(f"{place}: expected a number, true/false or a string, got {raw!r}")
        return raw
    value = methods.coerce(spec, name, raw, place, lax=True)
    if isinstance(raw, bool) and spec.kind is float and lenient is not None:
        lenient.warn(f"{place}: {str(raw).lower()} read as the number {value!r}, as mergekit reads it")
    return value


def layer_t(index: int, count: int) -> float:
    """``t`` of layer ``index`` (0-based) of an output slice of ``count`` layers; a 1-layer slice is at t = 1."""
    return index / (count - 1) if count > 1 else 1.0


def evaluate(setting: Setting, tensor: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor`` at ``t``; None when it has filters and none matches ``tensor``."""
    if isinstance(setting, Filtered):
        for flt, value in setting.entries:
            if flt is None or flt in tensor:
                return evaluate(value, tensor, t)
        return None
    if isinstance(setting, Const):
        return setting.value
    values = setting.values
    pos = t * (len(values) - 1)
    if not setting.numeric:
        return values[int(pos)]
    lo = int(pos)
    hi = min(len(values) - 1, lo + 1)
    frac = pos - lo
    # The same float64 expression as mergekit, so that gradients give bit-identical parameters.
    value = (1 - frac) * values[lo] + frac * values[hi]
    # A convex combination cannot leave [min, max] of its anchors except by a rounding ulp (density 1 + 2e-16).
    return min(max(value, min(values[lo], values[hi])), max(values[lo], values[hi]))


@dataclass(frozen=True)
class Level:
    """One precedence level: its settings and where they are written (``slices[0].parameters``)."""

    settings: Mapping[str, Setting]
    place: str


def resolve(name: str, levels: Sequence[Level], tensor: str, t: float) -> tuple[Any, str] | None:
    """The first value of parameter ``name`` that applies to ``tensor`` at ``t``, highest level first, with the
    place it came from; None when no level gives one (the caller applies the default)."""
    for level in levels:
        setting = level.settings.get(name)
        if setting is None:
            continue
        value = evaluate(setting, tensor, t)
        if value is not None:
            return value, f"{level.place}.{name}"
    return None


def uniform(name: str, levels: Sequence[Level]) -> tuple[bool, Any]:
    """``(True, value)`` when ``name`` resolves to the same value for every tensor (plain values only, or nothing
    set: ``value`` None), ``(False, None)`` when filters or gradients can make it vary."""
    for level in levels:
        setting = level.settings.get(name)
        if setting is None:
            continue
        if isinstance(setting, Const):
            return True, setting.value
        return False, None
    return True, None


def mentioned(name: str, levels: Sequence[Level]) -> bool:
    """Whether any level sets ``name`` at all."""
    return any(name in level.settings for level in levels)


def to_data(setting: Setting) -> Any:
    """The setting as plain YAML data (for ferromerge_config.yml)."""
    if isinstance(setting, Const):
        return setting.value
    if isinstance(setting, Gradient):
        return list(setting.values)
    return [
        ({"value": to_data(v)} if f is None else {"filter": f, "value": to_data(v)}) for f, v in setting.entries
    ]
