"""Reference of ``rust/core/src/kernels/disjoint.rs`` (``_core.disjoint_mean``): PEFT 0.21's TIES sign election and
disjoint mean (``peft/utils/merge_utils.py``: ``calculate_majority_sign_mask`` + ``disjoint_merge``) in float32
NumPy, with the kernel's operations in its order, so the two agree bit for bit.

The sign is elected on the unweighted tensors: + where the score (Σ x_i for "total", Σ sign(x_i) for "frequency",
accumulated input by input from +0) is ≥ 0; x_i agrees where its sign is the elected one (a zero never does);
out = Σ_{agreeing} x_i·float32(w_i) / max(count, 1), the sum accumulated input by input (+0 for a disagreeing one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def disjoint_mean(xs: Sequence[np.ndarray], weights: Sequence[float], majority_sign: str) -> np.ndarray:
    flat = [np.asarray(x, np.float32).reshape(-1) for x in xs]
    score = np.zeros(flat[0].size, np.float32)
    for p in flat:
        score += p if majority_sign == "total" else np.sign(p)
    positive = score >= 0
    total = np.zeros_like(score)
    count = np.zeros_like(score)
    for p, w in zip(flat, weights, strict=True):
        agree = np.where(positive, p > 0, p < 0)
        total += np.where(agree, p * np.float32(w), np.float32(0))
        count += agree
    return (total / np.maximum(count, np.float32(1))).reshape(np.shape(xs[0]))
