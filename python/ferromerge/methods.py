"""The method registry: which merge methods exist, their parameters, defaults, base-model and input-count contract.

Names, parameters, scopes and defaults follow mergekit 0.1.5's own declarations (``ParameterSpec``s of
``GeneralizedTaskArithmeticMerge`` and the ``@merge_method`` signatures); docs/compat.md lists where ferromerge
differs. ferromerge's additions: ``rescale_mode`` chooses between mergekit's L1 norm matching (default) and the
papers' division by the keep probability (DARE's 1/density, DELLA's 1/p_i); ``per_row`` makes breadcrumbs select
per row as the paper's code does. ``passthrough`` has no kernel of its own: it runs ``linear`` over its single
input with weight = ``scale`` and no normalization (float32 math, one rounding: ``scale: 1`` is an exact copy).

A method's base model is ``required`` (the reference of task vectors, or slerp's start point), ``optional``
(nuslerp, multislerp: with a base they work on task vectors) or ``joins`` (linear, karcher, passthrough: a base
model is just one more input, as mergekit appends it). Input counts are of the kernel's inputs: non-base models
where the method takes a base, every model where it joins.
This module only describes methods; the math lives in the Rust core.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from collections.abc import Sequence
from typing import Any

from ._core import ParameterError

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
    #: SVD-heavy: handed to torch (``torch_path``) when the run's device is a torch one
    gpu_bound: bool = False

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

    def count_ok(self, n: int) -> bool:
        return n >= self.min_inputs and (self.max_inputs is None or n <= self.max_inputs)


_WEIGHT = ParamSpec(float, None, doc="model weight (required)")
_DENSITY = ParamSpec(float, 1.0, doc="fraction of the task vector kept, in (0, 1]", low=0.0, high=1.0, low_open=True)
_INT8 = ParamSpec(bool, False, doc="accepted for mergekit compatibility; masks are never materialised, so no effect")
_LAMBDA = ParamSpec(float, 1.0, doc="scale of the merged task vector")
_MODE = ParamSpec(
    str, "l1", RESCALE_MODES,
    doc="l1: mergekit's L1 norm matching; inverse_density: divide by the keep probability (DARE: density, DELLA: p_i)",
)
_GAMMA = ParamSpec(float, 0.01, doc="breadcrumbs: fraction of the largest |delta| removed", low=0.0, high=1.0)
_EPSILON = ParamSpec(
    float, 0.15, doc="della: keep probabilities span density -/+ epsilon over the magnitude ranks", low=0.0
)
_PER_ROW = ParamSpec(bool, False, doc="ferromerge: select per row (last dim), as the breadcrumbs paper's code does")
_T = ParamSpec(float, None, doc="interpolation factor (required)")
_ALPHA = ParamSpec(float, 1.0, doc="scale of the merged task vector (the papers sweep 0.1-3.0; 1.0 is their default)")
_TALL_LAMBDA = ParamSpec(
    float, 0.4, doc="TALL mask: keep |tau_t| > lambda * |tau_MTL - tau_t| (the papers pick 0.2-0.6 per task)", low=0.0
)


_EXCLUDE = ParamSpec(
    str, "",
    doc="regex of tensor names given the mean task vector instead of the SVD (e.g. 'embed_tokens|lm_head'; the "
    "reference code factorizes every 2-D tensor, which for LLM embeddings costs the most memory)",
)


def _spectral(name: str, shared: dict[str, ParamSpec]) -> MethodSpec:
    """A method of the singular-vector space of each 2-D task vector (TSV-M, Iso-C/CTS, STAR): no weights, every
    numeric parameter to the kernel, the shape too (it factorizes matrices), and torch may take it on a GPU.
    ``exclude`` is resolved by the planner into the kernel's per-tensor ``mean_only``."""
    spec = _method(name, "required", {**shared, "exclude": _EXCLUDE}, row_wise=True, gpu_bound=True)
    return replace(spec, kernel_params=tuple(p for p in spec.kernel_params if p != "exclude"))


def mean_only(method: MethodSpec, shared: dict[str, Any], tensor: str) -> bool:
    """Whether a spectral method's ``exclude`` pattern takes ``tensor`` out of the SVD treatment."""
    pattern = shared.get("exclude") or ""
    return method.gpu_bound and bool(pattern) and re.search(pattern, tensor) is not None


def _gta(
    name: str,
    *,
    sparsify: bool,
    normalize: bool,
    rescale: bool,
    random: bool = False,
    extra: dict[str, ParamSpec] | None = None,
    per_row: bool = False,
    row_wise: bool = False,
) -> MethodSpec:
    # mergekit 0.1.5 GeneralizedTaskArithmeticMerge.spec: int8_mask, normalize, rescale, lambda (shared);
    # weight, density (non-base); gamma for magnitude_outliers, epsilon for della_magprune (non-base).
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
    per_model.update(extra or {})
    kernel_params: tuple[str, ...] = ()
    if per_row:
        shared["per_row"] = _PER_ROW
        kernel_params = ("per_row",)
    return MethodSpec(
        name, "required", name, per_model, shared, random, kernel_params=kernel_params,
        row_wise=row_wise or per_row,
    )


def _method(
    name: str, base: str, shared: dict[str, ParamSpec] | None = None, *, weighted: bool = False, **kw: Any
) -> MethodSpec:
    """A method whose only per-model parameter is ``weight`` (``weighted``, else none) and whose shared ones all go
    to the kernel (except ``int8_mask``, accepted for mergekit compatibility)."""
    shared = shared or {}
    per_model = {"weight": _WEIGHT} if weighted else {}
    kernel_params = tuple(n for n in shared if n != "int8_mask")
    return MethodSpec(
        name, base, name, per_model, shared, weight_param="weight" if per_model else None,
        kernel_params=kernel_params, **kw,
    )


REGISTRY: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear", "joins", "linear", {"weight": _WEIGHT}, {"normalize": ParamSpec(bool, True)}
    ),
    "task_arithmetic": _gta("task_arithmetic", sparsify=False, normalize=False, rescale=False),
    "ties": _gta("ties", sparsify=True, normalize=True, rescale=False),
    "dare_ties": _gta("dare_ties", sparsify=True, normalize=False, rescale=True, random=True),
    "dare_linear": _gta("dare_linear", sparsify=True, normalize=False, rescale=True, random=True),
    "breadcrumbs": _gta(
        "breadcrumbs", sparsify=True, normalize=False, rescale=False, extra={"gamma": _GAMMA}, per_row=True
    ),
    "breadcrumbs_ties": _gta(
        "breadcrumbs_ties", sparsify=True, normalize=False, rescale=False, extra={"gamma": _GAMMA}, per_row=True
    ),
    "della": _gta(
        "della", sparsify=True, normalize=True, rescale=True, random=True, extra={"epsilon": _EPSILON}, row_wise=True
    ),
    "della_linear": _gta(
        "della_linear", sparsify=True, normalize=False, rescale=True, random=True, extra={"epsilon": _EPSILON},
        row_wise=True,
    ),
    "slerp": _method("slerp", "required", {"t": _T}, min_inputs=1, max_inputs=1),
    "nuslerp": _method(
        "nuslerp",
        "optional",
        {
            "nuslerp_row_wise": ParamSpec(bool, False, doc="vectors are columns (along dim 0) instead of rows"),
            "nuslerp_flatten": ParamSpec(bool, True, doc="the whole tensor is one vector"),
        },
        weighted=True,
        min_inputs=2,
        max_inputs=2,
        row_wise=True,
    ),
    "multislerp": _method(
        "multislerp",
        "optional",
        {
            "normalize_weights": ParamSpec(bool, True, doc="divide the weights by their sum"),
            "eps": ParamSpec(float, 1e-8, doc="numerical floor of norms", low=0.0, low_open=True),
        },
        weighted=True,
    ),
    "karcher": _method(
        "karcher",
        "joins",
        {
            "max_iter": ParamSpec(float, 10, doc="most iterations", low=1.0, high=1e6, integer=True),
            "tol": ParamSpec(float, 1e-5, doc="convergence tolerance", low=0.0),
        },
    ),
    "model_stock": _method(
        "model_stock",
        "required",
        {"filter_wise": ParamSpec(bool, False, doc="one interpolation factor per row instead of per tensor")},
        min_inputs=2,
        row_wise=True,
    ),
    "sce": _method(
        "sce",
        "required",
        {
            "select_topk": ParamSpec(float, 1.0, doc="fraction of highest-variance elements kept", low=0.0, high=1.0),
            "int8_mask": _INT8,
        },
    ),
    "ram": _method(
        "ram", "required", {"epsilon": ParamSpec(float, 1e-5, doc="|delta| above it counts as active", low=0.0)}
    ),
    "ramplus_tl": _method(
        "ramplus_tl",
        "required",
        {
            "epsilon": ParamSpec(float, 1e-5, doc="|delta| above it counts as active", low=0.0, low_open=True),
            "r": ParamSpec(float, 0.1, doc="strength of the unique-part boost"),
            "alpha": ParamSpec(float, 0.2, doc="cap of the shared/unique ratio", low=0.0),
        },
    ),
    "nearswap": _method("nearswap", "required", {"t": _T}, min_inputs=1, max_inputs=1),
    "arcee_fusion": _method("arcee_fusion", "required", {}, random=True, min_inputs=1, max_inputs=1, row_wise=True),
    "tsv_m": _spectral(
        "tsv_m",
        {
            "alpha": _ALPHA,
            "exact_svd": ParamSpec(bool, False, doc="exact SVDs instead of randomized ones (only the top r/T are used)"),
            "oversample": ParamSpec(float, 10, doc="randomized SVD: extra sketch columns", low=0.0, high=1e6, integer=True),
            "power_iters": ParamSpec(float, 2, doc="randomized SVD: power iterations", low=0.0, high=100.0, integer=True),
        },
    ),
    "iso_c": _spectral("iso_c", {"alpha": _ALPHA}),
    "iso_cts": _spectral(
        "iso_cts",
        {
            "alpha": _ALPHA,
            "common_space_fraction": ParamSpec(
                float, 0.8, doc="share of the spectrum given to the common subspace", low=0.0, high=1.0
            ),
        },
    ),
    "star": _spectral(
        "star",
        {"eta": ParamSpec(float, 40.0, doc="percent of each task vector's nuclear norm kept", low=0.0, high=100.0,
                          low_open=True)},
    ),
    "consensus": MethodSpec(
        "consensus",
        "required",
        "consensus",
        {},
        {
            "k": ParamSpec(float, 2, doc="keep elements where at least k TALL masks agree", low=0.0, high=1e6,
                           integer=True),
            "tall_mask_lambda": _TALL_LAMBDA,
            "lambda": _LAMBDA,
        },
        weight_param=None,
        kernel_params=("k", "tall_mask_lambda"),
    ),
    "tall_masks": _method(
        "tall_masks",
        "required",
        {
            "task": ParamSpec(float, None, doc="which model to rebuild: 0-based index among the non-base models",
                              low=0.0, high=1e6, integer=True),
            "tall_mask_lambda": _TALL_LAMBDA,
        },
    ),
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
    """Check one parameter value's type and range; ``where`` names its place in the config."""
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
    if spec.integer:
        if not value.is_integer():
            raise ParameterError(f"{where}: parameter {name!r} must be an integer, got {value!r}")
        value = int(value)
    below = spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low))
    above = spec.high is not None and (value > spec.high or (spec.high_open and value == spec.high))
    if below or above:
        raise ParameterError(f"{where}: {name} must be in {spec.range_text()}, got {value!r}")
    return value


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
    """The ``method`` object of the plan JSON / the keyword arguments of ``_core.merge_arrays``.

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


def kernel_kwargs(
    method: MethodSpec,
    *,
    shape: Sequence[int] | None = None,
    params: dict[str, float] | None = None,
    gammas: Sequence[float | None] | None = None,
    epsilons: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``_core.merge_arrays`` that only some methods use, those that apply.

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
