"""Which merge methods exist and what they take, for mergekit users: the contract (``spec``) and the table
(``registry``)."""

from .registry import REGISTRY, get
from .spec import (
    RESCALE_MODES,
    MethodSpec,
    ParamSpec,
    check_model,
    coerce,
    kernel_for_tensor,
    kernel_kwargs,
    kernel_spec,
    mean_only,
    resolve_shared,
)

__all__ = [
    "REGISTRY",
    "RESCALE_MODES",
    "MethodSpec",
    "ParamSpec",
    "check_model",
    "coerce",
    "get",
    "kernel_for_tensor",
    "kernel_kwargs",
    "kernel_spec",
    "mean_only",
    "resolve_shared",
]
