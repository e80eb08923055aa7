"""Reference of ``merge/methods/sce.rs``: sce (variance selection, then the TIES election over the kept elements).

Conventions (all method references): inputs are float32 values (already decoded from their storage dtype); task
vectors ``δ = x − b`` are formed in float32 (one IEEE subtraction, as any float32 implementation does), because
discrete decisions (ranks, masks, thresholds) depend on those exact values; continuous math runs in float64, so the
only difference from the engine is the engine's float32 rounding. Each function returns a ``Ref`` whose ``scale``
bounds the magnitude of the terms an element is computed from (amplified by any division), and whose ``ambiguous``
mask marks elements that a discontinuous decision could send either way under float32 rounding. Row-wise methods
take the tensor ``shape``: a row is the last dimension, a 1-D tensor is one row. Written from the math of mergekit
0.1.5 (docs/compat.md); none of it calls ferromerge.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reference import arrays
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import Ref


def sce_k(nonzero: int, select_topk: float) -> int:
    """int(count_nonzero(var)·select_topk) as mergekit computes it: a float32 tensor product (an int64 count times a
    Python float promotes to float32), e.g. 180 × 0.65 -> 116, where float64 gives 117."""
    return int(np.float32(np.float32(nonzero) * np.float32(select_topk)))


def sce_variance(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """Population variance over the models, per element (float64 of the float32 task vectors)."""
    T = np.stack([np.asarray(d, dtype=np.float32).reshape(-1).astype(np.float64) for d in deltas])
    m = T.mean(0)
    return ((T - m) ** 2).mean(0)


def sce_variance_exact(deltas) -> list[int]:
    """N²·2^298·variance per element as an exact integer, N·ΣX² − (ΣX)² with X = δ·2^149 (every float32 is an
    integer multiple of 2^-149): equal variances compare equal whatever the order of the models, which no float
    evaluation guarantees (three models: (a, b, c) and (a, c, b) round differently)."""
    # float32 · 2^149 is an integer exactly representable in float64 (a power-of-two scaling), so int() is exact
    cols = [[int(v) for v in np.asarray(d, dtype=np.float32).reshape(-1).astype(np.float64) * 2.0**149]
            for d in deltas]
    N = len(cols)
    return [N * sum(c[j] * c[j] for c in cols) - sum(c[j] for c in cols) ** 2 for j in range(len(cols[0]))]


def sce_topk_mask(deltas, select_topk: float) -> np.ndarray:
    """Elements kept by the variance selection: the k largest variances, ties lowest index first (all kept when
    select_topk >= 1; none when k = 0). Variances are compared exactly (``sce_variance_exact``)."""
    n = np.asarray(deltas[0]).size
    if select_topk >= 1.0:
        return np.ones(n, dtype=bool)
    if select_topk <= 0.0:
        return arrays.none_ambiguous(n)
    var = sce_variance_exact(deltas)
    k = sce_k(sum(1 for v in var if v != 0), select_topk)
    mask = arrays.none_ambiguous(n)
    if k > 0:
        mask[sorted(range(n), key=lambda j: (-var[j], j))[:k]] = True
    return mask


def sce_topk_is_unambiguous(deltas, select_topk: float, rel: float = 1e-6) -> bool:
    """True when the k-th and (k+1)-th largest variances are clearly apart (or k is 0 / everything)."""
    if select_topk >= 1.0 or select_topk <= 0.0:
        return True
    var = sce_variance(deltas)
    k = sce_k(int(np.count_nonzero(var)), select_topk)
    s = np.sort(var)[::-1]
    if k == 0 or k >= s.size:
        return True
    return s[k - 1] - s[k] > rel * s[k - 1]


def sce_weights(masked: np.ndarray) -> tuple[np.ndarray, bool]:
    """Per-model weight mean(TV_i²)/Σ_j mean(TV_j²) (uniform when the sum is below 1e-6), and whether the sum is
    within rounding of that cutoff."""
    ms = (masked ** 2).mean(1)
    s = float(ms.sum())
    amb = abs(s - 1e-6) <= 1e-4 * 1e-6
    if abs(s) < 1e-6:
        return np.full(masked.shape[0], 1.0 / masked.shape[0]), amb
    return ms / s, amb


def sce(base, xs, *, select_topk: float = 1.0) -> Ref:
    b = arrays.f64(base)
    n = b.size
    deltas = [task_arithmetic_ref.task_vector(x, base) for x in xs]
    keep = sce_topk_mask(deltas, select_topk)
    T = np.stack([np.where(keep, d.astype(np.float64), 0.0) for d in deltas])
    w, w_amb = sce_weights(T)
    S = T.sum(0)
    elected = np.where(S >= 0, 1.0, -1.0)
    agree = (np.sign(T) == elected[None, :]) & (T != 0)
    ew = np.where(agree, w[:, None], 0.0)
    den = np.maximum(ew.sum(0), 1e-6)
    mixed = (T * ew).sum(0) / den
    amb = task_arithmetic_ref.election_ambiguous(T) | w_amb
    scale = np.abs(b) + 2.0 * (np.abs(T) * ew).sum(0) / den
    return Ref(b + mixed, scale, amb)
