"""The SVD and polar kernels against ``reference.linalg``: ``_core.svd`` (exact and randomized, rank rules) and
``_core.polar``. Their output bytes are the same at every thread count (1–3).

Tolerances: ``_core.svd`` (exact) and ``_core.polar`` factor in float64 and round the factors to float32, as does
the reference's LAPACK in float64 on the same float32 input: singular values agree to half a float32 ulp plus
float64 noise, factors to a few float32 ulps, and the chosen rank exactly wherever no rank threshold lies within
1e-5 of a cumulative sum (``reference.linalg.rank_margin``; the float32-rounded singular values move sums by
~1e-7).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.kernels import threads
from helpers.spectral import EPS, SETTINGS
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import linalg

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402
if not hasattr(_engine, "svd"):
    pytest.skip("needs the extension with _core.svd (rebuild)", allow_module_level=True)


ParameterError = errors.ParameterError


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
        a = linalg.with_spectrum(rng, m, n, linalg.decaying(r, rng.uniform(0.5, 0.95), scale))
    elif kind == "gauss":
        a = scale * rng.normal(size=(m, n))
    else:  # rank k in float64; float32 rounding leaves a tail of ~1e-7 relative
        a = linalg.with_spectrum(rng, m, n, linalg.decaying(draw(st.integers(1, r)), 0.8, scale))
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
    assume(linalg.rank_margin(ss, **margin_rules) > 1e-5)
    u, s, vt = _engine.svd(a, exact=True, threads=thr, **rules)
    r = linalg.svd_rank(ss, a.shape, **rules)
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
    ur, sr, vr = linalg.truncated_svd(a, r)
    want = (ur * sr) @ vr
    got = (u.astype(np.float64) * s) @ vt.astype(np.float64)
    assert np.linalg.norm(got - want) <= 64 * EPS * np.linalg.norm(a.astype(np.float64)), context


@settings(**SETTINGS)
@given(a=matrices(), rules=rank_rules(), exact=st.booleans(), seed=st.integers(0, 2**32), name=st.text(max_size=8))
def test_svd_bytes_do_not_depend_on_threads(a, rules, exact, seed, name):
    outs = [_engine.svd(a, exact=exact, seed=seed, name=name, threads=t, **rules) for t in (1, 2, 3, None)]
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert x.shape == y.shape and x.tobytes() == y.tobytes(), f"shape={a.shape} rules={rules} exact={exact}"


def test_randomized_sketch_is_keyed_by_seed_and_name():
    a = np.random.default_rng(0).normal(size=(60, 50)).astype(np.float32)  # flat spectrum: the sketch shows
    kw = dict(rank=8)
    first = _engine.svd(a, seed=3, name="w", **kw)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(first, _engine.svd(a, seed=3, name="w", **kw)))
    for other in (_engine.svd(a, seed=4, name="w", **kw), _engine.svd(a, seed=3, name="v", **kw)):
        assert other[1].tobytes() != first[1].tobytes()
    # a sketch as wide as the matrix is the exact SVD: seed and name no longer matter
    wide = _engine.svd(a, rank=45, oversample=5, seed=1, name="x")
    exact = _engine.svd(a, rank=45, exact=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(wide, exact))


@pytest.mark.parametrize("k", [1, 3, 8, 20])
@pytest.mark.parametrize("shape", [(80, 60), (60, 80), (101, 37)])
def test_randomized_recovers_a_rank_k_matrix(k, shape):
    """A rank-k input (float32 rounding aside): the sketch of k + 10 columns spans its range, so U S Vt is A to
    float32 accuracy (1e-5 relative: ~eps32·√(m n) of products and the basis' QR)."""
    rng = np.random.default_rng(k)
    a = linalg.with_spectrum(rng, *shape, rng.uniform(0.5, 5.0, k)).astype(np.float32)
    u, s, vt = _engine.svd(a, rank=k, seed=k, name="lowrank")
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
        steep = linalg.with_spectrum(rng, 70, 60, linalg.decaying(60, 0.7))
        tight = 1e-3 if power_iters == 2 else 5e-2
        for a, eps in ((gauss, (1 + k / (p - 1)) ** 0.5), (steep, tight)):
            a32 = a.astype(np.float32)
            u, s, vt = _engine.svd(a32, rank=k, oversample=p, power_iters=power_iters, seed=seed, name="halko")
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
        u, s, vt = _engine.svd(a, rank=r, exact=True)
        errs.append(float(np.linalg.norm(a64 - (u.astype(np.float64) * s) @ vt)))
    assert all(b <= e + 8 * EPS * norm for e, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= 8 * EPS * norm * math.sqrt(min(a.shape))


@settings(**SETTINGS)
@given(a=matrices(), energy=st.floats(0.05, 1.0), exact=st.booleans())
def test_a_value_rule_keeps_a_prefix_of_the_same_factorization(a, energy, exact):
    """Rules that look at the singular values only truncate: with the same cap (and so the same sketch) the
    result is a byte prefix of the unruled one."""
    cap = max(1, min(a.shape) // 2)
    full = _engine.svd(a, rank=cap, exact=exact, seed=5, name="p")
    cut = _engine.svd(a, rank=cap, energy=energy, exact=exact, seed=5, name="p")
    r = len(cut[1])
    assert 1 <= r <= len(full[1])
    assert cut[0].tobytes() == np.ascontiguousarray(full[0][:, :r]).tobytes()
    assert cut[1].tobytes() == full[1][:r].tobytes()
    assert cut[2].tobytes() == full[2][:r].tobytes()


def test_nuclear_rule_uses_the_exact_svd():
    a = np.random.default_rng(1).normal(size=(50, 40)).astype(np.float32)
    randomized = _engine.svd(a, nuclear=0.5, exact=False, seed=9, name="n")
    exact = _engine.svd(a, nuclear=0.5, exact=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(randomized, exact))
    ss = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert len(exact[1]) == linalg.svd_rank(ss, a.shape, nuclear=0.5)


def test_rank_rule_edge_cases():
    a = linalg.with_spectrum(np.random.default_rng(2), 9, 7,
                             [4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]).astype(np.float32)
    count = lambda **kw: len(_engine.svd(a, exact=True, **kw)[1])  # noqa: E731
    assert count() == 7
    assert count(rank=100) == 7 and count(rank=3) == 3
    assert count(fraction=0.01) == 1  # at least 1
    assert count(fraction=0.29) == math.floor(0.29 * 7) == 2
    assert count(energy=1.0) == 7 and count(nuclear=1.0) == 7
    assert count(energy=16 / (sum(4.0 ** (2 - i) for i in range(7)))) == 1  # exactly the first share: reached
    assert count(sv_epsilon=0.3) == 4 and count(sv_epsilon=100.0) == 0
    assert count(rank=5, sv_epsilon=0.3, energy=0.9999) == 4  # the smallest cap wins
    # a zero matrix: every singular value is <= sv_epsilon = 0, so nothing is kept (the contract's rule)
    u, s, vt = _engine.svd(np.zeros((4, 3), np.float32), exact=True)
    assert u.shape == (4, 0) and s.shape == (0,) and vt.shape == (0, 3)
    assert linalg.svd_rank(np.zeros(3), (4, 3)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(rank=0), dict(fraction=0.0), dict(fraction=1.5), dict(energy=0.0), dict(energy=1.01),
     dict(nuclear=-0.1), dict(nuclear=2.0), dict(sv_epsilon=-1.0), dict(sv_epsilon=float("nan")),
     dict(fraction=float("nan")), dict(energy=float("inf"))],
)
def test_svd_rejects_bad_rules(kwargs):
    with pytest.raises(ParameterError):
        _engine.svd(np.ones((3, 4), np.float32), **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_svd_and_polar_reject_non_finite_matrices(bad):
    a = np.ones((3, 4), np.float32)
    a[1, 2] = bad
    with pytest.raises(ParameterError, match="non-finite"):
        _engine.svd(a, name="layers.0.w")
    with pytest.raises(ParameterError, match="non-finite"):
        _engine.polar(a)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_svd_of_a_non_matrix_is_a_parameter_error(shape):
    with pytest.raises(ParameterError):
        _engine.svd(np.ones(shape, np.float32))


def test_svd_input_must_be_a_float32_c_contiguous_matrix():
    with pytest.raises(TypeError):  # the contract's input type; numpy's own conversion error names both dtypes
        _engine.svd(np.ones((3, 4), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _engine.svd(np.ones((3, 8), np.float32)[:, ::2])
    with pytest.raises((OverflowError, ParameterError)):  # a negative count does not convert to usize
        _engine.svd(np.ones((3, 4), np.float32), rank=-1)


@pytest.mark.parametrize("fn", ["svd", "polar"])
def test_a_fortran_ordered_matrix_is_refused_or_read_correctly(fn):
    a = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    f = np.asfortranarray(a)  # e.g. a transposed C array: delta.T of an embedding
    if fn == "svd":
        want = _engine.svd(a, exact=True)[1]
        try:
            got = _engine.svd(f, exact=True)[1]
        except ValueError:
            return
    else:
        want = _engine.polar(a)
        try:
            got = _engine.polar(f)
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
    p = _engine.polar(a, threads=thr)
    assert p.shape == a.shape and p.dtype == np.float32
    tall = a.shape[0] >= a.shape[1]
    assert orthonormality_error(p if tall else p.T) <= 8 * EPS
    want = linalg.polar(a)
    cond = ss[0] / ss[-1]
    np.testing.assert_allclose(p, want, rtol=0, atol=4 * EPS + 1e-13 * cond)
    assert p.tobytes() == _engine.polar(a, threads=1).tobytes(), "polar bytes depend on the thread count"
    flip = want * np.where(np.arange(want.shape[1]) == 0, -1.0, 1.0)[None, :] if tall else \
        want * np.where(np.arange(want.shape[0]) == 0, -1.0, 1.0)[:, None]
    a64 = a.astype(np.float64)
    assert np.linalg.norm(a64 - p) <= np.linalg.norm(a64 - flip) + 8 * EPS * np.linalg.norm(a64)


@settings(**SETTINGS)
@given(a=matrices())
def test_polar_of_the_transpose_is_the_transpose(a):
    """A wide matrix's factor is computed as the transposed factor of its transpose, so for a non-square matrix
    this holds bytewise; a square one is factored both ways (4 eps32 apart, well-conditioned ones)."""
    got = _engine.polar(np.ascontiguousarray(a.T))
    want = np.ascontiguousarray(_engine.polar(a).T)
    if a.shape[0] != a.shape[1]:
        assert got.tobytes() == want.tobytes()
    else:
        ss = np.linalg.svd(a.astype(np.float64), compute_uv=False)
        assume(ss[-1] > 1e-6 * ss[0])
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS + 1e-13 * ss[0] / ss[-1])


def test_polar_of_an_orthonormal_matrix_is_itself():
    q = linalg.orthonormal(np.random.default_rng(3), 30, 12).astype(np.float32)
    np.testing.assert_allclose(_engine.polar(q), q, rtol=0, atol=8 * EPS)
    np.testing.assert_allclose(_engine.polar(3.5 * q), q, rtol=0, atol=8 * EPS)  # scale does not matter
