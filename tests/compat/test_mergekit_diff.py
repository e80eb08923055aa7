"""ferromerge vs the real mergekit (0.1.5, own virtualenv) on tiny Llama-shaped fp32 model families.

The models (the ``family`` fixture of tests/compat/conftest.py, shapes from ``helpers.mergekit``) are written with
the ``safetensors`` package (not ferromerge's writer), with a ``LlamaForCausalLM`` config.json: hidden 32,
intermediate 48, 2 layers, vocab 64, 4 heads, untied lm_head. mergekit runs through its ``mergekit-yaml`` command
(click entry point ``mergekit.scripts.run_yaml:main``), all configs in one interpreter to pay its ~8 s import once,
with ``--no-copy-tokenizer`` (there is no tokenizer). ferromerge runs on the same YAML file through
``ferromerge.run``.

Tolerances:

* float32 math on both sides: ``assert_allclose(rtol=1e-6, atol=1e-7)`` (values are ~0.02, float32 ulp ~2e-9;
  the only differences are summation order and division vs multiplication by a reciprocal).
  TIES elements whose sign election is within float32 noise (|Σ W| ≤ 1e-5 Σ|W|) or whose |δ| ties the trim
  threshold (torch's argsort breaks such ties arbitrarily, we break them by index) are excluded and counted.
* ``out_dtype: bfloat16`` with float32 math: both round the same float32-accurate value once, so at most one
  bfloat16 ulp apart (a difference appears only when the float32 values straddle a rounding boundary).
* ``dtype: bfloat16`` (inputs rounded to bf16): mergekit's GTA methods then compute *in bf16* (each of
  w·δ, Σ W, Σ w, the quotient, λ·, b + · is rounded to bf16, unit roundoff u = 2^-8), ferromerge in float32 with a
  single rounding at the end. The difference is bounded by ≈ 6u·M + 2u·|out| with M = |λ|·Σ|W|/|divisor| the
  magnitude of the merged delta; we allow 8u·M + 2u·|out| + 1 ulp. ``linear`` accumulates in float32 in mergekit
  0.1.5, so there it is one bf16 ulp. ``dtype: float16`` likewise with u = 2^-11.
* DARE: different random generators, so only statistics are compared (kept fraction within 5σ of the binomial,
  L1 norms preserved by rescale, means of the merged deltas within a two-sample 5σ bound).

Run with ``-s`` to see the max abs/rel differences per case.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers.mergekit import (
    MODELS,
    dtypes_in_dir,
    max_diffs,
    model_entries,
    read_safetensors_dir,
    report_diffs,
    run_mergekit,
)
from reference import codec
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import assert_matches

pytestmark = pytest.mark.mergekit

# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------



def case_configs(root: Path) -> dict[str, dict]:
    base = str(root / "base")
    gta = lambda method, names, params, **kw: {  # noqa: E731
        "merge_method": method, "base_model": base, "models": model_entries(root, names, params), **kw}
    c = {
        "linear_norm": {"merge_method": "linear", "models": model_entries(root, "ab", [{"weight": 0.3}, {"weight": 0.7}]),
                        "dtype": "float32"},
        "linear_neg_unnorm": {"merge_method": "linear",
                              "models": model_entries(root, "abc", [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.8}]),
                              "parameters": {"normalize": False}, "dtype": "float32"},
        "task_arithmetic": gta("task_arithmetic", "abc", [{"weight": 0.5}, {"weight": -0.3}, {"weight": 1.0}],
                               parameters={"lambda": 0.7}, dtype="float32"),
        "ties_d05": gta("ties", "ab", [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
                        dtype="float32"),
        "ties_uneven_neg": gta("ties", "abc", [{"weight": 0.7, "density": 0.2}, {"weight": -0.4, "density": 0.6},
                                               {"weight": 1.1, "density": 0.9}], dtype="float32"),
        "ties_nonorm_lambda": gta("ties", "abc", [{"weight": 0.6, "density": 0.3}] * 3,
                                  parameters={"normalize": False, "lambda": 1.3}, dtype="float32"),
        "ties_rescale": gta("ties", "ab", [{"weight": 0.8, "density": 0.4}, {"weight": 0.4, "density": 0.7}],
                            parameters={"rescale": True}, dtype="float32"),
        "ties_tiny_density": gta("ties", "ab", [{"weight": 1.0, "density": 0.01}, {"weight": 1.0, "density": 0.57}],
                                 dtype="float32"),
        "ties_out_bf16": gta("ties", "abc", [{"weight": 0.5, "density": 0.5}] * 3, dtype="float32",
                             out_dtype="bfloat16"),
        "linear_dtype_bf16": {"merge_method": "linear",
                              "models": model_entries(root, "ab", [{"weight": 0.3}, {"weight": 0.7}]), "dtype": "bfloat16"},
        "ties_dtype_bf16": gta("ties", "abc", [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7},
                                               {"weight": 0.9, "density": 0.4}], dtype="bfloat16"),
        "ta_dtype_bf16_out_f32": gta("task_arithmetic", "ab", [{"weight": 0.6}, {"weight": 0.6}],
                                     dtype="bfloat16", out_dtype="float32"),
        "ta_dtype_f16": gta("task_arithmetic", "abc", [{"weight": 0.5}, {"weight": 0.25}, {"weight": -0.5}],
                            dtype="float16"),
        # DARE: statistics only
        "dare_linear_single": gta("dare_linear", "a", [{"weight": 1.0, "density": 0.4}],
                                  parameters={"rescale": False}, dtype="float32"),
        "dare_ties_single_l1": gta("dare_ties", "b", [{"weight": 1.0, "density": 0.3}], dtype="float32"),
        "dare_linear_pair": gta("dare_linear", "ab", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5}],
                                dtype="float32"),
        "dare_ties_pair": gta("dare_ties", "ab", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5}],
                              dtype="float32"),
    }
    return c



@pytest.fixture(scope="session")
def mk_runs(family, mergekit_python_path, tmp_path_factory):
    """{case: (config_path, mergekit_out_dir, config, mergekit_error_or_None)}: every case through mergekit-yaml."""
    configs = case_configs(family)
    done = run_mergekit(configs, mergekit_python_path, tmp_path_factory.mktemp("mk-runs"))
    return {name: (cfg, out, configs[name], err) for name, (cfg, out, err) in done.items()}


@pytest.fixture(scope="session")
def merged(mk_runs, tmp_path_factory):
    """{case: (mergekit_out_dir, ferromerge_out_dir, config, mergekit_error)}; ferromerge runs the same YAML file."""
    import ferromerge

    work = tmp_path_factory.mktemp("fm-runs")
    out = {}
    for name, (cfg_path, mk_dir, cfg, err) in mk_runs.items():
        fm_dir = work / f"fm-{name}"
        ferromerge.run(str(cfg_path), str(fm_dir), quiet=True, seed=0)
        out[name] = (mk_dir, fm_dir, cfg, err)
    return out


def _mk_only(mk_runs, case):
    _, mk_dir, cfg, err = mk_runs[case]
    assert err is None, f"mergekit failed on {case}:\n{err}"
    return read_safetensors_dir(mk_dir), cfg


def _load(merged, case):
    mk_dir, fm_dir, cfg, err = merged[case]
    assert err is None, f"mergekit failed on {case}:\n{err}"
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_dir)
    assert set(mk) == set(fm), f"tensor sets differ: only mergekit {sorted(set(mk) - set(fm))}, " \
                               f"only ferromerge {sorted(set(fm) - set(mk))}"
    return mk, fm, cfg


_FAMILY_CACHE: dict = {}


def _family_tensors(family):
    if not _FAMILY_CACHE:
        for m in ("base", *MODELS):
            _FAMILY_CACHE[m] = read_safetensors_dir(family / m)
    return _FAMILY_CACHE


def _case_inputs(family, cfg, tensor):
    f = _family_tensors(family)
    names = [Path(m["model"]).name for m in cfg["models"]]
    base = f["base"][tensor].reshape(-1) if "base_model" in cfg else None
    xs = [f[m][tensor].reshape(-1) for m in names]
    w = [m["parameters"]["weight"] for m in cfg["models"]]
    d = [m["parameters"].get("density", 1.0) for m in cfg["models"]]
    return base, xs, w, d


def _trim_tie_elements(base, xs, dens):
    """Elements whose |δ| equals some model's trim threshold while another element with the same |δ| falls on the
    other side: the kept set there depends on tie-breaking."""
    n = base.size
    tie = np.zeros(n, dtype=bool)
    for x, d in zip(xs, dens):
        k = task_arithmetic_ref.ties_k(d, n)
        if k >= n:
            continue
        a = np.abs(task_arithmetic_ref.task_vector(x, base)).astype(np.float64)
        s = np.sort(a)[::-1]
        if s[k - 1] == s[k]:
            tie |= a == s[k - 1]
    return tie


def _trim_sensitive_reduced(base, xs, dens, dtype):
    """For mergekit computing in ``dtype``: its δ = x − b is rounded to ``dtype`` (exact only when x and b are within a
    factor 2), so it ranks slightly different magnitudes. Elements whose kept status differs between the float32 and
    the rounded ranking, or that tie the threshold in either, depend on that rounding / tie-breaking."""
    n = base.size
    out = _trim_tie_elements(base, xs, dens)
    for x, d in zip(xs, dens):
        dl = task_arithmetic_ref.task_vector(x, base)
        dr = codec.round_to(dl, dtype)
        out |= task_arithmetic_ref.ties_trim_mask(dl, d) != task_arithmetic_ref.ties_trim_mask(dr, d)
        k = task_arithmetic_ref.ties_k(d, n)
        if k < n:
            a = np.abs(dr).astype(np.float64)
            s = np.sort(a)[::-1]
            if s[k - 1] == s[k]:
                out |= a == s[k - 1]
    return out


# ----------------------------------------------------------------------------------------------------------------
# deterministic methods, float32 math
# ----------------------------------------------------------------------------------------------------------------

FP32_CASES = ["linear_norm", "linear_neg_unnorm", "task_arithmetic", "ties_d05", "ties_uneven_neg",
              "ties_nonorm_lambda", "ties_rescale", "ties_tiny_density"]


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_equal_to_rounding(merged, family, case):
    mk, fm, cfg = _load(merged, case)
    diffs, excluded, total = [], 0, 0
    for name in sorted(mk):
        a, b = mk[name].reshape(-1).astype(np.float64), fm[name].reshape(-1).astype(np.float64)
        keep = np.ones(a.size, dtype=bool)
        if cfg["merge_method"] == "ties":
            base, xs, w, d = _case_inputs(family, cfg, name)
            p = cfg.get("parameters", {})
            r = task_arithmetic_ref.ties(base, xs, w, d, normalize=p.get("normalize", True), lam=p.get("lambda", 1.0),
                         rescale="l1" if p.get("rescale", False) else "none")
            keep = ~(r.ambiguous | _trim_tie_elements(base, xs, d))
        excluded += int((~keep).sum())
        total += a.size
        np.testing.assert_allclose(b[keep], a[keep], rtol=1e-6, atol=1e-7, err_msg=f"{case}: {name}")
        diffs.append(max_diffs(a, b, keep))
    report_diffs(case, diffs)
    print(f"; {excluded} of {total} elements excluded (near-zero election or trim tie)", end="")
    assert excluded <= 0.001 * total


@pytest.mark.parametrize("case", FP32_CASES)
def test_mergekit_agrees_with_reference(mk_runs, family, case):
    """Anchor (no ferromerge involved): mergekit itself equals tests/reference/task_arithmetic.py, so the reference encodes mergekit."""
    mk, cfg = _mk_only(mk_runs, case)
    p = cfg.get("parameters", {})
    method = cfg["merge_method"]
    for name in sorted(mk):
        base, xs, w, d = _case_inputs(family, cfg, name)
        if method == "linear":
            r = task_arithmetic_ref.linear(xs, w, p.get("normalize", True))
            tie = np.zeros(r.out.size, dtype=bool)
        elif method == "task_arithmetic":
            r = task_arithmetic_ref.task_arithmetic(base, xs, w, normalize=p.get("normalize", False), lam=p.get("lambda", 1.0))
            tie = np.zeros(r.out.size, dtype=bool)
        else:
            r = task_arithmetic_ref.ties(base, xs, w, d, normalize=p.get("normalize", True), lam=p.get("lambda", 1.0),
                         rescale="l1" if p.get("rescale", False) else "none")
            tie = _trim_tie_elements(base, xs, d)
        r.ambiguous |= tie
        assert_matches(mk[name].reshape(-1), r, "float32", context=f"mergekit vs reference, {case} {name}")


def test_out_dtype_bf16_within_one_ulp(merged, family):
    case = "ties_out_bf16"
    mk, fm, cfg = _load(merged, case)
    assert set(dtypes_in_dir(merged[case][0]).values()) == {"BF16"}
    assert set(dtypes_in_dir(merged[case][1]).values()) == {"BF16"}
    diffs, n_diff, total = [], 0, 0
    for name in sorted(mk):
        a, b = mk[name].reshape(-1).astype(np.float64), fm[name].reshape(-1).astype(np.float64)
        base, xs, w, d = _case_inputs(family, cfg, name)
        r = task_arithmetic_ref.ties(base, xs, w, d)
        keep = ~(r.ambiguous | _trim_tie_elements(base, xs, d))
        diff = np.abs(a - b)
        assert (diff[keep] <= codec.ulp(np.maximum(np.abs(a), np.abs(b)), "bfloat16")[keep]).all(), name
        n_diff += int((diff[keep] > 0).sum())
        total += a.size
        diffs.append(max_diffs(a, b, keep))
    report_diffs(case, diffs)
    print(f"; {n_diff} of {total} elements differ by one bf16 ulp", end="")
    assert n_diff <= 0.01 * total


# ----------------------------------------------------------------------------------------------------------------
# reduced-precision math in mergekit
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,dtype", [("linear_dtype_bf16", "bfloat16"), ("ties_dtype_bf16", "bfloat16"),
                                        ("ta_dtype_bf16_out_f32", "bfloat16"), ("ta_dtype_f16", "float16")])
def test_reduced_precision_dtype(merged, family, case, dtype):
    mk, fm, cfg = _load(merged, case)
    u = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    out_dtype = cfg.get("out_dtype", dtype)
    diffs, excluded, total = [], 0, 0
    for name in sorted(mk):
        a, b = mk[name].reshape(-1).astype(np.float64), fm[name].reshape(-1).astype(np.float64)
        base, xs, w, d = _case_inputs(family, cfg, name)
        xr = [codec.round_to(x, dtype) for x in xs]
        method = cfg["merge_method"]
        if method == "linear":
            r = task_arithmetic_ref.linear(xr, w, True)
            tol = codec.ulp(np.maximum(np.abs(a), np.abs(b)), dtype) + 1e-7 * r.scale
            keep = np.ones(a.size, dtype=bool)
        else:
            br = codec.round_to(base, dtype)
            if method == "ties":
                r = task_arithmetic_ref.ties(br, xr, w, d)
                # bf16 sums: elections within bf16 noise are coin flips; trim ties are common at 8 bits
                W = np.stack([wi * task_arithmetic_ref.sparsify(task_arithmetic_ref.task_vector(x, br), task_arithmetic_ref.ties_trim_mask(task_arithmetic_ref.task_vector(x, br), di),
                                                di, "none") for x, wi, di in zip(xr, w, d)])
                near = (np.abs(W).sum(0) > 0) & (np.abs(W.sum(0)) <= 8 * u * np.abs(W).sum(0))
                keep = ~(near | _trim_sensitive_reduced(br, xr, d, dtype))
            else:
                r = task_arithmetic_ref.task_arithmetic(br, xr, w)
                keep = np.ones(a.size, dtype=bool)
            M = r.scale - np.abs(br.astype(np.float64))  # |λ|·Σ|W|/|divisor| (·(1+Σ|w|/|div|) when normalized)
            tol = 8 * u * M + 2 * u * np.abs(r.out) + codec.ulp(np.abs(r.out), out_dtype)
        diff = np.abs(a - b)
        bad = keep & (diff > tol)
        assert not bad.any(), (
            f"{case} {name}: {int(bad.sum())} elements beyond tolerance; e.g. idx {np.flatnonzero(bad)[:5].tolist()} "
            f"mergekit {a[bad][:5].tolist()} ferromerge {b[bad][:5].tolist()} tol {tol[bad][:5].tolist()}"
        )
        # ferromerge (f32 math) must be at least as close to the float64 reference as mergekit, overall
        err_fm = np.abs(b - r.out)[keep].sum()
        err_mk = np.abs(a - r.out)[keep].sum()
        assert err_fm <= err_mk * 1.05 + 1e-9, f"{case} {name}: ferromerge L1 error {err_fm} > mergekit's {err_mk}"
        excluded += int((~keep).sum())
        total += a.size
        diffs.append(max_diffs(a, b, keep))
    report_diffs(case, diffs)
    print(f"; {excluded} of {total} excluded (bf16-close election or trim tie)", end="")
    assert excluded <= 0.05 * total


# ----------------------------------------------------------------------------------------------------------------
# DARE: statistics
# ----------------------------------------------------------------------------------------------------------------


def _binomial_ok(kept, n, p, sigmas=5.0):
    return abs(kept - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_dare_single_model_keep_fraction_and_values(merged, family):
    """One model, weight 1, no rescale: out = b + δ·m on both sides; both keep ≈ density; kept values agree."""
    case = "dare_linear_single"
    mk, fm, cfg = _load(merged, case)
    p = cfg["models"][0]["parameters"]["density"]
    tot_n = tot_mk = tot_fm = 0
    for name in sorted(mk):
        base, (x,), _, _ = _case_inputs(family, cfg, name)
        a, b = mk[name].reshape(-1), fm[name].reshape(-1)
        nz = task_arithmetic_ref.task_vector(x, base) != 0
        m_mk, m_fm = (a != base) & nz, (b != base) & nz
        # dropped elements are exactly the base; kept ones are b + δ, computed the same way
        np.testing.assert_array_equal(a[~m_mk], base[~m_mk])
        np.testing.assert_array_equal(b[~m_fm], base[~m_fm])
        both = m_mk & m_fm
        np.testing.assert_allclose(b[both], a[both], rtol=1e-6, atol=1e-7)
        n = int(nz.sum())
        assert _binomial_ok(int(m_mk.sum()), n, p), f"mergekit kept {int(m_mk.sum())}/{n} of {name}"
        assert _binomial_ok(int(m_fm.sum()), n, p), f"ferromerge kept {int(m_fm.sum())}/{n} of {name}"
        tot_n += n
        tot_mk += int(m_mk.sum())
        tot_fm += int(m_fm.sum())
    print(f"\n[mergekit-diff] {case}: kept fraction mergekit {tot_mk / tot_n:.4f}, ferromerge {tot_fm / tot_n:.4f} "
          f"(density {p})", end="")
    assert _binomial_ok(tot_fm, tot_n, p) and _binomial_ok(tot_mk, tot_n, p)


def test_dare_single_model_l1_rescale(merged, family):
    """dare_ties default rescale (L1): ‖out − b‖₁ = ‖δ‖₁ per tensor on both sides; keep fraction ≈ density."""
    case = "dare_ties_single_l1"
    mk, fm, cfg = _load(merged, case)
    p = cfg["models"][0]["parameters"]["density"]
    for name in sorted(mk):
        base, (x,), _, _ = _case_inputs(family, cfg, name)
        delta = task_arithmetic_ref.task_vector(x, base).astype(np.float64)
        for side, out in (("mergekit", mk[name]), ("ferromerge", fm[name])):
            md = out.reshape(-1).astype(np.float64) - base
            np.testing.assert_allclose(np.abs(md).sum(), np.abs(delta).sum(), rtol=1e-4,
                                       err_msg=f"{side} {name}: L1 norm not preserved")
            kept = int((out.reshape(-1) != base).sum())
            assert _binomial_ok(kept, int((delta != 0).sum()), p), f"{side} kept {kept} of {name}"


@pytest.mark.parametrize("case", ["dare_linear_pair", "dare_ties_pair"])
def test_dare_pair_means_agree(merged, family, case):
    """Two models: the per-tensor mean of the merged delta is the same in distribution (two-sample 5σ bound over
    the whole model), and both keep-fractions of the merged support are close."""
    mk, fm, cfg = _load(merged, case)
    md_mk, md_fm = [], []
    for name in sorted(mk):
        base, xs, w, d = _case_inputs(family, cfg, name)
        md_mk.append(mk[name].reshape(-1).astype(np.float64) - base)
        md_fm.append(fm[name].reshape(-1).astype(np.float64) - base)
    a, b = np.concatenate(md_mk), np.concatenate(md_fm)
    se = math.sqrt(a.var() / a.size + b.var() / b.size)
    print(f"\n[mergekit-diff] {case}: mean merged delta mergekit {a.mean():.3e}, ferromerge {b.mean():.3e} "
          f"(se {se:.1e}); mean |delta| {np.abs(a).mean():.3e} vs {np.abs(b).mean():.3e}; "
          f"support {np.mean(a != 0):.4f} vs {np.mean(b != 0):.4f}", end="")
    assert abs(a.mean() - b.mean()) <= 5 * se
    # mean |merged delta|: each is an average of ~20k i.i.d.-ish terms; allow 5σ of the difference
    se_abs = math.sqrt(np.abs(a).var() / a.size + np.abs(b).var() / b.size)
    assert abs(np.abs(a).mean() - np.abs(b).mean()) <= 5 * se_abs
    # support: P(kept by at least one) = 1 − (1−d)² = 0.75 for both
    n = a.size
    assert _binomial_ok(int((a != 0).sum()), n, 0.75) and _binomial_ok(int((b != 0).sum()), n, 0.75)
