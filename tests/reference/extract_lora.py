"""Reference of ``ferromerge extract-lora``: the LoRA factors of a task vector by truncated SVD.
"""

from __future__ import annotations

import numpy as np

from reference import linalg


def lora_factors(delta, rank: int, distribute_scale: bool = True,
                 sv_epsilon: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """mergekit-extract-lora's split of a 2-D task vector into (A, B) with B @ A the rank-r truncation.

    r = min(rank, min(m, n)), then min(r, #(S > sv_epsilon)) only when sv_epsilon > 0 (mergekit; unlike
    ``svd_rank``, zero singular values are kept at sv_epsilon 0). ``distribute_scale``:
    A = diag(√S_r)·Vt_r (r×n), B = U_r·diag(√S_r) (m×r); otherwise A = diag(S_r)·Vt_r, B = U_r. Singular vectors
    have arbitrary signs, so compare B @ A, not the factors.
    """
    u, s, vt = linalg.thin_svd(delta)
    r = min(int(rank), s.size)
    if sv_epsilon > 0:
        r = min(r, int(np.count_nonzero(s > sv_epsilon)))
    u, s, vt = u[:, :r], s[:r], vt[:r, :]
    if distribute_scale:
        root = np.sqrt(s)
        return root[:, None] * vt, u * root[None, :]
    return s[:, None] * vt, u
