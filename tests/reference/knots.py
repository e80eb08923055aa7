"""Reference of ``ferromerge.adapters.knots``: the KnOTS reference code (github.com/gstoica27/KnOTS at baa35e8,
``task_merger.SVDMerger.apply_svd`` / ``merge``, ``masking_ops.ties_masking`` / ``tv_masking`` / ``masked_merge``)
restated in NumPy for one LoRA-adapted layer, the literal way: the full out × T·in concatenation, one float64
``np.linalg.svd``, the float32 casts where the reference casts, then the masks and the merge on diag(s)·V_t.

Two things the reference takes from torch are inputs here: the DARE keep masks (``dare_masks``, one bool array per
task, shaped like its coefficients; the tests read them off the engine, whose generator cannot be torch's) and the
per-task weights (the reference multiplies every task by ``scaling_coeffs[0]``; ``weights[t]`` generalises it, and
equal weights are the reference exactly).

``knots`` also returns how close the discrete decisions were (``Margins``): the relative gap between the magnitudes
at the trim's cut and the smallest |Σ| / Σ|x| of a sign election, so that a test can skip inputs whose decisions
float rounding could flip (a different but equally valid SVD path rounds the coefficients differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SV_CUT = 1e-5


@dataclass
class Margins:
    #: smallest relative gap between the kept and the dropped magnitudes at a trim's cut (inf: no trim)
    trim: float = float("inf")
    #: smallest |Σ_t x_t| / Σ_t |x_t| over the entries whose election had something to decide (inf: none)
    sign: float = float("inf")
    #: smallest relative gap between consecutive kept singular values (a rotation within near-equal ones changes
    #: the coefficients entrywise), and of the smallest kept one above the cut
    spectrum: float = float("inf")
    #: ``sign_margin``: how clearly each component's sign convention is decided
    canonical: float = float("inf")


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """ΔW = scale · B A in float64 (the reference's ``LoRAHandler`` forms B @ A; the scale is the adapter's)."""
    return float(scale) * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def apply_svd(deltas: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``apply_svd`` with ``concat_across_output=True``: U (float32), each task's diag(s)·V_t (float32), and s
    (float64, the kept singular values)."""
    concat = np.concatenate([np.asarray(d, np.float64) for d in deltas], axis=1)
    u, s, v = np.linalg.svd(concat, full_matrices=False)
    keep = s > SV_CUT
    u, v = u[:, keep], v[keep]
    # the sign of each component, which the reference leaves to LAPACK: the column's largest |U| entry positive
    # (the convention ``knots.canonical_signs`` fixes; the choice matters only where an election has no majority)
    idx = np.argmax(np.abs(u), axis=0)
    flip = np.where(u[idx, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    u32 = (u * flip).astype(np.float32)
    v32 = (flip[:, None] * v).astype(np.float32)
    s32 = s[keep].astype(np.float32)
    width = v32.shape[1] // len(deltas)
    svs = [(s32[:, None] * v32[:, t * width:(t + 1) * width]).astype(np.float32) for t in range(len(deltas))]
    # an adapter whose ΔW is exactly 0 has coefficients 0 in exact arithmetic; the SVD leaves rounding noise there
    # (~1e-16·s_max), which the election and the disjoint mean would count: what LAPACK rounds decides, so the
    # restatement takes the exact value (the one thing it does not do literally)
    for t, d in enumerate(deltas):
        if not np.any(d):
            svs[t] = np.zeros_like(svs[t])
    return u32, svs, s[keep]


def sign_margin(deltas: Sequence[np.ndarray]) -> float:
    """The smallest relative gap, over the kept components, between U's two largest |entries| of a column (equal
    ones would let rounding pick another sign)."""
    concat = np.concatenate([np.asarray(d, np.float64) for d in deltas], axis=1)
    u, s, _ = np.linalg.svd(concat, full_matrices=False)
    u = np.abs(u[:, s > SV_CUT])
    if u.shape[1] == 0 or u.shape[0] < 2:
        return float("inf")
    top = -np.sort(-u, axis=0)
    return float(((top[0] - top[1]) / top[0]).min())


def topk_values_mask(x: np.ndarray, k_frac: float) -> tuple[np.ndarray, float]:
    """``topk_values_mask`` on one task's flattened vector: keep |x| >= the (d − int(d·K))-th smallest |x|
    (K ≥ 1 keeps all); and the relative gap at the cut."""
    if k_frac >= 1 or x.size == 0:
        return np.ones(x.shape, bool), float("inf")
    d = x.size
    k = d - int(d * k_frac)
    mags = np.sort(np.abs(x).reshape(-1))
    kth = mags[k - 1]
    below = mags[k - 2] if k >= 2 else -np.inf
    gap = float((kth - below) / kth) if kth > 0 and np.isfinite(below) else float("inf")
    return np.abs(x) >= kth, gap


def resolve_sign(stacked: np.ndarray, mode: str) -> tuple[np.ndarray, float]:
    """``resolve_sign``: ``sum_of_values`` (zero sums take the majority sign) or ``sum_of_signs``; and the margin."""
    if mode == "sum_of_signs":
        return np.sign(np.sign(stacked).sum(0)), float("inf")
    total = stacked.astype(np.float64).sum(0)
    mass = np.abs(stacked.astype(np.float64)).sum(0)
    decided = mass > 0
    margin = float((np.abs(total[decided]) / mass[decided]).min()) if decided.any() else float("inf")
    sign = np.sign(stacked.sum(0, dtype=np.float32))
    sign[sign == 0] = np.sign(sign.sum())
    return sign, margin


def knots(
    factors: Sequence[tuple[np.ndarray, np.ndarray, float]],
    weights: Sequence[float],
    merge: str,
    density: float,
    majority_sign: str = "total",
    dare_masks: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, int, Margins]:
    """The merged ΔW (float64 of the reference's float32 U @ merged), the basis' rank and the margins.

    ``factors``: (a, b, scale) per task. ``merge``: ties (topK = density, sum_of_values or sum_of_signs, mean),
    dare_ties (DARE with p = 1 − density, then the TIES election without a trim, topK 100, as every KnOTS-DARE
    config), dare_linear / magnitude_prune / linear (``tv_masking`` after DARE / with topK = density / none, then
    the weighted sum)."""
    margins = Margins()
    deltas = [delta(a, b, sc) for a, b, sc in factors]
    u, svs, s = apply_svd(deltas)
    margins.canonical = sign_margin(deltas)
    if s.size:
        rel = np.diff(s[::-1]) / s.max()  # consecutive gaps, relative to the largest
        margins.spectrum = float(min(rel.min() if rel.size else np.inf, (s.min() - SV_CUT) / s.max()))
    merged32 = merge_reps(svs, weights, merge, density, majority_sign, dare_masks, margins)
    out = u.astype(np.float64) @ merged32.astype(np.float64)  # reconstruct_merged_sd: U @ merged_sV
    return out, int(s.size), margins


def merge_reps(
    svs: Sequence[np.ndarray],
    weights: Sequence[float],
    merge: str,
    density: float,
    majority_sign: str = "total",
    dare_masks: Sequence[np.ndarray] | None = None,
    margins: Margins | None = None,
) -> np.ndarray:
    """``merge``'s masking and ``masked_merge`` over each task's float32 coefficients (``knots``' step 3)."""
    margins = Margins() if margins is None else margins
    reps = np.stack([sv.reshape(-1) for sv in svs])  # directions_to_reps: one row per task
    if merge in ("dare_ties", "dare_linear") and density < 1:
        assert dare_masks is not None
        keep = np.stack([np.asarray(m, bool).reshape(-1) for m in dare_masks])
        reps = (reps * keep * np.float32(1 / density)).astype(np.float32)
    mask = np.ones(reps.shape, bool)
    if merge in ("ties", "magnitude_prune"):
        for t in range(reps.shape[0]):
            mask[t], gap = topk_values_mask(reps[t], density)
            margins.trim = min(margins.trim, gap)
    pruned = reps * mask
    if merge in ("ties", "dare_ties"):
        mode = "sum_of_values" if majority_sign == "total" else "sum_of_signs"
        sign, margins.sign = resolve_sign(pruned, mode)
        agree = np.where(sign[None, :] > 0, pruned > 0, pruned < 0)
        mask = mask & agree
    w = np.asarray(weights, np.float64)[:, None]
    weighted = reps.astype(np.float64) * mask * w
    if merge in ("ties", "dare_ties"):
        count = (weighted != 0).sum(0)  # chunked_disjoint_mean: the non-zero weighted entries
        merged = np.where(count > 0, weighted.sum(0) / np.maximum(count, 1), 0.0)
    else:
        merged = weighted.sum(0)
    return merged.astype(np.float32).reshape(svs[0].shape)


def knots_layers(
    layers: Sequence[Sequence[tuple[np.ndarray, np.ndarray, float]]],
    weights: Sequence[float],
    merge: str,
    density: float,
    majority_sign: str = "total",
    dare_masks: Sequence[Sequence[np.ndarray]] | None = None,
) -> tuple[list[np.ndarray], Margins]:
    """The reference on several LoRA-adapted layers at once, as ``SVDMerger.merge`` runs a model: each layer's
    ``apply_svd``, then every task's coefficients over all layers flattened into one vector (``directions_to_reps``),
    one masking and ``masked_merge`` over those vectors (so the trim's cut and the zero-sign majority are global), cut
    back into layers, ΔW_l = U_l @ merged_l. ``layers[l]``: (a, b, scale) of every task (each task has every layer,
    as in the reference); ``dare_masks[l][t]``: task t's mask on layer l. Returns each layer's ΔW and the margins."""
    margins = Margins()
    us, svs_by_layer = [], []
    for factors in layers:
        deltas = [delta(a, b, sc) for a, b, sc in factors]
        u, svs, s = apply_svd(deltas)
        margins.canonical = min(margins.canonical, sign_margin(deltas))
        if s.size:
            rel = np.diff(s[::-1]) / s.max()
            margins.spectrum = min(margins.spectrum, float(min(rel.min() if rel.size else np.inf,
                                                               (s.min() - SV_CUT) / s.max())))
        us.append(u)
        svs_by_layer.append(svs)
    tasks = len(layers[0])
    reps = [np.concatenate([svs[t].reshape(-1) for svs in svs_by_layer]) for t in range(tasks)]
    masks = None
    if dare_masks is not None:
        masks = [np.concatenate([np.asarray(m[t]).reshape(-1) for m in dare_masks]) for t in range(tasks)]
    merged = merge_reps(reps, weights, merge, density, majority_sign, masks, margins)
    out, start = [], 0
    for u, svs in zip(us, svs_by_layer):
        n = svs[0].size
        out.append(u.astype(np.float64) @ merged[start:start + n].reshape(svs[0].shape).astype(np.float64))
        start += n
    return out, margins
