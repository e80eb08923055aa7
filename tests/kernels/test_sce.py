"""Property tests of ``merge/methods/sce.rs`` in ``_core.merge_arrays`` against ``reference.sce``; the
selection mask is compared exactly.

Every property checks that the output bytes are identical for every ``chunk_elems`` and thread count, and that the
decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a 16-bit output dtype
(``helpers.kernels``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import (
    RTOL,
    SETTINGS,
    check,
    chunk_sizes,
    io_dtypes,
    make_data,
    merge,
    run_variants,
    shapes,
    store,
    threads,
    values,
    variants,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import sce as sce_ref
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import assert_matches

_engine = pytest.importorskip("ferromerge._engine")


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
    deltas = [task_arithmetic_ref.task_vector(x, bv) for x in xv]
    if kind != "grid":
        assume(sce_ref.sce_topk_is_unambiguous(deltas, select_topk))
    expected = sce_ref.sce(bv, xv, select_topk=select_topk)
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
    expected = sce_ref.sce_topk_mask(xs, select_topk) & np.any(np.stack(xs) != 0, axis=0)
    got = out != 0
    var = sce_ref.sce_variance(xs)
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
        assert sce_ref.sce_topk_mask(xs, 0.5).tolist() == [True, False]
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
    assert int((out != 0).sum()) == sce_ref.sce_k(n, 0.65) == 116


def test_sce_select_topk_extremes_and_single_model():
    b, xs = make_data(15, (10, 30), 3, "near", 0.3)
    # select_topk 1 selects nothing away: same as without the parameter
    full = merge("sce", xs, b, shape=b.shape, params={"select_topk": 1.0})
    np.testing.assert_array_equal(full, merge("sce", xs, b, shape=b.shape))
    assert_matches(full, sce_ref.sce(b, xs), "float32", rtol=RTOL, context="sce select_topk=1")
    # k = int(nonzero·0.001) = 0 of 300 -> every task vector is erased -> the base
    np.testing.assert_array_equal(merge("sce", xs, b, shape=b.shape, params={"select_topk": 0.001}), b.reshape(-1))
    # one model: its variance is 0 everywhere, so any select_topk < 1 erases it; select_topk 1 returns it
    np.testing.assert_array_equal(merge("sce", xs[:1], b, shape=b.shape, params={"select_topk": 0.5}), b.reshape(-1))
    np.testing.assert_allclose(merge("sce", xs[:1], b, shape=b.shape), xs[0].reshape(-1), rtol=1e-6, atol=1e-7)
