"""References of ``merge/methods/ram.rs``: ram and ramplus_tl.

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

import numpy as np

from reference import arrays
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import Ref


def ram_active(deltas, epsilon: float) -> np.ndarray:
    """|δ| > epsilon, compared in float32 (mergekit compares a float32 tensor with a Python float, which torch
    rounds to float32: |δ| = float32(0.1) is not > 0.1)."""
    return np.stack([np.abs(np.asarray(d, dtype=np.float32).reshape(-1)) > np.float32(epsilon) for d in deltas])


def _ram_parts(base, xs, epsilon):
    deltas = [task_arithmetic_ref.task_vector(x, base) for x in xs]
    T = np.stack([d.astype(np.float64) for d in deltas])
    active = ram_active(deltas, epsilon)
    c = active.sum(0)
    return T, active, c, c == 1, c > 1


def ram(base, xs, *, epsilon: float = 1e-5) -> Ref:
    """base + Σ active δ_i where one model is active; the mean of the active δ_i where several are."""
    b = arrays.f64(base)
    T, active, c, unique, shared = _ram_parts(base, xs, epsilon)
    Tz = np.where(active, T, 0.0)
    mixed = np.where(unique, Tz.sum(0), 0.0) + np.where(shared, Tz.sum(0) / np.maximum(c, 1), 0.0)
    return Ref(b + mixed, np.abs(b) + 2.0 * np.abs(Tz).sum(0), arrays.none_ambiguous(b.size))


def ramplus_tl_lambdas(base, xs, *, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2) -> np.ndarray:
    """λ_i = 1 + r·clamp(ρ_i, 0, alpha), ρ_i = #(active_i & shared) / max(#(active_i & unique), epsilon)."""
    _, active, _, unique, shared = _ram_parts(base, xs, epsilon)
    sc = (active & shared[None, :]).sum(1).astype(np.float64)
    uc = (active & unique[None, :]).sum(1).astype(np.float64)
    rho = sc / np.maximum(uc, epsilon)
    return 1.0 + r * np.clip(rho, 0.0, alpha)


def ramplus_tl(base, xs, *, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2) -> Ref:
    b = arrays.f64(base)
    T, active, c, unique, shared = _ram_parts(base, xs, epsilon)
    lam = ramplus_tl_lambdas(base, xs, epsilon=epsilon, r=r, alpha=alpha)
    Tz = np.where(active, T, 0.0)
    mixed = (np.where(unique[None, :], Tz * lam[:, None], 0.0)).sum(0) + np.where(
        shared, Tz.sum(0) / np.maximum(c, 1), 0.0)
    return Ref(b + mixed, np.abs(b) + 2.0 * np.abs(Tz * lam[:, None]).sum(0), arrays.none_ambiguous(b.size))
