"""Property tests of ``merge/methods/model_stock.rs`` in ``_core.merge_arrays`` against
``reference.model_stock``.

Every property checks that the output bytes are identical for every ``chunk_elems`` and thread count, and that the
decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a 16-bit output dtype
(``helpers.kernels``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import SETTINGS, check, make_data, merge, prepared, run_variants, shapes, variants
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import model_stock as model_stock_ref

_engine = pytest.importorskip("ferromerge._engine")


@settings(**SETTINGS)
@given(data=st.data())
def test_model_stock(data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(2, 4))
    filter_wise = data.draw(st.sampled_from([None, False, True]))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, n_models)
    expected = model_stock_ref.model_stock(bv, xv, shape, filter_wise=bool(filter_wise))
    assume(not expected.ambiguous.any())
    params = None if filter_wise is None else {"filter_wise": float(filter_wise)}

    def call(chunk, thr):
        return merge("model_stock", stored, base_s, shape=shape, params=params, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"model_stock n={n_models} filter_wise={filter_wise} shape={shape}")


def test_model_stock_identical_finetunes_and_unchanged_tensors():
    b, (x,) = make_data(7, (8, 13), 1, "near")
    # two identical fine-tunes: cos = 1, t = 1 -> the fine-tune
    got = merge("model_stock", [x, x], b, shape=b.shape)
    np.testing.assert_allclose(got, x.reshape(-1), rtol=1e-6, atol=1e-7)
    # fine-tunes equal to the base: zero offsets, cos = 0, t = 0 -> exactly the base
    np.testing.assert_array_equal(merge("model_stock", [b, b, b], b, shape=b.shape), b.reshape(-1))
    # orthogonal offsets: cos = 0 -> t = 0 -> the base
    base = np.ones((2, 6), np.float32)
    x1, x2 = base.copy(), base.copy()
    x1[0, 0] += 1.0
    x2[1, 3] -= 2.0
    np.testing.assert_array_equal(merge("model_stock", [x1, x2], base, shape=base.shape), base.reshape(-1))
    # filter_wise: in each row one of the two offsets is zero, so each row's cosine is 0 as well
    got = merge("model_stock", [x1, x2], base, shape=base.shape, params={"filter_wise": 1.0})
    np.testing.assert_array_equal(got, base.reshape(-1))
