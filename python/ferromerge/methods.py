"""The method registry: which merge methods exist, their parameters, defaults and base-model contract.

Defaults follow mergekit 0.1.5 per method (see docs/compat.md); ``rescale_mode`` is ferromerge's addition that
chooses between mergekit's L1 norm matching (default) and the DARE paper's division by density.
``passthrough`` has no kernel of its own: it runs ``linear`` over its single input with weight = ``scale`` and no
normalization (float32 math, one rounding: ``scale: 1`` is an exact copy).
This module only describes methods; the math lives in the Rust core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ._core import ParameterError

RESCALE_MODES = ("l1", "inverse_density")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its type (``float`` or ``bool`` or ``str``), default (None = required) and allowed values."""

    kind: type
    default: Any = None
    choices: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: "required": the base is the reference of task vectors; "joins": a base model is just one more input (linear).
    base: str
    #: the name the Rust kernel knows
    kernel: str
    per_model: dict[str, ParamSpec] = field(default_factory=dict)
    shared: dict[str, ParamSpec] = field(default_factory=dict)
    #: uses the seeded random stream (DARE)
    random: bool = False
    #: the per-model parameter that becomes the kernel's input weight
    weight_param: str = "weight"
    #: kernel settings that are not parameters (passthrough: normalize off)
    kernel_fixed: dict[str, Any] = field(default_factory=dict)
    #: most inputs per output tensor (passthrough: 1), None = any number
    max_inputs: int | None = None

    @property
    def requires_base(self) -> bool:
        return self.base == "required"

    def known_parameters(self) -> list[str]:
        return sorted([*self.per_model, *self.shared])


_WEIGHT = ParamSpec(float, None, doc="model weight (required)")
_DENSITY = ParamSpec(float, 1.0, doc="fraction of the task vector kept, in (0, 1]")
_INT8 = ParamSpec(bool, False, doc="accepted for mergekit compatibility; masks are never materialised, so no effect")
_LAMBDA = ParamSpec(float, 1.0, doc="scale of the merged task vector")
_MODE = ParamSpec(str, "l1", RESCALE_MODES, doc="l1: mergekit's L1 norm matching; inverse_density: DARE paper's 1/density")


def _gta(name: str, *, sparsify: bool, normalize: bool, rescale: bool, random: bool = False) -> MethodSpec:
    per_model = {"weight": _WEIGHT}
    shared = {
        "normalize": ParamSpec(bool, normalize),
        "lambda": _LAMBDA,
        "int8_mask": _INT8,
    }
    if sparsify:
        per_model["density"] = _DENSITY
        shared["rescale"] = ParamSpec(bool, rescale)
        shared["rescale_mode"] = _MODE
    return MethodSpec(name, "required", name, per_model, shared, random)


REGISTRY: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear", "joins", "linear", {"weight": _WEIGHT}, {"normalize": ParamSpec(bool, True)}
    ),
    "task_arithmetic": _gta("task_arithmetic", sparsify=False, normalize=False, rescale=False),
    "ties": _gta("ties", sparsify=True, normalize=True, rescale=False),
    "dare_ties": _gta("dare_ties", sparsify=True, normalize=False, rescale=True, random=True),
    "dare_linear": _gta("dare_linear", sparsify=True, normalize=False, rescale=True, random=True),
    "passthrough": MethodSpec(
        "passthrough",
        "joins",
        "linear",
        {"scale": ParamSpec(float, 1.0, doc="multiplier of the copied tensor")},
        {},
        weight_param="scale",
        kernel_fixed={"normalize": False},
        max_inputs=1,
    ),
}


def get(name: str) -> MethodSpec:
    """The method called ``name``; ``ParameterError`` listing the known ones otherwise."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ParameterError(f"unknown merge method {name!r}; ferromerge implements: {', '.join(sorted(REGISTRY))}")
    return spec


def coerce(spec: ParamSpec, name: str, value: Any, where: str) -> Any:
    """Check one parameter value's type (and range for density/weight); ``where`` names its place in the config."""
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"{where}: parameter {name!r} must be true or false, got {value!r}")
        return value
    if spec.kind is str:
        if not isinstance(value, str) or (spec.choices and value not in spec.choices):
            raise ParameterError(f"{where}: parameter {name!r} must be one of {list(spec.choices)}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"{where}: parameter {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(f"{where}: parameter {name!r} must be finite, got {value!r}")
    if name == "density" and not (0.0 < value <= 1.0):
        raise ParameterError(f"{where}: density must be in (0, 1], got {value!r}")
    return value


def resolve_shared(method: MethodSpec, given: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    """Shared (global) parameters with defaults filled in; unknown names are an error, never ignored."""
    out: dict[str, Any] = {}
    for name, spec in method.shared.items():
        out[name] = spec.default if given.get(name) is None else coerce(spec, name, given[name], where)
    return out


def kernel_spec(method: MethodSpec, shared: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``method`` object of the plan JSON / the keyword arguments of ``_core.merge_arrays``."""
    rescale = "none"
    if shared.get("rescale"):
        rescale = shared.get("rescale_mode", "l1")
    return {
        "name": method.kernel,
        "normalize": bool(method.kernel_fixed.get("normalize", shared.get("normalize", False))),
        "lambda": float(shared.get("lambda", 1.0)),
        "rescale": rescale,
        "seed": int(seed),
    }
