"""References of ``merge/methods/tall.rs``: consensus and tall_masks (elementwise, exact float64 task vectors).

Conventions: inputs are float32 values (already decoded); the task vectors ``tau = x - b`` are formed exactly in
float64 (``arrays.exact_task_vectors``), so the masks are exact and only elements within rounding of a mask threshold
are left open (``tall_mask_ambiguous``). Each method takes the base and the list of non-base models as full tensors
of any ndim (elementwise, so every tensor is treated alike) and returns theta in float64 with the base's shape.
Written from the authors' code (nik-dim/tall_masks, src/utils/tallmask_utils.py); never calls ferromerge.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reference import arrays


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
    return arrays.merged_theta(base, consensus_tau(arrays.exact_task_vectors(base, xs), k, tall_mask_lambda), lam)


def tall_masks(base, xs: Sequence, task: int, tall_mask_lambda: float = 0.4) -> np.ndarray:
    """Task ``task``'s (0-based among the non-base models) reconstruction base + m_task ⊙ tau_MTL (scale 1)."""
    taus = arrays.exact_task_vectors(base, xs)
    if not 0 <= task < len(taus):
        raise ValueError(f"task {task} out of range for {len(taus)} models")
    mask = tall_mask_list(taus, tall_mask_lambda)[task]
    return arrays.merged_theta(base, np.where(mask, np.sum(np.stack(taus), axis=0), 0.0), 1.0)
