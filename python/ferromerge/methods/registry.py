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

from dataclasses import replace
from typing import Any

from ..errors import ParameterError
from .spec import RESCALE_MODES, MethodSpec, ParamSpec

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

