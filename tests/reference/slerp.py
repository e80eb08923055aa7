"""References of the methods in ``merge/methods/slerp.rs``: slerp, nuslerp, multislerp and karcher.

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

# --------------------------------------------------------------------------------------------------------------
# slerp (base = v0, one other input = v1, global t)
# --------------------------------------------------------------------------------------------------------------

SLERP_DOT_THRESHOLD = 0.9995


def slerp_coefficients(base, x, t: float) -> tuple[float, float, float]:
    """(coefficient of the base, coefficient of the other input, cosine) over the whole flattened tensor.

    Norms at most 1e-8 are replaced by 1 (mergekit); |cos| > 0.9995 (collinear or antipodal) falls back to lerp.
    """
    a, b = arrays.f64(base), arrays.f64(x)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t, dot
    theta = np.arccos(dot)
    s = np.sin(theta)
    return float(np.sin((1.0 - t) * theta) / s), float(np.sin(t * theta) / s), dot


def slerp(base, x, t: float) -> Ref:
    a, b = arrays.f64(base), arrays.f64(x)
    ca, cb, dot = slerp_coefficients(base, x, t)
    out = ca * a + cb * b
    # the lerp/slerp switch is discontinuous: a cosine within float rounding of the threshold could go either way
    amb = abs(abs(dot) - SLERP_DOT_THRESHOLD) < 1e-9
    return Ref(out, np.abs(ca * a) + np.abs(cb * b), np.full(out.shape, amb))


# --------------------------------------------------------------------------------------------------------------
# nuslerp (exactly two inputs, optional base, weights -> t)
# --------------------------------------------------------------------------------------------------------------


def nuslerp_t(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _nuslerp_vectors(t: float, v0: np.ndarray, v1: np.ndarray):
    """Rows of v0/v1 ([m, L] float64) -> (result, coef0, coef1, cos) per row."""
    n0 = np.maximum(np.linalg.norm(v0, axis=-1), 1e-7)
    n1 = np.maximum(np.linalg.norm(v1, axis=-1), 1e-7)
    cos = np.clip(((v0 / n0[:, None]) * (v1 / n1[:, None])).sum(-1), -1.0, 1.0)
    colinear = (1.0 - cos * cos) <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sin(theta)
        c0 = np.where(colinear, 1.0 - t, np.sin((1.0 - t) * theta) / s)
        c1 = np.where(colinear, t, np.sin(t * theta) / s)
    return c0[:, None] * v0 + c1[:, None] * v1, c0, c1, cos, colinear


def nuslerp(base, x0, x1, w0: float, w1: float, shape: Sequence[int], *, row_wise: bool = False,
            flatten: bool = True) -> Ref:
    """base + nuslerp(t, x0 − base, x1 − base) (without base: of x0, x1); t = w1/(w0+w1) (0.5 if |Σw| < 1e-6).

    flatten: the whole tensor is one vector; else rows (last dim), or with row_wise the vectors along dim 0
    (columns of a matrix: mergekit transposes dims 0 and −1).
    """
    t = nuslerp_t(w0, w1)
    if base is None:
        b = np.zeros(arrays.f64(x0).size)
        d0, d1 = arrays.f64(x0), arrays.f64(x1)
    else:
        b = arrays.f64(base)
        d0 = task_arithmetic_ref.task_vector(x0, base).astype(np.float64)
        d1 = task_arithmetic_ref.task_vector(x1, base).astype(np.float64)
    shp = tuple(int(s) for s in shape) or (1,)
    if flatten:
        v0, v1 = d0.reshape(1, -1), d1.reshape(1, -1)
        back = lambda r: r.reshape(-1)  # noqa: E731
    elif row_wise:
        # vectors along dim 0: move dim 0 last, rows of the result, then move it back
        m0 = np.moveaxis(d0.reshape(shp), 0, -1)
        m1 = np.moveaxis(d1.reshape(shp), 0, -1)
        inner = m0.shape
        v0, v1 = m0.reshape(-1, shp[0]), m1.reshape(-1, shp[0])
        back = lambda r: np.moveaxis(r.reshape(inner), -1, 0).reshape(-1)  # noqa: E731
    else:
        v0, v1 = d0.reshape(-1, shp[-1]), d1.reshape(-1, shp[-1])
        back = lambda r: r.reshape(-1)  # noqa: E731
    res, c0, c1, cos, colinear = _nuslerp_vectors(t, v0, v1)
    out = b + back(res)
    scale = np.abs(b) + back(np.abs(c0[:, None] * v0) + np.abs(c1[:, None] * v1))
    # near-antipodal vectors (not collinear to the test's precision) have coefficients ~1/sinθ whose value flips
    # with rounding; exactly collinear ones (cos = ±1 in any arithmetic, e.g. one-element rows) are well defined
    # (a longer exactly antipodal pair can round to cos = −1 ± 1 ulp, on either side of the collinear test)
    amb_rows = (cos < -0.99) & ((v0.shape[1] > 1) | ~colinear)
    amb = back(np.broadcast_to(amb_rows[:, None], v0.shape).astype(np.float64)) > 0
    return Ref(out, scale, amb)


# --------------------------------------------------------------------------------------------------------------
# multislerp (one or more inputs, optional base, weights)
# --------------------------------------------------------------------------------------------------------------


class MultislerpError(ValueError):
    """mergekit's "weighted sum of the input tensors is zero" (more than two antipodal-balanced inputs)."""


def multislerp(base, xs, weights, *, normalize_weights: bool = True, eps: float = 1e-8) -> Ref:
    n = arrays.f64(xs[0]).size
    if len(xs) == 1:  # mergekit returns the single input unchanged, base or not
        x = arrays.f64(xs[0])
        return Ref(x, np.abs(x), arrays.none_ambiguous(n))
    b = np.zeros(n) if base is None else arrays.f64(base)
    X = np.stack([arrays.f64(x) if base is None else task_arithmetic_ref.task_vector(x, base).astype(np.float64)
                  for x in xs])
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(X, axis=1)
    U = X / (norms + eps)[:, None]
    mean = (w[:, None] * U).sum(0)
    mn = float(np.linalg.norm(mean))
    if mn < eps:
        if len(xs) == 2:
            out = b + w[0] * X[0] + w[1] * X[1]
            return Ref(out, np.abs(b) + np.abs(w[0] * X[0]) + np.abs(w[1] * X[1]), arrays.none_ambiguous(n))
        raise MultislerpError("weighted mean of the unit vectors is zero")
    m_hat = mean / mn
    dots = U @ m_hat
    tau = (w[:, None] * (U - dots[:, None] * m_hat[None, :])).sum(0)
    tn = float(np.linalg.norm(tau)) + eps
    r = m_hat * np.cos(tn) + tau * (np.sin(tn) / tn)
    avg = float((norms * w).sum())
    out = b + avg * r
    # float32 error of each element: the unit vectors' terms feeding m̂ (amplified by 1/‖m‖), the tangent terms,
    # and the result itself (global scalars carry a relative error)
    wU = np.abs(w[:, None] * U).sum(0)
    feed = wU / mn * (1.0 + float(np.abs(w * dots).sum()))
    scale = np.abs(b) + abs(avg) * (feed + wU + np.abs(m_hat) + np.abs(tau))
    # the zero-mean fallback is a discontinuous branch: stay clear of its threshold
    amb = np.full(n, mn < 4 * eps)
    return Ref(out, scale, amb)


# --------------------------------------------------------------------------------------------------------------
# karcher (every input equally weighted, no base role)
# --------------------------------------------------------------------------------------------------------------


def karcher(xs, *, max_iter: int = 10, tol: float = 1e-5) -> Ref:
    """Riemannian mean of the directions, scaled by the mean norm (mergekit karcher_merge_tensors, alphas 1/N).

    ``ambiguous`` is all-True when a discontinuous decision of the iteration (skip an input with θ < tol, stop
    when ‖tangent‖ < tol, validity norm > tol) lands within a float32-rounding window of its threshold.
    """
    X = np.stack([arrays.f64(x) for x in xs])
    N, n = X.shape
    if N == 1:
        return Ref(X[0], np.abs(X[0]), arrays.none_ambiguous(n))
    norms = np.linalg.norm(X, axis=1)
    U = np.where(norms[:, None] > 0, X / np.where(norms > 0, norms, 1.0)[:, None], 0.0)
    valid = norms > tol
    near = lambda v: 0.5 * tol <= v <= 2.0 * tol  # noqa: E731  (θ errors from a float32 mean: relative ~1e-3 at tol)
    amb = any(near(v) for v in norms)
    if not valid.any():
        return Ref(np.zeros(n), np.zeros(n), np.full(n, amb))
    Uv = U[valid]
    alpha = 1.0 / Uv.shape[0]
    mean = alpha * Uv.sum(0)
    mn = np.linalg.norm(mean)
    amb |= near(mn)
    mean = Uv[0].copy() if mn < tol else mean / mn
    feed = np.abs(Uv).sum(0) * alpha / max(mn, tol)
    for _ in range(int(max_iter)):
        tangent = np.zeros(n)
        for u in Uv:
            dot = float(np.clip(mean @ u, -1.0, 1.0))
            theta = float(np.arccos(dot))
            # θ is computed from a cosine near 1 and is very sensitive to rounding there; only a θ far below tol
            # (or far above it) decides the skip the same way in float32
            amb |= 1e-3 * tol <= theta <= 100.0 * tol
            if theta < tol:
                continue
            # nearly antipodal to the mean: θ/sinθ amplifies the rounding of the perpendicular part without bound
            # (the Karcher mean of two antipodal points is not unique); exactly antipodal inputs (perpendicular
            # part at float64 noise, e.g. one-element tensors or x and −x) are well defined and stay compared
            amb |= dot < 0 and np.sin(theta) < 1e-3 and float(np.linalg.norm(u - dot * mean)) > 1e-12
            tangent += alpha * (theta / np.sin(theta)) * (u - dot * mean)
        tn = float(np.linalg.norm(tangent))
        amb |= 0.9 * tol <= tn <= 1.1 * tol
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * (tangent / tn)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    S = float(norms.sum()) / N
    out = S * mean
    scale = S * (np.abs(mean) + feed)
    return Ref(out, scale, np.full(n, amb))
