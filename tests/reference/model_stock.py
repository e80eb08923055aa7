"""Reference of ``merge/methods/model_stock.rs``: model_stock (base + >= 2 inputs, optionally per row).

Conventions (all method references): inputs are float32 values (already decoded from their storage dtype); task
vectors ``δ = x − b`` are formed in float32 (one IEEE subtraction, as any float32 implementation does), because
discrete decisions (ranks, masks, thresholds) depend on those exact values; continuous math runs in float64, so the
only difference from the engine is the engine's float32 rounding. Each function returns a ``Ref`` whose ``scale``
bounds the magnitude of the terms an element is computed from (amplified by any division), and whose ``ambiguous``
mask marks elements that a discontinuous decision could send either way under float32 rounding. Row-wise methods
take the tensor ``shape``: a row is the last dimension, a 1-D tensor is one row. Written from the math of mergekit
0.1.5 (docs/compat.md); none of it calls ferromerge.
"""

from __future__ import annotations

import numpy as np

from reference import arrays
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import Ref


def model_stock_t(base, xs, shape, filter_wise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation factor t per row ([rows]) and an ambiguity flag per row (|1+(N−1)cos| at its 1e-6 cutoff)."""
    n = arrays.f64(base).size
    offs = [task_arithmetic_ref.task_vector(x, base).astype(np.float64) for x in xs]
    offs = [arrays.rows(o, shape) if filter_wise else o.reshape(1, n) for o in offs]
    N = len(xs)
    cos = []
    for i in range(N):
        for j in range(i + 1, N):
            prod = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
            cos.append(np.clip((offs[i] * offs[j]).sum(-1) / np.maximum(prod, 1e-6), -1.0, 1.0))
    c = np.mean(np.stack(cos), axis=0)
    denom = 1.0 + (N - 1) * c
    singular = np.abs(denom) < 1e-6
    t = np.where(singular, 0.0, N * c / np.where(singular, 1.0, denom))
    amb = np.abs(np.abs(denom) - 1e-6) < 1e-9
    return t, amb


def model_stock(base, xs, shape, *, filter_wise: bool = False) -> Ref:
    """t·mean(xs) + (1 − t)·base with t = N·cos/(1 + (N−1)cos), cos = mean pairwise cosine of the task vectors."""
    b = arrays.f64(base)
    n = b.size
    t_rows, amb_rows = model_stock_t(base, xs, shape, filter_wise)
    row_len = n // t_rows.size
    t = np.repeat(t_rows, row_len)
    amb = np.repeat(amb_rows, row_len)
    X = np.stack([arrays.f64(x) for x in xs])
    avg = X.mean(0)
    out = t * avg + (1.0 - t) * b
    offs_abs = np.abs(X - b).mean(0)
    scale = np.abs(t) * (np.abs(X).mean(0) + offs_abs) + np.abs(1.0 - t) * np.abs(b) + np.abs(b)
    return Ref(out, scale, amb)
