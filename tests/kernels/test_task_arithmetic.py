"""Property tests: ``_core.merge_arrays`` against the NumPy references in ``reference.py``.

Every property checks two things:

* determinism: the output bytes are identical for every ``chunk_elems`` (1..64, odd sizes, None) and thread count
  (1, 2, 3);
* correctness: the decoded output equals the float64 reference within ``rtol·scale + atol`` (float32 math; ``scale``
  is the elementwise magnitude of the summed terms, see ``reference.Ref``) plus one unit in the last place of a
  16-bit output dtype. Elements whose TIES sign election is too close to call in float32 are excluded (counted).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from kernel_helpers import run_variants

_core = pytest.importorskip("ferromerge._core")

SETTINGS = dict(deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------------------

dtypes = st.sampled_from(ref.DTYPES)
dyadic_weights = st.integers(-32, 32).map(lambda i: i / 16)  # negative, zero, unequal; exact in f32
positive_weights = st.floats(0.05, 2.0, allow_nan=False, allow_infinity=False)
# densities where float64 and float32 products differ around an integer (0.7·10, 0.29·100, 0.57·100, ...)
densities = st.one_of(
    st.sampled_from([1.0, 0.5, 0.7, 0.29, 0.57, 0.1, 0.3, 0.9, 1e-6, 0.999]),
    st.floats(0.001, 1.0, allow_nan=False, exclude_min=False),
)
chunk_sizes = st.one_of(st.integers(1, 64), st.sampled_from([None, 97, 1000, 4096, 5000]))
threads = st.sampled_from([1, 2, 3])


@st.composite
def shapes(draw):
    kind = draw(st.sampled_from(["one", "small", "odd2d", "large"]))
    if kind == "one":
        return draw(st.sampled_from([(1,), (1, 1)]))
    if kind == "small":
        return (draw(st.integers(2, 70)),)
    if kind == "odd2d":
        return (draw(st.integers(1, 40)), draw(st.integers(1, 41)))
    return (draw(st.integers(300, 3100)),)


@st.composite
def weight_lists(draw, n):
    if draw(st.booleans()):
        return draw(st.lists(dyadic_weights, min_size=n, max_size=n))
    return draw(st.lists(positive_weights, min_size=n, max_size=n))


def make_data(seed: int, shape, n_models: int, grid: bool, zero_frac: float):
    """float32 base and fine-tuned tensors. ``grid``: values on a coarse dyadic grid (exact in bf16/f16/f32), so
    |δ| and Σ W have many exact ties; otherwise Gaussian."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if grid:
        base = rng.integers(-16, 17, n) / 8.0
        deltas = [rng.integers(-8, 9, n) / 64.0 for _ in range(n_models)]
    else:
        base = rng.normal(0.0, 1.0, n)
        deltas = [rng.normal(0.0, 0.05, n) * rng.choice([1.0, 0.1, 3.0]) for _ in range(n_models)]
    xs = []
    for d in deltas:
        d = np.where(rng.random(n) < zero_frac, 0.0, d)
        xs.append((base + d).astype(np.float32).reshape(shape))
    return base.astype(np.float32).reshape(shape), xs


def store(x32, dtype):
    """float32 values -> storage array of dtype (same shape)."""
    return ref.encode(x32.reshape(-1), dtype).reshape(x32.shape)


def values(a, dtype):
    """storage array -> float32 values (as the engine reads them)."""
    return ref.decode(a.reshape(-1), dtype).reshape(a.shape)




@st.composite
def variants(draw):
    v = [(None, 1)]
    v += draw(st.lists(st.tuples(chunk_sizes, threads), min_size=2, max_size=3))
    return v


OUT_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def check_out(out, n, out_dtype):
    assert out.dtype == OUT_STORAGE[out_dtype], (out.dtype, out_dtype)
    assert out.size == n


# ----------------------------------------------------------------------------------------------------------------
# the reference itself (cheap self-checks against an independent implementation)
# ----------------------------------------------------------------------------------------------------------------


def test_reference_bf16_codec_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8])])
    ours = ref.bf16_encode(x)
    theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ref.bf16_decode(ours), theirs.view(ml_dtypes.bfloat16).astype(np.float32))
    nan = ref.bf16_encode(np.float32([np.nan, -np.nan]))
    assert np.isnan(ref.bf16_decode(nan)).all()
    # ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1; 1 + 3·2^-8 -> 1 + 2^-6
    assert ref.bf16_encode(np.float32([1.0 + 2**-8]))[0] == 0x3F80
    assert ref.bf16_encode(np.float32([1.0 + 3 * 2**-8]))[0] == 0x3F82


def test_reference_ties_trim_breaks_ties_by_index():
    d = np.float32([0.5, -1.0, 1.0, 0.5, -0.5, 0.25])
    assert ref.ties_trim_mask(d, 0.5).tolist() == [True, True, True, False, False, False]
    assert ref.ties_trim_mask(d, 0.34).tolist() == [False, True, True, False, False, False]
    assert ref.ties_trim_mask(d, 0.01).tolist() == [False, True, False, False, False, False]


# ----------------------------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_linear(data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 4))
    in_dtypes = data.draw(st.lists(dtypes, min_size=n_models, max_size=n_models))
    out_dtype = data.draw(dtypes)
    cast = data.draw(st.one_of(st.none(), dtypes))
    weights = data.draw(weight_lists(n_models))
    normalize = data.draw(st.booleans())
    base32, xs32 = make_data(data.draw(st.integers(0, 2**31)), shape, n_models, data.draw(st.booleans()), 0.1)
    stored = [store(x, dt) for x, dt in zip(xs32, in_dtypes)]
    n = int(np.prod(shape))

    def call(chunk, thr):
        return _core.merge_arrays(
            "linear", stored, None, weights, [1.0] * n_models, out_dtype=out_dtype, normalize=normalize,
            cast_dtype=cast, threads=thr, chunk_elems=chunk,
        )

    if normalize and sum(weights) == 0.0:
        with pytest.raises(_core.ParameterError):
            call(None, 1)
        return
    out = run_variants(call, data.draw(variants()))
    check_out(out, n, out_dtype)
    xv = [ref.round_to(values(s, dt), cast) for s, dt in zip(stored, in_dtypes)]
    expected = ref.linear(xv, weights, normalize)
    ref.assert_matches(ref.decode(out, out_dtype), expected, out_dtype, context="linear")


# ----------------------------------------------------------------------------------------------------------------
# task arithmetic / TIES (full pipeline)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@settings(**SETTINGS)
@given(data=st.data())
def test_gta(method, data):
    shape = data.draw(shapes())
    n_models = data.draw(st.integers(1, 4))
    uniform = data.draw(st.booleans())
    if uniform:
        in_dtypes = [data.draw(dtypes)] * (n_models + 1)
    else:
        in_dtypes = data.draw(st.lists(dtypes, min_size=n_models + 1, max_size=n_models + 1))
    out_dtype = data.draw(dtypes)
    cast = data.draw(st.one_of(st.none(), dtypes))
    weights = data.draw(weight_lists(n_models))
    dens = data.draw(st.lists(densities, min_size=n_models, max_size=n_models)) if method == "ties" else [1.0] * n_models
    normalize = data.draw(st.booleans())
    lam = data.draw(st.sampled_from([1.0, 0.5, -1.0, 1.7, 0.0]))
    rescale = data.draw(st.sampled_from(["none", "l1", "inverse_density"])) if method == "ties" else "none"
    if rescale == "inverse_density":  # keep 1/d amplification inside float16 range
        dens = [max(d, 0.05) for d in dens]
    grid = data.draw(st.booleans())
    base32, xs32 = make_data(data.draw(st.integers(0, 2**31)), shape, n_models, grid, data.draw(st.sampled_from([0, 0.1, 0.5])))
    base_s = store(base32, in_dtypes[0])
    stored = [store(x, dt) for x, dt in zip(xs32, in_dtypes[1:])]
    n = int(np.prod(shape))

    def call(chunk, thr):
        return _core.merge_arrays(
            method, stored, base_s, weights, dens, out_dtype=out_dtype, normalize=normalize, cast_dtype=cast,
            lambda_=lam, rescale=rescale, threads=thr, chunk_elems=chunk,
        )

    out = run_variants(call, data.draw(variants()))
    check_out(out, n, out_dtype)
    bv = ref.round_to(values(base_s, in_dtypes[0]), cast)
    xv = [ref.round_to(values(s, dt), cast) for s, dt in zip(stored, in_dtypes[1:])]
    if method == "ties":
        expected = ref.ties(bv, xv, weights, dens, normalize=normalize, lam=lam, rescale=rescale)
    else:
        expected = ref.task_arithmetic(bv, xv, weights, normalize=normalize, lam=lam)
    ref.assert_matches(
        ref.decode(out, out_dtype), expected, out_dtype,
        context=f"{method} w={weights} d={dens} normalize={normalize} lambda={lam} rescale={rescale} cast={cast}",
    )
    # excluded elements must stay rare: a flood of ambiguous elections would make the test vacuous
    assert expected.ambiguous.mean() <= 0.25 or n < 8


def test_task_arithmetic_matches_textbook_formula():
    """No normalize, lambda: b + λ Σ w_i (x_i − b), against an independent float64 formula."""
    rng = np.random.default_rng(3)
    b = rng.normal(size=777).astype(np.float32)
    xs = [(b + rng.normal(0, 0.1, 777)).astype(np.float32) for _ in range(3)]
    w = [0.7, -0.2, 1.3]
    out = _core.merge_arrays("task_arithmetic", xs, b, w, [1.0] * 3, out_dtype="float32", normalize=False, lambda_=0.8)
    np.testing.assert_allclose(out, ref.task_arithmetic_plain(b, xs, w, 0.8), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# TIES: exact kept masks, k, sign election, divisor
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(
    n=st.one_of(st.integers(1, 80), st.integers(80, 5000)),
    density=densities,
    pool=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    chunk=chunk_sizes,
    thr=threads,
    dtype=dtypes,
)
def test_ties_trim_mask_exact(n, density, pool, seed, chunk, thr, dtype):
    """One model, weight 1, base 0: the output is δ where kept and 0 elsewhere, so the kept set is read off exactly.

    Values come from a small pool (many exact ties in |δ|, both signs) to exercise the lowest-index tie-break.
    """
    rng = np.random.default_rng(seed)
    pool_vals = rng.integers(1, 40, pool) / 16.0
    x32 = (rng.choice(pool_vals, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    x = store(x32, dtype)
    base = store(np.zeros(n, np.float32), dtype)
    out = _core.merge_arrays(
        "ties", [x], base, [1.0], [density], out_dtype="float32", normalize=True, threads=thr, chunk_elems=chunk
    )
    expected_mask = ref.ties_trim_mask(x32, density)
    got_mask = out != 0
    k = ref.ties_k(density, n)
    assert int(got_mask.sum()) == k, f"n={n} density={density!r}: kept {int(got_mask.sum())}, expected k={k}"
    bad = np.flatnonzero(got_mask != expected_mask)
    assert bad.size == 0, f"n={n} density={density!r}: kept-set differs at {bad[:10].tolist()} (|δ|={np.abs(x32[bad[:10]]).tolist()})"
    np.testing.assert_array_equal(out[got_mask], x32[got_mask])


@pytest.mark.parametrize(
    "density,n",
    [(0.7, 10), (0.29, 100), (0.57, 100), (0.1, 30), (0.3, 10), (1e-9, 50), (0.999, 7), (0.5, 1), (0.58, 100),
     (0.35, 20), (0.07, 100), (0.14, 100)],
)
def test_ties_k_uses_float64_product(density, n):
    """k = max(1, int(d·n)) computed in float64 (mergekit does it in Python); float32 d·n can land below an integer."""
    x = np.arange(1, n + 1, dtype=np.float32)[::-1].copy()  # distinct magnitudes: no tie ambiguity
    out = _core.merge_arrays("ties", [x], np.zeros(n, np.float32), [1.0], [density], out_dtype="float32",
                             normalize=True)
    assert int((out != 0).sum()) == max(1, int(density * n))
    np.testing.assert_array_equal(out != 0, ref.ties_trim_mask(x, density))


def test_ties_density_one_keeps_all_including_zeros():
    x = np.float32([0.0, 1.0, -2.0, 0.0, 3.0])
    out = _core.merge_arrays("ties", [x], np.zeros(5, np.float32), [1.0], [1.0], out_dtype="float32", normalize=True)
    np.testing.assert_array_equal(out, x)


def test_ties_sign_election_tie_goes_positive():
    """Σ W = 0 exactly -> elected +1: only the positive contributions agree."""
    b = np.zeros(3, np.float32)
    x1 = np.float32([1.0, -2.0, 0.5])
    x2 = np.float32([-1.0, 2.0, -0.5])
    out = _core.merge_arrays("ties", [x1, x2], b, [1.0, 1.0], [1.0, 1.0], out_dtype="float32", normalize=True)
    np.testing.assert_array_equal(out, np.float32([1.0, 2.0, 0.5]))
    # unnormalised: sum of the agreeing (positive) W
    out = _core.merge_arrays("ties", [x1, x2], b, [2.0, 0.5], [1.0, 1.0], out_dtype="float32", normalize=False)
    # W1 = [2, -4, 1], W2 = [-0.5, 1, -0.25]; Σ = [1.5, -3, 0.75] -> elected [+, -, +]
    np.testing.assert_array_equal(out, np.float32([2.0, -4.0, 1.0]))


def test_ties_negative_weight_flips_vote_and_zero_divisor():
    """Weights multiply δ before the election; divisor = Σ agreeing w (0 -> 1); zeros never agree."""
    b = np.float32([1.0, 1.0, 1.0, 1.0])
    x1 = np.float32([2.0, 1.0, 0.0, 1.5])   # δ1 = [1, 0, -1, 0.5]
    x2 = np.float32([2.0, 1.0, 2.0, 0.5])   # δ2 = [1, 0, 1, -0.5]
    w = [0.5, -0.5]                          # W1 = [.5, 0, -.5, .25]; W2 = [-.5, 0, -.5, .25]
    out = _core.merge_arrays("ties", [x1, x2], b, w, [1.0, 1.0], out_dtype="float32", normalize=True)
    # e0: Σ=0 -> +; only W1 agrees, divisor 0.5 -> mixed 1.0
    # e1: all zero -> nobody agrees, mixed 0, divisor 0 -> 1
    # e2: Σ=-1 -> -; both agree, divisor 0.5 + -0.5 = 0 -> 1, mixed -1.0
    # e3: Σ=.5 -> +; both agree, divisor 0 -> 1, mixed 0.5
    np.testing.assert_array_equal(out, np.float32([2.0, 1.0, 0.0, 1.5]))


def test_linear_normalize_zero_weight_sum_is_parameter_error():
    x = np.ones(4, np.float32)
    with pytest.raises(_core.ParameterError):
        _core.merge_arrays("linear", [x, x], None, [1.0, -1.0], [1.0, 1.0], out_dtype="float32", normalize=True)
    out = _core.merge_arrays("linear", [x, 2 * x], None, [1.0, -1.0], [1.0, 1.0], out_dtype="float32", normalize=False)
    np.testing.assert_array_equal(out, -x)


def test_task_arithmetic_zero_weight_sum_divisor_is_one():
    """Without consensus, |Σ w| < 1e-8 -> divisor 1 even with normalize."""
    b = np.zeros(3, np.float32)
    x1 = np.float32([1.0, 2.0, 3.0])
    x2 = np.float32([0.5, 0.5, 0.5])
    out = _core.merge_arrays("task_arithmetic", [x1, x2], b, [1.0, -1.0], [1.0, 1.0], out_dtype="float32",
                             normalize=True)
    np.testing.assert_array_equal(out, np.float32([0.5, 1.5, 2.5]))


def test_l1_rescale_skipped_for_tiny_norms():
    """‖δ‖₁ < 1e-7: the kept values are not rescaled."""
    b = np.zeros(4, np.float32)
    x = np.float32([1e-8, 2e-8, -1e-8, 0.0])  # ‖δ‖₁ = 4e-8 < 1e-7
    out = _core.merge_arrays("ties", [x], b, [1.0], [0.5], out_dtype="float32", normalize=True, rescale="l1")
    np.testing.assert_array_equal(out, np.float32([1e-8, 2e-8, 0.0, 0.0]))
    x = np.float32([1.0, 2.0, -1.0, 0.0])  # ‖δ‖₁ = 4, kept {2, 1}: factor 4/3
    out = _core.merge_arrays("ties", [x], b, [1.0], [0.5], out_dtype="float32", normalize=True, rescale="l1")
    np.testing.assert_allclose(out, [4 / 3, 8 / 3, 0.0, 0.0], rtol=1e-6)


def test_cast_dtype_rounds_inputs_before_math():
    """cast_dtype=bfloat16 on float32 inputs: a value that bf16 rounds away must not survive into the result."""
    b = np.float32([1.0, 1.0])
    x = np.float32([1.0 + 2**-9, 1.0 + 3 * 2**-8])  # bf16 -> [1.0, 1 + 2^-6]
    out = _core.merge_arrays("task_arithmetic", [x], b, [1.0], [1.0], out_dtype="float32", normalize=False,
                             cast_dtype="bfloat16")
    np.testing.assert_array_equal(out, np.float32([1.0, 1.0 + 2**-6]))
    out = _core.merge_arrays("task_arithmetic", [x], b, [1.0], [1.0], out_dtype="float32", normalize=False)
    np.testing.assert_array_equal(out, x)


def test_out_dtype_rounding_is_nearest_even():
    """float32 math, one rounding to the output dtype (round to nearest, ties to even)."""
    x = np.float32([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 65504.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11])
    out = _core.merge_arrays("linear", [x], None, [1.0], [1.0], out_dtype="bfloat16", normalize=False)
    np.testing.assert_array_equal(out, ref.bf16_encode(x))
    out = _core.merge_arrays("linear", [x], None, [1.0], [1.0], out_dtype="float16", normalize=False)
    np.testing.assert_array_equal(out, x.astype(np.float16))


# k = max(1, int(d·n)) equals n with d < 1 only for one-element tensors.
@pytest.mark.parametrize("n,density", [(1, 0.5), (1, 0.9), (1, 0.01)])
def test_ties_inverse_density_divides_even_when_trim_keeps_everything(n, density):
    """Contract: inverse_density divides kept values by d whenever d < 1, also when k = max(1, int(d·n)) = n."""
    x = np.arange(1, n + 1, dtype=np.float32)
    assert ref.ties_k(density, n) == n
    out = _core.merge_arrays("ties", [x], np.zeros(n, np.float32), [1.0], [density], out_dtype="float32",
                             normalize=False, rescale="inverse_density")
    np.testing.assert_allclose(out, x / np.float32(density), rtol=1e-7)
