"""Plain NumPy references for the merge methods beyond linear / task arithmetic / TIES / DARE.

One function per method, written from the math in mergekit-compat.md §1 (mergekit 0.1.5) and the engine contract
for these kernels; none of it calls ferromerge. Conventions are those of ``reference.py``, whose codec, ``Ref``
and GTA pipeline are reused:

* inputs are float32 values (already decoded from their storage dtype); task vectors ``δ = x − b`` are formed in
  float32 (one IEEE subtraction, as any float32 implementation does), because discrete decisions (ranks, masks,
  thresholds) depend on those exact values;
* continuous math (norms, dot products, trigonometry, weighted sums) runs in float64, so the only difference from
  the engine is the engine's float32 rounding; each function returns a ``Ref`` whose ``scale`` bounds the magnitude
  of the terms an element is computed from (amplified by any division), and whose ``ambiguous`` mask marks
  elements that a discontinuous decision (a branch threshold, a sign election, a mask boundary) could send either
  way under float32 rounding. Tests compare everything else.

Row-wise methods take the tensor ``shape``: a row is the last dimension, a 1-D tensor is one row.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import reference as ref
from reference import Ref

EPS32 = float(np.finfo(np.float32).eps)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).reshape(-1).astype(np.float64)


def _rows(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Flat array -> [rows, last dim] (a 1-D or 0-D tensor is one row)."""
    last = int(shape[-1]) if len(shape) >= 1 else 1
    return np.asarray(a).reshape(-1, max(last, 1)) if a.size else np.asarray(a).reshape(0, max(last, 1))


def _none(n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool)


# --------------------------------------------------------------------------------------------------------------
# slerp (base = v0, one other input = v1, global t)
# --------------------------------------------------------------------------------------------------------------

SLERP_DOT_THRESHOLD = 0.9995


def slerp_coefficients(base, x, t: float) -> tuple[float, float, float]:
    """(coefficient of the base, coefficient of the other input, cosine) over the whole flattened tensor.

    Norms at most 1e-8 are replaced by 1 (mergekit); |cos| > 0.9995 (collinear or antipodal) falls back to lerp.
    """
    a, b = _f64(base), _f64(x)
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
    a, b = _f64(base), _f64(x)
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
        b = np.zeros(_f64(x0).size)
        d0, d1 = _f64(x0), _f64(x1)
    else:
        b = _f64(base)
        d0, d1 = ref.task_vector(x0, base).astype(np.float64), ref.task_vector(x1, base).astype(np.float64)
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
    n = _f64(xs[0]).size
    if len(xs) == 1:  # mergekit returns the single input unchanged, base or not
        x = _f64(xs[0])
        return Ref(x, np.abs(x), _none(n))
    b = np.zeros(n) if base is None else _f64(base)
    X = np.stack([_f64(x) if base is None else ref.task_vector(x, base).astype(np.float64) for x in xs])
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
            return Ref(out, np.abs(b) + np.abs(w[0] * X[0]) + np.abs(w[1] * X[1]), _none(n))
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
    X = np.stack([_f64(x) for x in xs])
    N, n = X.shape
    if N == 1:
        return Ref(X[0], np.abs(X[0]), _none(n))
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


# --------------------------------------------------------------------------------------------------------------
# model_stock (base + >= 2 inputs, optionally per row)
# --------------------------------------------------------------------------------------------------------------


def model_stock_t(base, xs, shape, filter_wise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation factor t per row ([rows]) and an ambiguity flag per row (|1+(N−1)cos| at its 1e-6 cutoff)."""
    n = _f64(base).size
    offs = [ref.task_vector(x, base).astype(np.float64) for x in xs]
    offs = [_rows(o, shape) if filter_wise else o.reshape(1, n) for o in offs]
    N = len(xs)
    cos = []
    for i in range(N):
        for j in range(i + 1, N):
            prod = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
            cos.append(np.clip((offs[i] * offs[j]).sum(-1) / np.maximum(prod, 1e-6), -1.0, 1.0))
    c = np.mean(np.stack(cos), axis=0)
    denom = 1.0 + (N - 1) * c
    singular = np.abs(denom) < 1e-6
    t = np.where(singular, 0.0, N * c / np.where(singular, 1.0, denom))
    amb = np.abs(np.abs(denom) - 1e-6) < 1e-9
    return t, amb


def model_stock(base, xs, shape, *, filter_wise: bool = False) -> Ref:
    """t·mean(xs) + (1 − t)·base with t = N·cos/(1 + (N−1)cos), cos = mean pairwise cosine of the task vectors."""
    b = _f64(base)
    n = b.size
    t_rows, amb_rows = model_stock_t(base, xs, shape, filter_wise)
    row_len = n // t_rows.size
    t = np.repeat(t_rows, row_len)
    amb = np.repeat(amb_rows, row_len)
    X = np.stack([_f64(x) for x in xs])
    avg = X.mean(0)
    out = t * avg + (1.0 - t) * b
    offs_abs = np.abs(X - b).mean(0)
    scale = np.abs(t) * (np.abs(X).mean(0) + offs_abs) + np.abs(1.0 - t) * np.abs(b) + np.abs(b)
    return Ref(out, scale, amb)


# --------------------------------------------------------------------------------------------------------------
# breadcrumbs / breadcrumbs_ties (GTA with the magnitude-outliers mask)
# --------------------------------------------------------------------------------------------------------------


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, target): keep ranks [n_bot, n_bot + target) of |δ| ascending; d >= 1 keeps everything."""
    if density >= 1.0:
        return 0, n
    target = int(density * n)
    n_top = int(gamma * n)
    return max(0, n - target - n_top), target


def _breadcrumbs_row(a: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = a.size
    n_bot, target = breadcrumbs_counts(n, density, gamma)
    # descending by |δ| with the lowest index first among equals; ascending rank r is position n−1−r of that order
    desc = np.lexsort((np.arange(n), -a))
    asc = desc[::-1]
    mask = np.zeros(n, dtype=bool)
    mask[asc[n_bot:n_bot + target]] = True
    return mask


def breadcrumbs_mask(delta, density: float, gamma: float, shape=None, per_row: bool = False) -> np.ndarray:
    """Exact keep mask: drop the gamma·n largest and the smallest |δ| so that int(density·n) remain (per tensor,
    or per row with ``per_row``). Ties: in descending |δ| order the lower index comes first."""
    a = np.abs(np.asarray(delta, dtype=np.float32).reshape(-1).astype(np.float64))
    if not per_row:
        return _breadcrumbs_row(a, density, gamma)
    rows = _rows(a, shape)
    return np.concatenate([_breadcrumbs_row(r, density, gamma) for r in rows]) if rows.size else _none(0)


def breadcrumbs_is_unambiguous(delta, density: float, gamma: float, shape=None, per_row: bool = False) -> bool:
    """True when neither boundary of the kept band falls between equal |δ| (the set does not depend on ties)."""
    a = np.abs(np.asarray(delta, dtype=np.float32).reshape(-1).astype(np.float64))
    rows = _rows(a, shape) if per_row else a.reshape(1, -1)
    for r in rows:
        s = np.sort(r)
        n_bot, target = breadcrumbs_counts(r.size, density, gamma)
        for cut in (n_bot, n_bot + target):
            if 0 < cut < r.size and s[cut - 1] == s[cut]:
                return False
    return True


def breadcrumbs(base, xs, weights, densities, gammas, *, consensus: bool, normalize: bool, lam: float = 1.0,
                rescale: str = "none", shape=None, per_row: bool = False) -> Ref:
    masks = [breadcrumbs_mask(ref.task_vector(x, base), d, g, shape, per_row)
             for x, d, g in zip(xs, densities, gammas)]
    return ref.gta(base, xs, weights, consensus=consensus, normalize=normalize, lam=lam, masks=masks,
                   densities=densities, rescale=rescale)


# --------------------------------------------------------------------------------------------------------------
# della / della_linear (GTA with the rank-dependent random mask)
# --------------------------------------------------------------------------------------------------------------


def della_ranks(delta, shape) -> np.ndarray:
    """Rank 1..n of |δ| within its row, ascending; equal magnitudes: the lower index gets the lower rank."""
    a = np.abs(np.asarray(delta, dtype=np.float32).reshape(-1).astype(np.float64))
    rows = _rows(a, shape)
    out = np.empty(rows.shape, dtype=np.int64)
    for i, r in enumerate(rows):
        order = np.lexsort((np.arange(r.size), r))
        out[i, order] = np.arange(1, r.size + 1)
    return out.reshape(-1)


def della_probabilities(delta, shape, density: float, epsilon: float) -> np.ndarray:
    """Keep probability per element (float32): (d − ε) + rank_norm·2ε, rank_norm = (r−1)/(n−1) (0 when n = 1)."""
    rank = della_ranks(delta, shape)
    n = int(shape[-1]) if len(shape) else 1
    rank_norm = (rank - 1) / (n - 1) if n > 1 else np.zeros(rank.shape)
    return (np.float32(density - epsilon) + rank_norm.astype(np.float32) * np.float32(2.0 * epsilon)).astype(np.float32)


def della_valid(density: float, epsilon: float) -> bool:
    """mergekit: density >= 1 is a no-op; otherwise density ± epsilon must lie inside (0, 1)."""
    return density >= 1.0 or (density + epsilon < 1.0 and density - epsilon > 0.0)


def della_rank_probe(delta, shape) -> np.ndarray:
    """A non-zero float32 tensor whose |·| ranks equal those of ``delta`` (so a single-model run over a zero base
    with it reveals the mask the engine draws for ``delta``'s ranks)."""
    return della_ranks(delta, shape).astype(np.float32)


def della(base, xs, weights, densities, epsilons, masks, shape, *, consensus: bool, normalize: bool,
          lam: float = 1.0, rescale: str = "none") -> Ref:
    """DELLA given the keep masks (drawn by the engine's RNG; recover them with ``della_rank_probe``).

    rescale ``inverse_density`` divides each kept δ by its own keep probability p (the paper); ``l1`` matches the
    whole-tensor L1 norm (mergekit). density >= 1 keeps δ untouched.
    """
    sparse = []
    for x, d, e, m in zip(xs, densities, epsilons, masks):
        delta = ref.task_vector(x, base)
        if d >= 1.0:
            sparse.append(delta.astype(np.float64))
            continue
        m = np.asarray(m, dtype=bool).reshape(-1)
        kept = np.where(m, delta.astype(np.float64), 0.0)
        if rescale == "inverse_density":
            kept = kept / della_probabilities(delta, shape, d, e).astype(np.float64)
        elif rescale == "l1":
            kept = kept * ref.l1_rescale_factor(delta, m)
        elif rescale != "none":
            raise ValueError(rescale)
        sparse.append(kept)
    return ref.combine(base, sparse, weights, consensus=consensus, normalize=normalize, lam=lam)


# --------------------------------------------------------------------------------------------------------------
# sce
# --------------------------------------------------------------------------------------------------------------


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
        return _none(n)
    var = sce_variance_exact(deltas)
    k = sce_k(sum(1 for v in var if v != 0), select_topk)
    mask = _none(n)
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
    b = _f64(base)
    n = b.size
    deltas = [ref.task_vector(x, base) for x in xs]
    keep = sce_topk_mask(deltas, select_topk)
    T = np.stack([np.where(keep, d.astype(np.float64), 0.0) for d in deltas])
    w, w_amb = sce_weights(T)
    S = T.sum(0)
    elected = np.where(S >= 0, 1.0, -1.0)
    agree = (np.sign(T) == elected[None, :]) & (T != 0)
    ew = np.where(agree, w[:, None], 0.0)
    den = np.maximum(ew.sum(0), 1e-6)
    mixed = (T * ew).sum(0) / den
    amb = ref.election_ambiguous(T) | w_amb
    scale = np.abs(b) + 2.0 * (np.abs(T) * ew).sum(0) / den
    return Ref(b + mixed, scale, amb)


# --------------------------------------------------------------------------------------------------------------
# ram / ramplus_tl
# --------------------------------------------------------------------------------------------------------------


def ram_active(deltas, epsilon: float) -> np.ndarray:
    """|δ| > epsilon, compared in float32 (mergekit compares a float32 tensor with a Python float, which torch
    rounds to float32: |δ| = float32(0.1) is not > 0.1)."""
    return np.stack([np.abs(np.asarray(d, dtype=np.float32).reshape(-1)) > np.float32(epsilon) for d in deltas])


def _ram_parts(base, xs, epsilon):
    deltas = [ref.task_vector(x, base) for x in xs]
    T = np.stack([d.astype(np.float64) for d in deltas])
    active = ram_active(deltas, epsilon)
    c = active.sum(0)
    return T, active, c, c == 1, c > 1


def ram(base, xs, *, epsilon: float = 1e-5) -> Ref:
    """base + Σ active δ_i where one model is active; the mean of the active δ_i where several are."""
    b = _f64(base)
    T, active, c, unique, shared = _ram_parts(base, xs, epsilon)
    Tz = np.where(active, T, 0.0)
    mixed = np.where(unique, Tz.sum(0), 0.0) + np.where(shared, Tz.sum(0) / np.maximum(c, 1), 0.0)
    return Ref(b + mixed, np.abs(b) + 2.0 * np.abs(Tz).sum(0), _none(b.size))


def ramplus_tl_lambdas(base, xs, *, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2) -> np.ndarray:
    """λ_i = 1 + r·clamp(ρ_i, 0, alpha), ρ_i = #(active_i & shared) / max(#(active_i & unique), epsilon)."""
    _, active, _, unique, shared = _ram_parts(base, xs, epsilon)
    sc = (active & shared[None, :]).sum(1).astype(np.float64)
    uc = (active & unique[None, :]).sum(1).astype(np.float64)
    rho = sc / np.maximum(uc, epsilon)
    return 1.0 + r * np.clip(rho, 0.0, alpha)


def ramplus_tl(base, xs, *, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2) -> Ref:
    b = _f64(base)
    T, active, c, unique, shared = _ram_parts(base, xs, epsilon)
    lam = ramplus_tl_lambdas(base, xs, epsilon=epsilon, r=r, alpha=alpha)
    Tz = np.where(active, T, 0.0)
    mixed = (np.where(unique[None, :], Tz * lam[:, None], 0.0)).sum(0) + np.where(
        shared, Tz.sum(0) / np.maximum(c, 1), 0.0)
    return Ref(b + mixed, np.abs(b) + 2.0 * np.abs(Tz * lam[:, None]).sum(0), _none(b.size))


# --------------------------------------------------------------------------------------------------------------
# nearswap
# --------------------------------------------------------------------------------------------------------------


def nearswap(base, x, t: float) -> Ref:
    """w = clamp(t / max(|a − b|, 1e-6), 0, 1); out = w·b + (1 − w)·a, with a the base and b the other input."""
    a, b = _f64(base), _f64(x)
    d = np.abs(ref.task_vector(x, base).astype(np.float64))
    w = np.clip(t / np.maximum(d, 1e-6), 0.0, 1.0)
    out = w * b + (1.0 - w) * a
    return Ref(out, np.abs(a) + np.abs(w * b) + np.abs((1.0 - w) * a) + w * d, _none(a.size))


# --------------------------------------------------------------------------------------------------------------
# arcee_fusion
# --------------------------------------------------------------------------------------------------------------

ARCEE_QUANTILES = (0.25, 0.5, 0.75)


def arcee_importance(base, x, shape) -> tuple[np.ndarray, np.ndarray]:
    """(importance |b − a|·KL(softmax(b)+1e-8 ‖ softmax(a)+1e-8) per element, its float32 error bound).

    The KL divergence is per row (last dim); a is the base. The bound covers a float32 evaluation as mergekit's:
    p and q each carry a relative error of a few eps32 (exp, row sum, division), so log(p/q) is off by a few eps32
    absolute; those errors are independent between elements, and the p-weighted sum stays within ~4·eps32 of the
    true KL (plus a relative error of the terms).
    """
    a = _rows(_f64(base), shape)
    b = _rows(_f64(x), shape)
    d = np.abs(_rows(ref.task_vector(x, base).astype(np.float64), shape))

    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(b) + 1e-8
    q = softmax(a) + 1e-8
    lp, lq = np.log(p), np.log(q)
    kl = (p * (lp - lq)).sum(-1, keepdims=True)
    kl_err = 4.0 * EPS32 * (1.0 + (p * np.abs(lp - lq)).sum(-1, keepdims=True))
    if a.shape[-1] == 1:  # one-element rows: both softmaxes are exactly 1 in any arithmetic, KL exactly 0
        kl_err[:] = 0.0
    imp = d * kl
    err = d * kl_err + 4.0 * EPS32 * np.abs(imp)
    return imp.reshape(-1), err.reshape(-1)


def arcee_threshold(imp: np.ndarray) -> float:
    """median + 1.5·(q3 − q1) with exact quantiles: the sorted value at index floor(q·(n − 1))."""
    s = np.sort(np.asarray(imp, dtype=np.float64).reshape(-1))
    n = s.size
    q1, med, q3 = (s[int(np.float32(q) * np.float32(n - 1))] for q in ARCEE_QUANTILES)
    return float(med + 1.5 * (q3 - q1))


def arcee_fusion(base, x, shape) -> tuple[Ref, np.ndarray]:
    """(result a + (b − a)·[imp >= thr], the exact-quantile keep mask). Elements whose importance lies within the
    float32 error window of the threshold are ambiguous unless b == a there (then the mask does not matter)."""
    a = _f64(base)
    delta = ref.task_vector(x, base).astype(np.float64)
    imp, err = arcee_importance(base, x, shape)
    thr = arcee_threshold(imp)
    keep = imp >= thr
    out = a + np.where(keep, delta, 0.0)
    # the threshold moves by at most the errors of the order statistics it is made of (twice, for neighbours that
    # could swap into those positions)
    e = err[np.argsort(imp, kind="stable")]
    i1, im, i3 = (int(np.float32(q) * np.float32(imp.size - 1)) for q in ARCEE_QUANTILES)
    thr_err = 2.0 * (e[im] + 1.5 * (e[i3] + e[i1])) if imp.size else 0.0
    window = err + thr_err
    amb = (np.abs(imp - thr) <= window) & (window > 0) & (delta != 0)
    scale = np.abs(a) + np.abs(delta) + np.abs(_f64(x))
    return Ref(out, scale, amb), keep
