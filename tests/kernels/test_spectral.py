"""The Rust SVD kernels against ``reference_svd``: ``_core.svd`` (exact and randomized, rank rules), ``_core.polar``
and ``_core.merge_arrays`` with tsv_m, iso_c, iso_cts, star, consensus and tall_masks.

Every ``merge_arrays`` property also checks that the output bytes are the same for every ``chunk_elems`` and
thread count (1–3), and ``_core.svd`` / ``_core.polar`` that they are the same at every thread count: these
methods must be deterministic.

Tolerances (each stated where it is used):

* ``_core.svd`` (exact) and ``_core.polar`` factor in float64 and round the factors to float32, as does the
  reference's LAPACK in float64 on the same float32 input: singular values agree to half a float32 ulp plus
  float64 noise, factors to a few float32 ulps, and the chosen rank exactly wherever no rank threshold lies
  within 1e-5 of a cumulative sum (``reference_svd.rank_margin``; the float32-rounded singular values move sums
  by ~1e-7).
* The spectral merges do their products in float32 on float32 factors. A backward-stable step lands within
  c·eps32 of an exact step on a perturbed input, so the merge lands within c·eps32·κ·Σ‖tau_t‖_F of the float64
  reference, κ being the method's amplification of such perturbations (``reference_svd.sensitivity``):
  ‖got − expected‖_F <= C·eps32·max(κ, 1)·|alpha|·Σ‖tau_t‖_F + 2·eps32·‖expected‖_F + ‖ulp_out(expected)‖_F, with
  C = 128 as in test_svd_torch.py (observed constants there <= 18) and one unit of a 16-bit output dtype per
  element. Inputs with κ >= 1e4 have no unique answer and are skipped; STAR ranks within 1e-4 of the eta target
  likewise (``star_rank_margin``).
* TALL / Consensus are elementwise in float64 with exact task vectors, as the reference: one float32 rounding
  of theta (plus one of a 16-bit output dtype); elements within 1e-9 of a mask threshold are skipped
  (``tall_mask_ambiguous``), and on exactly representable data with a dyadic lambda nothing is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import reference as ref
import reference_svd as R
from kernel_helpers import io_dtypes, run_variants

_core = pytest.importorskip("ferromerge._core")
if not hasattr(_core, "svd"):
    pytest.skip("needs the extension with _core.svd (rebuild)", allow_module_level=True)

from ferromerge.tensors import merge_tensors  # noqa: E402

ParameterError = _core.ParameterError

SETTINGS = dict(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EPS = R.EPS32
C = 128.0
KAPPA_MAX = 1e4
OUT_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
SPECTRAL = ("tsv_m", "iso_c", "iso_cts", "star")

# ----------------------------------------------------------------------------------------------------------------
# strategies and helpers
# ----------------------------------------------------------------------------------------------------------------

dtypes = st.sampled_from(ref.DTYPES)
chunk_sizes = st.one_of(st.integers(1, 64), st.sampled_from([None, 97, 1000, 4096]))
threads = st.sampled_from([1, 2, 3])


@st.composite
def variants(draw):
    return [(None, 1)] + draw(st.lists(st.tuples(chunk_sizes, threads), min_size=2, max_size=3))


@st.composite
def shapes(draw, matrices_only: bool = False):
    """One element, odd sizes, 1-D, tall / wide / square 2-D (1×n and n×1 included), 3-D."""
    kinds = ["2d", "2d", "2d", "thin"] + ([] if matrices_only else ["one", "1d", "3d"])
    kind = draw(st.sampled_from(kinds))
    if kind == "one":
        return draw(st.sampled_from([(1,), (1, 1)]))
    if kind == "1d":
        return (draw(st.integers(2, 70)),)
    if kind == "3d":
        return (draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6)))
    if kind == "thin":
        n = draw(st.integers(1, 23))
        return draw(st.sampled_from([(1, n), (n, 1)]))
    return (draw(st.integers(2, 33)), draw(st.integers(2, 33)))


def task_matrix(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    """A task vector: ``decay`` (2-D: random singular vectors, geometric spectrum ratio 0.6–0.9, top 0.05–2),
    ``gauss`` (N(0, 0.05²) entries; a slowly decaying spectrum), else small N(0, 0.05²) entries."""
    if kind == "decay" and len(shape) == 2:
        m, n = shape
        return R.with_spectrum(rng, m, n, R.decaying(min(m, n), rng.uniform(0.6, 0.9), rng.uniform(0.05, 2.0)))
    return rng.normal(0.0, 0.05, shape)


def make_family(seed: int, shape, n_tasks: int, kind: str):
    """float32 base ~ N(0, 1) and fine-tunes base + tau_t. ``grid``: base on a 1/8 grid, deltas on a 1/64 grid
    (exact in every dtype, many exact ties); ``zero``: some fine-tunes equal to the base."""
    rng = np.random.default_rng(seed)
    if kind == "grid":
        base = rng.integers(-16, 17, shape) / 8.0
        return base.astype(np.float32), [(base + rng.integers(-8, 9, shape) / 64.0).astype(np.float32)
                                          for _ in range(n_tasks)]
    base = rng.normal(0.0, 1.0, shape)
    xs = []
    for t in range(n_tasks):
        if kind == "zero" and t % 2 == 1:
            xs.append(base.astype(np.float32))
        else:
            xs.append((base + task_matrix(rng, shape, kind)).astype(np.float32))
    return base.astype(np.float32), xs


def store(x32, dtype):
    return ref.encode(np.asarray(x32, np.float32).reshape(-1), dtype).reshape(np.shape(x32))


def values(a, dtype, cast=None):
    """Storage array -> the float32 values the kernel computes with (after the cast dtype's rounding)."""
    return ref.round_to(ref.decode(np.asarray(a).reshape(-1), dtype), cast).reshape(np.shape(a))


def merge(method, inputs, base, *, shape, params=None, out_dtype="float32", cast=None, lam=1.0, seed=0, name="t",
          threads=None, chunk=None, weights=None):
    k = len(inputs)
    return _core.merge_arrays(
        method, inputs, base, list(weights) if weights is not None else [1.0] * k, [1.0] * k,
        out_dtype=out_dtype, normalize=False, cast_dtype=cast, lambda_=lam, rescale="none", seed=seed, name=name,
        model_ids=None, threads=threads, chunk_elems=chunk, shape=list(shape), params=params, gammas=None,
        epsilons=None,
    )




def prepared(data, shape, n_tasks, kinds):
    """Draw data and dtypes: (stored base, stored inputs, base values, input values (shaped), out dtype, cast)."""
    kind = data.draw(st.sampled_from(kinds))
    base32, xs32 = make_family(data.draw(st.integers(0, 2**31)), shape, n_tasks, kind)
    ins, out_dtype, cast = data.draw(io_dtypes(n_tasks + 1))
    base_s = store(base32, ins[0])
    stored = [store(x, dt) for x, dt in zip(xs32, ins[1:])]
    bv = values(base_s, ins[0], cast)
    xv = [values(s, dt, cast) for s, dt in zip(stored, ins[1:])]
    return base_s, stored, bv, xv, out_dtype, cast, kind


def out_ulps(expected, out_dtype) -> float:
    """‖one unit of the output dtype per element‖_F (0 for float32 output: covered by the 2·eps32 term)."""
    if out_dtype == "float32":
        return 0.0
    return float(np.linalg.norm(ref.ulp(np.abs(expected).reshape(-1), out_dtype)))


def spectral_bound(method, bv, xv, params, out_dtype) -> tuple[np.ndarray, float, float]:
    """(expected theta, allowed ‖error‖_F, κ) of a spectral merge: the module docstring's tolerance."""
    taus = R.task_vectors(bv, xv)
    kw = {k: v for k, v in params.items() if k in ("common_space_fraction", "eta")}
    alpha = 1.0 if method == "star" else params.get("alpha", 1.0)
    expected = R.TAU_FUNCTIONS[method](taus, **kw) * alpha + bv.astype(np.float64)
    kappa = R.sensitivity(method, taus, **kw) if len(np.shape(bv)) == 2 else 1.0
    bound = C * EPS * max(kappa, 1.0) * abs(alpha) * sum(np.linalg.norm(t) for t in taus)
    bound += 2 * EPS * float(np.linalg.norm(expected)) + out_ulps(expected, out_dtype)
    return expected, bound, kappa


def assert_spectral(out, method, bv, xv, params, out_dtype, context):
    expected, bound, kappa = spectral_bound(method, bv, xv, params, out_dtype)
    assert out.dtype == OUT_STORAGE[out_dtype] and out.size == expected.size, context
    got = ref.decode(out, out_dtype).astype(np.float64).reshape(expected.shape)
    err = float(np.linalg.norm(got - expected))
    assert err <= bound, f"{context}: ‖got − expected‖_F = {err:.3g} > {bound:.3g} (κ = {kappa:.3g})"


def iso_cts_overflows(shape, n_tasks: int, fraction: float) -> bool:
    """The Iso-CTS corner where rounding gives the task blocks more than min(m, n) slots (see
    ``reference_svd.iso_cts_dims``; tested on its own)."""
    if len(shape) != 2:
        return False
    r = min(shape)
    return round((r - int(r * fraction)) / n_tasks) * n_tasks > r


# ----------------------------------------------------------------------------------------------------------------
# _core.svd
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def matrices(draw, max_dim: int = 40):
    m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    r = min(m, n)
    kind = draw(st.sampled_from(["decay", "gauss", "lowrank"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if kind == "decay":
        a = R.with_spectrum(rng, m, n, R.decaying(r, rng.uniform(0.5, 0.95), scale))
    elif kind == "gauss":
        a = scale * rng.normal(size=(m, n))
    else:  # rank k in float64; float32 rounding leaves a tail of ~1e-7 relative
        a = R.with_spectrum(rng, m, n, R.decaying(draw(st.integers(1, r)), 0.8, scale))
    return a.astype(np.float32)


@st.composite
def rank_rules(draw):
    rules = {}
    if draw(st.booleans()):
        rules["rank"] = draw(st.integers(1, 45))
    if draw(st.booleans()):
        rules["fraction"] = draw(st.one_of(st.sampled_from([1.0, 0.5, 0.1, 0.29]), st.floats(0.01, 1.0)))
    if draw(st.booleans()):
        rules["energy"] = draw(st.one_of(st.sampled_from([1.0, 0.9, 0.5]), st.floats(0.01, 1.0)))
    if draw(st.booleans()):
        rules["nuclear"] = draw(st.one_of(st.sampled_from([1.0, 0.9, 0.5]), st.floats(0.01, 1.0)))
    if draw(st.booleans()):
        rules["sv_epsilon"] = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0, 10.0]))
    return rules


def orthonormality_error(q: np.ndarray) -> float:
    """max |QᵀQ − I| over the columns (0 for an empty Q)."""
    q = q.astype(np.float64)
    return float(np.abs(q.T @ q - np.eye(q.shape[1])).max()) if q.size else 0.0


@settings(**SETTINGS)
@given(a=matrices(), rules=rank_rules(), thr=threads)
def test_exact_svd_matches_lapack_and_the_rank_rules(a, rules, thr):
    """Rank = ``svd_rank`` exactly; S to half a float32 ulp (+ float64 noise); orthonormal U, V to 8 eps32
    (float64 factors rounded to float32: each product of two columns errs by <= 2 eps32); U S Vt equal to the
    reference's rank-r truncation to 64 eps32·‖A‖_F where the cut is not inside a cluster of equal values."""
    ss = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    margin_rules = {k: rules[k] for k in ("energy", "nuclear", "sv_epsilon") if k in rules}
    assume(R.rank_margin(ss, **margin_rules) > 1e-5)
    u, s, vt = _core.svd(a, exact=True, threads=thr, **rules)
    r = R.svd_rank(ss, a.shape, **rules)
    context = f"shape={a.shape} rules={rules}"
    assert len(s) == r, f"{context}: rank {len(s)}, reference {r} (S={ss[:8]})"
    assert u.dtype == s.dtype == vt.dtype == np.float32
    assert u.shape == (a.shape[0], r) and vt.shape == (r, a.shape[1])
    if r == 0:
        return
    assert (np.diff(s) <= 0).all() and (s >= 0).all()
    np.testing.assert_allclose(s, ss[:r], rtol=EPS, atol=1e-12 * ss[0], err_msg=context)
    assert orthonormality_error(u) <= 8 * EPS and orthonormality_error(vt.T) <= 8 * EPS, context
    if r < ss.size:  # the rank-r truncation is unique only when the cut separates different values
        assume(ss[r - 1] - ss[r] > 1e-6 * ss[0])
    ur, sr, vr = R.truncated_svd(a, r)
    want = (ur * sr) @ vr
    got = (u.astype(np.float64) * s) @ vt.astype(np.float64)
    assert np.linalg.norm(got - want) <= 64 * EPS * np.linalg.norm(a.astype(np.float64)), context


@settings(**SETTINGS)
@given(a=matrices(), rules=rank_rules(), exact=st.booleans(), seed=st.integers(0, 2**32), name=st.text(max_size=8))
def test_svd_bytes_do_not_depend_on_threads(a, rules, exact, seed, name):
    outs = [_core.svd(a, exact=exact, seed=seed, name=name, threads=t, **rules) for t in (1, 2, 3, None)]
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert x.shape == y.shape and x.tobytes() == y.tobytes(), f"shape={a.shape} rules={rules} exact={exact}"


def test_randomized_sketch_is_keyed_by_seed_and_name():
    a = np.random.default_rng(0).normal(size=(60, 50)).astype(np.float32)  # flat spectrum: the sketch shows
    kw = dict(rank=8)
    first = _core.svd(a, seed=3, name="w", **kw)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(first, _core.svd(a, seed=3, name="w", **kw)))
    for other in (_core.svd(a, seed=4, name="w", **kw), _core.svd(a, seed=3, name="v", **kw)):
        assert other[1].tobytes() != first[1].tobytes()
    # a sketch as wide as the matrix is the exact SVD: seed and name no longer matter
    wide = _core.svd(a, rank=45, oversample=5, seed=1, name="x")
    exact = _core.svd(a, rank=45, exact=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(wide, exact))


@pytest.mark.parametrize("k", [1, 3, 8, 20])
@pytest.mark.parametrize("shape", [(80, 60), (60, 80), (101, 37)])
def test_randomized_recovers_a_rank_k_matrix(k, shape):
    """A rank-k input (float32 rounding aside): the sketch of k + 10 columns spans its range, so U S Vt is A to
    float32 accuracy (1e-5 relative: ~eps32·√(m n) of products and the basis' QR)."""
    rng = np.random.default_rng(k)
    a = R.with_spectrum(rng, *shape, rng.uniform(0.5, 5.0, k)).astype(np.float32)
    u, s, vt = _core.svd(a, rank=k, seed=k, name="lowrank")
    assert s.shape == (k,)
    err = np.linalg.norm(a - (u.astype(np.float64) * s) @ vt)
    assert err <= 1e-5 * np.linalg.norm(a.astype(np.float64)), err
    assert orthonormality_error(u) <= 1e-5 and orthonormality_error(vt.T) <= 1e-5


@pytest.mark.parametrize("k", [1, 4, 8, 16])
@pytest.mark.parametrize("power_iters", [0, 2])
def test_randomized_within_halko_bounds(k, power_iters):
    """Randomized (p = 10 oversampling) against the optimal rank-k error ‖A − A_k‖_F (Eckart–Young).

    Loose bound, Gaussian matrix (flat-ish Marchenko–Pastur spectrum): Halko, Martinsson & Tropp (2011)
    Thm 10.5 gives E‖A − QQᵀA‖_F <= (1 + k/(p−1))^½·‖A − A_k‖_F without power iterations (they only shrink it),
    and truncating QQᵀA to rank k adds at most ‖A − A_k‖_F (§9.4): ‖A − Â_k‖_F <= (1 + (1 + k/(p−1))^½)·‖A − A_k‖_F,
    an expectation bound that single draws exceed with small probability only. Tight bound, geometric spectrum of
    ratio 0.7: with q = 2 the missed part of the top-k subspace scales as (σ_{k+p+1}/σ_k)^(2q+1) = 0.7^55 ≈ 3e-9,
    so the error is optimal to 1e-3 (with q = 0 to 0.7^11 ≈ 0.02: 5e-2 allowed); float32 rounding adds
    ~eps32·‖A‖_F (64 eps32 allowed). Four seeds each."""
    p = 10
    for seed in range(4):
        rng = np.random.default_rng(100 * k + seed)
        gauss = rng.normal(size=(70, 60))
        steep = R.with_spectrum(rng, 70, 60, R.decaying(60, 0.7))
        tight = 1e-3 if power_iters == 2 else 5e-2
        for a, eps in ((gauss, (1 + k / (p - 1)) ** 0.5), (steep, tight)):
            a32 = a.astype(np.float32)
            u, s, vt = _core.svd(a32, rank=k, oversample=p, power_iters=power_iters, seed=seed, name="halko")
            a64 = a32.astype(np.float64)
            err = float(np.linalg.norm(a64 - (u.astype(np.float64) * s) @ vt))
            optimal = float(np.linalg.norm(np.linalg.svd(a64, compute_uv=False)[k:]))
            assert err <= (1 + eps) * optimal + 64 * EPS * np.linalg.norm(a64), (k, seed, err / optimal)
            assert err >= optimal * (1 - 1e-5), "better than Eckart–Young: not a rank-k approximation"


@settings(**SETTINGS)
@given(a=matrices(max_dim=24))
def test_reconstruction_error_is_monotone_in_rank(a):
    """Exact SVD: ‖A − U_r S_r V_rᵀ‖_F is non-increasing in r (Eckart–Young), up to float32 rounding of the
    factors (8 eps32·‖A‖_F), and ends at ~0 at full rank."""
    a64 = a.astype(np.float64)
    norm = float(np.linalg.norm(a64))
    errs = []
    for r in range(1, min(a.shape) + 1):
        u, s, vt = _core.svd(a, rank=r, exact=True)
        errs.append(float(np.linalg.norm(a64 - (u.astype(np.float64) * s) @ vt)))
    assert all(b <= e + 8 * EPS * norm for e, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= 8 * EPS * norm * math.sqrt(min(a.shape))


@settings(**SETTINGS)
@given(a=matrices(), energy=st.floats(0.05, 1.0), exact=st.booleans())
def test_a_value_rule_keeps_a_prefix_of_the_same_factorization(a, energy, exact):
    """Rules that look at the singular values only truncate: with the same cap (and so the same sketch) the
    result is a byte prefix of the unruled one."""
    cap = max(1, min(a.shape) // 2)
    full = _core.svd(a, rank=cap, exact=exact, seed=5, name="p")
    cut = _core.svd(a, rank=cap, energy=energy, exact=exact, seed=5, name="p")
    r = len(cut[1])
    assert 1 <= r <= len(full[1])
    assert cut[0].tobytes() == np.ascontiguousarray(full[0][:, :r]).tobytes()
    assert cut[1].tobytes() == full[1][:r].tobytes()
    assert cut[2].tobytes() == full[2][:r].tobytes()


def test_nuclear_rule_uses_the_exact_svd():
    a = np.random.default_rng(1).normal(size=(50, 40)).astype(np.float32)
    randomized = _core.svd(a, nuclear=0.5, exact=False, seed=9, name="n")
    exact = _core.svd(a, nuclear=0.5, exact=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(randomized, exact))
    ss = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert len(exact[1]) == R.svd_rank(ss, a.shape, nuclear=0.5)


def test_rank_rule_edge_cases():
    a = R.with_spectrum(np.random.default_rng(2), 9, 7, [4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]).astype(np.float32)
    count = lambda **kw: len(_core.svd(a, exact=True, **kw)[1])  # noqa: E731
    assert count() == 7
    assert count(rank=100) == 7 and count(rank=3) == 3
    assert count(fraction=0.01) == 1  # at least 1
    assert count(fraction=0.29) == math.floor(0.29 * 7) == 2
    assert count(energy=1.0) == 7 and count(nuclear=1.0) == 7
    assert count(energy=16 / (sum(4.0 ** (2 - i) for i in range(7)))) == 1  # exactly the first share: reached
    assert count(sv_epsilon=0.3) == 4 and count(sv_epsilon=100.0) == 0
    assert count(rank=5, sv_epsilon=0.3, energy=0.9999) == 4  # the smallest cap wins
    # a zero matrix: every singular value is <= sv_epsilon = 0, so nothing is kept (the contract's rule)
    u, s, vt = _core.svd(np.zeros((4, 3), np.float32), exact=True)
    assert u.shape == (4, 0) and s.shape == (0,) and vt.shape == (0, 3)
    assert R.svd_rank(np.zeros(3), (4, 3)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(rank=0), dict(fraction=0.0), dict(fraction=1.5), dict(energy=0.0), dict(energy=1.01),
     dict(nuclear=-0.1), dict(nuclear=2.0), dict(sv_epsilon=-1.0), dict(sv_epsilon=float("nan")),
     dict(fraction=float("nan")), dict(energy=float("inf"))],
)
def test_svd_rejects_bad_rules(kwargs):
    with pytest.raises(ParameterError):
        _core.svd(np.ones((3, 4), np.float32), **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_svd_and_polar_reject_non_finite_matrices(bad):
    a = np.ones((3, 4), np.float32)
    a[1, 2] = bad
    with pytest.raises(ParameterError, match="non-finite"):
        _core.svd(a, name="layers.0.w")
    with pytest.raises(ParameterError, match="non-finite"):
        _core.polar(a)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_svd_of_a_non_matrix_is_a_parameter_error(shape):
    with pytest.raises(ParameterError):
        _core.svd(np.ones(shape, np.float32))


def test_svd_input_must_be_a_float32_c_contiguous_matrix():
    with pytest.raises(TypeError):  # the contract's input type; numpy's own conversion error names both dtypes
        _core.svd(np.ones((3, 4), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.svd(np.ones((3, 8), np.float32)[:, ::2])
    with pytest.raises((OverflowError, ParameterError)):  # a negative count does not convert to usize
        _core.svd(np.ones((3, 4), np.float32), rank=-1)


@pytest.mark.parametrize("fn", ["svd", "polar"])
def test_a_fortran_ordered_matrix_is_refused_or_read_correctly(fn):
    a = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    f = np.asfortranarray(a)  # e.g. a transposed C array: delta.T of an embedding
    if fn == "svd":
        want = _core.svd(a, exact=True)[1]
        try:
            got = _core.svd(f, exact=True)[1]
        except ValueError:
            return
    else:
        want = _core.polar(a)
        try:
            got = _core.polar(f)
        except ValueError:
            return
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * EPS)


# ----------------------------------------------------------------------------------------------------------------
# _core.polar
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(a=matrices(), thr=threads)
def test_polar_is_the_orthonormal_procrustes_factor(a, thr):
    """Orthonormal columns (rows for a wide matrix) to 8 eps32 (a float64 factor rounded to float32); equal to
    the reference's P Qᵀ to 4 eps32 + float64 noise amplified by the condition number (inputs with
    σ_max/σ_min > 1e6 have no well-determined factor and are skipped); nearer to A than the reference factor with
    a random sign flip (any other orthonormal matrix is farther: orthogonal Procrustes)."""
    ss = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assume(ss[-1] > 1e-6 * ss[0])
    p = _core.polar(a, threads=thr)
    assert p.shape == a.shape and p.dtype == np.float32
    tall = a.shape[0] >= a.shape[1]
    assert orthonormality_error(p if tall else p.T) <= 8 * EPS
    want = R.polar(a)
    cond = ss[0] / ss[-1]
    np.testing.assert_allclose(p, want, rtol=0, atol=4 * EPS + 1e-13 * cond)
    assert p.tobytes() == _core.polar(a, threads=1).tobytes(), "polar bytes depend on the thread count"
    flip = want * np.where(np.arange(want.shape[1]) == 0, -1.0, 1.0)[None, :] if tall else \
        want * np.where(np.arange(want.shape[0]) == 0, -1.0, 1.0)[:, None]
    a64 = a.astype(np.float64)
    assert np.linalg.norm(a64 - p) <= np.linalg.norm(a64 - flip) + 8 * EPS * np.linalg.norm(a64)


@settings(**SETTINGS)
@given(a=matrices())
def test_polar_of_the_transpose_is_the_transpose(a):
    """A wide matrix's factor is computed as the transposed factor of its transpose, so for a non-square matrix
    this holds bytewise; a square one is factored both ways (4 eps32 apart, well-conditioned ones)."""
    got = _core.polar(np.ascontiguousarray(a.T))
    want = np.ascontiguousarray(_core.polar(a).T)
    if a.shape[0] != a.shape[1]:
        assert got.tobytes() == want.tobytes()
    else:
        ss = np.linalg.svd(a.astype(np.float64), compute_uv=False)
        assume(ss[-1] > 1e-6 * ss[0])
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS + 1e-13 * ss[0] / ss[-1])


def test_polar_of_an_orthonormal_matrix_is_itself():
    q = R.orthonormal(np.random.default_rng(3), 30, 12).astype(np.float32)
    np.testing.assert_allclose(_core.polar(q), q, rtol=0, atol=8 * EPS)
    np.testing.assert_allclose(_core.polar(3.5 * q), q, rtol=0, atol=8 * EPS)  # scale does not matter


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
        assume(min(R.star_rank_margin(t, params["eta"]) for t in R.task_vectors(bv, xv)) > 1e-4)
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
    got = ref.decode(out, out_dtype).astype(np.float64).reshape(shape)
    err = float(np.linalg.norm(got - expected))
    assert err <= bound + 5e-3 * float(np.linalg.norm(expected - bv)), (err, bound)


def test_tsv_m_single_task_is_task_arithmetic():
    base, (x,) = make_family(30, (23, 17), 1, "gauss")
    for exact in (0.0, 1.0):
        got = merge("tsv_m", [x], base, shape=base.shape, params={"alpha": 0.6, "exact_svd": exact})
        tau = x.astype(np.float64) - base
        np.testing.assert_allclose(got.reshape(base.shape), base + 0.6 * tau, rtol=0,
                                   atol=64 * EPS * (np.abs(tau).max() + np.abs(base).max()))


def test_iso_c_is_mean_singular_value_times_the_polar_factor_of_the_sum():
    """Built from the core's own pieces: mean(S of _core.svd(M)) · _core.polar(M), M = Σ tau_t."""
    base, xs = make_family(31, (26, 19), 3, "decay")
    taus = [x - base for x in xs]  # float32, as the kernel forms them
    m_sum = (taus[0] + taus[1] + taus[2]).astype(np.float32)
    s = _core.svd(m_sum, exact=True)[1]
    want = base + 1.5 * (float(np.mean(s.astype(np.float64))) * _core.polar(m_sum).astype(np.float64))
    got = merge("iso_c", xs, base, shape=base.shape, params={"alpha": 1.5}).reshape(base.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * EPS * float(np.abs(want).max()))
    # and the reference's closed form ‖M‖_*/min(m, n)·polar(M)
    closed = base + 1.5 * np.linalg.svd(m_sum.astype(np.float64), compute_uv=False).sum() / 19 * R.polar(m_sum)
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
@pytest.mark.parametrize("dtype", ref.DTYPES)
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
    ``reference_svd.iso_cts_dims`` are both acceptable, a crash is not."""
    assert iso_cts_overflows(shape, n_tasks, fraction)
    base, xs = make_family(35, shape, n_tasks, "gauss")
    params = {"common_space_fraction": fraction}
    try:
        out = merge("iso_cts", xs, base, shape=shape, params=params)
    except ParameterError:
        return
    assert_spectral(out, "iso_cts", base, xs, params, "float32", f"iso_cts {shape} T={n_tasks} f={fraction}")


# ----------------------------------------------------------------------------------------------------------------
# TALL masks and consensus
# ----------------------------------------------------------------------------------------------------------------

DYADIC = (0.0, 0.25, 0.5, 1.0, 2.0)


@settings(**SETTINGS)
@given(data=st.data(), method=st.sampled_from(["consensus", "tall_masks"]))
def test_tall_methods_match_the_reference(data, method):
    shape = data.draw(shapes())
    n_tasks = data.draw(st.integers(1, 4))
    base_s, stored, bv, xv, out_dtype, cast, kind = prepared(data, shape, n_tasks, ("gauss", "grid", "zero"))
    tall = data.draw(st.one_of(st.sampled_from((0.4, 0.2, 0.6) + DYADIC), st.floats(0.0, 3.0)))
    if method == "consensus":
        k = data.draw(st.integers(0, n_tasks + 1))
        lam = data.draw(st.sampled_from([1.0, 0.5, 2.0, -1.0, 0.3]))
        params = {"k": float(k), "tall_mask_lambda": tall}
        expected = R.consensus(bv, xv, k=k, tall_mask_lambda=tall, lam=lam)
    else:
        task = data.draw(st.integers(0, n_tasks - 1))
        lam = 1.0
        params = {"task": float(task), "tall_mask_lambda": tall}
        expected = R.tall_masks(bv, xv, task=task, tall_mask_lambda=tall)
    # grid data: task vectors and their sums are exact, so both sides of every comparison are the same single
    # IEEE rounding of lambda·|exact value| in any float64 kernel: nothing to skip
    exact_data = kind == "grid"
    taus = R.exact_task_vectors(bv, xv)
    amb = np.zeros(np.shape(bv), bool) if exact_data else R.tall_mask_ambiguous(taus, tall)

    def call(chunk, thr):
        return merge(method, stored, base_s, shape=shape, params=params, out_dtype=out_dtype, cast=cast, lam=lam,
                     threads=thr, chunk=chunk)

    out = run_variants(call, data.draw(variants()))
    got = ref.decode(out, out_dtype).astype(np.float64).reshape(np.shape(bv))
    # one float32 rounding of theta, then one of a 16-bit output dtype
    tol = ref.ulp(np.abs(expected), "float32")
    if out_dtype != "float32":
        tol = tol + ref.ulp(np.abs(expected) + tol, out_dtype)
    bad = ~amb & ~(np.abs(got - expected) <= tol)
    assert not bad.any(), (f"{method} {params} lam={lam} shape={shape} {kind}: {int(bad.sum())} elements off; "
                           f"got {got[bad][:5]} expected {expected[bad][:5]}")
    # a draw where many elements sit on a mask threshold (tiny bf16 tensors with a dyadic lambda) compared too
    # little: it counts as invalid, so hypothesis draws another, rather than failing at random
    assume(amb.mean() <= 0.05 or amb.sum() <= 2)
    # elements left out of the merge are the base itself (rounded to the output dtype only)
    kept = expected != bv
    base_out = ref.round_to(bv.astype(np.float32), out_dtype)
    np.testing.assert_array_equal(got[~kept & ~amb], base_out[~kept & ~amb])


def test_consensus_k0_is_task_arithmetic_and_k_above_t_is_the_base():
    base, xs = make_family(40, (13, 11), 3, "gauss")
    ta = merge("task_arithmetic", xs, base, shape=base.shape, lam=0.7)
    k0 = merge("consensus", xs, base, shape=base.shape, params={"k": 0.0}, lam=0.7)
    want = base + 0.7 * np.sum([x.astype(np.float64) - base for x in xs], axis=0)
    np.testing.assert_allclose(k0.reshape(base.shape), want, rtol=0, atol=float(np.max(ref.ulp(want, "float32"))))
    np.testing.assert_allclose(k0, ta, rtol=0, atol=8 * EPS * float(np.abs(want).max()))
    for k in (4.0, 10.0):
        assert merge("consensus", xs, base, shape=base.shape, params={"k": k}).tobytes() == base.tobytes()


def test_tall_mask_is_strict_and_lambda_zero_keeps_every_changed_element():
    # |tau_0| = 1, |tau_MTL - tau_0| = |tau_1| = 2: lambda 0.5 gives 1 > 1, false (strict); 0.49 gives true
    base = np.zeros(3, np.float32)
    x0 = np.array([1.0, 0.0, 1.0], np.float32)
    x1 = np.array([2.0, 2.0, -2.0], np.float32)
    at = lambda lam_: merge("tall_masks", [x0, x1], base, shape=(3,), params={"task": 0.0,  # noqa: E731
                                                                              "tall_mask_lambda": lam_})
    np.testing.assert_array_equal(at(0.5), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(at(0.49), [3.0, 0.0, -1.0])
    # lambda 0: m_t = |tau_t| > 0, so task 0 is rebuilt wherever it changed anything
    np.testing.assert_array_equal(at(0.0), [3.0, 0.0, -1.0])


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
def test_a_non_finite_input_matrix_is_a_parameter_error_naming_the_tensor(method):
    base, xs = make_family(53, (6, 5), 2, "gauss")
    xs[1] = xs[1].copy()
    xs[1][2, 3] = np.nan
    with pytest.raises(ParameterError, match=r"layers\.3\.w.*non-finite|non-finite.*layers\.3\.w"):
        merge(method, xs, base, shape=base.shape, name="layers.3.w")
