"""DARE (``dare_linear`` / ``dare_ties``): the seeded keep-mask and the pipeline around it.

The mask is read off the engine itself: one model with weight 1 over a zero base, no rescale and no normalize
gives ``out = x·m``, and every x is non-zero, so ``m = out != 0``. The contract (docs/architecture.md) says element j
of model i is kept iff ``u(seed, name, model_id, j) < d_i``; the properties below follow from that alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref

_core = pytest.importorskip("ferromerge._core")

SETTINGS = dict(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def nonzero_data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def dare(x, density, *, seed=0, name="t", model_id=0, method="dare_linear", rescale="none", threads=None,
         chunk=None, out_dtype="float32"):
    n = x.size
    return _core.merge_arrays(
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


@settings(**SETTINGS)
@given(
    n=st.one_of(st.integers(1, 100), st.integers(100, 20_000)),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**63 - 1),
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    rescale=st.sampled_from(["none", "l1", "inverse_density"]),
    variants=st.lists(st.tuples(st.one_of(st.integers(1, 64), st.sampled_from([None, 4096, 777])),
                                st.sampled_from([1, 2, 3])), min_size=2, max_size=4),
)
def test_same_seed_identical_bytes_any_chunking(n, density, seed, method, rescale, variants):
    x = nonzero_data(n, seed % 1000)
    first = dare(x, density, seed=seed, method=method, rescale=rescale, threads=1)
    for chunk, thr in variants:
        again = dare(x, density, seed=seed, method=method, rescale=rescale, threads=thr, chunk=chunk)
        assert again.tobytes() == first.tobytes(), f"chunk_elems={chunk} threads={thr} changed the result"


def test_different_seed_name_model_id_give_different_masks():
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


def test_mask_depends_only_on_key_and_index():
    """u depends on (seed, name, model_id, j) only: not on the values, the tensor length, or the dtype."""
    n = 3000
    x = nonzero_data(n, 1)
    m = mask_of(x, 0.4, seed=7, name="w")
    np.testing.assert_array_equal(m, mask_of(nonzero_data(n, 2), 0.4, seed=7, name="w"))
    np.testing.assert_array_equal(m[:1000], mask_of(x[:1000].copy(), 0.4, seed=7, name="w"))
    np.testing.assert_array_equal(m, mask_of(ref.encode(x, "bfloat16"), 0.4, seed=7, name="w"))
    np.testing.assert_array_equal(m, mask_of(x.astype(np.float16), 0.4, seed=7, name="w"))


def test_mask_is_monotone_in_density():
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
def test_kept_fraction_is_binomial(density):
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


def test_masks_of_two_models_independent():
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
def test_rescale_modes_share_the_mask(method, density):
    n = 9001
    x = nonzero_data(n, 6)
    m = mask_of(x, density, seed=9, name="q")
    for rescale in ("l1", "inverse_density"):
        out = dare(x, density, seed=9, name="q", method=method, rescale=rescale)
        np.testing.assert_array_equal(out != 0, m, err_msg=f"{method}/{rescale} drew another mask")
    np.testing.assert_array_equal(mask_of(x, density, seed=9, name="q", method=method), m)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77, 1.0])
def test_inverse_density_divides_kept_values_exactly(density):
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
def test_l1_rescale_preserves_l1_norm(density):
    x = nonzero_data(20_000, 8)
    m = mask_of(x, density, seed=4, name="l1")
    out = dare(x, density, seed=4, name="l1", rescale="l1")
    np.testing.assert_array_equal(out != 0, m)
    np.testing.assert_allclose(np.abs(out.astype(np.float64)).sum(), np.abs(x.astype(np.float64)).sum(), rtol=1e-5)
    factor = ref.l1_rescale_factor(x, m)
    np.testing.assert_allclose(out[m], x[m].astype(np.float64) * factor, rtol=2e-7, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# full pipeline with the recovered masks
# ----------------------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
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
def test_pipeline_matches_reference_with_recovered_masks(n, n_models, method, rescale, normalize, lam, seed, data):
    weights = data.draw(st.lists(st.one_of(st.integers(-32, 32).map(lambda i: i / 16), st.floats(0.05, 2.0)),
                                 min_size=n_models, max_size=n_models))
    dens = data.draw(st.lists(st.floats(0.05, 1.0), min_size=n_models, max_size=n_models))
    in_dtype = data.draw(st.sampled_from(ref.DTYPES))
    out_dtype = data.draw(st.sampled_from(ref.DTYPES))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 64)))
    thr = data.draw(st.sampled_from([1, 2, 3]))
    rng = np.random.default_rng(seed)
    base32 = rng.normal(0, 1, n).astype(np.float32)
    xs32 = [(base32 + rng.normal(0, 0.05, n)).astype(np.float32) for _ in range(n_models)]
    base = ref.encode(base32, in_dtype)
    xs = [ref.encode(x, in_dtype) for x in xs32]
    name = f"model.layers.{seed % 7}.self_attn.q_proj.weight"
    out = _core.merge_arrays(
        method, xs, base, weights, dens, out_dtype=out_dtype, normalize=normalize, lambda_=lam, rescale=rescale,
        seed=seed, name=name, threads=thr, chunk_elems=chunk,
    )
    # each model's mask, recovered from a single-model run with the same key (its model_id = its position)
    probe = nonzero_data(n, 0)
    masks = [mask_of(probe, d, seed=seed, name=name, model_id=i) for i, d in enumerate(dens)]
    bv = ref.decode(base, in_dtype)
    xv = [ref.decode(x, in_dtype) for x in xs]
    expected = ref.gta(bv, xv, weights, consensus=(method == "dare_ties"), normalize=normalize, lam=lam,
                       masks=masks, densities=dens, rescale=rescale)
    ref.assert_matches(ref.decode(out, out_dtype), expected, out_dtype,
                       context=f"{method} w={weights} d={dens} rescale={rescale} normalize={normalize} lambda={lam}")
