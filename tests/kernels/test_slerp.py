"""Property tests: the kernels of slerp, nuslerp, multislerp, karcher, model_stock, breadcrumbs(_ties), della(_linear),
sce, ram, ramplus_tl, nearswap and arcee_fusion in ``_core.merge_arrays`` against ``reference_methods.py``.

Every property checks that the output bytes are identical for every ``chunk_elems`` and thread count, and that the
decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a 16-bit output dtype.
``rtol`` is 1e-5 (about 80 float32 epsilons): the engine does float32 element math with float64 dot products, the
reference float64 throughout, and ``scale`` already carries each method's amplification (1/sinθ, 1/‖mean‖, t of
model_stock, divisors); the references themselves agree with mergekit's float32 torch code to 3e-6 of ``scale``.
Elements a reference marks ambiguous (a discontinuous decision within rounding of its threshold) are skipped, and
must stay rare. Selection masks (breadcrumbs, sce) are compared exactly; the random della masks statistically and
through the values they select.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import reference as ref
import reference_methods as rm
from kernel_helpers import io_dtypes, run_variants

_core = pytest.importorskip("ferromerge._core")

SETTINGS = dict(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.filter_too_much])
RTOL = 1e-5
OUT_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}

# ----------------------------------------------------------------------------------------------------------------
# strategies and helpers
# ----------------------------------------------------------------------------------------------------------------

dtypes = st.sampled_from(ref.DTYPES)
chunk_sizes = st.one_of(st.integers(1, 64), st.sampled_from([None, 97, 1000, 4096, 5000]))
threads = st.sampled_from([1, 2, 3])
positive_weights = st.floats(0.05, 2.0, allow_nan=False, allow_infinity=False)
dyadic_weights = st.integers(-32, 32).map(lambda i: i / 16)


@st.composite
def shapes(draw, three_d: bool = False):
    kinds = ["one", "small", "odd2d", "large", "rows"] + (["3d"] if three_d else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "one":
        return draw(st.sampled_from([(1,), (1, 1)]))
    if kind == "small":
        return (draw(st.integers(2, 70)),)
    if kind == "odd2d":
        return (draw(st.integers(1, 40)), draw(st.integers(1, 41)))
    if kind == "large":
        return (draw(st.integers(300, 3100)),)
    if kind == "rows":  # several chunks per row with small chunk_elems
        return (draw(st.integers(2, 9)), draw(st.integers(100, 400)))
    return (draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 7)))


@st.composite
def variants(draw):
    v = [(None, 1)]
    v += draw(st.lists(st.tuples(chunk_sizes, threads), min_size=2, max_size=3))
    return v


def make_data(seed: int, shape, n_models: int, kind: str, zero_frac: float = 0.0):
    """float32 base and inputs. ``near``: fine-tunes, base + N(0, 0.05·s) deltas; ``far``: independent N(0, 1)
    inputs (directions spread over the sphere); ``ft``: like ``near`` without the smallest deltas; ``grid``: base on a 1/8 grid and deltas on a 1/64 grid (exact in
    every dtype, many exact ties); ``anti``: inputs −c·base with c in {0.5, 1, 2}, exactly antipodal to the base in
    every dtype (power-of-two scaling commutes with rounding). ``zero_frac`` of each delta is exactly zero."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if kind == "grid":
        base = rng.integers(-16, 17, n) / 8.0
        deltas = [rng.integers(-8, 9, n) / 64.0 for _ in range(n_models)]
    elif kind == "anti":
        base = rng.normal(0.0, 1.0, n)
        deltas = [-(1.0 + rng.choice([0.5, 1.0, 2.0])) * base for _ in range(n_models)]
        zero_frac = 0.0
    elif kind == "far":
        base = rng.normal(0.0, 1.0, n)
        deltas = [rng.normal(0.0, 1.0, n) - base for _ in range(n_models)]
    else:
        base = rng.normal(0.0, 1.0, n)
        scales = [1.0, 3.0] if kind == "ft" else [1.0, 0.1, 3.0]
        deltas = [rng.normal(0.0, 0.05, n) * rng.choice(scales) for _ in range(n_models)]
    xs = []
    for d in deltas:
        d = np.where(rng.random(n) < zero_frac, 0.0, d)
        xs.append((base + d).astype(np.float32).reshape(shape))
    return base.astype(np.float32).reshape(shape), xs


def store(x32, dtype):
    return ref.encode(np.asarray(x32, np.float32).reshape(-1), dtype).reshape(np.shape(x32))


def values(a, dtype, cast=None):
    """Storage array -> the float32 values the kernel computes with (after the cast dtype's rounding)."""
    return ref.round_to(ref.decode(np.asarray(a).reshape(-1), dtype), cast).reshape(np.shape(a))


def merge(method, inputs, base, *, shape, weights=None, densities=None, params=None, gammas=None, epsilons=None,
          out_dtype="float32", normalize=False, lam=1.0, rescale="none", cast=None, seed=0, name="t",
          model_ids=None, threads=None, chunk=None):
    k = len(inputs)
    return _core.merge_arrays(
        method, inputs, base, list(weights) if weights is not None else [1.0] * k,
        list(densities) if densities is not None else [1.0] * k, out_dtype=out_dtype, normalize=normalize,
        cast_dtype=cast, lambda_=lam, rescale=rescale, seed=seed, name=name, model_ids=model_ids, threads=threads,
        chunk_elems=chunk, shape=list(shape) if shape is not None else None, params=params, gammas=gammas,
        epsilons=epsilons,
    )




def check(out, expected: ref.Ref, out_dtype: str, context: str, max_ambiguous: float = 0.25):
    assert out.dtype == OUT_STORAGE[out_dtype], (out.dtype, out_dtype)
    assert out.size == expected.out.size
    ref.assert_matches(ref.decode(out, out_dtype), expected, out_dtype, rtol=RTOL, context=context)
    # excluded elements must stay rare, or the comparison would be vacuous
    assert expected.ambiguous.mean() <= max_ambiguous or expected.out.size < 8, (
        f"{context}: {expected.ambiguous.mean():.0%} of the elements are ambiguous")


def prepared(data, shape, n_models, kinds=("near", "far", "grid"), zero_fracs=(0.0, 0.1, 0.5), with_base=True):
    """Draw data and dtypes; returns (stored base or None, stored inputs, base values, input values, out dtype, cast)."""
    kind = data.draw(st.sampled_from(kinds))
    zf = data.draw(st.sampled_from(zero_fracs))
    base32, xs32 = make_data(data.draw(st.integers(0, 2**31)), shape, n_models, kind, zf)
    ins, out_dtype, cast = data.draw(io_dtypes(n_models + 1))
    base_s = store(base32, ins[0]) if with_base else None
    stored = [store(x, dt) for x, dt in zip(xs32, ins[1:])]
    bv = values(base_s, ins[0], cast).reshape(-1) if with_base else None
    xv = [values(s, dt, cast).reshape(-1) for s, dt in zip(stored, ins[1:])]
    return base_s, stored, bv, xv, out_dtype, cast


# ----------------------------------------------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_slerp(data):
    shape = data.draw(shapes())
    t = data.draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.3, -0.2, 1.3]), st.floats(0.0, 1.0)))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 1, kinds=("near", "far", "grid", "anti"))
    expected = rm.slerp(bv, xv[0], t)
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
    assert abs(rm.slerp_coefficients(b, x, 0.5)[2]) < 0.9  # the spherical branch
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
    expected = rm.nuslerp(bv, xv[0], xv[1], weights[0], weights[1], shape, row_wise=row_wise, flatten=flatten)
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
    np.testing.assert_allclose(got, rm.nuslerp(b, x0, x1, 0.3, 0.9, shape).out, rtol=1e-5, atol=1e-6)
    # row_wise: vectors are the columns: a column-permuted input gives the column-permuted output
    p = rng.permutation(shape[1])
    kw = dict(shape=shape, weights=[0.3, 0.9], params={"nuslerp_flatten": 0.0, "nuslerp_row_wise": 1.0})
    got = merge("nuslerp", [x0, x1], b, **kw).reshape(shape)
    got_p = merge("nuslerp", [np.ascontiguousarray(x0[:, p]), np.ascontiguousarray(x1[:, p])],
                  np.ascontiguousarray(b[:, p]), **kw).reshape(shape)
    np.testing.assert_array_equal(got[:, p], got_p)
    # weights summing to zero: t = 0.5
    got = merge("nuslerp", [x0, x1], None, shape=shape, weights=[-0.5, 0.5])
    np.testing.assert_allclose(got, rm.nuslerp(None, x0, x1, 0.5, 0.5, shape).out, rtol=1e-5, atol=1e-6)


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
        expected = rm.multislerp(bv, xv, weights, normalize_weights=normalize_weights,
                                 eps=1e-8 if eps is None else eps)
    except rm.MultislerpError:
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
    with pytest.raises(_core.MergeError):
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
    expected = rm.karcher(xv, max_iter=10 if max_iter is None else max_iter, tol=1e-5 if tol is None else tol)
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


# ----------------------------------------------------------------------------------------------------------------
# model_stock
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_model_stock(data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(2, 4))
    filter_wise = data.draw(st.sampled_from([None, False, True]))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, n_models)
    expected = rm.model_stock(bv, xv, shape, filter_wise=bool(filter_wise))
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


# ----------------------------------------------------------------------------------------------------------------
# breadcrumbs / breadcrumbs_ties
# ----------------------------------------------------------------------------------------------------------------

densities = st.one_of(st.sampled_from([1.0, 0.5, 0.7, 0.29, 0.57, 0.1, 0.9, 0.999, 0.01]),
                      st.floats(0.001, 1.0, allow_nan=False))
gammas = st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.6]), st.floats(0.0, 0.9, allow_nan=False))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@settings(**SETTINGS)
@given(data=st.data())
def test_breadcrumbs(method, data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 4))
    weights = data.draw(st.one_of(st.lists(positive_weights, min_size=n_models, max_size=n_models),
                                  st.lists(dyadic_weights, min_size=n_models, max_size=n_models)))
    dens = data.draw(st.lists(densities, min_size=n_models, max_size=n_models))
    gams = data.draw(st.lists(gammas, min_size=n_models, max_size=n_models))
    per_row = data.draw(st.sampled_from([None, False, True]))
    normalize = data.draw(st.booleans())
    lam = data.draw(st.sampled_from([1.0, 0.5, -1.0, 1.7]))
    rescale = data.draw(st.sampled_from(["none", "l1", "inverse_density"]))
    if rescale == "inverse_density":  # keep 1/d amplification inside float16 range
        dens = [max(d, 0.05) for d in dens]
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, n_models)
    consensus = method == "breadcrumbs_ties"
    expected = rm.breadcrumbs(bv, xv, weights, dens, gams, consensus=consensus, normalize=normalize, lam=lam,
                              rescale=rescale, shape=shape, per_row=bool(per_row))
    # the kept sets are exact (ties included); values then follow the GTA pipeline
    params = None if per_row is None else {"per_row": float(per_row)}

    def call(chunk, thr):
        return merge(method, stored, base_s, shape=shape, weights=weights, densities=dens, gammas=gams, params=params,
                     normalize=normalize, lam=lam, rescale=rescale, out_dtype=out_dtype, cast=cast, threads=thr,
                     chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"{method} w={weights} d={dens} gamma={gams} per_row={per_row} "
                                    f"normalize={normalize} lambda={lam} rescale={rescale} shape={shape}")


@settings(**SETTINGS)
@given(
    shape=shapes(),
    density=densities,
    gamma=gammas,
    per_row=st.booleans(),
    pool=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    chunk=chunk_sizes,
    thr=threads,
    dtype=dtypes,
)
def test_breadcrumbs_mask_exact(shape, density, gamma, per_row, pool, seed, chunk, thr, dtype):
    """One model, weight 1, base 0: the output is δ where kept and 0 elsewhere, so the kept set is read off exactly.
    Values come from a small pool (many equal |δ|, both signs) to exercise the tie rule."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    pool_vals = rng.integers(1, 40, pool) / 16.0
    x32 = (rng.choice(pool_vals, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    out = merge("breadcrumbs", [store(x32, dtype).reshape(shape)], store(np.zeros(n, np.float32), dtype),
                shape=shape, densities=[density], gammas=[gamma], params={"per_row": float(per_row)}, threads=thr,
                chunk=chunk)
    expected = rm.breadcrumbs_mask(x32, density, gamma, shape, per_row)
    got = out != 0
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (f"n={n} shape={shape} d={density!r} gamma={gamma!r} per_row={per_row}: kept {int(got.sum())}, "
                           f"expected {int(expected.sum())}; differs at {bad[:10].tolist()}")
    np.testing.assert_array_equal(out[got], x32[got])


def test_breadcrumbs_tie_rule_by_hand():
    """Equal |δ| = 1 everywhere, n = 4, d = 0.25, gamma = 0.25: target 1, n_top 1, n_bot 2. In descending order ties
    put the lower index first (0, 1, 2, 3): element 0 is the dropped outlier, element 1 is kept."""
    x = np.float32([1.0, -1.0, 1.0, -1.0])
    out = merge("breadcrumbs", [x], np.zeros(4, np.float32), shape=[4], densities=[0.25], gammas=[0.25])
    np.testing.assert_array_equal(out, np.float32([0.0, -1.0, 0.0, 0.0]))
    # per row: the same in each row of a (2, 4) tensor
    x2 = np.stack([x, -x])
    out = merge("breadcrumbs", [x2], np.zeros(8, np.float32), shape=[2, 4], densities=[0.25], gammas=[0.25],
                params={"per_row": 1.0})
    np.testing.assert_array_equal(out, np.float32([0, -1, 0, 0, 0, 1, 0, 0]))


@pytest.mark.parametrize("n", [1, 7, 50, 99, 150])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_breadcrumbs_gamma_zero_and_small_tensors_keep_the_largest(n, density):
    """mergekit 0.1.4 zeroed the whole delta when n_top = 0 (gamma 0, or fewer than 1/gamma elements); 0.1.5 keeps
    the int(d·n) largest |δ|, which is what TIES keeps (without TIES' minimum of one)."""
    x = np.random.default_rng(n).permutation(np.arange(1, n + 1)).astype(np.float32)
    for gamma in ([0.0, 0.01] if n < 100 else [0.0]):
        out = merge("breadcrumbs", [x], np.zeros(n, np.float32), shape=[n], densities=[density], gammas=[gamma])
        target = int(density * n)
        assert int((out != 0).sum()) == target
        if target:
            np.testing.assert_array_equal(out != 0, ref.ties_trim_mask(x, density))


def test_breadcrumbs_band_and_defaults():
    """d = 0.5, gamma = 0.2 on 1..10: drop the 2 largest, keep the next 5 (ranks 4..8); default gamma is 0.01."""
    x = np.arange(1, 11, dtype=np.float32)
    out = merge("breadcrumbs", [x], np.zeros(10, np.float32), shape=[10], densities=[0.5], gammas=[0.2])
    np.testing.assert_array_equal(out, np.float32([0, 0, 0, 4, 5, 6, 7, 8, 0, 0]))
    x = np.arange(1, 201, dtype=np.float32)  # gamma 0.01 of 200 -> the 2 largest go
    out = merge("breadcrumbs", [x], np.zeros(200, np.float32), shape=[200], densities=[0.5])
    np.testing.assert_array_equal(out != 0, (x > 98) & (x <= 198))
    # density 1 is a no-op whatever gamma
    out = merge("breadcrumbs", [x], np.zeros(200, np.float32), shape=[200], densities=[1.0], gammas=[0.3])
    np.testing.assert_array_equal(out, x)


# ----------------------------------------------------------------------------------------------------------------
# della / della_linear
# ----------------------------------------------------------------------------------------------------------------


def della_mask(method, delta, shape, density, epsilon, *, seed, name, model_id):
    """The keep mask the engine draws for ``delta`` (its ranks) under the key (seed, name, model_id), read off a
    one-model run over a zero base with a non-zero probe of the same ranks."""
    probe = rm.della_rank_probe(delta, shape)
    out = merge(method, [probe], np.zeros(probe.size, np.float32), shape=shape, densities=[density],
                epsilons=[epsilon], seed=seed, name=name, model_ids=[model_id])
    kept = out != 0
    np.testing.assert_array_equal(out[kept], probe[kept])
    return kept


@st.composite
def della_density_eps(draw):
    if draw(st.integers(0, 5)) == 0:
        return 1.0, draw(st.floats(0.0, 0.5))
    d = draw(st.floats(0.05, 0.95))
    e = draw(st.floats(0.0, min(d, 1.0 - d) * 0.99))
    return d, e


@pytest.mark.parametrize("method", ["della", "della_linear"])
@settings(**dict(SETTINGS, max_examples=80))
@given(data=st.data())
def test_della_pipeline_with_recovered_masks(method, data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 3))
    weights = data.draw(st.lists(st.one_of(positive_weights, dyadic_weights), min_size=n_models, max_size=n_models))
    de = data.draw(st.lists(della_density_eps(), min_size=n_models, max_size=n_models))
    dens, eps = [d for d, _ in de], [e for _, e in de]
    normalize = data.draw(st.booleans())
    lam = data.draw(st.sampled_from([1.0, 0.5, -1.0]))
    rescale = data.draw(st.sampled_from(["none", "l1", "inverse_density"]))
    if rescale == "inverse_density":  # keep the 1/p amplification inside float16 range
        assume(all(d >= 1.0 or d - e >= 0.05 for d, e in de))
    seed = data.draw(st.integers(0, 2**63 - 1))
    name = f"model.layers.{seed % 5}.mlp.down_proj.weight"
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, n_models)

    def call(chunk, thr):
        return merge(method, stored, base_s, shape=shape, weights=weights, densities=dens, epsilons=eps,
                     normalize=normalize, lam=lam, rescale=rescale, seed=seed, name=name, out_dtype=out_dtype,
                     cast=cast, threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    masks = [della_mask(method, ref.task_vector(x, bv), shape, d, e, seed=seed, name=name, model_id=i)
             if d < 1.0 else None for i, (x, d, e) in enumerate(zip(xv, dens, eps))]
    expected = rm.della(bv, xv, weights, dens, eps, masks, shape, consensus=method == "della",
                        normalize=normalize, lam=lam, rescale=rescale)
    check(out, expected, out_dtype, f"{method} w={weights} d={dens} eps={eps} normalize={normalize} lambda={lam} "
                                    f"rescale={rescale} shape={shape}")


def binomial_ok(kept: float, expected: float, var: float, sigmas: float = 5.0) -> bool:
    return abs(kept - expected) <= sigmas * math.sqrt(var) + 1


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.2), (0.3, 0.25), (0.8, 0.1), (0.4, 0.0)])
def test_della_keep_probability_follows_rank(density, epsilon):
    """Per row, the smallest |δ| is kept with probability d − ε, the largest d + ε, linear in the rank between."""
    rows, cols = 16, 25_000
    rng = np.random.default_rng(11)
    x = (rng.uniform(0.5, 1.5, (rows, cols)) * rng.choice([-1.0, 1.0], (rows, cols))).astype(np.float32)
    out = merge("della_linear", [x], np.zeros(x.size, np.float32), shape=x.shape, densities=[density],
                epsilons=[epsilon], seed=3, name="w")
    kept = (out != 0).reshape(rows, cols)
    p = rm.della_probabilities(x, x.shape, density, epsilon).astype(np.float64).reshape(rows, cols)
    np.testing.assert_array_equal(out.reshape(rows, cols)[kept], x[kept])
    band = np.minimum((rm.della_ranks(x, x.shape).reshape(rows, cols) - 1) * 10 // cols, 9)
    for b in range(10):
        sel = band == b
        assert binomial_ok(kept[sel].sum(), p[sel].sum(), (p[sel] * (1 - p[sel])).sum()), (
            f"rank band {b}: kept {kept[sel].mean():.4f}, expected {p[sel].mean():.4f}")
    for r in range(rows):  # every row keeps ≈ density (no row reuses another's stream)
        assert binomial_ok(kept[r].sum(), p[r].sum(), (p[r] * (1 - p[r])).sum())
    # the mask follows ranks, not positions: the largest and smallest halves differ by ≈ 2ε·½ in keep rate
    ranks = rm.della_ranks(x, x.shape).reshape(rows, cols)
    hi, lo = kept[ranks > cols // 2].mean(), kept[ranks <= cols // 2].mean()
    assert abs((hi - lo) - epsilon) < 0.02


def test_della_one_element_rows_keep_with_density_minus_epsilon():
    n = 200_000
    x = np.random.default_rng(12).uniform(0.5, 1.5, n).astype(np.float32)
    out = merge("della_linear", [x], np.zeros(n, np.float32), shape=[n, 1], densities=[0.6], epsilons=[0.2], seed=1,
                name="col")
    assert binomial_ok((out != 0).sum(), 0.4 * n, 0.4 * 0.6 * n)


@settings(**dict(SETTINGS, max_examples=60))
@given(
    shape=shapes(),
    method=st.sampled_from(["della", "della_linear"]),
    de=della_density_eps(),
    seed=st.integers(0, 2**63 - 1),
    rescale=st.sampled_from(["none", "l1", "inverse_density"]),
    vs=variants(),
)
def test_della_reproducible_any_chunking(shape, method, de, seed, rescale, vs):
    b, xs = make_data(seed % 1000, shape, 2, "near", 0.1)

    def call(chunk, thr):
        return merge(method, xs, b, shape=shape, weights=[0.7, 0.4], densities=[de[0]] * 2, epsilons=[de[1]] * 2,
                     rescale=rescale, seed=seed, name="q", threads=thr, chunk=chunk)

    first = run_variants(call, vs)
    assert call(None, 2).tobytes() == first.tobytes()


def test_della_seed_name_and_model_id_change_the_mask():
    x = np.random.default_rng(13).uniform(0.5, 1.5, (20, 300)).astype(np.float32)
    m = della_mask("della", x, x.shape, 0.5, 0.1, seed=1, name="a", model_id=0)
    assert np.array_equal(m, della_mask("della", x, x.shape, 0.5, 0.1, seed=1, name="a", model_id=0))
    for kw in (dict(seed=2, name="a", model_id=0), dict(seed=1, name="b", model_id=0),
               dict(seed=1, name="a", model_id=1), dict(seed=1 + 2**40, name="a", model_id=0)):
        other = della_mask("della", x, x.shape, 0.5, 0.1, **kw)
        assert not np.array_equal(m, other), f"{kw} gives the same mask"
        # independent streams: agreement ≈ P(both) + P(neither) ≈ 1/2 + 2·Var(p)
        assert abs((m == other).mean() - 0.5) < 0.05


def test_della_density_one_is_a_no_op_and_bad_epsilon_is_an_error():
    b, (x,) = make_data(14, (6, 50), 1, "near", 0.2)
    for rescale in ("none", "l1", "inverse_density"):
        got = merge("della_linear", [x], b, shape=b.shape, densities=[1.0], epsilons=[0.4], rescale=rescale)
        np.testing.assert_array_equal(got, b.reshape(-1) + ref.task_vector(x, b))  # b + δ, δ untouched
    for d, e in [(0.5, 0.5), (0.9, 0.1), (0.1, 0.2), (0.3, 0.7)]:  # d ± ε must lie strictly inside (0, 1)
        with pytest.raises(_core.ParameterError):
            merge("della", [x], b, shape=b.shape, densities=[d], epsilons=[e])
    # the default ε is 0.15: density 0.1 is invalid with it, 0.2 valid
    with pytest.raises(_core.ParameterError):
        merge("della", [x], b, shape=b.shape, densities=[0.1])
    merge("della", [x], b, shape=b.shape, densities=[0.2])


# ----------------------------------------------------------------------------------------------------------------
# sce
# ----------------------------------------------------------------------------------------------------------------

topks = st.one_of(st.sampled_from([1.0, 0.5, 0.13, 0.9, 0.01, 0.65, 0.29]), st.floats(0.001, 1.0))


@settings(**SETTINGS)
@given(data=st.data())
def test_sce(data):
    shape = data.draw(shapes())
    kind = data.draw(st.sampled_from(["near", "grid"]))
    # grid variances are exact (and tie exactly) in any arithmetic only when dividing by the model count is exact
    n_models = data.draw(st.sampled_from([1, 2, 4] if kind == "grid" else [1, 2, 3, 4]))
    select_topk = data.draw(topks)
    zf = data.draw(st.sampled_from([0.0, 0.1, 0.5]))
    base32, xs32 = make_data(data.draw(st.integers(0, 2**31)), shape, n_models, kind, zf)
    ins, out_dtype, cast = data.draw(io_dtypes(n_models + 1))
    if kind != "grid":
        cast = None  # keep the variances of continuous data apart from float16/bfloat16 ties
        ins = ["float32"] * (n_models + 1)
    base_s = store(base32, ins[0])
    stored = [store(x, dt) for x, dt in zip(xs32, ins[1:])]
    bv = values(base_s, ins[0], cast).reshape(-1)
    xv = [values(s, dt, cast).reshape(-1) for s, dt in zip(stored, ins[1:])]
    deltas = [ref.task_vector(x, bv) for x in xv]
    if kind != "grid":
        assume(rm.sce_topk_is_unambiguous(deltas, select_topk))
    expected = rm.sce(bv, xv, select_topk=select_topk)
    assume(not (expected.ambiguous.all() and expected.out.size > 1))
    params = None if select_topk == 1.0 and data.draw(st.booleans()) else {"select_topk": select_topk}

    def call(chunk, thr):
        return merge("sce", stored, base_s, shape=shape, params=params, out_dtype=out_dtype, cast=cast, threads=thr,
                     chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"sce n={n_models} select_topk={select_topk} kind={kind} shape={shape}")


@settings(**SETTINGS)
@given(
    n=st.one_of(st.integers(1, 80), st.integers(80, 3000)),
    n_models=st.sampled_from([2, 4]),
    select_topk=topks,
    seed=st.integers(0, 2**31),
    chunk=chunk_sizes,
    thr=threads,
)
def test_sce_selection_mask_exact(n, n_models, select_topk, seed, chunk, thr):
    """Base 0: every selected element has a non-zero merged value and every other one is exactly 0, so the
    selection is read off the output. Grid deltas make many exactly equal variances (tie rule: lowest index)."""
    rng = np.random.default_rng(seed)
    xs = [(rng.integers(-3, 4, n) / 4.0).astype(np.float32) for _ in range(n_models)]
    out = merge("sce", xs, np.zeros(n, np.float32), shape=[n], params={"select_topk": select_topk}, threads=thr,
                chunk=chunk)
    # selected with a non-zero task vector somewhere (select_topk 1 also "selects" all-zero elements, which stay 0)
    expected = rm.sce_topk_mask(xs, select_topk) & np.any(np.stack(xs) != 0, axis=0)
    got = out != 0
    var = rm.sce_variance(xs)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (f"n={n} models={n_models} select_topk={select_topk!r}: kept {int(got.sum())}, expected "
                           f"{int(expected.sum())} (k of {int(np.count_nonzero(var))} non-zero variances); differs at "
                           f"{bad[:10].tolist()} var={var[bad[:10]].tolist()}")


def test_sce_variance_ties_keep_the_lowest_index():
    """Two models, δ = (1, 1, 1, 1) and 0: every variance is 1/4; select_topk 0.5 keeps k = 2: elements 0 and 1."""
    out = merge("sce", [np.ones(4, np.float32), np.zeros(4, np.float32)], np.zeros(4, np.float32), shape=[4],
                params={"select_topk": 0.5})
    np.testing.assert_array_equal(out, np.float32([1, 1, 0, 0]))


def test_sce_equal_variances_of_permuted_or_shifted_deltas_tie_by_index():
    """Three models whose deltas at two elements are the same values in another order (or shifted by a constant)
    have equal variances, so the tie rule decides: the lower index is kept (k = 1 of 2). A float evaluation of the
    variance can round the two differently (three is not a power of two); the contract's tie rule must hold."""
    rng = np.random.default_rng(24)
    failures = []
    for case in range(200):
        v = (rng.integers(-8, 9, 3) / 64.0).astype(np.float32)
        if np.all(v == v[0]):
            continue
        w = v[rng.permutation(3)] + np.float32(rng.integers(-8, 9) / 64.0 if case % 2 else 0.0)
        xs = [np.float32([v[i], w[i]]) for i in range(3)]
        assert rm.sce_topk_mask(xs, 0.5).tolist() == [True, False]
        out = merge("sce", xs, np.zeros(2, np.float32), shape=[2], params={"select_topk": 0.5})
        if not (out[0] != 0 and out[1] == 0):
            failures.append(([x.tolist() for x in xs], out.tolist()))
    assert not failures, f"{len(failures)} of 200 ties not broken by index, e.g. deltas per model {failures[0][0]} " \
                         f"-> {failures[0][1]}"


def test_sce_k_is_a_float32_product_as_in_mergekit():
    """k = int(count_nonzero(var)·select_topk) with mergekit's float32 tensor arithmetic: 180 × 0.65 -> 116."""
    n = 180
    x = np.arange(1, n + 1, dtype=np.float32)  # distinct variances: x and 0 -> var = x²/4
    out = merge("sce", [x, np.zeros(n, np.float32)], np.zeros(n, np.float32), shape=[n],
                params={"select_topk": 0.65})
    assert int((out != 0).sum()) == rm.sce_k(n, 0.65) == 116


def test_sce_select_topk_extremes_and_single_model():
    b, xs = make_data(15, (10, 30), 3, "near", 0.3)
    # select_topk 1 selects nothing away: same as without the parameter
    full = merge("sce", xs, b, shape=b.shape, params={"select_topk": 1.0})
    np.testing.assert_array_equal(full, merge("sce", xs, b, shape=b.shape))
    ref.assert_matches(full, rm.sce(b, xs), "float32", rtol=RTOL, context="sce select_topk=1")
    # k = int(nonzero·0.001) = 0 of 300 -> every task vector is erased -> the base
    np.testing.assert_array_equal(merge("sce", xs, b, shape=b.shape, params={"select_topk": 0.001}), b.reshape(-1))
    # one model: its variance is 0 everywhere, so any select_topk < 1 erases it; select_topk 1 returns it
    np.testing.assert_array_equal(merge("sce", xs[:1], b, shape=b.shape, params={"select_topk": 0.5}), b.reshape(-1))
    np.testing.assert_allclose(merge("sce", xs[:1], b, shape=b.shape), xs[0].reshape(-1), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# ram / ramplus_tl
# ----------------------------------------------------------------------------------------------------------------


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
        expected = rm.ram(bv, xv, epsilon=eps)
    else:
        if r is not None:
            params["r"] = r
        if alpha is not None:
            params["alpha"] = alpha
        expected = rm.ramplus_tl(bv, xv, epsilon=eps, r=0.1 if r is None else r, alpha=0.2 if alpha is None else alpha)

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
    ref.assert_matches(out, getattr(rm, method)(np.zeros(6, np.float32), [d], epsilon=0.1), "float32", context=method)


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


# ----------------------------------------------------------------------------------------------------------------
# nearswap
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_nearswap(data):
    shape = data.draw(shapes())
    t = data.draw(st.one_of(st.sampled_from([1e-4, 0.001, 0.01, 0.05, 1.0, 0.0, -0.5, 1e-7]), st.floats(0.0, 0.2)))
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 1)
    expected = rm.nearswap(bv, xv[0], t)

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


# ----------------------------------------------------------------------------------------------------------------
# arcee_fusion
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_arcee_fusion(data):
    shape = data.draw(shapes())
    # ``ft``, not ``near``: deltas of 0.005 on short rows have a KL divergence below float32 resolution, where the
    # mask is noise in any float32 evaluation (mergekit's included)
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 1, kinds=("ft", "grid", "far"),
                                                       zero_fracs=(0.0, 0.3, 0.8))
    expected, _ = rm.arcee_fusion(bv, xv[0], shape)

    def call(chunk, thr):
        return merge("arcee_fusion", stored, base_s, shape=shape, out_dtype=out_dtype, cast=cast, threads=thr,
                     chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    check(out, expected, out_dtype, f"arcee_fusion shape={shape}", max_ambiguous=0.5)


def test_arcee_fusion_exact_quantiles_not_interpolated():
    """One row, so importance = |δ|·KL orders like |δ|. Sorted |δ| ∝ 1..7, 11.5, 12, 40: the quartiles at indices
    floor(q·9) = 2, 4, 6 are 3, 5, 7, threshold 5 + 1.5·(7 − 3) = 11 keeps 11.5, 12 and 40; interpolated quartiles
    (3.25, 5.5, 10.375 -> threshold 16.19) would keep only 40."""
    mags = np.float32([1, 2, 3, 4, 5, 6, 7, 11.5, 12, 40]) * np.float32(2**-6)
    perm = np.random.default_rng(16).permutation(10)
    a = np.zeros(10, np.float32)
    a[0] = 1.0  # a non-uniform base row so that KL(softmax(b) ‖ softmax(a)) > 0
    b = (a + mags[perm]).astype(np.float32)
    expected, keep = rm.arcee_fusion(a, b, (10,))
    assert keep[np.argsort(perm)][-3:].all() and keep.sum() == 3
    assert not expected.ambiguous.any()
    out = merge("arcee_fusion", [b], a, shape=[10])
    np.testing.assert_array_equal(out != a, keep)
    ref.assert_matches(out, expected, "float32", context="arcee_fusion")


def test_arcee_fusion_identical_rows_and_one_element_rows():
    b, (x,) = make_data(17, (8, 16), 1, "near")
    # identical models: importance 0 everywhere, threshold 0, every element "kept": a + 0 = a
    np.testing.assert_array_equal(merge("arcee_fusion", [b], b, shape=b.shape), b.reshape(-1))
    # one-element rows: softmax = 1 in both, KL = 0, importance 0 -> threshold 0 -> everything taken from the model
    col = (8 * 16, 1)
    got = merge("arcee_fusion", [x.reshape(col)], b.reshape(col), shape=col)
    np.testing.assert_allclose(got, x.reshape(-1), rtol=0, atol=1e-6)


def test_arcee_fusion_exactly_one_million_elements_uses_exact_quantiles():
    b, (x,) = make_data(18, (1000, 1000), 1, "near", 0.1)
    expected, _ = rm.arcee_fusion(b, x, b.shape)
    out = merge("arcee_fusion", [x], b, shape=b.shape, seed=1)
    check(out, expected, "float32", "arcee_fusion 1e6", max_ambiguous=0.05)
    assert merge("arcee_fusion", [x], b, shape=b.shape, seed=2).tobytes() == out.tobytes(), \
        "the seed must not matter at <= 1e6 elements"


def test_arcee_fusion_sampled_quantiles_above_one_million():
    """> 1e6 elements: quantiles of a seeded sample of 1e6. Reproducible, independent of chunking and threads,
    seed-dependent, and close to the exact threshold (only elements near it may differ)."""
    shape = (1003, 1000)
    b, (x,) = make_data(19, shape, 1, "near", 0.1)
    runs = {(c, t): merge("arcee_fusion", [x], b, shape=shape, seed=5, chunk=c, threads=t)
            for c, t in [(None, 1), (4096, 2), (77_777, 3), (None, 3)]}
    first = runs[(None, 1)]
    for k, v in runs.items():
        assert v.tobytes() == first.tobytes(), f"chunk/threads {k} changed the sampled result"
    assert merge("arcee_fusion", [x], b, shape=shape, seed=5).tobytes() == first.tobytes()
    other = merge("arcee_fusion", [x], b, shape=shape, seed=6)
    assert other.tobytes() != first.tobytes(), "the sample does not depend on the seed"
    delta = ref.task_vector(x, b)
    imp, _ = rm.arcee_importance(b, x, shape)
    thr = rm.arcee_threshold(imp)
    exact_keep = imp >= thr
    for out in (first, other):
        keep = (out != b.reshape(-1)) & (delta != 0)
        differ = keep != (exact_keep & (delta != 0))
        # a sample of 1e6 pins the quartiles to ~0.1%: differences only within a few % of the threshold
        assert differ.mean() < 2e-3, differ.mean()
        assert (np.abs(imp[differ] - thr) <= 0.05 * thr).all()


# ----------------------------------------------------------------------------------------------------------------
# shared edge cases
# ----------------------------------------------------------------------------------------------------------------

BASE_METHODS = {
    # method: (n inputs, params, extra kwargs)
    "slerp": (1, {"t": 0.3}, {}),
    "nearswap": (1, {"t": 0.01}, {}),
    "arcee_fusion": (1, None, {}),
    "nuslerp": (2, None, {}),
    "model_stock": (2, None, {}),
    "sce": (3, {"select_topk": 0.5}, {}),
    "ram": (3, None, {}),
    "ramplus_tl": (3, None, {}),
    "breadcrumbs": (3, None, {"densities": [0.5] * 3, "gammas": [0.1] * 3}),
    "breadcrumbs_ties": (3, None, {"densities": [0.5] * 3, "gammas": [0.1] * 3, "normalize": True}),
    "della": (3, None, {"densities": [0.5] * 3, "normalize": True}),
    "della_linear": (3, None, {"densities": [0.5] * 3, "rescale": "inverse_density"}),
    "multislerp": (2, None, {}),
}


@pytest.mark.parametrize("method", sorted(BASE_METHODS))
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_inputs_equal_to_base_give_the_base(method, dtype):
    """Zero task vectors: nothing to merge, the base comes back (within one rounding for the interpolations)."""
    k, params, kw = BASE_METHODS[method]
    b, _ = make_data(20, (9, 23), 0, "near")
    bs = store(b, dtype)
    out = merge(method, [bs.copy() for _ in range(k)], bs, shape=b.shape, params=params, out_dtype=dtype, **kw)
    if method in ("slerp", "nuslerp"):  # (1 − t)·b + t·b in float32
        np.testing.assert_allclose(ref.decode(out, dtype), values(bs, dtype).reshape(-1), rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(out, bs.reshape(-1))


@pytest.mark.parametrize(
    "method,n_inputs,base,params,kw",
    [
        ("slerp", 1, True, None, {}),                      # t is required
        ("slerp", 1, True, {"t": 0.5, "tt": 1.0}, {}),     # unknown key
        ("slerp", 2, True, {"t": 0.5}, {}),                # exactly one other input
        ("slerp", 1, False, {"t": 0.5}, {}),               # base required
        ("nearswap", 1, True, None, {}),
        ("nearswap", 2, True, {"t": 0.5}, {}),
        ("arcee_fusion", 2, True, None, {}),
        ("nuslerp", 3, True, None, {}),
        ("nuslerp", 1, False, None, {}),
        ("model_stock", 1, True, None, {}),
        ("karcher", 2, True, None, {}),                    # base forbidden (it joins as an input)
        ("karcher", 2, False, {"t": 0.5}, {}),
        ("sce", 2, False, None, {}),
        ("ram", 2, True, {"r": 0.1}, {}),                  # r belongs to ramplus_tl
        ("breadcrumbs", 2, True, {"epsilon": 0.1}, {}),
        ("della", 1, True, {"per_row": 1.0}, {}),
    ],
)
def test_bad_method_parameters_are_parameter_errors(method, n_inputs, base, params, kw):
    b, xs = make_data(21, (4, 5), n_inputs, "near")
    with pytest.raises(_core.ParameterError):
        merge(method, xs, b if base else None, shape=b.shape, params=params, **kw)


def test_shape_must_match_the_element_count():
    b, (x,) = make_data(22, (4, 5), 1, "near")
    with pytest.raises((ValueError, _core.MergeError)):
        merge("arcee_fusion", [x], b, shape=[3, 5])


def test_default_shape_is_one_row():
    """shape=None means [numel]: a row-wise method sees the whole tensor as one row."""
    b, (x,) = make_data(23, (6, 7), 1, "near", 0.2)
    flat = merge("arcee_fusion", [x], b, shape=[42])
    assert merge("arcee_fusion", [x], b, shape=None).tobytes() == flat.tobytes()
    ref.assert_matches(flat, rm.arcee_fusion(b, x, (42,))[0], "float32", context="arcee_fusion one row")
