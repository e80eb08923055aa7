"""References of the methods in ``merge/methods/task_arithmetic.rs``: linear, task_arithmetic, ties and the GTA
pipeline they share (task vectors, TIES trim, rescale, sign election, disjoint mean), breadcrumbs / breadcrumbs_ties
(the magnitude-outliers mask) and della / della_linear (the rank-dependent random mask). DARE's mask is random and
is read off the engine by the tests (``tests/kernels/test_task_arithmetic.py``); its pipeline is ``gta`` here.

Everything is float64 except where the engine works on float32 quantities whose *discrete* consequences must match
exactly: task vectors ``δ = x − b`` are formed in float32 (one correctly rounded IEEE subtraction), because the TIES
trim ranks ``|δ|`` of those float32 values and a float64 ranking could order near-equal magnitudes differently;
every later step (rescale, weights, election, disjoint mean, lambda) runs in float64. Results are ``Ref``s
(``reference.result``); elements whose sign election is too close to call in float32 (``|Σ W| ≤ 1e-5 · Σ |W|`` with
``Σ |W| > 0``) are marked ambiguous.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reference import arrays
from reference.result import Ref

# --------------------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------------------


def linear(xs: Sequence[np.ndarray], weights: Sequence[float], normalize: bool) -> Ref:
    """out = Σ w_i x_i (/ Σ w_i). The caller must not ask for normalize with Σ w == 0 (that is an error)."""
    x = np.stack([np.asarray(a, dtype=np.float64).reshape(-1) for a in xs])
    w = np.asarray(weights, dtype=np.float64)[:, None]
    terms = w * x
    out = terms.sum(0)
    scale = np.abs(terms).sum(0)
    if normalize:
        s = float(w.sum())
        if s == 0.0:
            raise ValueError("normalize with zero weight sum")
        out = out / s
        # the divisor itself carries rounding error relative to Σ|w|
        scale = scale / abs(s) * (1.0 + float(np.abs(w).sum()) / abs(s))
    return Ref(out, scale, np.zeros(out.shape, dtype=bool))


def task_arithmetic_plain(base: np.ndarray, xs: Sequence[np.ndarray], weights: Sequence[float],
                          lam: float = 1.0) -> np.ndarray:
    """Textbook task arithmetic θ = b + λ Σ w_i (x_i − b), float64 (no normalize)."""
    b = np.asarray(base, dtype=np.float32).reshape(-1).astype(np.float64)
    mixed = sum(w * (np.asarray(x, dtype=np.float64).reshape(-1) - b) for w, x in zip(weights, xs))
    return b + lam * mixed


# --------------------------------------------------------------------------------------------------------------
# GTA building blocks
# --------------------------------------------------------------------------------------------------------------


def task_vector(x: np.ndarray, base: np.ndarray) -> np.ndarray:
    """δ = x − b as float32 (one IEEE subtraction)."""
    return (np.asarray(x, dtype=np.float32).reshape(-1) - np.asarray(base, dtype=np.float32).reshape(-1)).astype(
        np.float32
    )


def ties_k(density: float, n: int) -> int:
    """Number of elements TIES keeps: max(1, int(d·n)) in float64; everything at d >= 1."""
    if density >= 1.0:
        return n
    return max(1, int(density * n))


def ties_trim_mask(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep exactly k largest |δ| (ties → lowest index)."""
    a = np.abs(np.asarray(delta).reshape(-1).astype(np.float64))
    n = a.size
    k = ties_k(density, n)
    order = np.lexsort((np.arange(n), -a))  # primary: |δ| descending, secondary: index ascending
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


def trim_is_unambiguous(delta: np.ndarray, density: float) -> bool:
    """True when the k-th and (k+1)-th largest |δ| differ, i.e. the kept set does not depend on tie-breaking."""
    a = np.sort(np.abs(np.asarray(delta, dtype=np.float64).reshape(-1)))[::-1]
    k = ties_k(density, a.size)
    return k >= a.size or a[k - 1] != a[k]


def l1_rescale_factor(delta: np.ndarray, mask: np.ndarray, eps: float = 1e-7) -> float:
    """‖δ‖₁ / ‖δ·m‖₁, or 1 when either norm is below eps."""
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    before = float(np.abs(d).sum())
    after = float(np.abs(d[np.asarray(mask).reshape(-1)]).sum())
    if before < eps or after < eps:
        return 1.0
    return before / after


def sparsify(delta: np.ndarray, mask: np.ndarray, density: float, rescale: str) -> np.ndarray:
    """δ̃ = δ·m, then rescale: "none" | "l1" | "inverse_density" (float64 result)."""
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    m = np.asarray(mask, dtype=bool).reshape(-1)
    kept = np.where(m, d, 0.0)
    if rescale == "none":
        return kept
    if rescale == "l1":
        return kept * l1_rescale_factor(d, m)
    if rescale == "inverse_density":
        return kept / density
    raise ValueError(rescale)


def elect_sign(W: np.ndarray) -> np.ndarray:
    """+1 where Σ_i W_i >= 0 else −1 (W has shape [models, n])."""
    return np.where(W.sum(0) >= 0, 1.0, -1.0)


def disjoint_mean(W: np.ndarray, weights: np.ndarray, elected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ agreeing W_i, Σ agreeing w_i with 0 → 1, agree mask); zeros never agree."""
    agree = (np.sign(W) == elected[None, :]) & (W != 0)
    mixed = np.where(agree, W, 0.0).sum(0)
    divisor = np.where(agree, weights[:, None], 0.0).sum(0)
    divisor = np.where(divisor == 0, 1.0, divisor)
    return mixed, divisor, agree


# --------------------------------------------------------------------------------------------------------------
# full GTA pipeline
# --------------------------------------------------------------------------------------------------------------


def gta(
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    masks: Sequence[np.ndarray] | None = None,
    densities: Sequence[float] | None = None,
    rescale: str = "none",
) -> Ref:
    """task_arithmetic / ties / dare_* given explicit keep masks (None = keep all, i.e. task arithmetic).

    ``base`` and ``xs`` are float32 values (already rounded to any cast dtype).
    """
    b32 = np.asarray(base, dtype=np.float32).reshape(-1)
    n = b32.size
    m = len(xs)
    w = np.asarray(weights, dtype=np.float64)
    dens = [1.0] * m if densities is None else list(densities)
    deltas = [task_vector(x, b32) for x in xs]
    if masks is None:
        masks = [np.ones(n, dtype=bool)] * m
    sp = [sparsify(d, mk, dn, rescale) for d, mk, dn in zip(deltas, masks, dens)]
    return combine(b32, sp, w, consensus=consensus, normalize=normalize, lam=lam)


def election_ambiguous(W: np.ndarray) -> np.ndarray:
    """Elements whose sign election (Σ_i W_i >= 0) is too close to call in float32: |Σ W| <= 1e-5·Σ|W|, unless the
    sum is exactly 0 with every term and partial sum exact in float32 (grid data), which any order decides alike."""
    tot = np.abs(W).sum(0)
    S = W.sum(0)
    as32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    cs = np.cumsum(W, axis=0)
    exact = (as32(W) == W).all(0) & (as32(cs) == cs).all(0)
    return (tot > 0) & (np.abs(S) <= 1e-5 * tot) & ~((S == 0) & exact)


def combine(base, sparse, weights, *, consensus: bool, normalize: bool, lam: float = 1.0) -> Ref:
    """The GTA combination of already sparsified task vectors (shared by ``gta`` and the new methods' references)."""
    b = np.asarray(base, dtype=np.float32).reshape(-1).astype(np.float64)
    n = b.size
    w = np.asarray(weights, dtype=np.float64)
    W = w[:, None] * np.stack(sparse) if len(sparse) else np.zeros((0, n))
    absW = np.abs(W)
    ambiguous = np.zeros(n, dtype=bool)
    if consensus:
        elected = elect_sign(W)
        mixed, divisor, agree = disjoint_mean(W, w, elected)
        used = np.where(agree, absW, 0.0).sum(0)
        used_w = np.where(agree, np.abs(w)[:, None], 0.0).sum(0)
        ambiguous = election_ambiguous(W)
    else:
        mixed = W.sum(0)
        s = float(w.sum())
        divisor = np.full(n, 1.0 if abs(s) < 1e-8 else s)
        used = absW.sum(0)
        used_w = np.full(n, float(np.abs(w).sum()))
    scale_mixed = used
    if normalize:
        mixed = mixed / divisor
        scale_mixed = used / np.abs(divisor) * (1.0 + used_w / np.abs(divisor))
    return Ref(b + lam * mixed, np.abs(b) + abs(lam) * scale_mixed, ambiguous)


def ties(base, xs, weights, densities, *, normalize=True, lam=1.0, rescale="none") -> Ref:
    """TIES with the exact magnitude trim computed here."""
    b32 = np.asarray(base, dtype=np.float32).reshape(-1)
    masks = [ties_trim_mask(task_vector(x, b32), d) for x, d in zip(xs, densities)]
    return gta(base, xs, weights, consensus=True, normalize=normalize, lam=lam, masks=masks,
               densities=densities, rescale=rescale)


def task_arithmetic(base, xs, weights, *, normalize=False, lam=1.0) -> Ref:
    return gta(base, xs, weights, consensus=False, normalize=normalize, lam=lam)
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
    rows = arrays.rows(a, shape)
    if not rows.size:
        return arrays.none_ambiguous(0)
    return np.concatenate([_breadcrumbs_row(r, density, gamma) for r in rows])


def breadcrumbs_is_unambiguous(delta, density: float, gamma: float, shape=None, per_row: bool = False) -> bool:
    """True when neither boundary of the kept band falls between equal |δ| (the set does not depend on ties)."""
    a = np.abs(np.asarray(delta, dtype=np.float32).reshape(-1).astype(np.float64))
    rows = arrays.rows(a, shape) if per_row else a.reshape(1, -1)
    for r in rows:
        s = np.sort(r)
        n_bot, target = breadcrumbs_counts(r.size, density, gamma)
        for cut in (n_bot, n_bot + target):
            if 0 < cut < r.size and s[cut - 1] == s[cut]:
                return False
    return True


def breadcrumbs(base, xs, weights, densities, gammas, *, consensus: bool, normalize: bool, lam: float = 1.0,
                rescale: str = "none", shape=None, per_row: bool = False) -> Ref:
    masks = [breadcrumbs_mask(task_vector(x, base), d, g, shape, per_row)
             for x, d, g in zip(xs, densities, gammas)]
    return gta(base, xs, weights, consensus=consensus, normalize=normalize, lam=lam, masks=masks,
                   densities=densities, rescale=rescale)


# --------------------------------------------------------------------------------------------------------------
# della / della_linear (GTA with the rank-dependent random mask)
# --------------------------------------------------------------------------------------------------------------


def della_ranks(delta, shape) -> np.ndarray:
    """Rank 1..n of |δ| within its row, ascending; equal magnitudes: the lower index gets the lower rank."""
    a = np.abs(np.asarray(delta, dtype=np.float32).reshape(-1).astype(np.float64))
    rows = arrays.rows(a, shape)
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
        delta = task_vector(x, base)
        if d >= 1.0:
            sparse.append(delta.astype(np.float64))
            continue
        m = np.asarray(m, dtype=bool).reshape(-1)
        kept = np.where(m, delta.astype(np.float64), 0.0)
        if rescale == "inverse_density":
            kept = kept / della_probabilities(delta, shape, d, e).astype(np.float64)
        elif rescale == "l1":
            kept = kept * l1_rescale_factor(delta, m)
        elif rescale != "none":
            raise ValueError(rescale)
        sparse.append(kept)
    return combine(base, sparse, weights, consensus=consensus, normalize=normalize, lam=lam)
