"""Array conventions shared by the method references: flattening to float64, rows (the last dimension), the empty
ambiguity mask, and task vectors ``tau = x - base`` as the SVD-space and TALL references form them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: float32 machine epsilon, the unit of the references' error bounds
EPS32 = float(np.finfo(np.float32).eps)


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).reshape(-1).astype(np.float64)


def rows(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Flat array -> [rows, last dim] (a 1-D or 0-D tensor is one row)."""
    last = int(shape[-1]) if len(shape) >= 1 else 1
    return np.asarray(a).reshape(-1, max(last, 1)) if a.size else np.asarray(a).reshape(0, max(last, 1))


def none_ambiguous(n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool)


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def task_vectors(base, xs: Sequence) -> list[np.ndarray]:
    """tau_t = x_t - base, one float32 subtraction each, returned as float64 arrays of the base's shape."""
    b = f32(base)
    out = []
    for x in xs:
        x = f32(x)
        if x.shape != b.shape:
            raise ValueError(f"model shape {x.shape} != base shape {b.shape}")
        out.append((x - b).astype(np.float64))
    return out


def exact_task_vectors(base, xs: Sequence) -> list[np.ndarray]:
    """tau_t = x_t - base in float64: exact (a difference of two float32 values always fits a float64). The
    elementwise TALL / Consensus references use these, so their masks have no rounding to depend on."""
    b = f32(base).astype(np.float64)
    return [f32(x).astype(np.float64) - b for x in xs]


def merged_theta(base, merged_tau: np.ndarray, alpha: float) -> np.ndarray:
    return f32(base).astype(np.float64) + alpha * merged_tau


def norm_sum(taus: Sequence[np.ndarray]) -> float:
    return float(sum(np.linalg.norm(t) for t in taus))


def mean_of(taus: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(taus), axis=0)
