"""Plain NumPy references for ferromerge's kernels.

Written from the math in ``docs/architecture.md`` ("Kernel semantics") and mergekit's GTA description
(``mergekit-compat.md`` §1.1, §1.3); it never calls ferromerge. Everything is float64 except where the contract
says the engine works on float32 quantities whose *discrete* consequences must match exactly:

* task vectors ``δ = x − b`` are formed in float32 (one correctly rounded IEEE subtraction, so any conforming
  implementation gets the same bits), because the TIES trim ranks ``|δ|`` of those float32 values and a float64
  ranking could order near-equal magnitudes differently;
* every later step (rescale, weights, election, disjoint mean, lambda) runs in float64.

Results come back as :class:`Ref`: the expected values, an elementwise *error scale* (the magnitude of the terms
that were summed, amplified by any division, so a float32 implementation's rounding error is bounded by a small
multiple of ``eps32 · scale``), and an ``ambiguous`` mask of elements whose sign election is too close to call in
float32 (``|Σ W| ≤ 1e-5 · Σ |W|`` with ``Σ |W| > 0``); those are excluded from comparisons by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------------

DTYPES = ("float32", "float16", "bfloat16")
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
#: (explicit mantissa bits, minimum normal exponent) of each dtype
_FORMAT = {"float32": (23, -126), "float16": (10, -14), "bfloat16": (7, -126)}


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16 or int16) -> float32, exact."""
    bits = np.asarray(bits)
    return (bits.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest, ties to even; NaN stays NaN (quiet, sign kept)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    lsb = (u >> np.uint64(16)) & np.uint64(1)
    rounded = ((u + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        quiet = ((u >> np.uint64(16)) | np.uint64(0x0040)).astype(np.uint16)
        rounded = np.where(nan, quiet, rounded)
    return rounded


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> storage array of ``dtype`` (bfloat16 as uint16 bits), round to nearest even."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        return bf16_encode(x)
    raise ValueError(dtype)


def decode(a: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """Storage array -> float32 values (bfloat16 for uint16/int16 storage)."""
    a = np.asarray(a)
    if a.dtype in (np.uint16, np.int16) or dtype == "bfloat16":
        return bf16_decode(a)
    return a.astype(np.float32)


def dtype_of(a: np.ndarray) -> str:
    a = np.asarray(a)
    if a.dtype == np.float32:
        return "float32"
    if a.dtype == np.float16:
        return "float16"
    if a.dtype in (np.uint16, np.int16):
        return "bfloat16"
    raise ValueError(a.dtype)


def round_to(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """Round float32 values to ``dtype`` and back to float32 (identity for None / float32)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype is None or dtype == "float32":
        return x
    return decode(encode(x, dtype), dtype)


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` numbers at magnitude ``|x|`` (float64), subnormals included."""
    mant, emin = _FORMAT[dtype]
    ax = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    e = np.where(ax > 0, np.maximum(e, emin), emin)
    return np.ldexp(1.0, (e - mant).astype(np.int64))


# --------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Ref:
    out: np.ndarray  # float64 expected values
    scale: np.ndarray  # float64 elementwise error scale (>= 0)
    ambiguous: np.ndarray  # bool: sign election too close to call in float32

    def tolerance(self, out_dtype: str, rtol: float = 1e-5, atol: float = 1e-7) -> np.ndarray:
        """Allowed |got − expected|: f32 math error (rtol·scale + atol) plus one unit of the output dtype."""
        t = rtol * self.scale + atol
        if out_dtype != "float32":
            t = t + ulp(np.abs(self.out) + t, out_dtype)
        return t


def assert_matches(got_values: np.ndarray, ref: Ref, out_dtype: str, *, rtol: float = 1e-5, atol: float = 1e-7,
                   context: str = "") -> None:
    """Compare decoded engine output (any float array) with a reference, skipping ambiguous elements."""
    got = np.asarray(got_values, dtype=np.float64).reshape(-1)
    exp = ref.out.reshape(-1)
    tol = ref.tolerance(out_dtype, rtol, atol).reshape(-1)
    ok = ~ref.ambiguous.reshape(-1)
    diff = np.abs(got - exp)
    bad = ok & ~(diff <= tol)
    if bad.any():
        i = np.flatnonzero(bad)[:8]
        raise AssertionError(
            f"{context}: {bad.sum()} of {got.size} elements out of tolerance ({out_dtype}); "
            f"idx={i.tolist()} got={got[i].tolist()} expected={exp[i].tolist()} tol={tol[i].tolist()}"
        )


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
