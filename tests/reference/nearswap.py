"""Reference of ``merge/methods/nearswap.rs``: nearswap.

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


def nearswap(base, x, t: float) -> Ref:
    """w = clamp(t / max(|a − b|, 1e-6), 0, 1); out = w·b + (1 − w)·a, with a the base and b the other input."""
    a, b = arrays.f64(base), arrays.f64(x)
    d = np.abs(task_arithmetic_ref.task_vector(x, base).astype(np.float64))
    w = np.clip(t / np.maximum(d, 1e-6), 0.0, 1.0)
    out = w * b + (1.0 - w) * a
    return Ref(out, np.abs(a) + np.abs(w * b) + np.abs((1.0 - w) * a) + w * d, arrays.none_ambiguous(a.size))
