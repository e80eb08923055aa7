"""The 14 methods added for mergekit 0.1.5 parity, through the in-memory API (``merge_tensors`` /
``merge_state_dicts``): small inputs whose results have a closed form derived by hand here (not a port of any
implementation), parameter routing (defaults, ``params``, per-model gamma/epsilon, row shapes), input-count and
parameter errors. The NumPy references of the kernels and the mergekit differential tests live elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.kernels import kernel_merge

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402
from ferromerge.tensors import merge_state_dicts, merge_tensors  # noqa: E402

ParameterError = errors.ParameterError

R2 = math.sqrt(2.0)
# transcendental methods compute dot products in f64 and the rest in f32: agreement to a few f32 ulps
CLOSE = {"rtol": 2e-6, "atol": 1e-6}


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def e(i: int, n: int = 4, scale: float = 3.0) -> np.ndarray:
    """``scale`` times the i-th unit vector of length n."""
    x = np.zeros(n, np.float32)
    x[i] = scale
    return x


# ---------------------------------------------------------------------------------------------------- slerp


def test_slerp_ends_are_the_base_and_the_other_model_exactly() -> None:
    rng = np.random.default_rng(0)
    base, other = rng.standard_normal((2, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(merge_tensors([base, other], "slerp", {"t": 0.0}, base_index=0), base)
    np.testing.assert_array_equal(merge_tensors([other, base], "slerp", {"t": 1.0}, base_index=1), other)


@pytest.mark.parametrize("t", [0.5, 1 / 3, 0.8])
def test_slerp_of_orthogonal_vectors_follows_the_great_circle(t: float) -> None:
    # |v0| = |v1| = 3 and theta = pi/2: sin((1-t) pi/2) v0 + sin(t pi/2) v1
    out = merge_tensors([e(0), e(1)], "slerp", {"t": t}, base_index=0)
    want = [3 * math.sin((1 - t) * math.pi / 2), 3 * math.sin(t * math.pi / 2), 0, 0]
    np.testing.assert_allclose(out, want, **CLOSE)


def test_slerp_of_parallel_vectors_is_a_lerp() -> None:
    # collinear inputs (cos = 1) fall back to (1-t) v0 + t v1 = (1+t) v0 for v1 = 2 v0
    v0 = f32(1, -2, 0.5, 4)
    out = merge_tensors([v0, 2 * v0], "slerp", {"t": 0.25}, base_index=0)
    np.testing.assert_allclose(out, 1.25 * v0, **CLOSE)


def test_slerp_matches_the_core_call_with_t_in_params() -> None:
    rng = np.random.default_rng(1)
    base, other = rng.standard_normal((2, 64)).astype(np.float32)
    out = merge_tensors([other, base], "slerp", {"t": 0.3}, base_index=1)
    core = kernel_merge("slerp", [other], base, [1.0], [1.0], out_dtype="float32", normalize=False,
                              params={"t": 0.3})
    np.testing.assert_array_equal(out, core)


# ---------------------------------------------------------------------------------------------------- nearswap


def test_nearswap_weights_each_element_by_t_over_the_distance() -> None:
    a = f32(0, 0, 0, 0)  # the base
    b = f32(1, 2, 4, -8)
    # w = clamp(t / |a - b|, 0, 1) = (1, 1/2, 1/4, 1/8); w b + (1 - w) a = (1, 1, 1, -1)
    np.testing.assert_allclose(merge_tensors([a, b], "nearswap", {"t": 1.0}, base_index=0), f32(1, 1, 1, -1))
    # a huge t swaps in the other model, t = 0 keeps the base
    np.testing.assert_array_equal(merge_tensors([a, b], "nearswap", {"t": 1e9}, base_index=0), b)
    np.testing.assert_array_equal(merge_tensors([b, a], "nearswap", {"t": 0.0}, base_index=1), a)


# ---------------------------------------------------------------------------------------------------- nuslerp


def test_nuslerp_t_is_the_second_weight_over_the_sum() -> None:
    # weights 1, 2 -> t = 2/3 over a right angle: sin(pi/6) x1 + sin(pi/3) x2
    out = merge_tensors([e(0), e(1)], "nuslerp", {"weight": [1.0, 2.0]})
    np.testing.assert_allclose(out, [1.5, 3 * math.sin(math.pi / 3), 0, 0], **CLOSE)
    # weight 0 on the second model: t = 0, the first model
    np.testing.assert_allclose(merge_tensors([e(0), e(1)], "nuslerp", {"weight": [1.0, 0.0]}), e(0), **CLOSE)


def test_nuslerp_with_a_base_interpolates_the_task_vectors() -> None:
    base = f32(0.5, -1, 2, 0.25)
    out = merge_tensors([base + e(0), base, base + e(1)], "nuslerp", {"weight": 1.0}, base_index=1)
    np.testing.assert_allclose(out, base + f32(3 / R2, 3 / R2, 0, 0), **CLOSE)


def test_nuslerp_rows_and_columns_without_flattening() -> None:
    # row 0: orthogonal (the great circle), row 1: parallel (a lerp)
    x1 = np.array([[3, 0], [1, 1]], np.float32)
    x2 = np.array([[0, 3], [2, 2]], np.float32)
    rows = np.array([[3 / R2, 3 / R2], [1.5, 1.5]], np.float32)
    out = merge_tensors([x1, x2], "nuslerp", {"weight": 1.0, "nuslerp_flatten": False})
    np.testing.assert_allclose(out, rows, **CLOSE)
    # row_wise: the vectors run along dim 0 (the columns)
    out = merge_tensors([x1.T.copy(), x2.T.copy()], "nuslerp",
                        {"weight": 1.0, "nuslerp_flatten": False, "nuslerp_row_wise": True})
    np.testing.assert_allclose(out, rows.T, **CLOSE)
    # flattened (the default), the whole tensor is one vector: a different result
    flat = merge_tensors([x1, x2], "nuslerp", {"weight": 1.0})
    assert not np.allclose(flat, rows, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- multislerp


def test_multislerp_of_two_orthogonal_vectors_lands_on_the_weighted_mean_direction() -> None:
    # weights 1/3, 2/3: the tangent vectors cancel, so the result is the unit weighted mean (1, 2)/sqrt(5) times
    # the weighted mean norm (3)
    out = merge_tensors([e(0), e(1)], "multislerp", {"weight": [1.0, 2.0]})
    np.testing.assert_allclose(out, [3 / math.sqrt(5), 6 / math.sqrt(5), 0, 0], **CLOSE)
    # normalize_weights off with weights summing to 1: the same merge
    out2 = merge_tensors([e(0), e(1)], "multislerp", {"weight": [1 / 3, 2 / 3], "normalize_weights": False})
    np.testing.assert_allclose(out2, out, **CLOSE)


def test_multislerp_with_a_base_and_of_identical_inputs() -> None:
    base = f32(1, 2, 3, 4)
    out = merge_tensors([base + e(0), base + e(1), base], "multislerp", {"weight": 1.0}, base_index=2)
    np.testing.assert_allclose(out, base + f32(3 / R2, 3 / R2, 0, 0), **CLOSE)
    x = f32(0.5, -1.5, 2, 7)
    np.testing.assert_allclose(merge_tensors([x, x, x], "multislerp", {"weight": [1, 2, 3]}), x, **CLOSE)


# ---------------------------------------------------------------------------------------------------- karcher


def test_karcher_mean_of_identical_and_of_orthogonal_tensors() -> None:
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(merge_tensors([x, x, x], "karcher"), x, **CLOSE)
    # two orthogonal directions of norm 3: the geodesic midpoint, scaled by the mean norm
    np.testing.assert_allclose(merge_tensors([e(0), e(1)], "karcher"), [3 / R2, 3 / R2, 0, 0], **CLOSE)


def test_karcher_base_joins_as_one_more_input() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(16).astype(np.float32) for _ in range(3)]
    joined = merge_tensors(xs, "karcher", base_index=1)
    np.testing.assert_array_equal(joined, merge_tensors(xs, "karcher"))
    sd = merge_state_dicts({str(i): {"w": x} for i, x in enumerate(xs)}, "karcher", base="1",
                           parameters={"max_iter": 50, "tol": 1e-7})
    np.testing.assert_allclose(sd["w"], merge_tensors(xs, "karcher", {"max_iter": 50, "tol": 1e-7}), **CLOSE)


# ---------------------------------------------------------------------------------------------------- model_stock


def test_model_stock_interpolation_factor_from_the_offsets_angle() -> None:
    base = f32(1, -1, 0.5, 2)
    d = f32(0.5, 0.25, -1, 0)
    # identical offsets: cos = 1, t = 2 * 1 / (1 + 1) = 1 -> the average of the models
    out = merge_tensors([base, base + d, base + d], "model_stock", base_index=0)
    np.testing.assert_allclose(out, base + d, **CLOSE)
    # orthogonal offsets: cos = 0, t = 0 -> the base exactly
    out = merge_tensors([base, base + e(0, scale=1), base + e(1, scale=1)], "model_stock", base_index=0)
    np.testing.assert_array_equal(out, base)
    # cos = 1/2: t = 2 * 0.5 / 1.5 = 2/3 -> base + (d1 + d2) / 3
    d1, d2 = f32(1, 0, 0, 0), f32(0.5, math.sqrt(3) / 2, 0, 0)
    out = merge_tensors([base + d1, base + d2, base], "model_stock", base_index=2)
    np.testing.assert_allclose(out, base + (d1 + d2) / 3, **CLOSE)
    # opposite offsets: 1 + (N - 1) cos = 0 has no finite estimate; the base is kept
    np.testing.assert_array_equal(merge_tensors([base, base + d, base - d], "model_stock", base_index=0), base)


def test_model_stock_filter_wise_takes_one_factor_per_row() -> None:
    base = np.zeros((2, 2), np.float32)
    m1 = np.array([[1, 2], [1, 0]], np.float32)
    m2 = np.array([[1, 2], [0, 1]], np.float32)  # row 0 identical offsets (t = 1), row 1 orthogonal (t = 0)
    out = merge_tensors([base, m1, m2], "model_stock", {"filter_wise": True}, base_index=0)
    np.testing.assert_allclose(out, [[1, 2], [0, 0]], **CLOSE)
    # over the whole tensor the two offsets are neither: cos = 5 / 6
    cos = 5 / 6
    t = 2 * cos / (1 + cos)
    out = merge_tensors([base, m1, m2], "model_stock", base_index=0)
    np.testing.assert_allclose(out, t * (m1 + m2) / 2, **CLOSE)


# ---------------------------------------------------------------------------------------------------- sce


def test_sce_weights_by_mean_square_and_erases_disagreeing_signs() -> None:
    base = f32(1, 1, 1)
    d1, d2 = f32(1, 2, -1), f32(3, -2, -1)
    # weights mean(d^2): 2 and 14/3 -> 0.3, 0.7; elected signs of d1 + d2 = (4, 0, -2): +, + (a tie), -
    # element 1: only model 1 agrees -> 2 * 0.3 / 0.3
    out = merge_tensors([base + d1, base + d2, base], "sce", base_index=2)
    np.testing.assert_allclose(out, base + f32(0.3 * 1 + 0.7 * 3, 2, -1), **CLOSE)


def test_sce_select_topk_keeps_the_highest_variance_elements() -> None:
    base = np.zeros(4, np.float32)
    d1, d2 = f32(1, 1, 0, 2), f32(1, -1, 0, 4)
    # variance across the models: (0, 1, 0, 1): 2 non-zero, k = int(2 * 0.5) = 1; elements 1 and 3 tie and the
    # lower index wins. Masked: d1 = (0, 1, 0, 0), d2 = (0, -1, 0, 0), equal weights; the tie of the sign
    # election goes to +, so model 1 alone gives element 1
    out = merge_tensors([base, base + d1, base + d2], "sce", {"select_topk": 0.5}, base_index=0)
    np.testing.assert_allclose(out, f32(0, 1, 0, 0), **CLOSE)
    # select_topk 0 keeps nothing: the base
    np.testing.assert_array_equal(merge_tensors([base, base + d1, base + d2], "sce", {"select_topk": 0.0},
                                                base_index=0), base)


# ---------------------------------------------------------------------------------------------------- ram, ramplus_tl


def test_ram_averages_shared_changes_and_keeps_unique_ones() -> None:
    base = f32(0.5, 0.5, 0.5, 0.5)
    d1, d2 = f32(1, 0, 2, 1e-6), f32(3, 0, 0, 0)
    # active: |d| > 1e-5. Element 0 shared by both -> (1 + 3) / 2; element 2 only model 1 -> 2; element 3 is
    # below epsilon for model 1 -> nothing
    out = merge_tensors([base, base + d1, base + d2], "ram", base_index=0)
    np.testing.assert_allclose(out, base + f32(2, 0, 2, 0), **CLOSE)
    # a lower epsilon makes element 3 a unique change
    out = merge_tensors([base, base + d1, base + d2], "ram", {"epsilon": 1e-7}, base_index=0)
    np.testing.assert_allclose(out, base + f32(2, 0, 2, 1e-6), **CLOSE)


def test_ramplus_tl_scales_unique_changes_by_the_shared_to_unique_ratio() -> None:
    base = np.zeros(3, np.float32)
    d1, d2 = f32(1, 0, 2), f32(3, 0, 0)
    # model 1: 1 shared, 1 unique -> rho = 1; lambda = 1 + r * min(rho, alpha)
    for params, lam in [({}, 1 + 0.1 * 0.2), ({"r": 0.5, "alpha": 1.0}, 1.5), ({"r": 0.5, "alpha": 0.5}, 1.25)]:
        out = merge_tensors([base, base + d1, base + d2], "ramplus_tl", params, base_index=0)
        np.testing.assert_allclose(out, f32(2, 0, 2 * lam), **CLOSE, err_msg=str(params))


# ---------------------------------------------------------------------------------------------------- breadcrumbs


def magnitudes(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """A permutation of scale * (1..n) with random signs."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(np.arange(1, n + 1)) * rng.choice([-1, 1], n) * scale).astype(np.float32)


def kept_by_rank(delta: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """delta where its |delta| rank (ascending, distinct magnitudes) is in [lo, hi), else 0."""
    ranks = np.argsort(np.argsort(np.abs(delta)))
    return np.where((ranks >= lo) & (ranks < hi), delta, 0).astype(np.float32)


def test_breadcrumbs_drops_the_top_gamma_and_the_bottom() -> None:
    base = np.zeros(10, np.float32)
    d = magnitudes(10, 0)
    # density 0.5, gamma 0.1 of n = 10: 5 kept, 1 outlier removed, the 4 smallest removed
    out = merge_tensors([base, d], "breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": 0.1}, base_index=0)
    np.testing.assert_array_equal(out, kept_by_rank(d, 4, 9))
    # gamma defaults to 0.01: int(0.01 * 10) = 0 outliers, so the 5 largest stay
    out = merge_tensors([base, d], "breadcrumbs", {"weight": 1.0, "density": 0.5}, base_index=0)
    np.testing.assert_array_equal(out, kept_by_rank(d, 5, 10))
    # density 1: the task vector untouched
    np.testing.assert_array_equal(merge_tensors([base, d], "breadcrumbs", {"weight": 1.0, "gamma": 0.3},
                                                base_index=0), d)


def test_breadcrumbs_per_row_selects_in_each_row() -> None:
    base = np.zeros((2, 10), np.float32)
    d = np.stack([magnitudes(10, 1), magnitudes(10, 2, scale=100.0)])
    params = {"weight": 1.0, "density": 0.5, "gamma": 0.1}
    # over the whole tensor (mergekit): n = 20, 10 kept, 2 outliers; ranks 0-9 are row 0's, 10-19 row 1's
    out = merge_tensors([base, d], "breadcrumbs", params, base_index=0)
    np.testing.assert_array_equal(out, kept_by_rank(d.reshape(-1), 8, 18).reshape(2, 10))
    # per row (the paper): each row keeps its own ranks 4-8
    out = merge_tensors([base, d], "breadcrumbs", {**params, "per_row": True}, base_index=0)
    np.testing.assert_array_equal(out, np.stack([kept_by_rank(d[0], 4, 9), kept_by_rank(d[1], 4, 9)]))


def test_breadcrumbs_gamma_is_per_model() -> None:
    # without sign consensus or normalization the merge is base + the sum of each model's sparsified delta
    base = np.zeros(20, np.float32)
    d1, d2 = magnitudes(20, 3), magnitudes(20, 4)
    params = {"weight": 1.0, "density": 0.5}
    both = merge_tensors([base, d1, d2], "breadcrumbs", {**params, "gamma": [0.0, 0.2]}, base_index=0)
    one = merge_tensors([base, d1], "breadcrumbs", {**params, "gamma": 0.0}, base_index=0)
    two = merge_tensors([base, d2], "breadcrumbs", {**params, "gamma": 0.2}, base_index=0)
    np.testing.assert_array_equal(one, kept_by_rank(d1, 10, 20))
    np.testing.assert_array_equal(two, kept_by_rank(d2, 6, 16))
    np.testing.assert_array_equal(both, one + two)  # small integers: exact


def test_breadcrumbs_ties_elects_signs() -> None:
    base = np.zeros(10, np.float32)
    d = magnitudes(10, 5)
    # a model and its exact opposite with a smaller weight: the first model's signs win everywhere, and the
    # weighted disjoint sum over agreeing models is just the first model's kept delta
    out = merge_tensors([base, d, -d], "breadcrumbs_ties", {"weight": [1.0, 0.5], "density": 0.5, "gamma": 0.1},
                        base_index=0)
    np.testing.assert_array_equal(out, kept_by_rank(d, 4, 9))


# ---------------------------------------------------------------------------------------------------- della


def della_probabilities(delta: np.ndarray, density: float, eps: float) -> np.ndarray:
    """The keep probability of every element: ranks by |delta| within each row (last dim), ascending."""
    rows = delta.reshape(-1, delta.shape[-1])
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    p = (np.float32(density) - np.float32(eps)) + (ranks / max(n - 1, 1)).astype(np.float32) * np.float32(2 * eps)
    return p.astype(np.float32).reshape(delta.shape)


@pytest.fixture(scope="module")
def della_delta() -> np.ndarray:
    """300 rows of 64 with row scales 1e-3, 1, 1e3 in turn: ranking over the whole tensor instead of per row would
    give the small rows much lower keep probabilities."""
    rng = np.random.default_rng(6)
    scale = np.array([1e-3, 1.0, 1e3], np.float32)[np.arange(300) % 3]
    return (rng.standard_normal((300, 64)) * scale[:, None]).astype(np.float32)


def test_della_keeps_by_magnitude_rank_per_row(della_delta: np.ndarray) -> None:
    d = della_delta
    base = np.zeros_like(d)
    out = merge_tensors([base, d], "della_linear", {"weight": 1.0, "density": 0.5, "epsilon": 0.2, "rescale": False},
                        base_index=0, seed=3, name="w")
    kept = out != 0
    np.testing.assert_array_equal(out[kept], d[kept])  # kept elements are untouched, the rest dropped
    p = della_probabilities(d, 0.5, 0.2)
    # each group of elements keeps a fraction within 5 sigma of its mean keep probability
    ranks = np.argsort(np.argsort(np.abs(d), axis=1), axis=1)
    groups = {
        "all": np.ones_like(kept),
        "small rows": np.broadcast_to((np.arange(300) % 3 == 0)[:, None], d.shape),
        "top quarter of each row": ranks >= 48,
        "bottom quarter of each row": ranks < 16,
    }
    for label, g in groups.items():
        mean = p[g].mean()
        sigma = math.sqrt((p[g] * (1 - p[g])).sum()) / g.sum()
        assert abs(kept[g].mean() - mean) < 5 * sigma, (label, kept[g].mean(), mean)
    assert kept[ranks >= 48].mean() > kept[ranks < 16].mean() + 0.2


def test_della_inverse_density_divides_by_each_elements_probability(della_delta: np.ndarray) -> None:
    d = della_delta[:30]
    base = np.zeros_like(d)
    out = merge_tensors([base, d], "della_linear",
                        {"weight": 1.0, "density": 0.4, "epsilon": 0.1, "rescale_mode": "inverse_density"},
                        base_index=0, seed=1, name="w")
    kept = out != 0
    assert 0.3 < kept.mean() < 0.5
    np.testing.assert_allclose(out[kept], (d / della_probabilities(d, 0.4, 0.1))[kept], rtol=1e-6)


def test_della_is_reproducible_and_keyed_by_seed_and_name(della_delta: np.ndarray) -> None:
    d = della_delta[:40]
    base = np.zeros_like(d)
    params = {"weight": 1.0, "density": 0.5}

    def run(seed: int, name: str, threads: int | None = None) -> np.ndarray:
        return merge_tensors([base, d], "della", params, base_index=0, seed=seed, name=name, threads=threads)

    a = run(1, "w")
    np.testing.assert_array_equal(a, run(1, "w", threads=1))
    assert not np.array_equal(a, run(2, "w"))
    assert not np.array_equal(a, run(1, "v"))


def test_della_density_one_keeps_everything(della_delta: np.ndarray) -> None:
    d = della_delta[:10]
    base = np.zeros_like(d)
    out = merge_tensors([base, d], "della_linear", {"weight": 1.0, "epsilon": 0.9}, base_index=0)
    np.testing.assert_array_equal(out, d)


# ---------------------------------------------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_takes_the_outlier_changes_only() -> None:
    # base 0: softmax is uniform and the per-row KL is one positive constant, so importance ranks like |b - a|.
    # |diffs| 0.01..0.60 and four outliers 5..8 (n = 64): q1 = 0.16, median = 0.32, q3 = 0.48 (sorted values at
    # floor(q (n - 1))), threshold 0.32 + 1.5 * 0.32 = 0.80: only the outliers pass
    rng = np.random.default_rng(7)
    diffs = np.concatenate([np.arange(1, 61) / 100, [5, 6, 7, 8]])
    b = (rng.permutation(diffs) * rng.choice([-1, 1], 64)).astype(np.float32)
    a = np.zeros(64, np.float32)
    out = merge_tensors([a, b], "arcee_fusion", base_index=0)
    np.testing.assert_array_equal(out, np.where(np.abs(b) >= 5, b, 0).astype(np.float32))
    # identical models: nothing changes
    np.testing.assert_array_equal(merge_tensors([b, b], "arcee_fusion", base_index=0), b)


def test_arcee_fusion_returns_the_base_dtype() -> None:
    # mergekit promotes the result to float32 (its issue #604); ferromerge keeps the base's dtype
    a = np.zeros(64, np.float16)
    b = np.linspace(-1, 1, 64, dtype=np.float32)
    assert merge_tensors([a, b], "arcee_fusion", base_index=0).dtype == np.float16


# ---------------------------------------------------------------------------------------------------- state dicts


def test_state_dicts_with_and_without_a_base() -> None:
    base = {"w": f32(1, 1, 1, 1), "v": f32(0, 0, 2, 2)}
    a = {k: x + e(0) for k, x in base.items()}
    b = {k: x + e(1) for k, x in base.items()}
    with_base = merge_state_dicts({"base": base, "a": a, "b": b}, "nuslerp", base="base", parameters={"weight": 1})
    for k in base:
        np.testing.assert_allclose(with_base[k], base[k] + f32(3 / R2, 3 / R2, 0, 0), **CLOSE, err_msg=k)
    without = merge_state_dicts({"a": a, "b": b}, "multislerp", parameters={"weight": {"a": 1.0, "b": 1.0}})
    for k in base:
        want = merge_tensors([a[k], b[k]], "multislerp", {"weight": 1.0})
        np.testing.assert_array_equal(without[k], want, err_msg=k)
    # a weight given for the base is ignored, as in mergekit
    merge_state_dicts({"base": base, "a": a, "b": b}, "multislerp", base="base",
                      parameters={"weight": {"a": 1.0, "b": 2.0, "base": 5.0}})


def test_state_dicts_route_per_model_epsilon_and_tensor_names() -> None:
    rng = np.random.default_rng(8)
    base = {"x": rng.standard_normal((8, 32)).astype(np.float32)}
    models = {"base": base, **{m: {"x": base["x"] + rng.standard_normal((8, 32)).astype(np.float32)} for m in "ab"}}
    params = {"weight": 0.5, "density": 0.5, "epsilon": {"a": 0.1, "b": 0.3}}
    sd = merge_state_dicts(models, "della", base="base", parameters=params, seed=5)
    want = merge_tensors([models["a"]["x"], models["b"]["x"], base["x"]], "della",
                         {**params, "epsilon": [0.1, 0.3]}, base_index=2, seed=5, name="x")
    np.testing.assert_array_equal(sd["x"], want)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("tensors", "method", "params", "base_index", "match"),
    [
        (3, "slerp", {"t": 0.5}, 0, r"method 'slerp' takes a base tensor and exactly 1 other tensor, got 2: "
                                    r"tensors\[1\], tensors\[2\]"),
        (2, "slerp", {"t": 0.5}, None, r"method 'slerp' requires a base tensor: pass base_index"),
        (2, "nearswap", {"t": 0.5}, None, r"method 'nearswap' requires a base tensor"),
        (3, "arcee_fusion", {}, 0, r"'arcee_fusion' takes a base tensor and exactly 1 other tensor, got 2"),
        (1, "nuslerp", {"weight": 1.0}, None, r"'nuslerp' takes exactly 2 tensors besides the base tensor \(which is "
                                              r"optional\), got 1"),
        (4, "nuslerp", {"weight": 1.0}, 0, r"'nuslerp' takes exactly 2 tensors .*, got 3"),
        (2, "model_stock", {}, 0, r"'model_stock' takes a base tensor and at least 2 other tensors, got 1"),
        (2, "slerp", {}, 0, r"missing required parameter 't' for method 'slerp'"),
        (2, "nearswap", {}, 0, r"missing required parameter 't' for method 'nearswap'"),
        (2, "slerp", {"t": float("nan")}, 0, r"parameter 't' must be finite"),
        (2, "nuslerp", {}, None, r"missing required parameter 'weight' for method 'nuslerp'"),
        (2, "karcher", {"weight": 1.0}, None, r"unknown parameter\(s\) 'weight' for method 'karcher'; known "
                                              r"parameters: max_iter, tol"),
        (2, "slerp", {"t": 0.5, "weight": 1.0}, 0, r"unknown parameter\(s\) 'weight' for method 'slerp'"),
        (2, "ties", {"weight": 1.0, "gamma": 0.1}, 0, r"unknown parameter\(s\) 'gamma' for method 'ties'"),
        (2, "breadcrumbs", {"weight": 1.0, "epsilon": 0.1}, 0, r"unknown parameter\(s\) 'epsilon'"),
        (2, "della", {"weight": 1.0, "density": 0.9}, 0,
         r"tensors\[1\]: density 0.9 with epsilon 0.15 gives keep probabilities from 0.75 to 1.05; density -/\+ "
         r"epsilon must lie in \(0, 1\)"),
        (2, "della_linear", {"weight": 1.0, "density": 0.1, "epsilon": 0.1}, 0, r"from 0 to 0.2; density -/\+"),
        (2, "della", {"weight": 1.0, "density": 0.5, "epsilon": -0.1}, 0, r"epsilon must be in \[0, inf\)"),
        (2, "breadcrumbs", {"weight": 1.0, "gamma": 1.5}, 0, r"gamma must be in \[0, 1\], got 1.5"),
        (2, "karcher", {"max_iter": 2.5}, None, r"parameter 'max_iter' must be an integer, got 2.5"),
        (2, "karcher", {"max_iter": 0}, None, r"max_iter must be in \[1, 1e\+06\], got 0"),
        (2, "karcher", {"tol": -1.0}, None, r"tol must be in \[0, inf\)"),
        (3, "sce", {"select_topk": 1.5}, 0, r"select_topk must be in \[0, 1\]"),
        (2, "multislerp", {"weight": 1.0, "eps": 0.0}, None, r"eps must be in \(0, inf\)"),
        (2, "ramplus_tl", {"alpha": -1.0}, 0, r"alpha must be in \[0, inf\)"),
        (3, "model_stock", {"filter_wise": 1}, 0, r"parameter 'filter_wise' must be true or false"),
        (2, "slerpy", {}, 0, r"unknown merge method 'slerpy'; ferromerge implements: arcee_fusion, breadcrumbs"),
    ],
)
def test_parameter_and_input_count_errors(
    tensors: int, method: str, params: dict, base_index: int | None, match: str
) -> None:
    xs = [np.full(8, i, np.float32) for i in range(tensors)]
    with pytest.raises(ParameterError, match=match):
        merge_tensors(xs, method, params, base_index=base_index)


def test_state_dict_count_errors_name_the_models() -> None:
    sd = {m: {"w": np.zeros(4, np.float32)} for m in ("base", "a", "b")}
    with pytest.raises(ParameterError, match=r"'nearswap' takes a base model and exactly 1 other model, got 2: "
                                             r"model 'a', model 'b'"):
        merge_state_dicts(sd, "nearswap", base="base", parameters={"t": 0.1})
    with pytest.raises(ParameterError, match=r"'model_stock' requires a base model: pass base=<model name>"):
        merge_state_dicts(sd, "model_stock")
