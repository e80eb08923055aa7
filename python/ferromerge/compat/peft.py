"""PEFT's ``peft.utils.merge_utils`` on ferromerge's kernels: same names, signatures and semantics.

>>> from ferromerge.compat import peft as merge_utils      # instead of: from peft.utils import merge_utils
>>> merged = merge_utils.ties(task_tensors, torch.tensor([0.6, 0.4]), density=0.5)

What PEFT does (checked against peft 0.21): ``task_tensors`` are full deltas (there is no base); ``weights`` is a
tensor with one weight per task tensor; pruning is per tensor; ``magnitude`` pruning keeps ``int(density·numel)``
entries (possibly none); ``random`` pruning keeps each entry with probability ``density`` and, with ``rescale``,
divides the kept ones by ``density``; ``ties`` / ``dare_ties`` elect the sign on the *unweighted* pruned tensors
("total": sign of the sum, "frequency": sign of the count of signs, ties → +1) and divide the weighted sum of
the agreeing entries by their *count* (at least 1). ``density >= 1`` warns and prunes nothing, ``density < 0``
is a ``ValueError``. Results have PEFT's dtypes (``task_tensors * weights`` promotes; ``ties`` / ``dare_ties``
also promote with the default float dtype, because PEFT divides by a float count).

Which kernel runs (all math float32, one rounding into the result dtype):

* ``task_arithmetic``: the ``task_arithmetic`` kernel over a zero base (δ − 0 = δ exactly), one pass.
* ``magnitude_based_pruning``: the TIES trim of one tensor, exact ``int(density·numel)`` kept; ``magnitude_prune``
  trims and sums in one ``breadcrumbs`` pass with ``gamma = 0`` (no outliers removed: the same top-k).
* ``ties`` / ``dare_ties`` with ``"total"`` and equal weights ``w``: one ``ties`` / ``dare_ties`` kernel pass with
  weights 1 (so the election is unweighted and the divisor is the agreeing count) and ``lambda = w``. Otherwise
  (``"frequency"`` or unequal weights) the pruning runs in the kernels and the sign election and disjoint merge
  — cheap elementwise steps our kernels do not offer in PEFT's form — run in torch.
* ``random_pruning``, ``dare_linear``: the DARE kernel with rescale ``inverse_density`` (PEFT's 1/density).

Where results differ from PEFT, and why:

* Ties in magnitude (equal |δ| at the cut) keep the lowest index; ``torch.topk``'s choice is arbitrary.
* Random pruning does **not** use torch's global RNG: masks come from ferromerge's counter-based generator keyed
  by ``seed`` (keyword, default 0), ``name`` (keyword, default ``""``) and the task tensor's position in the list,
  so the same call gives the same result on any machine and thread count, and ``torch.manual_seed`` has no
  effect. Pass a different ``name`` (e.g. the module name) per merged module when masks should differ between
  modules of the same shape. The masks cannot bit-match torch's.
* Float math is float32 with one final rounding; PEFT computes in the tensors' dtype (bf16 merges round at
  every step). A float64 result (float64 weights) is computed in float32 and then widened.
* ``random_pruning`` / ``dare_*`` with ``density == 0`` and rescale: PEFT returns NaN (0/0); we raise
  ``ValueError``. ``random_pruning`` with ``density > 1``: torch raises deep inside ``bernoulli``; we raise
  ``ValueError``.
* ``magnitude_based_pruning`` with ``density > 1`` keeps everything (``torch.topk`` raises).
* Only float32/float16/bfloat16 task tensors (the kernels' dtypes) and weights with one value per task tensor
  (or a single value) are accepted; anything else raises ``TypeError`` / ``ValueError``. CPU tensors are read
  without a copy; tensors on other devices are copied to the CPU and the result is moved back.

torch is imported only when a function is called; without it the functions raise ``ImportError``.

The module reads top-down: argument checks with PEFT's messages, the one kernel call over a zero base
(``_kernel``, with the single-tensor pruners built on it), then PEFT's functions themselves; the helpers serve
only those functions' PEFT-compatible checks and dtype promotion, so they stay beside them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from .. import _engine
from .._validate import check_seed
from ..arrays import as_array, give_back, torch_dtype_name

__all__ = [
    "calculate_majority_sign_mask",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_based_pruning",
    "magnitude_prune",
    "prune",
    "random_pruning",
    "reshape_weight_task_tensors",
    "task_arithmetic",
    "ties",
]

_SIGN_METHODS = ("total", "frequency")


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "ferromerge.compat.peft works on torch tensors, and torch is not installed (pip install torch)"
        ) from e
    return torch


def _check_tensor(t: Any, where: str) -> None:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if torch_dtype_name(t.dtype) is None:
        raise TypeError(
            f"{where}: dtype {t.dtype} is not supported; ferromerge's kernels take float32, float16 or bfloat16"
        )


def _check_tasks(task_tensors: Any) -> list[Any]:
    if isinstance(task_tensors, (str, bytes)) or not isinstance(task_tensors, Sequence) or not task_tensors:
        raise ValueError("task_tensors: expected a non-empty list of tensors")
    tasks = list(task_tensors)
    for i, t in enumerate(tasks):
        _check_tensor(t, f"task_tensors[{i}]")
        if t.shape != tasks[0].shape:
            raise ValueError(
                f"task_tensors[{i}] has shape {tuple(t.shape)}, task_tensors[0] has {tuple(tasks[0].shape)}"
            )
    return tasks


def _task_dtype(tasks: list[Any]) -> Any:
    torch = _torch()
    dtype = tasks[0].dtype
    for t in tasks[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _weight_values(weights: Any, n: int) -> tuple[list[float], Any]:
    """One float per task tensor, and the weights' dtype (it takes part in PEFT's type promotion)."""
    torch = _torch()
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(weights)
    # PEFT broadcasts weights from the left over the stacked tensors: [n] or [n, 1, ...] is one weight per tensor,
    # a single value is the same weight for all; other shapes would weight individual entries
    if not (w.numel() == 1 or (w.dim() >= 1 and w.shape[0] == n and w.numel() == n)):
        raise ValueError(
            f"weights: expected one weight per task tensor ({n}) or a single weight, got shape {tuple(w.shape)}; "
            "per-element weights are not supported by ferromerge's kernels"
        )
    values = [float(v) for v in w.detach().reshape(-1).cpu().tolist()]
    if len(values) == 1:
        values = values * n
    return values, w.dtype


def _check_density(density: float) -> float:
    density = float(density)
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    return density


def _warn_no_pruning(density: float) -> None:
    # PEFT's prune() warns in this case; keep the warning so that drop-in users see the same signal
    warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=3)


def _kernel(
    method: str,
    tasks: list[Any],
    weights: list[float],
    densities: list[float],
    out_dtype: Any,
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: str = "none",
    seed: int = 0,
    name: str = "",
    model_ids: list[int] | None = None,
    gammas: list[float] | None = None,
) -> Any:
    """``method`` over ``tasks`` as deltas from a zero base (δ − 0 is exact); the result as a tensor of ``out_dtype``
    (computed in float32 and widened when ``out_dtype`` is wider than the kernels' dtypes)."""
    arrays = [as_array(t, f"task_tensors[{i}]") for i, t in enumerate(tasks)]
    first = arrays[0]
    # a zero base of the first tensor's storage type: bfloat16 +0.0 is the bit pattern 0
    base = np.zeros(first.flat.size, dtype=first.flat.dtype)
    out_name = torch_dtype_name(out_dtype) or "float32"
    flat = _engine.merge_arrays(
        {"name": method, "normalize": normalize, "lambda": float(lambda_), "rescale": rescale, "seed": _check_seed(seed)},
        [a.flat for a in arrays],
        base,
        _engine.input_values(weights, densities, gammas=gammas, model_ids=model_ids),
        out_dtype=out_name,
        name=str(name),
    )
    result = give_back(flat, out_name, first.shape, first.kind)
    return result if result.dtype == out_dtype else result.to(out_dtype)


def _check_seed(seed: Any) -> int:
    return check_seed(seed, ValueError)


def _trim(tensor: Any, density: float) -> Any:
    """Keep the ``int(density·numel)`` largest |x| (none when that is 0), same dtype; ``density < 1``."""
    torch = _torch()
    if int(density * tensor.numel()) == 0:
        return torch.zeros_like(tensor)
    # a single-input TIES pass: every kept entry agrees with its own sign, so out = trimmed x
    return _kernel("ties", [tensor], [1.0], [density], tensor.dtype)


def _random(tensor: Any, density: float, rescale: bool, seed: int, name: str, model_id: int) -> Any:
    """Keep each entry with probability ``density`` (÷ density with ``rescale``), same dtype; ``0 <= density <= 1``."""
    torch = _torch()
    if density == 0:
        if rescale:
            raise ValueError("density 0 with rescale divides by zero (PEFT returns NaN); use a density > 0")
        return torch.zeros_like(tensor)
    return _kernel(
        "dare_linear", [tensor], [1.0], [density], tensor.dtype,
        rescale="inverse_density" if rescale else "none", seed=seed, name=name, model_ids=[model_id],
    )


def reshape_weight_task_tensors(task_tensors: Any, weights: Any) -> Any:
    """``weights`` viewed with trailing singleton dimensions so that it broadcasts against ``task_tensors``."""
    extra = task_tensors.dim() - weights.dim()
    return weights.view(tuple(weights.shape) + (1,) * extra)


def magnitude_based_pruning(tensor: Any, density: float) -> Any:
    """Keep the ``int(density·numel)`` entries of largest magnitude, zero the rest (ties: lowest index kept)."""
    _check_tensor(tensor, "tensor")
    density = _check_density(density)
    if density >= 1:
        return tensor.clone()
    return _trim(tensor, density)


def random_pruning(tensor: Any, density: float, rescale: bool, *, seed: int = 0, name: str = "") -> Any:
    """Keep each entry with probability ``density``; with ``rescale`` divide the kept ones by ``density``.

    The mask is keyed by ``seed`` and ``name`` (not torch's global RNG): the same call returns the same tensor.
    """
    _check_tensor(tensor, "tensor")
    density = _check_density(density)
    if density > 1:
        raise ValueError(f"random_pruning: density must be in [0, 1], got {density}")
    return _random(tensor, density, bool(rescale), seed, name, 0)


def prune(
    tensor: Any,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    *,
    seed: int = 0,
    name: str = "",
) -> Any:
    """Prune one task tensor by ``method`` ("magnitude" or "random"); ``density >= 1`` warns and returns it as is."""
    density = float(density)
    if density >= 1:
        _warn_no_pruning(density)
        return tensor
    _check_density(density)
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale, seed=seed, name=name)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: Any, method: Literal["total", "frequency"] = "total") -> Any:
    """Boolean mask of the entries whose sign is the elected one along dim 0 (zeros never match).

    "total" elects the sign of the sum, "frequency" the sign of the sum of signs; a zero score elects +1.
    """
    torch = _torch()
    signs = torch.sign(tensor)
    if method == "total":
        score = tensor.sum(dim=0)
    elif method == "frequency":
        score = signs.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    elected = torch.where(score >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def disjoint_merge(task_tensors: Any, majority_sign_mask: Any) -> Any:
    """Sum over dim 0 of the entries selected by the mask, divided by how many were selected (at least 1)."""
    torch = _torch()
    selected = (task_tensors * majority_sign_mask).sum(dim=0)
    # a float count, as in PEFT: it takes part in the result's type promotion
    count = majority_sign_mask.sum(dim=0).to(torch.get_default_dtype()).clamp(min=1.0)
    return selected / count


def _weighted_tasks(task_tensors: Any, weights: Any) -> tuple[list[Any], list[float], Any]:
    """The checked task tensors, their weights, and the dtype of Σ weights[i]·tasks[i] (both promoted, as PEFT's
    weighted sum does)."""
    torch = _torch()
    tasks = _check_tasks(task_tensors)
    w, w_dtype = _weight_values(weights, len(tasks))
    return tasks, w, torch.promote_types(_task_dtype(tasks), w_dtype)


#: ``pruned_sum(tasks, weights, out_dtype, density)`` of a linear merge, density in [0, 1)
_PrunedSum = Callable[[list[Any], list[float], Any, float], Any]


def _pruned_linear(task_tensors: Any, weights: Any, density: float, pruned_sum: _PrunedSum) -> Any:
    """Σ_i weights[i]·prune(task_tensors[i]) with PEFT's checks: a density ≥ 1 prunes nothing (PEFT warns), so
    the sum is plain task arithmetic; else ``density`` must lie in [0, 1) and ``pruned_sum`` merges."""
    tasks, w, out_dtype = _weighted_tasks(task_tensors, weights)
    density = float(density)
    if density >= 1:
        _warn_no_pruning(density)
        return _kernel("task_arithmetic", tasks, w, [1.0] * len(tasks), out_dtype)
    _check_density(density)
    return pruned_sum(tasks, w, out_dtype, density)


def task_arithmetic(task_tensors: list[Any], weights: Any) -> Any:
    """Σ_i weights[i] · task_tensors[i]."""
    tasks, w, out_dtype = _weighted_tasks(task_tensors, weights)
    return _kernel("task_arithmetic", tasks, w, [1.0] * len(tasks), out_dtype)


def magnitude_prune(task_tensors: list[Any], weights: Any, density: float) -> Any:
    """Σ_i weights[i] · (task_tensors[i] with only its ``int(density·numel)`` largest |entries| kept)."""

    def keep_largest(tasks: list[Any], w: list[float], out_dtype: Any, density: float) -> Any:
        if int(density * tasks[0].numel()) == 0:
            return _torch().zeros(tasks[0].shape, dtype=out_dtype, device=tasks[0].device)
        n = len(tasks)
        # breadcrumbs without outliers (gamma 0) keeps exactly the int(density·n) largest |δ|, lowest index on ties
        return _kernel("breadcrumbs", tasks, w, [density] * n, out_dtype, gammas=[0.0] * n)

    return _pruned_linear(task_tensors, weights, density, keep_largest)


def _consensus(
    kernel: str,
    tasks: list[Any],
    weights: Any,
    density: float,
    method: str,
    prune_one: Any,
    rescale: str,
    seed: int,
    name: str,
) -> Any:
    """TIES-style merge shared by ``ties`` and ``dare_ties`` (``density`` in (0, 1])."""
    torch = _torch()
    if method not in _SIGN_METHODS:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    w, w_dtype = _weight_values(weights, len(tasks))
    # PEFT divides by a float count, so the default float dtype joins the promotion
    out_dtype = torch.promote_types(torch.promote_types(_task_dtype(tasks), w_dtype), torch.get_default_dtype())
    n = len(tasks)
    if method == "total" and all(v == w[0] for v in w):
        # weight 1 for every input makes the kernel's election unweighted and its divisor the agreeing count;
        # the common weight then scales the disjoint mean (lambda)
        return _kernel(kernel, tasks, [1.0] * n, [density] * n, out_dtype, normalize=True, lambda_=w[0],
                       rescale=rescale, seed=seed, name=name)
    pruned = torch.stack([prune_one(t, i) for i, t in enumerate(tasks)]).to(_task_dtype(tasks))
    mask = calculate_majority_sign_mask(pruned, method=method)
    w_t = torch.tensor(w, dtype=w_dtype if w_dtype.is_floating_point else torch.float32, device=pruned.device)
    weighted = pruned * reshape_weight_task_tensors(pruned, w_t)
    return disjoint_merge(weighted, mask).to(out_dtype)


def ties(
    task_tensors: list[Any],
    weights: Any,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> Any:
    """TIES as PEFT defines it: magnitude-prune each tensor, elect signs on the unweighted pruned tensors, then
    Σ agreeing weights[i]·pruned[i] / (number agreeing, at least 1)."""
    torch = _torch()
    tasks = _check_tasks(task_tensors)
    density = float(density)
    if density >= 1:
        _warn_no_pruning(density)
        density = 1.0
    _check_density(density)
    if int(density * tasks[0].numel()) == 0:
        _weight_values(weights, len(tasks))
        if majority_sign_method not in _SIGN_METHODS:
            raise RuntimeError(f'Unimplemented mask method "{majority_sign_method}"')
        # nothing survives pruning: every entry is 0 in PEFT too
        w_dtype = (weights if isinstance(weights, torch.Tensor) else torch.tensor(weights)).dtype
        dtype = torch.promote_types(torch.promote_types(_task_dtype(tasks), w_dtype), torch.get_default_dtype())
        return torch.zeros(tasks[0].shape, dtype=dtype, device=tasks[0].device)

    def prune_one(t: Any, _i: int) -> Any:
        return t if density >= 1 else _trim(t, density)

    return _consensus("ties", tasks, weights, density, majority_sign_method, prune_one, "none", 0, "")


def dare_linear(task_tensors: list[Any], weights: Any, density: float, *, seed: int = 0, name: str = "") -> Any:
    """Σ_i weights[i] · (task_tensors[i] with each entry kept with probability ``density``, kept ones ÷ density).

    Masks are keyed by ``seed``, ``name`` and the tensor's position in the list (not torch's global RNG).
    """

    def keep_at_random(tasks: list[Any], w: list[float], out_dtype: Any, density: float) -> Any:
        if density == 0:
            raise ValueError(
                "dare_linear: density 0 divides by zero when rescaling (PEFT returns NaN); use a density > 0"
            )
        return _kernel("dare_linear", tasks, w, [density] * len(tasks), out_dtype, rescale="inverse_density",
                       seed=seed, name=name)

    return _pruned_linear(task_tensors, weights, density, keep_at_random)


def dare_ties(
    task_tensors: list[Any],
    weights: Any,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    seed: int = 0,
    name: str = "",
) -> Any:
    """DARE pruning (keep with probability ``density``, ÷ density), then PEFT's TIES election and disjoint merge.

    Masks are keyed by ``seed``, ``name`` and the tensor's position in the list (not torch's global RNG), the same
    masks whichever code path runs.
    """
    tasks = _check_tasks(task_tensors)
    density = float(density)
    if density >= 1:
        _warn_no_pruning(density)
        return _consensus("ties", tasks, weights, 1.0, majority_sign_method, lambda t, i: t, "none", 0, "")
    _check_density(density)
    if density == 0:
        raise ValueError("dare_ties: density 0 divides by zero when rescaling (PEFT returns NaN); use a density > 0")
    _check_seed(seed)

    def prune_one(t: Any, i: int) -> Any:
        return _random(t, density, True, seed, name, i)

    return _consensus("dare_ties", tasks, weights, density, majority_sign_method, prune_one, "inverse_density",
                      seed, name)
