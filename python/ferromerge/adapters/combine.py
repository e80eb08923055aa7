"""PEFT 0.21's ``merge_utils`` over float32 NumPy arrays, on the engine's kernels (what ``add_weighted_adapter``
applies to the A stacks, the B stacks, or the full deltas ΔW_i of one module).

Semantics (those of ``compat.peft``, which does the same on torch tensors): the tensors are deltas from zero;
``magnitude`` trimming keeps ``int(density·numel)`` entries per tensor (ties: lowest index); DARE keeps each entry
with probability ``density`` and divides the kept ones by ``density``; ``ties`` / ``dare_ties`` elect the sign on the
*unweighted* pruned tensors ("total": sign of the sum, "frequency": of the sum of signs; a zero score elects +)
and divide Σ agreeing weights[i]·pruned[i] by the agreeing *count* (at least 1). ``density >= 1`` prunes nothing.

The kernels run the trimming, the DARE masks and the weighted sums over a zero base (δ − 0 is exact); DARE masks
come from the engine's counter RNG keyed by ``seed``, ``name`` and the tensor's position, so they are the same at
any thread count. The sign election and the disjoint mean are the engine's ``disjoint_mean`` (PEFT's rule; the
merge kernels' TIES elects on weighted values and divides by the weights, which is mergekit's), multithreaded and
bit-identical to its float32 NumPy restatement (``tests/reference/peft_ties.py``).

``ties`` and ``dare_ties`` take their tensors as an iterable and prune each as it comes, so a caller that builds
them one at a time (``merge.merge_module``'s full deltas) holds the pruned tensors and one unpruned one at most.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from .. import _engine
from ..errors import ParameterError

__all__ = ["check_density", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic", "ties"]

F32 = npt.NDArray[np.float32]


def _kernel(method: str, tasks: Sequence[F32], weights: Sequence[float], densities: Sequence[float], *,
            rescale: str = "none", seed: int = 0, name: str = "", model_ids: Sequence[int] | None = None,
            gammas: Sequence[float] | None = None, threads: int | None = None) -> F32:
    flat = [np.ascontiguousarray(t, np.float32).reshape(-1) for t in tasks]
    out = _engine.merge_arrays(
        {"name": method, "normalize": False, "lambda": 1.0, "rescale": rescale, "seed": int(seed)},
        flat, np.zeros(flat[0].size, np.float32),
        _engine.input_values(weights, densities, gammas=gammas, model_ids=model_ids),
        out_dtype="float32", name=name, threads=threads,
    )
    return np.asarray(out, np.float32).reshape(tasks[0].shape)


def task_arithmetic(tasks: Sequence[F32], weights: Sequence[float], *, threads: int | None = None) -> F32:
    """Σ_i weights[i] · tasks[i]."""
    return _kernel("task_arithmetic", tasks, weights, [1.0] * len(tasks), threads=threads)


def check_density(density: float | None, what: str) -> float:
    if density is None:
        raise ParameterError(f"{what} needs a density (the fraction of entries kept, in (0, 1])")
    density = float(density)
    if not (np.isfinite(density) and density >= 0):
        raise ParameterError(f"density must be a number >= 0, got {density}")
    return density


def magnitude_prune(tasks: Sequence[F32], weights: Sequence[float], density: float | None, *,
                    threads: int | None = None) -> F32:
    """Σ_i weights[i] · (tasks[i] with its ``int(density·numel)`` largest |entries| kept)."""
    density = check_density(density, "magnitude_prune")
    if density >= 1:
        return task_arithmetic(tasks, weights, threads=threads)
    if int(density * tasks[0].size) == 0:
        return np.zeros(tasks[0].shape, np.float32)
    n = len(tasks)
    # breadcrumbs without outliers (gamma 0) keeps exactly the int(density·n) largest |δ|, lowest index on ties
    return _kernel("breadcrumbs", tasks, weights, [density] * n, gammas=[0.0] * n, threads=threads)


def dare_linear(tasks: Sequence[F32], weights: Sequence[float], density: float | None, *, seed: int, name: str,
                threads: int | None = None) -> F32:
    """Σ_i weights[i] · (tasks[i] with each entry kept with probability ``density``, kept ones ÷ density)."""
    density = check_density(density, "dare_linear")
    if density >= 1:
        return task_arithmetic(tasks, weights, threads=threads)
    if density == 0:
        raise ParameterError("dare_linear: density 0 divides by zero when rescaling (PEFT returns NaN)")
    return _kernel("dare_linear", tasks, weights, [density] * len(tasks), rescale="inverse_density", seed=seed,
                   name=name, threads=threads)


def _disjoint(pruned: Sequence[F32], weights: Sequence[float], majority_sign: str, threads: int | None) -> F32:
    """PEFT's ``calculate_majority_sign_mask`` + ``disjoint_merge`` over the pruned tensors (``_core.disjoint_mean``):
    the sign elected on the unweighted tensors, Σ agreeing w_i·p_i / max(count, 1)."""
    flat = [np.ascontiguousarray(p, np.float32).reshape(-1) for p in pruned]
    out = _engine.disjoint_mean(flat, [float(w) for w in weights], majority_sign, threads=threads)
    return np.asarray(out, np.float32).reshape(np.shape(pruned[0]))


def _check_sign(majority_sign: str) -> None:
    if majority_sign not in ("total", "frequency"):
        raise ParameterError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")


def ties(tasks: Iterable[F32], weights: Sequence[float], density: float | None, majority_sign: str = "total", *,
         threads: int | None = None) -> F32:
    """Magnitude-trim each tensor, elect signs on the trimmed tensors, disjoint mean of the weighted agreeing ones."""
    _check_sign(majority_sign)
    density = min(check_density(density, "ties"), 1.0)
    pruned: list[F32] = []
    for t in tasks:
        if int(density * t.size) == 0:  # keeps nothing (every tensor has the same size)
            return np.zeros(t.shape, np.float32)
        # a single-input TIES pass trims: every kept entry agrees with its own sign, so out = trimmed x
        pruned.append(t if density >= 1 else _kernel("ties", [t], [1.0], [density], threads=threads))
        del t
    return _disjoint(pruned, weights, majority_sign, threads)


def dare_ties(tasks: Iterable[F32], weights: Sequence[float], density: float | None, majority_sign: str = "total",
              *, seed: int, name: str, threads: int | None = None) -> F32:
    """DARE-prune each tensor (keep with probability ``density``, ÷ density), then TIES' election and disjoint
    mean. Input ``i``'s mask is the one ``dare_linear`` gives it (same seed, name and position)."""
    _check_sign(majority_sign)
    density = check_density(density, "dare_ties")
    if density == 0:
        raise ParameterError("dare_ties: density 0 divides by zero when rescaling (PEFT returns NaN)")
    pruned: list[F32] = []
    for i, t in enumerate(tasks):
        pruned.append(t if density >= 1 else _kernel("dare_linear", [t], [1.0], [density], rescale="inverse_density",
                                                       seed=seed, name=name, model_ids=[i], threads=threads))
        del t
    return _disjoint(pruned, weights, majority_sign, threads)
