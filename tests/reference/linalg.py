"""References of the SVD and polar kernels (``_core.svd`` with its rank rules, ``_core.polar``; Rust
``linalg/``), and the test matrices with a chosen spectrum.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# SVD building blocks
# --------------------------------------------------------------------------------------------------------------


#: set by ``sensitivity`` only: (generator, rel) — every SVD then decomposes a perturbed input (see there)
_noise: tuple[np.random.Generator, float] | None = None


def thin_svd(a, scale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64: U (m×r), S (r, descending), Vt (r×n) with r = min(m, n).

    ``scale`` is the magnitude (Frobenius norm) of the terms ``a`` was computed from, when cancellation makes it
    larger than ‖a‖_F (a sum of task vectors, a projected-out remainder); only ``sensitivity`` uses it."""
    a = np.asarray(a, dtype=np.float64)
    if _noise is not None and a.size:
        rng, rel = _noise
        e = rng.standard_normal(a.shape)
        ne = float(np.linalg.norm(e))
        size = float(np.linalg.norm(a)) if scale is None else float(scale)
        if ne > 0 and size > 0:
            a = a + (rel * size / ne) * e
    return np.linalg.svd(a, full_matrices=False)


def truncated_svd(a, r: int, scale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``r`` singular triplets (Eckart–Young: U_r S_r Vt_r is the best rank-r approximation)."""
    u, s, vt = thin_svd(a, scale)
    r = max(0, min(int(r), s.size))
    return u[:, :r], s[:r], vt[:r, :]


def polar(a) -> np.ndarray:
    """Polar factor P·Qᵀ of the thin SVD a = P Σ Qᵀ: the nearest matrix with orthonormal columns (m >= n) or rows
    (m < n) in the Frobenius norm (orthogonal Procrustes). Unique when ``a`` has full rank; zero columns (TSV-M's
    leftover slots) only make the matching columns of the factor arbitrary."""
    p, _, qt = thin_svd(a)
    return p @ qt


def svd_rank(s, shape: Sequence[int], *, rank: int | None = None, fraction: float | None = None,
             energy: float | None = None, nuclear: float | None = None, sv_epsilon: float = 0.0) -> int:
    """Rank chosen by ``_core.svd``'s rules from the **full** spectrum ``s`` (descending) of an m×n matrix; every
    rule given caps the rank and the smallest cap wins:

    * ``rank``: r <= rank (no rule: r = min(m, n));
    * ``fraction``: r <= max(1, floor(fraction·min(m, n))) (float64 product, as a float64 parameter gives);
    * ``energy``: the smallest r >= 1 with Σ_{i<r} S_i² >= energy·‖A‖_F² (‖A‖_F² = Σ S_i²);
    * ``nuclear``: the smallest r >= 1 with Σ_{i<r} S_i >= nuclear·‖A‖_* (‖A‖_* = Σ S_i);
    * ``sv_epsilon``: drop S_i <= sv_epsilon (the contract's rule, also at its default 0: exactly zero singular
      values are dropped, so a zero matrix has rank 0; mergekit-extract-lora applies its ``--sv-epsilon`` only when
      it is > 0, see ``lora_factors``).

    A cumulative rule whose target rounding leaves unreached (energy or nuclear 1 with float64 sums) gives
    min(m, n).
    """
    s = np.asarray(s, dtype=np.float64)
    full = min(int(shape[0]), int(shape[1]))
    r = full
    if rank is not None:
        r = min(r, int(rank))
    if fraction is not None:
        r = min(r, max(1, math.floor(fraction * full)))
    for share, w in ((energy, s * s), (nuclear, s)):
        if share is not None:
            c = np.cumsum(w)
            hit = np.flatnonzero(c >= share * w.sum())
            r = min(r, max(1, int(hit[0]) + 1) if hit.size else full)
    return min(r, int(np.count_nonzero(s > sv_epsilon)))


def rank_margin(s, *, energy: float | None = None, nuclear: float | None = None,
                sv_epsilon: float = 0.0) -> float:
    """Relative distance of the value-based rank thresholds from the values they are compared with (cumulative
    sums, singular values). float32 singular values carry a relative error ~1e-6, so a test comparing a float32
    kernel's rank with ``svd_rank`` needs a margin well above that (1 = no value-based rule given)."""
    s = np.asarray(s, dtype=np.float64)
    m = 1.0
    for share, w in ((energy, s * s), (nuclear, s)):
        # the last cumulative sum does not matter: reached or (by rounding) not, the rank is min(m, n)
        if share is not None and w.sum() > 0 and w.size > 1:
            m = min(m, float(np.min(np.abs(np.cumsum(w)[:-1] - share * w.sum()))) / float(w.sum()))
    if s.size and (sv_epsilon > 0 or np.any(s == 0)):
        near = np.abs(s - sv_epsilon)
        # exact zeros at sv_epsilon 0 are dropped in any arithmetic; only values near a positive epsilon are close
        near = near[s != 0] if sv_epsilon == 0 else near
        if near.size:
            m = min(m, float(np.min(near)) / max(float(s[0]), sv_epsilon))
    return m


def svd(a, **rules) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_core.svd`` exactly (exact=True): the thin SVD truncated to ``svd_rank``'s rank."""
    u, s, vt = thin_svd(a)
    r = svd_rank(s, np.shape(a), **rules)
    return u[:, :r], s[:r], vt[:r, :]




# --------------------------------------------------------------------------------------------------------------
# test matrices
# --------------------------------------------------------------------------------------------------------------


def orthonormal(rng: np.random.Generator, m: int, r: int) -> np.ndarray:
    """m×r with orthonormal columns (QR of a Gaussian matrix, signs fixed so the distribution is Haar)."""
    q, rr = np.linalg.qr(rng.standard_normal((m, r)))
    return q * np.where(np.diag(rr) < 0, -1.0, 1.0)[None, :]


def with_spectrum(rng: np.random.Generator, m: int, n: int, s) -> np.ndarray:
    """A random m×n float64 matrix U·diag(s)·Vᵀ with the given singular values (len(s) <= min(m, n))."""
    s = np.asarray(s, dtype=np.float64)
    return orthonormal(rng, m, s.size) @ (s[:, None] * orthonormal(rng, n, s.size).T)


def decaying(r: int, ratio: float, top: float = 1.0) -> np.ndarray:
    """Geometric spectrum top·ratio^i: every relative gap is 1 - ratio, so truncations are well conditioned."""
    return top * ratio ** np.arange(r, dtype=np.float64)
