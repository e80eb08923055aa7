"""Property tests of ``merge/methods/nearswap.rs`` in ``_core.merge_arrays`` against ``reference.nearswap``.

Every property checks that the output bytes are identical for every ``chunk_elems`` and thread count, and that the
decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a 16-bit output dtype
(``helpers.kernels``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import SETTINGS, check, merge, prepared, run_variants, shapes, variants
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import nearswap as nearswap_ref

_engine = pytest.importorskip("ferromerge._engine")


@settings(**SETTINGS)
@given(data=st.data())
def test_nearswap(data):
    shape = data.draw(shapes())
    t = data.draw(st.one_of(st.sampled_from([1e-4, 0.001, 0.01, 0.05, 1.0, 0.0, -0.5, 1e-7]), st.floats(0.0, 0.2)))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 1)
    expected = nearswap_ref.nearswap(bv, xv[0], t)

    def call(chunk, thr):
        return merge("nearswap", stored, base_s, shape=shape, params={"t": t}, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"nearswap t={t} shape={shape}")


def test_nearswap_weights():
    """w = clamp(t/|a − b|, 0, 1): close entries are swapped in, far ones stay; |a − b| is floored at 1e-6."""
    a = np.float32([0.0, 0.0, 0.0, 1.0, 5.0])
    b = np.float32([0.01, 0.5, 2.0, 1.0, 5.0 + 2**-20])
    out = merge("nearswap", [b], a, shape=[5], params={"t": 0.1})
    np.testing.assert_allclose(out, [0.01, 0.1, 0.1, 1.0, 5.0 + 2**-20], rtol=1e-6)
    np.testing.assert_array_equal(merge("nearswap", [b], a, shape=[5], params={"t": 0.0}), a)
    np.testing.assert_array_equal(merge("nearswap", [b], a, shape=[5], params={"t": -1.0}), a)
    np.testing.assert_array_equal(merge("nearswap", [b], a, shape=[5], params={"t": 10.0}), b)
