"""References of ``merge/methods/spectral.rs``: tsv_m, iso_c, iso_cts and star, and ``sensitivity``, the
amplification of rounding inside their SVDs that the tests' tolerance is built from.

Conventions: inputs are float32 values (already decoded). Task vectors ``tau = x - b`` are formed in float32 (one
IEEE subtraction) and everything after that runs in float64 with ``np.linalg.svd`` (LAPACK gesdd). Every method takes
the base and the list of non-base models as full tensors of any ndim and returns theta in float64 with the base's
shape: 2-D tensors get the SVD treatment, every other ndim ``base + alpha·mean(tau)`` (STAR: ``base + mean(tau)``),
as the authors' code does for non-matrix keys (AntoAndGar/task_singular_vectors, danielm1405/iso-merging,
IBM/STAR). Where that code's output is undefined (0/0), the choice made here is stated in the docstring. The
``*_tau`` functions take float64 task vectors and return the merged task vector (before alpha). Never calls
ferromerge.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from reference import arrays, linalg

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
    singular values (docs/svd.md, "Methods"). k = 0 (T > min(m, n), e.g. a 2×384 matrix and three tasks) would keep
    nothing (the reference code's update is 0: every slot is zero); ferromerge gives such a matrix the mean task
    vector instead, with a note (docs/svd.md, "Departures"), and so does this reference.

    Not unique: a task whose top k triplets include zero singular values (a task vector of rank < k, e.g. a
    tensor one fine-tune left unchanged) contributes arbitrary unit vectors to U_cat, which the polar factor mixes
    into every other task's directions; implementations then differ by O(‖tau‖) (the reference code too).
    """
    if taus[0].ndim != 2:
        return arrays.mean_of(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k = tsv_k((m, n), len(taus))
    if k == 0:
        return arrays.mean_of(taus)
    u_cat, s_cat, v_cat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, t in enumerate(taus):
        u, s, vt = linalg.truncated_svd(t, k)
        u_cat[:, i * k:(i + 1) * k] = u
        s_cat[i * k:(i + 1) * k] = s
        v_cat[i * k:(i + 1) * k, :] = vt
    return linalg.polar(u_cat) @ (s_cat[:, None] * linalg.polar(v_cat))


def tsv_m(base, xs: Sequence, alpha: float = 1.0) -> np.ndarray:
    """theta = base + alpha·tsv_m_tau(tau_1..tau_T) (alpha applies to every tensor, 1-D ones included)."""
    return arrays.merged_theta(base, tsv_m_tau(arrays.task_vectors(base, xs)), alpha)


# --------------------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS (Marczak et al., ICML 2025; iso-merging src/utils/iso.py)
# --------------------------------------------------------------------------------------------------------------


def iso_c_tau(taus: Sequence[np.ndarray]) -> np.ndarray:
    """mean(S)·U·Vt of M = Σ_t tau_t (full thin SVD; = ‖M‖_*/min(m, n)·polar(M)) on 2-D, the mean elsewhere.

    When rank(M) < min(m, n) the trailing singular vectors are arbitrary and still get weight mean(S) (the
    reference's behaviour, docs/svd.md, "Methods"): such inputs have no unique answer and tests avoid them.
    """
    if taus[0].ndim != 2:
        return arrays.mean_of(taus)
    u, s, vt = linalg.thin_svd(np.sum(np.stack(taus), axis=0), arrays.norm_sum(taus))
    return s.mean() * (u @ vt)


def iso_c(base, xs: Sequence, alpha: float = 1.0) -> np.ndarray:
    return arrays.merged_theta(base, iso_c_tau(arrays.task_vectors(base, xs)), alpha)


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
        return arrays.mean_of(taus)
    m, n = taus[0].shape
    r = min(m, n)
    t_count = len(taus)
    common, d = iso_cts_dims((m, n), t_count, common_space_fraction)
    u, s, vt = linalg.thin_svd(np.sum(np.stack(taus), axis=0), arrays.norm_sum(taus))
    uc, sc, vc = u[:, :common], s[:common], vt[:common, :]
    u_cat, s_cat, v_cat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, tau in enumerate(taus):
        w = tau - uc @ (uc.T @ tau)
        ut, st, vtt = linalg.truncated_svd(w, d, np.linalg.norm(tau))
        u_cat[:, i * d:(i + 1) * d], s_cat[i * d:(i + 1) * d], v_cat[i * d:(i + 1) * d, :] = ut, st, vtt
    j = t_count * d
    u_cat[:, j:j + common], s_cat[j:j + common], v_cat[j:j + common, :] = uc, sc, vc
    return s_cat.mean() * (linalg.polar(u_cat) @ linalg.polar(v_cat))


def iso_cts(base, xs: Sequence, alpha: float = 1.0, common_space_fraction: float = 0.8) -> np.ndarray:
    return arrays.merged_theta(base, iso_cts_tau(arrays.task_vectors(base, xs), common_space_fraction), alpha)


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
    s = linalg.thin_svd(tau)[1]
    if s.sum() == 0 or s.size < 2:
        return 1.0
    # the last cumulative sum does not matter (reached or not, the rank is len(S))
    return float(np.min(np.abs(np.cumsum(s)[:-1] - s.sum() * eta / 100.0))) / float(s.sum())


def star_matrix(tau, eta: float = 40.0) -> np.ndarray:
    """Keep the top ``star_rank`` triplets and rescale them to the full nuclear norm: U_r·diag(ΣS/ΣS_r·S_r)·Vt_r.
    A zero matrix gives zero (the reference code divides 0 by 0 there)."""
    u, s, vt = linalg.thin_svd(tau)
    if s.sum() == 0:
        return np.zeros(np.shape(tau))
    r = star_rank(s, eta)
    kept = s[:r] * (s.sum() / s[:r].sum())
    return u[:, :r] @ (kept[:, None] * vt[:r, :])


def star_tau(taus: Sequence[np.ndarray], eta: float = 40.0) -> np.ndarray:
    """(1/T)·Σ_t STAR(tau_t) on 2-D task vectors (per task, then a plain average), the mean elsewhere."""
    if taus[0].ndim != 2:
        return arrays.mean_of(taus)
    return arrays.mean_of([star_matrix(t, eta) for t in taus])


def star(base, xs: Sequence, eta: float = 40.0) -> np.ndarray:
    """theta = base + (1/T)·Σ STAR(tau_t) (no alpha: the reference averages with weights 1/T)."""
    return arrays.merged_theta(base, star_tau(arrays.task_vectors(base, xs), eta), 1.0)


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
    total = arrays.norm_sum(taus)
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
