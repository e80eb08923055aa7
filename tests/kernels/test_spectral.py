"""Property tests of ``merge/methods/spectral.rs`` (tsv_m, iso_c, iso_cts, star) in ``_core.merge_arrays`` against
``reference.spectral``, and the parameter errors of the spectral and TALL methods. Every property also checks that
the output bytes are the same for every ``chunk_elems`` and thread count (1–3): these methods must be
deterministic.

Tolerance (``helpers.spectral.spectral_bound``): within C·eps32·max(κ, 1)·|alpha|·Σ‖tau_t‖_F + 2·eps32·‖expected‖_F
plus one unit of a 16-bit output dtype per element, κ being the method's amplification of rounding inside its SVDs;
inputs with κ >= 1e4 are skipped, STAR ranks within 1e-4 of the eta target likewise (``star_rank_margin``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import dtypes, run_variants, store
from helpers.spectral import (
    EPS,
    KAPPA_MAX,
    SETTINGS,
    SPECTRAL,
    assert_spectral,
    iso_cts_overflows,
    make_family,
    merge,
    prepared,
    shapes,
    spectral_bound,
    variants,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import arrays, codec, linalg
from reference import spectral as spectral_ref

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402
if not hasattr(_engine, "svd"):
    pytest.skip("needs the extension with _core.svd (rebuild)", allow_module_level=True)

from ferromerge.tensors import merge_tensors  # noqa: E402

ParameterError = errors.ParameterError


# ----------------------------------------------------------------------------------------------------------------
# spectral merges: tsv_m, iso_c, iso_cts, star
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def spectral_params(draw, method: str, shape, n_tasks: int):
    alpha = draw(st.sampled_from([1.0, 0.5, 2.0, -0.3]))
    if method == "tsv_m":
        return {"alpha": alpha, "exact_svd": 1.0}
    if method == "iso_c":
        return {"alpha": alpha}
    if method == "iso_cts":
        f = draw(st.one_of(st.sampled_from([0.8, 1.0, 0.5, 0.0]), st.floats(0.0, 1.0)))
        assume(not iso_cts_overflows(shape, n_tasks, f))
        return {"alpha": alpha, "common_space_fraction": f}
    return {"eta": draw(st.one_of(st.sampled_from([40.0, 100.0, 1.0, 77.7]), st.floats(0.5, 100.0)))}


@settings(**SETTINGS)
@given(data=st.data(), method=st.sampled_from(SPECTRAL))
def test_spectral_methods_match_the_reference(data, method):
    shape = data.draw(shapes())
    n_tasks = data.draw(st.integers(1, 4))
    params = data.draw(spectral_params(method, shape, n_tasks))
    base_s, stored, bv, xv, out_dtype, cast, kind = prepared(data, shape, n_tasks, ("decay", "gauss"))
    if method == "star" and len(shape) == 2:
        assume(min(spectral_ref.star_rank_margin(t, params["eta"]) for t in arrays.task_vectors(bv, xv)) > 1e-4)
    expected, bound, kappa = spectral_bound(method, bv, xv, params, out_dtype)
    assume(kappa < KAPPA_MAX)

    def call(chunk, thr):
        return merge(method, stored, base_s, shape=shape, params=params, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk, name="layers.0.w")

    out = run_variants(call, data.draw(variants()))
    assert_spectral(out, method, bv, xv, params, out_dtype, f"{method} {params} shape={shape} T={n_tasks} {kind}")


@settings(**SETTINGS)
@given(data=st.data())
def test_randomized_tsv_m_is_deterministic_and_close_on_decaying_spectra(data):
    """The default (randomized) TSV-M: bytes independent of chunking and threads, and — on task vectors with
    geometric spectra (ratio <= 0.9), where a sketch of k + 10 columns with 2 power iterations misses at most
    (σ_{k+11}/σ_k)^5 <= 0.9^55 ≈ 3e-3 of the top-k subspace — within the exact reference's bound plus that share
    of the merged update (5e-3·‖alpha·tau‖_F). float32 inputs only: rounding to 16 bits would bury the small
    singular values under quantization noise and flatten the spectrum."""
    shape = data.draw(st.tuples(st.integers(8, 40), st.integers(8, 40)))
    n_tasks = data.draw(st.integers(1, 4))
    base_s, stored = make_family(data.draw(st.integers(0, 2**31)), shape, n_tasks, "decay")
    bv, xv, cast = base_s, stored, None
    out_dtype = data.draw(dtypes)
    params = {"alpha": 1.0}
    expected, bound, kappa = spectral_bound("tsv_m", bv, xv, {**params, "exact_svd": 1.0}, out_dtype)
    assume(kappa < KAPPA_MAX)

    def call(chunk, thr):
        return merge("tsv_m", stored, base_s, shape=shape, params=params, out_dtype=out_dtype, cast=cast,
                     threads=thr, chunk=chunk, seed=7, name="w")

    out = run_variants(call, data.draw(variants()))
    got = codec.decode(out, out_dtype).astype(np.float64).reshape(shape)
    err = float(np.linalg.norm(got - expected))
    assert err <= bound + 5e-3 * float(np.linalg.norm(expected - bv)), (err, bound)


def test_tsv_m_single_task_is_task_arithmetic():
    base, (x,) = make_family(30, (23, 17), 1, "gauss")
    for exact in (0.0, 1.0):
        got = merge("tsv_m", [x], base, shape=base.shape, params={"alpha": 0.6, "exact_svd": exact})
        tau = x.astype(np.float64) - base
        np.testing.assert_allclose(got.reshape(base.shape), base + 0.6 * tau, rtol=0,
                                   atol=64 * EPS * (np.abs(tau).max() + np.abs(base).max()))


def test_tsv_m_is_exact_by_default_and_randomized_only_when_asked():
    base, xs = make_family(32, (60, 45), 3, "decay")  # k = 15: a sketch of 25 columns, not the whole space
    default = merge("tsv_m", xs, base, shape=base.shape, params={})
    assert default.tobytes() == merge("tsv_m", xs, base, shape=base.shape, params={"exact_svd": 1.0}).tobytes()
    randomized = merge("tsv_m", xs, base, shape=base.shape, params={"exact_svd": 0.0, "power_iters": 0.0})
    assert randomized.tobytes() != default.tobytes()


def test_tsv_m_gives_a_matrix_too_small_for_one_direction_per_task_the_mean():
    """2 x 384 with three tasks: floor(2/3) = 0 directions each; the update is the mean task vector (not dropped)."""
    base, xs = make_family(33, (2, 384), 3, "gauss")
    got = merge("tsv_m", xs, base, shape=base.shape, params={"alpha": 0.8})
    want = base + 0.8 * np.mean([x.astype(np.float64) - base for x in xs], axis=0)
    np.testing.assert_allclose(got.reshape(base.shape), want, rtol=0, atol=1e-6)
    assert not np.allclose(got.reshape(base.shape), base, atol=1e-4)


def test_iso_c_is_mean_singular_value_times_the_polar_factor_of_the_sum():
    """Built from the core's own pieces: mean(S of _engine.svd(M)) · _engine.polar(M), M = Σ tau_t."""
    base, xs = make_family(31, (26, 19), 3, "decay")
    taus = [x - base for x in xs]  # float32, as the kernel forms them
    m_sum = (taus[0] + taus[1] + taus[2]).astype(np.float32)
    s = _engine.svd(m_sum, exact=True)[1]
    want = base + 1.5 * (float(np.mean(s.astype(np.float64))) * _engine.polar(m_sum).astype(np.float64))
    got = merge("iso_c", xs, base, shape=base.shape, params={"alpha": 1.5}).reshape(base.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * EPS * float(np.abs(want).max()))
    # and the reference's closed form ‖M‖_*/min(m, n)·polar(M)
    closed = base + 1.5 * np.linalg.svd(m_sum.astype(np.float64), compute_uv=False).sum() / 19 * linalg.polar(m_sum)
    np.testing.assert_allclose(got, closed, rtol=0, atol=64 * EPS * float(np.abs(want).max()))


def test_iso_cts_with_everything_common_is_iso_c_and_star_at_100_is_the_mean():
    base, xs = make_family(32, (20, 14), 3, "decay")
    cts = merge("iso_cts", xs, base, shape=base.shape, params={"common_space_fraction": 1.0, "alpha": 0.9})
    isoc = merge("iso_c", xs, base, shape=base.shape, params={"alpha": 0.9})
    np.testing.assert_allclose(cts, isoc, rtol=0, atol=64 * EPS * float(np.abs(isoc).max()))
    star = merge("star", xs, base, shape=base.shape, params={"eta": 100.0}).reshape(base.shape)
    mean = base + np.mean([x.astype(np.float64) - base for x in xs], axis=0)
    np.testing.assert_allclose(star, mean, rtol=0, atol=64 * EPS * float(np.abs(mean).max()))


@pytest.mark.parametrize("method", SPECTRAL)
def test_mean_only_gives_the_mean_task_vector(method):
    """``mean_only`` (the config's ``exclude``): a matrix gets base + alpha·mean(tau) like a vector does."""
    base, xs = make_family(33, (12, 10), 3, "gauss")
    params = {"mean_only": 1.0, **({} if method == "star" else {"alpha": 0.7})}
    got = merge(method, xs, base, shape=base.shape, params=params).reshape(base.shape)
    scale = 1.0 if method == "star" else 0.7
    want = base + scale * np.mean([x.astype(np.float64) - base for x in xs], axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS * float(np.abs(want).max()))


@pytest.mark.parametrize("method", SPECTRAL + ("consensus", "tall_masks"))
@pytest.mark.parametrize("dtype", codec.DTYPES)
@pytest.mark.parametrize("shape", [(9, 7), (7,), (1, 1)])
def test_zero_task_vectors_give_the_base_exactly(method, dtype, shape):
    base, _ = make_family(34, shape, 0, "gauss")
    bs = store(base, dtype)
    params = {"task": 1} if method == "tall_masks" else None
    out = merge(method, [bs.copy(), bs.copy()], bs, shape=shape, params=params, out_dtype=dtype)
    assert out.tobytes() == bs.reshape(-1).tobytes()


@pytest.mark.parametrize("shape,n_tasks,fraction", [((3, 5), 2, 0.1), ((3, 5), 2, 0.0), ((7, 9), 2, 0.0),
                                                    ((2, 6), 3, 0.3)])
def test_iso_cts_when_rounding_overfills_the_task_blocks(shape, n_tasks, fraction):
    """round((r − int(r·f))/T)·T > r (e.g. r = 3, T = 2, f = 0.1: round(1.5) = 2, ts_total = 4): the reference
    code would slice with a negative index and then fail; a clear ParameterError or the shrunk task blocks of
    ``reference.spectral.iso_cts_dims`` are both acceptable, a crash is not."""
    assert iso_cts_overflows(shape, n_tasks, fraction)
    base, xs = make_family(35, shape, n_tasks, "gauss")
    params = {"common_space_fraction": fraction}
    try:
        out = merge("iso_cts", xs, base, shape=shape, params=params)
    except ParameterError:
        return
    assert_spectral(out, "iso_cts", base, xs, params, "float32", f"iso_cts {shape} T={n_tasks} f={fraction}")




# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params",
    [
        ("star", {"eta": 0.0}), ("star", {"eta": -5.0}), ("star", {"eta": 100.5}), ("star", {"eta": float("nan")}),
        ("consensus", {"k": -1.0}), ("consensus", {"k": 1.5}), ("consensus", {"tall_mask_lambda": -0.1}),
        ("tall_masks", {"task": 3.0}), ("tall_masks", {"task": -1.0}), ("tall_masks", {}),
        ("tall_masks", {"task": 0.5}),
        ("iso_cts", {"common_space_fraction": 1.5}), ("iso_cts", {"common_space_fraction": -0.1}),
        ("tsv_m", {"exact_svd": 0.5}), ("tsv_m", {"oversample": -1.0}), ("tsv_m", {"power_iters": 1.5}),
        ("tsv_m", {"alpha": float("inf")}), ("iso_c", {"eta": 40.0}), ("star", {"alpha": 1.0}),
        ("consensus", {"task": 0.0}),
    ],
)
def test_bad_parameters_are_parameter_errors(method, params):
    base, xs = make_family(50, (4, 5), 3, "gauss")
    with pytest.raises(ParameterError):
        merge(method, xs, base, shape=base.shape, params=params)


@pytest.mark.parametrize("method", SPECTRAL + ("consensus", "tall_masks"))
def test_a_base_is_required(method):
    _, xs = make_family(51, (4, 5), 2, "gauss")
    with pytest.raises(ParameterError):
        merge(method, xs, None, shape=(4, 5), params={"task": 0.0} if method == "tall_masks" else None)


@pytest.mark.parametrize("method", SPECTRAL + ("consensus", "tall_masks"))
def test_a_weight_is_a_parameter_error(method):
    """None of these methods takes per-model weights (merge_tensors is the registry's door)."""
    base, xs = make_family(52, (4, 5), 2, "gauss")
    params = {"weight": 1.0, **({"task": 0} if method == "tall_masks" else {})}
    with pytest.raises(ParameterError, match="weight"):
        merge_tensors([base, *xs], method, params, base_index=0)


@pytest.mark.parametrize("method", SPECTRAL)
def test_a_non_finite_input_matrix_is_an_error_naming_the_tensor(method):
    """Refused by the engine's non-finite check (an InputError with the count, issue 13); with allow_nonfinite an SVD
    of a NaN matrix has no meaning, so the spectral kernel itself refuses it."""
    base, xs = make_family(53, (6, 5), 2, "gauss")
    xs[1] = xs[1].copy()
    xs[1][2, 3] = np.nan
    with pytest.raises(errors.InputError, match=r"layers\.3\.w'?: 1 NaN and 0 infinite values"):
        merge(method, xs, base, shape=base.shape, name="layers.3.w")
    with pytest.raises(ParameterError, match=r"layers\.3\.w.*non-finite|non-finite.*layers\.3\.w"):
        merge(method, xs, base, shape=base.shape, name="layers.3.w", allow_nonfinite=True)
