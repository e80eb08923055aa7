"""ferromerge vs the real mergekit (0.1.5, own virtualenv) on the merge methods beyond linear / task arithmetic /
TIES / DARE: slerp, nuslerp, multislerp, karcher, breadcrumbs, breadcrumbs_ties, della, della_linear, sce, ram,
ramplus_tl, model_stock, nearswap, arcee_fusion, and passthrough with ``scale``.

The family is Llama-shaped (hidden 32, intermediate 48, vocab 64, 4 layers), written with the ``safetensors``
package: ``base`` and four fine-tunes ``a b c d``. Every value of base and fine-tunes lies on the grid of multiples
of 2^-24 below 1, so each task vector ``x − base`` is computed *exactly* in float32 by both tools; within one
tensor the non-zero ``|x − base|`` of a model are pairwise distinct, so every magnitude selection (breadcrumbs,
della's ranks) has exactly one answer. The fine-tunes share a direction (``a``, ``b``, ``d`` along it, ``c``
against it), so cosines, sign elections and model_stock's ``t`` are far from degenerate; ``c`` and ``d`` leave a
quarter of their elements exactly at the base (sparse fine-tunes, which RAM's unique/shared split needs).
``near`` is the base plus tiny noise (slerp's linear branch), ``far`` an independent draw (~90° from everything, so
the spherical methods are far from linear and karcher needs its iterations), ``base16``/``a16`` are bfloat16 copies
of ``base``/``a``.

Both tools run the same YAML files (mergekit through ``mergekit-yaml`` in one interpreter with ``--random-seed``,
see test_mergekit_diff.py). Tolerances, all float32 math on both sides:

* element-wise methods (breadcrumbs*, ram*, nearswap, sce, passthrough): the same float32 operations up to order,
  so ``rtol 1e-6, atol 1e-7`` as linear in test_mergekit_diff.py (values are ~0.02, float32 ulp ~2e-9).
* methods that go through norms, dot products and trigonometry (slerp, nuslerp, multislerp, karcher,
  model_stock): mergekit sums dot products in float32, ferromerge in float64 blocks (the contract), so the
  coefficients differ by float32 rounding of the dots (≤ ~1e-7 relative) amplified by ``acos`` / the model_stock
  quotient; ``rtol 1e-5, atol 1e-7``. Measured: at most 2.2e-8 absolute on either kind; the maxima per case are
  printed (``-s``) and recorded in docs/compat.md.
* selections are compared as sets: every element that one tool keeps and the other drops is a failure, except where
  mergekit's own choice is decided by float rounding (sce's variance at the top-k threshold, arcee_fusion's importance
  at its threshold); those are counted and bounded.
* della is random (torch's global generator vs ferromerge's counter RNG): kept fractions per rank band against the
  exact keep probabilities (5σ of the Poisson-binomial), exact kept values, L1 norms, and two-sample 5σ bounds on the
  merged deltas' moments. A 5σ bound fails by chance with probability < 1e-6 per check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest
from helpers.mergekit import (
    LLAMA_CONFIG,
    dtypes_in_dir,
    llama_shapes,
    max_diffs,
    read_safetensors_dir,
    report_diffs,
    run_mergekit,
)
from safetensors.numpy import save_file

pytestmark = pytest.mark.mergekit

LAYERS = 4
GRID = 2.0**-24  # every stored value is a multiple of GRID below 1: exact in float32, and so is x − base
#: fine-tune: (coefficient of the shared direction, sigma of its own noise, fraction of elements left at the base)
FINETUNES = {"a": (1.0, 0.003, 0.0), "b": (0.8, 0.004, 0.0), "c": (-0.3, 0.002, 0.25), "d": (0.6, 0.005, 0.25)}

ELEMENTWISE = dict(rtol=1e-6, atol=1e-7)
SPHERICAL = dict(rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# the family
# ----------------------------------------------------------------------------------------------------------------


def _on_grid(x: np.ndarray) -> np.ndarray:
    return (np.rint(x / GRID) * GRID).astype(np.float32)


def _distinct_magnitudes(g: np.ndarray, rng: np.random.Generator, zero_frac: float) -> np.ndarray:
    """``g`` on the grid with pairwise-distinct non-zero magnitudes (equal ones pushed apart one grid unit at a
    time, in order of size), then a random ``zero_frac`` of the elements set to exactly 0."""
    flat = g.reshape(-1)
    units = np.maximum(np.rint(np.abs(flat) / GRID).astype(np.int64), 1)
    order = np.argsort(units, kind="stable")
    steps = np.arange(units.size)
    units[order] = np.maximum.accumulate(units[order] - steps) + steps  # strictly increasing along `order`
    out = np.where(flat < 0, -1.0, 1.0) * units * GRID
    out[rng.random(flat.size) < zero_frac] = 0.0
    return out.reshape(g.shape)


def _write_model(root: Path, name: str, tensors: dict[str, np.ndarray], torch_dtype: str) -> None:
    (root / name).mkdir()
    save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    config = {**LLAMA_CONFIG, "num_hidden_layers": LAYERS, "torch_dtype": torch_dtype}
    (root / name / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def family5(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mk-methods-family")
    rng = np.random.default_rng(20261124)
    shapes = llama_shapes(LAYERS)
    base = {k: _on_grid(rng.normal(0.0, 0.02, s)) for k, s in shapes.items()}
    shared = {k: rng.normal(0.0, 0.003, s) for k, s in shapes.items()}
    _write_model(root, "base", base, "float32")
    for name, (coef, sigma, zero_frac) in FINETUNES.items():
        tensors = {}
        for k, b in base.items():
            delta = _distinct_magnitudes(coef * shared[k] + rng.normal(0.0, sigma, b.shape), rng, zero_frac)
            x = (b.astype(np.float64) + delta).astype(np.float32)
            assert np.array_equal(x.astype(np.float64) - b, delta), f"{name} {k}: x − base is not exact"
            tensors[k] = x
        _write_model(root, name, tensors, "float32")
    _write_model(root, "near", {k: (v + rng.normal(0.0, 1e-4, v.shape)).astype(np.float32) for k, v in base.items()},
                 "float32")
    _write_model(root, "far", {k: _on_grid(rng.normal(0.0, 0.02, s)) for k, s in shapes.items()}, "float32")
    a = read_safetensors_dir(root / "a")
    for src, dst in (("base", "base16"), ("a", "a16")):
        values = base if src == "base" else a
        _write_model(root, dst, {k: v.astype(ml_dtypes.bfloat16) for k, v in values.items()}, "bfloat16")
    return root


_TENSORS: dict[str, dict[str, np.ndarray]] = {}


def model(family5: Path, name: str) -> dict[str, np.ndarray]:
    if name not in _TENSORS:
        _TENSORS[name] = read_safetensors_dir(family5 / name)
    return _TENSORS[name]


# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------


def case_configs(root: Path) -> dict[str, dict[str, Any]]:
    def ms(*specs: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
        return [{"model": str(root / n), **({"parameters": p} if p else {})} for n, p in specs]

    def with_base(method: str, specs, params=None, base: str = "base", **kw) -> dict[str, Any]:
        c = {"merge_method": method, "base_model": str(root / base), "models": ms(*specs)}
        if params:
            c["parameters"] = params
        return {**c, "dtype": "float32", **kw}

    def no_base(method: str, specs, params=None) -> dict[str, Any]:
        c = {"merge_method": method, "models": ms(*specs)}
        if params:
            c["parameters"] = params
        return {**c, "dtype": "float32"}

    def w(weight: float, **more: float) -> dict[str, float]:
        return {"weight": weight, **more}

    up, down = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    return {
        # --- slerp (base + exactly one other)
        "slerp_t03": with_base("slerp", [("a", None)], {"t": 0.3}),
        "slerp_t07_base_listed": with_base("slerp", [("base", None), ("b", None)], {"t": 0.7}),
        "slerp_lerp_branch": with_base("slerp", [("near", None)], {"t": 0.4}),  # |cos| > 0.9995: linear branch
        "slerp_far": with_base("slerp", [("far", None)], {"t": 0.5}),
        # examples/gradient-slerp.yml, fp32
        "slerp_gradient": {
            "slices": [{"sources": [{"model": str(root / "base"), "layer_range": [0, LAYERS]},
                                    {"model": str(root / "d"), "layer_range": [0, LAYERS]}]}],
            "merge_method": "slerp",
            "base_model": str(root / "base"),
            "parameters": {"t": [{"filter": "self_attn", "value": up}, {"filter": "mlp", "value": down},
                                 {"value": 0.5}]},
            "dtype": "float32",
        },
        # --- nuslerp (exactly 2 non-base, base optional)
        "nuslerp_nobase": no_base("nuslerp", [("a", w(0.3)), ("b", w(0.7))]),
        "nuslerp_base": with_base("nuslerp", [("a", w(0.4)), ("c", w(1.2))]),
        "nuslerp_rows": no_base("nuslerp", [("a", w(1.0)), ("b", w(3.0))], {"nuslerp_flatten": False}),
        "nuslerp_cols_base": with_base("nuslerp", [("a", w(2.0)), ("d", w(1.0))],
                                       {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        # --- multislerp (base optional)
        "multislerp_nobase3": no_base("multislerp", [("a", w(0.2)), ("b", w(0.3)), ("c", w(0.5))]),
        "multislerp_base3": with_base("multislerp", [("a", w(1.0)), ("b", w(1.0)), ("d", w(2.0))]),
        "multislerp_base_unnormalized": with_base("multislerp", [("a", w(0.6)), ("b", w(0.6)), ("c", w(0.3))],
                                                  {"normalize_weights": False, "eps": 1e-6}),
        # --- karcher (a base_model joins as one more input)
        "karcher_base_joins": with_base("karcher", [("a", None), ("b", None)]),
        "karcher_iters": no_base("karcher", [("a", None), ("b", None), ("c", None), ("d", None)],
                                 {"max_iter": 3, "tol": 1e-9}),
        # wide angles: one iteration stops well short of the mean, the default ten converge
        "karcher_far_one_iter": no_base("karcher", [("a", None), ("far", None), ("c", None)], {"max_iter": 1}),
        "karcher_far": no_base("karcher", [("a", None), ("far", None), ("c", None)]),
        # tol also gates inputs by norm (≤ tol: out of the direction, all out: zero) and angles (< tol: no pull)
        "karcher_tol_gate": no_base("karcher", [("a", None), ("b", None)], {"tol": 0.5}),
        # --- breadcrumbs (per-tensor magnitude band) and breadcrumbs_ties
        "breadcrumbs_d05": with_base("breadcrumbs", [("a", w(0.5, density=0.5)), ("b", w(0.5, density=0.5))]),
        "breadcrumbs_gamma0": with_base("breadcrumbs", [("a", w(1.0, density=0.7, gamma=0.0)),
                                                        ("c", w(0.6, density=0.4, gamma=0.0))]),
        # d: density + gamma > 1, so mergekit keeps the smallest `density` share (n_bot = 0)
        "breadcrumbs_mixed": with_base("breadcrumbs", [("a", w(0.7, density=0.3, gamma=0.2)),
                                                       ("b", w(-0.4, density=0.6, gamma=0.05)),
                                                       ("d", w(1.1, density=0.9, gamma=0.2))],
                                       {"lambda": 0.8, "rescale": True, "normalize": True}),
        "breadcrumbs_single": with_base("breadcrumbs", [("a", w(1.0, density=0.4, gamma=0.1))]),
        "breadcrumbs_ties": with_base("breadcrumbs_ties", [("a", w(0.5, density=0.6, gamma=0.05)),
                                                           ("b", w(0.3, density=0.6, gamma=0.05)),
                                                           ("c", w(0.9, density=0.5, gamma=0.05))]),
        "breadcrumbs_ties_norm_rescale": with_base("breadcrumbs_ties", [("a", w(1.0, density=0.5)),
                                                                        ("c", w(1.0, density=0.5)),
                                                                        ("d", w(1.0, density=0.5))],
                                                   {"normalize": True, "rescale": True}),
        # --- della / della_linear (random)
        "della_linear_single": with_base("della_linear", [("a", w(1.0, density=0.5, epsilon=0.2))],
                                         {"rescale": False}),
        "della_single_l1": with_base("della", [("b", w(1.0, density=0.4, epsilon=0.1))]),
        "della_pair": with_base("della", [("a", w(0.6, density=0.6)), ("b", w(0.4, density=0.6))]),
        "della_linear_pair": with_base("della_linear", [("a", w(0.5, density=0.5, epsilon=0.1)),
                                                        ("b", w(0.5, density=0.5, epsilon=0.1))]),
        "della_bad_epsilon": with_base("della", [("a", w(1.0, density=0.5, epsilon=0.5))]),
        # --- sce
        "sce_top1": with_base("sce", [("a", None), ("b", None), ("c", None)]),
        "sce_top05": with_base("sce", [("a", None), ("b", None), ("c", None), ("d", None)], {"select_topk": 0.5}),
        # --- ram / ramplus_tl
        "ram_default": with_base("ram", [("a", None), ("b", None), ("c", None), ("d", None)]),
        "ram_eps": with_base("ram", [("a", None), ("b", None), ("c", None), ("d", None)], {"epsilon": 0.003}),
        "ramplus_tl_default": with_base("ramplus_tl", [("a", None), ("b", None), ("c", None), ("d", None)]),
        "ramplus_tl_custom": with_base("ramplus_tl", [("a", None), ("c", None), ("d", None)],
                                       {"epsilon": 0.002, "r": 0.5, "alpha": 0.5}),
        # --- model_stock
        "model_stock_2": with_base("model_stock", [("a", None), ("b", None)]),
        "model_stock_3_filter_wise": with_base("model_stock", [("a", None), ("b", None), ("c", None)],
                                               {"filter_wise": True}),
        "model_stock_4": with_base("model_stock", [("a", None), ("b", None), ("c", None), ("d", None)]),
        "model_stock_4_filter_wise": with_base("model_stock", [("a", None), ("b", None), ("c", None), ("d", None)],
                                               {"filter_wise": True}),
        # --- nearswap
        "nearswap_t0002": with_base("nearswap", [("a", None)], {"t": 0.002}),
        "nearswap_t00005": with_base("nearswap", [("d", None)], {"t": 0.0005}),
        # --- arcee_fusion
        "arcee_fusion_fp32": with_base("arcee_fusion", [("a", None)]),
        "arcee_fusion_bf16": with_base("arcee_fusion", [("a16", None)], base="base16", dtype="bfloat16"),
        # --- passthrough with a filtered scale and a scale gradient (not exactly representable in float32)
        "passthrough_scale": no_base("passthrough", [("a", {"scale": [
            {"filter": "o_proj", "value": 0.3}, {"filter": "mlp", "value": [0.5, 1.7]}, {"value": 1.0}]})]),
    }


@pytest.fixture(scope="session")
def mk_runs(family5, mergekit_python_path, tmp_path_factory) -> dict[str, tuple[Path, Path, dict, str | None]]:
    """{case: (config_path, mergekit_out_dir, config, mergekit_error_or_None)}: every case through mergekit-yaml."""
    configs = case_configs(family5)
    done = run_mergekit(configs, mergekit_python_path, tmp_path_factory.mktemp("mk-methods-runs"))
    return {name: (cfg, out, configs[name], err) for name, (cfg, out, err) in done.items()}


@pytest.fixture(scope="session")
def fm_run(mk_runs, tmp_path_factory) -> Callable[[str], Path]:
    """``fm_run(case)``: ferromerge's output directory for the case's YAML file, run once on first use (so that
    one failing method fails its own tests only)."""
    import ferromerge

    work = tmp_path_factory.mktemp("fm-methods-runs")
    done: dict[str, tuple[Path | None, BaseException | None]] = {}

    def run(case: str) -> Path:
        if case not in done:
            out = work / f"fm-{case}"
            try:
                ferromerge.run(str(mk_runs[case][0]), str(out), quiet=True, seed=0)
                done[case] = (out, None)
            except Exception as e:  # kept and raised again for every test of this case
                done[case] = (None, e)
        out, err = done[case]
        if err is not None:
            raise err
        return out

    return run


def _pair(mk_runs, fm_run, case: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    _, mk_dir, cfg, err = mk_runs[case]
    assert err is None, f"mergekit failed on {case}:\n{err}"
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_run(case))
    assert set(mk) == set(fm), \
        f"{case}: only mergekit {sorted(set(mk) - set(fm))}, only ferromerge {sorted(set(fm) - set(mk))}"
    for name in mk:
        assert mk[name].shape == fm[name].shape, f"{case}: {name}: shape {mk[name].shape} vs {fm[name].shape}"
    return mk, fm, cfg


def _rows(x: np.ndarray) -> np.ndarray:
    """Rows along the last dimension; a 1-D tensor is one row."""
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# deterministic methods: equal to float32 rounding
# ----------------------------------------------------------------------------------------------------------------

DETERMINISTIC = {
    "slerp_t03": SPHERICAL, "slerp_t07_base_listed": SPHERICAL, "slerp_lerp_branch": SPHERICAL,
    "slerp_gradient": SPHERICAL,
    "nuslerp_nobase": SPHERICAL, "nuslerp_base": SPHERICAL, "nuslerp_rows": SPHERICAL,
    "nuslerp_cols_base": SPHERICAL,
    "multislerp_nobase3": SPHERICAL, "multislerp_base3": SPHERICAL, "multislerp_base_unnormalized": SPHERICAL,
    "karcher_base_joins": SPHERICAL, "karcher_iters": SPHERICAL, "karcher_far_one_iter": SPHERICAL,
    "karcher_far": SPHERICAL, "karcher_tol_gate": SPHERICAL, "slerp_far": SPHERICAL,
    "breadcrumbs_d05": ELEMENTWISE, "breadcrumbs_gamma0": ELEMENTWISE, "breadcrumbs_mixed": ELEMENTWISE,
    "breadcrumbs_single": ELEMENTWISE, "breadcrumbs_ties": ELEMENTWISE, "breadcrumbs_ties_norm_rescale": ELEMENTWISE,
    "sce_top1": ELEMENTWISE,
    "ram_default": ELEMENTWISE, "ram_eps": ELEMENTWISE, "ramplus_tl_default": ELEMENTWISE,
    "ramplus_tl_custom": ELEMENTWISE,
    "model_stock_2": SPHERICAL, "model_stock_3_filter_wise": SPHERICAL, "model_stock_4": SPHERICAL,
    "model_stock_4_filter_wise": SPHERICAL,
    "nearswap_t0002": ELEMENTWISE, "nearswap_t00005": ELEMENTWISE,
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_deterministic_equal_to_rounding(mk_runs, fm_run, case):
    mk, fm, _ = _pair(mk_runs, fm_run, case)
    tol = DETERMINISTIC[case]
    diffs = []
    for name in sorted(mk):
        a, b = mk[name].reshape(-1).astype(np.float64), fm[name].reshape(-1).astype(np.float64)
        np.testing.assert_allclose(b, a, **tol, err_msg=f"{case}: {name}")
        diffs.append(max_diffs(a, b, np.ones(a.size, dtype=bool)))
    report_diffs(case, diffs)
    assert {dtypes_in_dir(mk_runs[case][1])[n] for n in mk} == {"F32"}
    assert set(dtypes_in_dir(fm_run(case)).values()) == {"F32"}


def test_passthrough_scale_is_bit_identical(mk_runs, fm_run, family5):
    mk, fm, _ = _pair(mk_runs, fm_run, "passthrough_scale")
    for name in sorted(mk):
        np.testing.assert_array_equal(fm[name], mk[name], err_msg=name)
    a = model(family5, "a")
    # anchors: o_proj × 0.3; mlp on layer 2 of 4 (t = 2/3): 0.5 + (1.7 − 0.5)·2/3 = 1.3; norms × 1
    o = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(fm[o], a[o] * np.float32(0.3))
    up = "model.layers.2.mlp.up_proj.weight"
    np.testing.assert_array_equal(fm[up], a[up] * np.float32(0.5 + 1.2 * 2 / 3))
    n = "model.layers.3.input_layernorm.weight"
    np.testing.assert_array_equal(fm[n], a[n])


def test_slerp_endpoints_and_gradient_anchor(mk_runs, fm_run, family5):
    """Not only agreement: the gradient case's t is 0 / 1 at the ends of the self_attn / mlp ramps, so those layers
    are exactly one of the two models on both sides."""
    mk, fm, _ = _pair(mk_runs, fm_run, "slerp_gradient")
    base, d = model(family5, "base"), model(family5, "d")
    last = LAYERS - 1
    for out in (mk, fm):
        # layer 0: self_attn t = 0 (base), mlp t = 1 (d); the last layer the other way round
        for tensor, want in (("model.layers.0.self_attn.q_proj.weight", base),
                             ("model.layers.0.mlp.up_proj.weight", d),
                             (f"model.layers.{last}.self_attn.v_proj.weight", d),
                             (f"model.layers.{last}.mlp.down_proj.weight", base)):
            np.testing.assert_allclose(out[tensor], want[tensor], rtol=1e-6, atol=1e-8, err_msg=tensor)


@pytest.mark.parametrize("case", ["karcher_base_joins", "karcher_iters", "karcher_far", "multislerp_nobase3",
                                  "multislerp_base3", "multislerp_base_unnormalized"])
def test_spherical_norm_anchors(mk_runs, fm_run, family5, case):
    """Anchors that do not come from either tool: karcher returns (Σ‖T_i‖/N)·u with ‖u‖ = 1 over *all* inputs, the
    base_model included (mergekit adds it as an input); multislerp returns (Σ w_i‖X_i‖)·r (+ base) with ‖r‖ = 1,
    w normalised only with normalize_weights. Per tensor, to 1e-5 relative."""
    mk, fm, cfg = _pair(mk_runs, fm_run, case)
    p = cfg.get("parameters", {})
    names = [Path(m["model"]).name for m in cfg["models"]]
    has_base = "base_model" in cfg
    if case.startswith("karcher"):
        names = ["base", *names] if has_base else names
        weights = np.full(len(names), 1.0 / len(names))
    else:
        weights = np.array([m["parameters"]["weight"] for m in cfg["models"]])
        if p.get("normalize_weights", True):
            weights = weights / weights.sum()
    base = model(family5, "base")
    for name in sorted(mk):
        origin = base[name].astype(np.float64) if has_base and case.startswith("multislerp") else 0.0
        norms = [np.linalg.norm(model(family5, m)[name].astype(np.float64) - origin) for m in names]
        want = float(np.dot(weights, norms))
        for side, out in (("mergekit", mk), ("ferromerge", fm)):
            got = np.linalg.norm(out[name].astype(np.float64) - origin)
            assert got == pytest.approx(want, rel=1e-5), f"{case} {side} {name}: norm {got} vs {want}"


def _breadcrumbs_keep(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit 0.1.5's magnitude_outliers mask over the flattened tensor (magnitudes here are distinct)."""
    flat = np.abs(delta.reshape(-1))
    n = flat.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = np.zeros(n, dtype=bool)
    keep[np.argsort(flat, kind="stable")[n_bot : n_bot + target]] = True
    return keep


def test_breadcrumbs_single_kept_set(mk_runs, fm_run, family5):
    """One model, weight 1, no rescale: out − base = δ·mask exactly on both sides (δ is exact), so the kept set is
    read off the output; both equal the band [n_bot, n_bot + int(d·n)) of |δ| ascending."""
    case = "breadcrumbs_single"
    mk, fm, cfg = _pair(mk_runs, fm_run, case)
    p = cfg["models"][0]["parameters"]
    base, x = model(family5, "base"), model(family5, "a")
    for name in sorted(mk):
        delta = x[name].astype(np.float64) - base[name]
        want = _breadcrumbs_keep(delta, p["density"], p["gamma"])
        for side, out in (("mergekit", mk), ("ferromerge", fm)):
            got = out[name].reshape(-1) != base[name].reshape(-1)
            assert np.array_equal(got, want), f"{side} {name}: kept set differs in {int((got != want).sum())}"
            np.testing.assert_array_equal(out[name].reshape(-1)[got], x[name].reshape(-1)[got])


# ----------------------------------------------------------------------------------------------------------------
# sce with select_topk < 1: the top-k by variance, ambiguous only within float rounding of the threshold
# ----------------------------------------------------------------------------------------------------------------


def test_sce_topk_kept_set_and_values(mk_runs, fm_run, family5):
    case = "sce_top05"
    mk, fm, cfg = _pair(mk_runs, fm_run, case)
    k_frac = cfg["parameters"]["select_topk"]
    names = [Path(m["model"]).name for m in cfg["models"]]
    base = model(family5, "base")
    diffs, excluded, total = [], 0, 0
    for name in sorted(mk):
        b0 = base[name].reshape(-1).astype(np.float64)
        tv = np.stack([model(family5, m)[name].reshape(-1).astype(np.float64) - b0 for m in names])
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * k_frac)
        thr = np.sort(var)[::-1][k - 1]
        # float32 variances within 1e-5 (relative) of the k-th largest can fall on either side in either tool, when
        # the k-th has a rival that close
        ambiguous = np.abs(var - thr) <= 1e-5 * thr
        if ambiguous.sum() == 1:
            ambiguous[:] = False
        a, b = mk[name].reshape(-1).astype(np.float64), fm[name].reshape(-1).astype(np.float64)
        kept_mk, kept_fm = a != b0, b != b0
        assert int(kept_mk.sum()) == k and int(kept_fm.sum()) == k, \
            f"{name}: kept mergekit {int(kept_mk.sum())}, ferromerge {int(kept_fm.sum())}, want k = {k}"
        differ = kept_mk != kept_fm
        assert not (differ & ~ambiguous).any(), \
            f"{name}: kept sets differ away from the threshold at {np.flatnonzero(differ & ~ambiguous)[:8].tolist()}"
        keep = ~ambiguous
        np.testing.assert_allclose(b[keep], a[keep], **ELEMENTWISE, err_msg=f"{case}: {name}")
        excluded += int(ambiguous.sum())
        total += a.size
        diffs.append(max_diffs(a, b, keep))
    report_diffs(case, diffs)
    print(f"; {excluded} of {total} elements at the variance threshold excluded", end="")
    assert excluded <= 0.001 * total


# ----------------------------------------------------------------------------------------------------------------
# arcee_fusion: values, the kept set, and the output dtype (mergekit's issue #604)
# ----------------------------------------------------------------------------------------------------------------


def _arcee_importance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """float64 importance |b − a|·KL(softmax(b) ‖ softmax(a)) per row and its threshold median + 1.5·IQR from the
    exact quantiles (sorted, index floor(q·(n−1)))."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ra, rb = _rows(a), _rows(b)

    def softmax(r):
        e = np.exp(r - r.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(rb) + 1e-8, softmax(ra) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=1, keepdims=True)
    imp = (np.abs(rb - ra) * kl).reshape(-1)
    s = np.sort(imp)
    q1, med, q3 = (s[int(qq * (s.size - 1))] for qq in (0.25, 0.5, 0.75))
    return imp, med + 1.5 * (q3 - q1)


#: Half-width (relative) of the band around the threshold where a kept/dropped decision depends on rounding. The
#: KL of two near-equal softmax rows is second order in their difference while its terms are first order, so float32
#: loses about three digits to cancellation: mergekit's float32 importance measured up to 2.5e-2 relative from the
#: float64 one on this family, its threshold 2.0e-2. A float32 implementation is allowed as much on each of the two.
ARCEE_BAND = 2.0**-4


@pytest.mark.parametrize(("case", "base_name", "other"), [("arcee_fusion_fp32", "base", "a"),
                                                          ("arcee_fusion_bf16", "base16", "a16")])
def test_arcee_fusion(mk_runs, fm_run, family5, case, base_name, other):
    """Kept elements are the fine-tune, dropped ones the base, on both sides. ferromerge's kept set is the float64
    reference's outside the rounding band. mergekit's too for float32 inputs; for bfloat16 inputs mergekit computes
    the importance in bfloat16, where the KL is rounding noise (measured up to 360× off on this family), so its kept
    set is only reported. Values kept by both agree (bfloat16: mergekit adds a bfloat16-rounded b − a to a in
    float32, so within one bfloat16 ulp of b − a and of the output). Output dtype: mergekit float32 always (its issue
    #604), ferromerge the inputs' dtype."""
    mk, fm, _ = _pair(mk_runs, fm_run, case)
    base, x = model(family5, base_name), model(family5, other)
    bf16 = case.endswith("bf16")
    assert set(dtypes_in_dir(mk_runs[case][1]).values()) == {"F32"}
    assert set(dtypes_in_dir(fm_run(case)).values()) == {"BF16" if bf16 else "F32"}
    diffs, near, flipped, total, kept_total = [], 0, 0, 0, 0
    for name in sorted(mk):
        a0, b0 = base[name].reshape(-1).astype(np.float64), x[name].reshape(-1).astype(np.float64)
        imp, thr = _arcee_importance(base[name], x[name])
        ambiguous = np.abs(imp - thr) <= ARCEE_BAND * thr
        got_mk, got_fm = mk[name].reshape(-1).astype(np.float64), fm[name].reshape(-1).astype(np.float64)
        changed = a0 != b0
        kept_mk, kept_fm = (got_mk != a0) & changed, (got_fm != a0) & changed
        want = (imp >= thr) & changed
        for side, kept in (("mergekit", kept_mk), ("ferromerge", kept_fm))[bf16:]:
            bad = (kept != want) & ~ambiguous
            assert not bad.any(), f"{case} {side} {name}: kept set wrong away from the threshold at " \
                                  f"{np.flatnonzero(bad)[:8].tolist()} (of {int(want.sum())} kept)"
        np.testing.assert_array_equal(got_mk[~kept_mk], a0[~kept_mk], err_msg=f"mergekit {name}")
        np.testing.assert_array_equal(got_fm[~kept_fm], a0[~kept_fm], err_msg=f"ferromerge {name}")
        np.testing.assert_array_equal(got_fm[kept_fm], b0[kept_fm], err_msg=f"ferromerge {name}")
        both = kept_mk & kept_fm
        if bf16:
            tol = _bf16_ulp(b0 - a0) + _bf16_ulp(b0)
            assert (np.abs(got_fm[both] - got_mk[both]) <= tol[both]).all(), name
        else:
            np.testing.assert_allclose(got_fm[both], got_mk[both], **ELEMENTWISE, err_msg=name)
        near += int(ambiguous.sum())
        flipped += int((kept_mk != kept_fm).sum())
        kept_total += int((kept_mk | kept_fm).sum())
        total += a0.size
        diffs.append(max_diffs(got_mk, got_fm, both | (~kept_mk & ~kept_fm)))
    report_diffs(case, diffs)
    print(f"; kept sets differ in {flipped} of {total} elements, {100 * flipped / max(kept_total, 1):.2f}% of the "
          f"{kept_total} kept by either side ({near} within the rounding band)", end="")
    assert near <= 0.05 * total


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    ax = np.maximum(np.abs(x), 2.0**-126)
    return np.ldexp(1.0, (np.floor(np.log2(ax)) - 7).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# della / della_linear: statistics and structure (different random generators)
# ----------------------------------------------------------------------------------------------------------------


def _della_probs(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probability per element: ranks 1..n of |δ| ascending within each row (distinct here),
    p = (d − ε) + 2ε·(rank − 1)/(n − 1)."""
    rows = np.abs(_rows(delta))
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
    norm = ranks / (n - 1) if n > 1 else np.zeros_like(rows)
    return ((density - epsilon) + 2 * epsilon * norm).reshape(-1)


def _poisson_binomial_ok(kept: int, p: np.ndarray, sigmas: float = 5.0) -> bool:
    return abs(kept - p.sum()) <= sigmas * math.sqrt((p * (1 - p)).sum()) + 1


def test_della_linear_single_rank_bands(mk_runs, fm_run, family5):
    """One model, weight 1, no rescale: out = base + δ·mask on both sides. Kept values are exactly the fine-tune,
    dropped ones exactly the base; each tensor's kept count and, over the model, each quarter of the normalised rank's
    kept count match Σp within 5σ on both sides; the two sides' band fractions agree within a two-sample 5σ bound."""
    case = "della_linear_single"
    mk, fm, cfg = _pair(mk_runs, fm_run, case)
    par = cfg["models"][0]["parameters"]
    base, x = model(family5, "base"), model(family5, "a")
    bands = np.linspace(0, 1, 5)
    kept_band = {"mergekit": np.zeros(4), "ferromerge": np.zeros(4)}
    p_band, var_band, n_band = np.zeros(4), np.zeros(4), np.zeros(4)
    for name in sorted(mk):
        b0, x0 = base[name].reshape(-1), x[name].reshape(-1)
        delta = x[name].astype(np.float64) - base[name]
        p = _della_probs(delta, par["density"], par["epsilon"])
        rn = (p - (par["density"] - par["epsilon"])) / (2 * par["epsilon"])
        band = np.clip(np.searchsorted(bands, rn, side="right") - 1, 0, 3)
        for side, out in (("mergekit", mk), ("ferromerge", fm)):
            o = out[name].reshape(-1)
            kept = o != b0
            np.testing.assert_array_equal(o[kept], x0[kept], err_msg=f"{side} {name}")
            assert _poisson_binomial_ok(int(kept.sum()), p), f"{side} {name}: kept {int(kept.sum())} of {p.size}"
            for i in range(4):
                kept_band[side][i] += kept[band == i].sum()
        for i in range(4):
            p_band[i] += p[band == i].sum()
            var_band[i] += (p * (1 - p))[band == i].sum()
            n_band[i] += (band == i).sum()
    frac = {s: kept_band[s] / n_band for s in kept_band}
    print(f"\n[mergekit-diff] {case}: kept fraction per rank quarter: expected {np.round(p_band / n_band, 4)}, "
          f"mergekit {np.round(frac['mergekit'], 4)}, ferromerge {np.round(frac['ferromerge'], 4)}", end="")
    for side in kept_band:
        assert (np.abs(kept_band[side] - p_band) <= 5 * np.sqrt(var_band) + 1).all(), side
    assert (np.abs(kept_band["mergekit"] - kept_band["ferromerge"]) <= 5 * np.sqrt(2 * var_band) + 1).all()


def test_della_single_l1_rescale(mk_runs, fm_run, family5):
    """della defaults (normalize, L1 rescale), one model: out = base + δ·mask·‖δ‖₁/‖δ·mask‖₁ per tensor, to float32
    rounding of the addition, and the support matches Σp within 5σ, on both sides."""
    case = "della_single_l1"
    mk, fm, cfg = _pair(mk_runs, fm_run, case)
    par = cfg["models"][0]["parameters"]
    base, x = model(family5, "base"), model(family5, "b")
    tot_p, tot_var, kept_tot = 0.0, 0.0, {"mergekit": 0, "ferromerge": 0}
    for name in sorted(mk):
        b0 = base[name].reshape(-1).astype(np.float64)
        delta = x[name].reshape(-1).astype(np.float64) - b0
        p = _della_probs(x[name].astype(np.float64) - base[name], par["density"], par.get("epsilon", 0.15))
        tot_p += p.sum()
        tot_var += (p * (1 - p)).sum()
        for side, out in (("mergekit", mk), ("ferromerge", fm)):
            o = out[name].reshape(-1).astype(np.float64)
            kept = o != b0
            scale = np.abs(delta).sum() / np.abs(delta[kept]).sum()
            want = b0 + np.where(kept, delta * scale, 0.0)
            # one float32 rounding of base + scaled δ on each side, plus the float32 scale factor
            tol = 2 * _f32_ulp(want) + 1e-6 * np.abs(delta * scale)
            bad = np.abs(o - want) > tol
            assert not bad.any(), f"{side} {name}: {int(bad.sum())} elements are not base + δ·s, e.g. " \
                                  f"{o[bad][:4].tolist()} vs {want[bad][:4].tolist()}"
            kept_tot[side] += int(kept.sum())
    print(f"\n[mergekit-diff] {case}: kept {kept_tot}, expected {tot_p:.0f} ± {math.sqrt(tot_var):.0f}", end="")
    for side, k in kept_tot.items():
        assert abs(k - tot_p) <= 5 * math.sqrt(tot_var) + 1, side


def _f32_ulp(x: np.ndarray) -> np.ndarray:
    ax = np.maximum(np.abs(x), 2.0**-126)
    return np.ldexp(1.0, (np.floor(np.log2(ax)) - 23).astype(np.int64))


@pytest.mark.parametrize("case", ["della_pair", "della_linear_pair"])
def test_della_pair_statistics(mk_runs, fm_run, family5, case):
    """Two models: mean and mean |·| of the merged delta over the whole model agree within two-sample 5σ; the
    support (kept by at least one model: 1 − (1−p_a)(1−p_b) per element) matches on both sides within 5σ."""
    mk, fm, cfg = _pair(mk_runs, fm_run, case)
    base = model(family5, "base")
    md = {"mergekit": [], "ferromerge": []}
    support_p = []
    for name in sorted(mk):
        b0 = base[name].reshape(-1).astype(np.float64)
        miss = np.ones(b0.size)
        for m in cfg["models"]:
            x = model(family5, Path(m["model"]).name)[name]
            par = m["parameters"]
            miss *= 1 - _della_probs(x.astype(np.float64) - base[name], par["density"], par.get("epsilon", 0.15))
        support_p.append(1 - miss)
        md["mergekit"].append(mk[name].reshape(-1).astype(np.float64) - b0)
        md["ferromerge"].append(fm[name].reshape(-1).astype(np.float64) - b0)
    a, b = np.concatenate(md["mergekit"]), np.concatenate(md["ferromerge"])
    p = np.concatenate(support_p)
    se = math.sqrt(a.var() / a.size + b.var() / b.size)
    se_abs = math.sqrt(np.abs(a).var() / a.size + np.abs(b).var() / b.size)
    se_sq = math.sqrt((a**2).var() / a.size + (b**2).var() / b.size)
    print(f"\n[mergekit-diff] {case}: mean merged delta mergekit {a.mean():.3e}, ferromerge {b.mean():.3e} "
          f"(se {se:.1e}); mean |delta| {np.abs(a).mean():.4e} vs {np.abs(b).mean():.4e}; "
          f"support {np.mean(a != 0):.4f} vs {np.mean(b != 0):.4f} (expected {p.mean():.4f})", end="")
    assert abs(a.mean() - b.mean()) <= 5 * se
    assert abs(np.abs(a).mean() - np.abs(b).mean()) <= 5 * se_abs
    assert abs((a**2).mean() - (b**2).mean()) <= 5 * se_sq
    assert _poisson_binomial_ok(int((a != 0).sum()), p) and _poisson_binomial_ok(int((b != 0).sum()), p)


def test_della_bad_epsilon_fails_on_both(mk_runs, fm_run):
    """density 0.5 ± epsilon 0.5 leaves (0, 1): mergekit raises at merge time, ferromerge before writing."""
    _, _, _, err = mk_runs["della_bad_epsilon"]
    assert err is not None and "Epsilon must be chosen" in err, err
    with pytest.raises(Exception, match="(?i)epsilon"):
        fm_run("della_bad_epsilon")
