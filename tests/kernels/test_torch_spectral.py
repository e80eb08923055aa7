"""The torch path of the SVD-space methods (``ferromerge.torch_spectral``) on CPU torch, against ``reference.spectral``.

Tolerance. torch computes in float32, the reference in float64. A float32 SVD is backward stable, so every step
of a method lands within c·eps32 of the exact step on a slightly perturbed input, and the method's output within
about c·eps32·κ·Σ‖tau_t‖_F of the float64 result, where κ is the method's normwise amplification of such
perturbations (``reference.spectral.sensitivity``: the task vectors and every SVD input perturbed, ~1 for
well-separated spectra, 1/gap near a close cut, 1/σ_min for a nearly singular polar factor). So the check is

    ‖got − expected‖_F <= C·eps32·max(κ, 1)·|alpha|·Σ_t‖tau_t‖_F + 2·eps32·‖expected‖_F

with C = 128: over 310 random families (shapes 1×7 … 64×64, 1–4 tasks, decaying and Gaussian spectra, all four
methods, torch's float32 LAPACK) the largest C observed was 18 (TSV-M, Gaussian tasks), so 128 leaves a margin of
~7 for other float32 SVD implementations without hiding an algorithmic error (a wrong slot, a missing polar step
or a wrong rank moves the result by O(‖tau‖), about 1e4 times the bound). The last term is the float32 sum
base + alpha·tau. The check refuses test data with κ > 1e4 (no unique answer), so it never degenerates.

The module is skipped when torch is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ferromerge import methods  # noqa: E402
from ferromerge import torch_spectral as tp  # noqa: E402
from ferromerge.errors import ParameterError  # noqa: E402
from reference import (
    arrays,  # noqa: E402
    linalg,  # noqa: E402
)
from reference import spectral as spectral_ref  # noqa: E402

pytestmark = pytest.mark.torch

CPU = torch.device("cpu")
C = 128.0
KAPPA_MAX = 1e4
SHAPES = [(48, 40), (40, 48), (1, 7), (64, 64)]
REFERENCE = {"tsv_m": spectral_ref.tsv_m, "iso_c": spectral_ref.iso_c, "iso_cts": spectral_ref.iso_cts, "star": spectral_ref.star}
# reference keyword arguments of each method's parameters (the external merge gets them as floats)
REF_KEYS = {"tsv_m": ("alpha",), "iso_c": ("alpha",), "iso_cts": ("alpha", "common_space_fraction"),
            "star": ("eta",)}


# ----------------------------------------------------------------------------------------------------------------
# data and helpers
# ----------------------------------------------------------------------------------------------------------------


def family(seed: int, shape, n_tasks: int, kind: str = "decay", ratios=(0.75, 0.9)):
    """float32 base ~ N(0, 1) and ``n_tasks`` fine-tunes base + tau_t. ``decay``: tau_t has random singular
    vectors and a geometric spectrum (ratio drawn from ``ratios``, top 0.5–2), well separated; ``gauss``: tau_t ~
    N(0, 0.05²) entrywise (a slowly decaying Marchenko–Pastur spectrum, where a randomized SVD is visibly
    approximate)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    base = rng.normal(0.0, 1.0, shape).astype(np.float32)
    xs = []
    for _ in range(n_tasks):
        if kind == "decay":
            tau = linalg.with_spectrum(rng, m, n, linalg.decaying(min(m, n), rng.uniform(*ratios), rng.uniform(0.5, 2.0)))
        else:
            tau = rng.normal(0.0, 0.05, shape)
        xs.append((base + tau).astype(np.float32))
    return base, xs


class Loader:
    """``load(i)`` as the Rust executor provides it: a fresh float32 copy each call; records the calls."""

    def __init__(self, base, xs):
        self.base, self.xs, self.calls = base, xs, []

    def __call__(self, i: int) -> np.ndarray:
        self.calls.append(i)
        return np.array(self.base if i == -1 else self.xs[i], dtype=np.float32, copy=True)


def run(method, base, xs, params=None, *, seed=0, name="t", device=CPU):
    return tp.merge_tensor(device, name, method, base.shape, dict(params or {}), seed, len(xs), Loader(base, xs))


def expected(method, base, xs, params):
    kw = {k: params[k] for k in REF_KEYS[method] if k in params}
    return REFERENCE[method](base, xs, **kw)


def assert_close(got, method, base, xs, params, *, context=""):
    """The tolerance of the module docstring."""
    assert got is not None and got.dtype == np.float32 and got.shape == base.shape, context
    exp = expected(method, base, xs, params)
    taus = arrays.task_vectors(base, xs)
    tau_kw = {k: params[k] for k in REF_KEYS[method] if k in params and k != "alpha"}
    kappa = spectral_ref.sensitivity(method, taus, **tau_kw)
    assert kappa < KAPPA_MAX, f"{context}: ill-conditioned test data (κ = {kappa:.3g})"
    alpha = abs(params.get("alpha", 1.0)) if method != "star" else 1.0
    bound = C * arrays.EPS32 * max(kappa, 1.0) * alpha * sum(np.linalg.norm(t) for t in taus)
    bound += 2 * arrays.EPS32 * np.linalg.norm(exp)
    err = float(np.linalg.norm(got.astype(np.float64) - exp))
    assert err <= bound, f"{context}: ‖got − expected‖_F = {err:.3g} > {bound:.3g} (κ = {kappa:.3g})"


def star_margin_ok(base, xs, eta) -> bool:
    return min(spectral_ref.star_rank_margin(t, eta) for t in arrays.task_vectors(base, xs)) > 1e-4


def star_family(seed: int, shape, n_tasks: int, eta: float):
    """``family`` with the first seed from ``seed`` on whose kept STAR ranks are not within float32 rounding of
    the eta target (a margin of 1e-4 of the nuclear norm; most seeds qualify)."""
    for s in range(seed, seed + 50):
        base, xs = family(s, shape, n_tasks)
        if star_margin_ok(base, xs, eta):
            return base, xs
    raise AssertionError(f"no seed in [{seed}, {seed + 50}) gives STAR rank margins > 1e-4 for eta={eta}")


# ----------------------------------------------------------------------------------------------------------------
# each method against the reference
# ----------------------------------------------------------------------------------------------------------------

METHOD_PARAMS = {
    "tsv_m": {"alpha": 0.7, "exact_svd": 1.0},
    "iso_c": {"alpha": 1.3},
    "iso_cts": {"alpha": 1.0, "common_space_fraction": 0.8},
    "star": {"eta": 40.0},
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_methods_match_the_reference(method, shape):
    params = METHOD_PARAMS[method]
    # STAR: the kept rank must not sit within float32 rounding of the eta target
    base, xs = star_family(11, shape, 3, params["eta"]) if method == "star" else family(11, shape, 3)
    assert_close(run(method, base, xs, params), method, base, xs, params, context=f"{method} {shape}")


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 4])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8, 1.0])
def test_iso_cts_common_space_rounding(n_tasks, fraction):
    """r = 10: the task-specific dims are round((r − int(r·f))/T)·T with Python's half-to-even rounding
    (T = 4, f = 0.8: round(0.5) = 0, so everything is common space and Iso-CTS is Iso-C)."""
    base, xs = family(5 + n_tasks, (13, 10), n_tasks, "gauss")
    params = {"alpha": 1.0, "common_space_fraction": fraction}
    got = run("iso_cts", base, xs, params)
    assert_close(got, "iso_cts", base, xs, params, context=f"iso_cts T={n_tasks} f={fraction}")
    common, _ = spectral_ref.iso_cts_dims((13, 10), n_tasks, fraction)
    if common == 10:
        iso_c = run("iso_c", base, xs, {"alpha": 1.0})
        np.testing.assert_allclose(got, iso_c, rtol=0, atol=64 * arrays.EPS32 * float(np.abs(iso_c).max()))


@pytest.mark.parametrize("eta", [1.0, 25.0, 40.0, 77.0, 100.0])
def test_star_eta(eta):
    base, xs = star_family(3, (30, 20), 2, eta)
    got = run("star", base, xs, {"eta": eta})
    assert_close(got, "star", base, xs, {"eta": eta}, context=f"star eta={eta}")
    if eta == 100.0:  # every singular value kept, scale 1: the plain average of the task vectors
        mean = spectral_ref.star(base, xs, 100.0)
        np.testing.assert_allclose(mean, base + np.mean(arrays.task_vectors(base, xs), axis=0), rtol=0, atol=1e-12)


def test_tsv_m_single_task_is_task_arithmetic():
    base, xs = family(4, (20, 17), 1)
    got = run("tsv_m", base, xs, {"alpha": 0.5, "exact_svd": 1.0})
    tau = xs[0].astype(np.float64) - base
    np.testing.assert_allclose(got, base + 0.5 * tau, rtol=0, atol=64 * arrays.EPS32 * float(np.abs(tau).max() + 1))


def test_tsv_m_with_more_tasks_than_rank_takes_the_mean_task_vector():
    """1×7 with 3 tasks: k = floor(1/3) = 0 triplets per task; the update is the mean task vector, as the Rust
    kernel's (the reference code's would be 0: the update silently dropped)."""
    base, xs = family(6, (1, 7), 3)
    want = base + 2.0 * np.mean([x.astype(np.float64) - base for x in xs], axis=0)
    np.testing.assert_allclose(run("tsv_m", base, xs, {"alpha": 2.0}), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(spectral_ref.tsv_m(base, xs, 2.0), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_zero_task_vectors_give_the_base_exactly(method):
    base, _ = family(7, (12, 9), 0)
    got = run(method, base, [base.copy(), base.copy()], METHOD_PARAMS[method])
    assert got.tobytes() == base.tobytes()


# ----------------------------------------------------------------------------------------------------------------
# randomized vs exact (TSV-M)
# ----------------------------------------------------------------------------------------------------------------


def test_randomized_is_exact_when_the_sketch_covers_the_matrix():
    """k + oversample >= min(m, n): the sketch would span everything, so the exact SVD runs (identical bytes)."""
    base, xs = family(8, (48, 40), 3, "gauss")  # k = 13
    exact = run("tsv_m", base, xs, {"exact_svd": 1.0})
    covered = run("tsv_m", base, xs, {"exact_svd": 0.0, "oversample": 27.0})  # q = 40
    sketched = run("tsv_m", base, xs, {"exact_svd": 0.0, "oversample": 26.0})  # q = 39 < 40
    assert covered.tobytes() == exact.tobytes()
    assert sketched.tobytes() != exact.tobytes()


def test_randomized_tsv_m_on_decaying_spectra_matches_the_exact_reference():
    """Geometric spectra with ratio <= 0.75: with p = 10 and q = 2 the part of each task's top-k subspace that the
    sketch misses scales as (σ_{k+p+1}/σ_k)^(2q+1) <= 0.75^55 ≈ 1e-7, below float32 rounding, so the randomized
    merge meets the exact reference within twice the float32 bound."""
    base, xs = family(9, (64, 64), 4, ratios=(0.6, 0.75))  # k = 16, q = 26 < 64: the randomized path
    params = {"alpha": 1.0, "exact_svd": 0.0}
    got = run("tsv_m", base, xs, params)
    assert got.tobytes() != run("tsv_m", base, xs, {"exact_svd": 1.0}).tobytes(), "not the randomized path"
    taus = arrays.task_vectors(base, xs)
    kappa = spectral_ref.sensitivity("tsv_m", taus)
    exp = spectral_ref.tsv_m(base, xs, 1.0)
    bound = 2 * (C * arrays.EPS32 * max(kappa, 1) * sum(np.linalg.norm(t) for t in taus) + 2 * arrays.EPS32 * np.linalg.norm(exp))
    assert float(np.linalg.norm(got - exp)) <= bound


@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_randomized_top_k_within_halko_bounds(k):
    """``_top_k`` with p = 10, q = 2 against the optimal rank-k error ‖A − A_k‖_F (Eckart–Young).

    Loose bound, slowly decaying (Gaussian) spectrum: Halko, Martinsson & Tropp (2011) Thm 10.5 gives
    E‖A − QQᵀA‖_F <= (1 + k/(p−1))^½·‖A − A_k‖_F without power iterations (these only shrink it), and truncating
    QQᵀA to rank k adds at most ‖A − A_k‖_F (§9.4), so ‖A − U_k S_k V_kᵀ‖_F <= (1 + (1 + k/(p−1))^½)·‖A − A_k‖_F.
    Tight bound, geometric spectrum ratio 0.7: the missed part decays as (σ_{k+p+1}/σ_k)^(2q+1) = 0.7^55 ≈ 3e-9,
    so the error is optimal to (1 + 1e-3), plus float32 rounding (64·eps32·‖A‖_F)."""
    rng = np.random.default_rng(k)
    p, q = 10, 2
    gauss = rng.normal(size=(64, 56))
    steep = linalg.with_spectrum(rng, 64, 56, linalg.decaying(56, 0.7))
    for a, eps in ((gauss, (1 + k / (p - 1)) ** 0.5), (steep, 1e-3)):
        u, s, vt = tp._top_k(torch, torch.from_numpy(a.astype(np.float32)), k, exact=False, oversample=p,
                             power_iters=q)
        approx = (u.double() * s.double()) @ vt.double()
        err = float(np.linalg.norm(a - approx.numpy()))
        optimal = float(np.linalg.norm(np.linalg.svd(a, compute_uv=False)[k:]))
        assert err <= (1 + eps) * optimal + 64 * arrays.EPS32 * float(np.linalg.norm(a)), (k, eps, err, optimal)
        assert err >= optimal * (1 - 1e-4)  # Eckart–Young: nothing of rank k does better


# ----------------------------------------------------------------------------------------------------------------
# reproducibility of the sketch
# ----------------------------------------------------------------------------------------------------------------


def test_sketch_is_reproducible_and_keyed_by_seed_and_name():
    base, xs = family(10, (40, 36), 3, "gauss")  # k = 12, q = 22: randomized, visibly approximate
    params = {"exact_svd": 0.0}
    state = torch.get_rng_state().clone()
    first = run("tsv_m", base, xs, params, seed=1, name="layers.0.w")
    assert torch.equal(torch.get_rng_state(), state), "the external merge must leave the global RNG alone"
    torch.manual_seed(12345)  # a different global state must not matter
    assert run("tsv_m", base, xs, params, seed=1, name="layers.0.w").tobytes() == first.tobytes()
    other_name = run("tsv_m", base, xs, params, seed=1, name="layers.1.w")
    other_seed = run("tsv_m", base, xs, params, seed=2, name="layers.0.w")
    assert other_name.tobytes() != first.tobytes()
    assert other_seed.tobytes() != first.tobytes()
    # different sketches, the same approximation quality: all within the loose randomized bound of each other
    scale = float(np.linalg.norm(np.stack(arrays.task_vectors(base, xs))))
    for o in (other_name, other_seed):
        assert float(np.linalg.norm(o.astype(np.float64) - first)) <= scale


def test_sketch_seed_is_stable_and_distinct():
    seeds = {tp.sketch_seed(s, n) for s in (0, 1, 2) for n in ("", "a", "b", "model.layers.0.mlp.up_proj.weight")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    # blake2b, not Python's salted hash(): the same value in another process
    code = "from ferromerge.torch_spectral import sketch_seed; print(sketch_seed(7, 'x.weight'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == tp.sketch_seed(7, "x.weight")


# ----------------------------------------------------------------------------------------------------------------
# the external-merge contract (what the engine calls for each tensor)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,shape",
    [("tsv_m", (7,)), ("iso_c", (3, 4, 5)), ("star", (1,)), ("iso_cts", (0, 5)), ("consensus", (6, 5)),
     ("tall_masks", (6, 5)), ("ties", (6, 5)), ("linear", (6, 5))],
)
def test_external_merge_declines_other_methods_and_non_matrices(method, shape):
    external = tp.external_merge("torch:cpu")
    calls = []
    out = external("t", method, shape, {}, 0, 2, lambda i: calls.append(i))
    assert out is None and calls == [], "declined tensors must not be loaded"


@pytest.mark.parametrize("method,passes", [("tsv_m", 1), ("iso_c", 1), ("iso_cts", 2), ("star", 1)])
def test_external_merge_streams_tasks_and_returns_theta_with_the_base(method, passes):
    base, xs = family(12, (24, 18), 3)
    load = Loader(base, xs)
    external = tp.external_merge("torch:cpu")
    params = {**METHOD_PARAMS[method]}
    theta = external("layers.0.w", method, (24, 18), params, 0, 3, load)
    # the base once, then each task once per pass, one at a time
    assert load.calls == [-1] + [0, 1, 2] * passes
    assert theta.dtype == np.float32 and theta.shape == (24, 18) and theta.flags.c_contiguous
    assert_close(theta, method, base, xs, params, context=f"external merge {method}")
    # theta is base + merged: without the base the result would be ~N(0, 1) away
    assert float(np.linalg.norm(theta - base)) < 0.5 * float(np.linalg.norm(base))


def test_external_merge_declines_excluded_matrices():
    """``mean_only`` (the config's ``exclude``) asks for the mean task vector, which the Rust kernel computes."""
    external = tp.external_merge("torch:cpu")
    for method in sorted(METHOD_PARAMS):
        calls = []
        assert external("embed_tokens.weight", method, (6, 5), {"mean_only": 1.0}, 0, 2, calls.append) is None
        assert calls == []


def test_external_merge_uses_defaults_for_missing_parameters():
    base, xs = family(13, (20, 16), 2)
    for method in ("iso_cts", "star", "iso_c"):
        defaults = {k: methods.get(method).kernel_param_defaults()[k] for k in REF_KEYS[method]}
        got = run(method, base, xs, {})
        assert got.tobytes() == run(method, base, xs, defaults).tobytes()
        assert_close(got, method, base, xs, defaults, context=f"{method} defaults")


def test_external_merge_accepts_read_only_or_other_dtype_loads():
    base, xs = family(14, (10, 8), 2)

    def load(i):
        a = (base if i == -1 else xs[i]).astype(np.float64)  # wrong dtype, and read-only
        a.setflags(write=False)
        return a

    got = tp.merge_tensor(CPU, "t", "iso_c", (10, 8), {}, 0, 2, load)
    assert got.tobytes() == run("iso_c", base, xs).tobytes()
    with pytest.raises(ValueError, match="shape"):
        tp.merge_tensor(CPU, "t", "iso_c", (10, 8), {}, 0, 2, lambda i: np.zeros((8, 10), np.float32))


# ----------------------------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------------------------


def test_device_strings():
    assert tp.torch_device("torch:cpu") == torch.device("cpu")
    assert tp.torch_device("cpu") is None and "Rust" in tp.torch_unavailable_reason("cpu")
    for bad in ("gpu", "cuda:", "cuda:-1", "CUDA", "torch:cuda", "cuda:0 ", "", 3):
        with pytest.raises(ParameterError, match="device"):
            tp.check_device(bad)
        with pytest.raises(ParameterError):
            tp.torch_device(bad)
    with pytest.raises(ParameterError, match="Rust kernels"):
        tp.external_merge("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_without_a_gpu_falls_back_with_a_reason():
    for dev in ("cuda", "cuda:0", "cuda:3"):
        why = tp.torch_unavailable_reason(dev)
        assert why is not None and "CUDA" in why
        assert tp.torch_device(dev) is None
        with pytest.warns(tp.TorchUnavailableWarning, match="Rust kernels"):
            assert tp.torch_device(dev, warn=True) is None
        with pytest.raises(ParameterError, match="CUDA"):
            tp.external_merge(dev)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_cuda_matches_the_reference(method):
    base, xs = star_family(15, (96, 80), 3, 40.0)
    params = METHOD_PARAMS[method]
    external = tp.external_merge("cuda")
    got = external("t", method, base.shape, params, 0, 3, Loader(base, xs))
    assert_close(got, method, base, xs, params, context=f"cuda {method}")
    count = torch.cuda.device_count()
    assert "device" in tp.torch_unavailable_reason(f"cuda:{count}")


def test_importing_ferromerge_does_not_import_torch():
    torch_parent = str(Path(torch.__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.append({torch_parent!r}); import ferromerge, ferromerge.torch_spectral; "
            "import importlib.util; assert importlib.util.find_spec('torch') is not None; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
