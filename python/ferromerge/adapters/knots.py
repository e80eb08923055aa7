"""KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): LoRA modules aligned in one shared
SVD basis, then merged there with TIES, DARE or a plain sum (``knots_merge``).

What the reference code (github.com/gstoica27/KnOTS, ``task_merger.SVDMerger`` and ``masking_ops``) does per
LoRA-adapted layer, and so what this module does:

1. ΔW_t = scale_t · B_t A_t (out × in) for each of the T adapters; C = [ΔW_1 | … | ΔW_T] (out × T·in, the
   reference's ``concat_across_output=True``).
2. ``U, s, V = svd(C)`` in float64; only the components with s > 1e-5 are kept; U, s and V are cast to float32 and
   V is cut into T blocks V_t (r × in). Task t is represented by sV_t = diag(s)·V_t: its coordinates in the shared
   basis U.
3. The sV_t are merged entrywise, with statistics over each task's *whole* vector: the reference flattens every
   layer of a task into one vector (``directions_to_reps``) before masking. ``ties`` keeps the task's
   int(d·density)+1 largest |entries| over all its modules (d: its coefficients over all of them; the reference's
   ``topk_values_mask``: ``abs >= kthvalue``, so every entry equal to the cut is kept), elects per entry the sign of
   the sum of the trimmed values (a zero sum takes the majority of the elected signs over all modules,
   ``resolve_zero_signs``) and takes the disjoint mean of the entries that agree: Σ_t w_t·x_t over the agreeing
   entries / their number (the reference's ``masked_merge('mean')``).
   ``dare_ties`` first keeps each entry with probability ``density`` and divides it by ``density`` (the reference's
   ``apply_dare`` on the sV_t; its published KnOTS-DARE configs then run the TIES election without a trim, topK 100),
   ``dare_linear`` and ``magnitude_prune`` sum Σ_t w_t·x_t after the DARE drop or the trim, ``linear`` sums.
   ``majority_sign="frequency"`` is the reference's ``sum_of_signs``: the sign of the count of signs, with no
   zero-sum rule (an entry whose count is 0 keeps the negative values, as the reference's
   ``where(sign > 0, x > 0, x < 0)`` does).
4. ΔW = U · merged, returned as ``Factors(a=merged, b=U, scale=1)``.

``knots_merge`` merges one module with the statistics of that module alone (the reference run on one layer);
``adapters.knots_global`` merges every module of the adapters with the reference's global statistics, streamed
(``Cut``: the exact global magnitude cut by radix selection over histograms; ``sign_balance``: the global majority
of the elected signs), which is what ``merge_adapters`` does.

How it is computed: never through the out × T·in matrix C. With B = [B_1 … B_T] = Q·R_B and
scale_t·A_tᵀ = Q_t·R_t (thin QRs, of which only the R factors are formed), C = Q · K · blockdiag(Q_tᵀ) with the
small core K = R_B · blockdiag(R_tᵀ) (Σr × Σr); Q and blockdiag(Q_tᵀ) have orthonormal columns and rows, so the SVD
K = U_K·diag(s)·Wᵀ gives C's exactly: s, V_t = Q_t·W_t, and U = C·V·diag(1/s) = Σ_t B_t·R_tᵀ·W_t·diag(1/s) (one
product with the stacked B). The coefficients are then diag(s)·V_tᵀ = Uᵀ·C_t = (Uᵀ·B_t)·(scale_t·A_t), equal in exact
arithmetic and exactly 0 for an adapter whose ΔW is 0 (an SVD's V_t holds rounding noise there, which the disjoint
mean would count as entries: the reference's result then depends on LAPACK's rounding). Cost O((out + T·in)·(Σr)²),
memory that of the factors and the T coefficient blocks (r × in each).
The QR and SVD run in float64 with LAPACK (NumPy), as the reference's SVD does: the engine's ``_core.svd`` is
float32 only, and with an absolute cut s > 1e-5 a float32 SVD would keep rounding-noise components of a
rank-deficient C (two adapters sharing a B) that change the trim's count. The trim is the reference's: every entry
whose magnitude reaches the cut is kept (ties at the cut included), the cut found exactly (``Cut``). DARE masks
come from the engine's counter-based generator keyed by ``seed``, ``module`` and the adapter's position in the
module (so they cannot bit-match torch's ``bernoulli``, and they do not depend on threads). The election and the
disjoint mean are elementwise NumPy in float64 on the float32 coefficients, rounded once to float32.

Departures from the reference, and why:

* Each SVD component's sign is fixed (``canonical_signs``: U's largest |entry| of the column positive); the
  reference takes LAPACK's, and its election is not sign-invariant where no sign has a majority (see there).
* ΔW_t includes the adapter's scale (lora_alpha / r): the reference's ``LoRAHandler`` uses B·A alone. They agree
  when every scale is 1 (and up to the 1e-5 cut when all scales are equal).
* Per-adapter weights: the reference multiplies every task by ``scaling_coeffs[0]`` after the masks; here task t
  is multiplied by its own ``weights[t]`` (the same thing when the weights are equal), and an entry of an adapter
  of weight 0 is not counted in the disjoint mean (the reference counts the non-zero weighted entries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt

from .. import _engine
from .._validate import check_seed
from ..errors import InputError, ParameterError
from .factors import Factors

__all__ = [
    "MERGES",
    "SV_CUT",
    "Cut",
    "canonical_signs",
    "check",
    "combine",
    "finish",
    "knots_merge",
    "merge_coefficients",
    "needs_majority",
    "needs_trim",
    "prepare",
    "shared_basis",
    "sign_balance",
]

#: the merges of the aligned coefficients (``merge=``)
MERGES = ("ties", "dare_ties", "dare_linear", "linear", "magnitude_prune")
#: singular values at or below this (absolute, float64) are dropped, as in the reference's ``apply_svd``
SV_CUT = 1e-5

_SIGNS = ("total", "frequency")
_F64 = npt.NDArray[np.float64]
_F32 = npt.NDArray[np.float32]


def knots_merge(
    factors: Sequence[Factors],
    weights: Sequence[float],
    *,
    merge: str = "ties",
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
    module: str = "",
    rank: int | None = None,
) -> Factors:
    """One module's adapters merged by KnOTS: ``factors[t]`` (ΔW_t = scale·b@a) with ``weights[t]``.

    ``merge``: one of ``MERGES``. ``density``: the fraction of each adapter's coefficients the ``ties`` /
    ``magnitude_prune`` trim keeps (1: no trim), or the DARE keep probability (``dare_*``, in (0, 1]).
    ``majority_sign``: ``total`` (sign of the sum) or ``frequency`` (sign of the count of signs). ``seed`` and
    ``module`` key the DARE masks. The result has ``scale`` 1, ``b`` with orthonormal columns and rank Σ rank_t
    (components beyond the shared basis' are zero), or, with ``rank``, the best rank-``rank`` approximation of the
    merged ΔW (``b`` carries the singular values, as PEFT's SVD types do).
    """
    check(factors, weights, merge, density, majority_sign, module)
    seed = check_seed(seed)
    u, coeffs = shared_basis(factors)
    merged = merge_coefficients(coeffs, [float(w) for w in weights], merge, float(density), majority_sign, seed, module)
    return finish(u, merged, sum(f.rank for f in factors), None if rank is None else _check_rank(rank))


def finish(u: _F32, merged: _F32, total: int, rank: int | None) -> Factors:
    """ΔW = ``u`` @ ``merged`` as factors: rank ``total`` (Σ of the inputs' ranks, zero-padded), or its best
    rank-``rank`` approximation."""
    if rank is not None:
        return _truncated(u, merged, rank)
    return Factors(a=_pad_rows(merged, total), b=_pad_rows(u.T, total).T.copy(), scale=1.0)


def shared_basis(factors: Sequence[Factors]) -> tuple[_F32, list[_F32]]:
    """The reference's ``apply_svd`` through the factors: U (out × r, float32) and each adapter's coefficients
    diag(s)·V_t (r × in, float32), r the number of singular values of [ΔW_1 | … | ΔW_T] above ``SV_CUT``."""
    out_dim, in_dim = factors[0].shape
    b_all = np.concatenate([np.asarray(f.b, dtype=np.float64) for f in factors], axis=1)
    r_b = cast(_F64, np.linalg.qr(b_all, mode="r"))  # B = Q·R_B, k × Σr; Q is never formed
    r_ts: list[_F64] = []
    core_cols: list[_F64] = []
    start = 0
    for f in factors:
        # scale_t·A_tᵀ = Q_t R_t: only R_t joins the core (Q_t's orthonormal columns leave U and s unchanged)
        r_t = cast(_F64, np.linalg.qr(np.asarray(f.a, dtype=np.float64).T * float(f.scale), mode="r"))
        core_cols.append(r_b[:, start:start + f.rank] @ r_t.T)
        r_ts.append(r_t)
        start += f.rank
    core = np.concatenate(core_cols, axis=1)
    _, s, vh = np.linalg.svd(core, full_matrices=False)
    keep = s > SV_CUT
    # U = C·V·diag(1/s), and ΔW_t·V_t = B_t·R_tᵀ·W_t (V_t = Q_t·W_t): one product with the stacked B
    w = vh[keep].T
    m = np.concatenate([r_t.T @ w[row:row + r_t.shape[0]] for r_t, row in zip(r_ts, _offsets(r_ts), strict=True)])
    u64 = (b_all @ m) / s[keep]
    u64 *= canonical_signs(u64)
    u = u64.astype(np.float32)
    # diag(s)·V_t = Uᵀ·ΔW_t = (Uᵀ·B_t)·(scale_t·A_t): exactly 0 for an adapter whose ΔW is 0, where V_t from the
    # SVD would hold rounding noise that the disjoint mean would count as entries
    coeffs: list[_F32] = []
    start = 0
    for f in factors:
        proj = u64.T @ b_all[:, start:start + f.rank]
        coeffs.append((proj @ (np.asarray(f.a, dtype=np.float64) * float(f.scale))).astype(np.float32).reshape(-1, in_dim))
        start += f.rank
    assert u.shape[0] == out_dim
    return u, coeffs


def _offsets(blocks: Sequence[_F64]) -> list[int]:
    """Where each block's rows start in their vertical stack."""
    out, row = [], 0
    for blk in blocks:
        out.append(row)
        row += blk.shape[0]
    return out


def canonical_signs(u: _F64) -> _F64:
    """±1 per column of ``u``: the sign that makes the column's largest |entry| (the first of equal ones) positive.

    An SVD fixes each component only up to its sign, and KnOTS is not invariant under it where the election has
    no majority (``frequency`` with as many signs each way, or an exact zero sum): the reference leaves the sign to
    LAPACK; here it is a function of ΔW alone, whatever path computed the SVD."""
    if u.shape[1] == 0:
        return np.ones(0)
    idx = np.argmax(np.abs(u), axis=0)
    return np.where(u[idx, np.arange(u.shape[1])] < 0, -1.0, 1.0)


def merge_coefficients(
    coeffs: Sequence[_F32],
    weights: Sequence[float],
    merge: str,
    density: float,
    majority_sign: str,
    seed: int,
    module: str,
) -> _F32:
    """The reference's masking and ``masked_merge`` over one module's coefficients (each r × in, float32), with
    that module's own statistics (the trim's cut, the zero-sign majority)."""
    xs = prepare(coeffs, merge, density, seed, module)
    cuts = None
    if needs_trim(merge, density):
        cuts = [Cut(density) for _ in xs]
        for cut, x in zip(cuts, xs, strict=True):
            cut.count(x)
            cut.locate()
            cut.refine(x)
            cut.finish()
    zero = int(np.sign(sign_balance(xs, cuts))) if needs_majority(merge, majority_sign) else 0
    return combine(xs, weights, merge, cuts, majority_sign, zero)


def needs_trim(merge: str, density: float) -> bool:
    """Whether ``merge`` trims by magnitude (a cut over each adapter's coefficients)."""
    return merge in ("ties", "magnitude_prune") and density < 1


def needs_majority(merge: str, majority_sign: str) -> bool:
    """Whether ``merge``'s election resolves zero sums by the majority of the elected signs."""
    return merge in ("ties", "dare_ties") and majority_sign == "total"


def prepare(coeffs: Sequence[_F32], merge: str, density: float, seed: int, module: str) -> list[_F32]:
    """The coefficients the masks and the merge see: after DARE's drop and rescale for the ``dare_*`` merges (adapter
    ``t`` of the module keyed by (seed, module, t)), as they are otherwise."""
    if merge in ("dare_ties", "dare_linear"):
        return [_dare(c, density, seed, module, t) for t, c in enumerate(coeffs)]
    return list(coeffs)


_HIGH, _LOW = 1 << 15, 1 << 16


def _abs_bits(x: _F32) -> npt.NDArray[np.uint32]:
    """|x|'s float32 bit patterns, which order like the magnitudes (no NaN here)."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32) & np.uint32(0x7FFF_FFFF)


class Cut:
    """The reference's trim of one adapter over all its coefficients: keep |x| ≥ the k-th smallest |x|,
    k = d − int(d·density) (``topk_values_mask``), d its coefficients over every module; density ≥ 1 keeps all.

    Found exactly without holding the coefficients (radix selection on |x|'s float32 bit patterns, which order like
    the magnitudes): ``count`` each module's (a histogram of the top 15 bits), ``locate`` the bin of the cut,
    ``refine`` with each module's again (a histogram of the low 16 bits inside that bin), ``finish``; then ``keep``
    says which entries are kept."""

    def __init__(self, density: float) -> None:
        self.density = density
        self.n = 0
        self.high = np.zeros(_HIGH, np.int64)
        self.low = np.zeros(0, np.int64)
        self.bin = 0
        #: the cut's rank from the top within its bin (0: no cut)
        self.rank = 0
        #: the cut's bit pattern (0 keeps everything)
        self.bits = 0

    def count(self, x: _F32) -> None:
        b = _abs_bits(x)
        self.n += b.size
        self.high += np.bincount(b >> np.uint32(16), minlength=_HIGH)

    def locate(self) -> None:
        if self.density >= 1 or self.n == 0:
            return
        # the k-th smallest of d is the (d − k + 1) = (int(d·density) + 1)-th largest
        rank = int(self.n * self.density) + 1
        above = np.cumsum(self.high[::-1])
        i = int(np.searchsorted(above, rank))
        self.bin = _HIGH - 1 - i
        self.rank = rank - (int(above[i - 1]) if i else 0)
        self.low = np.zeros(_LOW, np.int64)

    def refine(self, x: _F32) -> None:
        if self.rank == 0:
            return
        b = _abs_bits(x)
        self.low += np.bincount(b[(b >> np.uint32(16)) == self.bin] & np.uint32(0xFFFF), minlength=_LOW)

    def finish(self) -> None:
        if self.rank == 0:
            return
        i = int(np.searchsorted(np.cumsum(self.low[::-1]), self.rank))
        self.bits = (self.bin << 16) | (_LOW - 1 - i)

    def keep(self, x: _F32) -> npt.NDArray[np.bool_]:
        return (_abs_bits(x) >= np.uint32(self.bits)).reshape(np.shape(x))


def _trimmed(xs: Sequence[_F32], cuts: Sequence[Cut] | None) -> list[_F32]:
    if cuts is None:
        return list(xs)
    return [np.where(cut.keep(x), x, np.float32(0)) for x, cut in zip(xs, cuts, strict=True)]


def sign_balance(xs: Sequence[_F32], cuts: Sequence[Cut] | None) -> int:
    """(entries whose trimmed sum is > 0) − (those < 0): summed over modules, its sign is the reference's
    ``resolve_zero_signs`` majority (the sign of the sum of the elected signs)."""
    total = np.stack([x.reshape(-1) for x in _trimmed(xs, cuts)]).sum(axis=0, dtype=np.float32)
    return int(np.count_nonzero(total > 0)) - int(np.count_nonzero(total < 0))


def combine(xs: Sequence[_F32], weights: Sequence[float], merge: str, cuts: Sequence[Cut] | None,
            majority_sign: str, zero_sign: int) -> _F32:
    """One module's merge of its (``prepare``d) coefficients: the trim by ``cuts`` (None: none), then the election
    (a zero sum elects ``zero_sign``, for "total") and disjoint mean, or the weighted sum."""
    shape = xs[0].shape
    pruned = _trimmed(xs, cuts)
    x = np.stack([a.reshape(-1).astype(np.float64) for a in pruned])
    w = np.asarray(weights, dtype=np.float64)[:, None]
    if merge in ("linear", "dare_linear", "magnitude_prune"):
        return (w * x).sum(axis=0).astype(np.float32).reshape(shape)
    sign = _elect(np.stack([a.reshape(-1) for a in pruned]), majority_sign, zero_sign)
    agree = np.where(sign > 0, x > 0, x < 0) & (w != 0)
    count = agree.sum(axis=0)
    total = np.where(agree, w * x, 0.0).sum(axis=0)
    return (total / np.maximum(count, 1)).astype(np.float32).reshape(shape)


def _elect(x: _F32, majority_sign: str, zero_sign: int) -> npt.NDArray[np.float32]:
    """The elected sign per entry (1, -1, or 0 when nothing decides), from float32 sums as the reference's."""
    if majority_sign == "frequency":
        return np.sign(np.sign(x).sum(axis=0, dtype=np.float32))
    sign = np.sign(x.sum(axis=0, dtype=np.float32))
    sign[sign == 0] = np.float32(zero_sign)
    return sign


def _dare(c: _F32, density: float, seed: int, module: str, index: int) -> _F32:
    """Each entry kept with probability ``density`` and divided by it (the reference's ``apply_dare`` with
    p = 1 − density), the mask from the engine's generator keyed by (seed, module, index)."""
    if density >= 1 or c.size == 0:
        return c
    flat = np.ascontiguousarray(c, dtype=np.float32).reshape(-1)
    out = _engine.merge_arrays(
        {"name": "dare_linear", "normalize": False, "lambda": 1.0, "rescale": "inverse_density", "seed": seed},
        [flat], np.zeros(flat.size, np.float32), _engine.input_values([1.0], [density], model_ids=[index]),
        out_dtype="float32", name=module,
    )
    return np.asarray(out, dtype=np.float32).reshape(c.shape)


def _truncated(u: _F32, merged: _F32, rank: int) -> Factors:
    """The best rank-``rank`` factors of ΔW = u @ merged (u has orthonormal columns, so the SVD of ``merged``
    is ΔW's), padded with zeros when ΔW has a lower rank."""
    p, s, vt = np.linalg.svd(merged.astype(np.float64), full_matrices=False)
    k = min(rank, s.size)
    b = (u.astype(np.float64) @ (p[:, :k] * s[:k])).astype(np.float32)
    a = vt[:k].astype(np.float32)
    return Factors(a=_pad_rows(a, rank), b=_pad_rows(b.T, rank).T.copy(), scale=1.0)


def _pad_rows(x: npt.NDArray[np.float32], rows: int) -> _F32:
    if x.shape[0] >= rows:
        return np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((rows, x.shape[1]), np.float32)
    out[: x.shape[0]] = x
    return out


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ParameterError(f"knots: rank must be a positive integer, got {rank!r}")
    return int(rank)


def check(
    factors: Sequence[Factors],
    weights: Sequence[float],
    merge: str,
    density: float,
    majority_sign: str,
    module: str,
) -> None:
    where = f"{module}: " if module else ""
    if merge not in MERGES:
        raise ParameterError(f"knots: unknown merge {merge!r}; use one of {', '.join(MERGES)}")
    if majority_sign not in _SIGNS:
        raise ParameterError(f"knots: majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if not factors:
        raise ParameterError(f"{where}knots needs at least one adapter")
    if len(weights) != len(factors):
        raise ParameterError(f"{where}knots: {len(factors)} adapters but {len(weights)} weights")
    for t, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not math.isfinite(w):
            raise ParameterError(f"{where}knots: weight {t} must be a finite number, got {w!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float, np.integer, np.floating)) or not (
        0 <= density <= 1
    ):
        raise ParameterError(f"knots: density must be a number in [0, 1], got {density!r}")
    if merge.startswith("dare") and density == 0:
        raise ParameterError("knots: DARE with density 0 keeps nothing and divides by zero; use a density > 0")
    shape = factors[0].shape
    for t, f in enumerate(factors):
        if f.shape != shape:
            raise ParameterError(
                f"{where}knots: adapter {t} has ΔW of shape {list(f.shape)}, adapter 0 {list(shape)}; KnOTS aligns "
                "deltas of one shape"
            )
        if not (np.isfinite(f.a).all() and np.isfinite(f.b).all() and math.isfinite(f.scale)):
            raise InputError(f"{where}adapter {t}: NaN or infinite values in its LoRA factors")
