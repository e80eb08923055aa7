"""``adapters.knots.knots_merge`` against the KnOTS reference code restated in NumPy (``tests/reference/knots.py``:
the full out × T·in concatenation, one float64 SVD, the masks and the merge on diag(s)·V_t).

Agreement is on ΔW = scale·b@a (the factors themselves are one of many equal factorisations). DARE masks are read
off the engine with the keying ``knots_merge`` documents (seed, module name, adapter position) on an all-ones
array, so the DARE types are compared exactly too, and their keep rate statistically. Inputs whose discrete
decisions (the trim's cut, a sign election, near-equal singular values, a component's sign convention) are too
close for float rounding to decide the same way on both paths are skipped (``assume``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.make import SHAPES, read_adapter, write_adapter
from ferromerge import _engine
from ferromerge.adapters import merge_adapters
from ferromerge.adapters.factors import Factors
from ferromerge.adapters.knots import MERGES, Cut, knots_merge, merge_coefficients, shared_basis
from ferromerge.errors import InputError, ParameterError
from reference import knots as ref

SETTINGS = dict(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as an adapter stored in ``dtype`` holds them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x if dtype == "float32" else _engine.decode(_engine.encode(x, dtype), dtype)


def _adapters(rng: np.random.Generator, out: int, inn: int, ranks: list[int], scales: list[float], dtype: str,
              structure: str) -> list[Factors]:
    fs = []
    shared_b = rng.standard_normal((out, max(ranks))).astype(np.float32)
    for t, (r, sc) in enumerate(zip(ranks, scales)):
        a = rng.standard_normal((r, inn)) * 0.1
        b = rng.standard_normal((out, r)) * 0.1
        if structure == "shared_b":  # C rank-deficient: every adapter writes into the same column space
            b = shared_b[:, :r] * 0.1
        if structure == "zero_one" and t == 0:  # an adapter whose delta is 0 (a PEFT-initialised B)
            b = np.zeros_like(b)
        fs.append(Factors(a=_round(a, dtype), b=_round(b, dtype), scale=sc))
    if structure == "negated" and len(fs) > 1:  # two adapters that cancel exactly
        fs[1] = Factors(a=fs[0].a.copy(), b=-fs[0].b, scale=fs[0].scale)
    return fs


def _engine_masks(coeff_shapes: list[tuple[int, int]], density: float, seed: int, module: str) -> list[np.ndarray]:
    """The DARE keep masks as knots_merge documents them: the engine's generator keyed by seed, module, position."""
    masks = []
    for t, shape in enumerate(coeff_shapes):
        n = int(np.prod(shape))
        if n == 0:
            masks.append(np.zeros(shape, bool))
            continue
        out = _engine.merge_arrays(
            {"name": "dare_linear", "normalize": False, "lambda": 1.0, "rescale": "none", "seed": seed},
            [np.ones(n, np.float32)], np.zeros(n, np.float32), _engine.input_values([1.0], [density], model_ids=[t]),
            out_dtype="float32", name=module,
        )
        masks.append((np.asarray(out) != 0).reshape(shape))
    return masks


def _compare(fs: list[Factors], weights: list[float], merge: str, density: float, majority_sign: str, seed: int,
             module: str = "layers.0.q_proj", in_hypothesis: bool = True) -> float:
    """knots_merge against the reference; returns the largest error relative to the tolerance's scale."""
    got = knots_merge(fs, weights, merge=merge, density=density, majority_sign=majority_sign, seed=seed, module=module)
    _, coeffs = shared_basis(fs)
    masks = _engine_masks([c.shape for c in coeffs], density, seed, module) if merge.startswith("dare") else None
    expected, rank, margins = ref.knots([(f.a, f.b, f.scale) for f in fs], weights, merge, density, majority_sign,
                                        dare_masks=masks)
    clear = margins.trim > 1e-5 and margins.sign > 1e-5 and margins.spectrum > 1e-6 and margins.canonical > 1e-6
    if in_hypothesis:
        assume(clear)
    else:
        assert clear, f"the reference's decisions are too close to call: {margins}"
    assert got.rank == sum(f.rank for f in fs), "the result's rank is the sum of the input ranks"
    assert got.scale == 1.0
    used = int((np.abs(got.b).sum(axis=0) > 0).sum())
    assert used <= rank, f"{used} components used, the shared basis has {rank}"
    sigma = np.linalg.norm(np.concatenate([ref.delta(f.a, f.b, f.scale) for f in fs], axis=1), 2) if rank else 0.0
    bound = sum(abs(w) for w in weights) * sigma / (density if merge.startswith("dare") else 1.0)
    err = np.abs(got.delta().astype(np.float64) - expected)
    tol = 1e-5 * bound + 1e-12
    assert (err <= tol).all(), f"max error {err.max():.3g} > {tol:.3g} ({merge}, density {density})"
    return float(err.max() / tol)


@settings(**SETTINGS)
@given(
    out=st.integers(1, 24),
    inn=st.integers(1, 24),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    scale=st.sampled_from([1.0, 0.5, 2.0, 16 / math.sqrt(8)]),
    per_scale=st.booleans(),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    structure=st.sampled_from(["random", "random", "shared_b", "zero_one", "negated"]),
    merge=st.sampled_from(MERGES),
    density=st.sampled_from([1.0, 0.9, 0.5, 0.2, 0.05]),
    weight=st.one_of(st.floats(1e-3, 2), st.floats(-2, -1e-3)),
    equal=st.booleans(),
    majority_sign=st.sampled_from(["total", "frequency"]),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_knots_matches_the_reference(out, inn, ranks, scale, per_scale, dtype, structure, merge, density, weight,
                                     equal, majority_sign, seed, data_seed):
    rng = np.random.default_rng(data_seed)
    scales = [scale * (1 + t) if per_scale else scale for t in range(len(ranks))]
    fs = _adapters(rng, out, inn, ranks, scales, dtype, structure)
    weights = [weight] * len(fs) if equal else [float(w) for w in np.round(rng.uniform(-1.5, 1.5, len(fs)), 3)]
    _compare(fs, weights, merge, density, majority_sign, seed)


@pytest.mark.parametrize("config", ["vitB_r16_knots_ties", "llama8B_r16_knots_ties", "vitB_r16_knots_dare_ties",
                                    "llama8B_r16_knots_dare_ties"])
def test_the_papers_published_configs(config):
    """The reference repository's KnOTS configs: topK 20 / 100 with scaling 0.6 / 0.5 (TIES), DARE p = 0.1 / 0.8 with
    scaling 0.7 / 0.4 (topK 100), sum_of_values, mean; four rank-16 adapters of a 96 × 64 layer."""
    merge, density, weight = {
        "vitB_r16_knots_ties": ("ties", 0.2, 0.6),
        "llama8B_r16_knots_ties": ("ties", 1.0, 0.5),
        "vitB_r16_knots_dare_ties": ("dare_ties", 0.9, 0.7),
        "llama8B_r16_knots_dare_ties": ("dare_ties", 0.2, 0.4),
    }[config]
    rng = np.random.default_rng(421)
    fs = _adapters(rng, 96, 64, [16] * 4, [2.0] * 4, "float32", "random")
    assert _compare(fs, [weight] * 4, merge, density, "total", 421, in_hypothesis=False) < 0.1


@settings(**SETTINGS)
@given(
    tasks=st.integers(1, 5),
    rows=st.integers(1, 4),
    cols=st.integers(1, 6),
    merge=st.sampled_from(MERGES),
    majority_sign=st.sampled_from(["total", "frequency"]),
    equal=st.booleans(),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_elections_without_a_majority_follow_the_reference(tasks, rows, cols, merge, majority_sign, equal, data_seed):
    """Small integer coefficients: exact zero sums (the majority of the elected signs decides), counts of signs
    that tie (``frequency``: no sign, the negative entries are kept), zeros, weights of either sign and 0. No trim
    or drop (density 1): the reference keeps every tie at a trim's cut, the engine the lowest-indexed."""
    rng = np.random.default_rng(data_seed)
    coeffs = [rng.integers(-2, 3, (rows, cols)).astype(np.float32) for _ in range(tasks)]
    weights = [0.5] * tasks if equal else [float(w) for w in rng.choice([-1.0, 0.0, 0.25, 1.5], tasks)]
    got = merge_coefficients(coeffs, weights, merge, 1.0, majority_sign, 0, "m")
    want = ref.merge_reps(coeffs, weights, merge, 1.0, majority_sign)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_the_shared_basis_is_the_svd_of_the_concatenation():
    """U·diag(s)·[V_1 … V_T] rebuilds [ΔW_1 … ΔW_T], and U has orthonormal columns, without forming it."""
    rng = np.random.default_rng(3)
    fs = _adapters(rng, 50, 30, [4, 8, 2], [0.5, 2.0, 1.0], "float32", "random")
    u, coeffs = shared_basis(fs)
    concat = np.concatenate([ref.delta(f.a, f.b, f.scale) for f in fs], axis=1)
    rebuilt = u.astype(np.float64) @ np.concatenate(coeffs, axis=1).astype(np.float64)
    assert u.shape == (50, 14)
    np.testing.assert_allclose(rebuilt, concat, atol=1e-6 * np.abs(concat).max())
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.eye(14), atol=1e-6)
    s = np.linalg.svd(concat, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(np.stack([c for c in coeffs]), axis=(0, 2)), s[:14], rtol=1e-6)


def test_linear_is_the_weighted_sum_of_the_deltas():
    rng = np.random.default_rng(4)
    fs = _adapters(rng, 40, 20, [3, 5], [1.0, 0.25], "float32", "random")
    got = knots_merge(fs, [0.7, -1.2], merge="linear").delta()
    want = 0.7 * ref.delta(fs[0].a, fs[0].b, fs[0].scale) - 1.2 * ref.delta(fs[1].a, fs[1].b, fs[1].scale)
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())


def test_rank_truncation_is_the_best_approximation():
    rng = np.random.default_rng(5)
    fs = _adapters(rng, 40, 30, [6, 6, 6], [1.0] * 3, "float32", "random")
    full = knots_merge(fs, [0.5] * 3, merge="ties", density=0.5).delta().astype(np.float64)
    cut = knots_merge(fs, [0.5] * 3, merge="ties", density=0.5, rank=4)
    assert cut.rank == 4
    p, s, vt = np.linalg.svd(full)
    best = (p[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(cut.delta(), best, atol=1e-5 * s[0])
    # a rank above ΔW's pads with zero components
    assert knots_merge(fs[:1], [1.0], merge="linear", rank=10).rank == 10


def test_dare_keeps_the_density_and_depends_on_seed_and_module():
    rng = np.random.default_rng(6)
    fs = _adapters(rng, 64, 64, [16, 16], [1.0, 1.0], "float32", "random")
    _, coeffs = shared_basis(fs)
    masks = _engine_masks([c.shape for c in coeffs], 0.3, 11, "m")
    n = sum(m.size for m in masks)
    kept = sum(int(m.sum()) for m in masks)
    assert abs(kept - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)
    a = knots_merge(fs, [1.0, 1.0], merge="dare_linear", density=0.3, seed=11, module="m").delta()
    assert np.array_equal(a, knots_merge(fs, [1.0, 1.0], merge="dare_linear", density=0.3, seed=11, module="m").delta())
    assert not np.array_equal(a, knots_merge(fs, [1.0, 1.0], merge="dare_linear", density=0.3, seed=12,
                                             module="m").delta())
    assert not np.array_equal(a, knots_merge(fs, [1.0, 1.0], merge="dare_linear", density=0.3, seed=11,
                                             module="n").delta())
    # unbiased: the mean over seeds approaches the plain sum
    mean = np.mean([knots_merge(fs, [1.0, 1.0], merge="dare_linear", density=0.5, seed=s, module="m").delta()
                    for s in range(200)], axis=0)
    plain = knots_merge(fs, [1.0, 1.0], merge="linear").delta()
    assert np.abs(mean - plain).max() < 0.25 * np.abs(plain).max()


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(7)
    fs = _adapters(rng, 8, 6, [2, 3], [1.0, 1.0], "float32", "random")
    with pytest.raises(ParameterError, match="unknown merge"):
        knots_merge(fs, [1, 1], merge="svd")
    with pytest.raises(ParameterError, match="majority_sign"):
        knots_merge(fs, [1, 1], majority_sign="sum")
    with pytest.raises(ParameterError, match="2 adapters but 1 weights"):
        knots_merge(fs, [1.0])
    with pytest.raises(ParameterError, match="at least one adapter"):
        knots_merge([], [])
    with pytest.raises(ParameterError, match="density"):
        knots_merge(fs, [1, 1], density=1.5)
    with pytest.raises(ParameterError, match="density 0"):
        knots_merge(fs, [1, 1], merge="dare_ties", density=0.0)
    with pytest.raises(ParameterError, match="weight 1"):
        knots_merge(fs, [1.0, float("nan")])
    with pytest.raises(ParameterError, match="rank"):
        knots_merge(fs, [1, 1], rank=0)
    other = Factors(a=np.ones((2, 7), np.float32), b=np.ones((8, 2), np.float32))
    with pytest.raises(ParameterError, match="q_proj: knots: adapter 1 has ΔW of shape"):
        knots_merge([fs[0], other], [1, 1], module="q_proj")
    bad = Factors(a=np.full((2, 6), np.nan, np.float32), b=fs[0].b)
    with pytest.raises(InputError, match="q_proj: adapter 1: NaN"):
        knots_merge([fs[0], bad], [1, 1], module="q_proj")


@pytest.mark.parametrize("combination, density, majority_sign", [
    ("knots_ties", 0.3, "total"), ("knots_ties", 0.1, "frequency"), ("knots_magnitude_prune", 0.2, "total"),
    ("knots_dare_ties", 0.5, "total"), ("knots_linear", None, "total")])
def test_merge_adapters_writes_the_references_delta(tmp_path, combination, density, majority_sign):
    """End to end: PEFT adapter directories (two ranks and lora_alpha, bfloat16 and float32; six modules of three
    shapes) through ``merge_adapters``; every module's ΔW read back from the written adapter (its r and lora_alpha)
    is the reference's run over all the modules at once (``ref.knots_layers``: the trim's cut and the zero-sign
    majority over each adapter's whole vector, as the paper's code), on the adapters' own factors and scales."""
    first = write_adapter(tmp_path / "a1", 4, seed=1, alpha=16.0)
    second = write_adapter(tmp_path / "a2", 8, seed=2, alpha=8.0, dtype="BF16")
    weights = [0.8, 0.8]
    merge_adapters(tmp_path / "out", [(tmp_path / "a1", weights[0]), (tmp_path / "a2", weights[1])],
                   combination=combination, density=density, majority_sign=majority_sign, seed=9)
    config, merged = read_adapter(tmp_path / "out")
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    scale = config["lora_alpha"] / config["r"]
    merge = combination.removeprefix("knots_")
    modules = list(first)
    layers = [[(first[m][0], first[m][1], 16.0 / 4), (second[m][0], second[m][1], 8.0 / 8)] for m in modules]
    masks = None
    if merge.startswith("dare"):
        masks = []
        for m, layer in zip(modules, layers):
            _, coeffs = shared_basis([Factors(a=a, b=b, scale=sc) for a, b, sc in layer])
            masks.append(_engine_masks([c.shape for c in coeffs], density, 9, m))
    d = 1.0 if density is None else density
    expected, margins = ref.knots_layers(layers, weights, merge, d, majority_sign, dare_masks=masks)
    assert margins.trim > 1e-5 and margins.sign > 1e-5, margins
    for m, want in zip(modules, expected):
        a, b = merged[m]
        got = scale * (b.astype(np.float64) @ a)
        np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max(), err_msg=m)
    if merge in ("ties", "magnitude_prune"):
        # the global cut is not each module's own: the per-module reference differs somewhere
        per_module = [ref.knots(layer, weights, merge, d, majority_sign)[0] for layer in layers]
        assert any(np.abs(p - e).max() > 1e-3 * np.abs(e).max() for p, e in zip(per_module, expected))


@settings(**SETTINGS)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    density=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.5, 0.999, 1.0, 1e-9])),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    zeros=st.booleans(),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_the_cut_is_the_references_kth_value_over_all_modules(sizes, density, dtype, zeros, data_seed):
    """``Cut`` over several modules' arrays keeps exactly what ``topk_values_mask`` keeps on their concatenation
    (|x| ≥ the k-th smallest |x|, k = d − int(d·density), ties at the cut kept), including repeated magnitudes
    (bfloat16 values), zeros and tiny densities."""
    rng = np.random.default_rng(data_seed)
    parts = []
    for n in sizes:
        x = rng.standard_normal(n).astype(np.float32) * rng.choice([1e-3, 1.0, 50.0])
        if zeros:
            x[rng.random(n) < 0.3] = 0.0
        parts.append(_round(x, dtype))
    assume(sum(sizes) > 0)
    cut = Cut(density)
    for x in parts:
        cut.count(x)
    cut.locate()
    for x in parts:
        cut.refine(x)
    cut.finish()
    want, _ = ref.topk_values_mask(np.concatenate(parts), density)
    got = np.concatenate([cut.keep(x) for x in parts])
    assert np.array_equal(got, want)




def test_adapters_with_different_module_sets_merge_with_global_statistics(tmp_path):
    """An adapter lacking a module has no coefficients there (its vector is the concatenation over the modules it
    has); the passes run, write every module of the union, leave no scratch file, and repeat bit for bit."""
    modules = list(SHAPES)
    write_adapter(tmp_path / "a1", 4, seed=1, modules=modules[:4])
    write_adapter(tmp_path / "a2", 6, seed=2, modules=modules[2:])
    write_adapter(tmp_path / "a3", 4, seed=3, modules=modules[1:5])
    adapters = [(tmp_path / "a1", 0.5), (tmp_path / "a2", 1.0), (tmp_path / "a3", -0.7)]
    for name in ("x", "y"):
        merge_adapters(tmp_path / name, adapters, combination="knots_ties", density=0.4, seed=1)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    _, merged = read_adapter(tmp_path / "x")
    assert sorted(merged) == sorted(modules)
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "y" / "adapter_model.safetensors").read_bytes()
