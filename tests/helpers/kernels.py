"""Shared builders of the kernel property suites (tests/kernels/): the chunking/thread variants runner, the dtype
strategies, and the data, call and comparison helpers of the method kernels (every family but the spectral one, whose
helpers are in ``helpers.spectral``).

Every property checks two things: the output bytes are identical for every ``chunk_elems`` and thread count
(``run_variants``), and the decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a
16-bit output dtype (``check``). ``RTOL`` is 1e-5 (about 80 float32 epsilons): the engine does float32 element math
with float64 dot products, the reference float64 throughout, and ``scale`` already carries each method's
amplification (1/sinθ, 1/‖mean‖, t of model_stock, divisors); the references themselves agree with mergekit's
float32 torch code to 3e-6 of ``scale``. Elements a reference marks ambiguous (a discontinuous decision within
rounding of its threshold) are skipped, and must stay rare.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from reference import codec
from reference.result import Ref, assert_matches

_engine = pytest.importorskip("ferromerge._engine")

#: the storage dtypes the kernels read and write
dtypes = st.sampled_from(codec.DTYPES)


def run_variants(call, variants):
    """Run ``call(chunk_elems, threads)`` for every variant; assert identical bytes; return the first output."""
    outs = [(c, t, call(c, t)) for c, t in variants]
    first = outs[0][2]
    for c, t, o in outs[1:]:
        assert o.dtype == first.dtype and o.shape == first.shape
        assert o.tobytes() == first.tobytes(), (
            f"output bytes differ: chunk_elems={outs[0][0]}, threads={outs[0][1]} vs chunk_elems={c}, threads={t}; "
            f"first differing element {int(np.flatnonzero(o.view(np.uint8) != first.view(np.uint8))[0]) // o.itemsize}"
        )
    return first


@st.composite
def io_dtypes(draw, n_inputs: int):
    """Storage dtypes of the inputs (all equal half the time), the output dtype and an optional cast dtype."""
    if draw(st.booleans()):
        ins = [draw(dtypes)] * n_inputs
    else:
        ins = draw(st.lists(dtypes, min_size=n_inputs, max_size=n_inputs))
    return ins, draw(dtypes), draw(st.one_of(st.none(), st.none(), dtypes))


SETTINGS = dict(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.filter_too_much])
RTOL = 1e-5
OUT_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


chunk_sizes = st.one_of(st.integers(1, 64), st.sampled_from([None, 97, 1000, 4096, 5000]))
threads = st.sampled_from([1, 2, 3])
positive_weights = st.floats(0.05, 2.0, allow_nan=False, allow_infinity=False)
dyadic_weights = st.integers(-32, 32).map(lambda i: i / 16)

# strategies of the GTA-family parameters, shared by the breadcrumbs / della properties and the identities
densities = st.one_of(st.sampled_from([1.0, 0.5, 0.7, 0.29, 0.57, 0.1, 0.9, 0.999, 0.01]),
                      st.floats(0.001, 1.0, allow_nan=False))
gammas = st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.6]), st.floats(0.0, 0.9, allow_nan=False))



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
    return codec.encode(np.asarray(x32, np.float32).reshape(-1), dtype).reshape(np.shape(x32))


def values(a, dtype, cast=None):
    """Storage array -> the float32 values the kernel computes with (after the cast dtype's rounding)."""
    return codec.round_to(codec.decode(np.asarray(a).reshape(-1), dtype), cast).reshape(np.shape(a))


def kernel_merge(method, inputs, base, weights, densities, *, out_dtype, normalize, cast_dtype=None, lambda_=1.0,
                 rescale="none", seed=0, name="", model_ids=None, threads=None, chunk_elems=None, shape=None,
                 params=None, gammas=None, epsilons=None, allow_nonfinite=False):
    """One in-memory kernel call from the flat arguments these suites were written with: builds the plan's
    ``method`` object and the per-input values, and calls ``_engine.merge_arrays``."""
    method_object = {"name": method, "normalize": normalize, "lambda": lambda_, "rescale": rescale, "seed": seed}
    if params is not None:
        method_object["params"] = dict(params)
    values = _engine.input_values(weights, densities, gammas, epsilons, model_ids)
    return _engine.merge_arrays(method_object, inputs, base, values, out_dtype=out_dtype, cast_dtype=cast_dtype,
                                name=name, shape=shape, threads=threads, chunk_elems=chunk_elems,
                                allow_nonfinite=allow_nonfinite)


def merge(method, inputs, base, *, shape, weights=None, densities=None, params=None, gammas=None, epsilons=None,
          out_dtype="float32", normalize=False, lam=1.0, rescale="none", cast=None, seed=0, name="t",
          model_ids=None, threads=None, chunk=None):
    k = len(inputs)
    return kernel_merge(
        method, inputs, base, list(weights) if weights is not None else [1.0] * k,
        list(densities) if densities is not None else [1.0] * k, out_dtype=out_dtype, normalize=normalize,
        cast_dtype=cast, lambda_=lam, rescale=rescale, seed=seed, name=name, model_ids=model_ids, threads=threads,
        chunk_elems=chunk, shape=list(shape) if shape is not None else None, params=params, gammas=gammas,
        epsilons=epsilons,
    )




def check(out, expected: Ref, out_dtype: str, context: str, max_ambiguous: float = 0.25):
    assert out.dtype == OUT_STORAGE[out_dtype], (out.dtype, out_dtype)
    assert out.size == expected.out.size
    assert_matches(codec.decode(out, out_dtype), expected, out_dtype, rtol=RTOL, context=context)
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
