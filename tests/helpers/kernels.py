"""Helpers shared by the kernel property suites (test_kernels, test_method_kernels, test_svd_kernels)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import reference as ref

#: the storage dtypes the kernels read and write
dtypes = st.sampled_from(ref.DTYPES)


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


@st.composite
def io_dtypes(draw, n_inputs: int):
    """Storage dtypes of the inputs (all equal half the time), the output dtype and an optional cast dtype."""
    if draw(st.booleans()):
        ins = [draw(dtypes)] * n_inputs
    else:
        ins = draw(st.lists(dtypes, min_size=n_inputs, max_size=n_inputs))
    return ins, draw(dtypes), draw(st.one_of(st.none(), st.none(), dtypes))
