"""What a merge method is to the config and the planner: its parameters (``ParamSpec``), its contract
(``MethodSpec``: base role, input counts, what goes to the kernel), value checks and the kernel's ``method`` object."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..errors import ParameterError

RESCALE_MODES = ("l1", "inverse_density")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its type (``float``, ``bool`` or ``str``), default (None = required), allowed values/range."""

    kind: type
    default: Any = None
    choices: tuple[str, ...] = ()
    doc: str = ""
    #: numbers only: bounds (None = unbounded) and whether each bound itself is allowed
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    #: numbers only: the value must be an integer (mergekit's ``int`` parameters; gradients still interpolate, and
    #: a fractional result is an error there too)
    integer: bool = False

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: "required": the base is the reference of task vectors (or slerp's start); "optional": used when given
    #: (nuslerp, multislerp); "joins": a base model is just one more input (linear, karcher, passthrough)
    base: str
    #: the name the Rust kernel knows
    kernel: str
    per_model: dict[str, ParamSpec] = field(default_factory=dict)
    shared: dict[str, ParamSpec] = field(default_factory=dict)
    #: the result depends on the seed (DARE and DELLA masks; arcee_fusion's quantile sample of large tensors)
    random: bool = False
    #: the per-model parameter that becomes the kernel's input weight; None: the method has no weights (1.0 each)
    weight_param: str | None = "weight"
    #: kernel settings that are not parameters (passthrough: normalize off)
    kernel_fixed: dict[str, Any] = field(default_factory=dict)
    #: shared parameters that go to the kernel's ``params`` object (numbers; booleans as 1.0/0.0)
    kernel_params: tuple[str, ...] = ()
    #: the kernel needs the tensor's shape (row-wise work: della, model_stock filter_wise, ...); others see a
    #: flat array, so the in-memory API only passes the shape to these
    row_wise: bool = False
    #: fewest and most kernel inputs per output tensor (non-base ones when the method takes a base); None = any
    min_inputs: int = 1
    max_inputs: int | None = None
    #: SVD-heavy: handed to torch (``torch_spectral``) when the run's device is a torch one
    gpu_bound: bool = False
    #: a base model alone (no other input) is accepted and gives the base, as mergekit's kernel returns it (the
    #: task-vector methods, sce, ram, ramplus_tl)
    base_alone: bool = False

    @property
    def requires_base(self) -> bool:
        return self.base == "required"

    @property
    def takes_base(self) -> bool:
        """A base model is a separate role (required or optional), not one more input."""
        return self.base in ("required", "optional")

    def known_parameters(self) -> list[str]:
        return sorted([*self.per_model, *self.shared])

    def inputs_rule(self, thing: str = "model", base: str = "base_model") -> str:
        """The input-count contract in words: ``a base_model and exactly 1 other model``."""
        lo, hi = self.min_inputs, self.max_inputs
        count = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        things = thing if (hi if hi is not None else lo) == 1 else thing + "s"
        if self.base == "required":
            return f"a {base} and {count} other {things}"
        if self.base == "optional":
            return f"{count} {things} besides the {base} (which is optional)"
        return f"{count} {things}"

    def kernel_param_defaults(self) -> dict[str, float]:
        """The kernel's ``params`` object at every parameter's default (booleans as 1.0/0.0; required ones left
        out)."""
        return {
            name: float(self.shared[name].default)
            for name in self.kernel_params
            if self.shared[name].default is not None
        }

    def count_ok(self, n: int) -> bool:
        return n >= self.min_inputs and (self.max_inputs is None or n <= self.max_inputs)


def mean_only(method: MethodSpec, shared: dict[str, Any], tensor: str) -> bool:
    """Whether a spectral method's ``exclude`` pattern takes ``tensor`` out of the SVD treatment."""
    pattern = shared.get("exclude") or ""
    return method.gpu_bound and bool(pattern) and re.search(pattern, tensor) is not None


#: mergekit's parameter types, read in pydantic's lax mode as mergekit's ``ParameterSpec.validate`` reads them
_LAX: dict[str, TypeAdapter[Any]] = {"float": TypeAdapter(float), "int": TypeAdapter(int), "bool": TypeAdapter(bool)}


def _lax(kind: str, value: Any) -> tuple[bool, Any]:
    try:
        return True, _LAX[kind].validate_python(value)
    except ValidationError:
        return False, None


def _exact(kind: str, value: Any) -> tuple[bool, Any]:
    """``_lax``'s result for Python values of the type itself: a bool for bool, an int or float (not a bool) for a
    number, one with no fraction for an integer."""
    if kind == "bool":
        return isinstance(value, bool), value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False, None
    if kind == "int":
        return float(value).is_integer(), int(value) if float(value).is_integer() else None
    return True, float(value)


def coerce(spec: ParamSpec, name: str, value: Any, where: str, *, lax: bool = False) -> Any:
    """Check one parameter value's type and range; ``where`` names its place in the config.

    ``lax`` (a config's values): read as mergekit 0.1.5 reads them: its ``ParameterSpec.validate`` is pydantic's lax
    mode for the declared type, so a number may be written as a string (``"1e-6"``: YAML 1.1 reads an exponent
    without a dot as a string), a boolean as 0/1, 0.0/1.0 or "true"/"yes"/"on"/"1"..., an integer as 5.0 or "5", a
    number as a boolean (1.0); what pydantic refuses is refused here, with the parameter's place. Otherwise (the
    in-memory API's Python values) a number is an int or float, a boolean a bool. ferromerge's own string
    parameters (``rescale_mode``, ``exclude``) take strings only. Numbers must be finite (pydantic's "nan" would make
    a NaN model) and within the parameter's range.
    """
    read = _lax if lax else _exact
    if spec.kind is bool:
        ok, flag = read("bool", value)
        if not ok:
            raise ParameterError(f"{where}: parameter {name!r} must be true or false, got {value!r}")
        return flag
    if spec.kind is str:
        if not isinstance(value, str) or (spec.choices and value not in spec.choices):
            raise ParameterError(f"{where}: parameter {name!r} must be one of {list(spec.choices)}, got {value!r}")
        return value
    ok, number = read("float", value)
    if not ok:
        raise ParameterError(f"{where}: parameter {name!r} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ParameterError(f"{where}: parameter {name!r} must be finite, got {value!r}")
    if spec.integer:
        # mergekit's int parameters refuse "1e3" and 2.5 as pydantic's int does
        ok, whole = read("int", value)
        if not ok:
            raise ParameterError(f"{where}: parameter {name!r} must be an integer, got {value!r}")
        number = whole
    below = spec.low is not None and (number < spec.low or (spec.low_open and number == spec.low))
    above = spec.high is not None and (number > spec.high or (spec.high_open and number == spec.high))
    if below or above:
        raise ParameterError(f"{where}: {name} must be in {spec.range_text()}, got {number!r}")
    return number


def check_model(method: MethodSpec, values: dict[str, Any], where: str) -> None:
    """Checks that span several per-model parameters of one model for one tensor (``where`` names both).

    DELLA: keep probabilities run from density - epsilon to density + epsilon, so both must lie in (0, 1) (as
    mergekit's ``della_magprune`` checks); density 1 keeps everything whatever epsilon is.
    """
    if "epsilon" in method.per_model:
        d, eps = values.get("density", 1.0), values["epsilon"]
        if d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
            raise ParameterError(
                f"{where}: density {d!r} with epsilon {eps!r} gives keep probabilities from {d - eps:g} to "
                f"{d + eps:g}; density -/+ epsilon must lie in (0, 1): lower epsilon (or density 1 to keep all)"
            )


def resolve_shared(method: MethodSpec, given: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    """Shared (global) parameters with defaults filled in; unknown names are an error, never ignored."""
    out: dict[str, Any] = {}
    for name, spec in method.shared.items():
        if given.get(name) is None:
            if spec.default is None:
                raise ParameterError(f"missing required parameter {name!r} for method {method.name!r}")
            out[name] = spec.default
        else:
            out[name] = coerce(spec, name, given[name], where)
    return out


def kernel_spec(method: MethodSpec, shared: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``method`` object of the plan JSON / the keyword arguments of ``_engine.merge_arrays``.

    ``params`` (method-wide numbers; booleans as 1.0/0.0) is present only for methods that take some.
    """
    rescale = "none"
    if shared.get("rescale"):
        rescale = shared.get("rescale_mode", "l1")
    out: dict[str, Any] = {
        "name": method.kernel,
        "normalize": bool(method.kernel_fixed.get("normalize", shared.get("normalize", False))),
        "lambda": float(shared.get("lambda", 1.0)),
        "rescale": rescale,
        "seed": int(seed),
    }
    if method.kernel_params:
        out["params"] = {name: float(shared[name]) for name in method.kernel_params}
    if "exclude" in shared and shared["exclude"]:
        try:
            re.compile(shared["exclude"])
        except re.error as e:
            raise ParameterError(f"parameter 'exclude' is not a valid regular expression: {e}") from None
    return out


def too_small(method: MethodSpec, shape: Sequence[int], tasks: int) -> bool:
    """Whether a matrix is too small for TSV-M to give each of ``tasks`` task vectors a direction (it keeps
    floor(min(m, n) / T) per task): such a matrix gets the mean task vector, with a note. The Rust kernel applies
    the same rule (``spectral::too_small``) to calls that bypass the planner."""
    return method.name == "tsv_m" and len(shape) == 2 and min(shape) < tasks


def too_small_note(tensor: str, shape: Sequence[int], tasks: int) -> str:
    return (
        f"tsv_m: tensor {tensor} {tuple(shape)} has fewer than one singular direction per task "
        f"(floor({min(shape)}/{tasks}) = 0); it gets the mean task vector"
    )


def kernel_for_tensor(
    method: MethodSpec,
    kernel: dict[str, Any],
    shared: dict[str, Any],
    tensor: str,
    shape: Sequence[int] = (),
    tasks: int = 0,
) -> dict[str, Any]:
    """The kernel's ``method`` object for one tensor: ``kernel`` (``kernel_spec``), with ``params.mean_only`` set
    when the method's ``exclude`` takes ``tensor`` out of the SVD treatment (``mean_only``) or the matrix is
    ``too_small`` for its ``tasks`` task vectors. The one place the plan and the in-memory API add it."""
    if not (mean_only(method, shared, tensor) or too_small(method, shape, tasks)):
        return kernel
    return {**kernel, "params": {**kernel.get("params", {}), "mean_only": 1.0}}


def kernel_kwargs(
    method: MethodSpec,
    *,
    shape: Sequence[int] | None = None,
    params: dict[str, float] | None = None,
    gammas: Sequence[float | None] | None = None,
    epsilons: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``_engine.merge_arrays`` that only some methods use, those that apply.

    ``shape`` goes only to row-wise kernels (the others work on the flat array, where the default ``[numel]`` is
    the same); ``gammas``/``epsilons`` only when every input has one (breadcrumbs, della).
    """
    out: dict[str, Any] = {}
    if method.row_wise and shape is not None and len(shape) > 0:
        out["shape"] = [int(d) for d in shape]
    if params is not None:
        out["params"] = dict(params)
    for key, values in (("gammas", gammas), ("epsilons", epsilons)):
        if values is not None and all(v is not None for v in values):
            out[key] = [float(v) for v in values]  # type: ignore[arg-type]
    return out
