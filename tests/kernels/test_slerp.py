"""Property tests of ``merge/methods/slerp.rs`` (slerp, nuslerp, multislerp, karcher) in ``_core.merge_arrays``
against ``reference.slerp``.

Every property checks that the output bytes are identical for every ``chunk_elems`` and thread count, and that the
decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a 16-bit output dtype
(``helpers.kernels``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.kernels import (
    SETTINGS,
    check,
    dyadic_weights,
    make_data,
    merge,
    positive_weights,
    prepared,
    run_variants,
    shapes,
    variants,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import slerp as slerp_ref

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_slerp(data):
    shape = data.draw(shapes())
    t = data.draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.3, -0.2, 1.3]), st.floats(0.0, 1.0)))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 1, kinds=("near", "far", "grid", "anti"))
    expected = slerp_ref.slerp(bv, xv[0], t)
    assume(not expected.ambiguous.any())

    def call(chunk, thr):
        return merge("slerp", stored, base_s, shape=shape, params={"t": t}, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"slerp t={t} shape={shape} cast={cast}")


def test_slerp_endpoints_and_antipodal():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(13, 7)).astype(np.float32)
    x = rng.normal(size=(13, 7)).astype(np.float32)
    assert abs(slerp_ref.slerp_coefficients(b, x, 0.5)[2]) < 0.9  # the spherical branch
    out0 = merge("slerp", [x], b, shape=b.shape, params={"t": 0.0})
    np.testing.assert_allclose(out0, b.reshape(-1), rtol=1e-6, atol=1e-7)
    out1 = merge("slerp", [x], b, shape=b.shape, params={"t": 1.0})
    np.testing.assert_allclose(out1, x.reshape(-1), rtol=1e-6, atol=1e-7)
    # antipodal: |cos| = 1 > 0.9995 -> lerp, (1 − t)·b + t·(−2b) at t = 0.25 is 0.25·b
    out = merge("slerp", [-2 * b], b, shape=b.shape, params={"t": 0.25})
    np.testing.assert_allclose(out, 0.25 * b.reshape(-1), rtol=1e-6, atol=1e-7)
    # a zero base has its norm replaced by 1: cos = 0, θ = π/2, coefficients sin((1 − t)π/2), sin(tπ/2)
    out = merge("slerp", [x], np.zeros_like(b), shape=b.shape, params={"t": 0.5})
    np.testing.assert_allclose(out, math.sin(math.pi / 4) * x.reshape(-1), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# nuslerp
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_nuslerp(data):
    shape = data.draw(shapes(three_d=True))
    with_base = data.draw(st.booleans())
    row_wise = data.draw(st.booleans())
    flatten = data.draw(st.booleans())
    weights = data.draw(st.one_of(st.lists(positive_weights, min_size=2, max_size=2),
                                  st.lists(dyadic_weights, min_size=2, max_size=2)))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 2, with_base=with_base)
    expected = slerp_ref.nuslerp(bv, xv[0], xv[1], weights[0], weights[1], shape, row_wise=row_wise, flatten=flatten)
    params = {"nuslerp_row_wise": float(row_wise), "nuslerp_flatten": float(flatten)}

    def call(chunk, thr):
        return merge("nuslerp", stored, base_s, shape=shape, weights=weights, params=params, out_dtype=out_dtype,
                     cast=cast, threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"nuslerp w={weights} base={with_base} row_wise={row_wise} flatten={flatten} "
                                    f"shape={shape}", max_ambiguous=0.5)


def test_nuslerp_defaults_row_wise_columns_and_zero_weight_sum():
    rng = np.random.default_rng(2)
    shape = (5, 8)
    b, (x0, x1) = make_data(3, shape, 2, "far")
    # defaults: flatten = 1, row_wise = 0
    got = merge("nuslerp", [x0, x1], b, shape=shape, weights=[0.3, 0.9])
    np.testing.assert_allclose(got, slerp_ref.nuslerp(b, x0, x1, 0.3, 0.9, shape).out, rtol=1e-5, atol=1e-6)
    # row_wise: vectors are the columns: a column-permuted input gives the column-permuted output
    p = rng.permutation(shape[1])
    kw = dict(shape=shape, weights=[0.3, 0.9], params={"nuslerp_flatten": 0.0, "nuslerp_row_wise": 1.0})
    got = merge("nuslerp", [x0, x1], b, **kw).reshape(shape)
    got_p = merge("nuslerp", [np.ascontiguousarray(x0[:, p]), np.ascontiguousarray(x1[:, p])],
                  np.ascontiguousarray(b[:, p]), **kw).reshape(shape)
    np.testing.assert_array_equal(got[:, p], got_p)
    # weights summing to zero: t = 0.5
    got = merge("nuslerp", [x0, x1], None, shape=shape, weights=[-0.5, 0.5])
    np.testing.assert_allclose(got, slerp_ref.nuslerp(None, x0, x1, 0.5, 0.5, shape).out, rtol=1e-5, atol=1e-6)


def test_nuslerp_identical_and_antipodal_task_vectors():
    b, (x,) = make_data(4, (6, 11), 1, "grid")  # grid: 2b − x is exact, so its task vector is exactly −δ
    got = merge("nuslerp", [x, x], b, shape=b.shape, weights=[1.0, 3.0])
    np.testing.assert_allclose(got, x.reshape(-1), rtol=1e-6, atol=1e-6)
    # δ and −δ with equal weights: both the lerp and the slerp branch give 0, so the base comes back
    anti = (2 * b - x).astype(np.float32)
    for flatten in (0.0, 1.0):
        got = merge("nuslerp", [x, anti], b, shape=b.shape, weights=[1.0, 1.0], params={"nuslerp_flatten": flatten})
        np.testing.assert_allclose(got, b.reshape(-1), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# multislerp
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_multislerp(data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 4))
    with_base = data.draw(st.booleans())
    normalize_weights = data.draw(st.booleans())
    eps = data.draw(st.sampled_from([None, 1e-8, 1e-6]))
    weights = data.draw(st.one_of(st.lists(positive_weights, min_size=n_models, max_size=n_models),
                                  st.lists(dyadic_weights, min_size=n_models, max_size=n_models)))
    if normalize_weights:  # the weights are divided by their sum: keep it away from 0
        assume(abs(sum(weights)) >= 0.25)
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, n_models, with_base=with_base,
                                                       zero_fracs=(0.0, 0.1))
    try:
        expected = slerp_ref.multislerp(bv, xv, weights, normalize_weights=normalize_weights,
                                 eps=1e-8 if eps is None else eps)
    except slerp_ref.MultislerpError:
        assume(False)
    assume(not expected.ambiguous.any())
    params = {"normalize_weights": float(normalize_weights)}
    if eps is not None:
        params["eps"] = eps

    def call(chunk, thr):
        return merge("multislerp", stored, base_s, shape=shape, weights=weights, params=params, out_dtype=out_dtype,
                     cast=cast, threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"multislerp w={weights} base={with_base} normalize_weights={normalize_weights} "
                                    f"eps={eps} shape={shape}")


def test_multislerp_single_input_is_returned_and_antipodal_pair_falls_back_to_lerp():
    b, (x, y) = make_data(5, (9, 10), 2, "grid")  # grid: 2b − x is exact, so its task vector is exactly −δ
    np.testing.assert_array_equal(merge("multislerp", [x], b, shape=b.shape, weights=[0.7]), x.reshape(-1))
    # antipodal task vectors, equal weights: the weighted mean of the unit vectors is 0 -> linear fallback -> base
    anti = (2 * b - x).astype(np.float32)
    got = merge("multislerp", [x, anti], b, shape=b.shape, weights=[1.0, 1.0])
    np.testing.assert_allclose(got, b.reshape(-1), rtol=0, atol=1e-6)
    # identical inputs without base: the result is the input (cos(eps) and ‖x‖/(‖x‖+eps) are 1 in float32)
    got = merge("multislerp", [y, y, y], None, shape=b.shape, weights=[1.0, 2.0, 0.5])
    np.testing.assert_allclose(got, y.reshape(-1), rtol=1e-6, atol=1e-7)


def test_multislerp_balanced_antipodal_triple_is_an_error():
    """mergekit raises ValueError when the weighted mean of three or more unit vectors is zero."""
    x = np.float32([1.0, -2.0, 0.5, 3.0])
    with pytest.raises(errors.MergeError):
        merge("multislerp", [x, -x, x], None, shape=[4], weights=[0.5, 1.0, 0.5])


# ----------------------------------------------------------------------------------------------------------------
# karcher
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_karcher(data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 5))
    max_iter = data.draw(st.sampled_from([None, 0, 1, 2, 3, 10, 50]))
    tol = data.draw(st.sampled_from([None, 1e-5, 1e-3, 1e-7]))
    _, stored, _, xv, out_dtype, cast = prepared(data, shape, n_models, kinds=("near", "far"), zero_fracs=(0.0, 0.1),
                                                 with_base=False)
    expected = slerp_ref.karcher(xv, max_iter=10 if max_iter is None else max_iter, tol=1e-5 if tol is None else tol)
    assume(not expected.ambiguous.any())
    params = {}
    if max_iter is not None:
        params["max_iter"] = float(max_iter)
    if tol is not None:
        params["tol"] = tol

    def call(chunk, thr):
        return merge("karcher", stored, None, shape=shape, params=params, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"karcher n={n_models} max_iter={max_iter} tol={tol} shape={shape}")


def test_karcher_identical_antipodal_and_zero_inputs():
    _, (x, y) = make_data(6, (7, 9), 2, "far")
    shape = x.shape
    # identical inputs: the mean direction is theirs, the mean norm theirs
    np.testing.assert_allclose(merge("karcher", [x, x, x], None, shape=shape), x.reshape(-1), rtol=1e-6, atol=1e-6)
    # antipodal pair: the weighted mean is 0, so the first input's direction is the start and stays (θ = π has no
    # tangent); the scale is the mean norm
    np.testing.assert_allclose(merge("karcher", [x, -x], None, shape=shape), x.reshape(-1), rtol=1e-6, atol=1e-6)
    # a zero input has no direction but counts in the mean norm (1/N each)
    got = merge("karcher", [y, np.zeros_like(y)], None, shape=shape)
    np.testing.assert_allclose(got, 0.5 * y.reshape(-1), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(merge("karcher", [np.zeros_like(y)] * 2, None, shape=shape), 0)
