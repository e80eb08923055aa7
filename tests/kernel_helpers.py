"""Helpers shared by the kernel property suites (test_kernels, test_method_kernels, test_svd_kernels)."""

from __future__ import annotations

import numpy as np


def run_variants(call, variants):
    """Run ``call(chunk_elems, threads)`` for every variant; assert identical bytes; return the first output."""
    outs = [(c, t, call(c, t)) for c, t in variants]
    first = outs[0][2]
    for c, t, o in outs[1:]:
        assert o.dtype == first.dtype and o.shape == first.shape
        assert o.tobytes() == first.tobytes(), (
            f"output bytes differ: chunk_elems={outs[0][0]}, threads={outs[0][1]} vs chunk_elems={c}, threads={t}; "
            f"first differing element {int(np.flatnonzero(o.view(np.uint8) != first.view(np.uint8))[0]) // o.itemsize}"
        )
    return first
