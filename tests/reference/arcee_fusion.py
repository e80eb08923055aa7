"""Reference of ``merge/methods/arcee_fusion.rs``: arcee_fusion (per-row importance, exact or sampled quantiles).

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

ARCEE_QUANTILES = (0.25, 0.5, 0.75)


def arcee_importance(base, x, shape) -> tuple[np.ndarray, np.ndarray]:
    """(importance |b − a|·KL(softmax(b)+1e-8 ‖ softmax(a)+1e-8) per element, its float32 error bound).

    The KL divergence is per row (last dim); a is the base. The bound covers a float32 evaluation as mergekit's:
    p and q each carry a relative error of a few eps32 (exp, row sum, division), so log(p/q) is off by a few eps32
    absolute; those errors are independent between elements, and the p-weighted sum stays within ~4·eps32 of the
    true KL (plus a relative error of the terms).
    """
    a = arrays.rows(arrays.f64(base), shape)
    b = arrays.rows(arrays.f64(x), shape)
    d = np.abs(arrays.rows(task_arithmetic_ref.task_vector(x, base).astype(np.float64), shape))

    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(b) + 1e-8
    q = softmax(a) + 1e-8
    lp, lq = np.log(p), np.log(q)
    kl = (p * (lp - lq)).sum(-1, keepdims=True)
    kl_err = 4.0 * arrays.EPS32 * (1.0 + (p * np.abs(lp - lq)).sum(-1, keepdims=True))
    if a.shape[-1] == 1:  # one-element rows: both softmaxes are exactly 1 in any arithmetic, KL exactly 0
        kl_err[:] = 0.0
    imp = d * kl
    err = d * kl_err + 4.0 * arrays.EPS32 * np.abs(imp)
    return imp.reshape(-1), err.reshape(-1)


def arcee_threshold(imp: np.ndarray) -> float:
    """median + 1.5·(q3 − q1) with exact quantiles: the sorted value at index floor(q·(n − 1))."""
    s = np.sort(np.asarray(imp, dtype=np.float64).reshape(-1))
    n = s.size
    q1, med, q3 = (s[int(np.float32(q) * np.float32(n - 1))] for q in ARCEE_QUANTILES)
    return float(med + 1.5 * (q3 - q1))


def arcee_fusion(base, x, shape) -> tuple[Ref, np.ndarray]:
    """(result a + (b − a)·[imp >= thr], the exact-quantile keep mask). Elements whose importance lies within the
    float32 error window of the threshold are ambiguous unless b == a there (then the mask does not matter)."""
    a = arrays.f64(base)
    delta = task_arithmetic_ref.task_vector(x, base).astype(np.float64)
    imp, err = arcee_importance(base, x, shape)
    thr = arcee_threshold(imp)
    keep = imp >= thr
    out = a + np.where(keep, delta, 0.0)
    # the threshold moves by at most the errors of the order statistics it is made of (twice, for neighbours that
    # could swap into those positions)
    e = err[np.argsort(imp, kind="stable")]
    i1, im, i3 = (int(np.float32(q) * np.float32(imp.size - 1)) for q in ARCEE_QUANTILES)
    thr_err = 2.0 * (e[im] + 1.5 * (e[i3] + e[i1])) if imp.size else 0.0
    window = err + thr_err
    amb = (np.abs(imp - thr) <= window) & (window > 0) & (delta != 0)
    scale = np.abs(a) + np.abs(delta) + np.abs(arrays.f64(x))
    return Ref(out, scale, amb), keep
