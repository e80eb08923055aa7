"""Plain NumPy references for the SVD-space methods (tsv_m, iso_c, iso_cts, star), TALL masks / Consensus, the
SVD and polar kernels with their rank rules, and LoRA extraction.

Written from ``methods.md`` §2.7, §2.10–2.12 (the authors' reference code: nik-dim/tall_masks,
AntoAndGar/task_singular_vectors, danielm1405/iso-merging, IBM/STAR), ``mergekit-compat.md`` §4
(mergekit-extract-lora) and the issue-5 contract; it never calls ferromerge. Conventions:

* inputs are float32 values (already decoded from their storage dtype). The SVD-space methods form task vectors
  ``tau = x - b`` in float32 (one IEEE subtraction, as a float32 implementation does) and run everything after
  that in float64 with ``np.linalg.svd`` (LAPACK gesdd); TALL / Consensus form them exactly in float64, so their
  masks are exact and only elements within rounding of a mask threshold are left open (``tall_mask_ambiguous``);
* every method takes the base and the list of non-base models as full tensors of any ndim and returns theta in
  float64 with the base's shape. 2-D tensors get the SVD treatment; every other ndim gets ``base + alpha·mean(tau)``
  (STAR: ``base + mean(tau)``), as the reference code does for non-matrix keys. TALL / Consensus are elementwise
  and apply to every tensor;
* where the reference code's output is undefined (0/0), the choice made here is stated in the docstring.

The ``*_tau`` functions take float64 task vectors and return the merged task vector (before alpha); they are what
``sensitivity`` perturbs to estimate how much float32 rounding inside an SVD can move a method's output.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

# --------------------------------------------------------------------------------------------------------------
# task vectors
# --------------------------------------------------------------------------------------------------------------


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def task_vectors(base, xs: Sequence) -> list[np.ndarray]:
    """tau_t = x_t - base, one float32 subtraction each, returned as float64 arrays of the base's shape."""
    b = _f32(base)
    out = []
    for x in xs:
        x = _f32(x)
        if x.shape != b.shape:
            raise ValueError(f"model shape {x.shape} != base shape {b.shape}")
        out.append((x - b).astype(np.float64))
    return out


def exact_task_vectors(base, xs: Sequence) -> list[np.ndarray]:
    """tau_t = x_t - base in float64: exact (a difference of two float32 values always fits a float64). The
    elementwise TALL / Consensus references use these, so their masks have no rounding to depend on."""
    b = _f32(base).astype(np.float64)
    return [_f32(x).astype(np.float64) - b for x in xs]


def _theta(base, merged_tau: np.ndarray, alpha: float) -> np.ndarray:
    return _f32(base).astype(np.float64) + alpha * merged_tau


def _norms(taus: Sequence[np.ndarray]) -> float:
    return float(sum(np.linalg.norm(t) for t in taus))


def _mean(taus: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(taus), axis=0)


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


def lora_factors(delta, rank: int, distribute_scale: bool = True,
                 sv_epsilon: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """mergekit-extract-lora's split of a 2-D task vector into (A, B) with B @ A the rank-r truncation.

    r = min(rank, min(m, n)), then min(r, #(S > sv_epsilon)) only when sv_epsilon > 0 (mergekit; unlike
    ``svd_rank``, zero singular values are kept at sv_epsilon 0). ``distribute_scale``:
    A = diag(√S_r)·Vt_r (r×n), B = U_r·diag(√S_r) (m×r); otherwise A = diag(S_r)·Vt_r, B = U_r. Singular vectors
    have arbitrary signs, so compare B @ A, not the factors.
    """
    u, s, vt = thin_svd(delta)
    r = min(int(rank), s.size)
    if sv_epsilon > 0:
        r = min(r, int(np.count_nonzero(s > sv_epsilon)))
    u, s, vt = u[:, :r], s[:r], vt[:r, :]
    if distribute_scale:
        root = np.sqrt(s)
        return root[:, None] * vt, u * root[None, :]
    return s[:, None] * vt, u


# --------------------------------------------------------------------------------------------------------------
# TSV-M (Gargiulo et al., CVPR 2025; TSVM_utils.compute_and_sum_svd_mem_reduction)
# --------------------------------------------------------------------------------------------------------------


def tsv_k(shape: Sequence[int], n_tasks: int) -> int:
    """Triplets kept per task: k = floor(min(m, n)/T) (int(s.shape[0] * (1/T)) in the reference)."""
    return min(int(shape[0]), int(shape[1])) // n_tasks


def tsv_m_tau(taus: Sequence[np.ndarray]) -> np.ndarray:
    """polar(U_cat)·diag(s_cat)·polar(V_cat) on 2-D task vectors, the mean elsewhere.

    U_cat (m×r) holds each task's top k left singular vectors in slots [i·k, (i+1)·k), s_cat and V_cat (r×n, rows
    of Vt) likewise. When T·k < r the leftover slots stay zero: their polar columns are arbitrary but meet zero
    singular values (methods.md §2.10). k = 0 (T > min(m, n), e.g. a 1×n matrix and two tasks) keeps nothing, so
    the merged task vector is 0 (the reference code's outcome: every slot is zero).

    Not unique: a task whose top k triplets include zero singular values (a task vector of rank < k, e.g. a
    tensor one fine-tune left unchanged) contributes arbitrary unit vectors to U_cat, which the polar factor mixes
    into every other task's directions; implementations then differ by O(‖tau‖) (the reference code too).
    """
    if taus[0].ndim != 2:
        return _mean(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k = tsv_k((m, n), len(taus))
    if k == 0:
        return np.zeros((m, n))
    u_cat, s_cat, v_cat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, t in enumerate(taus):
        u, s, vt = truncated_svd(t, k)
        u_cat[:, i * k:(i + 1) * k] = u
        s_cat[i * k:(i + 1) * k] = s
        v_cat[i * k:(i + 1) * k, :] = vt
    return polar(u_cat) @ (s_cat[:, None] * polar(v_cat))


def tsv_m(base, xs: Sequence, alpha: float = 1.0) -> np.ndarray:
    """theta = base + alpha·tsv_m_tau(tau_1..tau_T) (alpha applies to every tensor, 1-D ones included)."""
    return _theta(base, tsv_m_tau(task_vectors(base, xs)), alpha)


# --------------------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS (Marczak et al., ICML 2025; iso-merging src/utils/iso.py)
# --------------------------------------------------------------------------------------------------------------


def iso_c_tau(taus: Sequence[np.ndarray]) -> np.ndarray:
    """mean(S)·U·Vt of M = Σ_t tau_t (full thin SVD; = ‖M‖_*/min(m, n)·polar(M)) on 2-D, the mean elsewhere.

    When rank(M) < min(m, n) the trailing singular vectors are arbitrary and still get weight mean(S) (the
    reference's behaviour, methods.md §2.11): such inputs have no unique answer and tests avoid them.
    """
    if taus[0].ndim != 2:
        return _mean(taus)
    u, s, vt = thin_svd(np.sum(np.stack(taus), axis=0), _norms(taus))
    return s.mean() * (u @ vt)


def iso_c(base, xs: Sequence, alpha: float = 1.0) -> np.ndarray:
    return _theta(base, iso_c_tau(task_vectors(base, xs)), alpha)


def iso_cts_dims(shape: Sequence[int], n_tasks: int, common_space_fraction: float = 0.8) -> tuple[int, int]:
    """(common dims, task-specific dims per task) as iso.py computes them:

        common = int(r·f); ts_total = round((r - common)/T)·T; common = r - ts_total

    ``round`` is Python's (half to even: round(0.5) = 0, round(1.5) = 2), so the T task blocks fill
    the r slots exactly. When rounding up would need more slots than r (only for small f, e.g. r = 3, T = 2,
    f = 0.1: ts_total = 4) the reference code slices with a negative index; here the task blocks shrink by one dim
    each (ts_total -= T) so common >= 0. That corner is a choice, not the reference's behaviour.
    """
    r = min(int(shape[0]), int(shape[1]))
    t = int(n_tasks)
    common = int(r * common_space_fraction)
    ts_total = round((r - common) / t) * t
    if ts_total > r:
        ts_total -= t
    return r - ts_total, ts_total // t


def iso_cts_tau(taus: Sequence[np.ndarray], common_space_fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS on 2-D task vectors (the mean elsewhere).

    Common space: the top ``common`` left/right singular vectors of M = Σ tau_t. Task t: w_t = tau_t - Uc Ucᵀ tau_t
    (only the common *left* subspace is projected out), its top ``d`` triplets. U_cat = [task blocks in task order,
    common block last], likewise V_cat; U = polar(U_cat), V = polar(V_cat); every singular value is replaced by
    the mean over all r slots of [task values, common values]: tau = mean·U·V.
    """
    if taus[0].ndim != 2:
        return _mean(taus)
    m, n = taus[0].shape
    r = min(m, n)
    t_count = len(taus)
    common, d = iso_cts_dims((m, n), t_count, common_space_fraction)
    u, s, vt = thin_svd(np.sum(np.stack(taus), axis=0), _norms(taus))
    uc, sc, vc = u[:, :common], s[:common], vt[:common, :]
    u_cat, s_cat, v_cat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, tau in enumerate(taus):
        w = tau - uc @ (uc.T @ tau)
        ut, st, vtt = truncated_svd(w, d, np.linalg.norm(tau))
        u_cat[:, i * d:(i + 1) * d], s_cat[i * d:(i + 1) * d], v_cat[i * d:(i + 1) * d, :] = ut, st, vtt
    j = t_count * d
    u_cat[:, j:j + common], s_cat[j:j + common], v_cat[j:j + common, :] = uc, sc, vc
    return s_cat.mean() * (polar(u_cat) @ polar(v_cat))


def iso_cts(base, xs: Sequence, alpha: float = 1.0, common_space_fraction: float = 0.8) -> np.ndarray:
    return _theta(base, iso_cts_tau(task_vectors(base, xs), common_space_fraction), alpha)


# --------------------------------------------------------------------------------------------------------------
# STAR (Lee et al., NAACL 2025; IBM/STAR merger/STAR.py)
# --------------------------------------------------------------------------------------------------------------


def star_rank(s, eta: float) -> int:
    """searchsorted(cumsum(S), ΣS·eta/100) + 1 (left side), capped at len(S): the smallest count of singular values
    whose sum reaches eta % of the nuclear norm (a cumulative sum equal to the target counts as reaching it)."""
    s = np.asarray(s, dtype=np.float64)
    return min(int(np.searchsorted(np.cumsum(s), s.sum() * eta / 100.0, side="left")) + 1, s.size)


def star_rank_margin(tau, eta: float) -> float:
    """Relative distance of the eta target from the nearest cumulative sum (see ``rank_margin``)."""
    s = thin_svd(tau)[1]
    if s.sum() == 0 or s.size < 2:
        return 1.0
    # the last cumulative sum does not matter (reached or not, the rank is len(S))
    return float(np.min(np.abs(np.cumsum(s)[:-1] - s.sum() * eta / 100.0))) / float(s.sum())


def star_matrix(tau, eta: float = 40.0) -> np.ndarray:
    """Keep the top ``star_rank`` triplets and rescale them to the full nuclear norm: U_r·diag(ΣS/ΣS_r·S_r)·Vt_r.
    A zero matrix gives zero (the reference code divides 0 by 0 there)."""
    u, s, vt = thin_svd(tau)
    if s.sum() == 0:
        return np.zeros(np.shape(tau))
    r = star_rank(s, eta)
    kept = s[:r] * (s.sum() / s[:r].sum())
    return u[:, :r] @ (kept[:, None] * vt[:r, :])


def star_tau(taus: Sequence[np.ndarray], eta: float = 40.0) -> np.ndarray:
    """(1/T)·Σ_t STAR(tau_t) on 2-D task vectors (per task, then a plain average), the mean elsewhere."""
    if taus[0].ndim != 2:
        return _mean(taus)
    return _mean([star_matrix(t, eta) for t in taus])


def star(base, xs: Sequence, eta: float = 40.0) -> np.ndarray:
    """theta = base + (1/T)·Σ STAR(tau_t) (no alpha: the reference averages with weights 1/T)."""
    return _theta(base, star_tau(task_vectors(base, xs), eta), 1.0)


# --------------------------------------------------------------------------------------------------------------
# TALL masks and Consensus (Wang et al., ICML 2024; tall_masks src/utils/tallmask_utils.py)
# --------------------------------------------------------------------------------------------------------------


def tall_mask_list(taus: Sequence[np.ndarray], tall_mask_lambda: float = 0.4) -> list[np.ndarray]:
    """m_t = |tau_t| > lambda·|tau_MTL - tau_t| (strict), tau_MTL = Σ tau_t unscaled."""
    mtl = np.sum(np.stack(taus), axis=0)
    return [np.abs(t) > tall_mask_lambda * np.abs(mtl - t) for t in taus]


def tall_mask_ambiguous(taus: Sequence[np.ndarray], tall_mask_lambda: float = 0.4, rel: float = 1e-9) -> np.ndarray:
    """Elements where some task's mask comparison is within rounding of its threshold, so a kernel that sums
    tau_MTL in another order could decide either way:
    ||tau_t| - lambda·|tau_MTL - tau_t|| <= rel·(|tau_t| + lambda·Σ_s |tau_s|), unless both sides are exactly 0
    (0 > 0 is false in any arithmetic). The default ``rel`` suits a float64 kernel with exact task vectors (a
    float32 one needs ~1e-5 and float32 task vectors)."""
    stack = np.stack(taus)
    mtl = stack.sum(0)
    tot = np.abs(stack).sum(0)
    amb = np.zeros(stack.shape[1:], dtype=bool)
    for t in stack:
        lhs, rhs = np.abs(t), tall_mask_lambda * np.abs(mtl - t)
        close = np.abs(lhs - rhs) <= rel * (lhs + tall_mask_lambda * tot)
        amb |= close & ~((lhs == 0) & (rhs == 0))
    return amb


def consensus_tau(taus: Sequence[np.ndarray], k: int = 2, tall_mask_lambda: float = 0.4) -> np.ndarray:
    """[Σ_t m_t >= k] ⊙ tau_MTL (k = 0: tau_MTL, plain task arithmetic; k > T: zero)."""
    count = np.sum(np.stack(tall_mask_list(taus, tall_mask_lambda)), axis=0)
    return np.where(count >= k, np.sum(np.stack(taus), axis=0), 0.0)


def consensus(base, xs: Sequence, k: int = 2, tall_mask_lambda: float = 0.4, lam: float = 1.0) -> np.ndarray:
    """theta = base + lam·(m_cons ⊙ tau_MTL), elementwise on every tensor."""
    return _theta(base, consensus_tau(exact_task_vectors(base, xs), k, tall_mask_lambda), lam)


def tall_masks(base, xs: Sequence, task: int, tall_mask_lambda: float = 0.4) -> np.ndarray:
    """Task ``task``'s (0-based among the non-base models) reconstruction base + m_task ⊙ tau_MTL (scale 1)."""
    taus = exact_task_vectors(base, xs)
    if not 0 <= task < len(taus):
        raise ValueError(f"task {task} out of range for {len(taus)} models")
    mask = tall_mask_list(taus, tall_mask_lambda)[task]
    return _theta(base, np.where(mask, np.sum(np.stack(taus), axis=0), 0.0), 1.0)


# --------------------------------------------------------------------------------------------------------------
# sensitivity of a method to rounding inside its SVDs
# --------------------------------------------------------------------------------------------------------------

#: merged task vector (before alpha) of each SVD-space method, from float64 task vectors
TAU_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "tsv_m": tsv_m_tau,
    "iso_c": iso_c_tau,
    "iso_cts": iso_cts_tau,
    "star": star_tau,
}


def sensitivity(method: str, taus: Sequence[np.ndarray], *, trials: int = 3, rel: float = 1e-7, seed: int = 0,
                **params) -> float:
    """Normwise amplification κ of rounding inside a method: max over ``trials`` runs in which the task vectors
    *and the input of every SVD* (sums, projected remainders, concatenated factors for the polar step) are
    perturbed by random E with ‖E‖_F = rel·(the magnitude of the terms that input was computed from), of
    ‖f_perturbed - f‖_F / (rel·Σ_t ‖tau_t‖_F).

    Why this is the right yardstick: a float32 SVD is backward stable (it returns the exact SVD of its input plus
    some E with ‖E‖ ≲ c·eps32·‖input‖), and forming a sum or a remainder in float32 errs by eps32 times the size of
    its terms, so a float32 implementation of the same steps lands within about c·eps32·κ·Σ‖tau_t‖_F of the
    float64 result. κ is ~1 for linear steps, grows as 1/gap when a truncation cuts between close singular values
    and as 1/σ_min when a polar factor or a projected remainder is nearly singular, and is huge where the answer is
    not unique (a repeated singular value at a cut, a rank-deficient Iso-C sum): tests skip such inputs.
    ``rel`` = 1e-7 is far above float64 rounding and small enough to stay in the linear regime. Not thread-safe
    (the perturbation is switched on module-wide for the duration of the call).
    """
    global _noise
    f = TAU_FUNCTIONS[method]
    exact = f(taus, **params)
    total = _norms(taus)
    if total == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(trials):
        pert = []
        for t in taus:
            e = rng.standard_normal(t.shape)
            ne = np.linalg.norm(e)
            pert.append(t + (rel * np.linalg.norm(t) / ne) * e if ne > 0 else t)
        _noise = (rng, rel)
        try:
            moved = f(pert, **params)
        finally:
            _noise = None
        worst = max(worst, float(np.linalg.norm(moved - exact)) / (rel * total))
    return worst


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
