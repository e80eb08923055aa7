"""Cross-method identities of the engine's kernels: where the math of two methods coincides, their outputs must be
the same bytes (both run the same float32 pipeline), which checks the new kernels against the long-tested ones
(ties, task_arithmetic) without any reference tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import SETTINGS, densities, dtypes, make_data, merge, shapes, store
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import codec

_engine = pytest.importorskip("ferromerge._engine")

weights = st.one_of(st.floats(0.05, 2.0), st.integers(-32, 32).map(lambda i: i / 16))


@st.composite
def gta_case(draw):
    shape = draw(shapes())
    k = draw(st.integers(1, 4))
    dtype = draw(dtypes)
    b, xs = make_data(draw(st.integers(0, 2**31)), shape, k, draw(st.sampled_from(["near", "grid"])),
                      draw(st.sampled_from([0.0, 0.2])))
    return dict(
        shape=shape, base=store(b, dtype), inputs=[store(x, dtype) for x in xs],
        weights=draw(st.lists(weights, min_size=k, max_size=k)),
        densities=draw(st.lists(densities, min_size=k, max_size=k)),
        normalize=draw(st.booleans()), lam=draw(st.sampled_from([1.0, 0.5, -1.3])),
        rescale=draw(st.sampled_from(["none", "l1", "inverse_density"])), out_dtype=draw(dtypes),
    )


def run(method, c, **over):
    kw = dict(weights=c["weights"], densities=c["densities"], normalize=c["normalize"], lam=c["lam"],
              rescale=c["rescale"], out_dtype=c["out_dtype"])
    kw.update(over)
    return merge(method, c["inputs"], c["base"], shape=c["shape"], **kw)


@settings(**SETTINGS)
@given(c=gta_case(), per_row=st.booleans())
def test_breadcrumbs_ties_with_gamma_zero_is_ties(c, per_row):
    """gamma 0 drops no outliers: breadcrumbs keeps the int(d·n) largest |δ| with the same tie rule as TIES' trim,
    so breadcrumbs_ties equals ties whenever int(d·n) >= 1 (TIES keeps at least one)."""
    n = int(np.prod(c["shape"]))
    assume(all(d >= 1.0 or int(d * n) >= 1 for d in c["densities"]))
    got = run("breadcrumbs_ties", c, gammas=[0.0] * len(c["inputs"]))
    assert got.tobytes() == run("ties", c).tobytes()
    if len(c["shape"]) == 1:  # a 1-D tensor is one row
        assert run("breadcrumbs_ties", c, gammas=[0.0] * len(c["inputs"]), params={"per_row": 1.0}).tobytes() == \
            got.tobytes()


@settings(**SETTINGS)
@given(c=gta_case())
def test_density_one_is_task_arithmetic_or_ties(c):
    """density 1 keeps every δ untouched in breadcrumbs and della (any gamma / epsilon, any rescale): the linear
    variants are task arithmetic, the consensus variants TIES at density 1."""
    k = len(c["inputs"])
    ones = [1.0] * k
    ta = run("task_arithmetic", c, densities=ones, rescale="none")
    ties = run("ties", c, densities=ones, rescale="none")
    assert run("breadcrumbs", c, densities=ones, gammas=[0.3] * k).tobytes() == ta.tobytes()
    assert run("della_linear", c, densities=ones, epsilons=[0.4] * k).tobytes() == ta.tobytes()
    assert run("breadcrumbs_ties", c, densities=ones, gammas=[0.3] * k).tobytes() == ties.tobytes()
    assert run("della", c, densities=ones, epsilons=[0.4] * k).tobytes() == ties.tobytes()


@settings(**SETTINGS)
@given(shape=shapes(), seed=st.integers(0, 2**31), dtype=dtypes, out_dtype=dtypes)
def test_single_model_ram_sce_equal_task_arithmetic(shape, seed, dtype, out_dtype):
    """One model: every active RAM entry is unique (λ = 1 for ramplus_tl), and SCE's only weight is 1 with every
    non-zero δ agreeing with itself, so all three are b + δ where |δ| > epsilon (every non-zero δ here)."""
    b, (x,) = make_data(seed, shape, 1, "grid", 0.3)  # grid: every non-zero |δ| >= 1/64 > epsilon
    bs, xs = store(b, dtype), [store(x, dtype)]
    ta = merge("task_arithmetic", xs, bs, shape=shape, out_dtype=out_dtype)
    for method in ("ram", "ramplus_tl", "sce"):
        assert merge(method, xs, bs, shape=shape, out_dtype=out_dtype).tobytes() == ta.tobytes(), method


@settings(**SETTINGS)
@given(shape=shapes(), seed=st.integers(0, 2**31), dtype=dtypes)
def test_nearswap_with_a_large_t_is_the_model(shape, seed, dtype):
    """t >= max |a − b| makes every weight 1: the other model comes back exactly (w·b + 0·a)."""
    b, (x,) = make_data(seed, shape, 1, "near", 0.2)
    bs, xs = store(b, dtype), store(x, dtype)
    t = float(np.abs(codec.decode(xs.reshape(-1), dtype) - codec.decode(bs.reshape(-1), dtype)).max()) + 1e-3
    out = merge("nearswap", [xs], bs, shape=shape, params={"t": t}, out_dtype=dtype)
    np.testing.assert_array_equal(out, xs.reshape(-1))
