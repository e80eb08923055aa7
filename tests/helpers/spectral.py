"""Shared builders of the SVD-kernel suites (tests/kernels/test_linalg.py, test_spectral.py, test_tall.py): their
strategies, task-vector families, the ``_engine.merge_arrays`` call and the spectral tolerance.

The spectral merges do their products in float32 on float32 factors. A backward-stable step lands within c·eps32 of
an exact step on a perturbed input, so the merge lands within c·eps32·κ·Σ‖tau_t‖_F of the float64 reference, κ
being the method's amplification of such perturbations (``reference.spectral.sensitivity``):
‖got − expected‖_F <= C·eps32·max(κ, 1)·|alpha|·Σ‖tau_t‖_F + 2·eps32·‖expected‖_F + ‖ulp_out(expected)‖_F, with
C = 128 as in tests/kernels/test_torch_spectral.py (observed constants there <= 18) and one unit of a 16-bit output
dtype per element. Inputs with κ >= 1e4 have no unique answer and are skipped (``spectral_bound``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import OUT_STORAGE, io_dtypes, kernel_merge, store, threads, values
from hypothesis import HealthCheck
from hypothesis import strategies as st
from reference import arrays, codec, linalg
from reference import spectral as spectral_ref


SETTINGS = dict(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EPS = arrays.EPS32
C = 128.0
KAPPA_MAX = 1e4
SPECTRAL = ("tsv_m", "iso_c", "iso_cts", "star")


#: the SVD suites never draw 5000-element chunks (helpers.kernels does)
chunk_sizes = st.one_of(st.integers(1, 64), st.sampled_from([None, 97, 1000, 4096]))


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
        spectrum = linalg.decaying(min(m, n), rng.uniform(0.6, 0.9), rng.uniform(0.05, 2.0))
        return linalg.with_spectrum(rng, m, n, spectrum)
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


def merge(method, inputs, base, *, shape, params=None, out_dtype="float32", cast=None, lam=1.0, seed=0, name="t",
          threads=None, chunk=None, weights=None, allow_nonfinite=False):
    k = len(inputs)
    return kernel_merge(
        method, inputs, base, list(weights) if weights is not None else [1.0] * k, [1.0] * k,
        out_dtype=out_dtype, normalize=False, cast_dtype=cast, lambda_=lam, rescale="none", seed=seed, name=name,
        model_ids=None, threads=threads, chunk_elems=chunk, shape=list(shape), params=params, gammas=None,
        epsilons=None, allow_nonfinite=allow_nonfinite,
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
    return float(np.linalg.norm(codec.ulp(np.abs(expected).reshape(-1), out_dtype)))


def spectral_bound(method, bv, xv, params, out_dtype) -> tuple[np.ndarray, float, float]:
    """(expected theta, allowed ‖error‖_F, κ) of a spectral merge: the module docstring's tolerance."""
    taus = arrays.task_vectors(bv, xv)
    kw = {k: v for k, v in params.items() if k in ("common_space_fraction", "eta")}
    alpha = 1.0 if method == "star" else params.get("alpha", 1.0)
    expected = spectral_ref.TAU_FUNCTIONS[method](taus, **kw) * alpha + bv.astype(np.float64)
    kappa = spectral_ref.sensitivity(method, taus, **kw) if len(np.shape(bv)) == 2 else 1.0
    bound = C * EPS * max(kappa, 1.0) * abs(alpha) * sum(np.linalg.norm(t) for t in taus)
    bound += 2 * EPS * float(np.linalg.norm(expected)) + out_ulps(expected, out_dtype)
    return expected, bound, kappa


def assert_spectral(out, method, bv, xv, params, out_dtype, context):
    expected, bound, kappa = spectral_bound(method, bv, xv, params, out_dtype)
    assert out.dtype == OUT_STORAGE[out_dtype] and out.size == expected.size, context
    got = codec.decode(out, out_dtype).astype(np.float64).reshape(expected.shape)
    err = float(np.linalg.norm(got - expected))
    assert err <= bound, f"{context}: ‖got − expected‖_F = {err:.3g} > {bound:.3g} (κ = {kappa:.3g})"


def iso_cts_overflows(shape, n_tasks: int, fraction: float) -> bool:
    """The Iso-CTS corner where rounding gives the task blocks more than min(m, n) slots (see
    ``reference.spectral.iso_cts_dims``; tested on its own)."""
    if len(shape) != 2:
        return False
    r = min(shape)
    return round((r - int(r * fraction)) / n_tasks) * n_tasks > r
