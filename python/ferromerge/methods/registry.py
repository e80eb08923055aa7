"""The method registry: which merge methods exist, their parameters, defaults, base-model and input-count contract.

The contract is the engine's: ``_engine.methods()`` (rust/core/src/merge/method.rs, parameter definitions in
params.rs) gives each method's base role, input counts, kernel parameters with their defaults (method-wide ones
become shared parameters, per-input ones per-model parameters) and whether it is spectral. ``derive`` builds the
registry from that table, read once at import; this module adds only what a config needs and the engine does not
know: each parameter's value type, range and doc, mergekit's own parameters that never reach the kernel's
``params`` (``normalize``, ``lambda``, ``int8_mask``, ``rescale``, ``rescale_mode``, ``exclude``) with their
defaults, which methods use the seed or need the tensor's shape, and the ``passthrough`` alias. A method or
parameter on one side without the other is an error at import, so the two cannot drift apart.

Names, parameters, scopes and defaults follow mergekit 0.1.5's own declarations (``ParameterSpec``s of
``GeneralizedTaskArithmeticMerge`` and the ``@merge_method`` signatures); docs/compat.md lists where ferromerge
differs. ferromerge's additions (``EXTENSIONS``): ``rescale_mode`` chooses between mergekit's L1 norm matching
(default) and the papers' division by the keep probability (DARE's 1/density, DELLA's 1/p_i); ``per_row`` makes
breadcrumbs select per row as the paper's code does; ``exclude`` gives the spectral methods' matching tensors the
mean task vector. ``passthrough`` has no kernel of its own: it runs ``linear`` over its single input with weight =
``scale`` and no normalization (float32 math, one rounding: ``scale: 1`` is an exact copy).

A method's base model is ``required`` (the reference of task vectors, or slerp's start point), ``optional``
(nuslerp, multislerp: with a base they work on task vectors) or ``joins`` (linear, karcher, passthrough: a base
model is just one more input, as mergekit appends it). Input counts are of the kernel's inputs: non-base models
where the method takes a base, every model where it joins.
This module only describes methods; the math lives in the Rust core.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .. import _engine
from ..errors import ParameterError
from .spec import RESCALE_MODES, MethodSpec, ParamSpec

__all__ = [
    "EXTENSIONS",
    "GENERALIZED_TASK_ARITHMETIC",
    "PARAMETER_NAMES",
    "PLANNER_PARAMS",
    "REGISTRY",
    "default",
    "derive",
    "get",
]

#: kernel parameters the planner sets per tensor from other settings (never written in a config)
PLANNER_PARAMS = frozenset({"mean_only"})
#: ferromerge's parameters that mergekit 0.1.5 does not have (a mergekit config never carries them)
EXTENSIONS = frozenset({"rescale_mode", "per_row", "exclude"})


def _typed(kind: type, doc: str = "", **checks: Any) -> ParamSpec:
    """A parameter's type, range and doc; its default is the engine's (or, for mergekit-only ones, set here)."""
    return ParamSpec(kind, None, doc=doc, **checks)


# Value types, ranges and docs of the kernel's parameters, by name. Defaults are not here: ``derive`` takes them
# from the engine's table.
_PER_INPUT_TYPES: dict[str, ParamSpec] = {
    "weight": _typed(float, "model weight (required)"),
    "density": _typed(float, "fraction of the task vector kept, in (0, 1]", low=0.0, high=1.0, low_open=True),
    "gamma": _typed(float, "breadcrumbs: fraction of the largest |delta| removed", low=0.0, high=1.0),
    "epsilon": _typed(float, "della: keep probabilities span density -/+ epsilon over the magnitude ranks", low=0.0),
}
_TALL_MASK_LAMBDA = _typed(
    float, "TALL mask: keep |tau_t| > lambda * |tau_MTL - tau_t| (the papers pick 0.2-0.6 per task)", low=0.0
)
_METHOD_WIDE_TYPES: dict[str, ParamSpec] = {
    "t": _typed(float, "interpolation factor (required)"),
    "per_row": _typed(bool, "ferromerge: select per row (last dim), as the breadcrumbs paper's code does"),
    "nuslerp_row_wise": _typed(bool, "vectors are columns (along dim 0) instead of rows"),
    "nuslerp_flatten": _typed(bool, "the whole tensor is one vector"),
    "normalize_weights": _typed(bool, "divide the weights by their sum"),
    "eps": _typed(float, "numerical floor of norms", low=0.0, low_open=True),
    "max_iter": _typed(float, "most iterations", low=1.0, high=1e6, integer=True),
    "tol": _typed(float, "convergence tolerance", low=0.0),
    "filter_wise": _typed(bool, "one interpolation factor per row instead of per tensor"),
    "select_topk": _typed(float, "fraction of highest-variance elements kept", low=0.0, high=1.0),
    "epsilon": _typed(float, "|delta| above it counts as active", low=0.0),
    "r": _typed(float, "strength of the unique-part boost"),
    "alpha": _typed(float, "scale of the merged task vector (the papers sweep 0.1-3.0; 1.0 is their default)"),
    "exact_svd": _typed(
        bool,
        "exact SVDs, the paper's factors (default true); false: randomized top-r/T SVDs (oversample, power_iters), "
        "faster only for small r/T and not exact: on a slowly decaying spectrum each factor lies ~20% from the exact "
        "truncation and on real fine-tunes the merged update 49% from the exact one (docs/svd.md)",
    ),
    "oversample": _typed(float, "randomized SVD: extra sketch columns", low=0.0, high=1e6, integer=True),
    "power_iters": _typed(float, "randomized SVD: power iterations", low=0.0, high=100.0, integer=True),
    "common_space_fraction": _typed(float, "share of the spectrum given to the common subspace", low=0.0, high=1.0),
    "eta": _typed(float, "percent of each task vector's nuclear norm kept", low=0.0, high=100.0, low_open=True),
    "k": _typed(float, "keep elements where at least k TALL masks agree", low=0.0, high=1e6, integer=True),
    "tall_mask_lambda": _TALL_MASK_LAMBDA,
    "task": _typed(float, "which model to rebuild: 0-based index among the non-base models", low=0.0, high=1e6,
                   integer=True),
}
#: (method, parameter) -> its type where it differs from the same name's in other methods
_METHOD_WIDE_OVERRIDES: dict[tuple[str, str], ParamSpec] = {
    ("ramplus_tl", "epsilon"): _typed(float, "|delta| above it counts as active", low=0.0, low_open=True),
    ("ramplus_tl", "alpha"): _typed(float, "cap of the shared/unique ratio", low=0.0),
}

# mergekit's parameters that are not kernel parameters (they shape the plan's ``method`` object or the planner's
# per-tensor choices), with their defaults: these are the only defaults written in Python.
_INT8_MASK = ParamSpec(bool, False, doc="accepted for mergekit compatibility; masks are never materialised, so no effect")
_LAMBDA = ParamSpec(float, 1.0, doc="scale of the merged task vector")
_RESCALE_MODE = ParamSpec(
    str, RESCALE_MODES[0], RESCALE_MODES,
    doc="l1: mergekit's L1 norm matching; inverse_density: divide by the keep probability (DARE: density, DELLA: p_i)",
)
_EXCLUDE = ParamSpec(
    str, "",
    doc="regex of tensor names given the mean task vector instead of the SVD (e.g. 'embed_tokens|lm_head'; the "
    "reference code factorizes every 2-D tensor, which for LLM embeddings costs the most memory)",
)


@dataclass(frozen=True)
class _ConfigFacts:
    """What a config knows about one method and the engine does not."""

    #: mergekit's shared parameters placed before the kernel's (GeneralizedTaskArithmeticMerge's order) and after
    before: Mapping[str, ParamSpec] = field(default_factory=dict)
    after: Mapping[str, ParamSpec] = field(default_factory=dict)
    #: the result depends on the seed beyond what the sparsifier says (arcee_fusion's quantile sample)
    seeded: bool = False
    #: the kernel needs the tensor's shape (row-wise work); the spectral methods always do (they factorize matrices)
    row_wise: bool = False
    #: mergekit implements it as a ``GeneralizedTaskArithmeticMerge`` (per-model weight and density, shared
    #: normalize, lambda, rescale, int8_mask)
    generalized_task_arithmetic: bool = False
    #: mergekit's kernel returns the base when it is the only input (``MethodSpec.base_alone``)
    base_alone: bool = False


def _gta(*, normalize: bool, rescale: bool | None = None, row_wise: bool = False) -> _ConfigFacts:
    """mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge`` shared parameters with the method's
    ``default_normalize`` and ``default_rescale`` (None: the method does not sparsify, so it has no rescale)."""
    before = {"normalize": ParamSpec(bool, normalize), "lambda": _LAMBDA, "int8_mask": _INT8_MASK}
    if rescale is not None:
        before |= {"rescale": ParamSpec(bool, rescale), "rescale_mode": _RESCALE_MODE}
    return _ConfigFacts(before=before, row_wise=row_wise, generalized_task_arithmetic=True, base_alone=True)


_SPECTRAL = _ConfigFacts(after={"exclude": _EXCLUDE})

#: every engine method, by name: what a config adds to the engine's row
_CONFIG_FACTS: dict[str, _ConfigFacts] = {
    "linear": _ConfigFacts(before={"normalize": ParamSpec(bool, True)}),
    "task_arithmetic": _gta(normalize=False),
    "ties": _gta(normalize=True, rescale=False),
    "dare_ties": _gta(normalize=False, rescale=True),
    "dare_linear": _gta(normalize=False, rescale=True),
    "breadcrumbs": _gta(normalize=False, rescale=False, row_wise=True),
    "breadcrumbs_ties": _gta(normalize=False, rescale=False, row_wise=True),
    "della": _gta(normalize=True, rescale=True, row_wise=True),
    "della_linear": _gta(normalize=False, rescale=True, row_wise=True),
    "slerp": _ConfigFacts(),
    "nuslerp": _ConfigFacts(row_wise=True),
    "multislerp": _ConfigFacts(),
    "karcher": _ConfigFacts(),
    "model_stock": _ConfigFacts(row_wise=True),
    "sce": _ConfigFacts(after={"int8_mask": _INT8_MASK}, base_alone=True),
    "ram": _ConfigFacts(base_alone=True),
    "ramplus_tl": _ConfigFacts(base_alone=True),
    "nearswap": _ConfigFacts(),
    "arcee_fusion": _ConfigFacts(seeded=True, row_wise=True),
    "tsv_m": _SPECTRAL,
    "iso_c": _SPECTRAL,
    "iso_cts": _SPECTRAL,
    "star": _SPECTRAL,
    "consensus": _ConfigFacts(after={"lambda": _LAMBDA}),
    "tall_masks": _ConfigFacts(),
}

#: sparsifiers that draw masks from the seed (DARE's Bernoulli, DELLA's rank-dependent one)
_SEEDED_SPARSIFIERS = ("random", "della_magprune")


def _with_default(types: ParamSpec, default: Any, method: str, param: str) -> ParamSpec:
    """``types`` with the engine's ``default``, after checking that the two agree on the kind of value."""
    if isinstance(default, bool) != (types.kind is bool) or (isinstance(default, int) and not isinstance(
            default, bool) and not types.integer):
        raise RuntimeError(
            f"method {method!r}: the engine's default {default!r} of {param!r} does not fit the registry's type "
            f"({types.kind.__name__}{', integer' if types.integer else ''})"
        )
    return replace(types, default=default)


def _typed_params(
    method: str, engine_params: Mapping[str, Any], types: Mapping[str, ParamSpec], scope: str
) -> dict[str, ParamSpec]:
    out = {}
    for param, default in engine_params.items():
        if param in PLANNER_PARAMS:
            continue
        spec = _METHOD_WIDE_OVERRIDES.get((method, param)) if scope == "method-wide" else None
        spec = spec or types.get(param)
        if spec is None:
            raise RuntimeError(
                f"the engine's method {method!r} takes the {scope} parameter {param!r}, which the registry "
                f"(ferromerge/methods/registry.py) has no type for"
            )
        out[param] = _with_default(spec, default, method, param)
    return out


def _from_row(row: Mapping[str, Any], facts: _ConfigFacts) -> MethodSpec:
    name = row["name"]
    per_model = _typed_params(name, row["input_params"], _PER_INPUT_TYPES, "per-input")
    kernel = _typed_params(name, row["params"], _METHOD_WIDE_TYPES, "method-wide")
    shared = {**facts.before, **kernel, **facts.after}
    if len(shared) != len(facts.before) + len(kernel) + len(facts.after):
        raise RuntimeError(f"method {name!r}: a mergekit-only parameter has the name of one of the kernel's")
    return MethodSpec(
        name,
        row["base"],
        name,
        per_model,
        shared,
        random=row["sparsify"] in _SEEDED_SPARSIFIERS or facts.seeded,
        weight_param="weight" if "weight" in per_model else None,
        kernel_params=tuple(kernel),
        row_wise=facts.row_wise or row["spectral"],
        min_inputs=row["min_inputs"],
        max_inputs=row["max_inputs"],
        gpu_bound=row["spectral"],
        base_alone=facts.base_alone,
    )


def _passthrough(linear: MethodSpec) -> MethodSpec:
    """mergekit's ``passthrough``: the ``linear`` kernel over one input, weighted by ``scale``, never normalized."""
    return replace(
        linear,
        name="passthrough",
        per_model={"scale": ParamSpec(float, 1.0, doc="multiplier of the copied tensor")},
        shared={},
        weight_param="scale",
        kernel_fixed={"normalize": False},
        max_inputs=1,
    )


def derive(rows: Iterable[Mapping[str, Any]]) -> dict[str, MethodSpec]:
    """The registry from the engine's method table ``rows`` (``_engine.methods()``), in the table's order, then
    the config-level aliases. ``RuntimeError`` when the table and this module disagree on which methods exist or
    the table has a parameter this module has no type for."""
    by_name = {row["name"]: row for row in rows}
    if set(by_name) != set(_CONFIG_FACTS):
        raise RuntimeError(
            "the engine's method table and the registry differ: only in the engine: "
            f"{sorted(set(by_name) - set(_CONFIG_FACTS))}, only in the registry: "
            f"{sorted(set(_CONFIG_FACTS) - set(by_name))}"
        )
    registry = {name: _from_row(row, _CONFIG_FACTS[name]) for name, row in by_name.items()}
    registry["passthrough"] = _passthrough(registry["linear"])
    return registry


REGISTRY: dict[str, MethodSpec] = derive(_engine.methods())
#: the methods mergekit 0.1.5 runs as a ``GeneralizedTaskArithmeticMerge`` (task vectors, sparsified or not)
GENERALIZED_TASK_ARITHMETIC: tuple[str, ...] = tuple(n for n, f in _CONFIG_FACTS.items() if f.generalized_task_arithmetic)
#: every parameter name of every method: a config key with one of these names is a parameter out of its place
PARAMETER_NAMES: frozenset[str] = frozenset(p for spec in REGISTRY.values() for p in [*spec.per_model, *spec.shared])


def get(name: str) -> MethodSpec:
    """The method called ``name``; ``ParameterError`` listing the known ones otherwise."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ParameterError(f"unknown merge method {name!r}; ferromerge implements: {', '.join(sorted(REGISTRY))}")
    return spec


def default(method: str, param: str) -> Any:
    """``method``'s default of ``param`` (the engine's, for a kernel parameter). Tools that share a kernel's knob
    start from it rather than from a copy: extract-lora's randomized SVD (tsv_m's sketch), compress's TALL masks."""
    spec = get(method)
    return {**spec.per_model, **spec.shared}[param].default
