"""Property tests of ``merge/methods/arcee_fusion.rs`` in ``_core.merge_arrays`` against
``reference.arcee_fusion``.

Every property checks that the output bytes are identical for every ``chunk_elems`` and thread count, and that the
decoded output equals the reference within ``rtol·scale + atol`` plus one unit of a 16-bit output dtype
(``helpers.kernels``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import SETTINGS, check, make_data, merge, prepared, run_variants, shapes, variants
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import arcee_fusion as arcee_fusion_ref
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import assert_matches

_engine = pytest.importorskip("ferromerge._engine")


@settings(**SETTINGS)
@given(data=st.data())
def test_arcee_fusion(data):
    shape = data.draw(shapes())
    # ``ft``, not ``near``: deltas of 0.005 on short rows have a KL divergence below float32 resolution, where the
    # mask is noise in any float32 evaluation (mergekit's included)
    base_s, stored, bv, xv, out_dtype, cast = prepared(data, shape, 1, kinds=("ft", "grid", "far"),
                                                       zero_fracs=(0.0, 0.3, 0.8))
    expected, _ = arcee_fusion_ref.arcee_fusion(bv, xv[0], shape)

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
    expected, keep = arcee_fusion_ref.arcee_fusion(a, b, (10,))
    assert keep[np.argsort(perm)][-3:].all() and keep.sum() == 3
    assert not expected.ambiguous.any()
    out = merge("arcee_fusion", [b], a, shape=[10])
    np.testing.assert_array_equal(out != a, keep)
    assert_matches(out, expected, "float32", context="arcee_fusion")


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
    expected, _ = arcee_fusion_ref.arcee_fusion(b, x, b.shape)
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
    delta = task_arithmetic_ref.task_vector(x, b)
    imp, _ = arcee_fusion_ref.arcee_importance(b, x, shape)
    thr = arcee_fusion_ref.arcee_threshold(imp)
    exact_keep = imp >= thr
    for out in (first, other):
        keep = (out != b.reshape(-1)) & (delta != 0)
        differ = keep != (exact_keep & (delta != 0))
        # a sample of 1e6 pins the quartiles to ~0.1%: differences only within a few % of the threshold
        assert differ.mean() < 2e-3, differ.mean()
        assert (np.abs(imp[differ] - thr) <= 0.05 * thr).all()
