"""Property tests of ``merge/methods/task_arithmetic.rs`` in ``_core.merge_arrays`` against
``reference.task_arithmetic``: linear, task_arithmetic and TIES (first part, with its own strategies), DARE
(``dare_linear`` / ``dare_ties``: the seeded keep-mask and the pipeline around it), breadcrumbs / breadcrumbs_ties
and della / della_linear (with the method-kernel helpers of ``helpers.kernels``).

Every property checks two things:

* determinism: the output bytes are identical for every ``chunk_elems`` (1..64, odd sizes, None) and thread count
  (1, 2, 3);
* correctness: the decoded output equals the float64 reference within ``rtol·scale + atol`` (float32 math; ``scale``
  is the elementwise magnitude of the summed terms, see ``reference.result.Ref``) plus one unit in the last place of a
  16-bit output dtype. Elements whose TIES sign election is too close to call in float32 are excluded (counted).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.kernels import (
    OUT_STORAGE, SETTINGS, check, chunk_sizes, densities, dtypes, dyadic_weights, kernel_merge, make_data, merge, positive_weights,
    prepared, run_variants, shapes, store, threads, values, variants,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import codec
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import assert_matches

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402

#: the linear / task_arithmetic / TIES properties draw more examples than the other families
GTA_SETTINGS = dict(deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------------------

# densities where float64 and float32 products differ around an integer (0.7·10, 0.29·100, 0.57·100, ...)
gta_densities = st.one_of(
    st.sampled_from([1.0, 0.5, 0.7, 0.29, 0.57, 0.1, 0.3, 0.9, 1e-6, 0.999]),
    st.floats(0.001, 1.0, allow_nan=False, exclude_min=False),
)


@st.composite
def gta_shapes(draw):
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


def make_gta_data(seed: int, shape, n_models: int, grid: bool, zero_frac: float):
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
    ours = codec.bf16_encode(x)
    theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(codec.bf16_decode(ours), theirs.view(ml_dtypes.bfloat16).astype(np.float32))
    nan = codec.bf16_encode(np.float32([np.nan, -np.nan]))
    assert np.isnan(codec.bf16_decode(nan)).all()
    # ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1; 1 + 3·2^-8 -> 1 + 2^-6
    assert codec.bf16_encode(np.float32([1.0 + 2**-8]))[0] == 0x3F80
    assert codec.bf16_encode(np.float32([1.0 + 3 * 2**-8]))[0] == 0x3F82


def test_reference_ties_trim_breaks_ties_by_index():
    d = np.float32([0.5, -1.0, 1.0, 0.5, -0.5, 0.25])
    assert task_arithmetic_ref.ties_trim_mask(d, 0.5).tolist() == [True, True, True, False, False, False]
    assert task_arithmetic_ref.ties_trim_mask(d, 0.34).tolist() == [False, True, True, False, False, False]
    assert task_arithmetic_ref.ties_trim_mask(d, 0.01).tolist() == [False, True, False, False, False, False]


# ----------------------------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------------------------


@settings(**GTA_SETTINGS)
@given(data=st.data())
def test_linear(data):
    shape = data.draw(gta_shapes())
    n_models = data.draw(st.integers(1, 4))
    in_dtypes = data.draw(st.lists(dtypes, min_size=n_models, max_size=n_models))
    out_dtype = data.draw(dtypes)
    cast = data.draw(st.one_of(st.none(), dtypes))
    weights = data.draw(weight_lists(n_models))
    normalize = data.draw(st.booleans())
    base32, xs32 = make_gta_data(data.draw(st.integers(0, 2**31)), shape, n_models, data.draw(st.booleans()), 0.1)
    stored = [store(x, dt) for x, dt in zip(xs32, in_dtypes)]
    n = int(np.prod(shape))

    def call(chunk, thr):
        return kernel_merge(
            "linear", stored, None, weights, [1.0] * n_models, out_dtype=out_dtype, normalize=normalize,
            cast_dtype=cast, threads=thr, chunk_elems=chunk,
        )

    if normalize and sum(weights) == 0.0:
        with pytest.raises(errors.ParameterError):
            call(None, 1)
        return
    out = run_variants(call, data.draw(variants()))
    check_out(out, n, out_dtype)
    xv = [codec.round_to(values(s, dt), cast) for s, dt in zip(stored, in_dtypes)]
    expected = task_arithmetic_ref.linear(xv, weights, normalize)
    assert_matches(codec.decode(out, out_dtype), expected, out_dtype, context="linear")


# ----------------------------------------------------------------------------------------------------------------
# task arithmetic / TIES (full pipeline)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@settings(**GTA_SETTINGS)
@given(data=st.data())
def test_gta(method, data):
    shape = data.draw(gta_shapes())
    n_models = data.draw(st.integers(1, 4))
    uniform = data.draw(st.booleans())
    if uniform:
        in_dtypes = [data.draw(dtypes)] * (n_models + 1)
    else:
        in_dtypes = data.draw(st.lists(dtypes, min_size=n_models + 1, max_size=n_models + 1))
    out_dtype = data.draw(dtypes)
    cast = data.draw(st.one_of(st.none(), dtypes))
    weights = data.draw(weight_lists(n_models))
    dens = (data.draw(st.lists(gta_densities, min_size=n_models, max_size=n_models)) if method == "ties"
            else [1.0] * n_models)
    normalize = data.draw(st.booleans())
    lam = data.draw(st.sampled_from([1.0, 0.5, -1.0, 1.7, 0.0]))
    rescale = data.draw(st.sampled_from(["none", "l1", "inverse_density"])) if method == "ties" else "none"
    if rescale == "inverse_density":  # keep 1/d amplification inside float16 range
        dens = [max(d, 0.05) for d in dens]
    grid = data.draw(st.booleans())
    base32, xs32 = make_gta_data(data.draw(st.integers(0, 2**31)), shape, n_models, grid, data.draw(st.sampled_from([0, 0.1, 0.5])))
    base_s = store(base32, in_dtypes[0])
    stored = [store(x, dt) for x, dt in zip(xs32, in_dtypes[1:])]
    n = int(np.prod(shape))

    def call(chunk, thr):
        return kernel_merge(
            method, stored, base_s, weights, dens, out_dtype=out_dtype, normalize=normalize, cast_dtype=cast,
            lambda_=lam, rescale=rescale, threads=thr, chunk_elems=chunk,
        )

    out = run_variants(call, data.draw(variants()))
    check_out(out, n, out_dtype)
    bv = codec.round_to(values(base_s, in_dtypes[0]), cast)
    xv = [codec.round_to(values(s, dt), cast) for s, dt in zip(stored, in_dtypes[1:])]
    if method == "ties":
        expected = task_arithmetic_ref.ties(bv, xv, weights, dens, normalize=normalize, lam=lam, rescale=rescale)
    else:
        expected = task_arithmetic_ref.task_arithmetic(bv, xv, weights, normalize=normalize, lam=lam)
    assert_matches(
        codec.decode(out, out_dtype), expected, out_dtype,
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
    out = kernel_merge("task_arithmetic", xs, b, w, [1.0] * 3, out_dtype="float32", normalize=False, lambda_=0.8)
    np.testing.assert_allclose(out, task_arithmetic_ref.task_arithmetic_plain(b, xs, w, 0.8), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# TIES: exact kept masks, k, sign election, divisor
# ----------------------------------------------------------------------------------------------------------------


@settings(**GTA_SETTINGS)
@given(
    n=st.one_of(st.integers(1, 80), st.integers(80, 5000)),
    density=gta_densities,
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
    out = kernel_merge(
        "ties", [x], base, [1.0], [density], out_dtype="float32", normalize=True, threads=thr, chunk_elems=chunk
    )
    expected_mask = task_arithmetic_ref.ties_trim_mask(x32, density)
    got_mask = out != 0
    k = task_arithmetic_ref.ties_k(density, n)
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
    out = kernel_merge("ties", [x], np.zeros(n, np.float32), [1.0], [density], out_dtype="float32",
                             normalize=True)
    assert int((out != 0).sum()) == max(1, int(density * n))
    np.testing.assert_array_equal(out != 0, task_arithmetic_ref.ties_trim_mask(x, density))


def test_ties_density_one_keeps_all_including_zeros():
    x = np.float32([0.0, 1.0, -2.0, 0.0, 3.0])
    out = kernel_merge("ties", [x], np.zeros(5, np.float32), [1.0], [1.0], out_dtype="float32", normalize=True)
    np.testing.assert_array_equal(out, x)


def test_ties_sign_election_tie_goes_positive():
    """Σ W = 0 exactly -> elected +1: only the positive contributions agree."""
    b = np.zeros(3, np.float32)
    x1 = np.float32([1.0, -2.0, 0.5])
    x2 = np.float32([-1.0, 2.0, -0.5])
    out = kernel_merge("ties", [x1, x2], b, [1.0, 1.0], [1.0, 1.0], out_dtype="float32", normalize=True)
    np.testing.assert_array_equal(out, np.float32([1.0, 2.0, 0.5]))
    # unnormalised: sum of the agreeing (positive) W
    out = kernel_merge("ties", [x1, x2], b, [2.0, 0.5], [1.0, 1.0], out_dtype="float32", normalize=False)
    # W1 = [2, -4, 1], W2 = [-0.5, 1, -0.25]; Σ = [1.5, -3, 0.75] -> elected [+, -, +]
    np.testing.assert_array_equal(out, np.float32([2.0, -4.0, 1.0]))


def test_ties_negative_weight_flips_vote_and_zero_divisor():
    """Weights multiply δ before the election; divisor = Σ agreeing w (0 -> 1); zeros never agree."""
    b = np.float32([1.0, 1.0, 1.0, 1.0])
    x1 = np.float32([2.0, 1.0, 0.0, 1.5])   # δ1 = [1, 0, -1, 0.5]
    x2 = np.float32([2.0, 1.0, 2.0, 0.5])   # δ2 = [1, 0, 1, -0.5]
    w = [0.5, -0.5]                          # W1 = [.5, 0, -.5, .25]; W2 = [-.5, 0, -.5, .25]
    out = kernel_merge("ties", [x1, x2], b, w, [1.0, 1.0], out_dtype="float32", normalize=True)
    # e0: Σ=0 -> +; only W1 agrees, divisor 0.5 -> mixed 1.0
    # e1: all zero -> nobody agrees, mixed 0, divisor 0 -> 1
    # e2: Σ=-1 -> -; both agree, divisor 0.5 + -0.5 = 0 -> 1, mixed -1.0
    # e3: Σ=.5 -> +; both agree, divisor 0 -> 1, mixed 0.5
    np.testing.assert_array_equal(out, np.float32([2.0, 1.0, 0.0, 1.5]))


def test_linear_normalize_zero_weight_sum_is_parameter_error():
    x = np.ones(4, np.float32)
    with pytest.raises(errors.ParameterError):
        kernel_merge("linear", [x, x], None, [1.0, -1.0], [1.0, 1.0], out_dtype="float32", normalize=True)
    out = kernel_merge("linear", [x, 2 * x], None, [1.0, -1.0], [1.0, 1.0], out_dtype="float32", normalize=False)
    np.testing.assert_array_equal(out, -x)


def test_task_arithmetic_zero_weight_sum_divisor_is_one():
    """Without consensus, |Σ w| < 1e-8 -> divisor 1 even with normalize."""
    b = np.zeros(3, np.float32)
    x1 = np.float32([1.0, 2.0, 3.0])
    x2 = np.float32([0.5, 0.5, 0.5])
    out = kernel_merge("task_arithmetic", [x1, x2], b, [1.0, -1.0], [1.0, 1.0], out_dtype="float32",
                             normalize=True)
    np.testing.assert_array_equal(out, np.float32([0.5, 1.5, 2.5]))


def test_l1_rescale_skipped_for_tiny_norms():
    """‖δ‖₁ < 1e-7: the kept values are not rescaled."""
    b = np.zeros(4, np.float32)
    x = np.float32([1e-8, 2e-8, -1e-8, 0.0])  # ‖δ‖₁ = 4e-8 < 1e-7
    out = kernel_merge("ties", [x], b, [1.0], [0.5], out_dtype="float32", normalize=True, rescale="l1")
    np.testing.assert_array_equal(out, np.float32([1e-8, 2e-8, 0.0, 0.0]))
    x = np.float32([1.0, 2.0, -1.0, 0.0])  # ‖δ‖₁ = 4, kept {2, 1}: factor 4/3
    out = kernel_merge("ties", [x], b, [1.0], [0.5], out_dtype="float32", normalize=True, rescale="l1")
    np.testing.assert_allclose(out, [4 / 3, 8 / 3, 0.0, 0.0], rtol=1e-6)


def test_cast_dtype_rounds_inputs_before_math():
    """cast_dtype=bfloat16 on float32 inputs: a value that bf16 rounds away must not survive into the result."""
    b = np.float32([1.0, 1.0])
    x = np.float32([1.0 + 2**-9, 1.0 + 3 * 2**-8])  # bf16 -> [1.0, 1 + 2^-6]
    out = kernel_merge("task_arithmetic", [x], b, [1.0], [1.0], out_dtype="float32", normalize=False,
                             cast_dtype="bfloat16")
    np.testing.assert_array_equal(out, np.float32([1.0, 1.0 + 2**-6]))
    out = kernel_merge("task_arithmetic", [x], b, [1.0], [1.0], out_dtype="float32", normalize=False)
    np.testing.assert_array_equal(out, x)


def test_out_dtype_rounding_is_nearest_even():
    """float32 math, one rounding to the output dtype (round to nearest, ties to even)."""
    x = np.float32([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 65504.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11])
    out = kernel_merge("linear", [x], None, [1.0], [1.0], out_dtype="bfloat16", normalize=False)
    np.testing.assert_array_equal(out, codec.bf16_encode(x))
    out = kernel_merge("linear", [x], None, [1.0], [1.0], out_dtype="float16", normalize=False)
    np.testing.assert_array_equal(out, x.astype(np.float16))


# k = max(1, int(d·n)) equals n with d < 1 only for one-element tensors.
@pytest.mark.parametrize("n,density", [(1, 0.5), (1, 0.9), (1, 0.01)])
def test_ties_inverse_density_divides_even_when_trim_keeps_everything(n, density):
    """Contract: inverse_density divides kept values by d whenever d < 1, also when k = max(1, int(d·n)) = n."""
    x = np.arange(1, n + 1, dtype=np.float32)
    assert task_arithmetic_ref.ties_k(density, n) == n
    out = kernel_merge("ties", [x], np.zeros(n, np.float32), [1.0], [density], out_dtype="float32",
                             normalize=False, rescale="inverse_density")
    np.testing.assert_allclose(out, x / np.float32(density), rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# DARE (``dare_linear`` / ``dare_ties``): the seeded keep-mask and the pipeline around it.

# The mask is read off the engine itself: one model with weight 1 over a zero base, no rescale and no normalize
# gives ``out = x·m``, and every x is non-zero, so ``m = out != 0``. The contract (docs/architecture.md) says element j
# of model i is kept iff ``u(seed, name, model_id, j) < d_i``; the properties below follow from that alone.
# ----------------------------------------------------------------------------------------------------------------

DARE_SETTINGS = dict(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def nonzero_data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def dare(x, density, *, seed=0, name="t", model_id=0, method="dare_linear", rescale="none", threads=None,
         chunk=None, out_dtype="float32"):
    n = x.size
    return kernel_merge(
        method, [x], np.zeros(n, x.dtype), [1.0], [density], out_dtype=out_dtype, normalize=False,
        rescale=rescale, seed=seed, name=name, model_ids=[model_id], threads=threads, chunk_elems=chunk,
    )


def mask_of(x, density, **kw) -> np.ndarray:
    out = dare(x, density, **kw)
    return out != 0


def binomial_ok(kept: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(kept - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


# ----------------------------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------------------------


@settings(**DARE_SETTINGS)
@given(
    n=st.one_of(st.integers(1, 100), st.integers(100, 20_000)),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**63 - 1),
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    rescale=st.sampled_from(["none", "l1", "inverse_density"]),
    variants=st.lists(st.tuples(st.one_of(st.integers(1, 64), st.sampled_from([None, 4096, 777])),
                                st.sampled_from([1, 2, 3])), min_size=2, max_size=4),
)
def test_dare_same_seed_identical_bytes_any_chunking(n, density, seed, method, rescale, variants):
    x = nonzero_data(n, seed % 1000)
    first = dare(x, density, seed=seed, method=method, rescale=rescale, threads=1)
    for chunk, thr in variants:
        again = dare(x, density, seed=seed, method=method, rescale=rescale, threads=thr, chunk=chunk)
        assert again.tobytes() == first.tobytes(), f"chunk_elems={chunk} threads={thr} changed the result"


def test_dare_different_seed_name_model_id_give_different_masks():
    x = nonzero_data(4000)
    m = mask_of(x, 0.5, seed=1, name="a", model_id=0)
    assert not np.array_equal(m, mask_of(x, 0.5, seed=2, name="a", model_id=0)), "seed does not change the mask"
    assert not np.array_equal(m, mask_of(x, 0.5, seed=1, name="b", model_id=0)), "name does not change the mask"
    assert not np.array_equal(m, mask_of(x, 0.5, seed=1, name="a", model_id=1)), "model_id does not change the mask"
    # ... and the masks of different keys are independent: agreement ≈ 1/2 at density 1/2
    for other in (mask_of(x, 0.5, seed=2, name="a"), mask_of(x, 0.5, seed=1, name="b"),
                  mask_of(x, 0.5, seed=1, name="a", model_id=1)):
        assert binomial_ok(int((m == other).sum()), x.size, 0.5)
    # seeds differing only in high bits must differ too
    assert not np.array_equal(m, mask_of(x, 0.5, seed=1 + 2**40, name="a", model_id=0))


def test_dare_mask_depends_only_on_key_and_index():
    """u depends on (seed, name, model_id, j) only: not on the values, the tensor length, or the dtype."""
    n = 3000
    x = nonzero_data(n, 1)
    m = mask_of(x, 0.4, seed=7, name="w")
    np.testing.assert_array_equal(m, mask_of(nonzero_data(n, 2), 0.4, seed=7, name="w"))
    np.testing.assert_array_equal(m[:1000], mask_of(x[:1000].copy(), 0.4, seed=7, name="w"))
    np.testing.assert_array_equal(m, mask_of(codec.encode(x, "bfloat16"), 0.4, seed=7, name="w"))
    np.testing.assert_array_equal(m, mask_of(x.astype(np.float16), 0.4, seed=7, name="w"))


def test_dare_mask_is_monotone_in_density():
    """keep iff u < d: a lower density keeps a subset of what a higher one keeps."""
    x = nonzero_data(5000, 3)
    masks = [mask_of(x, d, seed=5, name="m") for d in (0.1, 0.3, 0.5, 0.9, 1.0)]
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any()
    assert masks[-1].all(), "density 1 must keep everything"


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_dare_kept_fraction_is_binomial(density):
    n = 200_000
    x = nonzero_data(n, 4)
    m = mask_of(x, density, seed=11, name="model.layers.0.mlp.up_proj.weight")
    assert binomial_ok(int(m.sum()), n, density), f"kept {int(m.sum())} of {n} at density {density}"
    # no structure along the tensor: each 1/8 keeps ≈ density (catches per-chunk/per-block stream reuse)
    for part in np.array_split(m, 8):
        assert binomial_ok(int(part.sum()), part.size, density)
    # consecutive elements independent: P(m_j & m_{j+1}) ≈ d²
    assert binomial_ok(int((m[1:] & m[:-1]).sum()), n - 1, density * density, sigmas=6)
    # 4096-periodic structure (block-keyed streams) would show up as equal masks of consecutive blocks
    a, b = m[:4096], m[4096:8192]
    assert binomial_ok(int((a == b).sum()), 4096, density**2 + (1 - density) ** 2, sigmas=6)


def test_dare_masks_of_two_models_independent():
    n = 100_000
    x = nonzero_data(n, 5)
    m0 = mask_of(x, 0.3, seed=3, name="t", model_id=0)
    m1 = mask_of(x, 0.6, seed=3, name="t", model_id=1)
    assert binomial_ok(int((m0 & m1).sum()), n, 0.18)


# ----------------------------------------------------------------------------------------------------------------
# rescale
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.77, 1.0])
def test_dare_rescale_modes_share_the_mask(method, density):
    n = 9001
    x = nonzero_data(n, 6)
    m = mask_of(x, density, seed=9, name="q")
    for rescale in ("l1", "inverse_density"):
        out = dare(x, density, seed=9, name="q", method=method, rescale=rescale)
        np.testing.assert_array_equal(out != 0, m, err_msg=f"{method}/{rescale} drew another mask")
    np.testing.assert_array_equal(mask_of(x, density, seed=9, name="q", method=method), m)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77, 1.0])
def test_dare_inverse_density_divides_kept_values_exactly(density):
    x = nonzero_data(5000, 7)
    m = mask_of(x, density, seed=2, name="r")
    out = dare(x, density, seed=2, name="r", rescale="inverse_density")
    assert not out[~m].any()
    f32_div = x[m] / np.float32(density)
    f64_div = (x[m].astype(np.float64) / density).astype(np.float32)
    got = out[m]
    ok = (got == f32_div) | (got == f64_div)
    assert ok.all(), (
        f"kept/density not exact at {np.flatnonzero(~ok)[:5].tolist()}: got {got[~ok][:5].tolist()}, "
        f"expected {f32_div[~ok][:5].tolist()}"
    )


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_dare_l1_rescale_preserves_l1_norm(density):
    x = nonzero_data(20_000, 8)
    m = mask_of(x, density, seed=4, name="l1")
    out = dare(x, density, seed=4, name="l1", rescale="l1")
    np.testing.assert_array_equal(out != 0, m)
    np.testing.assert_allclose(np.abs(out.astype(np.float64)).sum(), np.abs(x.astype(np.float64)).sum(), rtol=1e-5)
    factor = task_arithmetic_ref.l1_rescale_factor(x, m)
    np.testing.assert_allclose(out[m], x[m].astype(np.float64) * factor, rtol=2e-7, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# full pipeline with the recovered masks
# ----------------------------------------------------------------------------------------------------------------


@settings(**DARE_SETTINGS)
@given(
    n=st.one_of(st.integers(1, 60), st.integers(60, 6000)),
    n_models=st.integers(1, 4),
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    rescale=st.sampled_from(["none", "l1", "inverse_density"]),
    normalize=st.booleans(),
    lam=st.sampled_from([1.0, 0.5, -1.0, 2.0]),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_dare_pipeline_matches_reference_with_recovered_masks(n, n_models, method, rescale, normalize, lam, seed, data):
    weights = data.draw(st.lists(st.one_of(st.integers(-32, 32).map(lambda i: i / 16), st.floats(0.05, 2.0)),
                                 min_size=n_models, max_size=n_models))
    dens = data.draw(st.lists(st.floats(0.05, 1.0), min_size=n_models, max_size=n_models))
    in_dtype = data.draw(st.sampled_from(codec.DTYPES))
    out_dtype = data.draw(st.sampled_from(codec.DTYPES))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 64)))
    thr = data.draw(st.sampled_from([1, 2, 3]))
    rng = np.random.default_rng(seed)
    base32 = rng.normal(0, 1, n).astype(np.float32)
    xs32 = [(base32 + rng.normal(0, 0.05, n)).astype(np.float32) for _ in range(n_models)]
    base = codec.encode(base32, in_dtype)
    xs = [codec.encode(x, in_dtype) for x in xs32]
    name = f"model.layers.{seed % 7}.self_attn.q_proj.weight"
    out = kernel_merge(
        method, xs, base, weights, dens, out_dtype=out_dtype, normalize=normalize, lambda_=lam, rescale=rescale,
        seed=seed, name=name, threads=thr, chunk_elems=chunk,
    )
    # each model's mask, recovered from a single-model run with the same key (its model_id = its position)
    probe = nonzero_data(n, 0)
    masks = [mask_of(probe, d, seed=seed, name=name, model_id=i) for i, d in enumerate(dens)]
    bv = codec.decode(base, in_dtype)
    xv = [codec.decode(x, in_dtype) for x in xs]
    expected = task_arithmetic_ref.gta(bv, xv, weights, consensus=(method == "dare_ties"), normalize=normalize, lam=lam,
                       masks=masks, densities=dens, rescale=rescale)
    assert_matches(codec.decode(out, out_dtype), expected, out_dtype,
                       context=f"{method} w={weights} d={dens} rescale={rescale} normalize={normalize} lambda={lam}")


# ----------------------------------------------------------------------------------------------------------------
# breadcrumbs / breadcrumbs_ties
# ----------------------------------------------------------------------------------------------------------------

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
    expected = task_arithmetic_ref.breadcrumbs(bv, xv, weights, dens, gams, consensus=consensus, normalize=normalize,
                                               lam=lam, rescale=rescale, shape=shape, per_row=bool(per_row))
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
    expected = task_arithmetic_ref.breadcrumbs_mask(x32, density, gamma, shape, per_row)
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
            np.testing.assert_array_equal(out != 0, task_arithmetic_ref.ties_trim_mask(x, density))


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
    probe = task_arithmetic_ref.della_rank_probe(delta, shape)
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
    masks = [della_mask(method, task_arithmetic_ref.task_vector(x, bv), shape, d, e, seed=seed, name=name, model_id=i)
             if d < 1.0 else None for i, (x, d, e) in enumerate(zip(xv, dens, eps))]
    expected = task_arithmetic_ref.della(bv, xv, weights, dens, eps, masks, shape, consensus=method == "della",
                        normalize=normalize, lam=lam, rescale=rescale)
    check(out, expected, out_dtype, f"{method} w={weights} d={dens} eps={eps} normalize={normalize} lambda={lam} "
                                    f"rescale={rescale} shape={shape}")


def binomial_sum_ok(kept: float, expected: float, var: float, sigmas: float = 5.0) -> bool:
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
    p = task_arithmetic_ref.della_probabilities(x, x.shape, density, epsilon).astype(np.float64).reshape(rows, cols)
    np.testing.assert_array_equal(out.reshape(rows, cols)[kept], x[kept])
    band = np.minimum((task_arithmetic_ref.della_ranks(x, x.shape).reshape(rows, cols) - 1) * 10 // cols, 9)
    for b in range(10):
        sel = band == b
        assert binomial_sum_ok(kept[sel].sum(), p[sel].sum(), (p[sel] * (1 - p[sel])).sum()), (
            f"rank band {b}: kept {kept[sel].mean():.4f}, expected {p[sel].mean():.4f}")
    for r in range(rows):  # every row keeps ≈ density (no row reuses another's stream)
        assert binomial_sum_ok(kept[r].sum(), p[r].sum(), (p[r] * (1 - p[r])).sum())
    # the mask follows ranks, not positions: the largest and smallest halves differ by ≈ 2ε·½ in keep rate
    ranks = task_arithmetic_ref.della_ranks(x, x.shape).reshape(rows, cols)
    hi, lo = kept[ranks > cols // 2].mean(), kept[ranks <= cols // 2].mean()
    assert abs((hi - lo) - epsilon) < 0.02


def test_della_one_element_rows_keep_with_density_minus_epsilon():
    n = 200_000
    x = np.random.default_rng(12).uniform(0.5, 1.5, n).astype(np.float32)
    out = merge("della_linear", [x], np.zeros(n, np.float32), shape=[n, 1], densities=[0.6], epsilons=[0.2], seed=1,
                name="col")
    assert binomial_sum_ok((out != 0).sum(), 0.4 * n, 0.4 * 0.6 * n)


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
        np.testing.assert_array_equal(got, b.reshape(-1) + task_arithmetic_ref.task_vector(x, b))  # b + δ, δ untouched
    for d, e in [(0.5, 0.5), (0.9, 0.1), (0.1, 0.2), (0.3, 0.7)]:  # d ± ε must lie strictly inside (0, 1)
        with pytest.raises(errors.ParameterError):
            merge("della", [x], b, shape=b.shape, densities=[d], epsilons=[e])
    # the default ε is 0.15: density 0.1 is invalid with it, 0.2 valid
    with pytest.raises(errors.ParameterError):
        merge("della", [x], b, shape=b.shape, densities=[0.1])
    merge("della", [x], b, shape=b.shape, densities=[0.2])
