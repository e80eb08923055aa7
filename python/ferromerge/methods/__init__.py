"""Which merge methods exist and what they take, for mergekit users: the contract (``spec``) and the table
(``registry``)."""

from .registry import EXTENSIONS, GENERALIZED_TASK_ARITHMETIC, REGISTRY, default, get
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
    too_small,
    too_small_note,
)

__all__ = [
    "EXTENSIONS",
    "GENERALIZED_TASK_ARITHMETIC",
    "REGISTRY",
    "RESCALE_MODES",
    "MethodSpec",
    "ParamSpec",
    "check_model",
    "coerce",
    "default",
    "get",
    "kernel_for_tensor",
    "too_small",
    "too_small_note",
    "kernel_kwargs",
    "kernel_spec",
    "mean_only",
    "resolve_shared",
]
