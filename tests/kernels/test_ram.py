"""Property tests of ``merge/methods/ram.rs`` (ram, ramplus_tl) in ``_core.merge_arrays`` against
``reference.ram``.

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
from reference import ram as ram_ref
from reference.result import assert_matches

_engine = pytest.importorskip("ferromerge._engine")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@settings(**SETTINGS)
@given(data=st.data())
def test_ram(method, data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 4))
    # (epsilon 0 is left out: a model with no active entries gives ρ = 0/0, NaN in mergekit)
    epsilon = data.draw(st.sampled_from([None, 1e-5, 2.0**-7, 0.02, 2.0**-5, 0.1]))
    r = data.draw(st.sampled_from([None, 0.1, 0.5, 2.0]))
    alpha = data.draw(st.sampled_from([None, 0.2, 0.0, 1.0, 5.0]))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, n_models, kinds=("near", "grid"),
                                                       zero_fracs=(0.0, 0.3, 0.6))
    eps = 1e-5 if epsilon is None else epsilon
    params = {} if epsilon is None else {"epsilon": epsilon}
    if method == "ram":
        expected = ram_ref.ram(bv, xv, epsilon=eps)
    else:
        if r is not None:
            params["r"] = r
        if alpha is not None:
            params["alpha"] = alpha
        expected = ram_ref.ramplus_tl(bv, xv, epsilon=eps, r=0.1 if r is None else r,
                                      alpha=0.2 if alpha is None else alpha)

    def call(chunk, thr):
        return merge(method, stored, base_s, shape=shape, params=params or None, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"{method} n={n_models} params={params} shape={shape}")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_epsilon_threshold_is_strict_in_float32(method):
    """|δ| > epsilon with epsilon rounded to float32 (mergekit compares a float32 tensor with a Python float):
    |δ| = float32(0.1), which is above 0.1 in float64, is not active; the next float32 up is."""
    e32 = np.float32(0.1)
    up, down = np.nextafter(e32, np.float32(1)), np.nextafter(e32, np.float32(0))
    d = np.float32([e32, -e32, up, -up, down, 0.0])
    out = merge(method, [d], np.zeros(6, np.float32), shape=[6], params={"epsilon": 0.1})
    # one model: every active entry is unique, and ramplus_tl's λ is 1 + r·clamp(0/2, 0, alpha) = 1
    np.testing.assert_array_equal(out, np.float32([0, 0, up, -up, 0, 0]))
    assert_matches(out, getattr(ram_ref, method)(np.zeros(6, np.float32), [d], epsilon=0.1), "float32", context=method)


def test_ram_unique_and_shared_and_ramplus_lambda():
    """Unique deltas pass through, shared ones are averaged; ramplus_tl scales model i's unique part by
    1 + r·clamp(shared_i/unique_i, 0, alpha)."""
    b = np.zeros(6, np.float32)
    x1 = np.float32([1.0, 0.0, 2.0, 4.0, 0.0, 1e-6])
    x2 = np.float32([0.0, 3.0, 4.0, -2.0, 0.0, 1e-6])
    np.testing.assert_array_equal(merge("ram", [x1, x2], b, shape=[6]), np.float32([1, 3, 3, 1, 0, 0]))
    # model 1: 2 shared, 1 unique -> ρ = 2, λ = 1 + 0.5·min(2, 0.3) = 1.15; model 2 likewise (2 shared, 1 unique)
    out = merge("ramplus_tl", [x1, x2], b, shape=[6], params={"r": 0.5, "alpha": 0.3})
    np.testing.assert_allclose(out, [1.15, 3 * 1.15, 3, 1, 0, 0], rtol=1e-6)
    # a model with no unique entries: ρ = shared/epsilon, clamped to alpha
    out = merge("ramplus_tl", [x1, x1], b, shape=[6], params={"r": 0.5, "alpha": 0.3})
    np.testing.assert_allclose(out, [1, 0, 2, 4, 0, 0], rtol=1e-6)
